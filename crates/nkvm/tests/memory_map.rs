//! Whole-map replacement and the dirty log, with real guests: aliases and
//! moves, dirty bits kept across map changes, range and budget queries, and
//! a stress test where vCPUs write while the map is replaced thousands of times.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use common::*;
use iced_x86::code_asm::*;
use nkvm::{Backing, DirtyLogMode, Exit, GuestAddress, MemoryMap, Region, RunState, PAGE_SIZE};

const RAM: u64 = 4 << 20;

fn ram_region(vm: &nkvm::Vm) -> Region {
    Region::new(GuestAddress(0), vm.ram(), 0, RAM)
}

fn small_vm() -> nkvm::Vm {
    small_vm_with(DirtyLogMode::Auto)
}

fn small_vm_with(dirty_log: DirtyLogMode) -> nkvm::Vm {
    vm_with(nkvm::VmConfig { vcpus: 2, memory: RAM, dirty_log, ..Default::default() })
}

/// Guest code: writes a counter into each of `pages` pages from `base`.
fn write_every_page(a: &mut CodeAssembler, base: u64, pages: u64) {
    a.mov(rbx, base).unwrap();
    a.mov(ecx, pages as u32).unwrap();
    let mut again = a.create_label();
    a.set_label(&mut again).unwrap();
    a.mov(qword_ptr(rbx), rcx).unwrap();
    a.add(rbx, PAGE_SIZE as i32).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(again).unwrap();
}

/// Runs `test` with each dirty-log feed this host has.
fn in_each_mode(test: impl Fn(DirtyLogMode)) {
    modes().into_iter().for_each(test);
}

/// Both dirty-log feeds: the dirty ring (when the host has it) and bitmaps.
fn modes() -> Vec<DirtyLogMode> {
    let mut modes = vec![DirtyLogMode::Bitmap];
    let ring = nkvm::VmConfig { vcpus: 1, memory: RAM, dirty_log: DirtyLogMode::Ring, ..Default::default() };
    if nkvm::Vm::new(&hypervisor(), &ring).is_ok() {
        modes.push(DirtyLogMode::Ring);
    } else {
        eprintln!("this host has no dirty ring: testing bitmaps only");
    }
    modes
}

#[test]
fn bios_alias_is_seen_by_the_guest_at_both_addresses() {
    let vm = small_vm();
    let bios = Backing::new("bios", 0x20000).unwrap();
    bios.write_at(0x1ff00, &0x1234_5678u32.to_le_bytes()).unwrap();
    vm.set_memory_map(
        MemoryMap::new(vec![
            ram_region(&vm),
            Region::new(GuestAddress(0xe0000 + RAM), &bios, 0, 0x20000).read_only(),
            Region::new(GuestAddress(0xfffe0000), &bios, 0, 0x20000).read_only(),
        ])
        .unwrap(),
    )
    .unwrap();
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        a.mov(rbx, 0xe0000 + RAM + 0x1ff00).unwrap();
        a.mov(eax, dword_ptr(rbx)).unwrap();
        a.out(0x10, eax).unwrap();
        a.mov(rbx, 0xfffe0000u64 + 0x1ff00).unwrap();
        a.mov(eax, dword_ptr(rbx)).unwrap();
        a.out(0x10, eax).unwrap();
        // The alias is read-only: a write exits as MMIO.
        a.mov(dword_ptr(rbx), eax).unwrap();
        a.hlt().unwrap();
    });
    let exits = run_to_hlt(&mut vcpu, |_| 0);
    assert_eq!(
        exits,
        vec![
            Exit::IoOut { port: 0x10, size: 4, data: 0x1234_5678 },
            Exit::IoOut { port: 0x10, size: 4, data: 0x1234_5678 },
            Exit::MmioWrite { addr: GuestAddress(0xfffe0000 + 0x1ff00), size: 4, data: 0x1234_5678 },
        ]
    );
}

#[test]
fn moved_region_keeps_its_bytes_and_its_dirty_bits() {
    in_each_mode(moved_region_keeps_its_bytes_and_its_dirty_bits_in);
}

fn moved_region_keeps_its_bytes_and_its_dirty_bits_in(mode: DirtyLogMode) {
    let vm = small_vm_with(mode);
    let fb = Backing::new("framebuffer", 0x10000).unwrap();
    let at = |gpa: u64| {
        MemoryMap::new(vec![ram_region(&vm), Region::new(GuestAddress(gpa), &fb, 0, 0x10000).dirty_logged()]).unwrap()
    };
    vm.set_memory_map(at(0x80_0000)).unwrap();
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        a.mov(rbx, 0x80_0000u64).unwrap();
        a.mov(qword_ptr(rbx + 0x3000), 0x77).unwrap();
        a.hlt().unwrap();
        // Second run, after the move: write the new location's page 5.
        a.mov(rbx, 0x90_0000u64).unwrap();
        a.mov(qword_ptr(rbx + 0x5000), 0x55).unwrap();
        a.mov(rax, qword_ptr(rbx + 0x3000)).unwrap();
        a.out(0x10, eax).unwrap();
        a.hlt().unwrap();
    });
    assert!(run_to_hlt(&mut vcpu, |_| 0).is_empty());
    // Move the "BAR": the page dirtied at the old address must not be lost.
    vm.set_memory_map(at(0x90_0000)).unwrap();
    let exits = run_to_hlt(&mut vcpu, |_| 0);
    assert_eq!(exits, vec![Exit::IoOut { port: 0x10, size: 4, data: 0x77 }]);
    vm.sync_dirty_log().unwrap();
    let dirty = vm.collect_dirty(GuestAddress(0x90_0000), 0x10000, 100).unwrap();
    assert_eq!(dirty.pages, vec![GuestAddress(0x90_3000), GuestAddress(0x90_5000)]);
    assert_eq!(dirty.next, None);
}

#[test]
fn dirty_queries_by_range_and_budget_rearm_exactly_what_they_return() {
    in_each_mode(dirty_queries_by_range_and_budget_rearm_exactly_what_they_return_in);
}

fn dirty_queries_by_range_and_budget_rearm_exactly_what_they_return_in(mode: DirtyLogMode) {
    let vm = small_vm_with(mode);
    let mem = Backing::new("data", 0x100000).unwrap();
    let base = 0x100_0000u64;
    vm.set_memory_map(
        MemoryMap::new(vec![ram_region(&vm), Region::new(GuestAddress(base), &mem, 0, 0x100000).dirty_logged()])
            .unwrap(),
    )
    .unwrap();
    // The guest writes pages 0, 2, 4, ... 62 of the region, then halts; run again: page 1.
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        a.mov(rbx, base).unwrap();
        a.mov(ecx, 32u32).unwrap();
        let mut again = a.create_label();
        a.set_label(&mut again).unwrap();
        a.mov(qword_ptr(rbx), rcx).unwrap();
        a.add(rbx, 0x2000).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(again).unwrap();
        a.hlt().unwrap();
        a.mov(rbx, base + 0x1000).unwrap();
        a.mov(qword_ptr(rbx), rcx).unwrap();
        a.mov(rbx, base).unwrap();
        a.mov(qword_ptr(rbx), rcx).unwrap();
        a.hlt().unwrap();
    });
    assert!(run_to_hlt(&mut vcpu, |_| 0).is_empty());
    vm.sync_dirty_log().unwrap();
    let page = |n: u64| GuestAddress(base + n * PAGE_SIZE);
    // A range smaller than the region: pages 10..20 hold 10, 12, ... 18.
    let d = vm.collect_dirty(page(10), 10 * PAGE_SIZE, 100).unwrap();
    assert_eq!(d.pages, (10..20).step_by(2).map(page).collect::<Vec<_>>());
    // A budget: at most 4 pages, with a cursor to continue.
    let d = vm.collect_dirty(page(0), 0x100000, 4).unwrap();
    assert_eq!(d.pages, vec![page(0), page(2), page(4), page(6)]);
    assert_eq!(d.next, Some(page(8)));
    let d2 = vm.collect_dirty(d.next.unwrap(), 0x100000 - 8 * PAGE_SIZE, 100).unwrap();
    assert_eq!(d2.pages, [8u64, 20, 22].into_iter().chain((24..64).step_by(2)).map(page).collect::<Vec<_>>());
    assert_eq!(d2.next, None);
    // Nothing left, and nothing reported again without new writes.
    vm.sync_dirty_log().unwrap();
    assert!(vm.collect_dirty(page(0), 0x100000, 100).unwrap().pages.is_empty());
    // Written again after collection: reported again (page 0), with page 1.
    assert!(run_to_hlt(&mut vcpu, |_| 0).is_empty());
    vm.sync_dirty_log().unwrap();
    assert_eq!(vm.collect_dirty(page(0), 0x100000, 100).unwrap().pages, vec![page(0), page(1)]);
}

/// Collecting re-arms the returned pages in every slot that maps them,
/// aliases at offsets that are not a multiple of 64 pages included, and
/// nothing else: a page written after the sync but not returned keeps its
/// dirty bit in KVM and is reported by the next sync.
#[test]
fn rearm_through_an_unaligned_alias_touches_only_returned_pages() {
    in_each_mode(|mode| {
        let vm = small_vm_with(mode);
        let mem = Backing::new("data", 0x100000).unwrap();
        let (base, alias) = (0x100_0000u64, 0x180_0000u64);
        // The alias maps backing pages 5..69 (its page i is backing page 5 + i).
        vm.set_memory_map(
            MemoryMap::new(vec![
                ram_region(&vm),
                Region::new(GuestAddress(base), &mem, 0, 0x100000).dirty_logged(),
                Region::new(GuestAddress(alias), &mem, 5 * PAGE_SIZE, 64 * PAGE_SIZE).dirty_logged(),
            ])
            .unwrap(),
        )
        .unwrap();
        let write = |a: &mut CodeAssembler, gpa: u64| {
            a.mov(rbx, gpa).unwrap();
            a.mov(qword_ptr(rbx), rcx).unwrap();
        };
        let page = |n: u64| GuestAddress(base + n * PAGE_SIZE);
        let mut vcpu = long_mode_guest(&vm, 0, |a| {
            // Phase 1, through the alias: backing pages 6, 7, 40, 68.
            for p in [6u64, 7, 40, 68] {
                write(a, alias + (p - 5) * PAGE_SIZE);
            }
            a.hlt().unwrap();
            // Phase 2, after the sync: pages 9 (alias), 3 and 70 (not aliased).
            write(a, alias + 4 * PAGE_SIZE);
            write(a, base + 3 * PAGE_SIZE);
            write(a, base + 70 * PAGE_SIZE);
            a.hlt().unwrap();
            // Phase 3: page 6 again, through the alias.
            write(a, alias + PAGE_SIZE);
            a.hlt().unwrap();
        });
        assert!(run_to_hlt(&mut vcpu, |_| 0).is_empty());
        vm.sync_dirty_log().unwrap();
        // With bitmaps, the first query after a sync reads KVM's logs: one
        // of a page of RAM (not logged) reads them now, before phase 2.
        assert!(vm.collect_dirty(GuestAddress(0), PAGE_SIZE, 1).unwrap().pages.is_empty());
        assert!(run_to_hlt(&mut vcpu, |_| 0).is_empty());
        // Aliased pages are reported once, at the first address that maps them.
        let d = vm.collect_dirty(GuestAddress(base), u64::MAX - base, usize::MAX).unwrap();
        assert_eq!(d.pages, [6u64, 7, 40, 68].map(page), "{mode:?}: phase 1");
        // The phase-2 writes came after the first query read the logs: the
        // collection above must not have re-armed (and so dropped) them.
        vm.sync_dirty_log().unwrap();
        let d = vm.collect_dirty(GuestAddress(base), u64::MAX - base, usize::MAX).unwrap();
        assert_eq!(d.pages, [3u64, 9, 70].map(page), "{mode:?}: phase 2");
        // A returned page written again is reported again, whichever slot took the write.
        assert!(run_to_hlt(&mut vcpu, |_| 0).is_empty());
        vm.sync_dirty_log().unwrap();
        let d = vm.collect_dirty(GuestAddress(base), u64::MAX - base, usize::MAX).unwrap();
        assert_eq!(d.pages, vec![page(6)], "{mode:?}: phase 3");
    });
}

/// Two vCPUs write a counter into every page of a region over and over
/// while the map is replaced thousands of times: the region is split and
/// merged, an alias of it comes and goes, another region moves. Checks: no
/// MMIO exit ever hits the always-mapped region, the guest reads back what
/// it wrote, and a host copy kept up to date only from the dirty log equals
/// guest memory at the end (no dirty page lost).
#[test]
fn map_swap_never_loses_dirty_pages_or_exits_on_mapped_memory() {
    in_each_mode(map_swap_in);
}

fn map_swap_in(mode: DirtyLogMode) {
    const DATA: u64 = 0x100_0000;
    const DATA_LEN: u64 = 0x40000; // 64 pages
    const SWAPS: usize = 2000;
    let vm = Arc::new(small_vm_with(mode));
    let data = Backing::new("data", DATA_LEN).unwrap();
    let other = Backing::new("other", 0x10000).unwrap();
    let maps: Vec<MemoryMap> = (0..4)
        .map(|variant| {
            let mut regions = vec![Region::new(GuestAddress(0), vm.ram(), 0, RAM)];
            if variant % 2 == 0 {
                regions.push(Region::new(GuestAddress(DATA), &data, 0, DATA_LEN).dirty_logged());
            } else {
                let half = DATA_LEN / 2;
                regions.push(Region::new(GuestAddress(DATA), &data, 0, half).dirty_logged());
                regions.push(Region::new(GuestAddress(DATA + half), &data, half, half).dirty_logged());
            }
            if variant >= 2 {
                regions.push(Region::new(GuestAddress(0x200_0000), &data, 0, DATA_LEN).dirty_logged());
            }
            regions.push(Region::new(GuestAddress(0x300_0000 + 0x10000 * variant as u64), &other, 0, 0x10000));
            MemoryMap::new(regions).unwrap()
        })
        .collect();
    vm.set_memory_map(maps[0].clone()).unwrap();

    // vCPU n writes (pass << 8 | n) into qword n of every page, reads it back,
    // and reports a mismatch on port 0x66.
    let guest = |vm: &nkvm::Vm, id: u32| {
        long_mode_guest(vm, id, |a| {
            let mut pass = a.create_label();
            let mut page = a.create_label();
            let mut ok = a.create_label();
            a.xor(r12, r12).unwrap();
            a.set_label(&mut pass).unwrap();
            a.inc(r12).unwrap();
            a.mov(rbx, DATA + 8 * u64::from(id)).unwrap();
            a.mov(ecx, (DATA_LEN / PAGE_SIZE) as u32).unwrap();
            a.set_label(&mut page).unwrap();
            a.mov(rax, r12).unwrap();
            a.shl(rax, 8).unwrap();
            a.or(rax, id as i32).unwrap();
            a.mov(qword_ptr(rbx), rax).unwrap();
            a.cmp(qword_ptr(rbx), rax).unwrap();
            a.je(ok).unwrap();
            a.out(0x66, al).unwrap();
            a.set_label(&mut ok).unwrap();
            a.add(rbx, PAGE_SIZE as i32).unwrap();
            a.dec(ecx).unwrap();
            a.jnz(page).unwrap();
            a.jmp(pass).unwrap();
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let bad_exits = Arc::new(AtomicU64::new(0));
    let mut kickers = Vec::new();
    let mut threads = Vec::new();
    for id in 0..2 {
        let mut vcpu = guest(&vm, id);
        kickers.push(vcpu.kicker());
        let (stop, bad) = (stop.clone(), bad_exits.clone());
        threads.push(thread::spawn(move || {
            let mut run = RunState::new();
            while !stop.load(Ordering::SeqCst) {
                match vcpu.enter_guest(&mut run).unwrap() {
                    Exit::Kicked => {}
                    other => {
                        eprintln!("vCPU {id}: unexpected exit {other}");
                        bad.fetch_add(1, Ordering::SeqCst);
                        if let Exit::MmioRead { .. } = other {
                            run.complete_mmio_read(0);
                        }
                        if matches!(other, Exit::Shutdown | Exit::InternalError(_)) {
                            return;
                        }
                    }
                }
            }
        }));
    }

    // The host keeps a copy of the data region fed only by the dirty log.
    let mut shadow = vec![0u8; DATA_LEN as usize];
    let mut copy_dirty = |vm: &nkvm::Vm| {
        vm.sync_dirty_log().unwrap();
        let mut cursor = Some(GuestAddress(DATA));
        while let Some(start) = cursor {
            let d = vm.collect_dirty(start, DATA + DATA_LEN - start.0, 16).unwrap();
            for p in &d.pages {
                let off = (p.0 - DATA) as usize;
                data.read_at(off as u64, &mut shadow[off..off + PAGE_SIZE as usize]).unwrap();
            }
            cursor = d.next;
        }
    };
    // At least SWAPS swaps, and on until the guest has made a few passes
    // while the map changes under it (a loaded host may starve the vCPUs
    // of the first thousands of swaps).
    let passes_so_far = || {
        let mut first = [0u8; 8];
        data.read_at(0, &mut first).unwrap();
        u64::from_le_bytes(first) >> 8
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut swaps = 0;
    while swaps < SWAPS || (passes_so_far() < 3 && std::time::Instant::now() < deadline) {
        vm.set_memory_map(maps[(swaps * 7 + 1) % 4].clone()).unwrap();
        if swaps % 50 == 0 {
            copy_dirty(&vm);
        }
        swaps += 1;
    }
    stop.store(true, Ordering::SeqCst);
    kickers.iter().for_each(nkvm::Kicker::kick);
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(bad_exits.load(Ordering::SeqCst), 0, "vCPUs saw exits on always-mapped memory");
    copy_dirty(&vm);
    let mut actual = vec![0u8; DATA_LEN as usize];
    data.read_at(0, &mut actual).unwrap();
    let passes = u64::from_le_bytes(actual[0..8].try_into().unwrap()) >> 8;
    eprintln!("{mode:?}: {swaps} map swaps while the guest made {passes} passes over {} pages", DATA_LEN / PAGE_SIZE);
    assert!(passes > 1, "the guest made progress");
    let lost: Vec<usize> = (0..(DATA_LEN / PAGE_SIZE) as usize)
        .filter(|&p| shadow[p * 4096..(p + 1) * 4096] != actual[p * 4096..(p + 1) * 4096])
        .collect();
    assert!(lost.is_empty(), "pages whose last write the dirty log never reported: {lost:?}");
}

/// More pages dirtied than the dirty ring holds (64Ki entries): the full
/// ring is harvested inside `enter_guest`, the guest never sees it, and
/// every page is reported (on this host the ring-full exit sometimes comes
/// only after the ring wrapped; nkvm then reports all tracked memory dirty
/// rather than lose a page).
#[test]
fn a_full_dirty_ring_is_harvested_without_losing_pages() {
    const PAGES: u64 = 70_000;
    if !modes().contains(&DirtyLogMode::Ring) {
        eprintln!("no dirty ring on this host; nothing to fill");
        return;
    }
    let vm = small_vm_with(DirtyLogMode::Ring);
    assert!(vm.uses_dirty_ring());
    let big = Backing::new("big", PAGES * PAGE_SIZE).unwrap();
    vm.set_memory_map(
        MemoryMap::new(vec![
            ram_region(&vm),
            Region::new(GuestAddress(0x100_0000), &big, 0, PAGES * PAGE_SIZE).dirty_logged(),
        ])
        .unwrap(),
    )
    .unwrap();
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        write_every_page(a, 0x100_0000, PAGES);
        a.hlt().unwrap();
    });
    assert!(run_to_hlt(&mut vcpu, |_| 0).is_empty());
    vm.sync_dirty_log().unwrap();
    let mut reported = Vec::new();
    let mut cursor = Some(GuestAddress(0x100_0000));
    while let Some(start) = cursor {
        let d = vm.collect_dirty(start, 0x100_0000 + PAGES * PAGE_SIZE - start.0, 4096).unwrap();
        assert!(d.pages.len() <= 4096);
        reported.extend(d.pages);
        cursor = d.next;
    }
    let expected: Vec<GuestAddress> = (0..PAGES).map(|p| GuestAddress(0x100_0000 + p * PAGE_SIZE)).collect();
    assert_eq!(reported, expected);
}

/// Far more pages dirtied in one go than the ring holds, so that on this
/// host the ring overflows (KVM exits late): the vCPU must neither hang on
/// ring-full exits nor fail, everything must be reported, and writes after
/// the overflow must still be reported (an overflowed ring cannot be read
/// reliably again, so nkvm then reports all memory at every sync).
#[test]
fn an_overflowed_dirty_ring_recovers_and_keeps_reporting_writes() {
    const PAGES: u64 = 3 * 65_536;
    // A ring-full livelock would otherwise hang the test run.
    const LIMIT: std::time::Duration = std::time::Duration::from_secs(120);
    if !modes().contains(&DirtyLogMode::Ring) {
        eprintln!("no dirty ring on this host; nothing to overflow");
        return;
    }
    let vm = small_vm_with(DirtyLogMode::Ring);
    let big = Backing::new("big", PAGES * PAGE_SIZE).unwrap();
    let base = 0x100_0000u64;
    vm.set_memory_map(
        MemoryMap::new(vec![
            ram_region(&vm),
            Region::new(GuestAddress(base), &big, 0, PAGES * PAGE_SIZE).dirty_logged(),
        ])
        .unwrap(),
    )
    .unwrap();
    let later = [3u64, 4, 1000, 70_000, PAGES - 1];
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        write_every_page(a, base, PAGES);
        a.hlt().unwrap();
        for _ in 0..2 {
            for p in later {
                a.mov(rbx, base + p * PAGE_SIZE).unwrap();
                a.mov(qword_ptr(rbx), rcx).unwrap();
            }
            a.hlt().unwrap();
        }
    });
    let page = |p: u64| GuestAddress(base + p * PAGE_SIZE);
    let collect_all = || {
        vm.sync_dirty_log().unwrap();
        let mut reported = Vec::new();
        let mut cursor = Some(page(0));
        while let Some(start) = cursor {
            let d = vm.collect_dirty(start, base + PAGES * PAGE_SIZE - start.0, 1 << 16).unwrap();
            reported.extend(d.pages);
            cursor = d.next;
        }
        reported
    };
    assert!(run_to_hlt_within(&mut vcpu, LIMIT).is_empty());
    assert_eq!(collect_all(), (0..PAGES).map(page).collect::<Vec<_>>(), "the first pass");
    for round in 0..2 {
        assert!(run_to_hlt_within(&mut vcpu, LIMIT).is_empty());
        let reported = collect_all();
        let missing: Vec<_> = later.map(page).into_iter().filter(|p| !reported.contains(p)).collect();
        assert!(missing.is_empty(), "round {round}: writes after the overflow not reported: {missing:?}");
    }
}

/// A map with more regions than the host has memory slots is refused with
/// both numbers in the message, before KVM is touched: the installed map
/// stays as it was and the guest still reads it.
#[test]
fn a_map_beyond_the_slot_limit_is_refused_and_the_old_map_stays() {
    let vm = small_vm();
    let max = hypervisor().capabilities().max_memory_slots as u64;
    let mem = Backing::new("many", (max + 1) * PAGE_SIZE).unwrap();
    let base = 0x1_0000_0000u64;
    let page = |i: u64| Region::new(GuestAddress(base + i * 2 * PAGE_SIZE), &mem, i * PAGE_SIZE, PAGE_SIZE);
    let mut regions = vec![ram_region(&vm)];
    regions.extend((0..max).map(page));
    let err = vm.set_memory_map(MemoryMap::new(regions).unwrap()).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&format!("{} regions", max + 1)) && text.contains(&format!("only {max} memory slots")),
        "{text}"
    );
    assert_eq!(vm.memory().regions().len(), 1, "the RAM-only map is still installed");
    assert_guest_reads_ram(&vm);
}

#[test]
fn dropping_the_host_mapping_of_a_page_keeps_its_bytes_for_guest_and_host() {
    let vm = small_vm();
    let page = GuestAddress(0x5000);
    let mut vcpu = real_mode_guest(&vm, 0, |a| {
        a.mov(word_ptr(0x5000), 0x1234).unwrap();
        a.out(0x10, al).unwrap(); // the host drops the page's mapping here
        a.mov(ax, word_ptr(0x5000)).unwrap();
        a.out(0x11, ax).unwrap(); // what the guest reads back
        a.mov(ax, word_ptr(0x5002)).unwrap();
        a.out(0x12, ax).unwrap(); // what the host wrote after the drop
        a.hlt().unwrap();
    });
    let mut run = RunState::new();
    let mut seen = Vec::new();
    loop {
        match vcpu.enter_guest(&mut run).unwrap() {
            Exit::IoOut { port: 0x10, .. } => {
                vm.memory().drop_host_mapping(page).unwrap();
                vm.write_memory(GuestAddress(0x5002), &0xbeefu16.to_le_bytes()).unwrap();
            }
            Exit::IoOut { port, data, .. } => seen.push((port, data as u16)),
            Exit::Hlt => break,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(seen, [(0x11, 0x1234), (0x12, 0xbeef)]);
    let mut host = [0u8; 2];
    vm.read_memory(page, &mut host).unwrap();
    assert_eq!(u16::from_le_bytes(host), 0x1234);
    assert!(vm.memory().drop_host_mapping(GuestAddress(RAM + 0x1000)).is_err(), "unmapped address");
}

/// Pages written by someone other than the guest, recorded by that writer.
#[derive(Debug, Default)]
struct Writes(std::sync::Mutex<Vec<(GuestAddress, u64)>>);

impl nkvm::DirtySource for Writes {
    fn drain(&self, mark: &mut dyn FnMut(GuestAddress, u64)) {
        for (gpa, len) in self.0.lock().unwrap().drain(..) {
            mark(gpa, len);
        }
    }
}

/// A `DirtySource`'s pages land in the same log as the guest's own writes,
/// at the next sync and not before; ranges outside dirty-logged regions are
/// ignored.
#[test]
fn a_dirty_source_feeds_the_same_log_as_the_guest() {
    in_each_mode(|mode| {
        let vm = small_vm_with(mode);
        let mem = Backing::new("data", 0x100000).unwrap();
        let base = 0x100_0000u64;
        let regions = vec![ram_region(&vm), Region::new(GuestAddress(base), &mem, 0, 0x100000).dirty_logged()];
        vm.set_memory_map(MemoryMap::new(regions).unwrap()).unwrap();
        let writes = Arc::new(Writes::default());
        vm.add_dirty_source(writes.clone());
        let page = |n: u64| GuestAddress(base + n * PAGE_SIZE);
        let mut vcpu = long_mode_guest(&vm, 0, |a| {
            a.mov(rbx, page(3).0).unwrap();
            a.mov(qword_ptr(rbx), rcx).unwrap();
            a.hlt().unwrap();
        });
        assert!(run_to_hlt(&mut vcpu, |_| 0).is_empty());
        // A device wrote pages 5 and 6 (one write across both), and RAM,
        // which is not dirty-logged.
        writes.0.lock().unwrap().extend([(GuestAddress(page(5).0 + PAGE_SIZE - 8), 16), (GuestAddress(0x1000), 8)]);
        assert!(vm.collect_dirty(page(0), 0x100000, 100).unwrap().pages.is_empty(), "not before the sync");
        vm.sync_dirty_log().unwrap();
        assert_eq!(vm.collect_dirty(GuestAddress(0), base + 0x100000, 100).unwrap().pages, [page(3), page(5), page(6)]);
        vm.sync_dirty_log().unwrap();
        assert!(vm.collect_dirty(GuestAddress(0), base + 0x100000, 100).unwrap().pages.is_empty(), "drained once");
    });
}
