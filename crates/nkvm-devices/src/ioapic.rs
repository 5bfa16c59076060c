//! An I/O APIC (82093AA-compatible, version 0x20 with an EOI register): 24
//! input pins routed through a redirection table to [`InterruptMessage`]s on
//! the APIC bus.
//!
//! # Registers
//!
//! | offset | name | meaning |
//! |---|---|---|
//! | 0x00 | `IOREGSEL` | index of the register `IOWIN` reaches |
//! | 0x10 | `IOWIN` | window onto the indexed register |
//! | 0x40 | `EOI` | write a vector: same as [`Ioapic::end_of_interrupt`] |
//!
//! Indexed registers: 0x00 ID (bits 24-27), 0x01 version (0x0017_0020:
//! version 0x20, 24 entries), 0x02 arbitration ID, 0x10 + 2n / 0x11 + 2n the
//! low / high half of redirection entry n ([`RedirectionEntry`]).
//!
//! Accesses must be 1, 2, 4 or 8 bytes at exactly one of the three offsets;
//! anything else, and unknown indexes, read as 0 and are ignored on write.
//! All entries start masked.

use nkvm_wire::apic::{DeliveryMode, DestinationMode, InterruptMessage, TriggerMode};

use crate::bus::{le_value, put_le_value, ApicBusSink, IoDevice};

mod snapshot;

/// Number of input pins.
pub const IOAPIC_PINS: usize = 24;
/// Size of the register region in bytes.
pub const IOAPIC_SIZE: u64 = 0x100;
/// Offset of `IOREGSEL`.
pub const REG_IOREGSEL: u64 = 0x00;
/// Offset of `IOWIN`.
pub const REG_IOWIN: u64 = 0x10;
/// Offset of the EOI register.
pub const REG_EOI: u64 = 0x40;
/// Index of the ID register.
pub const INDEX_ID: u8 = 0x00;
/// Index of the version register.
pub const INDEX_VERSION: u8 = 0x01;
/// Index of the arbitration register.
pub const INDEX_ARBITRATION: u8 = 0x02;
/// Index of the low half of redirection entry 0.
pub const INDEX_REDIRECTION_TABLE: u8 = 0x10;
/// Implementation version reported in the version register.
pub const IOAPIC_VERSION: u32 = 0x20;

/// One redirection-table entry, as the guest programs it.
///
/// Bits: 0-7 vector, 8-10 delivery mode, 11 destination mode (1 = logical),
/// 12 delivery status (read-only), 13 polarity (1 = active low), 14 remote
/// IRR (read-only), 15 trigger mode (1 = level), 16 mask, 56-63 destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedirectionEntry(pub u64);

const DEST_LOGICAL: u64 = 1 << 11;
const DELIVERY_STATUS: u64 = 1 << 12;
const ACTIVE_LOW: u64 = 1 << 13;
const REMOTE_IRR: u64 = 1 << 14;
const LEVEL_TRIGGERED: u64 = 1 << 15;
const MASKED: u64 = 1 << 16;
/// Bits the guest cannot write.
const READ_ONLY: u64 = DELIVERY_STATUS | REMOTE_IRR;

impl RedirectionEntry {
    /// The interrupt vector.
    pub fn vector(self) -> u8 {
        self.0 as u8
    }

    /// The delivery mode, or `None` for the reserved encodings 3 and 6.
    pub fn delivery_mode(self) -> Option<DeliveryMode> {
        match (self.0 >> 8) & 7 {
            0 => Some(DeliveryMode::Fixed),
            1 => Some(DeliveryMode::LowestPriority),
            2 => Some(DeliveryMode::Smi),
            4 => Some(DeliveryMode::Nmi),
            5 => Some(DeliveryMode::Init),
            7 => Some(DeliveryMode::ExtInt),
            _ => None,
        }
    }

    /// Physical or logical destination.
    pub fn destination_mode(self) -> DestinationMode {
        if self.0 & DEST_LOGICAL != 0 {
            DestinationMode::Logical
        } else {
            DestinationMode::Physical
        }
    }

    /// Delivery status: always idle here, delivery is immediate.
    pub fn delivery_pending(self) -> bool {
        self.0 & DELIVERY_STATUS != 0
    }

    /// True if the pin is asserted while its line is low.
    pub fn active_low(self) -> bool {
        self.0 & ACTIVE_LOW != 0
    }

    /// Remote IRR: a level-triggered interrupt was delivered and not yet
    /// acknowledged by an EOI.
    pub fn remote_irr(self) -> bool {
        self.0 & REMOTE_IRR != 0
    }

    /// Edge or level.
    pub fn trigger_mode(self) -> TriggerMode {
        if self.0 & LEVEL_TRIGGERED != 0 {
            TriggerMode::Level
        } else {
            TriggerMode::Edge
        }
    }

    /// True if the pin is masked.
    pub fn masked(self) -> bool {
        self.0 & MASKED != 0
    }

    /// The destination field (bits 56-63).
    pub fn destination(self) -> u8 {
        (self.0 >> 56) as u8
    }

    fn is_level(self) -> bool {
        self.0 & LEVEL_TRIGGERED != 0
    }
}

/// The I/O APIC; messages go to the sink `S`.
#[derive(Debug)]
pub struct Ioapic<S: ApicBusSink> {
    id: u8,
    ioregsel: u8,
    table: [RedirectionEntry; IOAPIC_PINS],
    /// Electrical level of each input line, bit n for pin n.
    lines: u32,
    sink: S,
    /// Deliveries are held ([`hold`](Self::hold)): the machine is pausing
    /// for a save.
    held: bool,
}

impl<S: ApicBusSink> Ioapic<S> {
    /// An I/O APIC in its reset state (ID 0, all pins masked, all lines
    /// low), sending interrupt messages to `sink`.
    pub fn new(sink: S) -> Self {
        Self { id: 0, ioregsel: 0, table: [RedirectionEntry(MASKED); IOAPIC_PINS], lines: 0, sink, held: false }
    }

    /// Return the registers to their reset state. Line levels are kept: the
    /// devices driving them are not reset by this.
    pub fn reset(&mut self) {
        self.id = 0;
        self.ioregsel = 0;
        self.table = [RedirectionEntry(MASKED); IOAPIC_PINS];
    }

    /// The redirection entry of `pin`, if `pin < 24`.
    pub fn entry(&self, pin: usize) -> Option<RedirectionEntry> {
        self.table.get(pin).copied()
    }

    /// The APIC ID the guest assigned (4 bits).
    pub fn id(&self) -> u8 {
        self.id
    }

    /// The message sink.
    pub fn sink(&self) -> &S {
        &self.sink
    }

    /// The message sink, mutably (e.g. to drain collected messages).
    pub fn sink_mut(&mut self) -> &mut S {
        &mut self.sink
    }

    /// Drive the input line of `pin` to the electrical `level`.
    ///
    /// The pin is asserted while its line is high, or low if the guest made
    /// it active-low (polarity bit). A source on an active-low pin (PCI
    /// INTx) therefore holds its line high when idle. An edge-triggered pin
    /// delivers on each deasserted-to-asserted change while unmasked (an
    /// edge while masked is lost); a level-triggered pin delivers while
    /// asserted, unmasked and its remote IRR is clear. Pins past 23 are
    /// ignored.
    pub fn set_irq(&mut self, pin: usize, level: bool) {
        if pin >= IOAPIC_PINS {
            log::debug!("ioapic: set_irq on nonexistent pin {pin}");
            return;
        }
        let was = self.asserted(pin);
        if level {
            self.lines |= 1 << pin;
        } else {
            self.lines &= !(1 << pin);
        }
        let now = self.asserted(pin);
        if now && (self.table[pin].is_level() || !was) {
            self.deliver(pin);
        }
    }

    /// A local APIC broadcast an EOI for `vector`: clear the remote IRR of
    /// every level-triggered entry with that vector, and deliver again any
    /// whose pin is still asserted.
    pub fn end_of_interrupt(&mut self, vector: u8) {
        log::trace!("ioapic: EOI of vector {vector:#x}");
        for pin in 0..IOAPIC_PINS {
            let entry = self.table[pin];
            if entry.vector() != vector || !entry.remote_irr() {
                continue;
            }
            self.table[pin].0 &= !REMOTE_IRR;
            if entry.is_level() && self.asserted(pin) {
                self.deliver(pin);
            }
        }
    }

    fn asserted(&self, pin: usize) -> bool {
        let high = self.lines & (1 << pin) != 0;
        high != self.table[pin].active_low()
    }

    /// Holds (`true`) or lets go of deliveries. While held nothing is sent:
    /// an edge leaves its entry's delivery-status bit set ("send pending",
    /// saved with the table), a level pin is looked at again on release. A
    /// machine pausing for a save holds them before its vCPUs read their
    /// local APICs, so no interrupt lands in one already read (lost in the
    /// copy, or a level pin's remote IRR left set with no vector anywhere).
    /// Released, pending edges and asserted level pins are delivered.
    pub fn hold(&mut self, on: bool) {
        self.held = on;
        if on {
            return;
        }
        for pin in 0..IOAPIC_PINS {
            let entry = self.table[pin];
            if entry.0 & DELIVERY_STATUS != 0 {
                self.table[pin].0 &= !DELIVERY_STATUS;
                self.deliver(pin);
            } else if entry.is_level() && self.asserted(pin) {
                self.deliver(pin);
            }
        }
    }

    fn deliver(&mut self, pin: usize) {
        let entry = self.table[pin];
        if entry.masked() || (entry.is_level() && entry.remote_irr()) {
            return;
        }
        if self.held {
            if !entry.is_level() {
                self.table[pin].0 |= DELIVERY_STATUS;
            }
            return;
        }
        let Some(delivery_mode) = entry.delivery_mode() else {
            log::debug!("ioapic: pin {pin} has a reserved delivery mode, not delivered");
            return;
        };
        if entry.is_level() {
            self.table[pin].0 |= REMOTE_IRR;
        }
        log::trace!("ioapic: pin {pin} delivers vector {:#x} to {:#x}", entry.vector(), entry.destination());
        self.sink.send(InterruptMessage {
            destination: u32::from(entry.destination()),
            destination_mode: entry.destination_mode(),
            delivery_mode,
            vector: entry.vector(),
            trigger_mode: entry.trigger_mode(),
            level: true,
        });
    }

    fn read_indexed(&self) -> u32 {
        match self.ioregsel {
            INDEX_ID | INDEX_ARBITRATION => u32::from(self.id) << 24,
            INDEX_VERSION => ((IOAPIC_PINS as u32 - 1) << 16) | IOAPIC_VERSION,
            index => match self.table_slot(index) {
                Some((pin, false)) => self.table[pin].0 as u32,
                Some((pin, true)) => (self.table[pin].0 >> 32) as u32,
                None => {
                    log::debug!("ioapic: read of unknown index {index:#x}");
                    0
                }
            },
        }
    }

    fn write_indexed(&mut self, value: u32) {
        match self.ioregsel {
            INDEX_ID => self.id = ((value >> 24) & 0x0f) as u8,
            index => match self.table_slot(index) {
                Some((pin, true)) => {
                    let low = self.table[pin].0 & 0xffff_ffff;
                    self.table[pin].0 = (u64::from(value) << 32) | low;
                }
                Some((pin, false)) => self.write_entry_low(pin, value),
                None => log::debug!("ioapic: write of read-only or unknown index {index:#x}"),
            },
        }
    }

    fn write_entry_low(&mut self, pin: usize, value: u32) {
        let old = self.table[pin].0;
        let mut new = (old & !0xffff_ffff) | (u64::from(value) & !READ_ONLY) | (old & READ_ONLY);
        if new & LEVEL_TRIGGERED == 0 {
            new &= !REMOTE_IRR;
        }
        self.table[pin] = RedirectionEntry(new);
        // Unmasking (or re-polarising) an asserted level pin delivers it.
        if self.table[pin].is_level() && self.asserted(pin) {
            self.deliver(pin);
        }
    }

    /// The pin and half (true = high) an index selects in the table.
    fn table_slot(&self, index: u8) -> Option<(usize, bool)> {
        let slot = usize::from(index.checked_sub(INDEX_REDIRECTION_TABLE)?);
        (slot < 2 * IOAPIC_PINS).then_some((slot / 2, slot % 2 == 1))
    }
}

impl<S: ApicBusSink> IoDevice for Ioapic<S> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (_, 1 | 2 | 4 | 8) if offset == REG_IOREGSEL => u32::from(self.ioregsel),
            (_, 1 | 2 | 4 | 8) if offset == REG_IOWIN => self.read_indexed(),
            _ => {
                log::debug!("ioapic: ignored read of {} bytes at {offset:#x}", data.len());
                0
            }
        };
        put_le_value(data, u64::from(value));
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if !matches!(data.len(), 1 | 2 | 4 | 8) {
            log::debug!("ioapic: ignored write of {} bytes at {offset:#x}", data.len());
            return;
        }
        let value = le_value(data) as u32;
        match offset {
            REG_IOREGSEL => self.ioregsel = value as u8,
            REG_IOWIN => self.write_indexed(value),
            REG_EOI => self.end_of_interrupt(value as u8),
            _ => log::debug!("ioapic: ignored write at {offset:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestIoapic = Ioapic<Vec<InterruptMessage>>;

    fn write32(io: &mut TestIoapic, offset: u64, value: u32) {
        io.write(offset, &value.to_le_bytes());
    }

    fn read32(io: &mut TestIoapic, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        io.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn program(io: &mut TestIoapic, pin: u8, low: u32, dest: u8) {
        write32(io, REG_IOREGSEL, u32::from(INDEX_REDIRECTION_TABLE + 2 * pin + 1));
        write32(io, REG_IOWIN, u32::from(dest) << 24);
        write32(io, REG_IOREGSEL, u32::from(INDEX_REDIRECTION_TABLE + 2 * pin));
        write32(io, REG_IOWIN, low);
    }

    fn drain(io: &mut TestIoapic) -> Vec<InterruptMessage> {
        std::mem::take(io.sink_mut())
    }

    const LEVEL: u32 = LEVEL_TRIGGERED as u32;
    const MASK: u32 = MASKED as u32;
    const LOW: u32 = ACTIVE_LOW as u32;

    /// A machine pausing for a save holds the deliveries: an edge waits
    /// as "send pending" in its entry (and in a snapshot of it), a level
    /// pin is looked at again; released, each goes out once.
    #[test]
    fn held_deliveries_wait_in_the_table_and_go_out_once_released() {
        let mut io = Ioapic::new(Vec::new());
        program(&mut io, 3, 0x33, 0);
        program(&mut io, 9, 0x99 | LEVEL, 0);
        io.hold(true);
        io.set_irq(3, true);
        io.set_irq(3, false);
        io.set_irq(9, true);
        assert!(drain(&mut io).is_empty(), "nothing goes out while held");
        let saved = crate::Snapshot::snapshot(&io);
        let mut copy = Ioapic::new(Vec::new());
        crate::Snapshot::restore(&mut copy, &saved).unwrap();
        for io in [&mut io, &mut copy] {
            io.hold(false);
            let vectors: Vec<u8> = drain(io).iter().map(|m| m.vector).collect();
            assert_eq!(vectors, [0x33, 0x99], "the pending edge (kept in the table) and the asserted level pin");
            io.hold(false);
            assert!(drain(io).is_empty(), "once");
        }
    }

    #[test]
    fn identification_registers() {
        let mut io = Ioapic::new(Vec::new());
        write32(&mut io, REG_IOREGSEL, u32::from(INDEX_VERSION));
        assert_eq!(read32(&mut io, REG_IOWIN), 0x0017_0020);
        write32(&mut io, REG_IOREGSEL, u32::from(INDEX_ID));
        write32(&mut io, REG_IOWIN, 0xff00_0000);
        assert_eq!(read32(&mut io, REG_IOWIN), 0x0f00_0000);
        assert_eq!(io.id(), 0x0f);
        write32(&mut io, REG_IOREGSEL, u32::from(INDEX_ARBITRATION));
        assert_eq!(read32(&mut io, REG_IOWIN), 0x0f00_0000);
        write32(&mut io, REG_IOWIN, 0); // read-only
        assert_eq!(read32(&mut io, REG_IOREGSEL), u32::from(INDEX_ARBITRATION));
        io.reset();
        assert_eq!(io.id(), 0);
    }

    #[test]
    fn entries_start_masked_and_read_back() {
        let mut io = Ioapic::new(Vec::new());
        assert!((0..IOAPIC_PINS).all(|p| io.entry(p).is_some_and(|e| e.masked())));
        program(&mut io, 23, 0x0000_0931 | DELIVERY_STATUS as u32, 0x81);
        write32(&mut io, REG_IOREGSEL, 0x3e);
        assert_eq!(read32(&mut io, REG_IOWIN), 0x0931); // status bit read-only
        write32(&mut io, REG_IOREGSEL, 0x3f);
        assert_eq!(read32(&mut io, REG_IOWIN), 0x8100_0000);
        let e = io.entry(23).unwrap();
        assert_eq!(e.vector(), 0x31);
        assert_eq!(e.delivery_mode(), Some(DeliveryMode::LowestPriority));
        assert_eq!(e.destination_mode(), DestinationMode::Logical);
        assert_eq!(e.destination(), 0x81);
        assert!(!e.delivery_pending() && !e.masked());
        assert!(io.entry(24).is_none());
    }

    #[test]
    fn edge_pin_delivers_a_message_with_the_entry_fields() {
        let mut io = Ioapic::new(Vec::new());
        program(&mut io, 4, 0x24, 3);
        io.set_irq(4, true);
        io.set_irq(4, true); // no new edge
        io.set_irq(4, false);
        assert_eq!(
            drain(&mut io),
            vec![InterruptMessage {
                destination: 3,
                destination_mode: DestinationMode::Physical,
                delivery_mode: DeliveryMode::Fixed,
                vector: 0x24,
                trigger_mode: TriggerMode::Edge,
                level: true,
            }]
        );
        io.set_irq(4, true);
        assert_eq!(drain(&mut io).len(), 1);
        assert!(!io.entry(4).unwrap().remote_irr());
    }

    #[test]
    fn masked_pins_do_not_deliver_and_edges_are_lost() {
        let mut io = Ioapic::new(Vec::new());
        program(&mut io, 1, 0x31 | MASK, 0);
        io.set_irq(1, true);
        io.set_irq(1, false);
        program(&mut io, 1, 0x31, 0);
        assert!(drain(&mut io).is_empty());
        io.set_irq(99, true); // nonexistent pin
        assert!(drain(&mut io).is_empty());
    }

    #[test]
    fn remote_irr_blocks_a_level_pin_until_eoi() {
        let mut io = Ioapic::new(Vec::new());
        program(&mut io, 10, 0x40 | LEVEL, 0);
        io.set_irq(10, true);
        let msgs = drain(&mut io);
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].trigger_mode, TriggerMode::Level);
        assert!(io.entry(10).unwrap().remote_irr());
        io.set_irq(10, false);
        io.set_irq(10, true);
        assert!(drain(&mut io).is_empty());
        // Still asserted at EOI: delivered again.
        io.end_of_interrupt(0x40);
        assert_eq!(drain(&mut io).len(), 1);
        assert!(io.entry(10).unwrap().remote_irr());
        // Deasserted at EOI: quiet, and the next assertion delivers.
        io.set_irq(10, false);
        io.end_of_interrupt(0x40);
        assert!(drain(&mut io).is_empty());
        assert!(!io.entry(10).unwrap().remote_irr());
        io.set_irq(10, true);
        assert_eq!(drain(&mut io).len(), 1);
    }

    #[test]
    fn eoi_register_and_other_vectors() {
        let mut io = Ioapic::new(Vec::new());
        program(&mut io, 9, 0x41 | LEVEL, 0);
        io.set_irq(9, true);
        drain(&mut io);
        io.end_of_interrupt(0x42); // another vector: no effect
        assert!(io.entry(9).unwrap().remote_irr());
        write32(&mut io, REG_EOI, 0x41);
        assert_eq!(drain(&mut io).len(), 1);
    }

    #[test]
    fn unmasking_an_asserted_level_pin_delivers() {
        let mut io = Ioapic::new(Vec::new());
        program(&mut io, 11, 0x50 | LEVEL | MASK, 0);
        io.set_irq(11, true);
        assert!(drain(&mut io).is_empty());
        program(&mut io, 11, 0x50 | LEVEL, 0);
        assert_eq!(drain(&mut io).len(), 1);
        // Rewriting the entry keeps remote IRR (read-only) and so stays quiet.
        program(&mut io, 11, 0x50 | LEVEL, 0);
        assert!(drain(&mut io).is_empty());
        // Switching to edge clears remote IRR.
        program(&mut io, 11, 0x50, 0);
        assert!(!io.entry(11).unwrap().remote_irr());
    }

    #[test]
    fn active_low_pins_assert_when_the_line_drops() {
        let mut io = Ioapic::new(Vec::new());
        io.set_irq(16, true); // idle PCI INTx line is high
        program(&mut io, 16, 0x60 | LEVEL | LOW, 0);
        assert!(io.entry(16).unwrap().active_low());
        assert!(drain(&mut io).is_empty());
        io.set_irq(16, false);
        assert_eq!(drain(&mut io)[0].vector, 0x60);
        io.set_irq(16, true);
        io.end_of_interrupt(0x60);
        assert!(drain(&mut io).is_empty());
        // Edge, active low: the falling line is the edge.
        program(&mut io, 17, 0x61 | LOW, 0);
        io.set_irq(17, true);
        assert!(drain(&mut io).is_empty());
        io.set_irq(17, false);
        assert_eq!(drain(&mut io)[0].vector, 0x61);
    }

    #[test]
    fn special_delivery_modes() {
        let mut io = Ioapic::new(Vec::new());
        program(&mut io, 0, 0x700, 0); // ExtINT, for the PIC
        program(&mut io, 2, 0x400, 0); // NMI
        program(&mut io, 3, 0x300, 0); // reserved
        for pin in [0, 2, 3] {
            io.set_irq(pin, true);
        }
        let modes: Vec<_> = drain(&mut io).iter().map(|m| m.delivery_mode).collect();
        assert_eq!(modes, [DeliveryMode::ExtInt, DeliveryMode::Nmi]);
        assert_eq!(RedirectionEntry(0x600).delivery_mode(), None);
    }

    #[test]
    fn invalid_accesses_read_zero_and_are_ignored() {
        let mut io = Ioapic::new(Vec::new());
        assert_eq!(read32(&mut io, 0x20), 0);
        assert_eq!(read32(&mut io, 0x11), 0);
        let mut odd = [0xaa; 3];
        io.read(REG_IOWIN, &mut odd);
        assert_eq!(odd, [0; 3]);
        write32(&mut io, REG_IOREGSEL, 0x40); // past the table
        assert_eq!(read32(&mut io, REG_IOWIN), 0);
        write32(&mut io, REG_IOWIN, 0xffff_ffff);
        io.write(REG_IOREGSEL, &[1, 2, 3]);
        io.write(u64::MAX, &[1]);
        io.write(REG_IOREGSEL, &[]);
        assert_eq!(read32(&mut io, REG_IOREGSEL), 0x40);
        let mut wide = [0u8; 8];
        io.read(REG_IOREGSEL, &mut wide);
        assert_eq!(u64::from_le_bytes(wide), 0x40);
        assert!(io.sink().is_empty());
    }
}
