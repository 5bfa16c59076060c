//! PCI bus 0 behind the PC's type-1 configuration mechanism: a 32-bit
//! address register at port 0xcf8 and a data window at 0xcfc-0xcff.
//!
//! The bus is an [`IoDevice`] over the 8 ports 0xcf8-0xcff (offset 0: the
//! address register, offsets 4-7: the data window). Function 0 of each of
//! the 32 slots can hold a [`PciDevice`]; the host bridge sits at 00:00.0.
//! Other buses and functions read as all ones (nothing there).
//!
//! A configuration write that changes where a BAR decodes (its address, or
//! the command register's memory-enable bit) is recorded as a [`BarEvent`];
//! the owner of the bus takes them with [`PciBus::take_bar_events`] after
//! each write and moves the MMIO region, as a PCI host bridge would.

use std::fmt;
use std::sync::{Arc, Mutex};

use super::config::{BarMapping, BAR_COUNT};
use super::device::{HostBridge, PciDevice, SharedPciDevice};
use crate::bus::IoDevice;

mod snapshot;

/// The first port of the configuration mechanism.
pub const PCI_CONFIG_PORT: u16 = 0xcf8;
/// Ports it decodes (0xcf8-0xcff).
pub const PCI_CONFIG_PORTS: u16 = 8;
/// Slots (device numbers) on one bus.
pub const SLOTS: usize = 32;

/// Config address register: enable bit.
const ADDRESS_ENABLE: u32 = 1 << 31;
/// Config address register: the bits it keeps (enable, bus, device,
/// function, register).
const ADDRESS_MASK: u32 = 0x80ff_fffc;

/// A BAR started, stopped, or moved decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarEvent {
    /// Slot (device number) of the function on bus 0.
    pub slot: u8,
    /// BAR index.
    pub bar: usize,
    /// Where it decoded before (`None`: nowhere).
    pub old: Option<BarMapping>,
    /// Where it decodes now (`None`: nowhere).
    pub new: Option<BarMapping>,
}

/// Why a device could not be placed on the bus.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PciBusError {
    /// The slot is taken or past the last one.
    #[error("PCI slot {slot} is taken or does not exist (0-31)")]
    SlotTaken {
        /// The slot asked for.
        slot: u8,
    },
    /// All 32 slots are in use.
    #[error("all {SLOTS} PCI slots of bus 0 are in use")]
    Full,
}

struct Slot {
    device: SharedPciDevice,
    mapped: [Option<BarMapping>; BAR_COUNT],
}

/// Bus 0 and its configuration mechanism.
pub struct PciBus {
    address: u32,
    slots: Vec<Option<Slot>>,
    events: Vec<BarEvent>,
}

impl fmt::Debug for PciBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let used: Vec<usize> = self.slots.iter().enumerate().filter(|(_, s)| s.is_some()).map(|(i, _)| i).collect();
        f.debug_struct("PciBus")
            .field("address", &format_args!("{:#010x}", self.address))
            .field("slots", &used)
            .field("pending_events", &self.events.len())
            .finish()
    }
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

fn lock(device: &SharedPciDevice) -> std::sync::MutexGuard<'_, dyn PciDevice + 'static> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

impl PciBus {
    /// A bus with the host bridge at slot 0.
    pub fn new() -> Self {
        let mut bus = Self { address: 0, slots: (0..SLOTS).map(|_| None).collect(), events: Vec::new() };
        let bridge: SharedPciDevice = Arc::new(Mutex::new(HostBridge::new()));
        bus.slots[0] = Some(Slot { device: bridge, mapped: [None; BAR_COUNT] });
        bus
    }

    /// Places `device` in the first free slot and returns the slot. If a
    /// BAR already decodes, a [`BarEvent`] says where.
    pub fn add(&mut self, device: SharedPciDevice) -> Result<u8, PciBusError> {
        let slot = self.slots.iter().position(Option::is_none).ok_or(PciBusError::Full)?;
        let slot = slot as u8;
        self.insert(slot, device)?;
        Ok(slot)
    }

    /// Places `device` in `slot`.
    pub fn insert(&mut self, slot: u8, device: SharedPciDevice) -> Result<(), PciBusError> {
        match self.slots.get_mut(usize::from(slot)) {
            Some(s @ None) => {
                *s = Some(Slot { device, mapped: [None; BAR_COUNT] });
                self.refresh(slot);
                Ok(())
            }
            _ => Err(PciBusError::SlotTaken { slot }),
        }
    }

    /// The device in `slot`, if any.
    pub fn device(&self, slot: u8) -> Option<SharedPciDevice> {
        self.slots.get(usize::from(slot))?.as_ref().map(|s| s.device.clone())
    }

    /// The BAR changes since the last call, oldest first.
    pub fn take_bar_events(&mut self) -> Vec<BarEvent> {
        std::mem::take(&mut self.events)
    }

    /// Reads the configuration space of 00:`slot`.0; an empty slot reads all ones.
    pub fn config_read(&self, slot: u8, offset: usize, data: &mut [u8]) {
        match self.slots.get(usize::from(slot)).and_then(Option::as_ref) {
            Some(s) => lock(&s.device).config().read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// Writes the configuration space of 00:`slot`.0; records BAR events.
    pub fn config_write(&mut self, slot: u8, offset: usize, data: &[u8]) {
        let Some(s) = self.slots.get(usize::from(slot)).and_then(Option::as_ref) else { return };
        {
            let mut device = lock(&s.device);
            device.config_mut().write(offset, data);
            device.config_written(offset, data.len());
        }
        self.refresh(slot);
    }

    /// Compares where every device's BARs decode with what was recorded
    /// and records a [`BarEvent`] for each difference: after the devices'
    /// configuration spaces were restored (not written through the bus),
    /// the owner moves the regions with [`take_bar_events`](Self::take_bar_events).
    pub fn rescan(&mut self) {
        for slot in 0..SLOTS as u8 {
            self.refresh(slot);
        }
    }

    /// Compares where the BARs of `slot` decode with what was recorded.
    fn refresh(&mut self, slot: u8) {
        let Some(s) = self.slots.get_mut(usize::from(slot)).and_then(Option::as_mut) else { return };
        let now = lock(&s.device).config().bar_mappings();
        for (bar, (old, new)) in s.mapped.iter().zip(now.iter()).enumerate() {
            if old != new {
                self.events.push(BarEvent { slot, bar, old: *old, new: *new });
            }
        }
        s.mapped = now;
    }

    /// The slot and register the address register selects, if enabled and on
    /// bus 0, function 0.
    fn selected(&self) -> Option<(u8, usize)> {
        let a = self.address;
        let bus = (a >> 16) & 0xff;
        let slot = (a >> 11) & 0x1f;
        let function = (a >> 8) & 0x7;
        (a & ADDRESS_ENABLE != 0 && bus == 0 && function == 0).then_some((slot as u8, (a & 0xfc) as usize))
    }
}

impl IoDevice for PciBus {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => match self.selected() {
                Some((slot, register)) => self.config_read(slot, register + (offset as usize - 4), data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (0, &[a, b, c, d]) => self.address = u32::from_le_bytes([a, b, c, d]) & ADDRESS_MASK,
            (4..=7, _) => {
                if let Some((slot, register)) = self.selected() {
                    self.config_write(slot, register + (offset as usize - 4), data);
                }
            }
            // 0xcf9 is the PIIX reset-control register; 0xcfb selects the
            // configuration mechanism on old chipsets. Neither is modelled.
            _ => log::debug!("pci: ignored write of {} bytes at port {:#x}", data.len(), 0xcf8 + offset),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::{ConfigSpace, MemoryBar, PciId, BAR0, COMMAND, COMMAND_MEMORY};
    use super::*;

    struct Dummy(ConfigSpace);

    impl PciDevice for Dummy {
        fn config(&self) -> &ConfigSpace {
            &self.0
        }
        fn config_mut(&mut self) -> &mut ConfigSpace {
            &mut self.0
        }
        fn config_written(&mut self, _offset: usize, _len: usize) {}
        fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
    }

    fn dummy(address: u64) -> SharedPciDevice {
        let id =
            PciId { vendor: 0x1af4, device: 0x1042, revision: 1, class: 0x018000, subsystem_vendor: 0, subsystem: 0 };
        let mut c = ConfigSpace::new(id);
        c.set_memory_bar(0, MemoryBar { size: 0x4000, address, is_64bit: true, prefetchable: false }).unwrap();
        Arc::new(Mutex::new(Dummy(c)))
    }

    fn select(bus: &mut PciBus, slot: u32, register: u32) {
        bus.write(0, &(0x8000_0000 | slot << 11 | register).to_le_bytes());
    }

    fn read32(bus: &mut PciBus, slot: u32, register: u32) -> u32 {
        select(bus, slot, register);
        let mut d = [0; 4];
        bus.read(4, &mut d);
        u32::from_le_bytes(d)
    }

    fn write32(bus: &mut PciBus, slot: u32, register: u32, value: u32) {
        select(bus, slot, register);
        bus.write(4, &value.to_le_bytes());
    }

    #[test]
    fn address_register_reads_back() {
        let mut bus = PciBus::new();
        bus.write(0, &0x8000_0000u32.to_le_bytes());
        let mut d = [0; 4];
        bus.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x8000_0000);
    }

    #[test]
    fn host_bridge_answers_at_slot_zero_and_empty_slots_read_all_ones() {
        let mut bus = PciBus::new();
        assert_eq!(read32(&mut bus, 0, 0), 0x0d57_8086);
        assert_eq!(read32(&mut bus, 0, 8) >> 8, 0x06_00_00);
        assert_eq!(read32(&mut bus, 5, 0), 0xffff_ffff);
        // Function 1 of slot 0, and a disabled address: nothing.
        bus.write(0, &0x8000_0100u32.to_le_bytes());
        let mut d = [0; 4];
        bus.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        bus.write(0, &0u32.to_le_bytes());
        bus.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn byte_and_word_accesses_use_the_low_address_bits() {
        let mut bus = PciBus::new();
        select(&mut bus, 0, 0);
        let mut w = [0; 2];
        bus.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0d57);
        select(&mut bus, 0, 8);
        let mut b = [0; 1];
        bus.read(7, &mut b);
        assert_eq!(b[0], 0x06);
    }

    #[test]
    fn bar_sizing_through_the_ports_and_bar_events() {
        let mut bus = PciBus::new();
        let slot = bus.add(dummy(0xc000_0000)).unwrap();
        assert_eq!(slot, 1);
        assert!(bus.take_bar_events().is_empty(), "memory decoding starts off");
        let s = u32::from(slot);
        write32(&mut bus, s, BAR0 as u32, 0xffff_ffff);
        write32(&mut bus, s, BAR0 as u32 + 4, 0xffff_ffff);
        assert_eq!(read32(&mut bus, s, BAR0 as u32), 0xffff_c004);
        assert_eq!(read32(&mut bus, s, BAR0 as u32 + 4), 0xffff_ffff);
        write32(&mut bus, s, BAR0 as u32, 0xc000_4000);
        write32(&mut bus, s, BAR0 as u32 + 4, 0);
        assert!(bus.take_bar_events().is_empty(), "no event while decoding is off");
        write32(&mut bus, s, COMMAND as u32, u32::from(COMMAND_MEMORY));
        let events = bus.take_bar_events();
        let at = BarMapping { address: 0xc000_4000, size: 0x4000 };
        assert_eq!(events, vec![BarEvent { slot, bar: 0, old: None, new: Some(at) }]);
        write32(&mut bus, s, BAR0 as u32, 0xc001_0000);
        let moved = BarMapping { address: 0xc001_0000, size: 0x4000 };
        assert_eq!(bus.take_bar_events(), vec![BarEvent { slot, bar: 0, old: Some(at), new: Some(moved) }]);
        write32(&mut bus, s, COMMAND as u32, 0);
        assert_eq!(bus.take_bar_events(), vec![BarEvent { slot, bar: 0, old: Some(moved), new: None }]);
    }

    #[test]
    fn slots_are_checked() {
        let mut bus = PciBus::new();
        assert_eq!(bus.insert(0, dummy(0)), Err(PciBusError::SlotTaken { slot: 0 }));
        assert_eq!(bus.insert(32, dummy(0)), Err(PciBusError::SlotTaken { slot: 32 }));
        for _ in 1..SLOTS {
            bus.add(dummy(0)).unwrap();
        }
        assert_eq!(bus.add(dummy(0)), Err(PciBusError::Full));
    }

    #[test]
    fn odd_port_accesses_do_not_panic() {
        let mut bus = PciBus::new();
        bus.write(1, &[1]);
        bus.write(3, &[1]);
        let mut d = [0; 8];
        bus.read(2, &mut d[..2]);
        select(&mut bus, 0, 0xfc);
        bus.read(7, &mut d[..4]);
        bus.write(7, &d[..4]);
        bus.read(100, &mut d);
    }
}
