//! Every frame of both protocols decodes to what was encoded, alone and in
//! a stream split across arbitrary reads.

mod common;

use common::{apic_frame, io_frame, reply, request, Chunked};
use nkvm_wire::apic::{self, ApicFrame, EoiMessage, InterruptMessage};
use nkvm_wire::frame::{Protocol, MAX_FRAME_LEN};
use nkvm_wire::handshake::HelloAck;
use nkvm_wire::ioregion::{self, Hello, IoFrame, Reply, Request, StateChunk, StateLoad, StateLoaded, StateRequest};
use proptest::prelude::*;

proptest! {
    #[test]
    fn every_io_frame_round_trips(frame in io_frame()) {
        let bytes = frame.encode();
        prop_assert!(bytes.len() <= MAX_FRAME_LEN);
        prop_assert_eq!(IoFrame::decode(&bytes)?, frame);
        match frame {
            IoFrame::Hello(h) => prop_assert_eq!(Hello::decode(&bytes)?, h),
            IoFrame::HelloAck(a) => {
                prop_assert_eq!(HelloAck::decode(Protocol::IoRegion, &bytes)?, a)
            }
            IoFrame::Request(r) => prop_assert_eq!(Request::decode(&bytes)?, r),
            IoFrame::Reply(r) => prop_assert_eq!(Reply::decode(&bytes)?, r),
            IoFrame::StateRequest(r) => prop_assert_eq!(StateRequest::decode(&bytes)?, r),
            IoFrame::StateChunk(c) => prop_assert_eq!(StateChunk::decode(&bytes)?, c),
            IoFrame::StateLoad(l) => prop_assert_eq!(StateLoad::decode(&bytes)?, l),
            IoFrame::StateLoaded(l) => prop_assert_eq!(StateLoaded::decode(&bytes)?, l),
        }
    }

    #[test]
    fn every_apic_frame_round_trips(frame in apic_frame()) {
        let bytes = frame.encode();
        prop_assert_eq!(ApicFrame::decode(&bytes)?, frame);
        match frame {
            ApicFrame::Hello(h) => prop_assert_eq!(apic::Hello::decode(&bytes)?, h),
            ApicFrame::HelloAck(a) => {
                prop_assert_eq!(HelloAck::decode(Protocol::ApicBus, &bytes)?, a)
            }
            ApicFrame::Interrupt(m) => prop_assert_eq!(InterruptMessage::decode(&bytes)?, m),
            ApicFrame::Eoi(m) => prop_assert_eq!(EoiMessage::decode(&bytes)?, m),
            ApicFrame::FastPath(m) => prop_assert_eq!(&bytes[..], &m.encode_fast_path()[..]),
        }
    }

    #[test]
    fn requests_and_replies_have_fixed_sizes(req in request(), rep in reply()) {
        prop_assert_eq!(req.encode().len(), 32);
        prop_assert_eq!(rep.encode().len(), 24);
    }

    #[test]
    fn io_streams_survive_any_read_split(
        frames in prop::collection::vec(io_frame(), 0..20),
        chunks in prop::collection::vec(1usize..50, 1..8),
    ) {
        let mut stream = Vec::new();
        for f in &frames {
            ioregion::write_frame(&mut stream, f)?;
        }
        let mut r = Chunked { data: &stream, chunks, next: 0 };
        for f in &frames {
            prop_assert_eq!(ioregion::read_frame(&mut r)?, Some(*f));
        }
        prop_assert!(ioregion::read_frame(&mut r)?.is_none());
    }

    #[test]
    fn apic_streams_survive_any_read_split(
        frames in prop::collection::vec(apic_frame(), 0..20),
        chunks in prop::collection::vec(1usize..50, 1..8),
    ) {
        let mut stream = Vec::new();
        for f in &frames {
            apic::write_frame(&mut stream, f)?;
        }
        let mut r = Chunked { data: &stream, chunks, next: 0 };
        for f in &frames {
            prop_assert_eq!(apic::read_frame(&mut r)?, Some(*f));
        }
        prop_assert!(apic::read_frame(&mut r)?.is_none());
    }
}
