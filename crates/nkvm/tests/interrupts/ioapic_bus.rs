//! An IOAPIC model on the APIC bus: over its socket and on its in-process
//! direct path (edge, level with EOI and re-delivery, order, a level
//! interrupt moved through more vectors than there are routes), and a bus
//! peer that lies, dies or never answers.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use nkvm::io::IoRange;
use nkvm::{Exit, VcpuConfig, Vm};
use nkvm_devices::ioapic::Ioapic;
use nkvm_devices::{ApicBusSink, IoDevice};
use nkvm_wire::apic::{ApicFrame, InterruptMessage};

use super::{install_idt, install_idt_for, irq_vm, waiting_guest, Running, REPORT};

/// Attaches a new APIC bus to `vm` and returns the peer's end, handshake
/// done (reader, writer).
fn bus_peer(vm: &Vm) -> (UnixStream, UnixStream) {
    let (vm_end, dev_end) = UnixStream::pair().unwrap();
    let dev = thread::spawn(move || {
        let mut r = dev_end.try_clone().unwrap();
        let mut w = dev_end;
        nkvm_wire::apic::device_handshake(&mut r, &mut w, nkvm_wire::handshake::VersionRange::CURRENT).unwrap();
        (r, w)
    });
    vm.attach_apic_bus(vm_end).unwrap();
    dev.join().unwrap()
}

fn ioapic_on_bus(vm: &Vm) -> Arc<Mutex<Ioapic<BusSink>>> {
    let (mut reader, writer) = bus_peer(vm);
    let ioapic = Arc::new(Mutex::new(Ioapic::new(BusSink(Arc::new(Mutex::new(writer))))));
    vm.attach_handler(IoRange::mmio(0xfec0_0000, 0x100), Box::new(IoapicRegs(ioapic.clone()))).unwrap();
    let eoi_target = ioapic.clone();
    thread::spawn(move || {
        while let Ok(Some(ApicFrame::Eoi(e))) = nkvm_wire::apic::read_frame(&mut reader) {
            eoi_target.lock().unwrap().end_of_interrupt(e.vector);
        }
    });
    ioapic
}

/// Guest code programming IOAPIC pin `pin` to `vector` (level or edge) for APIC 0.
fn program_pin(a: &mut CodeAssembler, pin: u32, vector: u32, level: bool) {
    a.mov(rbx, 0xfec0_0000u64).unwrap();
    a.mov(dword_ptr(rbx), 0x10 + 2 * pin).unwrap();
    a.mov(dword_ptr(rbx + 0x10), vector | if level { 1 << 15 } else { 0 }).unwrap();
    a.mov(dword_ptr(rbx), 0x11 + 2 * pin).unwrap();
    a.mov(dword_ptr(rbx + 0x10), 0).unwrap();
}

/// The IOAPIC model on the APIC bus's direct path: its messages go through
/// [`nkvm::ApicBus::send`], the EOIs come back by a call (recorded here).
struct DirectSink(nkvm::ApicBus);

impl ApicBusSink for DirectSink {
    fn send(&mut self, message: InterruptMessage) {
        self.0.send(&message).unwrap();
    }
}

type EoiLog = Arc<Mutex<Vec<u8>>>;
type DirectIoapic = Arc<Mutex<Ioapic<DirectSink>>>;

fn ioapic_in_process(vm: &Vm) -> (DirectIoapic, EoiLog) {
    let target: Arc<Mutex<Option<DirectIoapic>>> = Arc::default();
    let eois = EoiLog::default();
    let (t, log) = (target.clone(), eois.clone());
    let bus = vm
        .attach_apic_bus_in_process(Box::new(move |vector: u8| {
            log.lock().unwrap().push(vector);
            if let Some(ioapic) = &*t.lock().unwrap() {
                ioapic.lock().unwrap().end_of_interrupt(vector);
            }
        }))
        .unwrap();
    let ioapic = Arc::new(Mutex::new(Ioapic::new(DirectSink(bus))));
    *target.lock().unwrap() = Some(ioapic.clone());
    vm.attach_handler(IoRange::mmio(0xfec0_0000, 0x100), Box::new(IoapicRegs(ioapic.clone()))).unwrap();
    (ioapic, eois)
}

/// Edge on pin 4 (vector 0x40), then level on pin 5 (0x50) held for two
/// deliveries and dropped: what the IOAPIC tests check on either path.
fn edge_then_level<S: ApicBusSink>(vm: &Vm, ioapic: &Mutex<Ioapic<S>>) {
    let run = Running::start(waiting_guest(vm, 0, VcpuConfig::default(), |a| {
        program_pin(a, 4, 0x40, false);
        program_pin(a, 5, 0x50, true);
    }));
    run.expect_ready();
    // Edge: one pulse, one interrupt.
    ioapic.lock().unwrap().set_irq(4, true);
    ioapic.lock().unwrap().set_irq(4, false);
    run.expect_report(0x40);
    // Level: while the line stays asserted, every EOI brings it back.
    ioapic.lock().unwrap().set_irq(5, true);
    run.expect_report(0x50);
    run.expect_report(0x50);
    ioapic.lock().unwrap().set_irq(5, false);
    // Once the line drops the interrupt stops: reports already made before
    // the drop may still be queued (how many depends on scheduling on a
    // loaded host), then the guest goes quiet for good.
    let give_up = Instant::now() + Duration::from_secs(10);
    let mut extra = 0;
    while let Ok(e) = run.exits.recv_timeout(Duration::from_millis(300)) {
        assert_eq!(e, Exit::IoOut { port: REPORT, size: 4, data: 0x50 });
        extra += 1;
        assert!(Instant::now() < give_up, "the level interrupt kept coming after the line dropped ({extra})");
    }
}

#[test]
fn ioapic_on_the_apic_bus_delivers_edge_and_level_with_eoi() {
    let vm = irq_vm(1);
    install_idt(&vm, true);
    let ioapic = ioapic_on_bus(&vm);
    edge_then_level(&vm, &ioapic);
    assert_eq!(vm.apic_bus_failure(), None);
}

#[test]
fn in_process_apic_bus_delivers_and_eois_in_order_without_a_socket() {
    let vm = irq_vm(1);
    install_idt(&vm, true);
    let (ioapic, eois) = ioapic_in_process(&vm);
    edge_then_level(&vm, &ioapic);
    // Only the level vector's EOIs travel the bus (KVM reports EOIs for
    // level routes), one per delivery, none after the guest went quiet.
    let eois = eois.lock().unwrap().clone();
    assert!(eois.len() >= 2, "EOIs seen: {eois:x?}");
    assert!(eois.iter().all(|&v| v == 0x50), "EOIs seen: {eois:x?}");
    // A second bus is refused while this one lives.
    assert!(matches!(vm.attach_apic_bus_in_process(Box::new(|_: u8| {})), Err(nkvm::irq::IrqError::BusAttached)));
}

/// A level-triggered interrupt moved through more vectors than there are
/// IOAPIC-range routes (24, the routes that make KVM report EOIs), as a
/// guest's IRQ balancing does over its uptime: every vector's EOI still
/// comes back, because the route of a vector that waits for no EOI is
/// reused. Without that, the 25th vector's EOI never came and its pin
/// stayed blocked (remote IRR set) for good.
#[test]
fn a_level_interrupt_moved_through_30_vectors_gets_every_eoi() {
    let vm = irq_vm(1);
    let vectors: Vec<u8> = (0x60..0x60 + 30).collect();
    install_idt_for(&vm, true, &vectors);
    let (ioapic, eois) = ioapic_in_process(&vm);
    let run = Running::start(waiting_guest(&vm, 0, VcpuConfig::default(), |_| {}));
    run.expect_ready();
    for &vector in &vectors {
        {
            // Pin 5: level-triggered, `vector`, to APIC 0; one assertion.
            let mut io = ioapic.lock().unwrap();
            io.write(0, &(0x10 + 2 * 5u32).to_le_bytes());
            io.write(0x10, &(u32::from(vector) | 1 << 15).to_le_bytes());
            io.write(0, &(0x11 + 2 * 5u32).to_le_bytes());
            io.write(0x10, &0u32.to_le_bytes());
            io.set_irq(5, true);
            io.set_irq(5, false);
        }
        run.expect_report(vector);
        // The EOI has reached the IOAPIC once the pin's remote IRR (bit 14)
        // is clear: only then may the pin move on (an EOI for the old
        // vector would not match the new one).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut low = [0u8; 4];
            {
                let mut io = ioapic.lock().unwrap();
                io.write(0, &(0x10 + 2 * 5u32).to_le_bytes());
                io.read(0x10, &mut low);
            }
            if u32::from_le_bytes(low) & 1 << 14 == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "the EOI of vector {vector:#x} never came: {:x?}", eois.lock().unwrap());
            thread::sleep(Duration::from_millis(1));
        }
        assert!(eois.lock().unwrap().contains(&vector), "{vector:#x}");
    }
}

#[test]
fn in_process_apic_bus_delivers_each_edge_once_in_turn() {
    // Edges on two pins, alternating: each reaches the guest once, in the
    // order raised, with nothing left over.
    let vm = irq_vm(1);
    install_idt(&vm, true);
    let (ioapic, _) = ioapic_in_process(&vm);
    let run = Running::start(waiting_guest(&vm, 0, VcpuConfig::default(), |a| {
        program_pin(a, 4, 0x40, false);
        program_pin(a, 6, 0x41, false);
    }));
    run.expect_ready();
    for _ in 0..20 {
        let mut io = ioapic.lock().unwrap();
        io.set_irq(4, true);
        io.set_irq(4, false);
        drop(io);
        run.expect_report(0x40);
        let mut io = ioapic.lock().unwrap();
        io.set_irq(6, true);
        io.set_irq(6, false);
        drop(io);
        run.expect_report(0x41);
    }
    assert!(run.quiet_for(Duration::from_millis(300)), "an edge was delivered twice");
}

pub(super) fn wait_for_failure(vm: &Vm) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(f) = vm.apic_bus_failure() {
            return f;
        }
        assert!(Instant::now() < deadline, "the bad APIC-bus peer was never reported");
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_bad_or_dead_apic_bus_peer_is_reported_not_hung_on() {
    for garbage in [true, false] {
        let vm = irq_vm(1);
        let (vm_end, dev_end) = UnixStream::pair().unwrap();
        let dev = thread::spawn(move || {
            let mut r = dev_end.try_clone().unwrap();
            let mut w = dev_end;
            nkvm_wire::apic::device_handshake(&mut r, &mut w, nkvm_wire::handshake::VersionRange::CURRENT).unwrap();
            if garbage {
                w.write_all(&[0x5a; 48]).unwrap();
                // Kept open: the VM side must close it.
                return Some(r);
            }
            // Dropping the socket closes it.
            None
        });
        vm.attach_apic_bus(vm_end).unwrap();
        let kept = dev.join().unwrap();
        let failure = wait_for_failure(&vm);
        if garbage {
            assert!(failure.contains("malformed"), "{failure}");
            // The peer sees the end, rather than writing into a socket
            // nobody reads until it blocks.
            let mut r = kept.unwrap();
            r.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            assert_eq!(std::io::Read::read(&mut r, &mut [0u8; 16]).unwrap(), 0, "the VM side closed the bus");
        } else {
            assert!(failure.contains("closed"), "{failure}");
        }
        // A new bus can replace the dead one.
        drop(bus_peer(&vm));
    }
    // A peer that takes the hello and never answers fails the attach
    // (after 5 s) instead of holding it, and a good peer attaches after it.
    let vm = Arc::new(irq_vm(1));
    let (vm_end, silent) = UnixStream::pair().unwrap();
    let (done, attach) = std::sync::mpsc::channel();
    let attaching = vm.clone();
    thread::spawn(move || done.send(attaching.attach_apic_bus(vm_end).map_err(|e| e.to_string())));
    let result = attach.recv_timeout(Duration::from_secs(60)).expect("the attach hung on a silent peer");
    let err = result.expect_err("a silent peer is not a bus");
    assert!(err.contains("handshake"), "{err}");
    drop(silent);
    drop(bus_peer(&vm));
}

/// A peer that stops reading EOIs (its socket full) fails the bus once one
/// blocked EOI send has waited 5 s: the vCPU that sent it goes on, and the
/// peer sees the end of the bus after the EOIs it left unread.
#[test]
fn a_peer_that_stops_reading_eois_fails_the_bus_not_the_vcpu() {
    use nkvm_wire::apic::{DeliveryMode, DestinationMode, TriggerMode};
    use std::os::fd::AsRawFd;
    let vm = irq_vm(1);
    install_idt(&vm, true);
    let (vm_end, dev_end) = UnixStream::pair().unwrap();
    // The smallest send buffer the kernel allows: a few EOI frames fill it.
    let one: libc::c_int = 1;
    // SAFETY: `vm_end` is an open socket; the option value is a c_int that
    // lives for the call, and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            vm_end.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_SNDBUF: {}", std::io::Error::last_os_error());
    let dev = thread::spawn(move || {
        let (mut r, mut w) = (dev_end.try_clone().unwrap(), dev_end);
        nkvm_wire::apic::device_handshake(&mut r, &mut w, nkvm_wire::handshake::VersionRange::CURRENT).unwrap();
        (r, w)
    });
    vm.attach_apic_bus(vm_end).unwrap();
    let (mut reader, mut writer) = dev.join().unwrap();
    let run = Running::start(waiting_guest(&vm, 0, VcpuConfig::default(), |_| {}));
    run.expect_ready();
    // Level-triggered: every delivery ends in an EOI the VM sends back.
    let level = InterruptMessage {
        destination: 0,
        destination_mode: DestinationMode::Physical,
        delivery_mode: DeliveryMode::Fixed,
        vector: 0x50,
        trigger_mode: TriggerMode::Level,
        level: true,
    };
    let mut delivered = 0;
    // Interrupts until one gets no report because the bus has failed (its
    // vCPU was in the blocked EOI send); `stalled` is when it was sent.
    let stalled = 'feed: loop {
        let sent = Instant::now();
        if vm.apic_bus_failure().is_some() || writer.write_all(&level.encode()).is_err() {
            break sent;
        }
        loop {
            match run.exits.recv_timeout(Duration::from_millis(200)) {
                Ok(exit) => break assert_eq!(exit, Exit::IoOut { port: REPORT, size: 4, data: 0x50 }),
                Err(_) if vm.apic_bus_failure().is_some() || sent.elapsed() > Duration::from_secs(60) => {
                    break 'feed sent
                }
                Err(_) => {}
            }
        }
        delivered += 1;
        assert!(delivered < 5000, "{delivered} EOIs went out and never filled the socket");
    };
    let failure = loop {
        if let Some(f) = vm.apic_bus_failure() {
            break f;
        }
        if stalled.elapsed() > Duration::from_secs(60) {
            // The vCPU thread is blocked for good: joining it would hang.
            std::mem::forget(run);
            panic!("a blocked EOI send held the vCPU for 60 s and the bus never failed");
        }
        thread::sleep(Duration::from_millis(10));
    };
    assert!(failure.contains("EOI"), "{failure}");
    // The vCPU is free: a kick reaches it.
    run.kicker.kick();
    let deadline = Instant::now() + Duration::from_secs(10);
    while run.exits.recv_timeout(Duration::from_secs(10)).expect("the vCPU is stuck") != Exit::Kicked {
        assert!(Instant::now() < deadline, "the vCPU never saw the kick");
    }
    // The peer reads the EOIs that did go out, then the end of the bus.
    reader.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut eois = 0;
    while let Some(frame) = nkvm_wire::apic::read_frame(&mut reader).expect("the VM side closed the bus cleanly") {
        assert!(matches!(frame, ApicFrame::Eoi(_)), "{frame:?}");
        eois += 1;
    }
    assert!(eois >= 1 && eois <= delivered, "{eois} EOIs read, {delivered} interrupts delivered");
}

/// A VM and its vCPU dropped while the bus peer keeps its socket open: the
/// bus ends with the last of them (the peer reads the end), rather than its
/// thread keeping the VM's file, and the VM, alive for as long as the peer
/// likes. A vCPU that outlives its Vm keeps the bus.
#[test]
fn a_dropped_vm_ends_its_apic_bus_with_its_last_vcpu_whatever_the_peer_does() {
    let vm = irq_vm(1);
    let vcpu = vm.create_vcpu(0).unwrap();
    let (mut reader, _writer) = bus_peer(&vm);
    drop(vm);
    reader.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let up = nkvm_wire::apic::read_frame(&mut reader);
    assert!(up.is_err(), "the bus stays up while the vCPU lives: {up:?}");
    drop(vcpu);
    reader.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let end = nkvm_wire::apic::read_frame(&mut reader);
    assert!(matches!(end, Ok(None)), "the peer sees the bus end: {end:?}");
}

/// The IOAPIC model of nkvm-devices at the other end of an APIC-bus socket,
/// its registers attached to the VM as an in-process MMIO handler.
struct BusSink(Arc<Mutex<UnixStream>>);

impl ApicBusSink for BusSink {
    fn send(&mut self, message: InterruptMessage) {
        let _ = self.0.lock().unwrap().write_all(&message.encode());
    }
}

struct IoapicRegs<S: ApicBusSink>(Arc<Mutex<Ioapic<S>>>);

impl<S: ApicBusSink> nkvm::IoHandler for IoapicRegs<S> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.lock().unwrap().read(offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.lock().unwrap().write(offset, data);
    }
}
