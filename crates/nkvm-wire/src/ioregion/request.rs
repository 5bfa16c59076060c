//! [`Request`]: one guest access, or a sync barrier, from the VM side.

use super::{frame_name, AccessSize, Op, RegionInfo, Space, FRAME_REQUEST, REQUEST_PAYLOAD_LEN};
use crate::error::WireError;
use crate::frame::{self, get_u32, get_u64, put, Protocol, HEADER_LEN};

/// Posted flag: bit 0 of a request's flags byte.
const FLAG_POSTED: u8 = 1;

/// A transaction from the VM side: one guest access, or a sync barrier.
///
/// | payload offset | size | field |
/// |---|---|---|
/// | 0 | 1 | op: 0 read, 1 write, 2 sync |
/// | 1 | 1 | space: 0 MMIO, 1 PIO (sync: 0) |
/// | 2 | 1 | access size: 1, 2, 4 or 8 (sync: 0) |
/// | 3 | 1 | flags: bit 0 posted (writes only); other bits 0 |
/// | 4 | 4 | tag |
/// | 8 | 8 | offset in the region (sync: 0) |
/// | 16 | 8 | data, in the low `size` bytes; the rest 0 (read, sync: 0) |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Request {
    /// Read `size` bytes at `offset`; answered by [`Reply::Read`](super::Reply::Read).
    Read {
        /// Sequence tag, echoed in the reply.
        tag: u32,
        /// Address space; must be the region's.
        space: Space,
        /// Offset in the region.
        offset: u64,
        /// Access size.
        size: AccessSize,
    },
    /// Write the low `size` bytes of `data` at `offset`; answered by
    /// [`Reply::Write`](super::Reply::Write) unless `posted`.
    Write {
        /// Sequence tag (echoed in the reply, if any).
        tag: u32,
        /// Address space; must be the region's.
        space: Space,
        /// Offset in the region.
        offset: u64,
        /// Access size.
        size: AccessSize,
        /// The value written (encoding keeps its low `size` bytes).
        data: u64,
        /// Posted: no reply is sent, the VM side does not wait.
        posted: bool,
    },
    /// Barrier: answered by [`Reply::Sync`](super::Reply::Sync) once everything sent before it
    /// was served.
    Sync {
        /// Sequence tag, echoed in the reply.
        tag: u32,
    },
}

impl Request {
    /// Length of the encoded frame.
    pub const FRAME_LEN: usize = HEADER_LEN + REQUEST_PAYLOAD_LEN;

    /// The request's tag.
    pub fn tag(&self) -> u32 {
        match *self {
            Request::Read { tag, .. } | Request::Write { tag, .. } | Request::Sync { tag } => tag,
        }
    }

    /// The request's operation.
    pub fn op(&self) -> Op {
        match self {
            Request::Read { .. } => Op::Read,
            Request::Write { .. } => Op::Write,
            Request::Sync { .. } => Op::Sync,
        }
    }

    /// Whether the device side answers this request.
    pub fn expects_reply(&self) -> bool {
        !matches!(self, Request::Write { posted: true, .. })
    }

    /// Check that the access lies inside a region of `region_len` bytes.
    ///
    /// # Errors
    ///
    /// [`WireError::OutsideRegion`].
    pub fn validate(&self, region_len: u64) -> Result<(), WireError> {
        let (offset, size) = match *self {
            Request::Read { offset, size, .. } | Request::Write { offset, size, .. } => (offset, size),
            Request::Sync { .. } => return Ok(()),
        };
        match offset.checked_add(size.bytes() as u64) {
            Some(end) if end <= region_len => Ok(()),
            _ => Err(WireError::OutsideRegion { offset, size, region_len }),
        }
    }

    /// Check that the access is in `region`'s address space and inside it.
    ///
    /// # Errors
    ///
    /// [`WireError::SpaceMismatch`], [`WireError::OutsideRegion`].
    pub fn validate_in(&self, region: &RegionInfo) -> Result<(), WireError> {
        if let Request::Read { space, .. } | Request::Write { space, .. } = *self {
            if space != region.space {
                return Err(WireError::SpaceMismatch { region: region.space, request: space });
            }
        }
        self.validate(region.len)
    }

    /// Encode as one frame.
    pub fn encode(&self) -> [u8; Self::FRAME_LEN] {
        let mut out = frame::frame_with_header(Protocol::IoRegion, FRAME_REQUEST);
        let p = &mut out[HEADER_LEN..];
        p[0] = self.op().code();
        put(p, 4, &self.tag().to_le_bytes());
        match *self {
            Request::Read { space, offset, size, .. } => {
                p[1] = space.code();
                p[2] = size.bytes() as u8;
                put(p, 8, &offset.to_le_bytes());
            }
            Request::Write { space, offset, size, data, posted, .. } => {
                p[1] = space.code();
                p[2] = size.bytes() as u8;
                p[3] = if posted { FLAG_POSTED } else { 0 };
                put(p, 8, &offset.to_le_bytes());
                put(p, 16, &(data & size.mask()).to_le_bytes());
            }
            Request::Sync { .. } => {}
        }
        out
    }

    /// Decode exactly one request frame.
    ///
    /// # Errors
    ///
    /// Any header error, [`WireError::UnexpectedFrame`] for another frame
    /// type, and the payload errors listed in `docs/wire-format.md`.
    pub fn decode(bytes: &[u8]) -> Result<Request, WireError> {
        let p = frame::payload_of(bytes, Protocol::IoRegion, FRAME_REQUEST, "request", frame_name)?;
        Self::decode_payload(p)
    }

    pub(super) fn decode_payload(p: &[u8]) -> Result<Request, WireError> {
        let op = Op::from_code(p[0])?;
        let tag = get_u32(p, 4);
        let flags = p[3];
        if flags & !FLAG_POSTED != 0 {
            return Err(WireError::ReservedNotZero { field: "request flags", value: flags.into() });
        }
        let posted = flags & FLAG_POSTED != 0;
        if posted && op != Op::Write {
            return Err(WireError::PostedNonWrite { op });
        }
        if op == Op::Sync {
            frame::check_reserved(p, 1..3, "sync space and size")?;
            frame::check_reserved(p, 8..16, "sync offset")?;
            frame::check_reserved(p, 16..24, "sync data")?;
            return Ok(Request::Sync { tag });
        }
        let space = Space::from_code(p[1])?;
        let size = AccessSize::from_bytes(p[2].into())?;
        let offset = get_u64(p, 8);
        let data = get_u64(p, 16);
        if op == Op::Read {
            frame::check_reserved(p, 16..24, "read data")?;
            return Ok(Request::Read { tag, space, offset, size });
        }
        if data & !size.mask() != 0 {
            return Err(WireError::DataTooWide { data, size });
        }
        Ok(Request::Write { tag, space, offset, size, data, posted })
    }
}
