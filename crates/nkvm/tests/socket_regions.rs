//! Socket I/O regions at their edges, with a real guest and a device on
//! the other end of a socketpair: an access KVM splits at a page boundary
//! (into sizes the wire does not carry), and a device failure that only a
//! flush of posted writes finds.

mod common;

use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::*;
use iced_x86::code_asm::*;
use nkvm::io::{IoRange, Ordering};
use nkvm::{Exit, GuestAddress, RunState, VmConfig};
use nkvm_wire::handshake::VersionRange;
use nkvm_wire::ioregion::{device_handshake, read_frame, write_frame, AccessSize, IoFrame, Reply, Request};

/// A device whose every read returns bytes 0x10, 0x11, ... from the
/// offset read (byte `i` of the region reads as `0x10 + i`); it reports
/// each request it gets.
fn counting_device(dev: UnixStream) -> mpsc::Receiver<Request> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut r = dev.try_clone().unwrap();
        let mut w = dev;
        device_handshake(&mut r, &mut w, VersionRange::IO_REGION).unwrap();
        while let Ok(Some(IoFrame::Request(q))) = read_frame(&mut r) {
            let reply = match q {
                Request::Sync { tag } => Some(Reply::Sync { tag }),
                Request::Read { tag, offset, size, .. } => {
                    let data = (0..size.bytes() as u64).fold(0u64, |v, i| v | ((0x10 + offset + i) & 0xff) << (8 * i));
                    Some(Reply::Read { tag, size, data })
                }
                Request::Write { tag, posted: false, .. } => Some(Reply::Write { tag }),
                _ => None,
            };
            if let Some(reply) = reply {
                write_frame(&mut w, &IoFrame::Reply(reply)).unwrap();
            }
            let _ = tx.send(q);
        }
    });
    rx
}

#[test]
fn an_access_split_at_a_page_boundary_reaches_the_device_as_wire_sized_pieces() {
    let vm = vm_with(VmConfig { vcpus: 1, memory: 16 << 20, ..Default::default() });
    let (vm_end, dev_end) = UnixStream::pair().unwrap();
    let requests = counting_device(dev_end);
    vm.attach_region(IoRange::mmio(MMIO_BASE, 0x2000), vm_end, Ordering::Sync).unwrap();
    // An 8-byte load and store at 0xffd: KVM splits each into 3 + 5 bytes.
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        a.mov(rbx, MMIO_BASE + 0xffd).unwrap();
        a.mov(rax, qword_ptr(rbx)).unwrap();
        a.mov(rsi, 0x5000u64).unwrap();
        a.mov(qword_ptr(rsi), rax).unwrap();
        a.mov(rcx, 0x1122_3344_5566_7788u64).unwrap();
        a.mov(qword_ptr(rbx), rcx).unwrap();
        a.hlt().unwrap();
    });
    run_to_hlt_within(&mut vcpu, Duration::from_secs(10));
    assert!(vm.io_region_failures().is_empty(), "{:?}", vm.io_region_failures());
    let mut read = [0u8; 8];
    vm.read_memory(GuestAddress(0x5000), &mut read).unwrap();
    // Bytes 0xffd..0x1005 of the region, each 0x10 + its offset (low byte).
    let want: Vec<u8> = (0xffdu64..0x1005).map(|o| ((0x10 + o) & 0xff) as u8).collect();
    assert_eq!(read.to_vec(), want, "the guest's load, put together from the pieces");
    let seen: Vec<Request> = requests.try_iter().collect();
    let pieces: Vec<(bool, u64, u64, u64)> = seen
        .iter()
        .filter_map(|q| match *q {
            Request::Read { offset, size, .. } => Some((false, offset, size.bytes() as u64, 0)),
            Request::Write { offset, size, data, .. } => Some((true, offset, size.bytes() as u64, data)),
            Request::Sync { .. } => None,
        })
        .collect();
    assert_eq!(
        pieces,
        vec![
            (false, 0xffd, 2, 0),
            (false, 0xfff, 1, 0),
            (false, 0x1000, 4, 0),
            (false, 0x1004, 1, 0),
            (true, 0xffd, 2, 0x7788),
            (true, 0xfff, 1, 0x66),
            (true, 0x1000, 4, 0x2233_4455),
            (true, 0x1004, 1, 0x11),
        ],
        "{seen:?}"
    );
    assert!(AccessSize::from_bytes(3).is_err(), "the wire itself has no 3-byte access");
}

#[test]
fn a_failure_only_a_flush_finds_is_reported_at_the_next_entry() {
    let vm = vm_with(VmConfig { vcpus: 1, memory: 16 << 20, ..Default::default() });
    let (vm_end, dev_end) = UnixStream::pair().unwrap();
    // A device that completes the handshake and then goes away.
    let device = thread::spawn(move || {
        let mut r = dev_end.try_clone().unwrap();
        let mut w = dev_end;
        device_handshake(&mut r, &mut w, VersionRange::IO_REGION).unwrap();
    });
    let id = vm.attach_region(IoRange::mmio(MMIO_BASE, 0x40), vm_end, Ordering::Posted).unwrap();
    device.join().unwrap();
    // A posted doorbell, then hlt: the flush before the Hlt exit finds the
    // device gone.
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        a.mov(rbx, MMIO_BASE).unwrap();
        a.mov(rcx, 7u64).unwrap();
        a.mov(qword_ptr(rbx + 0x20), rcx).unwrap();
        a.hlt().unwrap();
        a.hlt().unwrap();
    });
    let mut run = RunState::new();
    assert_eq!(vcpu.enter_guest(&mut run).unwrap(), Exit::Hlt, "the guest's own exit comes first");
    assert_eq!(vm.io_region_failures().len(), 1, "{:?}", vm.io_region_failures());
    assert_eq!(vcpu.enter_guest(&mut run).unwrap(), Exit::IoRegionFailed { id }, "then the failure, once");
    assert_eq!(vcpu.enter_guest(&mut run).unwrap(), Exit::Hlt, "and the guest goes on");
}
