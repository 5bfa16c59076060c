//! Unit tests of the APIC-bus protocol: round trips, and one test per
//! malformed input.

use std::os::unix::net::UnixStream;
use std::thread;

use super::*;
use crate::handshake::VersionRange;

const MESSAGE: InterruptMessage = InterruptMessage {
    destination: 0x0102_0304,
    destination_mode: DestinationMode::Logical,
    delivery_mode: DeliveryMode::LowestPriority,
    vector: 0x31,
    trigger_mode: TriggerMode::Level,
    level: true,
};

#[test]
fn interrupt_messages_round_trip_in_every_mode() {
    for delivery_mode in DeliveryMode::ALL {
        for destination_mode in [DestinationMode::Physical, DestinationMode::Logical] {
            for trigger_mode in [TriggerMode::Edge, TriggerMode::Level] {
                for level in [false, true] {
                    let m = InterruptMessage { delivery_mode, destination_mode, trigger_mode, level, ..MESSAGE };
                    assert_eq!(InterruptMessage::decode(&m.encode()).unwrap(), m);
                    assert_eq!(ApicFrame::decode(&m.encode()).unwrap(), ApicFrame::Interrupt(m));
                }
            }
        }
    }
}

#[test]
fn a_fast_path_offer_is_the_interrupt_layout_with_frame_type_5() {
    let edge = InterruptMessage { trigger_mode: TriggerMode::Edge, delivery_mode: DeliveryMode::Fixed, ..MESSAGE };
    let offer = edge.encode_fast_path();
    assert_eq!(offer[3], FRAME_FAST_PATH);
    assert_eq!(offer[4..], edge.encode()[4..], "the same length and payload as the interrupt frame");
    assert_eq!(ApicFrame::decode(&offer).unwrap(), ApicFrame::FastPath(edge));
    assert_eq!(ApicFrame::FastPath(edge).encode().as_ref(), &offer[..]);
    assert_eq!(payload_len(FRAME_FAST_PATH), Some(INTERRUPT_PAYLOAD_LEN));
    assert_eq!(frame_name(FRAME_FAST_PATH), "fast path");
    let mut bad = offer;
    bad[HEADER_LEN + 12] = 1;
    assert!(matches!(ApicFrame::decode(&bad), Err(WireError::ReservedNotZero { .. })), "{:?}", ApicFrame::decode(&bad));
}

#[test]
fn version_2_is_spoken_only_when_both_ends_offer_it() {
    assert_eq!(VersionRange::APIC_BUS.negotiate(VersionRange::APIC_BUS), Some(2));
    assert_eq!(VersionRange::APIC_BUS.negotiate(VersionRange::CURRENT), Some(1));
    assert_eq!(VersionRange::CURRENT.negotiate(VersionRange::APIC_BUS), Some(1));
}

#[test]
fn interrupt_layout_matches_the_spec() {
    let mut expected = b"NK\x02\x03\x10\0\0\0".to_vec();
    expected.extend_from_slice(&[4, 3, 2, 1, 1, 1, 0x31, 1, 1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(MESSAGE.encode().to_vec(), expected);
    assert_eq!(EoiMessage { vector: 0x31 }.encode().to_vec(), b"NK\x02\x04\x08\0\0\0\x31\0\0\0\0\0\0\0".to_vec());
}

#[test]
fn eoi_and_hello_round_trip() {
    for vector in [0, 0x20, 0xff] {
        let m = EoiMessage { vector };
        assert_eq!(EoiMessage::decode(&m.encode()).unwrap(), m);
    }
    let hello = Hello { versions: VersionRange { min: 1, max: 2 }, bus_id: u64::MAX };
    assert_eq!(Hello::decode(&hello.encode()).unwrap(), hello);
}

#[test]
fn reserved_delivery_modes_are_rejected() {
    for bad in [3u8, 6, 8, 0xff] {
        let mut bytes = MESSAGE.encode();
        bytes[HEADER_LEN + 5] = bad;
        let err = InterruptMessage::decode(&bytes).unwrap_err();
        assert!(
            matches!(err, WireError::UnknownValue { field: "delivery mode", value } if value == u64::from(bad)),
            "{err}"
        );
    }
    let mut bytes = MESSAGE.encode();
    bytes[HEADER_LEN + 5] = 3;
    assert_eq!(InterruptMessage::decode(&bytes).unwrap_err().to_string(), "delivery mode 0x3 is not a known value");
}

#[test]
fn bad_modes_levels_and_reserved_bytes_are_rejected() {
    for (at, field) in [(4, "destination mode"), (7, "trigger mode"), (8, "level")] {
        let mut bytes = MESSAGE.encode();
        bytes[HEADER_LEN + at] = 2;
        assert!(matches!(
            InterruptMessage::decode(&bytes),
            Err(WireError::UnknownValue { field: f, value: 2 }) if f == field
        ));
    }
    let mut bytes = MESSAGE.encode();
    bytes[HEADER_LEN + 15] = 1;
    assert!(matches!(InterruptMessage::decode(&bytes), Err(WireError::ReservedNotZero { .. })));
    let mut eoi = EoiMessage { vector: 1 }.encode();
    eoi[HEADER_LEN + 1] = 1;
    assert!(matches!(EoiMessage::decode(&eoi), Err(WireError::ReservedNotZero { value: 1, .. })));
    let mut hello = Hello { versions: VersionRange::CURRENT, bus_id: 0 }.encode();
    hello[HEADER_LEN + 4] = 1;
    assert!(matches!(Hello::decode(&hello), Err(WireError::ReservedNotZero { .. })));
}

#[test]
fn frames_of_the_other_protocol_or_type_are_rejected() {
    let io = crate::ioregion::Reply::Sync { tag: 0 }.encode();
    assert!(matches!(ApicFrame::decode(&io), Err(WireError::WrongProtocol { found: 1, .. })));
    let err = InterruptMessage::decode(&EoiMessage { vector: 1 }.encode()).unwrap_err();
    assert!(matches!(err, WireError::UnexpectedFrame { expected: "interrupt", found: "EOI" }));
    let mut oversized = EoiMessage { vector: 1 }.encode();
    oversized[4] = 17;
    assert!(matches!(ApicFrame::decode(&oversized), Err(WireError::OversizedFrame { len: 17, .. })));
    let mut unknown = EoiMessage { vector: 1 }.encode();
    unknown[3] = 9;
    assert!(matches!(ApicFrame::decode(&unknown), Err(WireError::UnknownFrameType { frame_type: 9, .. })));
}

#[test]
fn handshake_then_messages_both_ways() {
    let (vm, dev) = UnixStream::pair().unwrap();
    let device = thread::spawn(move || -> Result<Vec<ApicFrame>, WireError> {
        let mut w = dev.try_clone()?;
        let mut r = &dev;
        let hs = device_handshake(&mut r, &mut w, VersionRange::CURRENT)?;
        assert_eq!(hs.bus_id, 0xb05);
        write_frame(&mut w, &ApicFrame::Interrupt(MESSAGE))?;
        let mut got = Vec::new();
        while let Some(f) = read_frame(&mut r)? {
            got.push(f);
        }
        Ok(got)
    });
    let mut w = vm.try_clone().unwrap();
    let mut r = &vm;
    let hs = vm_handshake(&mut r, &mut w, 0xb05, VersionRange::CURRENT).unwrap();
    assert_eq!(hs.version, 1);
    assert_eq!(read_frame(&mut r).unwrap(), Some(ApicFrame::Interrupt(MESSAGE)));
    write_frame(&mut w, &ApicFrame::Eoi(EoiMessage { vector: 0x31 })).unwrap();
    drop((w, vm));
    assert_eq!(device.join().unwrap().unwrap(), [ApicFrame::Eoi(EoiMessage { vector: 0x31 })]);
}

#[test]
fn handshake_failures_are_named() {
    let (vm, dev) = UnixStream::pair().unwrap();
    let device = thread::spawn(move || {
        let mut w = dev.try_clone().unwrap();
        device_handshake(&mut &dev, &mut w, VersionRange { min: 5, max: 6 })
    });
    let mut w = vm.try_clone().unwrap();
    let err = vm_handshake(&mut &vm, &mut w, 1, VersionRange::CURRENT).unwrap_err();
    assert!(matches!(err, WireError::NoCommonVersion { .. }), "{err}");
    assert!(matches!(device.join().unwrap(), Err(WireError::NoCommonVersion { .. })));

    let eoi = EoiMessage { vector: 1 }.encode();
    let err = device_handshake(&mut &eoi[..], &mut Vec::new(), VersionRange::CURRENT).unwrap_err();
    assert!(matches!(err, WireError::UnexpectedFrame { expected: "hello", found: "EOI" }));
    let err = vm_handshake(&mut &[][..], &mut Vec::new(), 1, VersionRange { min: 0, max: 1 }).unwrap_err();
    assert!(matches!(err, WireError::BadVersionRange { min: 0, max: 1 }));
}
