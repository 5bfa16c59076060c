//! The shapes every device model shares: the I/O access interface
//! ([`IoDevice`]), interrupt lines ([`IrqLine`]), the APIC-bus output of the
//! interrupt controllers ([`ApicBusSink`]), and a small in-process address
//! map ([`IoBus`]) that routes an access to the device owning the address.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{mpsc, Arc, Mutex};

use nkvm_wire::apic::InterruptMessage;

/// A device that answers port or memory accesses in one contiguous region.
///
/// `offset` is relative to the start of the device's region; `data.len()` is
/// the access size (1, 2, 4 or 8 bytes, little-endian). A device must not
/// panic on any offset or size: unknown registers read as a documented
/// constant and writes to them are ignored.
pub trait IoDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`; fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
    /// The model's saved state ([`Snapshot::snapshot`](crate::Snapshot::snapshot)),
    /// for a device served behind a socket, whose VM side asks for it
    /// ([`crate::serve`]); `None` (the default) for a model without one.
    fn save_state(&self) -> Option<Vec<u8>> {
        None
    }
    /// Takes a state [`save_state`](Self::save_state) gave (for a device
    /// served behind a socket, whose VM side gives it): `Some(Err(reason))`
    /// if the model refuses it, unchanged; `None` (the default) for a model
    /// without one.
    fn load_state(&mut self, _state: &[u8]) -> Option<Result<(), String>> {
        None
    }
}

/// A boxed device (a trait object, say) is a device.
impl<D: IoDevice + ?Sized> IoDevice for Box<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        (**self).read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        (**self).write(offset, data);
    }

    fn save_state(&self) -> Option<Vec<u8>> {
        (**self).save_state()
    }

    fn load_state(&mut self, state: &[u8]) -> Option<Result<(), String>> {
        (**self).load_state(state)
    }
}

/// A shared device can sit on a bus while its owner keeps a handle to it
/// (to raise interrupts, inspect a log, ...). A poisoned lock is recovered:
/// device state is plain data and stays usable.
impl<D: IoDevice> IoDevice for Arc<Mutex<D>> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.lock().unwrap_or_else(|e| e.into_inner()).read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.lock().unwrap_or_else(|e| e.into_inner()).write(offset, data);
    }

    fn save_state(&self) -> Option<Vec<u8>> {
        self.lock().unwrap_or_else(|e| e.into_inner()).save_state()
    }

    fn load_state(&mut self, state: &[u8]) -> Option<Result<(), String>> {
        self.lock().unwrap_or_else(|e| e.into_inner()).load_state(state)
    }
}

/// An interrupt line driven by a device (an ISA IRQ, a PCI INTx pin, the
/// PIC's INTR output, an irqfd...).
pub trait IrqLine: Send {
    /// Drive the line to `level` (true = high).
    fn set_level(&self, level: bool);

    /// Raise then lower the line: one rising edge, for edge-triggered inputs.
    fn pulse(&self) {
        self.set_level(true);
        self.set_level(false);
    }
}

/// Any `Fn(bool)` is an interrupt line: it is called with each new level.
impl<F: Fn(bool) + Send> IrqLine for F {
    fn set_level(&self, level: bool) {
        self(level)
    }
}

/// Where an interrupt controller model (IOAPIC, PIC) sends the messages it
/// would put on the APIC bus towards the local APICs.
pub trait ApicBusSink: Send {
    /// Deliver one interrupt message.
    fn send(&mut self, message: InterruptMessage);
}

/// Collects messages in order; handy in tests and for callers that drain
/// the messages after each access.
impl ApicBusSink for Vec<InterruptMessage> {
    fn send(&mut self, message: InterruptMessage) {
        self.push(message);
    }
}

/// Hands messages to another thread (e.g. the one owning the `ApicBus`
/// socket). A closed channel drops the message with a debug log.
impl ApicBusSink for mpsc::Sender<InterruptMessage> {
    fn send(&mut self, message: InterruptMessage) {
        if mpsc::Sender::send(self, message).is_err() {
            log::debug!("APIC bus receiver gone, dropping {message:?}");
        }
    }
}

/// Why a device could not be placed on an [`IoBus`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The new region shares addresses with a region already on the bus;
    /// remove one or move it.
    #[error("region {base:#x}+{len:#x} overlaps region {existing_base:#x}+{existing_len:#x}")]
    Overlap {
        /// Start of the region being inserted.
        base: u64,
        /// Length of the region being inserted.
        len: u64,
        /// Start of the region already on the bus.
        existing_base: u64,
        /// Length of the region already on the bus.
        existing_len: u64,
    },
    /// The region is empty or runs past the end of the address space.
    #[error("region {base:#x}+{len:#x} is empty or wraps past the end of the address space")]
    InvalidRange {
        /// Start of the region.
        base: u64,
        /// Length of the region.
        len: u64,
    },
}

struct BusEntry {
    len: u64,
    device: Box<dyn IoDevice>,
}

/// Maps non-overlapping address ranges (ports or guest-physical addresses)
/// to the devices serving them.
#[derive(Default)]
pub struct IoBus {
    // Keyed by region start; regions never overlap.
    entries: BTreeMap<u64, BusEntry>,
}

impl fmt::Debug for IoBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        for (base, entry) in &self.entries {
            list.entry(&format_args!("{base:#x}+{:#x}", entry.len));
        }
        list.finish()
    }
}

impl IoBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Place `device` at `base..base + len`.
    ///
    /// # Errors
    ///
    /// [`BusError::InvalidRange`] for an empty or wrapping range,
    /// [`BusError::Overlap`] naming the first region it collides with.
    pub fn insert(&mut self, base: u64, len: u64, device: Box<dyn IoDevice>) -> Result<(), BusError> {
        let end = match base.checked_add(len) {
            Some(end) if len > 0 => end,
            _ => return Err(BusError::InvalidRange { base, len }),
        };
        let before = self.entries.range(..=base).next_back();
        let after = self.entries.range(base..end).next();
        let clash = before.filter(|(b, e)| **b + e.len > base).or(after).map(|(b, e)| (*b, e.len));
        if let Some((existing_base, existing_len)) = clash {
            return Err(BusError::Overlap { base, len, existing_base, existing_len });
        }
        self.entries.insert(base, BusEntry { len, device });
        Ok(())
    }

    /// Take the device whose region starts at `base` off the bus.
    pub fn remove(&mut self, base: u64) -> Option<Box<dyn IoDevice>> {
        self.entries.remove(&base).map(|e| e.device)
    }

    /// The device serving `addr` and the offset of `addr` in its region.
    pub fn lookup(&mut self, addr: u64) -> Option<(&mut dyn IoDevice, u64)> {
        let (base, entry) = self.entries.range_mut(..=addr).next_back()?;
        let offset = addr - *base;
        if offset >= entry.len {
            return None;
        }
        Some((entry.device.as_mut(), offset))
    }

    /// Route a read at `addr`; returns false (leaving `data` untouched) when
    /// no device serves `addr`.
    pub fn read(&mut self, addr: u64, data: &mut [u8]) -> bool {
        match self.lookup(addr) {
            Some((device, offset)) => {
                device.read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Route a write at `addr`; returns false when no device serves `addr`.
    pub fn write(&mut self, addr: u64, data: &[u8]) -> bool {
        match self.lookup(addr) {
            Some((device, offset)) => {
                device.write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Little-endian value of up to the first 8 bytes of `data`.
pub(crate) fn le_value(data: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    let n = data.len().min(8);
    bytes[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(bytes)
}

/// Fill `data` with the little-endian bytes of `value` (zero past 8 bytes).
pub(crate) fn put_le_value(data: &mut [u8], value: u64) {
    let bytes = value.to_le_bytes();
    for (i, b) in data.iter_mut().enumerate() {
        *b = bytes.get(i).copied().unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the last write and echoes the offset on reads.
    struct Echo(Arc<Mutex<Vec<(u64, u64)>>>);

    impl IoDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            put_le_value(data, offset);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((offset, le_value(data)));
        }
    }

    fn echo() -> Box<dyn IoDevice> {
        Box::new(Echo(Arc::default()))
    }

    #[test]
    fn lookup_returns_device_and_offset() {
        let mut bus = IoBus::new();
        let log = Arc::new(Mutex::new(Vec::new()));
        bus.insert(0x3f8, 8, Box::new(Echo(log.clone()))).unwrap();
        bus.insert(0x20, 2, echo()).unwrap();
        let mut data = [0u8; 2];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5, 0]);
        assert!(bus.write(0x3f8, &[0x41]));
        assert_eq!(*log.lock().unwrap(), vec![(0, 0x41)]);
        assert!(!bus.read(0x400, &mut data));
        assert!(!bus.write(0x22, &[0]));
        assert!(bus.lookup(0x1f).is_none());
        assert_eq!(bus.lookup(0x21).map(|(_, o)| o), Some(1));
    }

    #[test]
    fn overlapping_insert_names_both_regions() {
        let mut bus = IoBus::new();
        bus.insert(0x1000, 0x100, echo()).unwrap();
        let err = bus.insert(0x10ff, 0x10, echo()).unwrap_err();
        assert_eq!(err.to_string(), "region 0x10ff+0x10 overlaps region 0x1000+0x100");
        // A region swallowing an existing one from below.
        let err = bus.insert(0xf00, 0x1000, echo()).unwrap_err();
        assert!(matches!(err, BusError::Overlap { existing_base: 0x1000, .. }));
        // Adjacent regions are fine.
        bus.insert(0x1100, 0x10, echo()).unwrap();
        bus.insert(0xf00, 0x100, echo()).unwrap();
    }

    #[test]
    fn empty_or_wrapping_ranges_are_rejected() {
        let mut bus = IoBus::new();
        assert!(matches!(bus.insert(0x10, 0, echo()), Err(BusError::InvalidRange { .. })));
        assert!(matches!(bus.insert(u64::MAX, 2, echo()), Err(BusError::InvalidRange { .. })));
    }

    #[test]
    fn remove_frees_the_range() {
        let mut bus = IoBus::new();
        bus.insert(0x60, 1, echo()).unwrap();
        assert!(bus.remove(0x60).is_some());
        assert!(bus.lookup(0x60).is_none());
        bus.insert(0x60, 1, echo()).unwrap();
        assert_eq!(format!("{bus:?}"), "[0x60+0x1]");
    }

    #[test]
    fn shared_device_works_on_the_bus() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::new(Mutex::new(Echo(log.clone())));
        let mut bus = IoBus::new();
        bus.insert(0x80, 1, Box::new(shared.clone())).unwrap();
        bus.write(0x80, &[7]);
        assert_eq!(*log.lock().unwrap(), vec![(0, 7)]);
    }

    #[test]
    fn closures_are_irq_lines() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let line = move |level| s.lock().unwrap().push(level);
        line.pulse();
        line.set_level(true);
        assert_eq!(*seen.lock().unwrap(), vec![true, false, true]);
    }

    #[test]
    fn le_helpers_handle_any_size() {
        assert_eq!(le_value(&[1, 2]), 0x0201);
        assert_eq!(le_value(&[0xff; 12]), u64::MAX);
        let mut d = [0xaa; 10];
        put_le_value(&mut d, 0x0102);
        assert_eq!(d, [2, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
    }
}
