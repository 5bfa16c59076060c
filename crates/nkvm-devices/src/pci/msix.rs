//! MSI-X: the capability in configuration space, the vector table and the
//! pending-bit array (PBA) in a BAR, and the delivery rules (enable,
//! function mask, per-vector mask, pending bits).
//!
//! The device calls [`Msix::signal`] for a vector; a deliverable vector goes
//! to the [`MsiSink`] (in nkvm's VMM: a write to an irqfd's eventfd), a
//! masked one sets its pending bit and is delivered when unmasked. Whenever
//! the message a vector would deliver changes (the guest programmed the
//! table, masked or unmasked a vector, enabled MSI-X), the sink hears it
//! through [`MsiSink::route`], so the VMM can install the interrupt route
//! before the first signal.

use std::fmt;

use super::config::{ConfigError, ConfigSpace};

/// Capability ID of MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;
/// Size of one table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Message control: MSI-X enable.
const CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: all vectors masked.
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: masked.
const VECTOR_MASKED: u32 = 1;

/// The address/data pair a vector delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MsiMessage {
    /// Message address (0xfee0_0000 | destination << 12 | flags on x86).
    pub address: u64,
    /// Message data (vector, delivery mode, trigger).
    pub data: u32,
}

/// Where a device's MSI-X interrupts go.
pub trait MsiSink: Send {
    /// Deliver `vector` now (it is enabled and unmasked, with the message
    /// last given to [`route`](Self::route)).
    fn signal(&mut self, vector: u16);
    /// `vector` will deliver `message` from now on (`None`: it is masked or
    /// MSI-X is disabled, nothing will be signalled for it).
    fn route(&mut self, vector: u16, message: Option<MsiMessage>);
}

mod snapshot;

/// A table entry as the guest sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Entry {
    address: u64,
    data: u32,
    control: u32,
}

impl Entry {
    fn bytes(&self) -> [u8; ENTRY_SIZE as usize] {
        let mut b = [0; ENTRY_SIZE as usize];
        b[..8].copy_from_slice(&self.address.to_le_bytes());
        b[8..12].copy_from_slice(&self.data.to_le_bytes());
        b[12..].copy_from_slice(&self.control.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8; ENTRY_SIZE as usize]) -> Self {
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Self {
            address: u64::from(word(0)) | (u64::from(word(4)) << 32),
            data: word(8),
            control: word(12) & VECTOR_MASKED,
        }
    }
}

/// Where the table and the PBA live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixLayout {
    /// Number of vectors (1-2048).
    pub vectors: u16,
    /// BAR holding the table.
    pub table_bar: u8,
    /// Offset of the table in it (8-byte aligned).
    pub table_offset: u32,
    /// BAR holding the PBA.
    pub pba_bar: u8,
    /// Offset of the PBA in it (8-byte aligned).
    pub pba_offset: u32,
}

/// One function's MSI-X state.
pub struct Msix {
    layout: MsixLayout,
    cap_offset: usize,
    table: Vec<Entry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    /// What the sink was last told per vector.
    routed: Vec<Option<MsiMessage>>,
    sink: Box<dyn MsiSink>,
}

impl fmt::Debug for Msix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Msix")
            .field("layout", &self.layout)
            .field("enabled", &self.enabled)
            .field("function_masked", &self.function_masked)
            .field("table", &self.table)
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

impl Msix {
    /// Adds the MSI-X capability to `config` and returns the state behind
    /// it; every vector starts masked, MSI-X disabled.
    pub fn new(config: &mut ConfigSpace, layout: MsixLayout, sink: Box<dyn MsiSink>) -> Result<Self, ConfigError> {
        let vectors = layout.vectors.clamp(1, 2048);
        let control = vectors - 1;
        let mut body = [0u8; 12];
        body[0] = CAP_ID_MSIX;
        body[2..4].copy_from_slice(&control.to_le_bytes());
        body[4..8].copy_from_slice(&((layout.table_offset & !7) | u32::from(layout.table_bar & 7)).to_le_bytes());
        body[8..12].copy_from_slice(&((layout.pba_offset & !7) | u32::from(layout.pba_bar & 7)).to_le_bytes());
        let mut writable = [0u8; 12];
        writable[3] = 0xc0;
        let cap_offset = config.add_capability(&body, &writable)?;
        let n = usize::from(vectors);
        Ok(Self {
            layout: MsixLayout { vectors, ..layout },
            cap_offset,
            table: vec![Entry { control: VECTOR_MASKED, ..Default::default() }; n],
            pending: vec![false; n],
            enabled: false,
            function_masked: false,
            routed: vec![None; n],
            sink,
        })
    }

    /// The layout given at creation.
    pub fn layout(&self) -> MsixLayout {
        self.layout
    }

    /// Whether the guest enabled MSI-X.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether a configuration write of `len` bytes at `offset` touched the capability.
    pub fn covers(&self, offset: usize, len: usize) -> bool {
        offset < self.cap_offset + 12 && offset + len > self.cap_offset
    }

    /// Re-reads the enable and function-mask bits after a configuration write.
    pub fn config_written(&mut self, config: &ConfigSpace) {
        let control = config.read_u16(self.cap_offset + 2);
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        self.update();
    }

    /// Whether `offset` (in the table's BAR) is in the table.
    pub fn in_table(&self, bar: usize, offset: u64) -> bool {
        let start = u64::from(self.layout.table_offset);
        bar == usize::from(self.layout.table_bar)
            && offset >= start
            && offset < start + u64::from(self.layout.vectors) * ENTRY_SIZE
    }

    /// Whether `offset` (in the PBA's BAR) is in the PBA.
    pub fn in_pba(&self, bar: usize, offset: u64) -> bool {
        let start = u64::from(self.layout.pba_offset);
        bar == usize::from(self.layout.pba_bar) && offset >= start && offset < start + self.pba_len()
    }

    fn pba_len(&self) -> u64 {
        u64::from(self.layout.vectors).div_ceil(64) * 8
    }

    /// The guest reads the table at `offset` from the table's start.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let o = offset.saturating_add(i as u64);
            *b = self.table.get((o / ENTRY_SIZE) as usize).map_or(0, |e| e.bytes()[(o % ENTRY_SIZE) as usize]);
        }
    }

    /// The guest writes the table at `offset` from the table's start.
    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let o = offset.saturating_add(i as u64);
            if let Some(e) = self.table.get_mut((o / ENTRY_SIZE) as usize) {
                let mut bytes = e.bytes();
                bytes[(o % ENTRY_SIZE) as usize] = v;
                *e = Entry::from_bytes(&bytes);
            }
        }
        self.update();
    }

    /// The guest reads the PBA at `offset` from its start (writes are ignored).
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let first = offset.saturating_add(i as u64).saturating_mul(8);
            *b = (0..8).fold(0u8, |acc, bit| {
                let pending = self.pending.get((first + bit) as usize).copied().unwrap_or(false);
                acc | (u8::from(pending) << bit)
            });
        }
    }

    /// The device raises `vector`: delivered if deliverable, else pending
    /// (if MSI-X is enabled) or dropped (if it is not: no INTx here).
    pub fn signal(&mut self, vector: u16) {
        let v = usize::from(vector);
        if v >= self.table.len() {
            log::debug!("msix: signal of vector {vector} past the table ({} vectors) dropped", self.table.len());
            return;
        }
        if !self.enabled {
            log::debug!("msix: vector {vector} signalled while MSI-X is disabled; dropped");
            return;
        }
        if self.deliverable(v) {
            self.sink.signal(vector);
        } else {
            self.pending[v] = true;
        }
    }

    fn deliverable(&self, v: usize) -> bool {
        self.enabled && !self.function_masked && self.table[v].control & VECTOR_MASKED == 0
    }

    /// Tells the sink about changed routes and delivers pending vectors
    /// that became deliverable.
    fn update(&mut self) {
        for v in 0..self.table.len() {
            let want =
                self.deliverable(v).then_some(MsiMessage { address: self.table[v].address, data: self.table[v].data });
            if want != self.routed[v] {
                self.routed[v] = want;
                self.sink.route(v as u16, want);
            }
            if want.is_some() && self.pending[v] {
                self.pending[v] = false;
                self.sink.signal(v as u16);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::pci::config::PciId;

    /// What a recording sink saw.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) enum SinkEvent {
        Signal(u16),
        Route(u16, Option<MsiMessage>),
    }

    /// A sink that records every call.
    #[derive(Debug, Clone, Default)]
    pub(crate) struct RecordingSink(pub(crate) Arc<Mutex<Vec<SinkEvent>>>);

    impl RecordingSink {
        pub(crate) fn take(&self) -> Vec<SinkEvent> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    impl MsiSink for RecordingSink {
        fn signal(&mut self, vector: u16) {
            self.0.lock().unwrap().push(SinkEvent::Signal(vector));
        }
        fn route(&mut self, vector: u16, message: Option<MsiMessage>) {
            self.0.lock().unwrap().push(SinkEvent::Route(vector, message));
        }
    }

    fn msix() -> (ConfigSpace, Msix, RecordingSink) {
        let id = PciId { vendor: 1, device: 2, revision: 0, class: 0, subsystem_vendor: 0, subsystem: 0 };
        let mut config = ConfigSpace::new(id);
        let sink = RecordingSink::default();
        let layout = MsixLayout { vectors: 2, table_bar: 0, table_offset: 0x4000, pba_bar: 0, pba_offset: 0x5000 };
        let msix = Msix::new(&mut config, layout, Box::new(sink.clone())).unwrap();
        (config, msix, sink)
    }

    fn enable(config: &mut ConfigSpace, msix: &mut Msix, control: u16) {
        let at = msix.cap_offset + 2;
        config.write(at, &control.to_le_bytes());
        msix.config_written(config);
    }

    #[test]
    fn capability_describes_table_and_pba() {
        let (config, msix, _) = msix();
        assert_eq!(config.read_u16(msix.cap_offset) & 0xff, u16::from(CAP_ID_MSIX));
        assert_eq!(config.read_u16(msix.cap_offset + 2), 1, "table size - 1");
        assert_eq!(config.read_u32(msix.cap_offset + 4), 0x4000);
        assert_eq!(config.read_u32(msix.cap_offset + 8), 0x5000);
        assert!(msix.in_table(0, 0x4000) && msix.in_table(0, 0x401f) && !msix.in_table(0, 0x4020));
        assert!(msix.in_pba(0, 0x5000) && !msix.in_pba(0, 0x5008));
    }

    #[test]
    fn masked_vector_pends_until_unmasked_and_routes_follow_the_table() {
        let (mut config, mut msix, sink) = msix();
        enable(&mut config, &mut msix, CONTROL_ENABLE);
        assert!(sink.take().is_empty(), "all vectors start masked");
        msix.table_write(16, &0xfee0_0000u32.to_le_bytes());
        msix.table_write(16 + 8, &0x31u32.to_le_bytes());
        msix.signal(1);
        let mut pba = [0u8; 1];
        msix.pba_read(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        assert!(sink.take().is_empty());
        msix.table_write(16 + 12, &0u32.to_le_bytes());
        let m = MsiMessage { address: 0xfee0_0000, data: 0x31 };
        assert_eq!(sink.take(), vec![SinkEvent::Route(1, Some(m)), SinkEvent::Signal(1)]);
        msix.pba_read(0, &mut pba);
        assert_eq!(pba[0], 0);
        msix.signal(1);
        assert_eq!(sink.take(), vec![SinkEvent::Signal(1)]);
        // The function mask holds everything back.
        enable(&mut config, &mut msix, CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        msix.signal(1);
        assert_eq!(sink.take(), vec![SinkEvent::Route(1, None)]);
        enable(&mut config, &mut msix, CONTROL_ENABLE);
        assert_eq!(sink.take(), vec![SinkEvent::Route(1, Some(m)), SinkEvent::Signal(1)]);
    }

    #[test]
    fn out_of_range_accesses_are_ignored() {
        let (_config, mut msix, sink) = msix();
        msix.signal(7);
        msix.table_write(1000, &[1, 2, 3, 4]);
        let mut d = [0xaa; 8];
        msix.table_read(1000, &mut d);
        assert_eq!(d, [0; 8]);
        msix.pba_read(100, &mut d);
        assert!(sink.take().is_empty());
    }
}
