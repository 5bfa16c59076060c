//! One PCI function's 256-byte configuration space (type 0 header): the
//! bytes, which bits the guest may write, the capability list, and the
//! memory BARs with their sizing protocol.
//!
//! A BAR is a register whose low bits are read-only (its type, and zeros for
//! the offsets inside the region): writing all ones and reading back gives
//! `!(size - 1) | flags`, which is how a guest learns the size. That falls
//! out of the per-byte write masks, as in real hardware.

use std::fmt;

/// Offset of the vendor ID.
pub const VENDOR_ID: usize = 0x00;
/// Offset of the device ID.
pub const DEVICE_ID: usize = 0x02;
/// Offset of the command register.
pub const COMMAND: usize = 0x04;
/// Offset of the status register.
pub const STATUS: usize = 0x06;
/// Offset of the revision ID.
pub const REVISION_ID: usize = 0x08;
/// Offset of the programming interface byte (class code bits 7:0).
pub const PROG_IF: usize = 0x09;
/// Offset of the header type.
pub const HEADER_TYPE: usize = 0x0e;
/// Offset of BAR0; BAR n is at `BAR0 + 4 * n`.
pub const BAR0: usize = 0x10;
/// Offset of the subsystem vendor ID.
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
/// Offset of the subsystem ID.
pub const SUBSYSTEM_ID: usize = 0x2e;
/// Offset of the capabilities pointer.
pub const CAPABILITIES_POINTER: usize = 0x34;
/// Offset of the interrupt line (scratch for the OS).
pub const INTERRUPT_LINE: usize = 0x3c;
/// Offset of the interrupt pin (0: none).
pub const INTERRUPT_PIN: usize = 0x3d;
/// Size of a conventional configuration space.
pub const CONFIG_SIZE: usize = 256;
/// Number of BAR registers in a type 0 header.
pub const BAR_COUNT: usize = 6;

/// Command register: respond to I/O space accesses.
pub const COMMAND_IO: u16 = 1 << 0;
/// Command register: respond to memory space accesses.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: the function may master the bus (DMA, MSI).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register: INTx disabled.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register: the capabilities list is valid.
pub const STATUS_CAPABILITIES: u16 = 1 << 4;

/// First offset available to capabilities (after the type 0 header).
const FIRST_CAPABILITY: usize = 0x40;

/// Identity of a PCI function, written into its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciId {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Revision ID.
    pub revision: u8,
    /// Class code: base class, subclass, programming interface (e.g. 0x060000).
    pub class: u32,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
}

/// A memory BAR as the device declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBar {
    /// Size in bytes: a power of two, at least 16.
    pub size: u64,
    /// Initial address (as firmware would assign it); 0 for unassigned.
    pub address: u64,
    /// A 64-bit BAR (uses this register and the next).
    pub is_64bit: bool,
    /// Prefetchable memory.
    pub prefetchable: bool,
}

/// Where a BAR currently decodes: memory decoding on and an address set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarMapping {
    /// Guest-physical address.
    pub address: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Why a configuration space could not be built as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// BAR sizes must be powers of two of at least 16 bytes.
    #[error("BAR{bar} size {size:#x} is not a power of two of at least 16 bytes")]
    BarSize {
        /// BAR index.
        bar: usize,
        /// The size asked for.
        size: u64,
    },
    /// The BAR index (or the upper half of a 64-bit BAR) is past BAR5, or taken.
    #[error("BAR{bar} does not exist or is already used")]
    BarSlot {
        /// BAR index.
        bar: usize,
    },
    /// The address is not aligned to the BAR's size.
    #[error("BAR{bar} address {address:#x} is not aligned to its size {size:#x}")]
    BarAlignment {
        /// BAR index.
        bar: usize,
        /// The address.
        address: u64,
        /// The size.
        size: u64,
    },
    /// The capabilities do not fit in the 256-byte space.
    #[error("capability of {len} bytes does not fit in configuration space (next free offset {at:#x})")]
    CapabilityFull {
        /// Capability length.
        len: usize,
        /// Next free offset.
        at: usize,
    },
}

mod snapshot;

/// The configuration space of one function.
#[derive(Clone)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SIZE],
    /// Bits the guest may write (1 = writable).
    writable: [u8; CONFIG_SIZE],
    /// Bits a write of 1 clears (status register error bits).
    write_one_clears: [u8; CONFIG_SIZE],
    bars: [Option<MemoryBar>; BAR_COUNT],
    /// Offset of the last capability's "next" byte, 0 for none yet.
    last_next: usize,
    next_free: usize,
}

impl fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigSpace")
            .field("vendor", &format_args!("{:#06x}", self.read_u16(VENDOR_ID)))
            .field("device", &format_args!("{:#06x}", self.read_u16(DEVICE_ID)))
            .field("command", &format_args!("{:#06x}", self.read_u16(COMMAND)))
            .field("bars", &self.bars)
            .finish_non_exhaustive()
    }
}

impl ConfigSpace {
    /// A type 0 header for `id`, with no BARs, no capabilities, no interrupt pin.
    pub fn new(id: PciId) -> Self {
        let mut c = Self {
            bytes: [0; CONFIG_SIZE],
            writable: [0; CONFIG_SIZE],
            write_one_clears: [0; CONFIG_SIZE],
            bars: [None; BAR_COUNT],
            last_next: 0,
            next_free: FIRST_CAPABILITY,
        };
        c.set_u16(VENDOR_ID, id.vendor);
        c.set_u16(DEVICE_ID, id.device);
        c.bytes[REVISION_ID] = id.revision;
        c.bytes[PROG_IF] = id.class as u8;
        c.bytes[PROG_IF + 1] = (id.class >> 8) as u8;
        c.bytes[PROG_IF + 2] = (id.class >> 16) as u8;
        c.set_u16(SUBSYSTEM_VENDOR_ID, id.subsystem_vendor);
        c.set_u16(SUBSYSTEM_ID, id.subsystem);
        let command = COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE | (1 << 6) | (1 << 8);
        c.writable[COMMAND..COMMAND + 2].copy_from_slice(&command.to_le_bytes());
        // Status: the error bits are write-one-to-clear.
        c.write_one_clears[STATUS + 1] = 0xf9;
        // Cache line size, latency timer, interrupt line: scratch for the OS.
        c.writable[0x0c] = 0xff;
        c.writable[0x0d] = 0xff;
        c.writable[INTERRUPT_LINE] = 0xff;
        c
    }

    /// Declares memory BAR `bar` (and `bar + 1` for a 64-bit one).
    pub fn set_memory_bar(&mut self, bar: usize, spec: MemoryBar) -> Result<(), ConfigError> {
        let regs = if spec.is_64bit { 2 } else { 1 };
        if bar + regs > BAR_COUNT || self.bar_slot_used(bar) || (regs == 2 && self.bar_slot_used(bar + 1)) {
            return Err(ConfigError::BarSlot { bar });
        }
        if !spec.size.is_power_of_two() || spec.size < 16 || (!spec.is_64bit && spec.size > 1 << 31) {
            return Err(ConfigError::BarSize { bar, size: spec.size });
        }
        if spec.address % spec.size != 0 || (!spec.is_64bit && spec.address > u64::from(u32::MAX)) {
            return Err(ConfigError::BarAlignment { bar, address: spec.address, size: spec.size });
        }
        let mut flags: u32 = 0;
        if spec.is_64bit {
            flags |= 0b100;
        }
        if spec.prefetchable {
            flags |= 0b1000;
        }
        let mask = !(spec.size - 1);
        let off = BAR0 + 4 * bar;
        self.set_u32(off, (spec.address as u32 & 0xffff_fff0) | flags);
        self.writable[off..off + 4].copy_from_slice(&((mask as u32) & 0xffff_fff0).to_le_bytes());
        if spec.is_64bit {
            self.set_u32(off + 4, (spec.address >> 32) as u32);
            self.writable[off + 4..off + 8].copy_from_slice(&((mask >> 32) as u32).to_le_bytes());
        }
        self.bars[bar] = Some(spec);
        Ok(())
    }

    fn bar_slot_used(&self, bar: usize) -> bool {
        self.bars[bar].is_some() || (bar > 0 && self.bars[bar - 1].is_some_and(|b| b.is_64bit))
    }

    /// The BAR declared at index `bar`, if any.
    pub fn bar(&self, bar: usize) -> Option<MemoryBar> {
        self.bars.get(bar).copied().flatten()
    }

    /// The address BAR `bar` is programmed with (whatever memory decoding says).
    pub fn bar_address(&self, bar: usize) -> Option<u64> {
        let spec = self.bar(bar)?;
        let off = BAR0 + 4 * bar;
        let low = u64::from(self.read_u32(off) & 0xffff_fff0);
        let high = if spec.is_64bit { u64::from(self.read_u32(off + 4)) << 32 } else { 0 };
        Some(high | low)
    }

    /// Where each BAR decodes now: `None` when memory decoding is off, the
    /// BAR is absent, or the address is 0 (unassigned).
    pub fn bar_mappings(&self) -> [Option<BarMapping>; BAR_COUNT] {
        let decoding = self.read_u16(COMMAND) & COMMAND_MEMORY != 0;
        std::array::from_fn(|i| {
            let spec = self.bar(i)?;
            let address = self.bar_address(i)?;
            (decoding && address != 0).then_some(BarMapping { address, size: spec.size })
        })
    }

    /// Appends a capability: `body` starts with the capability ID; its
    /// "next" byte (body\[1\]) is filled in. `writable` (same length as
    /// `body`, or empty for read-only) says which bits the guest may write.
    /// Returns the capability's offset.
    pub fn add_capability(&mut self, body: &[u8], writable: &[u8]) -> Result<usize, ConfigError> {
        let len = body.len();
        let at = self.next_free;
        if len < 2 || at + len > CONFIG_SIZE {
            return Err(ConfigError::CapabilityFull { len, at });
        }
        self.bytes[at..at + len].copy_from_slice(body);
        self.bytes[at + 1] = 0;
        for (i, w) in writable.iter().take(len).enumerate() {
            self.writable[at + i] = *w;
        }
        if self.last_next == 0 {
            self.bytes[CAPABILITIES_POINTER] = at as u8;
            let status = self.read_u16(STATUS) | STATUS_CAPABILITIES;
            self.set_u16(STATUS, status);
        } else {
            self.bytes[self.last_next] = at as u8;
        }
        self.last_next = at + 1;
        self.next_free = (at + len + 3) & !3;
        Ok(at)
    }

    /// The guest reads `data.len()` bytes at `offset`; bytes past the end read as 0xff.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset.checked_add(i).and_then(|o| self.bytes.get(o)).copied().unwrap_or(0xff);
        }
    }

    /// The guest writes `data` at `offset`: only writable bits change,
    /// write-one-to-clear bits clear; bytes past the end are ignored.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i).filter(|&o| o < CONFIG_SIZE) else { break };
            let w = self.writable[o];
            let mut b = (self.bytes[o] & !w) | (v & w);
            b &= !(v & self.write_one_clears[o]);
            self.bytes[o] = b;
        }
    }

    /// Reads a 16-bit register (device side).
    pub fn read_u16(&self, offset: usize) -> u16 {
        let mut b = [0; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    /// Reads a 32-bit register (device side).
    pub fn read_u32(&self, offset: usize) -> u32 {
        let mut b = [0; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Sets a 16-bit register regardless of the write mask (device side).
    pub fn set_u16(&mut self, offset: usize, value: u16) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    /// Sets a 32-bit register regardless of the write mask (device side).
    pub fn set_u32(&mut self, offset: usize, value: u32) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    fn set_bytes(&mut self, offset: usize, data: &[u8]) {
        if let Some(dst) = self.bytes.get_mut(offset..offset.saturating_add(data.len())) {
            dst.copy_from_slice(data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> PciId {
        PciId { vendor: 0x1af4, device: 0x1042, revision: 1, class: 0x018000, subsystem_vendor: 0x1af4, subsystem: 2 }
    }

    #[test]
    fn header_reads_back_identity_and_class() {
        let c = ConfigSpace::new(id());
        assert_eq!(c.read_u32(0), 0x1042_1af4);
        assert_eq!(c.read_u32(8), 0x0180_0001);
        assert_eq!(c.read_u16(SUBSYSTEM_ID), 2);
    }

    #[test]
    fn read_only_fields_ignore_writes() {
        let mut c = ConfigSpace::new(id());
        c.write(0, &[0; 4]);
        c.write(8, &[0; 4]);
        assert_eq!(c.read_u32(0), 0x1042_1af4);
        assert_eq!(c.read_u32(8), 0x0180_0001);
    }

    #[test]
    fn sixty_four_bit_bar_sizing_reads_back_the_size_mask() {
        let mut c = ConfigSpace::new(id());
        c.set_memory_bar(0, MemoryBar { size: 0x8000, address: 0xc000_0000, is_64bit: true, prefetchable: false })
            .unwrap();
        assert_eq!(c.read_u32(BAR0), 0xc000_0004);
        c.write(BAR0, &[0xff; 4]);
        c.write(BAR0 + 4, &[0xff; 4]);
        assert_eq!(c.read_u32(BAR0), 0xffff_8004);
        assert_eq!(c.read_u32(BAR0 + 4), 0xffff_ffff);
        c.write(BAR0, &0xd000_0000u32.to_le_bytes());
        c.write(BAR0 + 4, &1u32.to_le_bytes());
        assert_eq!(c.bar_address(0), Some(0x1_d000_0000));
    }

    #[test]
    fn thirty_two_bit_bar_and_unused_bars() {
        let mut c = ConfigSpace::new(id());
        c.set_memory_bar(1, MemoryBar { size: 0x1000, address: 0, is_64bit: false, prefetchable: true }).unwrap();
        c.write(BAR0 + 4, &[0xff; 4]);
        assert_eq!(c.read_u32(BAR0 + 4), 0xffff_f008);
        c.write(BAR0, &[0xff; 4]);
        assert_eq!(c.read_u32(BAR0), 0, "an absent BAR reads 0 after sizing");
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut c = ConfigSpace::new(id());
        let bar = MemoryBar { size: 0x3000, address: 0, is_64bit: false, prefetchable: false };
        assert!(matches!(c.set_memory_bar(0, bar), Err(ConfigError::BarSize { .. })));
        let bar = MemoryBar { size: 0x1000, address: 0, is_64bit: true, prefetchable: false };
        assert!(matches!(c.set_memory_bar(5, bar), Err(ConfigError::BarSlot { bar: 5 })));
        c.set_memory_bar(0, bar).unwrap();
        assert!(matches!(c.set_memory_bar(1, bar), Err(ConfigError::BarSlot { bar: 1 })));
    }

    #[test]
    fn mappings_follow_memory_decoding() {
        let mut c = ConfigSpace::new(id());
        c.set_memory_bar(0, MemoryBar { size: 0x4000, address: 0xc000_0000, is_64bit: true, prefetchable: false })
            .unwrap();
        assert_eq!(c.bar_mappings()[0], None);
        c.write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(c.bar_mappings()[0], Some(BarMapping { address: 0xc000_0000, size: 0x4000 }));
    }

    #[test]
    fn capabilities_are_chained() {
        let mut c = ConfigSpace::new(id());
        let a = c.add_capability(&[0x11, 0, 1, 2], &[]).unwrap();
        let b = c.add_capability(&[0x09, 0, 3], &[]).unwrap();
        assert_eq!(c.read_u16(STATUS) & STATUS_CAPABILITIES, STATUS_CAPABILITIES);
        assert_eq!(usize::from(c.bytes[CAPABILITIES_POINTER]), a);
        assert_eq!(usize::from(c.bytes[a + 1]), b);
        assert_eq!(c.bytes[b + 1], 0);
        assert_eq!(b % 4, 0);
    }

    #[test]
    fn accesses_past_the_end_are_harmless() {
        let mut c = ConfigSpace::new(id());
        c.write(254, &[1, 2, 3, 4]);
        let mut data = [0; 4];
        c.read(254, &mut data);
        assert_eq!(&data[2..], &[0xff, 0xff]);
        c.read(usize::MAX, &mut data);
        assert_eq!(data, [0xff; 4]);
    }
}
