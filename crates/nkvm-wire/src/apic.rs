//! The APIC-bus protocol: interrupt messages from the IOAPIC/PIC device
//! models to the local APICs (in KVM), and EOI broadcasts back.
//!
//! The VM side (the local APICs' end, nkvm's `ApicBus`) opens with a
//! [`Hello`] naming the bus; the device side answers with a
//! [`HelloAck`] (see [`vm_handshake`],
//! [`device_handshake`]). Then the device side sends
//! [`InterruptMessage`]s and the VM side sends [`EoiMessage`]s, in any
//! interleaving; neither is answered. Each direction is ordered.
//!
//! Version 2 adds the fast path ([`FRAME_FAST_PATH`], VM side to device
//! side): a message the VM side has seen, with an eventfd attached
//! (`SCM_RIGHTS`) that KVM turns into exactly that message; from then on the
//! device side may deliver that message by writing the eventfd (an 8-byte
//! counter increment) instead of sending it. Only edge-triggered fixed and
//! lowest-priority messages are offered.
//!
//! Every frame starts with the 8-byte [header](crate::frame); the payload
//! layouts are on each type below and in `docs/wire-format.md`. All
//! integers are little-endian.

use std::io::{Read, Write};

use crate::error::WireError;
use crate::frame::{self, get_u32, put, FrameBytes, Protocol, HEADER_LEN};
use crate::handshake::{HelloAck, FRAME_HELLO_ACK, HELLO_ACK_PAYLOAD_LEN};

mod hello;
#[cfg(test)]
mod tests;

pub use hello::{device_handshake, vm_handshake, Handshake, Hello};

/// Frame type of [`Hello`] (VM side to device side).
pub const FRAME_HELLO: u8 = 1;
/// Frame type of [`InterruptMessage`] (device side to VM side).
pub const FRAME_INTERRUPT: u8 = 3;
/// Frame type of [`EoiMessage`] (VM side to device side).
pub const FRAME_EOI: u8 = 4;
/// Frame type of a fast-path offer ([`ApicFrame::FastPath`], VM side to
/// device side, version 2; an eventfd rides with it in `SCM_RIGHTS`).
pub const FRAME_FAST_PATH: u8 = 5;
/// Payload length of [`Hello`].
pub const HELLO_PAYLOAD_LEN: usize = 16;
/// Payload length of [`InterruptMessage`].
pub const INTERRUPT_PAYLOAD_LEN: usize = 16;
/// Payload length of [`EoiMessage`].
pub const EOI_PAYLOAD_LEN: usize = 8;
/// The largest payload of the protocol.
pub const MAX_PAYLOAD_LEN: usize = 16;

/// The payload length of an APIC-bus frame type, or `None` if unknown.
pub fn payload_len(frame_type: u8) -> Option<usize> {
    match frame_type {
        FRAME_HELLO => Some(HELLO_PAYLOAD_LEN),
        FRAME_HELLO_ACK => Some(HELLO_ACK_PAYLOAD_LEN),
        FRAME_INTERRUPT | FRAME_FAST_PATH => Some(INTERRUPT_PAYLOAD_LEN),
        FRAME_EOI => Some(EOI_PAYLOAD_LEN),
        _ => None,
    }
}

/// A frame type's name, for error messages.
pub fn frame_name(frame_type: u8) -> &'static str {
    match frame_type {
        FRAME_HELLO => "hello",
        FRAME_HELLO_ACK => "hello-ack",
        FRAME_INTERRUPT => "interrupt",
        FRAME_EOI => "EOI",
        FRAME_FAST_PATH => "fast path",
        _ => "unknown",
    }
}

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

impl DestinationMode {
    /// The mode's code on the wire (and in the IOAPIC's bit 11).
    pub const fn code(self) -> u8 {
        match self {
            DestinationMode::Physical => 0,
            DestinationMode::Logical => 1,
        }
    }

    /// The mode with code `code`.
    ///
    /// # Errors
    ///
    /// [`WireError::UnknownValue`] for codes other than 0 and 1.
    pub fn from_code(code: u8) -> Result<DestinationMode, WireError> {
        match code {
            0 => Ok(DestinationMode::Physical),
            1 => Ok(DestinationMode::Logical),
            _ => Err(WireError::UnknownValue { field: "destination mode", value: code.into() }),
        }
    }
}

impl DeliveryMode {
    /// All delivery modes.
    pub const ALL: [DeliveryMode; 6] = [
        DeliveryMode::Fixed,
        DeliveryMode::LowestPriority,
        DeliveryMode::Smi,
        DeliveryMode::Nmi,
        DeliveryMode::Init,
        DeliveryMode::ExtInt,
    ];

    /// The mode's code on the wire: the Intel SDM encoding (0 fixed,
    /// 1 lowest priority, 2 SMI, 4 NMI, 5 INIT, 7 ExtINT).
    pub const fn code(self) -> u8 {
        match self {
            DeliveryMode::Fixed => 0,
            DeliveryMode::LowestPriority => 1,
            DeliveryMode::Smi => 2,
            DeliveryMode::Nmi => 4,
            DeliveryMode::Init => 5,
            DeliveryMode::ExtInt => 7,
        }
    }

    /// The mode with code `code`.
    ///
    /// # Errors
    ///
    /// [`WireError::UnknownValue`] for 3, 6 and anything above 7.
    pub fn from_code(code: u8) -> Result<DeliveryMode, WireError> {
        DeliveryMode::ALL
            .into_iter()
            .find(|m| m.code() == code)
            .ok_or(WireError::UnknownValue { field: "delivery mode", value: code.into() })
    }
}

impl TriggerMode {
    /// The mode's code on the wire: 0 edge, 1 level.
    pub const fn code(self) -> u8 {
        match self {
            TriggerMode::Edge => 0,
            TriggerMode::Level => 1,
        }
    }

    /// The mode with code `code`.
    ///
    /// # Errors
    ///
    /// [`WireError::UnknownValue`] for codes other than 0 and 1.
    pub fn from_code(code: u8) -> Result<TriggerMode, WireError> {
        match code {
            0 => Ok(TriggerMode::Edge),
            1 => Ok(TriggerMode::Level),
            _ => Err(WireError::UnknownValue { field: "trigger mode", value: code.into() }),
        }
    }
}

impl InterruptMessage {
    /// Length of the encoded frame.
    pub const FRAME_LEN: usize = HEADER_LEN + INTERRUPT_PAYLOAD_LEN;

    /// Encode as one frame.
    ///
    /// | payload offset | size | field |
    /// |---|---|---|
    /// | 0 | 4 | destination |
    /// | 4 | 1 | destination mode: 0 physical, 1 logical |
    /// | 5 | 1 | delivery mode (SDM encoding) |
    /// | 6 | 1 | vector |
    /// | 7 | 1 | trigger mode: 0 edge, 1 level |
    /// | 8 | 1 | level: 0 deasserted, 1 asserted |
    /// | 9 | 7 | reserved, 0 |
    pub fn encode(&self) -> [u8; Self::FRAME_LEN] {
        self.encode_as(FRAME_INTERRUPT)
    }

    /// Encode as a fast-path offer: the interrupt frame's layout, frame
    /// type [`FRAME_FAST_PATH`] (send it with the eventfd attached).
    pub fn encode_fast_path(&self) -> [u8; Self::FRAME_LEN] {
        self.encode_as(FRAME_FAST_PATH)
    }

    fn encode_as(&self, frame_type: u8) -> [u8; Self::FRAME_LEN] {
        let mut out = frame::frame_with_header(Protocol::ApicBus, frame_type);
        let p = &mut out[HEADER_LEN..];
        put(p, 0, &self.destination.to_le_bytes());
        p[4] = self.destination_mode.code();
        p[5] = self.delivery_mode.code();
        p[6] = self.vector;
        p[7] = self.trigger_mode.code();
        p[8] = self.level.into();
        out
    }

    /// Decode exactly one interrupt frame.
    ///
    /// # Errors
    ///
    /// Any header error, [`WireError::UnexpectedFrame`] for another frame
    /// type, [`WireError::UnknownValue`] for a mode or level,
    /// [`WireError::ReservedNotZero`].
    pub fn decode(bytes: &[u8]) -> Result<InterruptMessage, WireError> {
        let p = frame::payload_of(bytes, Protocol::ApicBus, FRAME_INTERRUPT, "interrupt", frame_name)?;
        Self::decode_payload(p)
    }

    fn decode_payload(p: &[u8]) -> Result<InterruptMessage, WireError> {
        let level = match p[8] {
            0 => false,
            1 => true,
            value => return Err(WireError::UnknownValue { field: "level", value: value.into() }),
        };
        frame::check_reserved(p, 9..16, "interrupt reserved")?;
        Ok(InterruptMessage {
            destination: get_u32(p, 0),
            destination_mode: DestinationMode::from_code(p[4])?,
            delivery_mode: DeliveryMode::from_code(p[5])?,
            vector: p[6],
            trigger_mode: TriggerMode::from_code(p[7])?,
            level,
        })
    }
}

impl EoiMessage {
    /// Length of the encoded frame.
    pub const FRAME_LEN: usize = HEADER_LEN + EOI_PAYLOAD_LEN;

    /// Encode as one frame.
    ///
    /// | payload offset | size | field |
    /// |---|---|---|
    /// | 0 | 1 | vector |
    /// | 1 | 7 | reserved, 0 |
    pub fn encode(&self) -> [u8; Self::FRAME_LEN] {
        let mut out = frame::frame_with_header(Protocol::ApicBus, FRAME_EOI);
        out[HEADER_LEN] = self.vector;
        out
    }

    /// Decode exactly one EOI frame.
    ///
    /// # Errors
    ///
    /// Any header error, [`WireError::UnexpectedFrame`] for another frame
    /// type, [`WireError::ReservedNotZero`].
    pub fn decode(bytes: &[u8]) -> Result<EoiMessage, WireError> {
        let p = frame::payload_of(bytes, Protocol::ApicBus, FRAME_EOI, "EOI", frame_name)?;
        Self::decode_payload(p)
    }

    fn decode_payload(p: &[u8]) -> Result<EoiMessage, WireError> {
        frame::check_reserved(p, 1..8, "EOI reserved")?;
        Ok(EoiMessage { vector: p[0] })
    }
}

/// Any frame of the APIC-bus protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApicFrame {
    /// Opens the connection (VM side to device side).
    Hello(Hello),
    /// Answers the hello (device side to VM side).
    HelloAck(HelloAck),
    /// An interrupt for the local APICs (device side to VM side).
    Interrupt(InterruptMessage),
    /// An EOI broadcast (VM side to device side).
    Eoi(EoiMessage),
    /// A fast path for this message (VM side to device side, version 2):
    /// the eventfd that came with the frame delivers it.
    FastPath(InterruptMessage),
}

impl ApicFrame {
    /// The frame type's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            ApicFrame::Hello(_) => "hello",
            ApicFrame::HelloAck(_) => "hello-ack",
            ApicFrame::Interrupt(_) => "interrupt",
            ApicFrame::Eoi(_) => "EOI",
            ApicFrame::FastPath(_) => "fast path",
        }
    }

    /// Encode as one frame.
    pub fn encode(&self) -> FrameBytes {
        match self {
            ApicFrame::Hello(h) => FrameBytes::new(&h.encode()),
            ApicFrame::HelloAck(a) => FrameBytes::new(&a.encode(Protocol::ApicBus)),
            ApicFrame::Interrupt(m) => FrameBytes::new(&m.encode()),
            ApicFrame::Eoi(m) => FrameBytes::new(&m.encode()),
            ApicFrame::FastPath(m) => FrameBytes::new(&m.encode_fast_path()),
        }
    }

    /// Decode exactly one frame of any type.
    ///
    /// # Errors
    ///
    /// Every [`WireError`] a malformed frame can cause; never panics.
    pub fn decode(bytes: &[u8]) -> Result<ApicFrame, WireError> {
        let header = frame::check_frame(bytes, Protocol::ApicBus)?;
        let p = &bytes[HEADER_LEN..];
        Ok(match header.frame_type {
            FRAME_HELLO => ApicFrame::Hello(Hello::decode_payload(p)?),
            FRAME_HELLO_ACK => ApicFrame::HelloAck(HelloAck::decode_payload(p)?),
            FRAME_INTERRUPT => ApicFrame::Interrupt(InterruptMessage::decode_payload(p)?),
            FRAME_EOI => ApicFrame::Eoi(EoiMessage::decode_payload(p)?),
            FRAME_FAST_PATH => ApicFrame::FastPath(InterruptMessage::decode_payload(p)?),
            frame_type => return Err(WireError::UnknownFrameType { protocol: Protocol::ApicBus, frame_type }),
        })
    }
}

/// Read one frame from `r`; `Ok(None)` when the stream ends cleanly between
/// frames. Reads exactly the frame's bytes.
///
/// # Errors
///
/// [`WireError::Io`], [`WireError::ShortRead`] if the stream ends inside a
/// frame, and every decoding error.
pub fn read_frame(r: &mut impl Read) -> Result<Option<ApicFrame>, WireError> {
    match frame::read_raw(r, Protocol::ApicBus)? {
        Some(bytes) => ApicFrame::decode(&bytes).map(Some),
        None => Ok(None),
    }
}

/// Write one frame to `w` (no flush).
///
/// # Errors
///
/// [`WireError::Io`].
pub fn write_frame(w: &mut impl Write, frame: &ApicFrame) -> Result<(), WireError> {
    frame::write_raw(w, &frame.encode())
}
