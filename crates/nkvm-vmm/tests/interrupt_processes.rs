//! Interrupt controllers in their own processes, on the APIC bus. The IOAPIC
//! (`nkvm device --model ioapic`): a real guest programs a redirection entry
//! over MMIO, a device in another process drives the pin, the handler runs;
//! level-triggered pins come back after EOI while asserted; a dead IOAPIC
//! process is reported. The dual 8259 (`--model pic`): an APIC-less guest
//! programs it over PIO and takes its interrupts through LINT0. Devices in
//! processes of their own drive those pins directly (`--irq-pins`): a PIT
//! ticks the 8259's IRQ 0, a 16550 raises an IOAPIC pin.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use nkvm::io::{IoRange, Ordering};
use nkvm::{Exit, GuestAddress, Hypervisor, LongMode, RunState, Vm, VmConfig};
use nkvm_devices::pins::RemotePins;
use nkvm_devices::IrqLine;
use nkvm_wire::ioregion::{AccessSize, Client, RegionInfo, Space};

const ENTRY: u64 = 0x10_0000;
const IDT: u64 = 0x7000;
const HANDLER: u64 = 0x3_0000;
const REPORT: u32 = 0x70;

fn connect(path: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("{} never listened: {e}", path.display()),
        }
    }
}

struct ControllerProcess {
    child: Child,
    dir: PathBuf,
}

impl ControllerProcess {
    /// Starts `model` with its sockets in a directory of its own (`tag`
    /// tells the tests of one run apart).
    fn spawn(model: &str, tag: &str) -> ControllerProcess {
        let dir = std::env::temp_dir().join(format!("nkvm-{model}-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nkvm"));
        cmd.args(["device", "--model", model, "--socket"])
            .arg(dir.join("regs"))
            .arg("--apic-bus")
            .arg(dir.join("bus"))
            .arg("--pins")
            .arg(dir.join("pins"));
        if model == "pic" {
            cmd.arg("--slave").arg(dir.join("slave"));
        }
        let child = cmd.spawn().expect("spawn the controller process");
        ControllerProcess { child, dir }
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A guest with an IDT whose vector-0x50 handler reports and EOIs, that
/// programs IOAPIC pin 5 (level-triggered if `level`, else edge) to vector
/// 0x50 and waits with `hlt`.
fn guest(vm: &Vm, level: bool) -> nkvm::Vcpu {
    let handler = {
        let mut a = CodeAssembler::new(64).unwrap();
        a.push(rax).unwrap();
        a.mov(eax, 0x50u32).unwrap();
        a.out(REPORT, eax).unwrap();
        a.mov(rax, 0xfee0_00b0u64).unwrap();
        a.mov(dword_ptr(rax), 0).unwrap();
        a.pop(rax).unwrap();
        a.iretq().unwrap();
        a.assemble(HANDLER).unwrap()
    };
    vm.write_memory(GuestAddress(HANDLER), &handler).unwrap();
    let idt = nkvm::Idt::new(GuestAddress(IDT));
    idt.set_gate(&vm.memory(), 0x50, GuestAddress(HANDLER)).unwrap();
    idt.write_idtr(&vm.memory(), GuestAddress(0x6ff0)).unwrap();
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rax, 0x6ff0u64).unwrap();
    a.lidt(ptr(rax)).unwrap();
    a.mov(rax, 0xfee0_00f0u64).unwrap();
    a.mov(dword_ptr(rax), 0x1ff).unwrap();
    a.mov(rbx, 0xfec0_0000u64).unwrap();
    a.mov(dword_ptr(rbx), 0x10 + 2 * 5).unwrap();
    a.mov(dword_ptr(rbx + 0x10), 0x50 | (u32::from(level) << 15)).unwrap();
    a.mov(dword_ptr(rbx), 0x11 + 2 * 5).unwrap();
    a.mov(dword_ptr(rbx + 0x10), 0).unwrap();
    a.mov(dword_ptr(rbx), 1).unwrap(); // read the version register back
    a.mov(eax, dword_ptr(rbx + 0x10)).unwrap();
    a.out(0x71u32, eax).unwrap();
    a.sti().unwrap();
    let mut idle = a.create_label();
    a.set_label(&mut idle).unwrap();
    a.hlt().unwrap();
    a.jmp(idle).unwrap();
    vm.write_memory(GuestAddress(ENTRY), &a.assemble(ENTRY).unwrap()).unwrap();
    let lm = LongMode::install(&vm.memory(), GuestAddress(0x2_0000)).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_cpuid(&Hypervisor::open().unwrap().supported_cpuid().unwrap()).unwrap();
    vcpu.set_long_mode(&lm, GuestAddress(ENTRY), GuestAddress(0x9_0000)).unwrap();
    vcpu
}

/// Runs `vcpu` on a thread until it is kicked: every exit goes to the
/// returned channel (reads complete with 0).
fn run_on_a_thread(mut vcpu: nkvm::Vcpu) -> (mpsc::Receiver<Exit>, std::thread::JoinHandle<()>) {
    let (tx, exits) = mpsc::channel();
    let runner = std::thread::spawn(move || {
        let mut run = RunState::new();
        loop {
            let exit = vcpu.enter_guest(&mut run).unwrap();
            if let Exit::MmioRead { .. } | Exit::IoIn { .. } = exit {
                run.complete_read(0);
            }
            let kicked = exit == Exit::Kicked;
            if tx.send(exit).is_err() || kicked {
                return;
            }
        }
    });
    (exits, runner)
}

/// A VM whose IOAPIC runs in its own process, a guest waiting on pin 5
/// (`level` or edge), a "device" in this test that drives the pin over the
/// pin socket, and the guest's exits on a channel.
struct IoapicMachine {
    vm: Vm,
    ioapic: ControllerProcess,

    exits: mpsc::Receiver<Exit>,
    kicker: nkvm::Kicker,
    runner: std::thread::JoinHandle<()>,
}

impl IoapicMachine {
    fn start(tag: &str, level: bool) -> IoapicMachine {
        let hv = Hypervisor::open().expect("/dev/kvm");
        let vm =
            Vm::new(&hv, &VmConfig { vcpus: 1, memory: 16 << 20, split_irqchip: true, ..Default::default() }).unwrap();
        let ioapic = ControllerProcess::spawn("ioapic", tag);
        vm.attach_region(IoRange::mmio(0xfec0_0000, 0x100), connect(&ioapic.dir.join("regs")), Ordering::Sync).unwrap();
        vm.attach_apic_bus(connect(&ioapic.dir.join("bus"))).unwrap();
        let vcpu = guest(&vm, level);
        let kicker = vcpu.kicker();
        let (exits, runner) = run_on_a_thread(vcpu);
        IoapicMachine { vm, ioapic, exits, kicker, runner }
    }

    /// A client of the pin socket that waits for
    /// each write's reply.
    fn sync_pins(&self) -> Client<UnixStream, UnixStream> {
        let region = RegionInfo { id: 1, space: Space::Mmio, base: 0, len: 24 };
        Client::over(connect(&self.ioapic.dir.join("pins")), region).unwrap()
    }

    /// A client of the pin socket as a device drives it: posted
    /// writes, through `nkvm_devices::pins`.
    fn remote_pins(&self) -> RemotePins {
        RemotePins::over(connect(&self.ioapic.dir.join("pins")), 24).unwrap()
    }

    fn next(&self) -> Exit {
        self.exits.recv_timeout(Duration::from_secs(10)).expect("no exit in time")
    }

    /// Kills the IOAPIC process: the bus is reported, the VM does not hang.
    fn kill_ioapic(mut self) {
        self.ioapic.child.kill().unwrap();
        self.ioapic.child.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.vm.apic_bus_failure().is_none() {
            assert!(Instant::now() < deadline, "the dead IOAPIC was never reported");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(self.vm.apic_bus_failure().unwrap().contains("closed"), "{:?}", self.vm.apic_bus_failure());
        self.kicker.kick();
        self.runner.join().unwrap();
    }
}

#[test]
fn an_ioapic_in_another_process_delivers_level_interrupts_with_eoi_and_its_death_is_reported() {
    let m = IoapicMachine::start("level", true);
    match m.next() {
        Exit::IoOut { port: 0x71, data, .. } => assert_eq!(data & 0xff, 0x20, "IOAPIC version register"),
        other => panic!("expected the version report, got {other}"),
    }
    let mut pins = m.sync_pins();
    pins.write(5, AccessSize::Byte, 1).unwrap();
    let report = Exit::IoOut { port: REPORT as u16, size: 4, data: 0x50 };
    assert_eq!(m.next(), report);
    assert_eq!(m.next(), report, "still asserted after EOI: delivered again");
    pins.write(5, AccessSize::Byte, 0).unwrap();
    // Reports made before the drop reached the device process may still be
    // queued (how many depends on scheduling); then the guest goes quiet.
    let give_up = std::time::Instant::now() + Duration::from_secs(10);
    let mut extra = 0;
    while let Ok(e) = m.exits.recv_timeout(Duration::from_millis(300)) {
        assert_eq!(e, report);
        extra += 1;
        assert!(
            std::time::Instant::now() < give_up,
            "the level interrupt kept coming after the line dropped ({extra})"
        );
    }
    assert_eq!(m.vm.apic_bus_failure(), None);
    let stats = m.vm.apic_bus_stats().unwrap();
    assert_eq!(stats.fast_paths, 0, "a level-triggered message keeps the socket (its EOI needs the bus)");
    assert!(stats.messages >= 2, "{stats:?}");
    m.kill_ioapic();
}

/// An edge-triggered pin raised again and again: the first message comes
/// over the bus socket, and the VM side answers it with a fast path (APIC
/// bus version 2), an eventfd KVM turns into that message; the IOAPIC
/// process then delivers every later edge through it, with no VMM thread in
/// between. Every edge still reaches the guest once. When the process dies
/// the bus is reported as before.
#[test]
fn an_ioapic_in_another_process_delivers_repeated_edges_through_its_fast_path() {
    const EDGES: usize = 20;
    let m = IoapicMachine::start("edge", false);
    assert!(matches!(m.next(), Exit::IoOut { port: 0x71, .. }), "the version report first");
    let report = Exit::IoOut { port: REPORT as u16, size: 4, data: 0x50 };
    let mut pins = m.sync_pins();
    let mut edges = |count: usize| {
        for edge in 0..count {
            pins.write(5, AccessSize::Byte, 1).unwrap();
            pins.write(5, AccessSize::Byte, 0).unwrap();
            assert_eq!(m.next(), report, "edge {edge}");
        }
        assert!(m.exits.recv_timeout(Duration::from_millis(300)).is_err(), "one interrupt per edge, no more");
    };
    edges(EDGES);
    let mut stats = m.vm.apic_bus_stats().unwrap();
    assert_eq!(stats.fast_paths, 1, "{stats:?}");
    // The offer reaches the process while the first interrupts run: the
    // next edges may still come over the socket (all of a batch, on a
    // loaded host), and once it has the eventfd none do: a later batch
    // sends nothing over the socket.
    let mut batches = 1;
    loop {
        edges(EDGES);
        batches += 1;
        let after = m.vm.apic_bus_stats().unwrap();
        if after.messages == stats.messages {
            break;
        }
        assert!(batches < 10, "edges still come over the socket after {batches} batches: {after:?}");
        stats = after;
    }
    m.kill_ioapic();
}

/// A device model in another process raises the IOAPIC's pins as it would
/// any interrupt line: `nkvm_devices::pins` posts the level changes (an
/// edge is two writes in one send) and waits for nothing. Every pulse
/// reaches the guest once, and once the IOAPIC process is gone the pins say
/// so instead of failing the device.
#[test]
fn a_device_drives_the_pins_of_an_ioapic_in_another_process_with_posted_writes() {
    let m = IoapicMachine::start("posted", false);
    assert!(matches!(m.next(), Exit::IoOut { port: 0x71, .. }), "the version report first");
    let pins = m.remote_pins();
    let line = pins.line(5).unwrap();
    let report = Exit::IoOut { port: REPORT as u16, size: 4, data: 0x50 };
    for edge in 0..20 {
        line.pulse();
        assert_eq!(m.next(), report, "edge {edge}");
    }
    assert!(m.exits.recv_timeout(Duration::from_millis(300)).is_err(), "one interrupt per edge, no more");
    assert!(pins.line(24).is_err(), "the IOAPIC has 24 pins");
    pins.sync().unwrap();
    assert_eq!(pins.failure(), None);
    let stats = m.vm.apic_bus_stats().unwrap();
    assert_eq!(stats.fast_paths, 1, "{stats:?}");
    m.kill_ioapic();
    // The first changes after the death may still fit in the socket.
    let deadline = Instant::now() + Duration::from_secs(10);
    while pins.failure().is_none() {
        assert!(Instant::now() < deadline, "the dead IOAPIC's pin socket was never noticed");
        line.pulse();
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(pins.sync().is_err());
}

/// Two devices drive the IOAPIC process's lines over pin connections of
/// their own, and one that goes (a device process restarted) connects
/// again and is served.
#[test]
fn several_devices_drive_an_ioapic_process_and_a_restarted_one_connects_again() {
    let m = IoapicMachine::start("many-pins", false);
    assert!(matches!(m.next(), Exit::IoOut { port: 0x71, .. }), "the version report first");
    let pins = || {
        let stream = connect(&m.ioapic.dir.join("pins"));
        // A client the controller never answers fails, not hangs.
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        RemotePins::over(stream, 24).expect("the pin socket serves another client")
    };
    let report = Exit::IoOut { port: REPORT as u16, size: 4, data: 0x50 };
    let (first, second) = (pins(), pins());
    for (name, device) in [("first", &first), ("second", &second), ("first", &first)] {
        device.line(5).unwrap().pulse();
        device.sync().unwrap_or_else(|e| panic!("the {name} device: {e}"));
        assert_eq!(m.next(), report, "the {name} device's edge");
    }
    drop(first);
    let restarted = pins();
    restarted.line(5).unwrap().pulse();
    restarted.sync().unwrap();
    assert_eq!(m.next(), report, "the restarted device's edge");
    second.line(5).unwrap().pulse();
    assert_eq!(m.next(), report, "the second device is still served");
    m.kill_ioapic();
}

/// A 16550 in its own process (`nkvm device --model serial --irq-pins`)
/// raises a pin of the IOAPIC in another process directly: enabling its
/// transmitter-empty interrupt (written here over its register socket, as
/// the VM would) reaches the guest's handler through the IOAPIC process.
#[test]
fn a_16550_in_its_own_process_raises_a_pin_of_an_ioapic_in_another() {
    let m = IoapicMachine::start("serial-irq", false);
    assert!(matches!(m.next(), Exit::IoOut { port: 0x71, .. }), "the version report first");
    let socket = m.ioapic.dir.join("com1");
    let mut uart = Command::new(env!("CARGO_BIN_EXE_nkvm"))
        .args(["device", "--model", "serial", "--socket"])
        .arg(&socket)
        .arg("--irq-pins")
        .arg(m.ioapic.dir.join("pins"))
        .args(["--irq-pin", "5"])
        .spawn()
        .expect("spawn the 16550 process");
    let region = RegionInfo { id: 2, space: Space::Pio, base: 0x3f8, len: 8 };
    let mut com1 = Client::over(connect(&socket), region).unwrap();
    assert_eq!(m.exits.recv_timeout(Duration::from_millis(300)).ok(), None, "no interrupt before it is enabled");
    com1.write(1, AccessSize::Byte, 0x02).unwrap(); // IER: transmitter holding register empty
    assert_eq!(m.next(), Exit::IoOut { port: REPORT as u16, size: 4, data: 0x50 });
    let _ = uart.kill();
    let _ = uart.wait();
    m.kill_ioapic();
}

/// A client of a controller's pin socket that asks for more pins than the
/// controller has (here, `--irq-pin 20` against a dual 8259's 16) is closed
/// at once instead of having its changes silently ignored, and the socket
/// then serves a client that fits. So do clients that close before their
/// hello or send garbage: one bad client never takes the pins away.
#[test]
fn a_pin_client_asking_for_more_pins_than_the_controller_has_is_closed() {
    use std::io::Write;
    let pic = ControllerProcess::spawn("pic", "too-many-pins");
    drop(connect(&pic.dir.join("pins")));
    connect(&pic.dir.join("pins")).write_all(b"not a hello, not a frame at all: 32+ bytes").unwrap();
    let too_many = RemotePins::over(connect(&pic.dir.join("pins")), 21).unwrap();
    too_many.line(20).unwrap().pulse();
    assert!(too_many.sync().is_err(), "the 8259 has no pin 20: the connection is closed");
    let fits = RemotePins::over(connect(&pic.dir.join("pins")), 16).unwrap();
    fits.line(15).unwrap().pulse();
    fits.sync().expect("a client within the 8259's 16 pins is served");
}

/// A VM with a hidden local APIC whose dual 8259 runs in its own process
/// (its sockets attached), and a guest that programs it (vector base 0x50,
/// only `irq` unmasked), runs `prelude`, reports 0x71, and then reports
/// `0x50 + irq` on [`REPORT`] from each interrupt's handler (which EOIs
/// the 8259). Returns the VM, the process and the vCPU, not yet running.
fn pic_guest(tag: &str, irq: u8, prelude: impl FnOnce(&mut CodeAssembler)) -> (Vm, ControllerProcess, nkvm::Vcpu) {
    pic_guest_with_bus(tag, irq, prelude, true)
}

/// [`pic_guest`], with the APIC bus attached now or left to the caller.
fn pic_guest_with_bus(
    tag: &str,
    irq: u8,
    prelude: impl FnOnce(&mut CodeAssembler),
    attach_bus: bool,
) -> (Vm, ControllerProcess, nkvm::Vcpu) {
    let hv = Hypervisor::open().expect("/dev/kvm");
    let vm = Vm::new(&hv, &VmConfig { vcpus: 1, memory: 16 << 20, split_irqchip: true, ..Default::default() }).unwrap();
    let pic = ControllerProcess::spawn("pic", tag);
    vm.attach_region(IoRange::pio(0x20, 2), connect(&pic.dir.join("regs")), Ordering::Sync).unwrap();
    vm.attach_region(IoRange::pio(0xa0, 2), connect(&pic.dir.join("slave")), Ordering::Sync).unwrap();
    if attach_bus {
        vm.attach_apic_bus(connect(&pic.dir.join("bus"))).unwrap();
    }
    let vector = 0x50 + irq;
    let handler = {
        let mut a = CodeAssembler::new(64).unwrap();
        a.push(rax).unwrap();
        a.mov(eax, u32::from(vector)).unwrap();
        a.out(REPORT, eax).unwrap();
        a.mov(al, 0x20).unwrap();
        a.out(0x20u32, al).unwrap();
        a.pop(rax).unwrap();
        a.iretq().unwrap();
        a.assemble(HANDLER).unwrap()
    };
    vm.write_memory(GuestAddress(HANDLER), &handler).unwrap();
    let idt = nkvm::Idt::new(GuestAddress(IDT));
    idt.set_gate(&vm.memory(), vector, GuestAddress(HANDLER)).unwrap();
    idt.write_idtr(&vm.memory(), GuestAddress(0x6ff0)).unwrap();
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rax, 0x6ff0u64).unwrap();
    a.lidt(ptr(rax)).unwrap();
    for (port, value) in [
        (0x20u32, 0x11u32),
        (0x21, 0x50),
        (0x21, 0x04),
        (0x21, 0x01),
        (0xa0, 0x11),
        (0xa1, 0x58),
        (0xa1, 0x02),
        (0xa1, 0x01),
        (0x21, !(1u32 << irq) & 0xff),
        (0xa1, 0xff),
    ] {
        a.mov(al, value).unwrap();
        a.out(port, al).unwrap();
    }
    prelude(&mut a);
    a.out(0x71u32, al).unwrap();
    a.sti().unwrap();
    let mut idle = a.create_label();
    a.set_label(&mut idle).unwrap();
    a.hlt().unwrap();
    a.jmp(idle).unwrap();
    vm.write_memory(GuestAddress(ENTRY), &a.assemble(ENTRY).unwrap()).unwrap();
    let lm = LongMode::install(&vm.memory(), GuestAddress(0x2_0000)).unwrap();
    let vcpu = vm.create_vcpu_with(0, nkvm::VcpuConfig { lapic: nkvm::Lapic::Hidden }).unwrap();
    vcpu.set_cpuid(&hv.supported_cpuid().unwrap()).unwrap();
    vcpu.set_long_mode(&lm, GuestAddress(ENTRY), GuestAddress(0x9_0000)).unwrap();
    (vm, pic, vcpu)
}

/// The 8259 process drives an APIC-less core through LINT0. An IRQ raised
/// before the VM has connected its APIC bus is not acknowledged into
/// nowhere: the 8259 holds it, and the guest gets it once the bus is there.
#[test]
fn a_pic_in_another_process_drives_an_apic_less_core_through_lint0() {
    let (vm, pic, vcpu) = pic_guest_with_bus("lint0", 1, |_| {}, false);
    let kicker = vcpu.kicker();
    let (exits, runner) = run_on_a_thread(vcpu);
    let region = RegionInfo { id: 1, space: Space::Pio, base: 0, len: 16 };
    let mut lines = Client::over(connect(&pic.dir.join("pins")), region).unwrap();
    let next = || exits.recv_timeout(Duration::from_secs(10)).expect("no exit in time");
    assert!(matches!(next(), Exit::IoOut { port: 0x71, .. }), "the guest programmed the PIC");
    let report = Exit::IoOut { port: REPORT as u16, size: 4, data: 0x51 };
    lines.write(1, AccessSize::Byte, 1).unwrap();
    // Time for the PIC's INTA thread to see INTR up with no bus.
    std::thread::sleep(Duration::from_millis(100));
    vm.attach_apic_bus(connect(&pic.dir.join("bus"))).unwrap();
    assert_eq!(next(), report, "the IRQ raised before the bus came");
    lines.write(1, AccessSize::Byte, 0).unwrap();
    for _ in 0..3 {
        lines.write(1, AccessSize::Byte, 1).unwrap();
        assert_eq!(next(), report);
        lines.write(1, AccessSize::Byte, 0).unwrap();
    }
    assert_eq!(vm.apic_bus_failure(), None);
    kicker.kick();
    runner.join().unwrap();
}

/// Three processes and no VMM thread between them: a PIT in its own
/// process (`nkvm device --model pit --irq-pins`) ticks counter 0 and
/// pulses IRQ 0 of a dual 8259 in another process, which sends the ExtINT
/// to the guest's LINT0. The guest programs the PIT at 100 Hz over its
/// socket and counts the timer interrupts; the PIT process's state is saved
/// and loaded back, and it ticks on.
#[test]
fn a_pit_in_its_own_process_ticks_irq_0_of_a_pic_in_another() {
    // Counter 0, low then high byte, mode 2 (rate generator), 11932: 100 Hz.
    let (vm, pic, vcpu) = pic_guest("pit", 0, |a| {
        for (port, value) in [(0x43u32, 0x34u32), (0x40, 11932 & 0xff), (0x40, 11932 >> 8)] {
            a.mov(al, value).unwrap();
            a.out(port, al).unwrap();
        }
    });
    let pit_socket = pic.dir.join("pit");
    let mut pit = Command::new(env!("CARGO_BIN_EXE_nkvm"))
        .args(["device", "--model", "pit", "--socket"])
        .arg(&pit_socket)
        .arg("--irq-pins")
        .arg(pic.dir.join("pins"))
        .spawn()
        .expect("spawn the PIT process");
    let region = vm.attach_region(IoRange::pio(0x40, 4), connect(&pit_socket), Ordering::Sync).unwrap();
    let kicker = vcpu.kicker();
    let (exits, runner) = run_on_a_thread(vcpu);
    let next = || exits.recv_timeout(Duration::from_secs(10)).expect("no timer interrupt in 10 s");
    assert!(matches!(next(), Exit::IoOut { port: 0x71, .. }), "the guest programmed the PIC and the PIT");
    let started = Instant::now();
    let report = Exit::IoOut { port: REPORT as u16, size: 4, data: 0x50 };
    for _ in 0..10 {
        assert_eq!(next(), report);
    }
    // Ten ticks at 100 Hz: not much faster than the PIT runs (no storm).
    assert!(started.elapsed() >= Duration::from_millis(50), "10 ticks in {:?}", started.elapsed());
    // The PIT process saves its model (counter 0 programmed) and takes it
    // back; its polling thread goes on ticking after the load.
    let state = vm.region_state(region).expect("the PIT process's state");
    assert!(!state.is_empty());
    vm.region_load_state(region, &state).expect("the PIT process takes its own state back");
    while exits.try_recv().is_ok() {}
    for _ in 0..3 {
        assert_eq!(next(), report);
    }
    assert_eq!(vm.apic_bus_failure(), None);
    kicker.kick();
    runner.join().unwrap();
    let _ = pit.kill();
    let _ = pit.wait();
}

/// A VM side that sends garbage on a controller process's APIC bus is
/// closed by the process: the VM side sees the end, rather than the
/// process writing interrupts into a socket nobody reads.
#[test]
fn a_controller_process_closes_an_apic_bus_that_sends_garbage() {
    use std::io::{Read, Write};
    let ioapic = ControllerProcess::spawn("ioapic", "bus-garbage");
    let mut bus = connect(&ioapic.dir.join("bus"));
    let mut w = bus.try_clone().unwrap();
    nkvm_wire::apic::vm_handshake(&mut bus, &mut w, 1, nkvm_wire::handshake::VersionRange::APIC_BUS).unwrap();
    w.write_all(&[0x5a; 48]).unwrap();
    bus.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The end, or a reset (the garbage past the first frame was unread).
    match bus.read(&mut [0u8; 16]) {
        Ok(n) => assert_eq!(n, 0, "the controller closed the bus"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
}
