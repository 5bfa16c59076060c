//! Exit round trip: the same real-mode `out` loop through (a) a raw
//! `KVM_RUN` loop on the kvm_run mmap area and (b) `Vcpu::enter_guest`,
//! interleaved in one process, one run. Prints both per-exit costs, the
//! ratio, and what nkvm adds per exit (target: <= 50 ns): the median of the
//! per-round differences, each round's raw and nkvm halves run back to back,
//! so that this host's drift (the cost of an exit moves by 10-20% over
//! seconds) cancels out of each difference.
//!
//! Run: `cargo bench -p nkvm --bench exit_roundtrip` (env `NKVM_BENCH_EXITS`
//! sets exits per round, default 20000; `NKVM_BENCH_ROUNDS` rounds, default 21).
//!
//! With `--features nkvm/exit-timing` it also counts, in both paths, the TSC
//! ticks spent in user space from one `KVM_RUN` returning to the next
//! starting: the part of an exit nkvm's code adds to, without the kernel's
//! share whose drift swamps the round-trip difference on a noisy host; and,
//! apart, the ticks inside each `KVM_RUN` (the kernel's share, per path).

use std::os::fd::AsRawFd;
use std::time::Instant;

use kvm_bindings::{kvm_userspace_memory_region, KVM_EXIT_IO};
use kvm_ioctls::Kvm;
use nkvm::{Exit, GuestAddress, Hypervisor, RunState, Vm, VmConfig};
use vmm_sys_util::ioctl::ioctl;

mod ioctls {
    #![allow(missing_docs)]
    use vmm_sys_util::ioctl_io_nr;
    ioctl_io_nr!(KVM_RUN, kvm_bindings::KVMIO, 0x80);
}
use ioctls::KVM_RUN;

/// Real mode at 0x1000: `l: out 0x10, al; jmp l`.
const GUEST: [u8; 4] = [0xe6, 0x10, 0xeb, 0xfc];
const MEM: usize = 1 << 20;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The physical limit: kvm-ioctls objects, a raw ioctl, the mmap'd kvm_run.
struct Raw {
    _vm: kvm_ioctls::VmFd,
    vcpu: kvm_ioctls::VcpuFd,
    _mem: Vec<u8>,
    /// User-space TSC ticks between KVM_RUNs (feature `exit-timing`).
    #[cfg(feature = "exit-timing")]
    user: nkvm::exit_timing::Gaps,
    /// TSC ticks inside each KVM_RUN of the last round (feature `exit-timing`).
    #[cfg(feature = "exit-timing")]
    kvm_run: nkvm::exit_timing::KvmRuns,
}

impl Raw {
    fn new() -> Raw {
        let kvm = Kvm::new().expect("open /dev/kvm");
        let vm = kvm.create_vm().expect("create VM");
        // Over-allocate so a page-aligned MEM-byte window fits inside.
        let mut mem = vec![0u8; MEM + 4096];
        let skew = (4096 - (mem.as_ptr() as usize % 4096)) % 4096;
        mem[skew + 0x1000..skew + 0x1000 + GUEST.len()].copy_from_slice(&GUEST);
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: MEM as u64,
            userspace_addr: mem[skew..].as_mut_ptr() as u64,
        };
        // SAFETY: `mem[skew..]` is a live allocation of MEM bytes owned by the
        // returned Raw, which keeps it for as long as the VM exists.
        unsafe { vm.set_user_memory_region(region) }.expect("memory region");
        let vcpu = vm.create_vcpu(0).expect("vCPU");
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).unwrap();
        vcpu.set_regs(&kvm_bindings::kvm_regs { rip: 0x1000, rflags: 2, ..Default::default() }).unwrap();
        Raw {
            _vm: vm,
            vcpu,
            _mem: mem,
            #[cfg(feature = "exit-timing")]
            user: Default::default(),
            #[cfg(feature = "exit-timing")]
            kvm_run: Default::default(),
        }
    }

    fn run(&mut self, exits: u64) -> f64 {
        #[cfg(feature = "exit-timing")]
        {
            self.kvm_run = Default::default();
        }
        let fd = self.vcpu.as_raw_fd();
        let start = Instant::now();
        #[cfg(feature = "exit-timing")]
        let mut left = 0;
        for _ in 0..exits {
            // The same bookkeeping, in the same order, as nkvm's own
            // (exit_timing::entering and left).
            #[cfg(feature = "exit-timing")]
            if left != 0 {
                self.user.record(nkvm::exit_timing::tsc().wrapping_sub(left));
            }
            #[cfg(feature = "exit-timing")]
            let entered = nkvm::exit_timing::tsc();
            // SAFETY: KVM_RUN on a vCPU fd whose kvm_run area kvm-ioctls keeps mapped.
            let rc = unsafe { ioctl(&RawFd(fd), KVM_RUN()) };
            #[cfg(feature = "exit-timing")]
            {
                self.kvm_run.record(nkvm::exit_timing::tsc().wrapping_sub(entered));
                left = nkvm::exit_timing::tsc();
            }
            assert_eq!(rc, 0, "KVM_RUN: {}", std::io::Error::last_os_error());
            let run = self.vcpu.get_kvm_run();
            assert_eq!(run.exit_reason, KVM_EXIT_IO);
            // SAFETY: exit_reason says the io member of the union is valid.
            let io = unsafe { run.__bindgen_anon_1.io };
            assert_eq!(io.port, 0x10);
        }
        start.elapsed().as_secs_f64() * 1e9 / exits as f64
    }
}

struct RawFd(std::os::fd::RawFd);
impl AsRawFd for RawFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

struct Nkvm {
    _vm: Vm,
    vcpu: nkvm::Vcpu,
    run: RunState,
    /// User-space TSC ticks between KVM_RUNs (feature `exit-timing`).
    #[cfg(feature = "exit-timing")]
    user: nkvm::exit_timing::Gaps,
    /// TSC ticks inside each KVM_RUN of the last round (feature `exit-timing`).
    #[cfg(feature = "exit-timing")]
    kvm_run: nkvm::exit_timing::KvmRuns,
}

impl Nkvm {
    fn new(hv: &Hypervisor) -> Nkvm {
        let vm = Vm::new(hv, &VmConfig { vcpus: 1, memory: MEM as u64, ..Default::default() }).unwrap();
        vm.write_memory(GuestAddress(0x1000), &GUEST).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        vcpu.set_real_mode(0, 0x1000).unwrap();
        Nkvm {
            _vm: vm,
            vcpu,
            run: RunState::new(),
            #[cfg(feature = "exit-timing")]
            user: Default::default(),
            #[cfg(feature = "exit-timing")]
            kvm_run: Default::default(),
        }
    }

    fn run(&mut self, exits: u64) -> f64 {
        #[cfg(feature = "exit-timing")]
        {
            nkvm::exit_timing::take();
            nkvm::exit_timing::take_kvm_run();
        }
        let start = Instant::now();
        for _ in 0..exits {
            match self.vcpu.enter_guest(&mut self.run).unwrap() {
                Exit::IoOut { port: 0x10, .. } => {}
                other => panic!("unexpected {other}"),
            }
        }
        let ns = start.elapsed().as_secs_f64() * 1e9 / exits as f64;
        #[cfg(feature = "exit-timing")]
        {
            self.user.merge(&nkvm::exit_timing::take());
            self.kvm_run = nkvm::exit_timing::take_kvm_run();
        }
        ns
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    // `cargo test --benches` passes --bench-less flags; keep that run short.
    let quick = std::env::args().any(|a| a == "--test" || a == "--list");
    let exits = if quick { 200 } else { env("NKVM_BENCH_EXITS", 20_000) };
    let rounds = if quick { 1 } else { env("NKVM_BENCH_ROUNDS", 21) as usize };
    let hv = Hypervisor::open().expect("open /dev/kvm");
    let mut raw = Raw::new();
    let mut lib = Nkvm::new(&hv);
    // Warm up both paths.
    raw.run(exits / 10 + 1);
    lib.run(exits / 10 + 1);
    let (mut raw_ns, mut lib_ns) = (Vec::new(), Vec::new());
    // Per round, nkvm's median KVM_RUN minus raw's (feature `exit-timing`).
    #[cfg(feature = "exit-timing")]
    let mut inside = Vec::new();
    for round in 0..rounds {
        // Alternate the order so drift on this noisy host hits both alike.
        if round % 2 == 0 {
            raw_ns.push(raw.run(exits));
            lib_ns.push(lib.run(exits));
        } else {
            lib_ns.push(lib.run(exits));
            raw_ns.push(raw.run(exits));
        }
        #[cfg(feature = "exit-timing")]
        inside.push(lib.kvm_run.median() as f64 - raw.kvm_run.median() as f64);
    }
    let mut added: Vec<f64> = lib_ns.iter().zip(&raw_ns).map(|(l, r)| l - r).collect();
    let added = median(&mut added);
    let (r, l) = (median(&mut raw_ns), median(&mut lib_ns));
    println!("exit round trip, real-mode PIO `out` loop, {exits} exits x {rounds} rounds (median per exit):");
    println!("  raw KVM_RUN loop         {:>8.0} ns/exit", r);
    println!("  nkvm enter_guest         {:>8.0} ns/exit", l);
    println!("  ratio nkvm/raw           {:>8.3}", l / r);
    println!("  added by nkvm            {added:>8.0} ns/exit (median of per-round differences; target <= 50)");
    #[cfg(feature = "exit-timing")]
    {
        let (r, l) = (raw.user.median() as f64, lib.user.median() as f64);
        let mhz = tsc_mhz();
        let added = (l - r) * 1000.0 / mhz;
        println!("  user space per exit      raw {r:.0}, nkvm {l:.0} TSC ticks (medians of every gap; {mhz:.0} MHz)");
        println!(
            "result|exit_roundtrip: user space per exit, nkvm - raw (exit-timing)|{added:+.0} ns ({l:.0} vs {r:.0} TSC ticks)|<= +50 ns|{}",
            verdict(added <= 50.0)
        );
        // The kernel's share: where the round trip's difference goes
        // beyond the user-space one, if anywhere. Each round's medians are
        // paired, as the round trips are, so that drift cancels.
        let mid = median(&mut inside);
        let (lo, hi) = (inside[0], inside[inside.len() - 1]);
        let ns = |ticks: f64| ticks * 1000.0 / mhz;
        println!(
            "  inside KVM_RUN per exit  nkvm - raw {mid:+.0} TSC ticks (median of per-round differences of medians; range {lo:+.0} to {hi:+.0})"
        );
        println!(
            "result|exit_roundtrip: inside KVM_RUN per exit, nkvm - raw (exit-timing)|{:+.0} ns (per-round range {:+.0} to {:+.0} ns)|-|info",
            ns(mid),
            ns(lo),
            ns(hi)
        );
    }
    println!(
        "result|exit_roundtrip: enter_guest - raw KVM_RUN|{added:+.0} ns (medians {:.3}x; raw {r:.0} ns)|<= +50 ns|{}",
        l / r,
        verdict(added <= 50.0)
    );
}

/// The TSC's rate, measured against the monotonic clock over 100 ms.
#[cfg(feature = "exit-timing")]
fn tsc_mhz() -> f64 {
    let (t0, c0) = (Instant::now(), nkvm::exit_timing::tsc());
    std::thread::sleep(std::time::Duration::from_millis(100));
    let (ticks, ns) = (nkvm::exit_timing::tsc() - c0, t0.elapsed().as_nanos());
    ticks as f64 * 1000.0 / ns as f64
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "not met"
    }
}
