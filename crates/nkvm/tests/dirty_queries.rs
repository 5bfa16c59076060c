//! Queries that take the whole log and queries that take part of it, mixed,
//! with real guests. A query that takes every dirty-logged page reads KVM's
//! logs the classic way (clearing and re-protecting as it copies); any other
//! query copies them and re-arms only what it returns. Whatever the mix, a
//! page is reported once per write burst, a page written after it was
//! collected is reported again, and a copy kept up to date from the reports
//! alone ends equal to the guest's memory.

mod common;

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;
use iced_x86::code_asm::*;
use nkvm::{Backing, DirtyLogMode, DirtyLogStart, GuestAddress, MemoryMap, Region, Vm, VmConfig, PAGE_SIZE};

const RAM: u64 = 4 << 20;
/// The dirty-logged data region at 16 MiB: 4352 pages, so a whole query
/// scans one 4096-page stretch KVM wrote straight into the bitmap.
const DATA: u64 = 0x100_0000;
const DATA_PAGES: u64 = 4096 + 256;
/// Where a test maps an alias of the data region's first 64 pages.
const ALIAS: u64 = 0x400_0000;
/// A flag in RAM the host sets to stop the writing guest.
const STOP: u64 = 0x30_0000;

fn page(n: u64) -> GuestAddress {
    GuestAddress(DATA + n * PAGE_SIZE)
}

/// A VM whose data region (a backing of its own) is dirty-logged.
fn logged_vm(start: DirtyLogStart) -> (Vm, Backing) {
    let vm = vm_with(VmConfig {
        vcpus: 1,
        memory: RAM,
        dirty_log: DirtyLogMode::Bitmap,
        dirty_log_start: start,
        ..Default::default()
    });
    let data = Backing::new("data", DATA_PAGES * PAGE_SIZE).unwrap();
    vm.set_memory_map(map(&vm, &data, false)).unwrap();
    (vm, data)
}

/// RAM, the logged data region, and with `alias` a logged alias of its
/// first 64 pages at [`ALIAS`].
fn map(vm: &Vm, data: &Backing, alias: bool) -> MemoryMap {
    let mut regions = vec![
        Region::new(GuestAddress(0), vm.ram(), 0, RAM),
        Region::new(GuestAddress(DATA), data, 0, DATA_PAGES * PAGE_SIZE).dirty_logged(),
    ];
    if alias {
        regions.push(Region::new(GuestAddress(ALIAS), data, 0, 64 * PAGE_SIZE).dirty_logged());
    }
    MemoryMap::new(regions).unwrap()
}

/// Page numbers of every dirty page, in one query that takes everything.
fn take_all(vm: &Vm) -> Vec<u64> {
    let dirty = vm.collect_dirty(page(0), DATA_PAGES * PAGE_SIZE, usize::MAX).unwrap();
    assert_eq!(dirty.next, None);
    dirty.pages.iter().map(|gpa| (gpa.0 - DATA) / PAGE_SIZE).collect()
}

/// Page numbers of every dirty page, `budget` pages a query.
fn take_by(vm: &Vm, budget: usize) -> Vec<u64> {
    let mut pages = Vec::new();
    let mut cursor = Some(page(0));
    while let Some(start) = cursor {
        let dirty = vm.collect_dirty(start, DATA + DATA_PAGES * PAGE_SIZE - start.0, budget).unwrap();
        assert!(dirty.pages.len() <= budget);
        pages.extend(dirty.pages.iter().map(|gpa| (gpa.0 - DATA) / PAGE_SIZE));
        cursor = dirty.next;
    }
    pages
}

#[test]
fn whole_and_partial_queries_report_each_write_once_and_rewrites_again() {
    for start in [DirtyLogStart::Clean, DirtyLogStart::AllDirty] {
        let (vm, _data) = logged_vm(start);
        if start == DirtyLogStart::AllDirty {
            vm.sync_dirty_log().unwrap();
            assert_eq!(take_all(&vm).len() as u64, DATA_PAGES, "{start:?}: the start reports every page");
        }
        // Three bursts, each ended by hlt: the even pages 0..64; pages 1
        // and 0; page 3.
        let mut vcpu = long_mode_guest(&vm, 0, |a| {
            a.mov(rbx, DATA).unwrap();
            a.mov(ecx, 32u32).unwrap();
            let mut again = a.create_label();
            a.set_label(&mut again).unwrap();
            a.mov(qword_ptr(rbx), rcx).unwrap();
            a.add(rbx, 2 * PAGE_SIZE as i32).unwrap();
            a.dec(ecx).unwrap();
            a.jnz(again).unwrap();
            a.hlt().unwrap();
            a.mov(rbx, DATA).unwrap();
            a.mov(qword_ptr(rbx + PAGE_SIZE), rbx).unwrap();
            a.mov(qword_ptr(rbx), rbx).unwrap();
            a.hlt().unwrap();
            a.mov(qword_ptr(rbx + 3 * PAGE_SIZE), rbx).unwrap();
            a.hlt().unwrap();
        });
        let burst = |vcpu: &mut nkvm::Vcpu| assert!(run_to_hlt_within(vcpu, Duration::from_secs(60)).is_empty());

        burst(&mut vcpu);
        vm.sync_dirty_log().unwrap();
        assert_eq!(take_all(&vm), (0..64).step_by(2).collect::<Vec<_>>(), "{start:?}");
        // Taken and re-armed: nothing again, by either kind of query.
        vm.sync_dirty_log().unwrap();
        assert_eq!(take_all(&vm), Vec::<u64>::new(), "{start:?}: a whole query reported a page twice");
        vm.sync_dirty_log().unwrap();
        assert_eq!(take_by(&vm, 4), Vec::<u64>::new(), "{start:?}: a partial query reported a page twice");

        // A partial query first (it reads the log), then a whole one that
        // finds the log already read: it must re-arm what it returns.
        burst(&mut vcpu);
        vm.sync_dirty_log().unwrap();
        let first = vm.collect_dirty(page(0), DATA_PAGES * PAGE_SIZE, 1).unwrap();
        assert_eq!(first.pages, [page(0)], "{start:?}");
        assert_eq!(take_all(&vm), [1], "{start:?}");
        vm.sync_dirty_log().unwrap();
        assert_eq!(take_all(&vm), Vec::<u64>::new(), "{start:?}: page 1 was not re-armed");

        // Written again after a whole query: reported again.
        burst(&mut vcpu);
        vm.sync_dirty_log().unwrap();
        assert_eq!(take_by(&vm, 2), [3], "{start:?}");
        vm.sync_dirty_log().unwrap();
        assert_eq!(take_all(&vm), Vec::<u64>::new(), "{start:?}");
    }
}

/// Map changes while KVM reads the classic way (after a whole query): an
/// alias added and written through, then removed (its log harvested by a
/// classic read), lose no write and report none twice.
#[test]
fn map_changes_after_a_whole_query_lose_no_write() {
    let (vm, data) = logged_vm(DirtyLogStart::Clean);
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        let store = |a: &mut CodeAssembler, gpa: u64| {
            a.mov(rbx, gpa).unwrap();
            a.mov(qword_ptr(rbx), rbx).unwrap();
        };
        store(a, DATA + 2 * PAGE_SIZE);
        a.hlt().unwrap();
        store(a, ALIAS + 5 * PAGE_SIZE);
        store(a, DATA + 7 * PAGE_SIZE);
        a.hlt().unwrap();
        store(a, ALIAS + 11 * PAGE_SIZE);
        a.hlt().unwrap();
        store(a, DATA + 9 * PAGE_SIZE);
        a.hlt().unwrap();
    });
    let burst = |vcpu: &mut nkvm::Vcpu| assert!(run_to_hlt_within(vcpu, Duration::from_secs(60)).is_empty());
    let everything = |vm: &Vm| -> Vec<u64> {
        let dirty = vm.collect_dirty(GuestAddress(0), u64::MAX, usize::MAX).unwrap();
        dirty.pages.iter().map(|gpa| (gpa.0 - DATA) / PAGE_SIZE).collect()
    };
    burst(&mut vcpu);
    vm.sync_dirty_log().unwrap();
    assert_eq!(everything(&vm), [2], "a whole query (classic read)");
    // Added while KVM reads the classic way.
    vm.set_memory_map(map(&vm, &data, true)).unwrap();
    burst(&mut vcpu);
    vm.sync_dirty_log().unwrap();
    // The data region's range alone is not the whole log now (the alias is
    // outside it): read by copying; the alias's page shows at its first address.
    assert_eq!(take_all(&vm), [5, 7]);
    vm.sync_dirty_log().unwrap();
    assert_eq!(everything(&vm), Vec::<u64>::new(), "reported twice");
    // Written through the alias, which then goes while KVM reads the
    // classic way (the last query was whole): harvested, not lost.
    burst(&mut vcpu);
    vm.set_memory_map(map(&vm, &data, false)).unwrap();
    burst(&mut vcpu);
    vm.sync_dirty_log().unwrap();
    assert_eq!(take_by(&vm, 1), [9, 11]);
    vm.sync_dirty_log().unwrap();
    assert_eq!(everything(&vm), Vec::<u64>::new(), "reported twice");
}

#[test]
fn a_copy_kept_from_mixed_queries_under_a_running_guest_matches_its_memory() {
    for start in [DirtyLogStart::Clean, DirtyLogStart::AllDirty] {
        let (vm, _data) = logged_vm(start);
        let vm = Arc::new(vm);
        // rcx counts; each write stores it into page rcx % 64, at qword
        // (rcx / 64) % 512: every page keeps changing, each time elsewhere.
        let mut vcpu = long_mode_guest(&vm, 0, |a| {
            let mut again = a.create_label();
            a.mov(rdx, STOP).unwrap();
            a.xor(ecx, ecx).unwrap();
            a.set_label(&mut again).unwrap();
            a.inc(rcx).unwrap();
            a.mov(rax, rcx).unwrap();
            a.and(eax, 63).unwrap();
            a.shl(rax, 12).unwrap();
            a.mov(rbx, rcx).unwrap();
            a.shr(rbx, 6).unwrap();
            a.and(ebx, 511).unwrap();
            a.lea(rax, qword_ptr(rax + rbx * 8 + DATA as i32)).unwrap();
            a.mov(qword_ptr(rax), rcx).unwrap();
            a.cmp(qword_ptr(rdx), 0).unwrap();
            a.je(again).unwrap();
            a.hlt().unwrap();
        });
        // The copy, kept as a migration keeps its destination: a page is
        // copied whenever a query returns it (after it was re-armed).
        let mut copy = vec![0u8; (DATA_PAGES * PAGE_SIZE) as usize];
        let refresh = |copy: &mut Vec<u8>, pages: &[u64]| {
            for &p in pages {
                let at = (p * PAGE_SIZE) as usize;
                vm.read_memory(page(p), &mut copy[at..at + PAGE_SIZE as usize]).unwrap();
            }
        };
        vm.sync_dirty_log().unwrap();
        refresh(&mut copy, &take_all(&vm));
        let guest = thread::spawn(move || {
            assert!(run_to_hlt_within(&mut vcpu, Duration::from_secs(120)).is_empty());
        });
        let mut reported = 0;
        for round in 0..40 {
            vm.sync_dirty_log().unwrap();
            // Whole, then budgets of 7 pages, then a range and the rest.
            let pages = match round % 3 {
                0 => take_all(&vm),
                1 => take_by(&vm, 7),
                _ => {
                    let mut pages = vm.collect_dirty(page(32), 16 * PAGE_SIZE, usize::MAX).unwrap().pages;
                    pages.extend(vm.collect_dirty(page(0), DATA_PAGES * PAGE_SIZE, usize::MAX).unwrap().pages);
                    pages.iter().map(|gpa| (gpa.0 - DATA) / PAGE_SIZE).collect()
                }
            };
            reported += pages.len();
            refresh(&mut copy, &pages);
            thread::sleep(Duration::from_millis(2));
        }
        vm.write_memory(GuestAddress(STOP), &1u64.to_le_bytes()).unwrap();
        guest.join().unwrap();
        assert!(reported > 40, "{start:?}: the guest wrote too little to test ({reported} reports)");
        // The last round, as a switch-over: the guest has stopped.
        vm.sync_dirty_log().unwrap();
        refresh(&mut copy, &take_all(&vm));
        let mut memory = vec![0u8; copy.len()];
        vm.read_memory(page(0), &mut memory).unwrap();
        let differ: Vec<usize> = (0..DATA_PAGES as usize)
            .filter(|p| copy[p * 4096..(p + 1) * 4096] != memory[p * 4096..(p + 1) * 4096])
            .collect();
        assert!(differ.is_empty(), "{start:?}: pages written but never reported: {differ:?}");
        assert!(memory.iter().any(|&b| b != 0), "{start:?}: the guest wrote nothing");
    }
}
