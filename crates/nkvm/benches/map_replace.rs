//! Memory-map replacement cost against map size: `Vm::set_memory_map` adding
//! or removing one region in maps of 8, 64 and 512 regions, against one raw
//! `KVM_SET_USER_MEMORY_REGION` doing the same in a VM with as many slots.
//! One run, ratio printed (target: flat in map size, <= 2x the raw call).
//!
//! Run: `cargo bench -p nkvm --bench map_replace`.

use std::time::Instant;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::Kvm;
use nkvm::{Backing, GuestAddress, Hypervisor, MemoryMap, Region, Vm, VmConfig};

const REGION: u64 = 0x10000;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--test" || a == "--list");
    let iters = if quick { 10 } else { 2000 };
    let hv = Hypervisor::open().expect("open /dev/kvm");
    let kvm = Kvm::new().expect("open /dev/kvm");
    println!("memory-map change: add or remove one {REGION:#x}-byte region ({iters} changes, median)");
    println!("{:>8} {:>12} {:>12} {:>8}", "regions", "raw (ns)", "nkvm (ns)", "ratio");
    let mut results = Vec::new();
    for n in [8u64, 64, 512] {
        let backing = Backing::new("bench", (n + 1) * REGION).unwrap();
        // nkvm: n regions, then toggle one more.
        let vm = Vm::new(&hv, &VmConfig { vcpus: 1, memory: 0x10000, ..Default::default() }).unwrap();
        let region = |i: u64| Region::new(GuestAddress(0x1000_0000 + i * 2 * REGION), &backing, i * REGION, REGION);
        let base: Vec<Region> = (0..n).map(region).collect();
        let small = MemoryMap::new(base.clone()).unwrap();
        let mut with = base.clone();
        with.push(region(n));
        let big = MemoryMap::new(with).unwrap();
        vm.set_memory_map(small.clone()).unwrap();
        // Raw: the same slots through kvm-ioctls.
        let raw_vm = kvm.create_vm().unwrap();
        let mut mem = vec![0u8; ((n + 1) * REGION + 4096) as usize];
        let skew = (4096 - (mem.as_ptr() as usize % 4096)) % 4096;
        let host_base = mem[skew..].as_mut_ptr() as u64;
        let slot = |i: u64, size: u64| kvm_userspace_memory_region {
            slot: i as u32,
            flags: 0,
            guest_phys_addr: 0x1000_0000 + i * 2 * REGION,
            memory_size: size,
            userspace_addr: host_base + i * REGION,
        };
        for i in 0..n {
            // SAFETY: `mem` outlives `raw_vm` (dropped at the end of this iteration, after it).
            unsafe { raw_vm.set_user_memory_region(slot(i, REGION)) }.unwrap();
        }
        // Interleave the two paths change by change: this host's ioctl cost
        // drifts by 3x over seconds, which would swamp separate loops.
        let (mut raw, mut lib) = (Vec::with_capacity(iters), Vec::with_capacity(iters));
        for i in 0..iters {
            let size = if i % 2 == 0 { REGION } else { 0 };
            let t = Instant::now();
            // SAFETY: as above.
            unsafe { raw_vm.set_user_memory_region(slot(n, size)) }.unwrap();
            raw.push(t.elapsed().as_nanos() as f64);
            let next = if i % 2 == 0 { big.clone() } else { small.clone() };
            let t = Instant::now();
            vm.set_memory_map(next).unwrap();
            lib.push(t.elapsed().as_nanos() as f64);
        }
        drop(raw_vm);
        drop(mem);
        let (r, l) = (median(&mut raw), median(&mut lib));
        println!("{n:>8} {r:>12.0} {l:>12.0} {:>8.2}", l / r);
        let (target, met) = if n == 512 { ("<= 1.05x", verdict(l / r <= 1.05)) } else { ("-", "info") };
        results.push(format!(
            "result|map_replace: one change in {n} regions|{:.2}x ({l:.0} vs {r:.0} ns)|{target}|{met}",
            l / r
        ));
    }
    for r in results {
        println!("{r}");
    }
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "not met"
    }
}
