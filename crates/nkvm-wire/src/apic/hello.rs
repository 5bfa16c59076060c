//! The APIC-bus handshake: the VM side names the bus and the versions it
//! speaks, the device side picks a version and echoes the bus id.

use std::io::{Read, Write};

use super::{frame_name, read_frame, write_frame, ApicFrame, FRAME_HELLO, HELLO_PAYLOAD_LEN};
use crate::error::WireError;
use crate::frame::{self, get_u16, get_u64, put, Protocol, HEADER_LEN};
use crate::handshake::{HelloAck, VersionRange};

/// The VM side's opening frame on an APIC-bus socket.
///
/// | payload offset | size | field |
/// |---|---|---|
/// | 0 | 2 | oldest version spoken |
/// | 2 | 2 | newest version spoken |
/// | 4 | 4 | reserved, 0 |
/// | 8 | 8 | bus id |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Hello {
    /// The versions the VM side speaks.
    pub versions: VersionRange,
    /// An id the VMM chose for the bus, echoed in the acknowledgement.
    pub bus_id: u64,
}

impl Hello {
    /// Length of the encoded frame.
    pub const FRAME_LEN: usize = HEADER_LEN + HELLO_PAYLOAD_LEN;

    /// Encode as one frame.
    pub fn encode(&self) -> [u8; Self::FRAME_LEN] {
        let mut out = frame::frame_with_header(Protocol::ApicBus, FRAME_HELLO);
        let p = &mut out[HEADER_LEN..];
        put(p, 0, &self.versions.min.to_le_bytes());
        put(p, 2, &self.versions.max.to_le_bytes());
        put(p, 8, &self.bus_id.to_le_bytes());
        out
    }

    /// Decode exactly one hello frame.
    ///
    /// # Errors
    ///
    /// Any header error, [`WireError::UnexpectedFrame`] for another frame
    /// type, [`WireError::ReservedNotZero`].
    pub fn decode(bytes: &[u8]) -> Result<Hello, WireError> {
        let p = frame::payload_of(bytes, Protocol::ApicBus, FRAME_HELLO, "hello", frame_name)?;
        Self::decode_payload(p)
    }

    pub(super) fn decode_payload(p: &[u8]) -> Result<Hello, WireError> {
        frame::check_reserved(p, 4..8, "hello reserved")?;
        Ok(Hello { versions: VersionRange { min: get_u16(p, 0), max: get_u16(p, 2) }, bus_id: get_u64(p, 8) })
    }
}

/// What a completed APIC-bus handshake agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Handshake {
    /// The protocol version both ends speak from now on.
    pub version: u16,
    /// The bus id from the hello.
    pub bus_id: u64,
}

/// The VM side of the handshake: send a hello for `bus_id` offering
/// `offered`, wait for the acknowledgement.
///
/// # Errors
///
/// [`WireError::BadVersionRange`] before anything is sent;
/// [`WireError::ShortRead`] if the device side closes;
/// [`WireError::UnexpectedFrame`] for any answer but a hello-ack; the errors
/// of [`HelloAck::check`]; any I/O or decoding error.
pub fn vm_handshake(
    r: &mut impl Read,
    w: &mut impl Write,
    bus_id: u64,
    offered: VersionRange,
) -> Result<Handshake, WireError> {
    offered.validate()?;
    let hello = Hello { versions: offered, bus_id };
    write_frame(w, &ApicFrame::Hello(hello))?;
    w.flush()?;
    let ack = match read_frame(r)? {
        Some(ApicFrame::HelloAck(ack)) => ack,
        Some(other) => return Err(WireError::UnexpectedFrame { expected: "hello-ack", found: other.name() }),
        None => return Err(WireError::ShortRead { got: 0, expected: HelloAck::FRAME_LEN }),
    };
    let version = ack.check(offered, bus_id)?;
    Ok(Handshake { version, bus_id })
}

/// The device side of the handshake: wait for the hello, answer with the
/// newest version both ends speak (from `supported`). A refusal is sent
/// before the error is returned.
///
/// # Errors
///
/// [`WireError::ShortRead`] if the VM side closes first;
/// [`WireError::UnexpectedFrame`] if the first frame is not a hello;
/// [`WireError::BadVersionRange`] (no hello-ack sent);
/// [`WireError::NoCommonVersion`]; any I/O or decoding error.
pub fn device_handshake(
    r: &mut impl Read,
    w: &mut impl Write,
    supported: VersionRange,
) -> Result<Handshake, WireError> {
    let hello = match read_frame(r)? {
        Some(ApicFrame::Hello(hello)) => hello,
        Some(other) => return Err(WireError::UnexpectedFrame { expected: "hello", found: other.name() }),
        None => return Err(WireError::ShortRead { got: 0, expected: Hello::FRAME_LEN }),
    };
    hello.versions.validate()?;
    let ack = HelloAck::answer(supported, hello.versions, hello.bus_id);
    write_frame(w, &ApicFrame::HelloAck(ack))?;
    w.flush()?;
    if ack.version == 0 {
        return Err(WireError::NoCommonVersion { ours: supported, theirs: hello.versions });
    }
    Ok(Handshake { version: ack.version, bus_id: hello.bus_id })
}
