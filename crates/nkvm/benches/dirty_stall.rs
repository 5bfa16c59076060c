//! How long a collection holds up a vCPU that is writing memory: the RFC's
//! range and budget queries exist so that a VMM never stalls its guest for a
//! whole slot. A 32-bit flat guest loops over 25% of 1 GiB, writing a page
//! per iteration and keeping, in guest memory, the largest gap it saw
//! between two iterations (its own TSC). While it runs, the host collects
//! the dirty pages again and again and reads that largest gap per
//! collection:
//!
//! - raw: `KVM_GET_DIRTY_LOG` of the whole slot (which write-protects every
//!   dirty page under KVM's MMU lock in one call) and a scan;
//! - nkvm, one query: `sync_dirty_log` + one `collect_dirty` for everything;
//! - nkvm, budget: `sync_dirty_log` + `collect_dirty` calls of 4096 pages
//!   each, as a migration loop sends them.
//!
//! A baseline with no collection (the host sleeps as long as a collection
//! takes) shows what this host's own noise adds. Each figure is the median
//! and the worst, over the rounds, of the largest gap during one
//! collection; rounds of the paths are interleaved.
//!
//! Run: `cargo bench -p nkvm --bench dirty_stall`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use nkvm::{DirtyLogMode, DirtyPages, Exit, GuestAddress, Hypervisor, MemoryMap, Region, RunState, Vm, VmConfig};

const GIB: u64 = 1 << 30;
const CODE: u64 = 0x1000;
/// The guest's largest gap (u32, TSC cycles), reset by the host.
const MAX_GAP: u64 = 0x3000;
/// Non-zero: the guest halts.
const STOP: u64 = 0x3004;
/// The TSC (low 32 bits) of the guest's last iteration.
const LAST: u64 = 0x3008;
/// How long the guest dirties memory before each collection.
const DIRTY_PHASE: Duration = Duration::from_millis(300);
/// Pages below this are not dirtied (code, the two words above).
const FIRST: u64 = 16 << 20;
/// Every 4th page: 25% of the memory above FIRST.
const STRIDE: u64 = 4 * 4096;
const ROUNDS: usize = 8;
/// Collections per round (the figure of a round is the largest gap of
/// each, their median taken over all rounds).
const PER_ROUND: usize = 3;

/// 32-bit flat code, forever until [STOP]: rdtsc; gap = tsc - prev;
/// [MAX_GAP] = max([MAX_GAP], gap); [ebx] = tsc; ebx += ecx (wrapping at
/// edi back to FIRST).
fn guest() -> Vec<u8> {
    use iced_x86::code_asm::*;
    let mut a = CodeAssembler::new(32).unwrap();
    let (mut top, mut no_max, mut no_wrap) = (a.create_label(), a.create_label(), a.create_label());
    a.mov(ebx, FIRST as u32).unwrap();
    a.rdtsc().unwrap();
    a.mov(esi, eax).unwrap();
    a.set_label(&mut top).unwrap();
    a.rdtsc().unwrap();
    a.mov(edx, eax).unwrap();
    a.sub(edx, esi).unwrap();
    a.mov(esi, eax).unwrap();
    a.cmp(edx, dword_ptr(MAX_GAP as u32)).unwrap();
    a.jbe(no_max).unwrap();
    a.mov(dword_ptr(MAX_GAP as u32), edx).unwrap();
    a.set_label(&mut no_max).unwrap();
    a.mov(dword_ptr(ebx), eax).unwrap();
    a.mov(dword_ptr(LAST as u32), eax).unwrap();
    a.add(ebx, ecx).unwrap();
    a.cmp(ebx, edi).unwrap();
    a.jb(no_wrap).unwrap();
    a.mov(ebx, FIRST as u32).unwrap();
    a.set_label(&mut no_wrap).unwrap();
    a.cmp(dword_ptr(STOP as u32), 0).unwrap();
    a.je(top).unwrap();
    a.hlt().unwrap();
    a.assemble(CODE).unwrap()
}

fn flat32(sregs: &mut kvm_bindings::kvm_sregs) {
    let seg = kvm_bindings::kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x10,
        type_: 3,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = kvm_bindings::kvm_segment { selector: 0x08, type_: 0xb, ..seg };
    sregs.ds = seg;
    sregs.es = seg;
    sregs.ss = seg;
    sregs.fs = seg;
    sregs.gs = seg;
    sregs.cr0 |= 1;
}

fn regs() -> kvm_bindings::kvm_regs {
    kvm_bindings::kvm_regs { rip: CODE, rflags: 2, rcx: STRIDE, rdi: GIB, ..Default::default() }
}

/// TSC cycles per microsecond (the guest's TSC runs at the host's rate).
fn tsc_per_us() -> f64 {
    let (t0, i0) = (rdtsc(), Instant::now());
    std::thread::sleep(Duration::from_millis(50));
    let t1 = rdtsc();
    (t1 - t0) as f64 / i0.elapsed().as_secs_f64() / 1e6
}

/// The guest memory both machines expose to the measuring loop.
trait Guest: Sync {
    fn read_u32(&self, gpa: u64) -> u32;
    fn write_u32(&self, gpa: u64, value: u32);
}

/// Raw KVM: one slot of 1 GiB, classic dirty log.
struct Raw {
    vm: kvm_ioctls::VmFd,
    host: *mut u8,
}

// SAFETY: `host` is a shared mapping that lives as long as `Raw`; the guest
// and the host only exchange u32 words through it with volatile accesses.
unsafe impl Sync for Raw {}

impl Guest for Raw {
    fn read_u32(&self, gpa: u64) -> u32 {
        // SAFETY: gpa + 4 is inside the 1 GiB mapping.
        unsafe { std::ptr::read_volatile(self.host.add(gpa as usize) as *const u32) }
    }
    fn write_u32(&self, gpa: u64, value: u32) {
        // SAFETY: as above.
        unsafe { std::ptr::write_volatile(self.host.add(gpa as usize) as *mut u32, value) }
    }
}

impl Raw {
    fn new() -> (Self, VcpuFd) {
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        // SAFETY: a fresh anonymous mapping of 1 GiB, unmapped in Drop.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                GIB as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(host, libc::MAP_FAILED);
        let code = guest();
        // SAFETY: CODE + code.len() is inside the mapping.
        unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), (host as *mut u8).add(CODE as usize), code.len()) };
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 0,
            memory_size: GIB,
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping covers the slot and outlives it (Drop deletes the slot first).
        unsafe { vm.set_user_memory_region(region) }.unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        flat32(&mut sregs);
        vcpu.set_sregs(&sregs).unwrap();
        (Self { vm, host: host as *mut u8 }, vcpu)
    }

    /// `KVM_GET_DIRTY_LOG` of the slot and a scan; returns the page count.
    fn collect(&self) -> usize {
        let bits = self.vm.get_dirty_log(0, GIB as usize).unwrap();
        bits.iter().map(|w| w.count_ones() as usize).sum()
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        let region = kvm_userspace_memory_region { slot: 0, ..Default::default() };
        // SAFETY: deleting the slot makes KVM drop its reference to the mapping.
        unsafe { self.vm.set_user_memory_region(region) }.unwrap();
        // SAFETY: the mapping made in `new`; no slot refers to it any more.
        unsafe { libc::munmap(self.host as *mut libc::c_void, GIB as usize) };
    }
}

impl Guest for Vm {
    fn read_u32(&self, gpa: u64) -> u32 {
        let mut b = [0u8; 4];
        self.read_memory(GuestAddress(gpa), &mut b).unwrap();
        u32::from_le_bytes(b)
    }
    fn write_u32(&self, gpa: u64, value: u32) {
        self.write_memory(GuestAddress(gpa), &value.to_le_bytes()).unwrap();
    }
}

fn nkvm_vm(hv: &Hypervisor) -> (Vm, nkvm::Vcpu) {
    let vm = Vm::new(hv, &VmConfig { vcpus: 1, memory: GIB, dirty_log: DirtyLogMode::Bitmap, ..Default::default() })
        .unwrap();
    let regions: Vec<Region> =
        MemoryMap::ram(vm.ram()).unwrap().regions().iter().cloned().map(Region::dirty_logged).collect();
    vm.set_memory_map(MemoryMap::new(regions).unwrap()).unwrap();
    vm.write_memory(GuestAddress(CODE), &guest()).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.sregs().unwrap();
    flat32(&mut sregs);
    vcpu.set_sregs(&sregs).unwrap();
    (vm, vcpu)
}

/// nkvm's collection: a sync, then queries of `budget` pages until done.
fn nkvm_collect(vm: &Vm, budget: usize, dirty: &mut DirtyPages) -> usize {
    vm.sync_dirty_log().unwrap();
    let mut cursor = Some(GuestAddress(0));
    let mut n = 0;
    while let Some(start) = cursor {
        vm.collect_dirty_into(start, u64::MAX - start.0, budget, dirty).unwrap();
        n += dirty.pages.len();
        cursor = dirty.next;
    }
    n
}

fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no preconditions on x86_64.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// While the guest runs on another thread (`running` set by it), runs
/// `collect` PER_ROUND times, each after DIRTY_PHASE of guest writes;
/// returns the guest's largest gap (cycles) over each collection (the
/// host waits for the guest's first iteration after it, so the gap that
/// spans the collection is counted), and the collections' mean time.
fn measure(guest: &dyn Guest, running: &AtomicBool, mut collect: impl FnMut() -> usize) -> (Vec<u32>, Duration) {
    while !running.load(Ordering::Acquire) {
        std::thread::yield_now();
    }
    let mut gaps = Vec::new();
    let mut spent = Duration::ZERO;
    for _ in 0..PER_ROUND {
        std::thread::sleep(DIRTY_PHASE);
        guest.write_u32(MAX_GAP, 0);
        let t = Instant::now();
        collect();
        spent += t.elapsed();
        let after = rdtsc() as u32;
        let deadline = Instant::now() + Duration::from_secs(2);
        while (guest.read_u32(LAST).wrapping_sub(after) as i32) <= 0 && Instant::now() < deadline {
            std::hint::spin_loop();
        }
        gaps.push(guest.read_u32(MAX_GAP));
    }
    (gaps, spent / PER_ROUND as u32)
}

fn stop(guest: &dyn Guest) {
    guest.write_u32(STOP, 1);
}

fn main() {
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return; // too heavy for `cargo test --benches`
    }
    let hv = Hypervisor::open().expect("open /dev/kvm");
    let per_us = tsc_per_us();
    let (raw, mut raw_vcpu) = Raw::new();
    let (vm, mut vcpu) = nkvm_vm(&hv);
    let mut dirty = DirtyPages::default();
    // [baseline, raw, nkvm one query, nkvm budget 4096] largest gaps, cycles.
    let mut gaps: [Vec<u32>; 4] = Default::default();
    let mut took = [Duration::ZERO; 4];
    let mut pages = [0usize; 4];
    for round in 0..ROUNDS {
        // The raw VM.
        raw.write_u32(STOP, 0);
        raw_vcpu.set_regs(&regs()).unwrap();
        let running = AtomicBool::new(false);
        let (g, t) = std::thread::scope(|s| {
            s.spawn(|| {
                running.store(true, Ordering::Release);
                match raw_vcpu.run().unwrap() {
                    VcpuExit::Hlt => {}
                    other => panic!("raw guest: {other:?}"),
                }
            });
            let out = measure(&raw, &running, || {
                pages[1] = raw.collect();
                pages[1]
            });
            stop(&raw);
            out
        });
        gaps[1].extend(g);
        took[1] += t;
        // nkvm: baseline (sleep), one query, budget queries.
        for (i, budget) in [(0, 0), (2, usize::MAX), (3, 4096)] {
            vm.write_u32(STOP, 0);
            vcpu.set_regs(&regs()).unwrap();
            let running = AtomicBool::new(false);
            let sleep = took[1] / (round as u32 + 1);
            let (g, t) = std::thread::scope(|s| {
                s.spawn(|| {
                    running.store(true, Ordering::Release);
                    assert_eq!(vcpu.enter_guest(&mut RunState::new()).unwrap(), Exit::Hlt);
                });
                let out = measure(&vm, &running, || {
                    if budget == 0 {
                        std::thread::sleep(sleep);
                        0
                    } else {
                        pages[i] = nkvm_collect(&vm, budget, &mut dirty);
                        pages[i]
                    }
                });
                stop(&vm);
                out
            });
            gaps[i].extend(g);
            took[i] += t;
        }
    }
    println!("vCPU stall during dirty collection: 1 GiB guest writing 25% of its pages in a loop");
    println!("the guest's largest gap between two loop iterations while one collection runs (us)");
    println!("{:<34} {:>8} {:>10} {:>10} {:>12}", "path", "pages", "median", "worst", "collect us");
    let names = ["baseline (no collection)", "raw KVM_GET_DIRTY_LOG", "nkvm one query", "nkvm budget 4096 pages"];
    let mut medians = [0.0; 4];
    for i in 0..4 {
        let v = &mut gaps[i];
        v.sort_unstable();
        medians[i] = f64::from(v[v.len() / 2]) / per_us;
        println!(
            "{:<34} {:>8} {:>10.0} {:>10.0} {:>12.0}",
            names[i],
            pages[i],
            medians[i],
            f64::from(*v.last().unwrap()) / per_us,
            (took[i] / ROUNDS as u32).as_secs_f64() * 1e6
        );
    }
    for (i, name) in [(2, "one query"), (3, "budget 4096")] {
        println!(
            "result|dirty_stall: nkvm {name} / raw, median largest gap|{:.2}x ({:.0} vs {:.0} us; baseline {:.0} us)|-|info",
            medians[i] / medians[1],
            medians[i],
            medians[1],
            medians[0]
        );
    }
}
