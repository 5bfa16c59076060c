//! The I/O-region protocol: a guest MMIO or PIO range served over a stream
//! socket, one transaction per guest access.
//!
//! The VM side ([`Client`], or the VMM's own loop) opens with a [`Hello`]
//! naming the region; the device side ([`device_handshake`]) answers with a
//! [`HelloAck`]. Then the VM side sends
//! [`Request`]s and the device side answers every non-posted one with a
//! [`Reply`] carrying the same tag. Posted writes get no reply; the stream
//! is ordered, so a later non-posted request (a read, a non-posted write or
//! a [`Request::Sync`]) is only answered after every earlier posted write
//! was served.
//!
//! The byte layout of every frame is in `docs/wire-format.md` and on each
//! type below (offsets in the payload, after the 8-byte
//! [header](crate::frame)). All integers are little-endian.

use std::fmt;
use std::io::{Read, Write};

use crate::error::WireError;
use crate::frame::{self, FrameBytes, Protocol, HEADER_LEN};
use crate::handshake::{HelloAck, FRAME_HELLO_ACK, HELLO_ACK_PAYLOAD_LEN};

mod client;
mod hello;
mod in_flight;
mod reply;
mod request;
pub mod state;
#[cfg(test)]
mod tests;

pub use client::{Client, STATE_DEADLINE};
pub use hello::{device_handshake, vm_handshake, Handshake, Hello, RegionInfo};
pub use in_flight::InFlight;
pub use reply::Reply;
pub use request::Request;
pub use state::{LoadStatus, StateAssembly, StateChunk, StateLoad, StateLoaded, StateRequest};

/// Frame type of [`Hello`] (VM side to device side).
pub const FRAME_HELLO: u8 = 1;
/// Frame type of [`Request`] (VM side to device side).
pub const FRAME_REQUEST: u8 = 3;
/// Frame type of [`Reply`] (device side to VM side).
pub const FRAME_REPLY: u8 = 4;
/// Frame type of [`StateRequest`] (VM side to device side; version 2).
pub const FRAME_STATE_REQUEST: u8 = 5;
/// Frame type of [`StateChunk`] (either way; version 2).
pub const FRAME_STATE_CHUNK: u8 = 6;
/// Frame type of [`StateLoad`] (VM side to device side; version 2).
pub const FRAME_STATE_LOAD: u8 = 7;
/// Frame type of [`StateLoaded`] (device side to VM side; version 2).
pub const FRAME_STATE_LOADED: u8 = 8;
/// Payload length of [`Hello`].
pub const HELLO_PAYLOAD_LEN: usize = 32;
/// Payload length of [`Request`].
pub const REQUEST_PAYLOAD_LEN: usize = 24;
/// Payload length of [`Reply`].
pub const REPLY_PAYLOAD_LEN: usize = 16;
/// Payload length of [`StateRequest`].
pub const STATE_REQUEST_PAYLOAD_LEN: usize = 8;
/// Payload length of [`StateChunk`].
pub const STATE_CHUNK_PAYLOAD_LEN: usize = 48;
/// Payload length of [`StateLoad`].
pub const STATE_LOAD_PAYLOAD_LEN: usize = 8;
/// Payload length of [`StateLoaded`].
pub const STATE_LOADED_PAYLOAD_LEN: usize = 8;
/// The largest payload of the protocol (a state chunk's).
pub const MAX_PAYLOAD_LEN: usize = STATE_CHUNK_PAYLOAD_LEN;

/// The payload length of an I/O-region frame type, or `None` if unknown.
pub fn payload_len(frame_type: u8) -> Option<usize> {
    match frame_type {
        FRAME_HELLO => Some(HELLO_PAYLOAD_LEN),
        FRAME_HELLO_ACK => Some(HELLO_ACK_PAYLOAD_LEN),
        FRAME_REQUEST => Some(REQUEST_PAYLOAD_LEN),
        FRAME_REPLY => Some(REPLY_PAYLOAD_LEN),
        FRAME_STATE_REQUEST => Some(STATE_REQUEST_PAYLOAD_LEN),
        FRAME_STATE_CHUNK => Some(STATE_CHUNK_PAYLOAD_LEN),
        FRAME_STATE_LOAD => Some(STATE_LOAD_PAYLOAD_LEN),
        FRAME_STATE_LOADED => Some(STATE_LOADED_PAYLOAD_LEN),
        _ => None,
    }
}

/// A frame type's name, for error messages.
pub fn frame_name(frame_type: u8) -> &'static str {
    match frame_type {
        FRAME_HELLO => "hello",
        FRAME_HELLO_ACK => "hello-ack",
        FRAME_REQUEST => "request",
        FRAME_REPLY => "reply",
        FRAME_STATE_REQUEST => "state request",
        FRAME_STATE_CHUNK => "state chunk",
        FRAME_STATE_LOAD => "state load",
        FRAME_STATE_LOADED => "state loaded",
        _ => "unknown",
    }
}

/// The guest address space a region lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Space {
    /// Guest-physical memory (code 0).
    Mmio,
    /// x86 I/O ports (code 1).
    Pio,
}

impl Space {
    /// The space's code on the wire.
    pub const fn code(self) -> u8 {
        match self {
            Space::Mmio => 0,
            Space::Pio => 1,
        }
    }

    /// The space with code `code`.
    ///
    /// # Errors
    ///
    /// [`WireError::UnknownValue`] for codes other than 0 and 1.
    pub fn from_code(code: u8) -> Result<Space, WireError> {
        match code {
            0 => Ok(Space::Mmio),
            1 => Ok(Space::Pio),
            _ => Err(WireError::UnknownValue { field: "address space", value: code.into() }),
        }
    }
}

impl fmt::Display for Space {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Space::Mmio => "MMIO",
            Space::Pio => "PIO",
        })
    }
}

/// The size of one guest access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AccessSize {
    /// 1 byte.
    Byte,
    /// 2 bytes.
    Word,
    /// 4 bytes.
    Dword,
    /// 8 bytes.
    Qword,
}

impl AccessSize {
    /// All sizes, smallest first.
    pub const ALL: [AccessSize; 4] = [AccessSize::Byte, AccessSize::Word, AccessSize::Dword, AccessSize::Qword];

    /// The size in bytes (also its code on the wire).
    pub const fn bytes(self) -> usize {
        match self {
            AccessSize::Byte => 1,
            AccessSize::Word => 2,
            AccessSize::Dword => 4,
            AccessSize::Qword => 8,
        }
    }

    /// The size of an access of `len` bytes.
    ///
    /// # Errors
    ///
    /// [`WireError::BadAccessSize`] unless `len` is 1, 2, 4 or 8.
    pub fn from_bytes(len: u64) -> Result<AccessSize, WireError> {
        match len {
            1 => Ok(AccessSize::Byte),
            2 => Ok(AccessSize::Word),
            4 => Ok(AccessSize::Dword),
            8 => Ok(AccessSize::Qword),
            size => Err(WireError::BadAccessSize { size }),
        }
    }

    /// The bits of a `u64` an access of this size carries.
    pub const fn mask(self) -> u64 {
        match self {
            AccessSize::Qword => u64::MAX,
            s => (1u64 << (8 * s.bytes())) - 1,
        }
    }
}

impl fmt::Display for AccessSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-byte", self.bytes())
    }
}

/// The operation of a request or reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Read (code 0).
    Read,
    /// Write (code 1).
    Write,
    /// Sync barrier (code 2).
    Sync,
}

impl Op {
    /// The operation's code on the wire.
    pub const fn code(self) -> u8 {
        match self {
            Op::Read => 0,
            Op::Write => 1,
            Op::Sync => 2,
        }
    }

    /// The operation with code `op`.
    ///
    /// # Errors
    ///
    /// [`WireError::UnknownOp`].
    pub fn from_code(op: u8) -> Result<Op, WireError> {
        match op {
            0 => Ok(Op::Read),
            1 => Ok(Op::Write),
            2 => Ok(Op::Sync),
            op => Err(WireError::UnknownOp { op }),
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Sync => "sync",
        })
    }
}

/// Any frame of the I/O-region protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoFrame {
    /// Opens the connection (VM side to device side).
    Hello(Hello),
    /// Answers the hello (device side to VM side).
    HelloAck(HelloAck),
    /// A transaction (VM side to device side).
    Request(Request),
    /// The answer to a non-posted transaction (device side to VM side).
    Reply(Reply),
    /// Asks for the device model's state (VM side to device side).
    StateRequest(StateRequest),
    /// A piece of a state (device side to VM side answering a state
    /// request or carrying a refusal's reason; VM side to device side
    /// after a state load).
    StateChunk(StateChunk),
    /// Gives the device a state to take (VM side to device side).
    StateLoad(StateLoad),
    /// Whether the device took it (device side to VM side).
    StateLoaded(StateLoaded),
}

impl IoFrame {
    /// The frame type's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            IoFrame::Hello(_) => "hello",
            IoFrame::HelloAck(_) => "hello-ack",
            IoFrame::Request(_) => "request",
            IoFrame::Reply(_) => "reply",
            IoFrame::StateRequest(_) => "state request",
            IoFrame::StateChunk(_) => "state chunk",
            IoFrame::StateLoad(_) => "state load",
            IoFrame::StateLoaded(_) => "state loaded",
        }
    }

    /// Encode as one frame.
    pub fn encode(&self) -> FrameBytes {
        match self {
            IoFrame::Hello(h) => FrameBytes::new(&h.encode()),
            IoFrame::HelloAck(a) => FrameBytes::new(&a.encode(Protocol::IoRegion)),
            IoFrame::Request(r) => FrameBytes::new(&r.encode()),
            IoFrame::Reply(r) => FrameBytes::new(&r.encode()),
            IoFrame::StateRequest(r) => FrameBytes::new(&r.encode()),
            IoFrame::StateChunk(c) => FrameBytes::new(&c.encode()),
            IoFrame::StateLoad(l) => FrameBytes::new(&l.encode()),
            IoFrame::StateLoaded(l) => FrameBytes::new(&l.encode()),
        }
    }

    /// Decode exactly one frame of any type.
    ///
    /// # Errors
    ///
    /// Every [`WireError`] a malformed frame can cause; never panics.
    pub fn decode(bytes: &[u8]) -> Result<IoFrame, WireError> {
        let header = frame::check_frame(bytes, Protocol::IoRegion)?;
        let p = &bytes[HEADER_LEN..];
        Ok(match header.frame_type {
            FRAME_HELLO => IoFrame::Hello(Hello::decode_payload(p)?),
            FRAME_HELLO_ACK => IoFrame::HelloAck(HelloAck::decode_payload(p)?),
            FRAME_REQUEST => IoFrame::Request(Request::decode_payload(p)?),
            FRAME_REPLY => IoFrame::Reply(Reply::decode_payload(p)?),
            FRAME_STATE_REQUEST => IoFrame::StateRequest(StateRequest::decode_payload(p)?),
            FRAME_STATE_CHUNK => IoFrame::StateChunk(StateChunk::decode_payload(p)?),
            FRAME_STATE_LOAD => IoFrame::StateLoad(StateLoad::decode_payload(p)?),
            FRAME_STATE_LOADED => IoFrame::StateLoaded(StateLoaded::decode_payload(p)?),
            frame_type => return Err(WireError::UnknownFrameType { protocol: Protocol::IoRegion, frame_type }),
        })
    }
}

/// Read one frame from `r`; `Ok(None)` when the stream ends cleanly between
/// frames. Reads exactly the frame's bytes, never more than
/// [`frame::MAX_FRAME_LEN`].
///
/// # Errors
///
/// [`WireError::Io`], [`WireError::ShortRead`] if the stream ends inside a
/// frame, and every decoding error.
pub fn read_frame(r: &mut impl Read) -> Result<Option<IoFrame>, WireError> {
    match frame::read_raw(r, Protocol::IoRegion)? {
        Some(bytes) => IoFrame::decode(&bytes).map(Some),
        None => Ok(None),
    }
}

/// Write one frame to `w` (no flush).
///
/// # Errors
///
/// [`WireError::Io`].
pub fn write_frame(w: &mut impl Write, frame: &IoFrame) -> Result<(), WireError> {
    frame::write_raw(w, &frame.encode())
}
