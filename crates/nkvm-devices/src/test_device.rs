//! A device for tests: a few 64-bit registers and a log of every access, in
//! the order the device saw them.
//!
//! # Register map
//!
//! All registers are 64 bits, little-endian. An access of 1, 2, 4 or 8 bytes
//! anywhere inside one register reads or writes those bytes of it.
//!
//! | offset | name | access | meaning |
//! |---|---|---|---|
//! | 0x00 | `ID` | RO | [`TEST_DEVICE_ID`] (`"nkvmtest"` in ASCII) |
//! | 0x08 | `WRITE_COUNT` | RO | writes seen before this read (invalid ones too) |
//! | 0x10 | `COUNTER` | RW | each read returns the value, then adds one; a write sets it |
//! | 0x18 | `READ_COUNT` | RO | reads seen before this read (invalid ones too) |
//! | 0x20-0x38 | `SCRATCH0`-`SCRATCH3` | RW | plain storage, reset to 0 |
//!
//! Invalid accesses (offset at or past [`TEST_DEVICE_SIZE`], a size other
//! than 1/2/4/8, or an access crossing a register boundary) read as all-ones
//! and are ignored on write. Writes to read-only registers are ignored. All
//! of them are still logged and counted.

use crate::bus::{le_value, put_le_value, IoDevice};

/// Value of the `ID` register: the bytes `"nkvmtest"`, little-endian.
pub const TEST_DEVICE_ID: u64 = u64::from_le_bytes(*b"nkvmtest");
/// Size of the device's region in bytes.
pub const TEST_DEVICE_SIZE: u64 = 0x40;
/// Offset of the read-only `ID` register.
pub const REG_ID: u64 = 0x00;
/// Offset of the read-only `WRITE_COUNT` register.
pub const REG_WRITE_COUNT: u64 = 0x08;
/// Offset of the `COUNTER` register (post-incremented by each read).
pub const REG_COUNTER: u64 = 0x10;
/// Offset of the read-only `READ_COUNT` register.
pub const REG_READ_COUNT: u64 = 0x18;
/// Offset of `SCRATCH0`; `SCRATCHn` is at `REG_SCRATCH0 + 8 * n`, n < 4.
pub const REG_SCRATCH0: u64 = 0x20;
/// Most accesses kept in the log; later ones are counted in
/// [`TestDevice::dropped`] so a guest cannot exhaust host memory.
pub const MAX_LOG_ENTRIES: usize = 1 << 16;

const SCRATCH_COUNT: usize = 4;

mod snapshot;

/// One access seen by the [`TestDevice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// True for a write, false for a read.
    pub write: bool,
    /// Offset in the device's region.
    pub offset: u64,
    /// Access size in bytes.
    pub size: usize,
    /// The value written, or the value the read returned (first 8 bytes,
    /// little-endian).
    pub data: u64,
}

/// The test device; see the [module documentation](self) for its registers.
#[derive(Debug, Clone, Default)]
pub struct TestDevice {
    counter: u64,
    scratch: [u64; SCRATCH_COUNT],
    writes: u64,
    reads: u64,
    log: Vec<Access>,
    dropped: u64,
}

impl TestDevice {
    /// A device with all registers and the log cleared.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every access so far, oldest first (at most [`MAX_LOG_ENTRIES`]).
    pub fn log(&self) -> &[Access] {
        &self.log
    }

    /// Return the log and start a new one. The counters are not reset.
    pub fn take_log(&mut self) -> Vec<Access> {
        self.dropped = 0;
        std::mem::take(&mut self.log)
    }

    /// Forget the logged accesses. The counters are not reset.
    pub fn clear_log(&mut self) {
        self.log.clear();
        self.dropped = 0;
    }

    /// Accesses not logged because the log was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Number of writes seen, as the `WRITE_COUNT` register reports it.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Number of reads seen, as the `READ_COUNT` register reports it.
    pub fn reads(&self) -> u64 {
        self.reads
    }

    /// The value of scratch register `index`, if `index < 4`.
    pub fn scratch(&self, index: usize) -> Option<u64> {
        self.scratch.get(index).copied()
    }

    fn record(&mut self, access: Access) {
        if self.log.len() < MAX_LOG_ENTRIES {
            self.log.push(access);
        } else {
            self.dropped += 1;
        }
    }

    /// The register holding `offset..offset + size` and the byte shift
    /// inside it, if the access is valid.
    fn locate(offset: u64, size: usize) -> Option<(u64, u32)> {
        let within = offset % 8;
        let valid_size = matches!(size, 1 | 2 | 4 | 8);
        if !valid_size || offset >= TEST_DEVICE_SIZE || within + size as u64 > 8 {
            return None;
        }
        Some((offset - within, (within * 8) as u32))
    }

    fn read_register(&mut self, reg: u64) -> u64 {
        match reg {
            REG_ID => TEST_DEVICE_ID,
            REG_WRITE_COUNT => self.writes,
            REG_COUNTER => {
                let value = self.counter;
                self.counter = self.counter.wrapping_add(1);
                value
            }
            REG_READ_COUNT => self.reads,
            _ => self.scratch_slot(reg).map_or(u64::MAX, |i| self.scratch[i]),
        }
    }

    fn scratch_slot(&self, reg: u64) -> Option<usize> {
        let index = usize::try_from(reg.checked_sub(REG_SCRATCH0)? / 8).ok()?;
        (index < SCRATCH_COUNT).then_some(index)
    }
}

fn size_mask(size: usize) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

impl IoDevice for TestDevice {
    fn save_state(&self) -> Option<Vec<u8>> {
        Some(crate::Snapshot::snapshot(self))
    }

    fn load_state(&mut self, state: &[u8]) -> Option<Result<(), String>> {
        Some(crate::Snapshot::restore(self, state).map_err(|e| e.to_string()))
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let size = data.len();
        match Self::locate(offset, size) {
            Some((reg, shift)) => {
                let value = (self.read_register(reg) >> shift) & size_mask(size);
                put_le_value(data, value);
            }
            None => {
                log::debug!("test device: invalid read of {size} bytes at {offset:#x}");
                data.fill(0xff);
            }
        }
        self.reads += 1;
        self.record(Access { write: false, offset, size, data: le_value(data) });
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let size = data.len();
        let value = le_value(data);
        self.writes += 1;
        self.record(Access { write: true, offset, size, data: value });
        let Some((reg, shift)) = Self::locate(offset, size) else {
            log::debug!("test device: invalid write of {size} bytes at {offset:#x}");
            return;
        };
        let mask = size_mask(size) << shift;
        let merge = |old: u64| (old & !mask) | ((value << shift) & mask);
        if reg == REG_COUNTER {
            self.counter = merge(self.counter);
        } else if let Some(i) = self.scratch_slot(reg) {
            self.scratch[i] = merge(self.scratch[i]);
        } else {
            log::debug!("test device: write to read-only register {reg:#x} ignored");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read64(dev: &mut TestDevice, offset: u64) -> u64 {
        let mut data = [0u8; 8];
        dev.read(offset, &mut data);
        u64::from_le_bytes(data)
    }

    #[test]
    fn id_register_spells_nkvmtest() {
        let mut dev = TestDevice::new();
        assert_eq!(read64(&mut dev, REG_ID).to_le_bytes(), *b"nkvmtest");
        let mut half = [0u8; 4];
        dev.read(REG_ID + 4, &mut half);
        assert_eq!(&half, b"test");
    }

    #[test]
    fn log_keeps_every_access_in_order() {
        let mut dev = TestDevice::new();
        dev.write(REG_SCRATCH0, &0x1122_3344_5566_7788u64.to_le_bytes());
        dev.write(REG_SCRATCH0 + 8, &[0xab]);
        let mut b = [0u8; 2];
        dev.read(REG_SCRATCH0 + 2, &mut b);
        assert_eq!(
            dev.log(),
            &[
                Access { write: true, offset: 0x20, size: 8, data: 0x1122_3344_5566_7788 },
                Access { write: true, offset: 0x28, size: 1, data: 0xab },
                Access { write: false, offset: 0x22, size: 2, data: 0x5566 },
            ]
        );
        assert_eq!(dev.take_log().len(), 3);
        assert!(dev.log().is_empty());
        dev.read(REG_ID, &mut b);
        dev.clear_log();
        assert!(dev.log().is_empty());
        assert_eq!((dev.reads(), dev.writes()), (2, 2));
    }

    #[test]
    fn write_count_orders_accesses() {
        let mut dev = TestDevice::new();
        assert_eq!(read64(&mut dev, REG_WRITE_COUNT), 0);
        dev.write(REG_SCRATCH0, &[1]);
        dev.write(0x1000, &[1]); // invalid, still counted
        assert_eq!(read64(&mut dev, REG_WRITE_COUNT), 2);
        assert_eq!(read64(&mut dev, REG_READ_COUNT), 2);
        assert_eq!(dev.writes(), 2);
    }

    #[test]
    fn counter_post_increments_and_is_writable() {
        let mut dev = TestDevice::new();
        assert_eq!(read64(&mut dev, REG_COUNTER), 0);
        assert_eq!(read64(&mut dev, REG_COUNTER), 1);
        dev.write(REG_COUNTER, &u64::MAX.to_le_bytes());
        assert_eq!(read64(&mut dev, REG_COUNTER), u64::MAX);
        assert_eq!(read64(&mut dev, REG_COUNTER), 0);
    }

    #[test]
    fn partial_writes_merge_into_scratch() {
        let mut dev = TestDevice::new();
        dev.write(REG_SCRATCH0 + 24, &u64::MAX.to_le_bytes());
        dev.write(REG_SCRATCH0 + 24 + 4, &0u32.to_le_bytes());
        dev.write(REG_SCRATCH0 + 24 + 1, &0u16.to_le_bytes());
        assert_eq!(dev.scratch(3), Some(0x0000_0000_ff00_00ff));
        assert_eq!(dev.scratch(4), None);
    }

    #[test]
    fn invalid_accesses_read_all_ones_and_change_nothing() {
        let mut dev = TestDevice::new();
        assert_eq!(read64(&mut dev, TEST_DEVICE_SIZE), u64::MAX);
        assert_eq!(read64(&mut dev, REG_SCRATCH0 + 4), u64::MAX); // crosses
        let mut odd = [0u8; 3];
        dev.read(REG_SCRATCH0, &mut odd);
        assert_eq!(odd, [0xff; 3]);
        let mut huge = [0u8; 16];
        dev.read(REG_SCRATCH0, &mut huge);
        assert_eq!(huge, [0xff; 16]);
        dev.read(u64::MAX, &mut []);
        dev.write(REG_SCRATCH0 + 6, &[1, 2, 3, 4]);
        dev.write(REG_ID, &[0; 8]);
        dev.write(u64::MAX, &[1; 8]);
        dev.write(REG_SCRATCH0, &[1; 16]);
        assert_eq!(dev.scratch(0), Some(0));
        assert_eq!(read64(&mut dev, REG_ID), TEST_DEVICE_ID);
        assert_eq!(dev.log().len(), 10);
    }

    #[test]
    fn log_is_bounded() {
        let mut dev = TestDevice::new();
        for _ in 0..MAX_LOG_ENTRIES + 3 {
            dev.write(REG_SCRATCH0, &[0]);
        }
        assert_eq!(dev.log().len(), MAX_LOG_ENTRIES);
        assert_eq!(dev.dropped(), 3);
        assert_eq!(dev.writes(), MAX_LOG_ENTRIES as u64 + 3);
    }
}
