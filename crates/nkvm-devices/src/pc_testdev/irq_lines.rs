//! pc-testdev's interrupt lines at ports 0x2000-0x2017: one byte port per
//! line, written by `set_irq_line()` in kvm-unit-tests. The rules are in
//! the [parent module](super).

use std::fmt;

use super::{TESTDEV_IRQ_LINES_SIZE, TESTDEV_IRQ_LINE_COUNT};
use crate::bad_access::BadAccessLog;
use crate::bus::{IoDevice, IrqLine};

const NAME: &str = "pc-testdev irq lines";

/// Why a line could not be connected to [`TestdevIrqLines`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PcTestdevError {
    /// pc-testdev has lines 0-23 (ports 0x2000-0x2017); connect one of those.
    #[error("pc-testdev has interrupt lines 0-23, not {line}")]
    LineOutOfRange {
        /// The line asked for.
        line: usize,
    },
}

/// pc-testdev's 24 interrupt lines; see the [module documentation](super).
pub struct TestdevIrqLines {
    lines: Vec<Option<Box<dyn IrqLine>>>,
    /// The level the guest last wrote to each connected line, bit `n` for
    /// line `n`: not readable by the guest, kept for snapshots.
    pub(super) levels: u32,
    bad: BadAccessLog,
}

impl fmt::Debug for TestdevIrqLines {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let connected: Vec<usize> = (0..TESTDEV_IRQ_LINE_COUNT).filter(|&n| self.lines[n].is_some()).collect();
        f.debug_struct("TestdevIrqLines").field("connected", &connected).finish_non_exhaustive()
    }
}

impl Default for TestdevIrqLines {
    fn default() -> Self {
        Self::new()
    }
}

impl TestdevIrqLines {
    /// Lines with nothing connected: writes to them are logged and ignored.
    pub fn new() -> Self {
        Self { lines: (0..TESTDEV_IRQ_LINE_COUNT).map(|_| None).collect(), levels: 0, bad: BadAccessLog::default() }
    }

    /// Drive `irq` from line `line` (port `0x2000 + line`), replacing what
    /// was connected there. QEMU connects line `n` to ISA IRQ `n`.
    ///
    /// # Errors
    ///
    /// [`PcTestdevError::LineOutOfRange`] if `line` is 24 or more.
    pub fn connect(&mut self, line: usize, irq: Box<dyn IrqLine>) -> Result<(), PcTestdevError> {
        let slot = self.lines.get_mut(line).ok_or(PcTestdevError::LineOutOfRange { line })?;
        *slot = Some(irq);
        Ok(())
    }

    /// The level the guest last wrote to each connected line, bit `n` for
    /// line `n` (the guest reads 0 whatever the level).
    pub fn levels(&self) -> u32 {
        self.levels
    }
}

impl IoDevice for TestdevIrqLines {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut bad = data.is_empty();
        for (i, byte) in data.iter_mut().enumerate() {
            let inside = offset.checked_add(i as u64).is_some_and(|port| port < TESTDEV_IRQ_LINES_SIZE);
            *byte = if inside { 0 } else { 0xff };
            bad |= !inside;
        }
        if bad {
            self.bad.read(NAME, offset, data.len());
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.is_empty() {
            self.bad.write(NAME, offset, data);
        }
        for (i, &byte) in data.iter().enumerate() {
            let line = offset.checked_add(i as u64).and_then(|port| usize::try_from(port).ok());
            match line.and_then(|n| Some((n, self.lines.get(n)?))) {
                Some((n, Some(irq))) => {
                    irq.set_level(byte != 0);
                    self.levels = (self.levels & !(1 << n)) | (u32::from(byte != 0) << n);
                }
                Some((_, None)) => {
                    self.bad.log(NAME, format_args!("write {byte:#x} to unconnected line {}", offset + i as u64))
                }
                None => self.bad.write(NAME, offset.wrapping_add(i as u64), &[byte]),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    type Levels = Arc<Mutex<Vec<(usize, bool)>>>;

    /// Lines 0-15 connected, like QEMU's ISA IRQs, recording `(line, level)`.
    fn isa_lines() -> (TestdevIrqLines, Levels) {
        let levels = Levels::default();
        let mut dev = TestdevIrqLines::new();
        for n in 0..16 {
            let seen = levels.clone();
            dev.connect(n, Box::new(move |level| seen.lock().unwrap().push((n, level)))).unwrap();
        }
        (dev, levels)
    }

    fn take(levels: &Levels) -> Vec<(usize, bool)> {
        std::mem::take(&mut *levels.lock().unwrap())
    }

    #[test]
    fn nonzero_raises_and_zero_lowers() {
        // ioapic.c: toggle_irq_line(0x0e) is set_irq_line(0x0e, 1) then (0x0e, 0).
        let (mut dev, levels) = isa_lines();
        dev.write(0x0e, &[1]);
        dev.write(0x0e, &[0]);
        dev.write(0x0d, &[0x80]);
        assert_eq!(take(&levels), [(14, true), (14, false), (13, true)]);
    }

    #[test]
    fn repeated_raises_are_all_passed_on() {
        // ioapic.c test_ioapic_level_sequential raises a raised line again.
        let (mut dev, levels) = isa_lines();
        dev.write(0x0e, &[1]);
        dev.write(0x0e, &[1]);
        assert_eq!(take(&levels), [(14, true), (14, true)]);
    }

    #[test]
    fn a_wide_write_sets_one_line_per_byte() {
        let (mut dev, levels) = isa_lines();
        dev.write(0x0e, &0x0001u16.to_le_bytes());
        assert_eq!(take(&levels), [(14, true), (15, false)]);
    }

    #[test]
    fn reads_return_zero_whatever_the_level() {
        let (mut dev, _) = isa_lines();
        dev.write(3, &[1]);
        let mut byte = [0xaa];
        dev.read(3, &mut byte);
        assert_eq!(byte, [0]);
        let mut dword = [0xaa; 4];
        dev.read(21, &mut dword);
        assert_eq!(dword, [0, 0, 0, 0xff], "the last byte is past line 23");
    }

    #[test]
    fn unconnected_lines_and_bytes_past_the_region_are_ignored() {
        let (mut dev, levels) = isa_lines();
        dev.write(16, &[1]); // not connected
        dev.write(23, &[1, 1]); // unconnected, then past the end
        dev.write(TESTDEV_IRQ_LINES_SIZE, &[1]);
        dev.write(u64::MAX, &[1, 1]);
        dev.write(0, &[]);
        dev.read(0, &mut []);
        assert!(take(&levels).is_empty());
    }

    #[test]
    fn lines_16_to_23_can_be_connected_but_not_24() {
        let (mut dev, levels) = isa_lines();
        let seen = levels.clone();
        dev.connect(23, Box::new(move |level| seen.lock().unwrap().push((23, level)))).unwrap();
        dev.write(23, &[7]);
        assert_eq!(take(&levels), [(23, true)]);
        let err = dev.connect(TESTDEV_IRQ_LINE_COUNT, Box::new(|_| {})).unwrap_err();
        assert_eq!(err, PcTestdevError::LineOutOfRange { line: 24 });
        assert_eq!(err.to_string(), "pc-testdev has interrupt lines 0-23, not 24");
        assert!(format!("{dev:?}").contains("connected: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 23]"));
    }

    #[test]
    fn connecting_again_replaces_the_line() {
        let (mut dev, levels) = isa_lines();
        let seen = levels.clone();
        dev.connect(14, Box::new(move |level| seen.lock().unwrap().push((100, level)))).unwrap();
        dev.write(14, &[1]);
        assert_eq!(take(&levels), [(100, true)]);
    }
}
