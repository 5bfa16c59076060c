//! Posted writes to a device in another process (here a fake peer on a
//! socket pair, speaking nkvm-wire) reach it before anything the guest may
//! be waiting on: before an exit returned to the caller, before a later
//! sync access by the same vCPU however another vCPU is flushing, and
//! before their region is detached, even the ones KVM holds in its
//! coalesced ring.

mod common;

use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use iced_x86::code_asm::*;
use nkvm::io::{IoRange, Ordering};
use nkvm::{Exit, GuestAddress, RunState, Vcpu, VmConfig};
use nkvm_wire::handshake::VersionRange;
use nkvm_wire::ioregion::{device_handshake, read_frame, write_frame, IoFrame, Reply, Request};

/// A device side that answers every request (a sync after `sync_delay`)
/// and reports each, with when it came, as it comes.
fn peer(dev: UnixStream, sync_delay: Duration) -> mpsc::Receiver<(Request, Instant)> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut r = dev.try_clone().unwrap();
        let mut w = dev;
        device_handshake(&mut r, &mut w, VersionRange::IO_REGION).unwrap();
        while let Ok(Some(IoFrame::Request(q))) = read_frame(&mut r) {
            let at = Instant::now();
            let reply = match q {
                Request::Sync { tag } => {
                    thread::sleep(sync_delay);
                    Some(Reply::Sync { tag })
                }
                Request::Read { tag, size, .. } => Some(Reply::Read { tag, size, data: 0 }),
                Request::Write { tag, posted: false, .. } => Some(Reply::Write { tag }),
                _ => None,
            };
            if let Some(reply) = reply {
                write_frame(&mut w, &IoFrame::Reply(reply)).unwrap();
            }
            if tx.send((q, at)).is_err() {
                return;
            }
        }
    });
    rx
}

/// The data of the writes `rx` has seen, waiting up to `wait` for more.
fn writes(rx: &mpsc::Receiver<(Request, Instant)>, wait: Duration) -> Vec<u64> {
    let deadline = Instant::now() + wait;
    let mut seen = Vec::new();
    while let Ok((q, _)) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        if let Request::Write { data, .. } = q {
            seen.push(data);
        }
    }
    seen
}

/// Runs `vcpu` on a thread of its own until it halts (or shuts down).
fn run_to_halt(mut vcpu: Vcpu) -> thread::JoinHandle<Exit> {
    thread::spawn(move || {
        let mut run = RunState::new();
        loop {
            let exit = vcpu.enter_guest(&mut run).unwrap();
            if matches!(exit, Exit::Hlt | Exit::Shutdown | Exit::InternalError(_)) {
                return exit;
            }
        }
    })
}

#[test]
fn a_posted_write_reaches_the_device_before_the_exit_the_guest_made_next() {
    let vm = vm_with(VmConfig { vcpus: 1, memory: 16 << 20, ..Default::default() });
    let (vm_end, dev_end) = UnixStream::pair().unwrap();
    let rx = peer(dev_end, Duration::ZERO);
    vm.attach_region(IoRange::mmio(MMIO_BASE, 0x40), vm_end, Ordering::Posted).unwrap();
    // A doorbell, then a halt waiting for the device's answer.
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        a.mov(rbx, MMIO_BASE).unwrap();
        a.mov(rcx, 7u64).unwrap();
        a.mov(qword_ptr(rbx + 0x20), rcx).unwrap();
        a.hlt().unwrap();
    });
    let mut run = RunState::new();
    assert_eq!(vcpu.enter_guest(&mut run).unwrap(), Exit::Hlt);
    // Already sent when the exit came back: nothing to wait for.
    assert_eq!(writes(&rx, Duration::ZERO), vec![7], "the doorbell was sent before the halt was returned");
}

#[test]
fn a_vcpus_posted_write_goes_before_its_later_sync_read_while_another_vcpu_flushes() {
    let vm = vm_with(VmConfig { vcpus: 2, memory: 16 << 20, ..Default::default() });
    let base = |i: u64| MMIO_BASE + (i << 16);
    let (w, x, z, z2) = (base(0), base(1), base(2), base(3));
    // W's device confirms posted writes slowly: vCPU 0's flush of it is
    // under way while vCPU 1 reads.
    let mut peers = Vec::new();
    for (at, ordering, delay) in [
        (w, Ordering::Posted, Duration::from_millis(1500)),
        (x, Ordering::Posted, Duration::ZERO),
        (z, Ordering::Sync, Duration::ZERO),
        (z2, Ordering::Sync, Duration::ZERO),
    ] {
        let (vm_end, dev_end) = UnixStream::pair().unwrap();
        peers.push(peer(dev_end, delay));
        vm.attach_region(IoRange::mmio(at, 0x40), vm_end, ordering).unwrap();
    }
    // vCPU 0: once vCPU 1 has posted, posts to W, says so, reads Z.
    let a = long_mode_guest(&vm, 0, |a| {
        a.mov(rsi, 0x5000u64).unwrap();
        let mut wait = a.create_label();
        a.set_label(&mut wait).unwrap();
        a.mov(rdx, qword_ptr(rsi)).unwrap();
        a.test(rdx, rdx).unwrap();
        a.jz(wait).unwrap();
        a.mov(rbx, w).unwrap();
        a.mov(rcx, 1u64).unwrap();
        a.mov(qword_ptr(rbx + 0x20), rcx).unwrap();
        a.mov(qword_ptr(rsi + 8), rcx).unwrap();
        a.mov(rbx, z).unwrap();
        a.mov(rax, qword_ptr(rbx)).unwrap();
        a.hlt().unwrap();
    });
    // vCPU 1: posts to X, says so, waits for vCPU 0's post, spins a little
    // (into vCPU 0's flush), reads Z2.
    let c = long_mode_guest(&vm, 1, |a| {
        a.mov(rsi, 0x5000u64).unwrap();
        a.mov(rbx, x).unwrap();
        a.mov(rcx, 1u64).unwrap();
        a.mov(qword_ptr(rbx + 0x20), rcx).unwrap();
        a.mov(qword_ptr(rsi), rcx).unwrap();
        let mut wait = a.create_label();
        a.set_label(&mut wait).unwrap();
        a.mov(rdx, qword_ptr(rsi + 8)).unwrap();
        a.test(rdx, rdx).unwrap();
        a.jz(wait).unwrap();
        a.mov(ecx, 200_000u32).unwrap();
        let mut delay = a.create_label();
        a.set_label(&mut delay).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(delay).unwrap();
        a.mov(rbx, z2).unwrap();
        a.mov(rax, qword_ptr(rbx)).unwrap();
        a.hlt().unwrap();
    });
    let (ta, tc) = (run_to_halt(a), run_to_halt(c));
    assert_eq!(ta.join().unwrap(), Exit::Hlt);
    assert_eq!(tc.join().unwrap(), Exit::Hlt);
    let first = |rx: &mpsc::Receiver<(Request, Instant)>, want: fn(&Request) -> bool| loop {
        let (q, at) = rx.recv_timeout(Duration::from_secs(10)).expect("a request that never came");
        if want(&q) {
            return at;
        }
    };
    let x_write = first(&peers[1], |q| matches!(q, Request::Write { .. }));
    let z2_read = first(&peers[3], |q| matches!(q, Request::Read { .. }));
    assert!(x_write < z2_read, "vCPU 1's read of Z2 overtook its own earlier posted write to X");
}

#[test]
fn detaching_a_coalesced_region_delivers_the_writes_kvm_still_holds() {
    let vm = vm_with(VmConfig { vcpus: 1, memory: 16 << 20, ..Default::default() });
    let (vm_end, dev_end) = UnixStream::pair().unwrap();
    let rx = peer(dev_end, Duration::ZERO);
    let id = vm.attach_region(IoRange::mmio(MMIO_BASE, 0x40), vm_end, Ordering::Posted).unwrap();
    // Ten posted writes (into KVM's coalesced ring, without an exit where
    // the host has one), then a flag in RAM, then a spin: no exit drains
    // the ring by itself.
    let vcpu = long_mode_guest(&vm, 0, |a| {
        a.mov(rbx, MMIO_BASE).unwrap();
        for i in 1..=10u64 {
            a.mov(rcx, i).unwrap();
            a.mov(qword_ptr(rbx + 0x20), rcx).unwrap();
        }
        a.mov(rax, 0x5000u64).unwrap();
        a.mov(rcx, 1u64).unwrap();
        a.mov(qword_ptr(rax), rcx).unwrap();
        let mut spin = a.create_label();
        a.set_label(&mut spin).unwrap();
        a.pause().unwrap();
        a.jmp(spin).unwrap();
    });
    let kicker = vcpu.kicker();
    let guest = thread::spawn(move || {
        let mut vcpu = vcpu;
        let mut run = RunState::new();
        loop {
            match vcpu.enter_guest(&mut run).unwrap() {
                Exit::Kicked => return,
                Exit::IoIn { .. } | Exit::IoOut { .. } => {}
                other => panic!("unexpected {other}"),
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut flag = [0u8; 1];
    while flag[0] != 1 {
        assert!(Instant::now() < deadline, "the guest never set its flag");
        thread::sleep(Duration::from_millis(5));
        vm.read_memory(GuestAddress(0x5000), &mut flag).unwrap();
    }
    vm.detach_region(id).unwrap();
    // Already delivered when detach returned.
    assert_eq!(writes(&rx, Duration::ZERO), (1..=10).collect::<Vec<u64>>());
    kicker.kick();
    guest.join().unwrap();
}
