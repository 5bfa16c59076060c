//! Interrupt latency: from a device raising an interrupt to the guest's
//! handler running (it reports with an `out`, so every figure includes one
//! exit to user space), for (a) irqfd + MSI route, (b) the IOAPIC model in
//! this process on the APIC bus's direct path (`Vm::attach_apic_bus_in_process`,
//! what the VMM uses), (b') the same model in this process but on an
//! APIC-bus socketpair (the socket path, for comparison), (c) the IOAPIC in
//! its own process (`nkvm device --model ioapic`), whose pin the "device"
//! (a thread here) pulses through `nkvm_devices::pins` (posted writes, as
//! any device raising a line), with the APIC bus's fast paths (c) and
//! without them (c', every message on the socket, as before APIC-bus
//! version 2), and (c'') with fast paths but the pin driven by two *sync*
//! writes, each waiting for the IOAPIC process's reply (how this bench
//! drove it until the ninth session). All cases are set up first and run in
//! interleaved rounds; the vCPU threads run on one CPU and everything else
//! (the raising thread, the VMM's threads, the IOAPIC processes, which
//! inherit the main thread's CPU) on another (`NKVM_BENCH_NO_PIN=1` leaves
//! them to the scheduler). One run,
//! medians side by side with ratios. Targets: b <= 1.5x a, c <= 3x a.
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
use nkvm_devices::pins::RemotePins;
use nkvm_devices::{ApicBusSink, IoDevice, IrqLine};
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
fn start_guest(
    hv: &Hypervisor,
    vm: &Vm,
    program_ioapic: bool,
    cpus: Option<Cpus>,
) -> (mpsc::Receiver<Instant>, nkvm::Kicker) {
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
        if let Some(cpus) = cpus {
            pin_to(cpus.vcpu);
        }
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

/// One way of raising the guest's interrupt, set up and waiting: its VM
/// (with the guest in `hlt`), what raises the interrupt, and the samples.
struct Case {
    vm: Vm,
    rx: mpsc::Receiver<Instant>,
    kick: nkvm::Kicker,
    raise: Box<dyn FnMut()>,
    /// Raise → handler latencies (ns).
    samples: Vec<f64>,
    /// A device process to end with the case.
    child: Option<std::process::Child>,
}

impl Case {
    fn new(vm: Vm, (rx, kick): (mpsc::Receiver<Instant>, nkvm::Kicker), raise: Box<dyn FnMut()>) -> Case {
        Case { vm, rx, kick, raise, samples: Vec::new(), child: None }
    }

    /// `count` raise → handler round trips.
    fn round(&mut self, count: usize) {
        for _ in 0..count {
            let t0 = Instant::now();
            (self.raise)();
            let t1 = self.rx.recv_timeout(Duration::from_secs(10)).expect("interrupt never arrived");
            self.samples.push((t1 - t0).as_nanos() as f64);
        }
    }

    fn median(&mut self) -> f64 {
        self.samples.sort_by(|a, b| a.total_cmp(b));
        self.samples[self.samples.len() / 2]
    }

    /// Stops the guest and the device process; returns what the bus carried.
    fn end(mut self) -> nkvm::ApicBusStats {
        self.kick.kick();
        let stats = self.vm.apic_bus_stats().unwrap_or_default();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        stats
    }
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

/// Every case runs `n / ROUNDS` samples per round, in an order that rotates
/// from round to round, so a slow spell of the host (or of KVM's adaptive
/// halt polling, docs/benchmarks.md) falls on all cases alike.
const ROUNDS: usize = 10;

fn main() {
    let quick = std::env::args().any(|a| a == "--test" || a == "--list");
    let n = if quick { 20 } else { 2000 };
    let hv = Hypervisor::open().expect("/dev/kvm");
    let cpus = Cpus::choose();
    if let Some(cpus) = cpus {
        pin_to(cpus.device);
    }
    let mut cases = vec![
        irqfd_case(&hv, cpus),
        in_process_case(&hv, cpus),
        socketpair_case(&hv, cpus),
        own_process(&hv, cpus, true, PinWrites::Posted),
        own_process(&hv, cpus, false, PinWrites::Posted),
        own_process(&hv, cpus, true, PinWrites::Sync),
    ];
    for round in 0..ROUNDS {
        for i in 0..cases.len() {
            let at = (round + i) % cases.len();
            cases[at].round(n / ROUNDS);
        }
    }
    let medians: Vec<f64> = cases.iter_mut().map(Case::median).collect();
    let stats: Vec<nkvm::ApicBusStats> = cases.into_iter().map(Case::end).collect();
    let [irqfd, in_process, socketpair, out_of_process, without_fast_paths, sync_pins] = medians[..] else {
        unreachable!("six cases")
    };
    let bus_c = stats[3];

    println!(
        "interrupt latency, device raise -> guest handler (median of {n} in {ROUNDS} interleaved rounds; each includes one exit to report):"
    );
    match cpus {
        Some(c) => println!(
            "  every vCPU thread on CPU {}; everything else (the device, VMM threads, IOAPIC processes) on CPU {}",
            c.vcpu, c.device
        ),
        None => println!("  threads not pinned (NKVM_BENCH_NO_PIN, or fewer than 2 CPUs): medians may be bimodal"),
    }
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
    println!(
        "  (c'') own process, sync pins   {:>8.1} us   ({:.2}x irqfd): the device waits for each pin write's reply",
        sync_pins / 1e3,
        sync_pins / irqfd
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
    println!(
        "result|interrupt_latency: out of process, sync pin writes / posted|{:.2}x ({:.1} vs {:.1} us)|-|info",
        sync_pins / out_of_process,
        sync_pins / 1e3,
        out_of_process / 1e3
    );
}

/// (a) irqfd + an MSI route.
fn irqfd_case(hv: &Hypervisor, cpus: Option<Cpus>) -> Case {
    let vm = vm(hv);
    let guest = start_guest(hv, &vm, false, cpus);
    let evt = EventFd::new(0).unwrap();
    vm.set_msi_route(30, Some(MsiMessage::fixed(0, VECTOR))).unwrap();
    vm.irqfd(30, &evt).unwrap();
    Case::new(vm, guest, Box::new(move || evt.write(1).unwrap()))
}

/// (b) the IOAPIC model in this process, on the bus's direct path.
fn in_process_case(hv: &Hypervisor, cpus: Option<Cpus>) -> Case {
    let vm = vm(hv);
    let target: Arc<Mutex<Option<DirectIoapic>>> = Arc::default();
    let t = target.clone();
    let bus = vm
        .attach_apic_bus_in_process(Box::new(move |v: u8| {
            if let Some(io) = &*t.lock().unwrap() {
                io.lock().unwrap().end_of_interrupt(v);
            }
        }))
        .unwrap();
    let direct = Arc::new(Mutex::new(Ioapic::new(Direct(bus))));
    *target.lock().unwrap() = Some(direct.clone());
    vm.attach_handler(IoRange::mmio(0xfec0_0000, 0x100), Box::new(Regs(direct.clone()))).unwrap();
    let guest = start_guest(hv, &vm, true, cpus);
    Case::new(vm, guest, pulse_pin_5(direct))
}

/// (b') the IOAPIC model in this process, on an APIC-bus socketpair.
fn socketpair_case(hv: &Hypervisor, cpus: Option<Cpus>) -> Case {
    let vm = vm(hv);
    let (vm_end, dev_end) = UnixStream::pair().unwrap();
    let dev = std::thread::spawn(move || {
        let mut r = dev_end.try_clone().unwrap();
        let mut w = dev_end;
        nkvm_wire::apic::device_handshake(&mut r, &mut w, VersionRange::CURRENT).unwrap();
        (r, w)
    });
    vm.attach_apic_bus(vm_end).unwrap();
    let (mut reader, writer) = dev.join().unwrap();
    let ioapic = Arc::new(Mutex::new(Ioapic::new(BusSink(Arc::new(Mutex::new(writer))))));
    vm.attach_handler(IoRange::mmio(0xfec0_0000, 0x100), Box::new(Regs(ioapic.clone()))).unwrap();
    let eoi = ioapic.clone();
    std::thread::spawn(move || {
        while let Ok(Some(ApicFrame::Eoi(e))) = nkvm_wire::apic::read_frame(&mut reader) {
            eoi.lock().unwrap().end_of_interrupt(e.vector);
        }
    });
    let guest = start_guest(hv, &vm, true, cpus);
    Case::new(vm, guest, pulse_pin_5(ioapic))
}

/// Raises an edge on pin 5 of an IOAPIC model in this process.
fn pulse_pin_5<S: ApicBusSink + 'static>(ioapic: Arc<Mutex<Ioapic<S>>>) -> Box<dyn FnMut()> {
    Box::new(move || {
        let mut io = ioapic.lock().unwrap();
        io.set_irq(5, true);
        io.set_irq(5, false);
    })
}

/// How the bench's "device" drives the IOAPIC's pin.
#[derive(Clone, Copy, PartialEq)]
enum PinWrites {
    /// `nkvm_devices::pins`: an edge is two posted writes in one send.
    Posted,
    /// Two round trips, each waiting for the IOAPIC process's reply.
    Sync,
}

/// (c) an IOAPIC in its own process (`nkvm device --model ioapic`) whose
/// pin a "device" in this process drives over the pin socket.
fn own_process(hv: &Hypervisor, cpus: Option<Cpus>, fast_paths: bool, writes: PinWrites) -> Case {
    let sync = writes == PinWrites::Sync;
    let dir = std::env::temp_dir().join(format!("nkvm-bench-ioapic-{fast_paths}-{sync}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_nkvm"))
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
    let pins = connect(&dir.join("pins"));
    let _ = std::fs::remove_dir_all(&dir);
    let guest = start_guest(hv, &vm, true, cpus);
    let raise: Box<dyn FnMut()> = if sync {
        let mut pins = Client::over(pins, RegionInfo { id: 1, space: Space::Mmio, base: 0, len: 24 }).unwrap();
        Box::new(move || {
            pins.write(5, AccessSize::Byte, 1).unwrap();
            pins.write(5, AccessSize::Byte, 0).unwrap();
        })
    } else {
        let line = RemotePins::over(pins, 24).unwrap().line(5).unwrap();
        Box::new(move || line.pulse())
    };
    let mut case = Case::new(vm, guest, raise);
    case.child = Some(child);
    case
}

/// Where the bench's threads run. Unpinned, the scheduler may put the
/// device's thread on the CPU where a halted vCPU is polling (KVM's adaptive
/// halt polling), and a case's median then lands near 20 or near 70-110 us
/// depending on where its threads happened to start, irqfd and in-process
/// cases as much as the others (docs/benchmarks.md, "Ninth session").
#[derive(Clone, Copy)]
struct Cpus {
    /// The raising "device" (the bench's main thread), and so every thread
    /// and process it starts, but the vCPUs.
    device: usize,
    /// Every vCPU thread.
    vcpu: usize,
}

impl Cpus {
    /// The first two CPUs this process may run on, unless
    /// `NKVM_BENCH_NO_PIN` is set or there are fewer.
    fn choose() -> Option<Cpus> {
        if std::env::var_os("NKVM_BENCH_NO_PIN").is_some() {
            return None;
        }
        // SAFETY: a zeroed cpu_set_t is a valid empty set, and
        // sched_getaffinity writes at most the size passed.
        let set = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                return None;
            }
            set
        };
        // SAFETY: CPU_ISSET reads the set within its size (cpu < CPU_SETSIZE).
        let mut allowed = (0..libc::CPU_SETSIZE as usize).filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) });
        Some(Cpus { device: allowed.next()?, vcpu: allowed.next()? })
    }
}

/// Keeps the calling thread on `cpu`.
fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes
    // within it (cpu came from sched_getaffinity); sched_setaffinity only
    // reads the size passed.
    let ok = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    };
    assert!(ok, "cannot pin a thread to CPU {cpu}: {}", std::io::Error::last_os_error());
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "not met"
    }
}
