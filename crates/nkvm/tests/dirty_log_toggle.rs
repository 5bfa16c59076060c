//! Starting and stopping the dirty log of a region the guest is using, with
//! real guests: a start or stop changes only the slot's flags, while the
//! vCPU runs, and no write made after a start (or before a stop) is lost;
//! with `DirtyLogStart::AllDirty` the first collection returns every page
//! and later ones only what the guest wrote again.

mod common;

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;
use iced_x86::code_asm::*;
use nkvm::{Backing, DirtyLogMode, DirtyLogStart, GuestAddress, MemoryMap, Region, Vm, VmConfig, PAGE_SIZE};

const RAM: u64 = 4 << 20;
/// The data region: 64 pages, at 16 MiB.
const DATA: u64 = 0x100_0000;
const DATA_PAGES: u64 = 64;
/// Flags in RAM the host sets for the guest.
const GO_ON: u64 = 0x30_0000;
const STOP: u64 = 0x30_0008;

fn page(n: u64) -> GuestAddress {
    GuestAddress(DATA + n * PAGE_SIZE)
}

fn vm_in(mode: DirtyLogMode, start: DirtyLogStart) -> Vm {
    vm_with(VmConfig { vcpus: 1, memory: RAM, dirty_log: mode, dirty_log_start: start, ..Default::default() })
}

/// RAM (never logged) and the data region, logged or not.
fn map(vm: &Vm, data: &Backing, logged: bool) -> MemoryMap {
    let region = Region::new(GuestAddress(DATA), data, 0, DATA_PAGES * PAGE_SIZE);
    let region = if logged { region.dirty_logged() } else { region };
    MemoryMap::new(vec![Region::new(GuestAddress(0), vm.ram(), 0, RAM), region]).unwrap()
}

/// Every dirty page of the data region, after a sync.
fn dirty_pages(vm: &Vm) -> Vec<u64> {
    vm.sync_dirty_log().unwrap();
    let dirty = vm.collect_dirty(page(0), DATA_PAGES * PAGE_SIZE, usize::MAX).unwrap();
    dirty.pages.iter().map(|gpa| (gpa.0 - DATA) / PAGE_SIZE).collect()
}

/// The bitmap feed, and the dirty ring where the host has one.
fn modes() -> Vec<DirtyLogMode> {
    let ring = VmConfig { vcpus: 1, memory: RAM, dirty_log: DirtyLogMode::Ring, ..Default::default() };
    let mut modes = vec![DirtyLogMode::Bitmap];
    if Vm::new(&hypervisor(), &ring).is_ok() {
        modes.push(DirtyLogMode::Ring);
    } else {
        eprintln!("this host has no dirty ring: testing bitmaps only");
    }
    modes
}

/// Waits until the qword at `gpa` is non-zero (the guest got there),
/// failing if the vCPU thread ended first.
fn wait_for(vm: &Vm, gpa: GuestAddress, vcpu: &thread::JoinHandle<()>) {
    loop {
        let mut v = [0u8; 8];
        vm.read_memory(gpa, &mut v).unwrap();
        if v != [0; 8] {
            return;
        }
        assert!(!vcpu.is_finished(), "the guest stopped before writing {gpa:?}");
        thread::yield_now();
    }
}

#[test]
fn a_log_started_and_stopped_under_a_running_guest_loses_no_write() {
    for mode in modes() {
        let vm = Arc::new(vm_in(mode, DirtyLogStart::Clean));
        let data = Backing::new("data", DATA_PAGES * PAGE_SIZE).unwrap();
        vm.set_memory_map(map(&vm, &data, false)).unwrap();
        // Page 1 before the start; page 2 over and over until GO_ON; page 3
        // once after it; page 4 over and over until STOP.
        let mut vcpu = long_mode_guest(&vm, 0, |a| {
            let (mut before, mut after) = (a.create_label(), a.create_label());
            a.mov(rbx, DATA).unwrap();
            a.mov(rax, 1u64).unwrap();
            a.mov(qword_ptr(rbx + PAGE_SIZE), rax).unwrap();
            a.set_label(&mut before).unwrap();
            a.inc(rax).unwrap();
            a.mov(qword_ptr(rbx + 2 * PAGE_SIZE), rax).unwrap();
            a.mov(rdx, GO_ON).unwrap();
            a.cmp(qword_ptr(rdx), 0).unwrap();
            a.je(before).unwrap();
            a.mov(qword_ptr(rbx + 3 * PAGE_SIZE), rax).unwrap();
            a.set_label(&mut after).unwrap();
            a.inc(rax).unwrap();
            a.mov(qword_ptr(rbx + 4 * PAGE_SIZE), rax).unwrap();
            a.mov(rdx, STOP).unwrap();
            a.cmp(qword_ptr(rdx), 0).unwrap();
            a.je(after).unwrap();
            a.hlt().unwrap();
        });
        let guest = thread::spawn(move || {
            assert!(run_to_hlt_within(&mut vcpu, Duration::from_secs(120)).is_empty());
        });
        wait_for(&vm, page(2), &guest);
        // Start while the guest writes page 2; then let it write page 3.
        vm.set_memory_map(map(&vm, &data, true)).unwrap();
        vm.write_memory(GuestAddress(GO_ON), &1u64.to_le_bytes()).unwrap();
        wait_for(&vm, page(4), &guest);
        // Stop while it writes page 4 (written after the start: its bit is
        // harvested before the slot's log goes).
        vm.set_memory_map(map(&vm, &data, false)).unwrap();
        vm.write_memory(GuestAddress(STOP), &1u64.to_le_bytes()).unwrap();
        guest.join().unwrap();
        // Logging again reports what was written while it was on.
        vm.set_memory_map(map(&vm, &data, true)).unwrap();
        let dirty = dirty_pages(&vm);
        assert!(dirty.contains(&3) && dirty.contains(&4), "{mode:?}: writes after the start lost: {dirty:?}");
        assert!(dirty.iter().all(|p| [2, 3, 4].contains(p)), "{mode:?}: pages never written while logged: {dirty:?}");
        let mut bytes = [0u8; 8];
        vm.read_memory(page(1), &mut bytes).unwrap();
        assert_eq!(u64::from_le_bytes(bytes), 1, "{mode:?}: the guest's memory changed across the toggles");
        // The guest is done: nothing more is reported.
        assert_eq!(dirty_pages(&vm), Vec::<u64>::new(), "{mode:?}");
    }
}

#[test]
fn an_all_dirty_start_reports_every_page_once_then_only_new_writes() {
    for mode in modes() {
        let vm = vm_in(mode, DirtyLogStart::AllDirty);
        let data = Backing::new("data", DATA_PAGES * PAGE_SIZE).unwrap();
        vm.set_memory_map(map(&vm, &data, false)).unwrap();
        // Run 1 (logging off): page 5. Run 2: pages 3 and 40. Run 3: page 7.
        let mut vcpu = long_mode_guest(&vm, 0, |a| {
            a.mov(rbx, DATA).unwrap();
            for pages in [&[5u64][..], &[3, 40], &[7]] {
                for &p in pages {
                    a.mov(qword_ptr(rbx + p * PAGE_SIZE), rbx).unwrap();
                }
                a.hlt().unwrap();
            }
        });
        assert!(run_to_hlt(&mut vcpu, |_| 0).is_empty());
        vm.set_memory_map(map(&vm, &data, true)).unwrap();
        // The first query, with a budget: the first 10 pages.
        vm.sync_dirty_log().unwrap();
        let first = vm.collect_dirty(page(0), DATA_PAGES * PAGE_SIZE, 10).unwrap();
        assert_eq!(first.pages, (0..10).map(page).collect::<Vec<_>>(), "{mode:?}");
        assert_eq!(first.next, Some(page(10)), "{mode:?}");
        // Page 3 was returned (re-armed) and is written again; page 40 not
        // yet returned: reported once.
        assert!(run_to_hlt(&mut vcpu, |_| 0).is_empty());
        assert_eq!(dirty_pages(&vm), [3].into_iter().chain(10..DATA_PAGES).collect::<Vec<_>>(), "{mode:?}");
        assert_eq!(dirty_pages(&vm), Vec::<u64>::new(), "{mode:?}: reported twice");
        assert!(run_to_hlt(&mut vcpu, |_| 0).is_empty());
        assert_eq!(dirty_pages(&vm), vec![7], "{mode:?}");
        // Stopped and started again: all dirty again.
        vm.set_memory_map(map(&vm, &data, false)).unwrap();
        vm.set_memory_map(map(&vm, &data, true)).unwrap();
        assert_eq!(dirty_pages(&vm), (0..DATA_PAGES).collect::<Vec<_>>(), "{mode:?}");
    }
}

#[test]
fn a_clean_start_reports_only_pages_written_after_it() {
    for mode in modes() {
        let vm = vm_in(mode, DirtyLogStart::Clean);
        let data = Backing::new("data", DATA_PAGES * PAGE_SIZE).unwrap();
        vm.set_memory_map(map(&vm, &data, false)).unwrap();
        let mut vcpu = long_mode_guest(&vm, 0, |a| {
            a.mov(rbx, DATA).unwrap();
            a.mov(qword_ptr(rbx + 5 * PAGE_SIZE), rbx).unwrap();
            a.hlt().unwrap();
            a.mov(qword_ptr(rbx + 6 * PAGE_SIZE), rbx).unwrap();
            a.hlt().unwrap();
        });
        assert!(run_to_hlt(&mut vcpu, |_| 0).is_empty());
        vm.set_memory_map(map(&vm, &data, true)).unwrap();
        assert_eq!(dirty_pages(&vm), Vec::<u64>::new(), "{mode:?}: a page written before the start");
        assert!(run_to_hlt(&mut vcpu, |_| 0).is_empty());
        assert_eq!(dirty_pages(&vm), vec![6], "{mode:?}");
    }
}

#[test]
fn a_toggle_in_a_map_that_is_refused_changes_nothing() {
    let vm = vm_in(DirtyLogMode::Auto, DirtyLogStart::Clean);
    let data = Backing::new("data", DATA_PAGES * PAGE_SIZE).unwrap();
    vm.set_memory_map(map(&vm, &data, false)).unwrap();
    // Logging on, and more regions than KVM has slots: refused whole.
    let max = hypervisor().capabilities().max_memory_slots as u64;
    let mut regions = map(&vm, &data, true).regions().to_vec();
    let extra = Backing::new("extra", PAGE_SIZE).unwrap();
    regions.extend((0..max).map(|i| Region::new(GuestAddress(0x1_0000_0000 + i * PAGE_SIZE), &extra, 0, PAGE_SIZE)));
    let err = vm.set_memory_map(MemoryMap::new(regions).unwrap()).unwrap_err();
    assert!(err.to_string().contains("regions"), "{err}");
    assert!(vm.memory().regions().iter().all(|r| !r.dirty_log), "the refused map's log was started");
    // A guest write now is not logged; after a real start it is.
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        a.mov(rbx, DATA).unwrap();
        a.mov(qword_ptr(rbx + 9 * PAGE_SIZE), rbx).unwrap();
        a.hlt().unwrap();
        a.mov(qword_ptr(rbx + 8 * PAGE_SIZE), rbx).unwrap();
        a.hlt().unwrap();
    });
    assert!(run_to_hlt(&mut vcpu, |_| 0).is_empty());
    vm.set_memory_map(map(&vm, &data, true)).unwrap();
    assert!(run_to_hlt(&mut vcpu, |_| 0).is_empty());
    assert_eq!(dirty_pages(&vm), vec![8]);
}
