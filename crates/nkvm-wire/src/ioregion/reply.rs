//! [`Reply`]: the device side's answer to a non-posted request.

use super::{frame_name, AccessSize, Op, FRAME_REPLY, REPLY_PAYLOAD_LEN};
use crate::error::WireError;
use crate::frame::{self, get_u32, get_u64, put, Protocol, HEADER_LEN};

/// The device side's answer to a non-posted request.
///
/// | payload offset | size | field |
/// |---|---|---|
/// | 0 | 1 | op of the request: 0 read, 1 write, 2 sync |
/// | 1 | 1 | read: the access size; otherwise 0 |
/// | 2 | 2 | reserved, 0 |
/// | 4 | 4 | tag of the request |
/// | 8 | 8 | read: the data, in the low `size` bytes, the rest 0; otherwise 0 |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reply {
    /// The value read.
    Read {
        /// Tag of the request.
        tag: u32,
        /// Size of the access (as requested).
        size: AccessSize,
        /// The value (encoding keeps its low `size` bytes).
        data: u64,
    },
    /// A non-posted write was served.
    Write {
        /// Tag of the request.
        tag: u32,
    },
    /// Everything sent before the sync was served.
    Sync {
        /// Tag of the request.
        tag: u32,
    },
}

impl Reply {
    /// Length of the encoded frame.
    pub const FRAME_LEN: usize = HEADER_LEN + REPLY_PAYLOAD_LEN;

    /// The reply's tag.
    pub fn tag(&self) -> u32 {
        match *self {
            Reply::Read { tag, .. } | Reply::Write { tag } | Reply::Sync { tag } => tag,
        }
    }

    /// The operation answered.
    pub fn op(&self) -> Op {
        match self {
            Reply::Read { .. } => Op::Read,
            Reply::Write { .. } => Op::Write,
            Reply::Sync { .. } => Op::Sync,
        }
    }

    /// Encode as one frame.
    pub fn encode(&self) -> [u8; Self::FRAME_LEN] {
        let mut out = frame::frame_with_header(Protocol::IoRegion, FRAME_REPLY);
        let p = &mut out[HEADER_LEN..];
        p[0] = self.op().code();
        put(p, 4, &self.tag().to_le_bytes());
        if let Reply::Read { size, data, .. } = *self {
            p[1] = size.bytes() as u8;
            put(p, 8, &(data & size.mask()).to_le_bytes());
        }
        out
    }

    /// Decode exactly one reply frame.
    ///
    /// # Errors
    ///
    /// Any header error, [`WireError::UnexpectedFrame`] for another frame
    /// type, [`WireError::UnknownOp`], [`WireError::BadAccessSize`],
    /// [`WireError::DataTooWide`], [`WireError::ReservedNotZero`].
    pub fn decode(bytes: &[u8]) -> Result<Reply, WireError> {
        let p = frame::payload_of(bytes, Protocol::IoRegion, FRAME_REPLY, "reply", frame_name)?;
        Self::decode_payload(p)
    }

    pub(super) fn decode_payload(p: &[u8]) -> Result<Reply, WireError> {
        let op = Op::from_code(p[0])?;
        frame::check_reserved(p, 2..4, "reply reserved")?;
        let tag = get_u32(p, 4);
        if op != Op::Read {
            frame::check_reserved(p, 1..2, "reply size")?;
            frame::check_reserved(p, 8..16, "reply data")?;
            return Ok(if op == Op::Write { Reply::Write { tag } } else { Reply::Sync { tag } });
        }
        let size = AccessSize::from_bytes(p[1].into())?;
        let data = get_u64(p, 8);
        if data & !size.mask() != 0 {
            return Err(WireError::DataTooWide { data, size });
        }
        Ok(Reply::Read { tag, size, data })
    }
}
