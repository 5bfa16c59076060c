//! Device state transfer (protocol version 2): the VM side asks for the
//! device model's saved state with a [`StateRequest`]; the device side
//! answers with the state cut into [`StateChunk`]s, in order, and nothing
//! else in between. The request travels in the stream like any other, so
//! every write sent before it (posted ones included) is served before the
//! state is taken. [`StateAssembly`] checks the chunks and joins them. The
//! other way, a [`StateLoad`] and its chunks give the device a state to
//! take, and a [`StateLoaded`] says whether it did (with the model's
//! reason, as chunks of text, if it did not).
//!
//! The state's bytes are the model's own snapshot (an nkvm device state
//! blob, `docs/state-format.md`); this protocol only carries them.

use super::{
    frame_name, FRAME_STATE_CHUNK, FRAME_STATE_LOAD, FRAME_STATE_LOADED, FRAME_STATE_REQUEST, STATE_CHUNK_PAYLOAD_LEN,
    STATE_LOADED_PAYLOAD_LEN, STATE_LOAD_PAYLOAD_LEN, STATE_REQUEST_PAYLOAD_LEN,
};
use crate::error::WireError;
use crate::frame::{self, get_u16, get_u32, put, Protocol, HEADER_LEN};

/// Bytes of state one [`StateChunk`] carries at most.
pub const STATE_CHUNK_DATA: usize = 32;
/// [`StateChunk::total`] of a model that has no saved state.
pub const NO_STATE: u32 = u32::MAX;
/// The largest state the VM side takes (1 MiB).
pub const MAX_STATE_LEN: u32 = 1 << 20;
/// The first protocol version with state transfer.
pub const STATE_VERSION: u16 = 2;

/// The VM side asks for the device's state.
///
/// | payload offset | size | field |
/// |---|---|---|
/// | 0 | 4 | tag, echoed in every chunk |
/// | 4 | 4 | reserved, 0 |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StateRequest {
    /// Sequence tag.
    pub tag: u32,
}

impl StateRequest {
    /// Length of the encoded frame.
    pub const FRAME_LEN: usize = HEADER_LEN + STATE_REQUEST_PAYLOAD_LEN;

    /// Encode as one frame.
    pub fn encode(&self) -> [u8; Self::FRAME_LEN] {
        let mut out = frame::frame_with_header(Protocol::IoRegion, FRAME_STATE_REQUEST);
        put(&mut out[HEADER_LEN..], 0, &self.tag.to_le_bytes());
        out
    }

    /// Decode exactly one state-request frame.
    ///
    /// # Errors
    ///
    /// Any header error, [`WireError::UnexpectedFrame`] for another frame
    /// type, [`WireError::ReservedNotZero`].
    pub fn decode(bytes: &[u8]) -> Result<StateRequest, WireError> {
        let p = frame::payload_of(bytes, Protocol::IoRegion, FRAME_STATE_REQUEST, "state request", frame_name)?;
        Self::decode_payload(p)
    }

    pub(super) fn decode_payload(p: &[u8]) -> Result<StateRequest, WireError> {
        frame::check_reserved(p, 4..8, "state request reserved")?;
        Ok(StateRequest { tag: get_u32(p, 0) })
    }
}

/// One piece of the device's answer to a [`StateRequest`].
///
/// | payload offset | size | field |
/// |---|---|---|
/// | 0 | 4 | tag of the request |
/// | 4 | 4 | total length of the state in bytes; `0xffffffff`: the model has no state |
/// | 8 | 4 | offset of this chunk's bytes in the state |
/// | 12 | 2 | bytes of state in this chunk, 0 to 32 |
/// | 14 | 2 | reserved, 0 |
/// | 16 | 32 | the bytes, the unused rest 0 |
///
/// Chunks follow each other with no gap: the first at offset 0, each at
/// the end of the one before, the last ending at the total. An empty state
/// (and "no state") is one chunk of 0 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StateChunk {
    /// Tag of the request.
    pub tag: u32,
    /// Length of the whole state, or [`NO_STATE`].
    pub total: u32,
    /// Offset of `data` in the state.
    pub offset: u32,
    /// Bytes used in `data`.
    pub len: u16,
    /// The bytes (the first `len`).
    pub data: [u8; STATE_CHUNK_DATA],
}

impl StateChunk {
    /// Length of the encoded frame.
    pub const FRAME_LEN: usize = HEADER_LEN + STATE_CHUNK_PAYLOAD_LEN;

    /// `state` (or its absence) as the chunks that answer request `tag`.
    /// A state longer than [`MAX_STATE_LEN`] is sent all the same; the VM
    /// side refuses it, naming its length.
    pub fn split(tag: u32, state: Option<&[u8]>) -> Vec<StateChunk> {
        let empty = StateChunk { tag, total: NO_STATE, offset: 0, len: 0, data: [0; STATE_CHUNK_DATA] };
        let Some(state) = state else { return vec![empty] };
        let total = u32::try_from(state.len()).unwrap_or(u32::MAX - 1);
        if state.is_empty() {
            return vec![StateChunk { total: 0, ..empty }];
        }
        state
            .chunks(STATE_CHUNK_DATA)
            .enumerate()
            .map(|(i, bytes)| {
                let mut data = [0; STATE_CHUNK_DATA];
                data[..bytes.len()].copy_from_slice(bytes);
                let offset = (i * STATE_CHUNK_DATA) as u32;
                StateChunk { tag, total, offset, len: bytes.len() as u16, data }
            })
            .collect()
    }

    /// The chunk's bytes of state.
    pub fn bytes(&self) -> &[u8] {
        &self.data[..usize::from(self.len).min(STATE_CHUNK_DATA)]
    }

    /// Encode as one frame.
    pub fn encode(&self) -> [u8; Self::FRAME_LEN] {
        let mut out = frame::frame_with_header(Protocol::IoRegion, FRAME_STATE_CHUNK);
        let p = &mut out[HEADER_LEN..];
        put(p, 0, &self.tag.to_le_bytes());
        put(p, 4, &self.total.to_le_bytes());
        put(p, 8, &self.offset.to_le_bytes());
        put(p, 12, &self.len.to_le_bytes());
        put(p, 16, self.bytes());
        out
    }

    /// Decode exactly one state-chunk frame.
    ///
    /// # Errors
    ///
    /// Any header error, [`WireError::UnexpectedFrame`] for another frame
    /// type, [`WireError::BadStateChunk`] for a length over 32 or a chunk
    /// past the total, [`WireError::ReservedNotZero`] (including bytes past
    /// the length).
    pub fn decode(bytes: &[u8]) -> Result<StateChunk, WireError> {
        let p = frame::payload_of(bytes, Protocol::IoRegion, FRAME_STATE_CHUNK, "state chunk", frame_name)?;
        Self::decode_payload(p)
    }

    pub(super) fn decode_payload(p: &[u8]) -> Result<StateChunk, WireError> {
        let (tag, total, offset, len) = (get_u32(p, 0), get_u32(p, 4), get_u32(p, 8), get_u16(p, 12));
        frame::check_reserved(p, 14..16, "state chunk reserved")?;
        let bad = |reason| Err(WireError::BadStateChunk { offset, len, total, reason });
        if usize::from(len) > STATE_CHUNK_DATA {
            return bad("a chunk carries at most 32 bytes");
        }
        if total == NO_STATE && (offset != 0 || len != 0) {
            return bad("a \"no state\" answer carries no bytes");
        }
        if total != NO_STATE && u64::from(offset) + u64::from(len) > u64::from(total) {
            return bad("the chunk runs past the total");
        }
        // Bytes past the length must be 0 (checked 8 at a time).
        let mut at = 16 + usize::from(len);
        while at < 16 + STATE_CHUNK_DATA {
            let end = (at + 8).min(16 + STATE_CHUNK_DATA);
            frame::check_reserved(p, at..end, "state chunk bytes past its length")?;
            at = end;
        }
        let mut data = [0; STATE_CHUNK_DATA];
        data.copy_from_slice(&p[16..16 + STATE_CHUNK_DATA]);
        Ok(StateChunk { tag, total, offset, len, data })
    }
}

/// The VM side gives the device a state to take: followed at once by the
/// state's [`StateChunk`]s (VM side to device side, same tag), answered by
/// a [`StateLoaded`].
///
/// | payload offset | size | field |
/// |---|---|---|
/// | 0 | 4 | tag, echoed in the chunks and the answer |
/// | 4 | 4 | total length of the state in bytes (at most [`MAX_STATE_LEN`]) |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StateLoad {
    /// Sequence tag.
    pub tag: u32,
    /// Bytes of state the chunks carry.
    pub total: u32,
}

impl StateLoad {
    /// Length of the encoded frame.
    pub const FRAME_LEN: usize = HEADER_LEN + STATE_LOAD_PAYLOAD_LEN;

    /// Encode as one frame.
    pub fn encode(&self) -> [u8; Self::FRAME_LEN] {
        let mut out = frame::frame_with_header(Protocol::IoRegion, FRAME_STATE_LOAD);
        put(&mut out[HEADER_LEN..], 0, &self.tag.to_le_bytes());
        put(&mut out[HEADER_LEN..], 4, &self.total.to_le_bytes());
        out
    }

    /// Decode exactly one state-load frame.
    ///
    /// # Errors
    ///
    /// Any header error, [`WireError::UnexpectedFrame`] for another frame
    /// type, [`WireError::StateTooLarge`] past [`MAX_STATE_LEN`].
    pub fn decode(bytes: &[u8]) -> Result<StateLoad, WireError> {
        let p = frame::payload_of(bytes, Protocol::IoRegion, FRAME_STATE_LOAD, "state load", frame_name)?;
        Self::decode_payload(p)
    }

    pub(super) fn decode_payload(p: &[u8]) -> Result<StateLoad, WireError> {
        let total = get_u32(p, 4);
        if total > MAX_STATE_LEN {
            return Err(WireError::StateTooLarge { total });
        }
        Ok(StateLoad { tag: get_u32(p, 0), total })
    }
}

/// The device's answer to a [`StateLoad`], once it has all the chunks.
///
/// | payload offset | size | field |
/// |---|---|---|
/// | 0 | 4 | tag of the state load |
/// | 4 | 4 | status: 0 taken; 1 refused, the model's reason following as [`StateChunk`]s of UTF-8 text (same tag); 2 the model has no state |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StateLoaded {
    /// Tag of the state load.
    pub tag: u32,
    /// What became of the state.
    pub status: LoadStatus,
}

/// [`StateLoaded::status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoadStatus {
    /// The model took the state (code 0).
    Taken,
    /// The model refused it; its reason follows (code 1).
    Refused,
    /// The model has no state (code 2).
    NoState,
}

impl StateLoaded {
    /// Length of the encoded frame.
    pub const FRAME_LEN: usize = HEADER_LEN + STATE_LOADED_PAYLOAD_LEN;

    /// Encode as one frame.
    pub fn encode(&self) -> [u8; Self::FRAME_LEN] {
        let mut out = frame::frame_with_header(Protocol::IoRegion, FRAME_STATE_LOADED);
        let code: u32 = match self.status {
            LoadStatus::Taken => 0,
            LoadStatus::Refused => 1,
            LoadStatus::NoState => 2,
        };
        put(&mut out[HEADER_LEN..], 0, &self.tag.to_le_bytes());
        put(&mut out[HEADER_LEN..], 4, &code.to_le_bytes());
        out
    }

    /// Decode exactly one state-loaded frame.
    ///
    /// # Errors
    ///
    /// Any header error, [`WireError::UnexpectedFrame`] for another frame
    /// type, [`WireError::UnknownValue`] for a status other than 0-2.
    pub fn decode(bytes: &[u8]) -> Result<StateLoaded, WireError> {
        let p = frame::payload_of(bytes, Protocol::IoRegion, FRAME_STATE_LOADED, "state loaded", frame_name)?;
        Self::decode_payload(p)
    }

    pub(super) fn decode_payload(p: &[u8]) -> Result<StateLoaded, WireError> {
        let status = match get_u32(p, 4) {
            0 => LoadStatus::Taken,
            1 => LoadStatus::Refused,
            2 => LoadStatus::NoState,
            value => return Err(WireError::UnknownValue { field: "state load status", value: value.into() }),
        };
        Ok(StateLoaded { tag: get_u32(p, 0), status })
    }
}

/// The VM side's reassembly of the chunks answering one request.
#[derive(Debug)]
pub struct StateAssembly {
    tag: u32,
    total: Option<u32>,
    state: Vec<u8>,
}

impl StateAssembly {
    /// Waits for the answer to request `tag`.
    pub fn new(tag: u32) -> Self {
        StateAssembly { tag, total: None, state: Vec::new() }
    }

    /// Takes the next chunk; `Ok(Some(state))` once the state is whole.
    ///
    /// # Errors
    ///
    /// [`WireError::WrongChunkTag`] for another request's chunk,
    /// [`WireError::NoDeviceState`] if the model has none,
    /// [`WireError::StateTooLarge`] past [`MAX_STATE_LEN`], and
    /// [`WireError::BadStateChunk`] for a chunk out of place (a gap, an
    /// overlap, a total that changes, an empty chunk before the end).
    pub fn push(&mut self, chunk: &StateChunk) -> Result<Option<Vec<u8>>, WireError> {
        if chunk.tag != self.tag {
            return Err(WireError::WrongChunkTag { expected: self.tag, got: chunk.tag });
        }
        let bad =
            |reason| Err(WireError::BadStateChunk { offset: chunk.offset, len: chunk.len, total: chunk.total, reason });
        if chunk.total == NO_STATE {
            return if self.total.is_none() { Err(WireError::NoDeviceState) } else { bad("the total changed") };
        }
        if chunk.total > MAX_STATE_LEN {
            return Err(WireError::StateTooLarge { total: chunk.total });
        }
        if *self.total.get_or_insert(chunk.total) != chunk.total {
            return bad("the total changed");
        }
        if chunk.offset as usize != self.state.len() {
            return bad("the chunk does not start where the one before ended");
        }
        if chunk.len == 0 && chunk.total != 0 {
            return bad("an empty chunk before the end");
        }
        self.state.extend_from_slice(chunk.bytes());
        Ok((self.state.len() == chunk.total as usize).then(|| std::mem::take(&mut self.state)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ioregion::{read_frame, IoFrame};

    fn join(chunks: &[StateChunk], tag: u32) -> Result<Option<Vec<u8>>, WireError> {
        let mut assembly = StateAssembly::new(tag);
        let mut last = Ok(None);
        for c in chunks {
            last = assembly.push(c);
            if !matches!(last, Ok(None)) {
                break;
            }
        }
        last
    }

    #[test]
    fn states_of_every_length_round_trip_through_frames() {
        for len in [0usize, 1, 31, 32, 33, 64, 100, 4096] {
            let state: Vec<u8> = (0..len).map(|i| (i * 7 + 1) as u8).collect();
            let chunks = StateChunk::split(9, Some(&state));
            assert_eq!(chunks.len(), len.div_ceil(STATE_CHUNK_DATA).max(1));
            let mut stream = Vec::new();
            chunks.iter().for_each(|c| stream.extend_from_slice(&c.encode()));
            let mut input = &stream[..];
            let mut decoded = Vec::new();
            while let Some(frame) = read_frame(&mut input).unwrap() {
                let IoFrame::StateChunk(c) = frame else { panic!("{frame:?}") };
                decoded.push(c);
            }
            assert_eq!(decoded, chunks);
            assert_eq!(join(&decoded, 9).unwrap(), Some(state), "{len} bytes");
        }
        let request = StateRequest { tag: 3 };
        assert_eq!(StateRequest::decode(&request.encode()).unwrap(), request);
    }

    #[test]
    fn bad_chunks_and_a_model_without_state_are_named() {
        let state = [5u8; 70];
        let chunks = StateChunk::split(1, Some(&state));
        let err = |chunks: &[StateChunk], tag| join(chunks, tag).unwrap_err().to_string();
        assert_eq!(err(&StateChunk::split(1, None), 1), "the device model has no saved state");
        assert_eq!(err(&chunks, 2), "a state chunk for tag 0x1 came while the state of tag 0x2 was being read");
        assert!(err(&[chunks[0], chunks[2]], 1).contains("does not start where the one before ended"));
        let mut other_total = chunks[1];
        other_total.total = 80;
        assert!(err(&[chunks[0], other_total], 1).contains("the total changed"));
        let mut huge = chunks[0];
        huge.total = MAX_STATE_LEN + 1;
        assert_eq!(err(&[huge], 1), "a device state of 1048577 bytes is more than the 1048576 nkvm takes");

        // Decoding: a length over 32, bytes past the length, past the total.
        let encode_with = |f: &dyn Fn(&mut [u8])| {
            let mut b = chunks[2].encode();
            f(&mut b[HEADER_LEN..]);
            StateChunk::decode(&b).unwrap_err().to_string()
        };
        assert!(encode_with(&|p| p[12] = 33).contains("at most 32 bytes"));
        assert!(encode_with(&|p| p[16 + 6] = 1).contains("state chunk bytes past its length"));
        assert!(encode_with(&|p| p[16 + 31] = 1).contains("state chunk bytes past its length"));
        assert!(encode_with(&|p| p[4] = 65).contains("runs past the total"));
        assert!(encode_with(&|p| p[14] = 1).contains("state chunk reserved"));
        let mut b = StateRequest { tag: 1 }.encode();
        b[HEADER_LEN + 5] = 1;
        assert!(StateRequest::decode(&b).is_err());

        // A load past 1 MiB, an unknown status.
        let b = StateLoad { tag: 1, total: MAX_STATE_LEN + 1 }.encode();
        assert!(StateLoad::decode(&b).unwrap_err().to_string().contains("1048577 bytes"));
        let mut b = StateLoaded { tag: 1, status: LoadStatus::Taken }.encode();
        b[HEADER_LEN + 4] = 3;
        assert_eq!(StateLoaded::decode(&b).unwrap_err().to_string(), "state load status 0x3 is not a known value");
    }
}
