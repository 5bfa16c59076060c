//! APIC-bus messages exchanged between the local APICs (in KVM) and the
//! IOAPIC/PIC device models.
//!
//! (Types only for now; encoding and decoding are specified in
//! `docs/wire-format.md`.)

/// How the destination field of an interrupt message is interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DestinationMode {
    /// The destination is an APIC ID.
    Physical,
    /// The destination is a logical APIC ID bitmask.
    Logical,
}

/// The delivery mode of an interrupt message (Intel SDM, "Delivery Mode").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeliveryMode {
    /// Deliver the vector to the destination.
    Fixed,
    /// Deliver the vector to the lowest-priority CPU among the destinations.
    LowestPriority,
    /// System management interrupt.
    Smi,
    /// Non-maskable interrupt (vector ignored).
    Nmi,
    /// INIT IPI.
    Init,
    /// The vector comes from an external 8259-compatible controller.
    ExtInt,
}

/// Edge- or level-triggered interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TriggerMode {
    /// Edge triggered: no EOI is broadcast back.
    Edge,
    /// Level triggered: the local APIC broadcasts an EOI for the vector.
    Level,
}

/// An interrupt message sent on the APIC bus towards the local APICs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InterruptMessage {
    /// Destination APIC ID (physical) or logical mask.
    pub destination: u32,
    /// How `destination` is interpreted.
    pub destination_mode: DestinationMode,
    /// How the interrupt is delivered.
    pub delivery_mode: DeliveryMode,
    /// The interrupt vector (ignored for NMI/INIT/ExtINT).
    pub vector: u8,
    /// Edge or level.
    pub trigger_mode: TriggerMode,
    /// For level-triggered messages: asserted (true) or deasserted.
    pub level: bool,
}

/// An end-of-interrupt broadcast from a local APIC for a level-triggered vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EoiMessage {
    /// The vector the guest acknowledged.
    pub vector: u8,
}
