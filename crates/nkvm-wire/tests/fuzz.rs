//! Hostile input: arbitrary bytes and mutated frames never make a decoder
//! or the frame reader panic, and whatever they accept is canonical (it
//! re-encodes to the same bytes).

mod common;

use common::{apic_frame, io_frame, Chunked};
use nkvm_wire::apic::{self, ApicFrame, EoiMessage, InterruptMessage};
use nkvm_wire::frame::{Header, Protocol, MAX_FRAME_LEN};
use nkvm_wire::handshake::HelloAck;
use nkvm_wire::ioregion::{self, Hello, IoFrame, Reply, Request};
use nkvm_wire::WireError;
use proptest::prelude::*;

/// Run every decoder on `bytes`; check that an accepted frame re-encodes
/// to exactly `bytes`.
fn decode_everything(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(f) = IoFrame::decode(bytes) {
        prop_assert_eq!(&*f.encode(), bytes);
    }
    if let Ok(f) = ApicFrame::decode(bytes) {
        prop_assert_eq!(&*f.encode(), bytes);
    }
    let _ = Request::decode(bytes);
    let _ = Reply::decode(bytes);
    let _ = Hello::decode(bytes);
    let _ = apic::Hello::decode(bytes);
    let _ = InterruptMessage::decode(bytes);
    let _ = EoiMessage::decode(bytes);
    let _ = HelloAck::decode(Protocol::IoRegion, bytes);
    let _ = HelloAck::decode(Protocol::ApicBus, bytes);
    let _ = Header::decode(bytes, Protocol::IoRegion);
    let _ = Header::decode(bytes, Protocol::ApicBus);
    Ok(())
}

/// Read frames from `stream` until it ends or fails; never more bytes
/// than there are, never more than one frame's worth per read.
fn read_all_io(stream: &[u8], chunks: Vec<usize>) -> Result<(), TestCaseError> {
    let mut r = Chunked { data: stream, chunks, next: 0 };
    loop {
        let before = r.data.len();
        match ioregion::read_frame(&mut r) {
            Ok(Some(f)) => prop_assert_eq!(before - r.data.len(), f.encode().len()),
            Ok(None) => {
                prop_assert!(r.data.is_empty());
                return Ok(());
            }
            Err(e) => {
                prop_assert!(before - r.data.len() <= MAX_FRAME_LEN);
                prop_assert!(!e.to_string().is_empty());
                return Ok(());
            }
        }
    }
}

fn read_all_apic(stream: &[u8]) -> Result<(), TestCaseError> {
    let mut r = stream;
    loop {
        let before = r.len();
        match apic::read_frame(&mut r) {
            Ok(Some(f)) => prop_assert_eq!(before - r.len(), f.encode().len()),
            Ok(None) => return Ok(()),
            Err(_) => {
                prop_assert!(before - r.len() <= MAX_FRAME_LEN);
                return Ok(());
            }
        }
    }
}

/// A valid header for `protocol` followed by arbitrary payload bytes: this
/// reaches the payload decoders far more often than random bytes do.
fn framed_junk() -> impl Strategy<Value = Vec<u8>> {
    let len = prop_oneof![Just(8usize), Just(16), Just(24), Just(32), 0usize..40];
    let payload = len.prop_flat_map(|n| prop::collection::vec(any::<u8>(), n));
    (1u8..=2, 0u8..6, payload).prop_map(|(proto, ty, payload)| {
        let mut v = b"NK".to_vec();
        v.push(proto);
        v.push(ty);
        v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        v.extend_from_slice(&payload);
        v
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn decode_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        decode_everything(&bytes)?;
    }

    #[test]
    fn decode_never_panics_on_framed_junk(bytes in framed_junk()) {
        decode_everything(&bytes)?;
    }

    #[test]
    fn decode_never_panics_on_mutated_frames(
        frame in io_frame(),
        apic_frame in apic_frame(),
        flips in prop::collection::vec((0usize..40, any::<u8>()), 1..4),
    ) {
        for mut bytes in [frame.encode().to_vec(), apic_frame.encode().to_vec()] {
            for &(at, xor) in &flips {
                let n = bytes.len();
                bytes[at % n] ^= xor;
            }
            decode_everything(&bytes)?;
        }
    }

    #[test]
    fn frame_reader_survives_arbitrary_streams(
        stream in prop::collection::vec(any::<u8>(), 0..512),
        chunks in prop::collection::vec(1usize..64, 1..6),
    ) {
        read_all_io(&stream, chunks)?;
        read_all_apic(&stream)?;
    }

    #[test]
    fn frame_reader_survives_mutated_streams(
        frames in prop::collection::vec(io_frame(), 1..10),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        cut in any::<prop::sample::Index>(),
        chunks in prop::collection::vec(1usize..64, 1..6),
    ) {
        let mut stream = Vec::new();
        for f in &frames {
            ioregion::write_frame(&mut stream, f)?;
        }
        for (at, xor) in flips {
            let i = at.index(stream.len());
            stream[i] ^= xor;
        }
        stream.truncate(cut.index(stream.len() + 1));
        read_all_io(&stream, chunks)?;
    }

    #[test]
    fn oversized_headers_are_refused_without_reading_on(len in 33u32.., junk in prop::collection::vec(any::<u8>(), 0..64)) {
        let mut stream = b"NK\x01\x03".to_vec();
        stream.extend_from_slice(&len.to_le_bytes());
        stream.extend_from_slice(&junk);
        let mut r = &stream[..];
        let err = ioregion::read_frame(&mut r).unwrap_err();
        prop_assert!(matches!(err, WireError::OversizedFrame { .. }), "{}", err);
        prop_assert_eq!(r.len(), junk.len());
    }
}
