//! Interrupt latency: from a device raising an interrupt to the guest's
//! handler running (it reports with an `out`, so every figure includes one
//! exit to user space), for (a) irqfd + MSI route, (b) the IOAPIC model in
//! this process on the APIC bus's direct path (`Vm::attach_apic_bus_in_process`,
//! what the VMM uses), (b') the same model in this process but on an
//! APIC-bus socketpair (the socket path, for comparison), (c) the IOAPIC in
//! its own process (`nkvm device --model ioapic`), driven through its pin
//! socket, with the APIC bus's fast paths (c) and without them (c', every
//! message on the socket, as before APIC-bus version 2). One run, medians
//! side by side with ratios. Targets: b <= 1.5x a, c <= 3x a.
//!
//! Run: `cargo bench -p nkvm-vmm --bench interrupt_latency`.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use nkvm::io::{IoHandler, IoRange, Ordering};
use nkvm::irq::MsiMessage;
use nkvm::{Exit, GuestAddress, Hypervisor, LongMode, RunState, Vm, VmConfig};
use nkvm_devices::ioapic::Ioapic;
use nkvm_devices::{ApicBusSink, IoDevice};
use nkvm_wire::apic::{ApicFrame, InterruptMessage};
use nkvm_wire::handshake::VersionRange;
use nkvm_wire::ioregion::{AccessSize, Client, RegionInfo, Space};
use vmm_sys_util::eventfd::EventFd;

const ENTRY: u64 = 0x10_0000;
const HANDLER: u64 = 0x3_0000;
const VECTOR: u8 = 0x50;

fn vm(hv: &Hypervisor) -> Vm {
    Vm::new(hv, &VmConfig { vcpus: 1, memory: 16 << 20, split_irqchip: true, ..Default::default() }).unwrap()
}

/// Guest: IDT with a VECTOR handler that reports and EOIs; programs IOAPIC
/// pin 5 (edge) when asked; then waits in `hlt`.
fn start_guest(hv: &Hypervisor, vm: &Vm, program_ioapic: bool) -> (mpsc::Receiver<Instant>, nkvm::Kicker) {
    let mut a = CodeAssembler::new(64).unwrap();
    a.push(rax).unwrap();
    a.out(0x70u32, al).unwrap();
    a.mov(rax, 0xfee0_00b0u64).unwrap();
    a.mov(dword_ptr(rax), 0).unwrap();
    a.pop(rax).unwrap();
    a.iretq().unwrap();
    vm.write_memory(GuestAddress(HANDLER), &a.assemble(HANDLER).unwrap()).unwrap();
    let idt = nkvm::Idt::new(GuestAddress(0x7000));
    idt.set_gate(&vm.memory(), VECTOR, GuestAddress(HANDLER)).unwrap();
    idt.write_idtr(&vm.memory(), GuestAddress(0x6ff0)).unwrap();
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rax, 0x6ff0u64).unwrap();
    a.lidt(ptr(rax)).unwrap();
    a.mov(rax, 0xfee0_00f0u64).unwrap();
    a.mov(dword_ptr(rax), 0x1ff).unwrap();
    if program_ioapic {
        a.mov(rbx, 0xfec0_0000u64).unwrap();
        a.mov(dword_ptr(rbx), 0x10 + 2 * 5).unwrap();
        a.mov(dword_ptr(rbx + 0x10), u32::from(VECTOR)).unwrap();
        a.mov(dword_ptr(rbx), 0x11 + 2 * 5).unwrap();
        a.mov(dword_ptr(rbx + 0x10), 0).unwrap();
    }
    a.out(0x71u32, al).unwrap();
    a.sti().unwrap();
    let mut idle = a.create_label();
    a.set_label(&mut idle).unwrap();
    a.hlt().unwrap();
    a.jmp(idle).unwrap();
    vm.write_memory(GuestAddress(ENTRY), &a.assemble(ENTRY).unwrap()).unwrap();
    let lm = LongMode::install(&vm.memory(), GuestAddress(0x2_0000)).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_cpuid(&hv.supported_cpuid().unwrap()).unwrap();
    vcpu.set_long_mode(&lm, GuestAddress(ENTRY), GuestAddress(0x9_0000)).unwrap();
    let kicker = vcpu.kicker();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut run = RunState::new();
        loop {
            match vcpu.enter_guest(&mut run).unwrap() {
                Exit::IoOut { port: 0x70 | 0x71, .. } if tx.send(Instant::now()).is_err() => return,
                Exit::Kicked => return,
                Exit::MmioRead { .. } | Exit::IoIn { .. } => run.complete_read(0),
                _ => {}
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(10)).expect("guest ready");
    (rx, kicker)
}

/// Median latency (ns) of `n` raise → handler round trips.
fn measure(n: usize, rx: &mpsc::Receiver<Instant>, mut raise: impl FnMut()) -> f64 {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        raise();
        let t1 = rx.recv_timeout(Duration::from_secs(10)).expect("interrupt never arrived");
        v.push((t1 - t0).as_nanos() as f64);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct BusSink(Arc<Mutex<UnixStream>>);
impl ApicBusSink for BusSink {
    fn send(&mut self, m: InterruptMessage) {
        let _ = self.0.lock().unwrap().write_all(&m.encode());
    }
}
struct Regs<S: ApicBusSink>(Arc<Mutex<Ioapic<S>>>);
impl<S: ApicBusSink> IoHandler for Regs<S> {
    fn read(&mut self, o: u64, d: &mut [u8]) {
        self.0.lock().unwrap().read(o, d);
    }
    fn write(&mut self, o: u64, d: &[u8]) {
        self.0.lock().unwrap().write(o, d);
    }
}

/// The direct path: messages go to the local APICs on the sending thread.
struct Direct(nkvm::ApicBus);
type DirectIoapic = Arc<Mutex<Ioapic<Direct>>>;
impl ApicBusSink for Direct {
    fn send(&mut self, m: InterruptMessage) {
        self.0.send(&m).unwrap();
    }
}

fn connect(path: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("{e}"),
        }
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--test" || a == "--list");
    let n = if quick { 20 } else { 2000 };
    let hv = Hypervisor::open().expect("/dev/kvm");

    // (a) irqfd.
    let vm_a = vm(&hv);
    let (rx, kick_a) = start_guest(&hv, &vm_a, false);
    let evt = EventFd::new(0).unwrap();
    vm_a.set_msi_route(30, Some(MsiMessage::fixed(0, VECTOR))).unwrap();
    vm_a.irqfd(30, &evt).unwrap();
    let irqfd = measure(n, &rx, || evt.write(1).unwrap());
    kick_a.kick();

    // (b) IOAPIC model in this process, on the bus's direct path.
    let vm_d = vm(&hv);
    let target: Arc<Mutex<Option<DirectIoapic>>> = Arc::default();
    let t = target.clone();
    let bus = vm_d
        .attach_apic_bus_in_process(Box::new(move |v: u8| {
            if let Some(io) = &*t.lock().unwrap() {
                io.lock().unwrap().end_of_interrupt(v);
            }
        }))
        .unwrap();
    let direct = Arc::new(Mutex::new(Ioapic::new(Direct(bus))));
    *target.lock().unwrap() = Some(direct.clone());
    vm_d.attach_handler(IoRange::mmio(0xfec0_0000, 0x100), Box::new(Regs(direct.clone()))).unwrap();
    let (rx, kick_d) = start_guest(&hv, &vm_d, true);
    let in_process = measure(n, &rx, || {
        let mut io = direct.lock().unwrap();
        io.set_irq(5, true);
        io.set_irq(5, false);
    });
    kick_d.kick();

    // (b') IOAPIC model in this process, on an APIC-bus socketpair.
    let vm_b = vm(&hv);
    let (vm_end, dev_end) = UnixStream::pair().unwrap();
    let dev = std::thread::spawn(move || {
        let mut r = dev_end.try_clone().unwrap();
        let mut w = dev_end;
        nkvm_wire::apic::device_handshake(&mut r, &mut w, VersionRange::CURRENT).unwrap();
        (r, w)
    });
    vm_b.attach_apic_bus(vm_end).unwrap();
    let (mut reader, writer) = dev.join().unwrap();
    let ioapic = Arc::new(Mutex::new(Ioapic::new(BusSink(Arc::new(Mutex::new(writer))))));
    vm_b.attach_handler(IoRange::mmio(0xfec0_0000, 0x100), Box::new(Regs(ioapic.clone()))).unwrap();
    let eoi = ioapic.clone();
    std::thread::spawn(move || {
        while let Ok(Some(ApicFrame::Eoi(e))) = nkvm_wire::apic::read_frame(&mut reader) {
            eoi.lock().unwrap().end_of_interrupt(e.vector);
        }
    });
    let (rx, kick_b) = start_guest(&hv, &vm_b, true);
    let socketpair = measure(n, &rx, || {
        let mut io = ioapic.lock().unwrap();
        io.set_irq(5, true);
        io.set_irq(5, false);
    });
    kick_b.kick();

    // (c) IOAPIC in its own process, with the APIC bus's fast paths (the
    // default) and, for comparison, without (every message on the socket).
    let (out_of_process, bus_c) = own_process(&hv, n, true);
    let (without_fast_paths, _) = own_process(&hv, n, false);

    println!("interrupt latency, device raise -> guest handler (median of {n}; each includes one exit to report):");
    println!("  (a) irqfd + MSI route          {:>8.1} us", irqfd / 1e3);
    println!("  (b) IOAPIC in process, direct  {:>8.1} us   ({:.2}x irqfd)", in_process / 1e3, in_process / irqfd);
    println!("  (b') in process, socketpair    {:>8.1} us   ({:.2}x irqfd)", socketpair / 1e3, socketpair / irqfd);
    println!(
        "  (c) IOAPIC in own process      {:>8.1} us   ({:.2}x irqfd, {:.2}x in process)",
        out_of_process / 1e3,
        out_of_process / irqfd,
        out_of_process / in_process
    );
    println!(
        "      (c)'s bus: {} of {n} interrupt messages came over the socket; {} fast path(s) (APIC bus v2)",
        bus_c.messages, bus_c.fast_paths
    );
    println!(
        "  (c') own process, no fast path {:>8.1} us   ({:.2}x irqfd): every message on the socket (APIC bus v1)",
        without_fast_paths / 1e3,
        without_fast_paths / irqfd
    );
    let (b, c) = (in_process / irqfd, out_of_process / irqfd);
    println!(
        "result|interrupt_latency: APIC bus in process / irqfd|{b:.2}x ({:.1} / {:.1} us)|<= 1.5x|{}",
        in_process / 1e3,
        irqfd / 1e3,
        verdict(b <= 1.5)
    );
    println!(
        "result|interrupt_latency: APIC bus out of process / irqfd|{c:.2}x ({:.1} us)|<= 3.0x|{}",
        out_of_process / 1e3,
        verdict(c <= 3.0)
    );
    println!(
        "result|interrupt_latency: out of process without fast paths / with|{:.2}x ({:.1} vs {:.1} us)|-|info",
        without_fast_paths / out_of_process,
        without_fast_paths / 1e3,
        out_of_process / 1e3
    );
}

/// Latency (median ns of `n`) through an IOAPIC in its own process
/// (`nkvm device --model ioapic`) whose pin a "device" in this process
/// drives over the pin socket, and what its bus carried.
fn own_process(hv: &Hypervisor, n: usize, fast_paths: bool) -> (f64, nkvm::ApicBusStats) {
    let dir = std::env::temp_dir().join(format!("nkvm-bench-ioapic-{fast_paths}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nkvm"))
        .args(["device", "--model", "ioapic", "--socket"])
        .arg(dir.join("regs"))
        .arg("--apic-bus")
        .arg(dir.join("bus"))
        .arg("--pins")
        .arg(dir.join("pins"))
        .spawn()
        .unwrap();
    let vm = vm(hv);
    vm.attach_region(IoRange::mmio(0xfec0_0000, 0x100), connect(&dir.join("regs")), Ordering::Sync).unwrap();
    vm.attach_apic_bus_with(connect(&dir.join("bus")), nkvm::ApicBusOptions { fast_paths }).unwrap();
    let mut pins =
        Client::over(connect(&dir.join("pins")), RegionInfo { id: 1, space: Space::Mmio, base: 0, len: 24 }).unwrap();
    let (rx, kick) = start_guest(hv, &vm, true);
    let latency = measure(n, &rx, || {
        pins.write(5, AccessSize::Byte, 1).unwrap();
        pins.write(5, AccessSize::Byte, 0).unwrap();
    });
    kick.kick();
    let bus = vm.apic_bus_stats().expect("a socket bus");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    (latency, bus)
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "not met"
    }
}
