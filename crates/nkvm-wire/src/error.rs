//! [`WireError`]: everything that can be wrong with bytes on an nkvm socket.
//!
//! Every variant is fatal to the connection it came from: the receiver logs
//! the error (its message names the offending value) and drops the
//! connection. Nothing here is ever a panic.

use std::{fmt, io};

use crate::frame::Protocol;
use crate::handshake::VersionRange;
use crate::ioregion::{AccessSize, Op, Space};

/// Why a frame or a stream of frames was rejected.
#[derive(Debug)]
pub enum WireError {
    /// Reading from or writing to the socket failed.
    Io(io::Error),
    /// The stream (or slice) ended inside a frame.
    ShortRead {
        /// Bytes of the frame received.
        got: usize,
        /// Bytes the frame needs.
        expected: usize,
    },
    /// A slice handed to `decode` holds more than one frame.
    TrailingBytes {
        /// Length of the slice.
        len: usize,
        /// Length of the frame.
        expected: usize,
    },
    /// The frame does not start with `"NK"`: the stream is out of step or
    /// not an nkvm socket.
    BadMagic {
        /// The two bytes found instead.
        found: [u8; 2],
    },
    /// The frame belongs to another protocol than the socket's.
    WrongProtocol {
        /// The protocol code found.
        found: u8,
        /// The protocol the socket speaks.
        expected: Protocol,
    },
    /// The header announces a payload longer than any frame of the protocol.
    OversizedFrame {
        /// The socket's protocol.
        protocol: Protocol,
        /// The announced payload length.
        len: u32,
    },
    /// The protocol has no frame of this type.
    UnknownFrameType {
        /// The socket's protocol.
        protocol: Protocol,
        /// The frame type found.
        frame_type: u8,
    },
    /// The payload length does not match the frame type's fixed length.
    BadFrameLength {
        /// The socket's protocol.
        protocol: Protocol,
        /// The frame type.
        frame_type: u8,
        /// The announced payload length.
        len: u32,
        /// The frame type's payload length.
        expected: usize,
    },
    /// A valid frame arrived where another was required (a request before
    /// the handshake, a reply sent to the device side, ...).
    UnexpectedFrame {
        /// What the receiver was waiting for.
        expected: &'static str,
        /// What arrived.
        found: &'static str,
    },
    /// An I/O-region request or reply with an operation code other than
    /// read (0), write (1) or sync (2).
    UnknownOp {
        /// The operation code found.
        op: u8,
    },
    /// An access size other than 1, 2, 4 or 8 bytes.
    BadAccessSize {
        /// The size found.
        size: u64,
    },
    /// An enumerated field holds a value with no meaning.
    UnknownValue {
        /// The field.
        field: &'static str,
        /// The value found.
        value: u64,
    },
    /// A reserved field is not zero.
    ReservedNotZero {
        /// The field.
        field: &'static str,
        /// The value found.
        value: u64,
    },
    /// The data of an access has bits set beyond its size.
    DataTooWide {
        /// The data found.
        data: u64,
        /// The access size.
        size: AccessSize,
    },
    /// The posted flag is set on a read or a sync; only writes can be posted.
    PostedNonWrite {
        /// The operation carrying the flag.
        op: Op,
    },
    /// An access reaches outside the region.
    OutsideRegion {
        /// Offset of the access in the region.
        offset: u64,
        /// Size of the access.
        size: AccessSize,
        /// Length of the region.
        region_len: u64,
    },
    /// A request names another address space than the region's.
    SpaceMismatch {
        /// The region's space.
        region: Space,
        /// The request's space.
        request: Space,
    },
    /// A region is empty, wraps past the end of its address space, or (PIO)
    /// reaches past port 0xffff.
    BadRegion {
        /// The region's space.
        space: Space,
        /// First address of the region.
        base: u64,
        /// Length of the region.
        len: u64,
    },
    /// A version range is empty or includes the nonexistent version 0.
    BadVersionRange {
        /// Oldest version of the range.
        min: u16,
        /// Newest version of the range.
        max: u16,
    },
    /// The two ends share no protocol version.
    NoCommonVersion {
        /// Versions this end speaks.
        ours: VersionRange,
        /// Versions the peer speaks.
        theirs: VersionRange,
    },
    /// The device side chose a version the VM side did not offer.
    VersionNotOffered {
        /// The version chosen.
        version: u16,
        /// The versions offered.
        offered: VersionRange,
    },
    /// The device side acknowledged another region or bus than the one the
    /// VM side named.
    IdMismatch {
        /// The id sent in the hello.
        sent: u64,
        /// The id echoed back.
        got: u64,
    },
    /// A reply for a tag with no request in flight (never sent, posted, or
    /// already answered).
    UnknownTag {
        /// The tag of the reply.
        tag: u32,
    },
    /// A state chunk that belongs to another request than the one whose
    /// answer (or state to load) is being read.
    WrongChunkTag {
        /// The tag being read.
        expected: u32,
        /// The chunk's tag.
        got: u32,
    },
    /// The VM side tried to send a request with a tag already in flight.
    DuplicateTag {
        /// The tag.
        tag: u32,
    },
    /// A reply's operation differs from its request's.
    ReplyMismatch {
        /// The tag of both.
        tag: u32,
        /// The request's operation.
        request: Op,
        /// The reply's operation.
        reply: Op,
    },
    /// A state chunk out of place or malformed.
    BadStateChunk {
        /// The chunk's offset.
        offset: u32,
        /// The chunk's length.
        len: u16,
        /// The total it announces.
        total: u32,
        /// What is wrong.
        reason: &'static str,
    },
    /// The device announced a state larger than the VM side takes.
    StateTooLarge {
        /// The announced length.
        total: u32,
    },
    /// The device's state did not arrive within the deadline
    /// ([`STATE_DEADLINE`](crate::ioregion::STATE_DEADLINE)).
    StateTooSlow {
        /// Bytes received by then.
        received: usize,
        /// The length the device announced.
        total: u32,
        /// The deadline.
        limit: std::time::Duration,
    },
    /// The device's model has no saved state.
    NoDeviceState,
    /// The device's model refused the state it was given.
    StateRefused {
        /// The model's reason.
        reason: String,
    },
    /// State transfer was asked of a connection whose version lacks it.
    StateNotInVersion {
        /// The version the two ends agreed on.
        version: u16,
    },
    /// A read reply's size differs from its request's.
    ReplySizeMismatch {
        /// The tag of both.
        tag: u32,
        /// The size requested.
        request: AccessSize,
        /// The size replied.
        reply: AccessSize,
    },
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use WireError::*;
        match self {
            Io(e) => match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    write!(f, "the peer did not answer within the socket's timeout")
                }
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof => {
                    write!(f, "the peer closed the connection ({})", e.kind())
                }
                kind => write!(f, "socket I/O failed ({kind})"),
            },
            ShortRead { got, expected } => {
                write!(f, "short read: the stream ended after {got} of the {expected} bytes of a frame")
            }
            TrailingBytes { len, expected } => {
                write!(f, "{len} bytes given where one frame of {expected} bytes was expected")
            }
            BadMagic { found } => {
                write!(f, "frame starts with bytes {:02x} {:02x}, not the magic \"NK\" (4e 4b)", found[0], found[1])
            }
            WrongProtocol { found, expected } => {
                write!(f, "frame for protocol {found} on a socket speaking the {expected} (code {})", expected.code())
            }
            OversizedFrame { protocol, len } => write!(
                f,
                "oversized frame: payload of {len} bytes announced, the {protocol} allows at most {}",
                protocol.max_payload_len()
            ),
            UnknownFrameType { protocol, frame_type } => write!(f, "unknown frame type {frame_type} in the {protocol}"),
            BadFrameLength { protocol, frame_type, len, expected } => {
                write!(f, "frame type {frame_type} of the {protocol} has a {expected}-byte payload, not {len}")
            }
            UnexpectedFrame { expected, found } => {
                write!(f, "unexpected {found} frame where a {expected} frame was due")
            }
            UnknownOp { op } => write!(f, "unknown op {op}: not read (0), write (1) or sync (2)"),
            BadAccessSize { size } => write!(f, "access size {size} is not 1, 2, 4 or 8"),
            UnknownValue { field, value } => write!(f, "{field} {value:#x} is not a known value"),
            ReservedNotZero { field, value } => {
                write!(f, "{field} is {value:#x}; reserved bytes must be 0")
            }
            DataTooWide { data, size } => {
                write!(f, "data {data:#x} does not fit in a {size} access")
            }
            PostedNonWrite { op } => write!(f, "a {op} cannot be posted; only writes can"),
            OutsideRegion { offset, size, region_len } => {
                write!(f, "{size} access at offset {offset:#x} is outside the {region_len:#x}-byte region")
            }
            SpaceMismatch { region, request } => {
                write!(f, "{request} request on a {region} region")
            }
            BadRegion { space, base, len } => {
                write!(f, "{space} region {base:#x}+{len:#x} is empty or runs past the end of its address space")
            }
            BadVersionRange { min, max } => {
                write!(f, "version range {min}..={max} is empty or includes 0")
            }
            NoCommonVersion { ours, theirs } => {
                write!(f, "no common protocol version: this end speaks {ours}, the peer {theirs}")
            }
            VersionNotOffered { version, offered } => {
                write!(f, "the device side chose version {version}, which was not offered ({offered})")
            }
            IdMismatch { sent, got } => {
                write!(f, "the device side acknowledged id {got:#x}, but the hello named {sent:#x}")
            }
            UnknownTag { tag } => {
                write!(f, "reply for tag {tag:#x}, which was never sent, was posted, or was already answered")
            }
            WrongChunkTag { expected, got } => {
                write!(f, "a state chunk for tag {got:#x} came while the state of tag {expected:#x} was being read")
            }
            DuplicateTag { tag } => write!(f, "tag {tag:#x} is already in flight"),
            ReplyMismatch { tag, request, reply } => {
                write!(f, "reply for tag {tag:#x} is a {reply}, but the request was a {request}")
            }
            ReplySizeMismatch { tag, request, reply } => {
                write!(f, "reply for tag {tag:#x} is a {reply} read, but the request was a {request} read")
            }
            BadStateChunk { offset, len, total, reason } => {
                write!(f, "state chunk of {len} bytes at offset {offset} (total {total}): {reason}")
            }
            StateTooLarge { total } => write!(
                f,
                "a device state of {total} bytes is more than the {} nkvm takes",
                crate::ioregion::state::MAX_STATE_LEN
            ),
            StateTooSlow { received, total, limit } => write!(
                f,
                "the device sent {received} of its {total} state bytes in {limit:?}, the most a state may take"
            ),
            NoDeviceState => write!(f, "the device model has no saved state"),
            StateRefused { reason } => write!(f, "the device model refused the state: {reason}"),
            StateNotInVersion { version } => write!(
                f,
                "the device speaks version {version} of the I/O-region protocol; state transfer needs version {}",
                crate::ioregion::state::STATE_VERSION
            ),
        }
    }
}

impl std::error::Error for WireError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            WireError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for WireError {
    fn from(e: io::Error) -> WireError {
        WireError::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::*;

    #[test]
    fn io_error_keeps_its_cause_as_source() {
        let err = WireError::from(io::Error::new(io::ErrorKind::BrokenPipe, "gone"));
        assert_eq!(err.to_string(), "the peer closed the connection (broken pipe)");
        assert_eq!(err.source().map(|s| s.to_string()).as_deref(), Some("gone"));
        let err = WireError::from(io::Error::new(io::ErrorKind::TimedOut, "late"));
        assert_eq!(err.to_string(), "the peer did not answer within the socket's timeout");
        let err = WireError::from(io::Error::new(io::ErrorKind::PermissionDenied, "no"));
        assert_eq!(err.to_string(), "socket I/O failed (permission denied)");
    }

    #[test]
    fn messages_name_the_offending_values() {
        assert_eq!(WireError::BadAccessSize { size: 3 }.to_string(), "access size 3 is not 1, 2, 4 or 8");
        assert_eq!(
            WireError::OutsideRegion { offset: 0x1ffe, size: AccessSize::Dword, region_len: 0x2000 }.to_string(),
            "4-byte access at offset 0x1ffe is outside the 0x2000-byte region"
        );
        assert_eq!(
            WireError::UnknownTag { tag: 7 }.to_string(),
            "reply for tag 0x7, which was never sent, was posted, or was already answered"
        );
        assert_eq!(
            WireError::ReplyMismatch { tag: 1, request: Op::Read, reply: Op::Write }.to_string(),
            "reply for tag 0x1 is a write, but the request was a read"
        );
    }
}
