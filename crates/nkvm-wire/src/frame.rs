//! The frame header every message on every nkvm socket starts with, and the
//! reader and writer that move whole frames through a byte stream.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 2 | magic, the ASCII bytes `"NK"` ([`MAGIC`]) |
//! | 2 | 1 | protocol ([`Protocol`]) |
//! | 3 | 1 | frame type (defined by the protocol) |
//! | 4 | 4 | payload length in bytes, little-endian |
//!
//! Every frame type has one fixed payload length, so a receiver knows how
//! many bytes to expect before it reads any of them: a header announcing
//! more than the protocol's largest payload is rejected as
//! [`WireError::OversizedFrame`] and never read.

use std::fmt;
use std::io::{ErrorKind, Read, Write};

use crate::error::WireError;
use crate::{apic, ioregion};

/// The first two bytes of every frame: `"NK"`.
pub const MAGIC: [u8; 2] = *b"NK";
/// Size of the frame header in bytes.
pub const HEADER_LEN: usize = 8;
/// Size of the largest frame of any protocol (an I/O-region state chunk).
pub const MAX_FRAME_LEN: usize = 56;

/// Which protocol a socket speaks; every frame names it in its header, so a
/// socket plugged into the wrong endpoint fails on its first frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// I/O-region transactions ([`crate::ioregion`]), code 1.
    IoRegion,
    /// APIC-bus messages ([`crate::apic`]), code 2.
    ApicBus,
}

impl Protocol {
    /// The protocol's code in the frame header.
    pub const fn code(self) -> u8 {
        match self {
            Protocol::IoRegion => 1,
            Protocol::ApicBus => 2,
        }
    }

    /// The largest payload any frame of this protocol carries.
    pub const fn max_payload_len(self) -> usize {
        match self {
            Protocol::IoRegion => ioregion::MAX_PAYLOAD_LEN,
            Protocol::ApicBus => apic::MAX_PAYLOAD_LEN,
        }
    }

    /// The payload length of `frame_type`, or `None` if the protocol has no
    /// such frame.
    pub fn payload_len(self, frame_type: u8) -> Option<usize> {
        match self {
            Protocol::IoRegion => ioregion::payload_len(frame_type),
            Protocol::ApicBus => apic::payload_len(frame_type),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::IoRegion => write!(f, "I/O-region protocol"),
            Protocol::ApicBus => write!(f, "APIC-bus protocol"),
        }
    }
}

/// A validated frame header: known magic, the expected protocol, a known
/// frame type and exactly that type's payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    /// The protocol the frame belongs to.
    pub protocol: Protocol,
    /// The frame type, meaningful within `protocol`.
    pub frame_type: u8,
    /// Number of payload bytes following the header.
    pub payload_len: usize,
}

impl Header {
    /// The header's 8 bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..2].copy_from_slice(&MAGIC);
        out[2] = self.protocol.code();
        out[3] = self.frame_type;
        // Payload lengths are at most MAX_FRAME_LEN, far below u32::MAX.
        out[4..8].copy_from_slice(&(self.payload_len as u32).to_le_bytes());
        out
    }

    /// Parse and validate the header at the start of `bytes`, for a socket
    /// speaking `protocol`.
    ///
    /// # Errors
    ///
    /// In the order checked: [`WireError::ShortRead`] (fewer than 8 bytes),
    /// [`WireError::BadMagic`], [`WireError::WrongProtocol`],
    /// [`WireError::OversizedFrame`], [`WireError::UnknownFrameType`],
    /// [`WireError::BadFrameLength`].
    pub fn decode(bytes: &[u8], protocol: Protocol) -> Result<Header, WireError> {
        let Some(h) = bytes.get(..HEADER_LEN) else {
            return Err(WireError::ShortRead { got: bytes.len(), expected: HEADER_LEN });
        };
        if h[0..2] != MAGIC {
            return Err(WireError::BadMagic { found: [h[0], h[1]] });
        }
        if h[2] != protocol.code() {
            return Err(WireError::WrongProtocol { found: h[2], expected: protocol });
        }
        let frame_type = h[3];
        let len = get_u32(h, 4);
        if len as usize > protocol.max_payload_len() {
            return Err(WireError::OversizedFrame { protocol, len });
        }
        let expected = protocol.payload_len(frame_type).ok_or(WireError::UnknownFrameType { protocol, frame_type })?;
        if len as usize != expected {
            return Err(WireError::BadFrameLength { protocol, frame_type, len, expected });
        }
        Ok(Header { protocol, frame_type, payload_len: expected })
    }

    /// Length of the whole frame: header plus payload.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len
    }
}

/// The bytes of one encoded frame of any type (at most [`MAX_FRAME_LEN`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FrameBytes {
    buf: [u8; MAX_FRAME_LEN],
    len: usize,
}

impl FrameBytes {
    /// Copy an encoded frame; `bytes` must be at most [`MAX_FRAME_LEN`] long
    /// (always true of this crate's encoders).
    pub(crate) fn new(bytes: &[u8]) -> FrameBytes {
        let len = bytes.len().min(MAX_FRAME_LEN);
        let mut buf = [0u8; MAX_FRAME_LEN];
        buf[..len].copy_from_slice(&bytes[..len]);
        FrameBytes { buf, len }
    }

    /// The frame's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl std::ops::Deref for FrameBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl fmt::Debug for FrameBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FrameBytes({:02x?})", self.as_bytes())
    }
}

/// Read one whole frame of `protocol` from `r` into a fixed buffer.
///
/// Returns `Ok(None)` if the stream ends cleanly before the first byte of a
/// frame. Never reads past the end of the frame and never reads more than
/// [`MAX_FRAME_LEN`] bytes.
pub(crate) fn read_raw(r: &mut impl Read, protocol: Protocol) -> Result<Option<FrameBytes>, WireError> {
    let mut buf = [0u8; MAX_FRAME_LEN];
    let got = fill(r, &mut buf[..HEADER_LEN])?;
    if got == 0 {
        return Ok(None);
    }
    if got < HEADER_LEN {
        return Err(WireError::ShortRead { got, expected: HEADER_LEN });
    }
    let header = Header::decode(&buf[..HEADER_LEN], protocol)?;
    let total = header.frame_len();
    let got = fill(r, &mut buf[HEADER_LEN..total])?;
    if HEADER_LEN + got < total {
        return Err(WireError::ShortRead { got: HEADER_LEN + got, expected: total });
    }
    Ok(Some(FrameBytes { buf, len: total }))
}

/// Write one encoded frame.
pub(crate) fn write_raw(w: &mut impl Write, frame: &[u8]) -> Result<(), WireError> {
    w.write_all(frame).map_err(WireError::Io)
}

/// Read until `buf` is full or the stream ends; returns the bytes read.
fn fill(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, WireError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(WireError::Io(e)),
        }
    }
    Ok(got)
}

/// Check that `bytes` is exactly one frame of `protocol` and return its
/// validated header.
pub(crate) fn check_frame(bytes: &[u8], protocol: Protocol) -> Result<Header, WireError> {
    let header = Header::decode(bytes, protocol)?;
    let expected = header.frame_len();
    if bytes.len() < expected {
        return Err(WireError::ShortRead { got: bytes.len(), expected });
    }
    if bytes.len() > expected {
        return Err(WireError::TrailingBytes { len: bytes.len(), expected });
    }
    Ok(header)
}

/// Check that `bytes` is exactly one frame of `protocol` and type
/// `frame_type` (named `name` in errors); return its payload.
pub(crate) fn payload_of<'a>(
    bytes: &'a [u8],
    protocol: Protocol,
    frame_type: u8,
    name: &'static str,
    type_name: fn(u8) -> &'static str,
) -> Result<&'a [u8], WireError> {
    let header = check_frame(bytes, protocol)?;
    if header.frame_type != frame_type {
        return Err(WireError::UnexpectedFrame { expected: name, found: type_name(header.frame_type) });
    }
    Ok(&bytes[HEADER_LEN..])
}

/// Start an encoded frame: a buffer of `N` bytes with the header filled in.
pub(crate) fn frame_with_header<const N: usize>(protocol: Protocol, frame_type: u8) -> [u8; N] {
    let mut out = [0u8; N];
    let header = Header { protocol, frame_type, payload_len: N - HEADER_LEN };
    out[..HEADER_LEN].copy_from_slice(&header.encode());
    out
}

/// Little-endian `u16` at `at`; `p` must hold it (payloads are length-checked).
pub(crate) fn get_u16(p: &[u8], at: usize) -> u16 {
    let mut b = [0u8; 2];
    b.copy_from_slice(&p[at..at + 2]);
    u16::from_le_bytes(b)
}

/// Little-endian `u32` at `at`.
pub(crate) fn get_u32(p: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&p[at..at + 4]);
    u32::from_le_bytes(b)
}

/// Little-endian `u64` at `at`.
pub(crate) fn get_u64(p: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&p[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Store `bytes` (a `to_le_bytes()` result) at `at`.
pub(crate) fn put(p: &mut [u8], at: usize, bytes: &[u8]) {
    p[at..at + bytes.len()].copy_from_slice(bytes);
}

/// Fail with [`WireError::ReservedNotZero`] unless `p[range]` (at most 8
/// bytes) is all zero.
pub(crate) fn check_reserved(p: &[u8], range: std::ops::Range<usize>, field: &'static str) -> Result<(), WireError> {
    let mut b = [0u8; 8];
    let n = range.len().min(8);
    b[..n].copy_from_slice(&p[range.start..range.start + n]);
    let value = u64::from_le_bytes(b);
    if value != 0 {
        return Err(WireError::ReservedNotZero { field, value });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(protocol: u8, frame_type: u8, len: u32) -> Vec<u8> {
        let mut h = b"NK".to_vec();
        h.push(protocol);
        h.push(frame_type);
        h.extend_from_slice(&len.to_le_bytes());
        h
    }

    #[test]
    fn header_round_trips() {
        let h = Header { protocol: Protocol::IoRegion, frame_type: ioregion::FRAME_REQUEST, payload_len: 24 };
        assert_eq!(Header::decode(&h.encode(), Protocol::IoRegion).unwrap(), h);
    }

    #[test]
    fn bad_magic_is_named() {
        let err = Header::decode(b"XY\x01\x03\x18\0\0\0", Protocol::IoRegion).unwrap_err();
        assert!(matches!(err, WireError::BadMagic { found } if found == *b"XY"));
        assert!(err.to_string().contains("58 59"), "{err}");
    }

    #[test]
    fn wrong_protocol_is_rejected() {
        let err = Header::decode(&header(2, 3, 24), Protocol::IoRegion).unwrap_err();
        assert!(matches!(err, WireError::WrongProtocol { found: 2, .. }));
    }

    #[test]
    fn oversized_frame_is_rejected_before_reading_it() {
        let mut stream = header(1, 3, 0x7fff_ffff);
        stream.extend_from_slice(&[0u8; 64]);
        let mut r = &stream[..];
        let err = read_raw(&mut r, Protocol::IoRegion).unwrap_err();
        assert!(matches!(err, WireError::OversizedFrame { len: 0x7fff_ffff, .. }));
        assert_eq!(r.len(), 64, "the payload must not be consumed");
    }

    #[test]
    fn unknown_frame_type_is_rejected() {
        let err = Header::decode(&header(1, 0x77, 8), Protocol::IoRegion).unwrap_err();
        assert!(matches!(err, WireError::UnknownFrameType { frame_type: 0x77, .. }));
    }

    #[test]
    fn wrong_length_for_type_is_rejected() {
        let err = Header::decode(&header(1, 3, 16), Protocol::IoRegion).unwrap_err();
        assert!(matches!(err, WireError::BadFrameLength { len: 16, expected: 24, .. }));
    }

    #[test]
    fn clean_end_of_stream_is_none() {
        let mut r: &[u8] = &[];
        assert!(read_raw(&mut r, Protocol::ApicBus).unwrap().is_none());
    }

    #[test]
    fn short_header_and_short_payload_are_short_reads() {
        let mut r: &[u8] = b"NK\x01";
        let err = read_raw(&mut r, Protocol::IoRegion).unwrap_err();
        assert!(matches!(err, WireError::ShortRead { got: 3, expected: 8 }));

        let mut stream = header(1, 3, 24);
        stream.extend_from_slice(&[0u8; 10]);
        let err = read_raw(&mut &stream[..], Protocol::IoRegion).unwrap_err();
        assert!(matches!(err, WireError::ShortRead { got: 18, expected: 32 }));
    }

    #[test]
    fn check_frame_rejects_trailing_bytes() {
        let mut bytes = header(2, apic::FRAME_EOI, 8);
        bytes.extend_from_slice(&[0u8; 9]);
        let err = check_frame(&bytes, Protocol::ApicBus).unwrap_err();
        assert!(matches!(err, WireError::TrailingBytes { len: 17, expected: 16 }));
    }
}
