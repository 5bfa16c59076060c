//! I/O-region costs, one run: a sync MMIO read served (a) by an in-process
//! handler, (b) over a socket by a device in another process (`nkvm
//! device`), (c) by the caller after an exit from `enter_guest` (the bare
//! exit round trip); and write throughput to a posted vs a sync region (both
//! out of process). Targets: b/a <= 2.0, posted >= 5x sync.
//!
//! Run: `cargo bench -p nkvm-vmm --bench io_regions`.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use nkvm::io::{IoHandler, IoRange, Ordering};
use nkvm::{Exit, GuestAddress, Hypervisor, LongMode, RunState, Vcpu, Vm, VmConfig};
use nkvm_devices::test_device::TestDevice;
use nkvm_devices::IoDevice;

const ENTRY: u64 = 0x10_0000;
const MMIO: u64 = 0xd000_0000;

struct Handler(TestDevice);

impl IoHandler for Handler {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.read(offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.write(offset, data);
    }
}

fn setup(hv: &Hypervisor, write: bool, n: u32) -> (Vm, Vcpu) {
    setup_at(hv, write, n, MMIO)
}

/// The guest loop accessing `target` (MMIO, or RAM for the floor).
fn setup_at(hv: &Hypervisor, write: bool, n: u32, target: u64) -> (Vm, Vcpu) {
    let vm = Vm::new(hv, &VmConfig { vcpus: 1, memory: 16 << 20, ..Default::default() }).unwrap();
    let mut a = CodeAssembler::new(64).unwrap();
    let mut again = a.create_label();
    a.mov(rbx, target).unwrap();
    a.mov(ecx, n).unwrap();
    a.set_label(&mut again).unwrap();
    if write {
        a.mov(qword_ptr(rbx + 0x20), rcx).unwrap();
    } else {
        a.mov(rax, qword_ptr(rbx + 0x20)).unwrap();
    }
    a.dec(ecx).unwrap();
    a.jnz(again).unwrap();
    a.hlt().unwrap();
    vm.write_memory(GuestAddress(ENTRY), &a.assemble(ENTRY).unwrap()).unwrap();
    let lm = LongMode::install(&vm.memory(), GuestAddress(0x2_0000)).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_long_mode(&lm, GuestAddress(ENTRY), GuestAddress(0x9_0000)).unwrap();
    (vm, vcpu)
}

/// Runs the loop to `hlt`, completing any read that reaches the caller.
fn run(vcpu: &mut Vcpu) {
    let mut run = RunState::new();
    loop {
        match vcpu.enter_guest(&mut run).unwrap() {
            Exit::Hlt => return,
            Exit::MmioRead { .. } => run.complete_mmio_read(0),
            Exit::MmioWrite { .. } => {}
            other => panic!("unexpected {other}"),
        }
    }
}

struct Device(Child, PathBuf);

impl Device {
    fn spawn(tag: &str) -> (Device, UnixStream) {
        let path = std::env::temp_dir().join(format!("nkvm-bench-{tag}-{}.sock", std::process::id()));
        let child = Command::new(env!("CARGO_BIN_EXE_nkvm"))
            .args(["device", "--model", "test", "--socket"])
            .arg(&path)
            .spawn()
            .expect("spawn nkvm device");
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(&path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => panic!("device never listened: {e}"),
            }
        };
        (Device(child, path), stream)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_file(&self.1);
    }
}

/// ns per access, median of `rounds` timed runs of `n` accesses.
fn measure(hv: &Hypervisor, n: u32, rounds: usize, write: bool, attach: impl Fn(&Vm)) -> f64 {
    let mut v = Vec::new();
    for _ in 0..rounds {
        let (vm, mut vcpu) = setup(hv, write, n);
        attach(&vm);
        let t = Instant::now();
        run(&mut vcpu);
        v.push(t.elapsed().as_secs_f64() * 1e9 / f64::from(n));
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--test" || a == "--list");
    let (n, rounds) = if quick { (100, 1) } else { (20_000, 5) };
    let hv = Hypervisor::open().expect("/dev/kvm");
    let in_process = measure(&hv, n, rounds, false, |vm| {
        vm.attach_handler(IoRange::mmio(MMIO, 0x40), Box::new(Handler(TestDevice::new()))).unwrap();
    });
    let devices: std::cell::RefCell<Vec<Device>> = Default::default();
    let socket = |ordering: Ordering| {
        let devices = &devices;
        move |vm: &Vm| {
            let (dev, stream) = Device::spawn(&format!("{ordering:?}"));
            vm.attach_region(IoRange::mmio(MMIO, 0x40), stream, ordering).unwrap();
            devices.borrow_mut().push(dev);
        }
    };
    let out_of_process = measure(&hv, n, rounds, false, socket(Ordering::Sync));
    let exit_only = measure(&hv, n, rounds, false, |_| {});
    let sync_writes = measure(&hv, n, rounds, true, socket(Ordering::Sync));
    let posted_writes = measure(&hv, n, rounds, true, socket(Ordering::Posted));
    // The floor: the same loop storing to RAM (no MMIO, no exit). On a host
    // that runs this guest in KVM's instruction emulator, the loop itself
    // costs about as much as an exit.
    let mut floor = Vec::new();
    for _ in 0..rounds {
        let (_vm, mut vcpu) = setup_at(&hv, true, n, 0x20_0000);
        let t = Instant::now();
        run(&mut vcpu);
        floor.push(t.elapsed().as_secs_f64() * 1e9 / f64::from(n));
    }
    floor.sort_by(|a, b| a.total_cmp(b));
    let ram_writes = floor[floor.len() / 2];
    devices.borrow_mut().clear();
    println!("sync MMIO read, ns per access (median of {rounds} x {n}):");
    println!("  (a) in-process handler          {in_process:>8.0}");
    println!("  (b) device in another process   {out_of_process:>8.0}");
    println!("  (c) exit to the caller          {exit_only:>8.0}");
    println!(
        "  ratio b/a {:.2} (target <= 2.0), a/c {:.2}, b/c {:.2}",
        out_of_process / in_process,
        in_process / exit_only,
        out_of_process / exit_only
    );
    println!("MMIO writes to a device in another process, ns per write:");
    println!("  sync   {sync_writes:>8.0}");
    println!("  posted {posted_writes:>8.0}");
    println!("  RAM    {ram_writes:>8.0}   (the same loop storing to RAM: the floor for a write that does not exit)");
    println!("  posted throughput = {:.1}x sync (target >= 5x)", sync_writes / posted_writes);
    let (posted, remote) = (sync_writes / posted_writes, out_of_process / in_process);
    println!(
        "result|io_regions: posted / sync write throughput|{posted:.1}x ({posted_writes:.0} vs {sync_writes:.0} ns; RAM loop {ram_writes:.0} ns)|>= 5x|{}",
        verdict(posted >= 5.0)
    );
    println!(
        "result|io_regions: sync read, other process / in process|{remote:.2}x ({out_of_process:.0} vs {in_process:.0} ns)|<= 2.0x|{}",
        verdict(remote <= 2.0)
    );
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "not met"
    }
}
