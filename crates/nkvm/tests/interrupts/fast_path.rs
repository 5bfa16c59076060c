//! The APIC bus's fast paths (version 2): a peer gets an eventfd for an
//! edge message and loses it with the bus; a bus without fast paths speaks
//! version 1; their GSIs are kept from the caller.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Duration;

use nkvm::irq::MsiMessage;
use nkvm::{VcpuConfig, Vm};
use nkvm_wire::apic::{ApicFrame, InterruptMessage};

use super::ioapic_bus::wait_for_failure;
use super::{install_idt, irq_vm, waiting_guest, Running};

/// An edge-triggered fixed message for vector 0x40 on vCPU 0.
const EDGE: InterruptMessage = InterruptMessage {
    destination: 0,
    destination_mode: nkvm_wire::apic::DestinationMode::Physical,
    delivery_mode: nkvm_wire::apic::DeliveryMode::Fixed,
    vector: 0x40,
    trigger_mode: nkvm_wire::apic::TriggerMode::Edge,
    level: true,
};

/// A VM with one waiting guest and a version-2 APIC-bus peer, its bus
/// attached with `options`: the guest, the peer's end and the version the
/// two agreed on.
fn guest_and_v2_peer(vm: &Vm, options: nkvm::ApicBusOptions) -> (Running, UnixStream, u16) {
    install_idt(vm, true);
    let run = Running::start(waiting_guest(vm, 0, VcpuConfig::default(), |_| {}));
    run.expect_ready();
    let (vm_end, dev_end) = UnixStream::pair().unwrap();
    let dev = thread::spawn(move || {
        let mut r = dev_end.try_clone().unwrap();
        let mut w = dev_end;
        let hs =
            nkvm_wire::apic::device_handshake(&mut r, &mut w, nkvm_wire::handshake::VersionRange::APIC_BUS).unwrap();
        (w, hs.version)
    });
    vm.attach_apic_bus_with(vm_end, options).unwrap();
    let (dev, version) = dev.join().unwrap();
    (run, dev, version)
}

/// A version-2 peer: its first edge-triggered message comes over the
/// socket, and the VM side answers with a fast path, an eventfd that
/// delivers that message with no socket and no VMM thread. A
/// level-triggered message gets none. When the bus dies the eventfd
/// injects nothing more: the peer cannot reach the guest once it is gone.
#[test]
fn a_version_2_peer_gets_a_fast_path_for_an_edge_message_and_loses_it_with_the_bus() {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let vm = irq_vm(1);
    let (run, mut dev, version) = guest_and_v2_peer(&vm, nkvm::ApicBusOptions::default());
    assert_eq!(version, 2);
    let edge = EDGE;
    dev.write_all(&edge.encode()).unwrap();
    run.expect_report(0x40);
    // The offer: the same message as frame type 5, with its eventfd.
    dev.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut frame = [0u8; InterruptMessage::FRAME_LEN];
    let (n, eventfd) = dev.recv_with_fd(&mut frame).unwrap();
    assert_eq!(n, frame.len());
    assert_eq!(ApicFrame::decode(&frame).unwrap(), ApicFrame::FastPath(edge));
    let mut eventfd = eventfd.expect("the offer carries an eventfd");
    for _ in 0..3 {
        eventfd.write_all(&1u64.to_ne_bytes()).unwrap();
        run.expect_report(0x40);
    }
    let level = InterruptMessage { vector: 0x41, trigger_mode: nkvm_wire::apic::TriggerMode::Level, ..edge };
    dev.write_all(&level.encode()).unwrap();
    run.expect_report(0x41);
    let stats = vm.apic_bus_stats().unwrap();
    assert_eq!((stats.messages, stats.fast_paths), (2, 1), "{stats:?}");
    // The peer goes away: its fast path goes with it. (The bus sees it
    // closed, or a level EOI still on its way finds the pipe broken.)
    drop(dev);
    let failure = wait_for_failure(&vm);
    assert!(failure.contains("closed") || failure.contains("Broken pipe"), "{failure}");
    eventfd.write_all(&1u64.to_ne_bytes()).unwrap();
    assert!(run.quiet_for(Duration::from_millis(300)), "a dead bus's eventfd still reached the guest");
}

/// With fast paths off the bus speaks version 1 to a version-2 peer:
/// every message comes over the socket, and nothing else is sent to it.
#[test]
fn a_bus_without_fast_paths_speaks_version_1_and_offers_none() {
    let vm = irq_vm(1);
    let (run, mut dev, version) = guest_and_v2_peer(&vm, nkvm::ApicBusOptions { fast_paths: false });
    assert_eq!(version, 1);
    let edge = EDGE;
    for _ in 0..3 {
        dev.write_all(&edge.encode()).unwrap();
        run.expect_report(0x40);
    }
    assert_eq!(vm.apic_bus_stats(), Some(nkvm::ApicBusStats { messages: 3, fast_paths: 0 }));
    dev.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let read = std::io::Read::read(&mut dev, &mut byte);
    assert!(read.is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock), "nothing was sent to the peer");
}

#[test]
fn msi_routes_reject_the_gsis_of_the_apic_bus_fast_paths() {
    let vm = irq_vm(1);
    for gsi in [nkvm::irq::FAST_PATH_GSIS.start, nkvm::irq::FAST_PATH_GSIS.end - 1] {
        let err = vm.set_msi_route(gsi, Some(MsiMessage::fixed(0, 0x40))).unwrap_err();
        assert!(err.to_string().contains(&format!("GSI {gsi} is reserved")), "{err}");
    }
    vm.set_msi_route(nkvm::irq::FAST_PATH_GSIS.start - 1, Some(MsiMessage::fixed(0, 0x40))).unwrap();
}

/// A v2 peer's end of a new bus on `vm`, handshake done; `None` while the
/// old bus still counts as attached.
fn try_attach_v2(vm: &Vm) -> Option<UnixStream> {
    let (vm_end, dev_end) = UnixStream::pair().unwrap();
    let dev = thread::spawn(move || {
        let (mut r, mut w) = (dev_end.try_clone().unwrap(), dev_end);
        nkvm_wire::apic::device_handshake(&mut r, &mut w, nkvm_wire::handshake::VersionRange::APIC_BUS).ok().map(|_| w)
    });
    match vm.attach_apic_bus(vm_end) {
        Ok(()) => Some(dev.join().unwrap().expect("the new peer's handshake")),
        Err(e) => {
            assert!(e.to_string().contains("already attached"), "{e}");
            let _ = dev.join();
            None
        }
    }
}

/// The fast path's eventfd in the offer the peer at `dev` receives.
fn take_offer(dev: &UnixStream) -> std::fs::File {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    dev.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut frame = [0u8; InterruptMessage::FRAME_LEN];
    let (n, eventfd) = dev.recv_with_fd(&mut frame).unwrap();
    assert_eq!((n, ApicFrame::decode(&frame).unwrap()), (frame.len(), ApicFrame::FastPath(EDGE)));
    eventfd.expect("the offer carries an eventfd")
}

/// A bus attached as soon as the old one failed, while the old bus's
/// thread is still busy with a backlog of its peer's messages: the old
/// thread, ending, takes down its own fast paths only. (Each bus chose
/// fast-path GSIs among its own offers: the new one took the old one's
/// GSI, whose route the old thread then removed, and the new peer's
/// eventfd reached nobody, with no error to fall back on.)
#[test]
fn a_bus_that_replaces_a_failed_one_keeps_its_fast_path_when_the_old_thread_ends() {
    use nkvm_wire::apic::TriggerMode;
    let vm = irq_vm(1);
    let (run, mut old, _) = guest_and_v2_peer(&vm, nkvm::ApicBusOptions::default());
    old.write_all(&EDGE.encode()).unwrap();
    run.expect_report(0x40);
    let _old_path = take_offer(&old);
    // The old peer stops reading, so the EOI of its level message fails the
    // bus; behind that message, a backlog whose routes change each time
    // (a KVM_SET_GSI_ROUTING each) keeps the old thread busy.
    old.shutdown(std::net::Shutdown::Read).unwrap();
    let level = InterruptMessage { vector: 0x41, trigger_mode: TriggerMode::Level, ..EDGE };
    let mut burst = level.encode().to_vec();
    for i in 0..20_000u32 {
        let m = InterruptMessage { vector: 0x50, trigger_mode: TriggerMode::Level, destination: 2 + (i % 2), ..EDGE };
        burst.extend_from_slice(&m.encode());
    }
    let mut old_writer = old.try_clone().unwrap();
    let backlog = thread::spawn(move || {
        let _ = old_writer.write_all(&burst);
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut new = loop {
        if let Some(new) = try_attach_v2(&vm) {
            break new;
        }
        assert!(std::time::Instant::now() < deadline, "the old bus never failed");
        thread::sleep(Duration::from_millis(1));
    };
    run.expect_report(0x41);
    new.write_all(&EDGE.encode()).unwrap();
    run.expect_report(0x40);
    let mut path = take_offer(&new);
    backlog.join().unwrap();
    // The old thread has its backlog to finish, then ends.
    thread::sleep(Duration::from_secs(3));
    while !run.quiet_for(Duration::from_millis(200)) {}
    path.write_all(&1u64.to_ne_bytes()).unwrap();
    run.expect_report(0x40);
    drop(old);
}
