//! Unit tests of the I/O-region protocol: round trips, and one test per
//! malformed input.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::thread;

use super::*;
use crate::handshake::VersionRange;

const REGION: RegionInfo = RegionInfo { id: 0x51, space: Space::Mmio, base: 0xd000_0000, len: 0x2000 };

fn write(offset: u64, size: AccessSize, data: u64, posted: bool) -> Request {
    Request::Write { tag: 7, space: Space::Mmio, offset, size, data, posted }
}

fn read(offset: u64, size: AccessSize) -> Request {
    Request::Read { tag: 8, space: Space::Mmio, offset, size }
}

/// A valid request frame with payload byte `at` replaced by `value`.
fn patched_request(request: Request, at: usize, value: u8) -> [u8; Request::FRAME_LEN] {
    let mut bytes = request.encode();
    bytes[HEADER_LEN + at] = value;
    bytes
}

#[test]
fn requests_round_trip() {
    for size in AccessSize::ALL {
        for space in [Space::Mmio, Space::Pio] {
            let requests = [
                Request::Read { tag: 1, space, offset: 0x10, size },
                Request::Write {
                    tag: u32::MAX,
                    space,
                    offset: u64::MAX,
                    size,
                    data: 0xa5a5_a5a5_a5a5_a5a5 & size.mask(),
                    posted: true,
                },
                Request::Sync { tag: 3 },
            ];
            for r in requests {
                assert_eq!(Request::decode(&r.encode()).unwrap(), r);
                assert_eq!(IoFrame::decode(&r.encode()).unwrap(), IoFrame::Request(r));
            }
        }
    }
}

#[test]
fn request_layout_matches_the_spec() {
    let bytes = Request::Write {
        tag: 0x0403_0201,
        space: Space::Pio,
        offset: 0x3f8,
        size: AccessSize::Word,
        data: 0xbeef,
        posted: true,
    }
    .encode();
    let mut expected = b"NK\x01\x03\x18\0\0\0".to_vec();
    expected.extend_from_slice(&[1, 1, 2, 1, 1, 2, 3, 4]);
    expected.extend_from_slice(&0x3f8u64.to_le_bytes());
    expected.extend_from_slice(&0xbeefu64.to_le_bytes());
    assert_eq!(bytes.to_vec(), expected);
}

#[test]
fn encode_keeps_only_the_accessed_bytes() {
    let r = write(0, AccessSize::Byte, 0x1234, false);
    assert_eq!(Request::decode(&r.encode()).unwrap(), write(0, AccessSize::Byte, 0x34, false));
}

#[test]
fn replies_round_trip() {
    for size in AccessSize::ALL {
        let r = Reply::Read { tag: 9, size, data: size.mask() };
        assert_eq!(Reply::decode(&r.encode()).unwrap(), r);
    }
    for r in [Reply::Write { tag: 0 }, Reply::Sync { tag: u32::MAX }] {
        assert_eq!(Reply::decode(&r.encode()).unwrap(), r);
        assert_eq!(IoFrame::decode(&r.encode()).unwrap(), IoFrame::Reply(r));
    }
}

#[test]
fn hello_round_trips() {
    let hello = Hello { versions: VersionRange { min: 1, max: 4 }, region: REGION };
    assert_eq!(Hello::decode(&hello.encode()).unwrap(), hello);
    assert_eq!(Hello::FRAME_LEN, 40);
}

#[test]
fn unknown_op_is_rejected() {
    let bytes = patched_request(read(0, AccessSize::Byte), 0, 3);
    let err = Request::decode(&bytes).unwrap_err();
    assert!(matches!(err, WireError::UnknownOp { op: 3 }));
    assert_eq!(err.to_string(), "unknown op 3: not read (0), write (1) or sync (2)");

    let mut reply = Reply::Write { tag: 1 }.encode();
    reply[HEADER_LEN] = 0xff;
    assert!(matches!(Reply::decode(&reply), Err(WireError::UnknownOp { op: 0xff })));
}

#[test]
fn bad_access_sizes_are_rejected() {
    for bad in [0u8, 3, 5, 16, 255] {
        let bytes = patched_request(write(0, AccessSize::Byte, 0, false), 2, bad);
        let err = Request::decode(&bytes).unwrap_err();
        assert!(matches!(err, WireError::BadAccessSize { size } if size == u64::from(bad)), "{err}");
    }
    let err = Request::decode(&patched_request(read(0, AccessSize::Byte), 2, 3)).unwrap_err();
    assert_eq!(err.to_string(), "access size 3 is not 1, 2, 4 or 8");

    let mut reply = Reply::Read { tag: 1, size: AccessSize::Byte, data: 0 }.encode();
    reply[HEADER_LEN + 1] = 6;
    assert!(matches!(Reply::decode(&reply), Err(WireError::BadAccessSize { size: 6 })));
}

#[test]
fn unknown_space_is_rejected() {
    let bytes = patched_request(read(0, AccessSize::Byte), 1, 2);
    assert!(matches!(Request::decode(&bytes), Err(WireError::UnknownValue { field: "address space", value: 2 })));
}

#[test]
fn reserved_flags_and_posted_non_writes_are_rejected() {
    let bytes = patched_request(write(0, AccessSize::Byte, 0, false), 3, 0x80);
    assert!(matches!(Request::decode(&bytes), Err(WireError::ReservedNotZero { value: 0x80, .. })));
    let bytes = patched_request(read(0, AccessSize::Byte), 3, 1);
    let err = Request::decode(&bytes).unwrap_err();
    assert!(matches!(err, WireError::PostedNonWrite { op: Op::Read }));
    assert_eq!(err.to_string(), "a read cannot be posted; only writes can");
    let bytes = patched_request(Request::Sync { tag: 0 }, 3, 1);
    assert!(matches!(Request::decode(&bytes), Err(WireError::PostedNonWrite { op: Op::Sync })));
}

#[test]
fn data_wider_than_the_access_is_rejected() {
    let bytes = patched_request(write(0, AccessSize::Word, 0, false), 18, 1);
    let err = Request::decode(&bytes).unwrap_err();
    assert!(matches!(err, WireError::DataTooWide { data: 0x1_0000, size: AccessSize::Word }));
    assert_eq!(err.to_string(), "data 0x10000 does not fit in a 2-byte access");

    let mut reply = Reply::Read { tag: 1, size: AccessSize::Byte, data: 0 }.encode();
    reply[HEADER_LEN + 9] = 1;
    assert!(matches!(Reply::decode(&reply), Err(WireError::DataTooWide { data: 0x100, .. })));
}

#[test]
fn junk_in_unused_fields_is_rejected() {
    let bytes = patched_request(read(0, AccessSize::Byte), 16, 1);
    assert!(matches!(Request::decode(&bytes), Err(WireError::ReservedNotZero { field: "read data", .. })));
    for at in [1, 2, 8, 16] {
        let bytes = patched_request(Request::Sync { tag: 0 }, at, 1);
        assert!(matches!(Request::decode(&bytes), Err(WireError::ReservedNotZero { .. })));
    }
    for (at, field) in [(1, "reply size"), (2, "reply reserved"), (8, "reply data")] {
        let mut reply = Reply::Sync { tag: 1 }.encode();
        reply[HEADER_LEN + at] = 1;
        assert!(matches!(
            Reply::decode(&reply),
            Err(WireError::ReservedNotZero { field: f, .. }) if f == field
        ));
    }
    let mut hello = Hello { versions: VersionRange::CURRENT, region: REGION }.encode();
    hello[HEADER_LEN + 6] = 1;
    assert!(matches!(Hello::decode(&hello), Err(WireError::ReservedNotZero { .. })));
}

#[test]
fn decode_wants_exactly_one_frame_of_its_type() {
    let bytes = Reply::Write { tag: 1 }.encode();
    let err = Request::decode(&bytes).unwrap_err();
    assert!(matches!(err, WireError::UnexpectedFrame { expected: "request", found: "reply" }));
    let bytes = read(0, AccessSize::Byte).encode();
    assert!(matches!(Request::decode(&bytes[..20]), Err(WireError::ShortRead { got: 20, expected: 32 })));
    let mut long = bytes.to_vec();
    long.push(0);
    assert!(matches!(IoFrame::decode(&long), Err(WireError::TrailingBytes { len: 33, expected: 32 })));
}

#[test]
fn accesses_outside_the_region_are_rejected() {
    assert!(read(0x1ff8, AccessSize::Qword).validate(0x2000).is_ok());
    let err = read(0x1ffe, AccessSize::Dword).validate(0x2000).unwrap_err();
    assert_eq!(err.to_string(), "4-byte access at offset 0x1ffe is outside the 0x2000-byte region");
    assert!(matches!(
        write(u64::MAX, AccessSize::Word, 0, true).validate(u64::MAX),
        Err(WireError::OutsideRegion { offset: u64::MAX, .. })
    ));
    assert!(read(0x2000, AccessSize::Byte).validate(0x2000).is_err());
    assert!(Request::Sync { tag: 0 }.validate(0).is_ok());
}

#[test]
fn accesses_in_the_wrong_space_are_rejected() {
    let pio = Request::Read { tag: 0, space: Space::Pio, offset: 0, size: AccessSize::Byte };
    let err = pio.validate_in(&REGION).unwrap_err();
    assert_eq!(err.to_string(), "PIO request on a MMIO region");
    assert!(read(0, AccessSize::Byte).validate_in(&REGION).is_ok());
}

#[test]
fn bad_regions_are_rejected() {
    let region = |space, base, len| RegionInfo { id: 0, space, base, len };
    assert!(region(Space::Mmio, 0, 0).validate().is_err());
    assert!(region(Space::Mmio, u64::MAX, 2).validate().is_err());
    assert!(region(Space::Mmio, u64::MAX - 0xfff, 0x1000).validate().is_ok());
    assert!(region(Space::Pio, 0xfff8, 8).validate().is_ok());
    let err = region(Space::Pio, 0xfff8, 9).validate().unwrap_err();
    assert_eq!(err.to_string(), "PIO region 0xfff8+0x9 is empty or runs past the end of its address space");
}

#[test]
fn frames_stream_through_read_and_write() {
    let frames = [
        IoFrame::Hello(Hello { versions: VersionRange::CURRENT, region: REGION }),
        IoFrame::HelloAck(HelloAck::answer(VersionRange::CURRENT, VersionRange::CURRENT, 1)),
        IoFrame::Request(write(4, AccessSize::Dword, 0xdead_beef, true)),
        IoFrame::Reply(Reply::Sync { tag: 5 }),
    ];
    let mut stream = Vec::new();
    for f in &frames {
        write_frame(&mut stream, f).unwrap();
    }
    let mut r = &stream[..];
    for f in &frames {
        assert_eq!(read_frame(&mut r).unwrap().as_ref(), Some(f));
    }
    assert!(read_frame(&mut r).unwrap().is_none());
}

/// Runs `device` on one end of a socketpair in a thread; returns the other
/// end and the thread.
fn with_device<T: Send + 'static>(
    device: impl FnOnce(UnixStream) -> T + Send + 'static,
) -> (UnixStream, thread::JoinHandle<T>) {
    let (vm, dev) = UnixStream::pair().unwrap();
    (vm, thread::spawn(move || device(dev)))
}

#[test]
fn handshake_agrees_on_version_and_region() {
    let (vm, device) = with_device(|s| {
        let mut w = s.try_clone().unwrap();
        device_handshake(&mut &s, &mut w, VersionRange { min: 1, max: 3 })
    });
    let mut w = vm.try_clone().unwrap();
    let got = vm_handshake(&mut &vm, &mut w, REGION, VersionRange::CURRENT).unwrap();
    assert_eq!(got.version, 1);
    assert_eq!(device.join().unwrap().unwrap(), got);
}

#[test]
fn version_refusal_is_reported_on_both_sides() {
    let (vm, device) = with_device(|s| {
        let mut w = s.try_clone().unwrap();
        device_handshake(&mut &s, &mut w, VersionRange { min: 2, max: 2 })
    });
    let mut w = vm.try_clone().unwrap();
    let err = vm_handshake(&mut &vm, &mut w, REGION, VersionRange::CURRENT).unwrap_err();
    assert!(matches!(err, WireError::NoCommonVersion { .. }), "{err}");
    let err = device.join().unwrap().unwrap_err();
    assert!(matches!(err, WireError::NoCommonVersion { .. }), "{err}");
}

#[test]
fn a_hello_with_a_malformed_version_range_is_refused_without_an_ack() {
    for (min, max) in [(0, 2), (2, 1)] {
        let input = Hello { versions: VersionRange { min, max }, region: REGION }.encode();
        let mut out = Vec::new();
        let err = device_handshake(&mut &input[..], &mut out, VersionRange::IO_REGION).unwrap_err();
        assert!(matches!(err, WireError::BadVersionRange { .. }), "{min}..={max}: {err}");
        assert!(out.is_empty(), "{min}..={max}: no hello-ack");
    }
}

#[test]
fn device_handshake_wants_a_hello_first() {
    let mut input = read(0, AccessSize::Byte).encode().to_vec();
    let err = device_handshake(&mut &input[..], &mut Vec::new(), VersionRange::CURRENT).unwrap_err();
    assert!(matches!(err, WireError::UnexpectedFrame { expected: "hello", found: "request" }));
    input.clear();
    let err = device_handshake(&mut &input[..], &mut Vec::new(), VersionRange::CURRENT).unwrap_err();
    assert!(matches!(err, WireError::ShortRead { got: 0, .. }));
}

#[test]
fn device_handshake_refuses_bad_region_without_answering() {
    let hello = Hello { versions: VersionRange::CURRENT, region: RegionInfo { len: 0, ..REGION } };
    let mut out = Vec::new();
    let err = device_handshake(&mut &hello.encode()[..], &mut out, VersionRange::CURRENT).unwrap_err();
    assert!(matches!(err, WireError::BadRegion { len: 0, .. }));
    assert!(out.is_empty());
}

#[test]
fn vm_handshake_reports_a_device_that_closes() {
    let (vm, device) = with_device(drop);
    device.join().unwrap();
    let mut w = vm.try_clone().unwrap();
    let err = vm_handshake(&mut &vm, &mut w, REGION, VersionRange::CURRENT).unwrap_err();
    // Either the hello could not be written or the ack never came.
    assert!(matches!(err, WireError::ShortRead { got: 0, .. } | WireError::Io(_)), "{err}");
}

/// A device side built from the wire API alone: serves a 0x2000-byte
/// memory, logs posted writes, and answers every non-posted request.
fn echo_device(s: UnixStream) -> Result<Vec<Request>, WireError> {
    let mut w = s.try_clone()?;
    let mut r = &s;
    let hs = device_handshake(&mut r, &mut w, VersionRange::CURRENT)?;
    let mut mem = vec![0u8; hs.region.len as usize];
    let mut seen = Vec::new();
    while let Some(frame) = read_frame(&mut r)? {
        let IoFrame::Request(req) = frame else {
            return Err(WireError::UnexpectedFrame { expected: "request", found: frame.name() });
        };
        req.validate_in(&hs.region)?;
        seen.push(req);
        let reply = match req {
            Request::Read { tag, offset, size, .. } => {
                let mut b = [0u8; 8];
                let at = offset as usize;
                b[..size.bytes()].copy_from_slice(&mem[at..at + size.bytes()]);
                Some(Reply::Read { tag, size, data: u64::from_le_bytes(b) })
            }
            Request::Write { tag, offset, size, data, posted, .. } => {
                let at = offset as usize;
                mem[at..at + size.bytes()].copy_from_slice(&data.to_le_bytes()[..size.bytes()]);
                (!posted).then_some(Reply::Write { tag })
            }
            Request::Sync { tag } => Some(Reply::Sync { tag }),
        };
        if let Some(reply) = reply {
            write_frame(&mut w, &IoFrame::Reply(reply))?;
        }
    }
    Ok(seen)
}

#[test]
fn client_reads_back_posted_and_plain_writes_in_order() {
    let (vm, device) = with_device(echo_device);
    let mut c = Client::over(vm, REGION).unwrap();
    c.post(0, AccessSize::Qword, 0x1111_2222_3333_4444).unwrap();
    c.post(2, AccessSize::Word, 0xabcd).unwrap();
    c.write(7, AccessSize::Byte, 0x99).unwrap();
    assert_eq!(c.read(0, AccessSize::Qword).unwrap(), 0x9911_2222_abcd_4444);
    c.post(0x1ffc, AccessSize::Dword, 5).unwrap();
    c.sync().unwrap();
    assert!(matches!(c.read(0x1fff, AccessSize::Word), Err(WireError::OutsideRegion { .. })));
    drop(c);
    let seen = device.join().unwrap().unwrap();
    let ops: Vec<_> = seen.iter().map(|r| (r.op(), r.expects_reply())).collect();
    assert_eq!(
        ops,
        [
            (Op::Write, false),
            (Op::Write, false),
            (Op::Write, true),
            (Op::Read, true),
            (Op::Write, false),
            (Op::Sync, true),
        ]
    );
}

#[test]
fn client_rejects_a_reply_for_a_tag_never_sent() {
    let (vm, device) = with_device(|s| {
        let mut w = s.try_clone().unwrap();
        let mut r = &s;
        device_handshake(&mut r, &mut w, VersionRange::CURRENT).unwrap();
        let _ = read_frame(&mut r).unwrap();
        w.write_all(&Reply::Sync { tag: 0xbad }.encode()).unwrap();
    });
    let mut c = Client::over(vm, REGION).unwrap();
    let err = c.sync().unwrap_err();
    assert!(matches!(err, WireError::UnknownTag { tag: 0xbad }), "{err}");
    device.join().unwrap();
}

/// A device that drips its state, a chunk or a byte at a time, is given up
/// on once the state has taken longer than the deadline in all (each read
/// alone is quick enough for the socket's timeout).
#[test]
fn a_state_dripped_slowly_is_given_up_on_at_the_deadline() {
    for by_byte in [false, true] {
        let (vm, device) = with_device(move |s| {
            let mut w = s.try_clone().unwrap();
            device_handshake(&mut &s, &mut w, VersionRange::IO_REGION).unwrap();
            let Ok(Some(IoFrame::StateRequest(request))) = read_frame(&mut &s) else { panic!("no state request") };
            let state = vec![0x5a; 40 * state::STATE_CHUNK_DATA];
            let mut bytes = Vec::new();
            for chunk in StateChunk::split(request.tag, Some(&state)) {
                write_frame(&mut bytes, &IoFrame::StateChunk(chunk)).unwrap();
            }
            let step = if by_byte { 1 } else { StateChunk::FRAME_LEN };
            for piece in bytes.chunks(step) {
                thread::sleep(std::time::Duration::from_millis(20));
                if w.write_all(piece).is_err() {
                    return; // the VM side gave up and closed
                }
            }
        });
        let mut client = Client::over(vm, REGION).unwrap();
        client.state_deadline = std::time::Duration::from_millis(150);
        let started = std::time::Instant::now();
        let err = client.save_state().unwrap_err();
        assert!(matches!(err, WireError::StateTooSlow { .. }), "by byte {by_byte}: {err}");
        assert!(err.to_string().contains("state bytes in 150ms"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_millis(600), "{:?}", started.elapsed());
        drop(client);
        device.join().unwrap();
    }
}
