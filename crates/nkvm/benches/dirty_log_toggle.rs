//! Dirty-log start and stop against guest size (issue 13 item 6): for
//! guests of 512 MiB, 2 GiB and 8 GiB (memory populated by the host first),
//! the time to start logging all RAM, to make the first query after the
//! start (a sync and 4096 pages), to make the first full pass (every page
//! still dirty, all-dirty start only) and to stop logging, measured for
//!
//! - raw KVM: `KVM_SET_USER_MEMORY_REGION` on the same slots with only
//!   `KVM_MEM_LOG_DIRTY_PAGES` changed, `KVM_GET_DIRTY_LOG` on every slot
//!   (into buffers allocated once) and `KVM_CLEAR_DIRTY_LOG` of the pages taken, with
//!   `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` enabled as
//!   `MANUAL_PROTECT_ENABLE | INITIALLY_SET` (what QEMU enables) or as
//!   `MANUAL_PROTECT_ENABLE` alone (a start that write-protects every page);
//! - nkvm: `Vm::set_memory_map` with the RAM regions `dirty_logged()` or not,
//!   `sync_dirty_log` and `collect_dirty_into`, with
//!   `DirtyLogStart::AllDirty` and `DirtyLogStart::Clean` respectively.
//!
//! All four VMs of a size map the same memory object, and all sizes are set
//! up at once (10.5 GiB of memory): each round runs every operation on every
//! VM of every size (raw first in even rounds, nkvm first in odd ones), so
//! load from other work on the host hits all of them alike; one warm-up
//! round is dropped and each figure is the median of the rest. The guest never runs:
//! on this nested host its accesses are emulated (a page mapped by the guest
//! costs a fault of ~10 us), so KVM has no page of it mapped and the figures
//! are KVM's per-slot work (its bitmap, its walk over the slot's pages) plus
//! nkvm's own.
//!
//! Run: `cargo bench -p nkvm --bench dirty_log_toggle`
//! (`NKVM_BENCH_SIZES=512,2048` for a subset, in MiB).

use std::os::fd::AsRawFd;
use std::time::Instant;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_dirty_log, kvm_enable_cap, kvm_userspace_memory_region, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VmFd};
use nkvm::{Backing, DirtyLogStart, DirtyPages, GuestAddress, Hypervisor, MemoryMap, Region, Vm, VmConfig, PAGE_SIZE};
use vmm_sys_util::ioctl::ioctl_with_ref;

mod ioctls {
    //! `KVM_CLEAR_DIRTY_LOG`, which kvm-ioctls lacks, and
    //! `KVM_GET_DIRTY_LOG` into a buffer kept across calls.
    #![allow(missing_docs)]
    use vmm_sys_util::{ioctl_iow_nr, ioctl_iowr_nr};
    ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, kvm_bindings::KVMIO, 0xc0, kvm_bindings::kvm_clear_dirty_log);
    ioctl_iow_nr!(KVM_GET_DIRTY_LOG, kvm_bindings::KVMIO, 0x42, kvm_bindings::kvm_dirty_log);
}
use ioctls::{KVM_CLEAR_DIRTY_LOG, KVM_GET_DIRTY_LOG};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Measured rounds per size (after one warm-up round).
const ROUNDS: usize = 41;
/// Pages in the first query, as a migration's collection loop asks.
const BUDGET: usize = 4096;

/// A guest's memory: one memfd object, populated by the host.
fn populated(size: u64) -> Backing {
    let backing = Backing::new("bench-ram", size).expect("guest memory");
    let len = size as usize;
    // SAFETY: a new shared mapping of the whole object, unmapped below;
    // the kernel checks the fd and the length.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            backing.file().as_raw_fd(),
            0,
        )
    };
    assert_ne!(host, libc::MAP_FAILED, "mapping the guest memory");
    const MADV_POPULATE_WRITE: i32 = 23;
    // SAFETY: populates (allocates) the pages of the mapping made above.
    if unsafe { libc::madvise(host, len, MADV_POPULATE_WRITE) } != 0 {
        // An older kernel: touch every page instead.
        for page in (0..len).step_by(PAGE_SIZE as usize) {
            // SAFETY: `page` is inside the mapping.
            unsafe { (host as *mut u8).add(page).write_volatile(0) };
        }
    }
    // SAFETY: the mapping made above, used by nothing else.
    unsafe { libc::munmap(host, len) };
    backing
}

/// nkvm's RAM layout for `size` bytes: (guest address, offset, length) per slot.
fn layout(size: u64) -> Vec<(u64, u64, u64)> {
    let low = size.min(3 * GIB);
    let mut slots = vec![(0, 0, low)];
    if size > low {
        slots.push((4 * GIB, low, size - low));
    }
    slots
}

/// Raw KVM with the same slots, mapping the same object.
struct Raw {
    vm: VmFd,
    host: *mut libc::c_void,
    size: u64,
    /// (guest address, offset, length) per slot; slot i is entry i.
    slots: Vec<(u64, u64, u64)>,
    /// The last `KVM_GET_DIRTY_LOG` of each slot (allocated once, as
    /// nkvm keeps its buffer).
    bitmaps: Vec<Vec<u64>>,
    pages: Vec<u64>,
}

impl Raw {
    fn new(kvm: &Kvm, backing: &Backing, manual_flags: u32) -> Self {
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let mut cap = kvm_enable_cap { cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, ..Default::default() };
        cap.args[0] = u64::from(manual_flags);
        vm.enable_cap(&cap).expect("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2");
        let size = backing.len();
        // SAFETY: a new shared mapping of the whole object, unmapped in Drop
        // after the slots are deleted.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                backing.file().as_raw_fd(),
                0,
            )
        };
        assert_ne!(host, libc::MAP_FAILED);
        let slots = layout(size);
        let bitmaps = slots.iter().map(|s| vec![0; (s.2 / PAGE_SIZE).div_ceil(64) as usize]).collect();
        let raw = Self { vm, host, size, slots, bitmaps, pages: Vec::new() };
        raw.set_flags(0);
        raw
    }

    fn set_region(&self, flags: u32, delete: bool) {
        for (slot, &(gpa, offset, len)) in self.slots.iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags,
                guest_phys_addr: gpa,
                memory_size: if delete { 0 } else { len },
                userspace_addr: self.host as u64 + offset,
            };
            // SAFETY: the host range is inside the mapping, which outlives the slot (Drop).
            unsafe { self.vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
        }
    }

    /// Starts (LOG_DIRTY_PAGES) or stops (0) logging: a flags-only change.
    fn set_flags(&self, flags: u32) {
        self.set_region(flags, false);
    }

    fn clear(&self, slot: usize, first_page: u64, num_pages: u64, bits: &[u64]) {
        let mut arg =
            kvm_clear_dirty_log { slot: slot as u32, num_pages: num_pages as u32, first_page, ..Default::default() };
        arg.__bindgen_anon_1.dirty_bitmap = bits.as_ptr() as *mut libc::c_void;
        assert!(bits.len() as u64 * 64 >= num_pages);
        // SAFETY: KVM reads ceil(num_pages / 64) words from `bits` (checked
        // long enough) during the call; `arg` is a valid kvm_clear_dirty_log.
        let rc = unsafe { ioctl_with_ref(&self.vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
        assert!(rc >= 0, "KVM_CLEAR_DIRTY_LOG: {}", std::io::Error::last_os_error());
    }

    /// A sync and the first `BUDGET` dirty pages: `KVM_GET_DIRTY_LOG` on
    /// every slot, then the pages of the leading words of slot 0's log,
    /// taken out of it and re-armed with one `KVM_CLEAR_DIRTY_LOG`.
    fn first_query(&mut self) -> usize {
        for (slot, bits) in self.bitmaps.iter_mut().enumerate() {
            let mut arg = kvm_dirty_log { slot: slot as u32, ..Default::default() };
            arg.__bindgen_anon_1.dirty_bitmap = bits.as_mut_ptr().cast();
            // SAFETY: KVM writes the slot's log, one bit per page rounded
            // to whole words, which is `bits`' length; it lives for the call.
            let rc = unsafe { ioctl_with_ref(&self.vm, KVM_GET_DIRTY_LOG(), &arg) };
            assert!(rc >= 0, "KVM_GET_DIRTY_LOG: {}", std::io::Error::last_os_error());
        }
        self.pages.clear();
        let bits = &mut self.bitmaps[0];
        let mut words = 0;
        while words < bits.len() && self.pages.len() < BUDGET {
            let mut w = bits[words];
            while w != 0 {
                self.pages.push(words as u64 * 64 + u64::from(w.trailing_zeros()));
                w &= w - 1;
            }
            words += 1;
        }
        if !self.pages.is_empty() {
            let taken: Vec<u64> = bits[..words].to_vec();
            bits[..words].fill(0);
            let pages = (words as u64 * 64).min(self.slots[0].2 / PAGE_SIZE);
            self.clear(0, 0, pages, &taken);
        }
        self.pages.len()
    }

    /// The rest of the first pass: every page still set in the logs of
    /// `first_query`, listed and re-armed with one clear per slot.
    fn rest_of_pass(&mut self) -> usize {
        self.pages.clear();
        for slot in 0..self.slots.len() {
            let first = self.slots[slot].0 / PAGE_SIZE;
            for (i, &word) in self.bitmaps[slot].iter().enumerate() {
                let mut w = word;
                while w != 0 {
                    self.pages.push(first + i as u64 * 64 + u64::from(w.trailing_zeros()));
                    w &= w - 1;
                }
            }
            self.clear(slot, 0, self.slots[slot].2 / PAGE_SIZE, &self.bitmaps[slot]);
        }
        self.pages.len()
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        self.set_region(0, true);
        // SAFETY: the mapping made in `new`; no slot refers to it any more.
        unsafe { libc::munmap(self.host, self.size as usize) };
    }
}

/// nkvm over the same object, with its RAM map logged and not.
struct Lib {
    vm: Vm,
    logged: MemoryMap,
    plain: MemoryMap,
    dirty: DirtyPages,
}

impl Lib {
    fn new(hv: &Hypervisor, backing: &Backing, start: DirtyLogStart) -> Self {
        let config = VmConfig { vcpus: 1, memory: backing.len(), dirty_log_start: start, ..Default::default() };
        let vm = Vm::with_ram(hv, &config, backing.clone()).expect("nkvm VM");
        let plain = MemoryMap::ram(backing).unwrap();
        let logged = MemoryMap::new(plain.regions().iter().cloned().map(Region::dirty_logged).collect()).unwrap();
        Self { vm, logged, plain, dirty: DirtyPages::default() }
    }

    fn first_query(&mut self) -> usize {
        self.vm.sync_dirty_log().unwrap();
        self.vm.collect_dirty_into(GuestAddress(0), u64::MAX, BUDGET, &mut self.dirty).unwrap();
        self.dirty.pages.len()
    }

    fn rest_of_pass(&mut self) -> usize {
        let Some(start) = self.dirty.next else { return 0 };
        self.vm.collect_dirty_into(start, u64::MAX - start.0, usize::MAX, &mut self.dirty).unwrap();
        assert_eq!(self.dirty.next, None);
        self.dirty.pages.len()
    }
}

/// Seconds taken by `f`, and its result.
fn timed<T>(f: impl FnOnce() -> T) -> (f64, T) {
    let t = Instant::now();
    let out = f();
    (t.elapsed().as_secs_f64(), out)
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// One pair's rounds, in seconds: [raw, nkvm] of each operation.
#[derive(Default)]
struct Pair {
    start: [Vec<f64>; 2],
    query: [Vec<f64>; 2],
    pass: [Vec<f64>; 2],
    stop: [Vec<f64>; 2],
}

impl Pair {
    fn medians(&self) -> [[f64; 2]; 4] {
        let m = |v: &[Vec<f64>; 2]| [median(&v[0]), median(&v[1])];
        [m(&self.start), m(&self.query), m(&self.pass), m(&self.stop)]
    }
}

/// One guest size: its memory, the two pairs of VMs over it (all-dirty,
/// clean; raw and nkvm) and their figures.
struct Guest {
    size: u64,
    raws: [Raw; 2],
    libs: [Lib; 2],
    pairs: [Pair; 2],
}

impl Guest {
    fn new(hv: &Hypervisor, kvm: &Kvm, size: u64, populate: bool) -> Self {
        let (secs, backing) =
            timed(|| if populate { populated(size) } else { Backing::new("bench-ram", size).unwrap() });
        eprintln!("  {} MiB {} in {secs:.1} s", size / MIB, if populate { "populated" } else { "created" });
        let set = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET;
        Self {
            size,
            raws: [Raw::new(kvm, &backing, set), Raw::new(kvm, &backing, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)],
            libs: [Lib::new(hv, &backing, DirtyLogStart::AllDirty), Lib::new(hv, &backing, DirtyLogStart::Clean)],
            pairs: [Pair::default(), Pair::default()],
        }
    }

    /// One round of every operation on every VM, raw and nkvm in `order`;
    /// the figures are kept if `keep`.
    fn round(&mut self, order: [usize; 2], keep: bool) {
        let Self { raws, libs, pairs, size, .. } = self;
        let record = |which: &mut [Vec<f64>; 2], side: usize, secs: f64| {
            if keep {
                which[side].push(secs);
            }
        };
        // Start, every VM; then the first query; the pass; the stop.
        for p in 0..2 {
            for &side in &order {
                let secs = if side == 0 {
                    timed(|| raws[p].set_flags(KVM_MEM_LOG_DIRTY_PAGES)).0
                } else {
                    let map = libs[p].logged.clone();
                    timed(|| libs[p].vm.set_memory_map(map).unwrap()).0
                };
                record(&mut pairs[p].start, side, secs);
            }
        }
        for p in 0..2 {
            for &side in &order {
                let (secs, n) =
                    if side == 0 { timed(|| raws[p].first_query()) } else { timed(|| libs[p].first_query()) };
                // All dirty: the first BUDGET pages; clean: the guest wrote nothing.
                assert_eq!(n, if p == 0 { BUDGET } else { 0 }, "first query, pair {p}, side {side}");
                record(&mut pairs[p].query, side, secs);
            }
        }
        for &side in &order {
            let (secs, n) = if side == 0 { timed(|| raws[0].rest_of_pass()) } else { timed(|| libs[0].rest_of_pass()) };
            assert_eq!(n, (*size / PAGE_SIZE) as usize - BUDGET, "rest of the first pass, side {side}");
            record(&mut pairs[0].pass, side, secs);
        }
        for p in 0..2 {
            for &side in &order {
                let secs = if side == 0 {
                    timed(|| raws[p].set_flags(0)).0
                } else {
                    let map = libs[p].plain.clone();
                    timed(|| libs[p].vm.set_memory_map(map).unwrap()).0
                };
                record(&mut pairs[p].stop, side, secs);
            }
        }
    }
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "not met"
    }
}

fn main() {
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return; // populating gigabytes is too heavy for `cargo test --benches`
    }
    let sizes: Vec<u64> = match std::env::var("NKVM_BENCH_SIZES") {
        Ok(list) => list.split(',').map(|s| s.trim().parse::<u64>().expect("sizes in MiB") * MIB).collect(),
        Err(_) => vec![512 * MIB, 2 * GIB, 8 * GIB],
    };
    let hv = Hypervisor::open().expect("open /dev/kvm");
    let kvm = Kvm::new().expect("open /dev/kvm");
    // NKVM_BENCH_POPULATE=0: leave the memory untouched (KVM maps no page
    // of it either way; this shows that populating changes nothing).
    let populate = std::env::var("NKVM_BENCH_POPULATE").map_or(true, |v| v != "0");
    eprintln!("dirty_log_toggle: setting up");
    let mut guests: Vec<Guest> = sizes.iter().map(|&size| Guest::new(&hv, &kvm, size, populate)).collect();
    // Every size in every round: load on this shared host hits them alike.
    for round in 0..=ROUNDS {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for guest in &mut guests {
            guest.round(order, round > 0);
        }
    }
    let all: Vec<(u64, [Pair; 2])> = guests.into_iter().map(|g| (g.size, g.pairs)).collect();
    let names = ["all dirty (INITIALLY_SET)", "clean (write-protect at start)"];
    println!("dirty-log start/stop: median ms of {ROUNDS} rounds; raw = flags-only KVM_SET_USER_MEMORY_REGION");
    for (p, name) in names.iter().enumerate() {
        println!("{name}");
        println!(
            "{:>7} | {:>8} {:>8} {:>6} | {:>8} {:>8} {:>6} | {:>8} {:>8} {:>6} | {:>8} {:>8} {:>6}",
            "guest", "start", "raw", "ratio", "query", "raw", "ratio", "pass", "raw", "ratio", "stop", "raw", "ratio"
        );
        for (size, pairs) in &all {
            let m = pairs[p].medians();
            let cell = |[raw, lib]: [f64; 2]| format!("{:>8.3} {:>8.3} {:>6.2}", lib * 1e3, raw * 1e3, lib / raw);
            let pass = if p == 0 { cell(m[2]) } else { format!("{:>8} {:>8} {:>6}", "-", "-", "-") };
            println!("{:>6}M | {} | {} | {} | {}", size / MIB, cell(m[0]), cell(m[1]), pass, cell(m[3]));
        }
    }
    let mut results = Vec::new();
    // Size growth: the largest guest against the smallest, nkvm (raw's own in brackets).
    if let (Some((small, first)), Some((big, last))) = (all.first(), all.last()) {
        let (small, big) = (small / MIB, big / MIB);
        for (p, label, op) in [(0, "all-dirty start", 0), (0, "first query", 1), (0, "stop", 3), (1, "clean start", 0)]
        {
            let (a, b) = (first[p].medians()[op], last[p].medians()[op]);
            let (growth, raw_growth) = (b[1] / a[1], b[0] / a[0]);
            results.push(format!(
                "result|dirty_log_toggle: {label}, {big}M vs {small}M (nkvm)|{growth:.2}x ({:.3} vs {:.3} ms; raw {raw_growth:.2}x)|<= 1.5x|{}",
                b[1] * 1e3,
                a[1] * 1e3,
                if p == 1 { "info" } else { verdict(growth <= 1.5) }
            ));
        }
    }
    // nkvm against raw at each size.
    for (size, pairs) in &all {
        for (p, label, op) in [
            (0, "all-dirty start", 0),
            (0, "first query", 1),
            (0, "first pass", 2),
            (0, "stop", 3),
            (1, "clean start", 0),
        ] {
            let [raw, lib] = pairs[p].medians()[op];
            let ratio = lib / raw;
            let (target, met) = if op == 2 { ("-", "info") } else { ("<= 1.1x", verdict(ratio <= 1.1)) };
            results.push(format!(
                "result|dirty_log_toggle: {label} at {}M, nkvm / raw|{ratio:.2}x ({:.3} vs {:.3} ms)|{target}|{met}",
                size / MIB,
                lib * 1e3,
                raw * 1e3
            ));
        }
    }
    for r in results {
        println!("{r}");
    }
}
