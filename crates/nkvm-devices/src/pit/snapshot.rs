//! The PIT's [`Snapshot`]. The body is the PIT's time (ticks) at the save,
//! the three counters (times on that time line), the port 0x61 bits and
//! the number of counter 0 edges already raised. A restore moves the
//! restored PIT's time line so that "now" is the saved instant: each
//! counter goes on from the count it had. The IRQ line is not driven by a
//! restore; the next [`Pit::poll`] raises an edge that was due and not yet
//! raised, and says when the next one is.
//!
//! Body, format version 1 (little-endian, 98 bytes): u64 PIT time (ticks of
//! 1.193182 MHz, below 2^62); three counters of 27 bytes each: u8 mode
//! (0-7), u8 access (1-3), u8 BCD, u8 + u8 pending low byte (present flag,
//! value), u32 reload (1-65536), u8 + u64 load time (present flag, ticks, no
//! later than the PIT time), u8 gate, u8 + u16 count latch, u8 latch's high
//! byte next, u8 + u8 status latch, u8 live count's high byte next, u8 null
//! count; then u8 port 0x61 bits (0-1 only), u64 counter 0 edges raised
//! since its load (at most as many as it made).

use super::counter::Counter;
use super::{nanos_to_ticks, Pit, SPEAKER_DATA, SPEAKER_GATE2};
use crate::snapshot::{Snapshot, SnapshotError, StateReader, StateWriter};

/// The latest PIT time a blob may hold (2^62 ticks, 122,000 years): keeps
/// every sum of a time and a period below `u64::MAX`.
const MAX_TIME: u64 = 1 << 62;

impl Snapshot for Pit {
    fn snapshot_name(&self) -> &'static str {
        "pit-8254"
    }

    fn snapshot_version(&self) -> u16 {
        1
    }

    fn save_body(&self, out: &mut StateWriter) {
        out.u64(self.now_ticks());
        self.counters.iter().for_each(|c| c.save(out));
        out.u8(self.speaker);
        out.u64(self.edges_signalled);
    }

    fn load_body(&mut self, input: &mut StateReader<'_>) -> Result<(), SnapshotError> {
        let at = input.offset();
        let now = input.u64("time")?;
        if now >= MAX_TIME {
            return Err(input.invalid("time", now, at, "below 2^62 ticks"));
        }
        let counters =
            [Counter::from_saved(input, now)?, Counter::from_saved(input, now)?, Counter::from_saved(input, now)?];
        let at = input.offset();
        let speaker = input.u8("port 0x61")?;
        if speaker & !(SPEAKER_GATE2 | SPEAKER_DATA) != 0 {
            return Err(input.invalid("port 0x61", speaker.into(), at, "only the gate and speaker data bits"));
        }
        let at = input.offset();
        let edges_signalled = input.u64("edges raised")?;
        if edges_signalled > counters[0].rising_edges(now) {
            return Err(input.invalid("edges raised", edges_signalled, at, "no more than counter 0 has made"));
        }
        self.counters = counters;
        self.speaker = speaker;
        self.edges_signalled = edges_signalled;
        self.base = now.wrapping_sub(nanos_to_ticks((self.clock)()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::pit::{PitWindow, PIT_HZ};
    use crate::snapshot::check::refuses_damage;
    use crate::IoDevice;

    /// A PIT on a clock the test moves (nanoseconds), counting IRQ 0 pulses.
    fn pit_at(nanos: u64) -> (Pit, Arc<AtomicU64>, Arc<AtomicUsize>) {
        let now = Arc::new(AtomicU64::new(nanos));
        let pulses = Arc::new(AtomicUsize::new(0));
        let (clock, counted) = (now.clone(), pulses.clone());
        let irq = Box::new(move |level: bool| {
            if level {
                counted.fetch_add(1, Ordering::SeqCst);
            }
        });
        let pit = Pit::with_clock(irq, Box::new(move || Duration::from_nanos(clock.load(Ordering::SeqCst))));
        (pit, now, pulses)
    }

    fn ticks(ticks: u64) -> u64 {
        (ticks * 1_000_000_000).div_ceil(PIT_HZ)
    }

    fn inb(pit: &mut Pit, port: u64) -> u8 {
        let mut b = [0u8];
        pit.read(port, &mut b);
        b[0]
    }

    fn latch_and_read(pit: &mut Pit, counter: u8) -> u16 {
        pit.write(3, &[counter << 6]);
        let low = inb(pit, counter.into());
        u16::from(low) | (u16::from(inb(pit, counter.into())) << 8)
    }

    #[test]
    fn a_counter_counts_down_on_from_where_it_was() {
        let (mut pit, now, _) = pit_at(0);
        pit.program(0, 2, 1000);
        now.store(ticks(300), Ordering::SeqCst);
        let blob = pit.snapshot();
        // The restoring host's clock is far ahead of the saving one's.
        let (mut copy, later, pulses) = pit_at(ticks(5_000_000));
        copy.restore(&blob).unwrap();
        assert_eq!(latch_and_read(&mut copy, 0), 700);
        assert_eq!(copy.poll(), Some(Duration::from_nanos(ticks(700))), "the next edge is the restored counter's");
        assert_eq!(pulses.load(Ordering::SeqCst), 0);
        later.store(ticks(5_000_000 + 700), Ordering::SeqCst);
        copy.poll();
        assert_eq!(pulses.load(Ordering::SeqCst), 1, "the edge at the end of the restored period");
        assert_eq!(latch_and_read(&mut copy, 0), 1000);
        refuses_damage(&blob, || pit_at(0).0);
    }

    #[test]
    fn a_half_read_latch_reads_its_high_byte_after_restore() {
        let (mut pit, now, _) = pit_at(0);
        pit.program(2, 0, 0xabcd);
        now.store(ticks(0x100), Ordering::SeqCst);
        pit.write(3, &[0x80]); // latch counter 2
        assert_eq!(inb(&mut pit, 2), 0xcd);
        pit.write(3, &[0xc0 | (1 << 3) | 0x20]); // read-back: status of counter 2 only
        let blob = pit.snapshot();
        let (mut copy, _, _) = pit_at(ticks(1 << 20));
        copy.restore(&blob).unwrap();
        assert_eq!(inb(&mut copy, 2), 3 << 4, "the status first: word access, mode 0, output low");
        assert_eq!(inb(&mut copy, 2), 0xaa, "then the latch's high byte (0xabcd - 0x100)");
        refuses_damage(&blob, || pit_at(0).0);
    }

    #[test]
    fn gate_speaker_bits_and_a_pending_low_byte_survive() {
        let (mut pit, now, _) = pit_at(ticks(10));
        pit.write_window(PitWindow::Speaker, 0, &[SPEAKER_GATE2 | SPEAKER_DATA]);
        pit.write(3, &[0x76]); // counter 1, word, mode 3
        pit.write(1, &[0x34]);
        now.store(ticks(20), Ordering::SeqCst);
        let blob = pit.snapshot();
        let (mut copy, _, _) = pit_at(0);
        copy.restore(&blob).unwrap();
        copy.write(1, &[0x12]);
        assert_eq!(latch_and_read(&mut copy, 1), 0x1234, "the high byte completes the saved low byte");
        let mut port61 = [0u8];
        copy.read_window(PitWindow::Speaker, 0, &mut port61);
        assert_eq!(port61[0] & (SPEAKER_GATE2 | SPEAKER_DATA), SPEAKER_GATE2 | SPEAKER_DATA);
        refuses_damage(&blob, || pit_at(0).0);
    }

    #[test]
    fn the_body_is_98_bytes_as_documented() {
        let mut w = StateWriter::default();
        pit_at(0).0.save_body(&mut w);
        assert_eq!(w.into_bytes().len(), 98);
    }

    #[test]
    fn impossible_fields_are_named() {
        let (pit, now, _) = pit_at(0);
        now.store(ticks(100), Ordering::SeqCst);
        let good = {
            let mut w = StateWriter::default();
            pit.save_body(&mut w);
            w.into_bytes()
        };
        // Counter 0 starts at body offset 8: mode, then access.
        let cases: [(usize, u8, &str); 3] =
            [(8, 9, "mode = 0x9"), (9, 0, "access = 0x0"), (good.len() - 9, 0x10, "port 0x61 = 0x10")];
        for (at, value, message) in cases {
            let mut body = good.clone();
            body[at] = value;
            let mut input = StateReader::for_test(body, "pit-8254");
            let err = pit_at(0).0.load_body(&mut input).unwrap_err();
            assert!(err.to_string().contains(message), "{err}");
        }
        let mut late = good.clone();
        late[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = pit_at(0).0.load_body(&mut StateReader::for_test(late, "pit-8254")).unwrap_err();
        assert!(err.to_string().contains("time"), "{err}");
    }

    #[test]
    fn noise_with_a_fixed_up_crc_never_panics_nor_breaks_the_pit() {
        // Bytes changed behind a valid header, the CRC recomputed: the
        // decoder refuses or takes them, and the PIT still counts and polls.
        let (mut pit, now, _) = pit_at(0);
        pit.program(0, 2, 1000);
        pit.program(2, 3, 7);
        now.store(ticks(12_345), Ordering::SeqCst);
        let good = pit.snapshot();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..3000 {
            let mut blob = good.clone();
            for _ in 0..(x % 8 + 1) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = 17 + (x as usize) % (blob.len() - 21);
                blob[at] = (x >> 40) as u8;
            }
            let crc_at = blob.len() - 4;
            let crc = crate::snapshot::crc32(&blob[..crc_at]);
            blob[crc_at..].copy_from_slice(&crc.to_le_bytes());
            let (mut copy, later, _) = pit_at(ticks(1000));
            if copy.restore(&blob).is_ok() {
                later.store(ticks(1_000_000), Ordering::SeqCst);
                copy.poll();
                for port in 0..3 {
                    latch_and_read(&mut copy, port);
                }
            }
        }
    }
}
