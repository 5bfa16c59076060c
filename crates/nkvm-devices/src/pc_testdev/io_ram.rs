//! pc-testdev's I/O RAM: 64 KiB of bytes at 0xff00_0000 that behave like
//! RAM but are served through MMIO exits. The rules are in the
//! [parent module](super).

use std::fmt;

use super::IO_RAM_SIZE;
use crate::bad_access::BadAccessLog;
use crate::bus::IoDevice;

const NAME: &str = "pc-testdev ioram";

/// pc-testdev's MMIO-backed RAM; see the [module documentation](super).
#[derive(Clone)]
pub struct IoRam {
    pub(super) bytes: Vec<u8>,
    bad: BadAccessLog,
}

impl fmt::Debug for IoRam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoRam").field("len", &self.bytes.len()).finish_non_exhaustive()
    }
}

impl Default for IoRam {
    fn default() -> Self {
        Self::new()
    }
}

impl IoRam {
    /// [`IO_RAM_SIZE`] bytes of zeroes.
    pub fn new() -> Self {
        Self { bytes: vec![0; IO_RAM_SIZE as usize], bad: BadAccessLog::default() }
    }

    /// The buffer's contents.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The part of `offset..offset + len` inside the buffer, as an index
    /// range (empty when `offset` is outside).
    fn inside(&self, offset: u64, len: usize) -> std::ops::Range<usize> {
        let start = usize::try_from(offset).map_or(self.bytes.len(), |o| o.min(self.bytes.len()));
        start..start.saturating_add(len).min(self.bytes.len())
    }
}

impl IoDevice for IoRam {
    fn save_state(&self) -> Option<Vec<u8>> {
        Some(crate::Snapshot::snapshot(self))
    }

    fn load_state(&mut self, state: &[u8]) -> Option<Result<(), String>> {
        Some(crate::Snapshot::restore(self, state).map_err(|e| e.to_string()))
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let range = self.inside(offset, data.len());
        let bad = data.is_empty() || range.len() < data.len();
        let (inside, past) = data.split_at_mut(range.len());
        inside.copy_from_slice(&self.bytes[range]);
        past.fill(0xff);
        if bad {
            self.bad.read(NAME, offset, data.len());
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let range = self.inside(offset, data.len());
        let written = range.len();
        self.bytes[range].copy_from_slice(&data[..written]);
        if data.is_empty() || written < data.len() {
            self.bad.write(NAME, offset, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(ram: &mut IoRam, offset: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0xaa; len];
        ram.read(offset, &mut data);
        data
    }

    #[test]
    fn every_size_reads_back_what_was_written() {
        let mut ram = IoRam::new();
        for (offset, len) in [(0u64, 1usize), (0x10, 2), (0x21, 4), (0xffc, 8), (0x3000, 16), (0xfff8, 8)] {
            let value: Vec<u8> = (0..len).map(|i| (offset as u8) ^ (i as u8 + 1)).collect();
            ram.write(offset, &value);
            assert_eq!(read(&mut ram, offset, len), value, "{len} bytes at {offset:#x}");
        }
    }

    #[test]
    fn accesses_overlap_like_memory() {
        let mut ram = IoRam::new();
        ram.write(0x100, &0x1122_3344_5566_7788u64.to_le_bytes());
        ram.write(0x103, &[0xee]);
        assert_eq!(read(&mut ram, 0x102, 2), [0x66, 0xee]);
        assert_eq!(read(&mut ram, 0x104, 4), 0x1122_3344u32.to_le_bytes());
        assert_eq!(ram.bytes()[0x100..0x108], [0x88, 0x77, 0x66, 0xee, 0x44, 0x33, 0x22, 0x11]);
    }

    #[test]
    fn string_io_into_ioram_lands_byte_by_byte() {
        // emulator.c test_string_io_mmio: rep insb to ioram + 4032, 1024 bytes.
        let mut ram = IoRam::new();
        for i in 0..1024 {
            ram.write(4032 + i, &[0x99]);
        }
        assert_eq!(read(&mut ram, 4032 + 1023, 1), [0x99]);
        assert_eq!(read(&mut ram, 4032 + 1024, 1), [0]);
    }

    #[test]
    fn bytes_past_the_end_read_all_ones_and_are_dropped() {
        let mut ram = IoRam::new();
        ram.write(IO_RAM_SIZE - 2, &[1, 2, 3, 4]);
        assert_eq!(read(&mut ram, IO_RAM_SIZE - 2, 4), [1, 2, 0xff, 0xff]);
        assert_eq!(read(&mut ram, IO_RAM_SIZE, 2), [0xff; 2]);
        assert_eq!(read(&mut ram, u64::MAX, 8), [0xff; 8]);
        ram.write(IO_RAM_SIZE, &[9; 8]);
        ram.write(u64::MAX, &[9; 8]);
        ram.write(0, &[]);
        ram.read(0, &mut []);
        assert_eq!(ram.bytes().len() as u64, IO_RAM_SIZE);
        assert!(ram.bytes()[..IO_RAM_SIZE as usize - 2].iter().all(|&b| b == 0));
    }
}
