//! The I/O-region handshake: the VM side names the region and the versions
//! it speaks, the device side picks a version and echoes the region's id.

use std::io::{Read, Write};

use super::{frame_name, read_frame, write_frame, IoFrame, Space, FRAME_HELLO, HELLO_PAYLOAD_LEN};
use crate::error::WireError;
use crate::frame::{self, get_u16, get_u64, put, Protocol, HEADER_LEN};
use crate::handshake::{HelloAck, VersionRange};

/// The identity of a region: which one, where the guest sees it, how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RegionInfo {
    /// An id the VMM chose for the region, echoed by the device side so
    /// that a socket plugged into the wrong device fails the handshake.
    pub id: u64,
    /// The address space.
    pub space: Space,
    /// Guest address (or port) of the region's first byte.
    pub base: u64,
    /// Length in bytes; request offsets are relative to `base` and below it.
    pub len: u64,
}

impl RegionInfo {
    /// Check that the region is not empty and fits its address space
    /// (ports end at 0xffff).
    ///
    /// # Errors
    ///
    /// [`WireError::BadRegion`].
    pub fn validate(&self) -> Result<(), WireError> {
        let last = self.len.checked_sub(1).and_then(|extra| self.base.checked_add(extra));
        let fits = match (last, self.space) {
            (None, _) => false,
            (Some(last), Space::Pio) => last <= 0xffff,
            (Some(_), Space::Mmio) => true,
        };
        if !fits {
            return Err(WireError::BadRegion { space: self.space, base: self.base, len: self.len });
        }
        Ok(())
    }
}

/// The VM side's opening frame.
///
/// | payload offset | size | field |
/// |---|---|---|
/// | 0 | 2 | oldest version spoken |
/// | 2 | 2 | newest version spoken |
/// | 4 | 1 | space: 0 MMIO, 1 PIO |
/// | 5 | 3 | reserved, 0 |
/// | 8 | 8 | region id |
/// | 16 | 8 | region base |
/// | 24 | 8 | region length |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Hello {
    /// The versions the VM side speaks.
    pub versions: VersionRange,
    /// The region served on this socket.
    pub region: RegionInfo,
}

impl Hello {
    /// Length of the encoded frame.
    pub const FRAME_LEN: usize = HEADER_LEN + HELLO_PAYLOAD_LEN;

    /// Encode as one frame.
    pub fn encode(&self) -> [u8; Self::FRAME_LEN] {
        let mut out = frame::frame_with_header(Protocol::IoRegion, FRAME_HELLO);
        let p = &mut out[HEADER_LEN..];
        put(p, 0, &self.versions.min.to_le_bytes());
        put(p, 2, &self.versions.max.to_le_bytes());
        p[4] = self.region.space.code();
        put(p, 8, &self.region.id.to_le_bytes());
        put(p, 16, &self.region.base.to_le_bytes());
        put(p, 24, &self.region.len.to_le_bytes());
        out
    }

    /// Decode exactly one hello frame. The region and the version range
    /// are checked by [`device_handshake`], not here.
    ///
    /// # Errors
    ///
    /// Any header error, [`WireError::UnexpectedFrame`] for another frame
    /// type, [`WireError::UnknownValue`] for the space,
    /// [`WireError::ReservedNotZero`].
    pub fn decode(bytes: &[u8]) -> Result<Hello, WireError> {
        let p = frame::payload_of(bytes, Protocol::IoRegion, FRAME_HELLO, "hello", frame_name)?;
        Self::decode_payload(p)
    }

    pub(super) fn decode_payload(p: &[u8]) -> Result<Hello, WireError> {
        let space = Space::from_code(p[4])?;
        frame::check_reserved(p, 5..8, "hello reserved")?;
        Ok(Hello {
            versions: VersionRange { min: get_u16(p, 0), max: get_u16(p, 2) },
            region: RegionInfo { id: get_u64(p, 8), space, base: get_u64(p, 16), len: get_u64(p, 24) },
        })
    }
}

/// What a completed handshake agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Handshake {
    /// The protocol version both ends speak from now on.
    pub version: u16,
    /// The region served on the socket.
    pub region: RegionInfo,
}

/// The VM side of the handshake: send a hello for `region` offering
/// `offered`, wait for the acknowledgement.
///
/// # Errors
///
/// [`WireError::BadRegion`] or [`WireError::BadVersionRange`] before
/// anything is sent; [`WireError::ShortRead`] if the device side closes the
/// connection; [`WireError::UnexpectedFrame`] if it answers with anything
/// but a hello-ack; the errors of [`HelloAck::check`]; any I/O or decoding
/// error.
pub fn vm_handshake(
    r: &mut impl Read,
    w: &mut impl Write,
    region: RegionInfo,
    offered: VersionRange,
) -> Result<Handshake, WireError> {
    region.validate()?;
    offered.validate()?;
    let hello = Hello { versions: offered, region };
    write_frame(w, &IoFrame::Hello(hello))?;
    w.flush()?;
    let ack = match read_frame(r)? {
        Some(IoFrame::HelloAck(ack)) => ack,
        Some(other) => return Err(WireError::UnexpectedFrame { expected: "hello-ack", found: other.name() }),
        None => return Err(WireError::ShortRead { got: 0, expected: HelloAck::FRAME_LEN }),
    };
    let version = ack.check(offered, region.id)?;
    Ok(Handshake { version, region })
}

/// The device side of the handshake: wait for the hello, check its region,
/// answer with the newest version both ends speak (from `supported`).
///
/// On a version mismatch the refusal (version 0 and `supported`) is still
/// sent, so the VM side can report it, and then the error is returned.
///
/// # Errors
///
/// [`WireError::ShortRead`] if the VM side closes first;
/// [`WireError::UnexpectedFrame`] if the first frame is not a hello;
/// [`WireError::BadRegion`]; [`WireError::BadVersionRange`] (no hello-ack
/// sent); [`WireError::NoCommonVersion`]; any I/O or decoding error.
pub fn device_handshake(
    r: &mut impl Read,
    w: &mut impl Write,
    supported: VersionRange,
) -> Result<Handshake, WireError> {
    let hello = match read_frame(r)? {
        Some(IoFrame::Hello(hello)) => hello,
        Some(other) => return Err(WireError::UnexpectedFrame { expected: "hello", found: other.name() }),
        None => return Err(WireError::ShortRead { got: 0, expected: Hello::FRAME_LEN }),
    };
    hello.region.validate()?;
    hello.versions.validate()?;
    let ack = HelloAck::answer(supported, hello.versions, hello.region.id);
    write_frame(w, &IoFrame::HelloAck(ack))?;
    w.flush()?;
    if ack.version == 0 {
        return Err(WireError::NoCommonVersion { ours: supported, theirs: hello.versions });
    }
    Ok(Handshake { version: ack.version, region: hello.region })
}
