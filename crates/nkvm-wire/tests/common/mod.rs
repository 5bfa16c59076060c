//! proptest strategies for every frame of both protocols.

#![allow(dead_code)]

use nkvm_wire::apic::{self, ApicFrame, DeliveryMode, DestinationMode, EoiMessage, InterruptMessage, TriggerMode};
use nkvm_wire::handshake::{HelloAck, VersionRange};
use nkvm_wire::ioregion::{
    AccessSize, Hello, IoFrame, LoadStatus, RegionInfo, Reply, Request, Space, StateChunk, StateLoad, StateLoaded,
    StateRequest,
};
use proptest::prelude::*;

pub fn space() -> impl Strategy<Value = Space> {
    prop_oneof![Just(Space::Mmio), Just(Space::Pio)]
}

pub fn access_size() -> impl Strategy<Value = AccessSize> {
    prop::sample::select(AccessSize::ALL.to_vec())
}

pub fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (any::<u32>(), space(), any::<u64>(), access_size()).prop_map(|(tag, space, offset, size)| Request::Read {
            tag,
            space,
            offset,
            size
        }),
        (any::<u32>(), space(), any::<u64>(), access_size(), any::<u64>(), any::<bool>()).prop_map(
            |(tag, space, offset, size, data, posted)| Request::Write {
                tag,
                space,
                offset,
                size,
                data: data & size.mask(),
                posted,
            }
        ),
        any::<u32>().prop_map(|tag| Request::Sync { tag }),
    ]
}

pub fn reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        (any::<u32>(), access_size(), any::<u64>()).prop_map(|(tag, size, data)| Reply::Read {
            tag,
            size,
            data: data & size.mask(),
        }),
        any::<u32>().prop_map(|tag| Reply::Write { tag }),
        any::<u32>().prop_map(|tag| Reply::Sync { tag }),
    ]
}

pub fn versions() -> impl Strategy<Value = VersionRange> {
    (any::<u16>(), any::<u16>()).prop_map(|(min, max)| VersionRange { min, max })
}

pub fn hello_ack() -> impl Strategy<Value = HelloAck> {
    (any::<u16>(), versions(), any::<u64>()).prop_map(|(version, supported, id)| HelloAck { version, supported, id })
}

pub fn io_hello() -> impl Strategy<Value = Hello> {
    (versions(), any::<u64>(), space(), any::<u64>(), any::<u64>())
        .prop_map(|(versions, id, space, base, len)| Hello { versions, region: RegionInfo { id, space, base, len } })
}

pub fn io_frame() -> impl Strategy<Value = IoFrame> {
    prop_oneof![
        io_hello().prop_map(IoFrame::Hello),
        hello_ack().prop_map(IoFrame::HelloAck),
        request().prop_map(IoFrame::Request),
        reply().prop_map(IoFrame::Reply),
        any::<u32>().prop_map(|tag| IoFrame::StateRequest(StateRequest { tag })),
        state_chunk().prop_map(IoFrame::StateChunk),
        (any::<u32>(), 0..=nkvm_wire::ioregion::state::MAX_STATE_LEN)
            .prop_map(|(tag, total)| IoFrame::StateLoad(StateLoad { tag, total })),
        (any::<u32>(), prop_oneof![Just(LoadStatus::Taken), Just(LoadStatus::Refused), Just(LoadStatus::NoState)])
            .prop_map(|(tag, status)| IoFrame::StateLoaded(StateLoaded { tag, status })),
    ]
}

/// A well-formed chunk: a piece of a state of some total, or "no state".
pub fn state_chunk() -> impl Strategy<Value = StateChunk> {
    (any::<u32>(), prop::collection::vec(any::<u8>(), 0..200), any::<usize>(), any::<bool>()).prop_map(
        |(tag, state, pick, none)| {
            let chunks = StateChunk::split(tag, (!none).then_some(&state[..]));
            chunks[pick % chunks.len()]
        },
    )
}

pub fn interrupt() -> impl Strategy<Value = InterruptMessage> {
    (
        any::<u32>(),
        prop_oneof![Just(DestinationMode::Physical), Just(DestinationMode::Logical)],
        prop::sample::select(DeliveryMode::ALL.to_vec()),
        any::<u8>(),
        prop_oneof![Just(TriggerMode::Edge), Just(TriggerMode::Level)],
        any::<bool>(),
    )
        .prop_map(|(destination, destination_mode, delivery_mode, vector, trigger_mode, level)| InterruptMessage {
            destination,
            destination_mode,
            delivery_mode,
            vector,
            trigger_mode,
            level,
        })
}

pub fn apic_frame() -> impl Strategy<Value = ApicFrame> {
    prop_oneof![
        (versions(), any::<u64>()).prop_map(|(versions, bus_id)| ApicFrame::Hello(apic::Hello { versions, bus_id })),
        hello_ack().prop_map(ApicFrame::HelloAck),
        interrupt().prop_map(ApicFrame::Interrupt),
        any::<u8>().prop_map(|vector| ApicFrame::Eoi(EoiMessage { vector })),
        interrupt().prop_map(ApicFrame::FastPath),
    ]
}

/// A reader handing out its bytes in chunks of the given sizes (cycled),
/// to exercise frames split across reads.
pub struct Chunked<'a> {
    pub data: &'a [u8],
    pub chunks: Vec<usize>,
    pub next: usize,
}

impl std::io::Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let chunk = self.chunks.get(self.next % self.chunks.len().max(1)).copied();
        self.next += 1;
        let n = chunk.unwrap_or(usize::MAX).max(1).min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}
