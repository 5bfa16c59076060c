//! pc-testdev's three [`Snapshot`]s.
//!
//! - [`TestdevPorts`]: the scratch register. The flush-page callback is a
//!   connection, not state.
//! - [`TestdevIrqLines`]: the level the guest last wrote to each line. A
//!   restore does not drive the lines: what they are connected to (the
//!   IOAPIC's pins) keeps its input levels in its own snapshot, and driving
//!   them again could deliver an interrupt twice.
//! - [`IoRam`]: the 64 KiB, as the 256-byte chunks that hold a nonzero
//!   byte (a chunk count, then each chunk's index and bytes, indexes
//!   rising), so an untouched I/O RAM costs a few bytes.
//!
//! Bodies, format version 1 (little-endian): `pc-testdev-ports` u32 scratch;
//! `pc-testdev-irq-lines` u32 levels (bit `n` = line `n`, bits 24-31 zero);
//! `pc-testdev-ioram` u16 chunk count (at most 256), then per chunk u8 index
//! (rising) and its 256 bytes.

use super::{IoRam, TestdevIrqLines, TestdevPorts, IO_RAM_SIZE, TESTDEV_IRQ_LINE_COUNT};
use crate::snapshot::{Snapshot, SnapshotError, StateReader, StateWriter};

/// The I/O RAM is saved in chunks of this many bytes.
const CHUNK: usize = 256;
const CHUNKS: usize = IO_RAM_SIZE as usize / CHUNK;

impl Snapshot for TestdevPorts {
    fn snapshot_name(&self) -> &'static str {
        "pc-testdev-ports"
    }

    fn snapshot_version(&self) -> u16 {
        1
    }

    fn save_body(&self, out: &mut StateWriter) {
        out.u32(self.scratch);
    }

    fn load_body(&mut self, input: &mut StateReader<'_>) -> Result<(), SnapshotError> {
        self.scratch = input.u32("scratch")?;
        Ok(())
    }
}

impl Snapshot for TestdevIrqLines {
    fn snapshot_name(&self) -> &'static str {
        "pc-testdev-irq-lines"
    }

    fn snapshot_version(&self) -> u16 {
        1
    }

    fn save_body(&self, out: &mut StateWriter) {
        out.u32(self.levels);
    }

    fn load_body(&mut self, input: &mut StateReader<'_>) -> Result<(), SnapshotError> {
        let at = input.offset();
        let levels = input.u32("line levels")?;
        if levels >> TESTDEV_IRQ_LINE_COUNT != 0 {
            return Err(input.invalid("line levels", levels.into(), at, "one bit per line, 24 lines"));
        }
        self.levels = levels;
        Ok(())
    }
}

impl Snapshot for IoRam {
    fn snapshot_name(&self) -> &'static str {
        "pc-testdev-ioram"
    }

    fn snapshot_version(&self) -> u16 {
        1
    }

    fn save_body(&self, out: &mut StateWriter) {
        let used: Vec<(usize, &[u8])> =
            self.bytes.chunks(CHUNK).enumerate().filter(|(_, c)| c.iter().any(|&b| b != 0)).collect();
        out.u16(used.len() as u16);
        for (index, chunk) in used {
            out.u8(index as u8);
            chunk.iter().for_each(|&b| out.u8(b));
        }
    }

    fn load_body(&mut self, input: &mut StateReader<'_>) -> Result<(), SnapshotError> {
        let at = input.offset();
        let count = usize::from(input.u16("chunk count")?);
        if count > CHUNKS {
            return Err(input.invalid("chunk count", count as u64, at, "at most 256 chunks of 256 bytes"));
        }
        let mut bytes = vec![0u8; IO_RAM_SIZE as usize];
        let mut next = 0;
        for _ in 0..count {
            let at = input.offset();
            let index = usize::from(input.u8("chunk index")?);
            if index < next {
                return Err(input.invalid("chunk index", index as u64, at, "chunk indexes rising"));
            }
            next = index + 1;
            bytes[index * CHUNK..next * CHUNK].copy_from_slice(input.bytes("chunk", CHUNK)?);
        }
        self.bytes = bytes;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::snapshot::check::refuses_damage;
    use crate::IoDevice;

    #[test]
    fn the_scratch_register_survives() {
        let mut dev = TestdevPorts::new(Box::new(|_| {}));
        dev.write(0, &0xdead_beefu32.to_le_bytes());
        let blob = dev.snapshot();
        let mut copy = TestdevPorts::new(Box::new(|_| {}));
        copy.restore(&blob).unwrap();
        let mut byte = [0u8];
        copy.read(8 + 2, &mut byte);
        assert_eq!(byte, [0xad]);
        refuses_damage(&blob, || TestdevPorts::new(Box::new(|_| {})));
    }

    #[test]
    fn line_levels_survive_and_a_restore_drives_no_line() {
        let mut dev = TestdevIrqLines::new();
        for n in [3, 14, 23] {
            dev.connect(n, Box::new(|_| {})).unwrap();
        }
        dev.write(14, &[1]);
        dev.write(23, &[5]);
        dev.write(3, &[1]);
        dev.write(3, &[0]);
        dev.write(7, &[1]); // unconnected: not a level
        assert_eq!(dev.levels(), 1 << 14 | 1 << 23);
        let blob = dev.snapshot();
        let driven = Arc::new(Mutex::new(Vec::new()));
        let fresh = || {
            let mut lines = TestdevIrqLines::new();
            let seen = driven.clone();
            lines.connect(14, Box::new(move |level| seen.lock().unwrap().push(level))).unwrap();
            lines
        };
        let mut copy = fresh();
        copy.restore(&blob).unwrap();
        assert_eq!(copy.levels(), 1 << 14 | 1 << 23);
        assert!(driven.lock().unwrap().is_empty(), "restoring drove a line");
        copy.write(14, &[0]);
        assert_eq!(copy.levels(), 1 << 23);
        refuses_damage(&blob, fresh);
    }

    #[test]
    fn a_line_past_23_is_refused() {
        let mut w = StateWriter::default();
        w.u32(1 << 24);
        let mut body = StateReader::for_test(w.into_bytes(), "pc-testdev-irq-lines");
        let err = TestdevIrqLines::new().load_body(&mut body).unwrap_err();
        assert!(err.to_string().contains("line levels = 0x1000000"), "{err}");
    }

    #[test]
    fn io_ram_contents_survive_in_chunks() {
        let mut ram = IoRam::new();
        ram.write(0x10, &0x1122_3344u32.to_le_bytes());
        ram.write(0xffff, &[0x77]);
        let blob = ram.snapshot();
        assert!(blob.len() < 2 * CHUNK + 64, "two chunks, {} bytes", blob.len());
        let mut copy = IoRam::new();
        copy.restore(&blob).unwrap();
        assert_eq!(copy.bytes(), ram.bytes());
        refuses_damage(&blob, IoRam::new);
    }

    #[test]
    fn a_full_io_ram_round_trips() {
        let mut ram = IoRam::new();
        let pattern: Vec<u8> = (0..IO_RAM_SIZE).map(|i| (i * 7 + 1) as u8).collect();
        ram.write(0, &pattern);
        let mut copy = IoRam::new();
        copy.write(0x40, &[9]);
        copy.restore(&ram.snapshot()).unwrap();
        assert_eq!(copy.bytes(), pattern);
        // And back to empty: a blob with no chunks clears what was there.
        copy.restore(&IoRam::new().snapshot()).unwrap();
        assert!(copy.bytes().iter().all(|&b| b == 0));
    }

    #[test]
    fn chunks_out_of_order_or_too_many_are_refused() {
        let mut w = StateWriter::default();
        w.u16(2);
        w.u8(5);
        (0..CHUNK).for_each(|_| w.u8(1));
        w.u8(5);
        let mut body = StateReader::for_test(w.into_bytes(), "pc-testdev-ioram");
        let mut ram = IoRam::new();
        let err = ram.load_body(&mut body).unwrap_err();
        assert!(err.to_string().contains("chunk index = 0x5"), "{err}");
        assert!(ram.bytes().iter().all(|&b| b == 0), "a refused body changed the RAM");
        let mut w = StateWriter::default();
        w.u16(257);
        let mut body = StateReader::for_test(w.into_bytes(), "pc-testdev-ioram");
        assert!(ram.load_body(&mut body).unwrap_err().to_string().contains("chunk count"));
    }
}
