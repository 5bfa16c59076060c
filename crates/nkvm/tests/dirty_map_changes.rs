//! The dirty log across map changes that run short of memory, and what it
//! keeps for backings no region maps any more. Each test that limits this
//! process's address space runs in a child process of its own (the test
//! binary run again for that one test), so the limit touches nothing else;
//! the mapping count is read in one too, so other tests' threads do not
//! move it.

mod common;

use std::process::Command;

use common::*;
use iced_x86::code_asm::*;
use nkvm::{Backing, DirtyLogMode, GuestAddress, MemoryMap, Region, Vm, VmConfig, PAGE_SIZE};

const RAM: u64 = 4 << 20;
const DATA: u64 = 0x100_0000;
const ELSEWHERE: u64 = 0x200_0000;
const DATA_PAGES: u64 = 64;
/// Set in the child process a test runs itself in.
const CHILD: &str = "NKVM_DIRTY_MAP_CHILD";

fn vm() -> Vm {
    vm_with(VmConfig { vcpus: 1, memory: RAM, dirty_log: DirtyLogMode::Bitmap, ..Default::default() })
}

/// RAM, and `data` at `at` (logged or not).
fn map_at(vm: &Vm, data: &Backing, at: u64, logged: bool) -> MemoryMap {
    let region = Region::new(GuestAddress(at), data, 0, DATA_PAGES * PAGE_SIZE);
    let region = if logged { region.dirty_logged() } else { region };
    MemoryMap::new(vec![Region::new(GuestAddress(0), vm.ram(), 0, RAM), region]).unwrap()
}

/// The data region's dirty pages (numbers) where it is mapped at `at`.
fn dirty_at(vm: &Vm, at: u64) -> Vec<u64> {
    vm.sync_dirty_log().unwrap();
    let dirty = vm.collect_dirty(GuestAddress(at), DATA_PAGES * PAGE_SIZE, usize::MAX).unwrap();
    dirty.pages.iter().map(|g| (g.0 - at) / PAGE_SIZE).collect()
}

/// A guest that writes page 5 of the data region (mapped at DATA) each
/// time it is run to its next `hlt` ([`writes_page_5`]).
fn page_5_writer(vm: &Vm) -> nkvm::Vcpu {
    long_mode_guest(vm, 0, |a| {
        let mut again = a.create_label();
        a.set_label(&mut again).unwrap();
        a.mov(rbx, DATA + 5 * PAGE_SIZE).unwrap();
        a.mov(qword_ptr(rbx), rax).unwrap();
        a.hlt().unwrap();
        a.jmp(again).unwrap();
    })
}

fn writes_page_5(vcpu: &mut nkvm::Vcpu) {
    run_to_hlt_within(vcpu, std::time::Duration::from_secs(10));
}

fn address_space_in_use() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmSize:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() << 10
}

/// Sets this process's address-space limit; returns the one before.
fn limit_address_space(bytes: libc::rlim_t) -> libc::rlim_t {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit with a valid rlimit; they change only
    // this (child) process's limit.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_AS, &mut limit), 0);
        let before = limit.rlim_cur;
        limit.rlim_cur = bytes.min(limit.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_AS, &limit), 0);
        before
    }
}

/// Runs `test` alone in a child process (see the module's doc); true in
/// the child, where the test's body runs.
fn in_child(test: &str) -> bool {
    if std::env::var_os(CHILD).is_some() {
        return true;
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe).args(["--exact", test, "--test-threads=1"]).env(CHILD, "1").output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{test} failed in its child process:\n{text}");
    assert!(text.contains("1 passed"), "{test} did not run in its child process:\n{text}");
    false
}

/// A move (or a stop) whose last read of the slot's log could not get its
/// buffer used to change the slot anyway, losing the guest's write. Now
/// the buffer is got before any slot changes: short of memory, the whole
/// map is refused and the write is reported where the region still is.
#[test]
fn a_map_change_short_of_memory_for_the_last_read_is_refused_and_loses_no_write() {
    if !in_child("a_map_change_short_of_memory_for_the_last_read_is_refused_and_loses_no_write") {
        return;
    }
    let vm = vm();
    let data = Backing::new("data", DATA_PAGES * PAGE_SIZE).unwrap();
    vm.set_memory_map(map_at(&vm, &data, DATA, true)).unwrap();
    let mut vcpu = page_5_writer(&vm);
    writes_page_5(&mut vcpu);
    for (change, to, logged) in [("move", ELSEWHERE, true), ("stop", DATA, false)] {
        let before = limit_address_space(address_space_in_use() + (1 << 20));
        let result = vm.set_memory_map(map_at(&vm, &data, to, logged));
        limit_address_space(before);
        let err = result.expect_err(change).to_string();
        assert!(err.contains("the last read of a slot's dirty log"), "{change}: {err}");
        let regions: Vec<(u64, bool)> = vm.memory().regions().iter().map(|r| (r.gpa.0, r.dirty_log)).collect();
        assert_eq!(regions, [(0, false), (DATA, true)], "{change}: the installed map stays");
    }
    assert_eq!(dirty_at(&vm, DATA), [5], "the write is reported");
    // With memory to spare the move goes through, and a write made
    // afterwards is found at the new place.
    writes_page_5(&mut vcpu);
    vm.set_memory_map(map_at(&vm, &data, ELSEWHERE, true)).unwrap();
    assert_eq!(dirty_at(&vm, ELSEWHERE), [5]);
}

/// Clean bitmaps of backings no region maps are given back (each is a
/// mapping of its own); one with a page not collected yet is kept, and
/// reports the page when its backing is mapped again.
#[test]
fn bitmaps_of_unmapped_backings_are_freed_once_clean_and_kept_while_dirty() {
    if !in_child("bitmaps_of_unmapped_backings_are_freed_once_clean_and_kept_while_dirty") {
        return;
    }
    let mappings = || std::fs::read_to_string("/proc/self/maps").unwrap().lines().count();
    let vm = vm();
    let base = MemoryMap::new(vec![Region::new(GuestAddress(0), vm.ram(), 0, RAM)]).unwrap();
    vm.set_memory_map(base.clone()).unwrap();
    let before = mappings();
    for _ in 0..200 {
        let hotplugged = Backing::new("hotplugged", DATA_PAGES * PAGE_SIZE).unwrap();
        vm.set_memory_map(map_at(&vm, &hotplugged, DATA, true)).unwrap();
        vm.set_memory_map(base.clone()).unwrap();
    }
    let after = mappings();
    assert!(after < before + 20, "{before} mappings before 200 hotplugs, {after} after");
    // A write, then the backing unmapped before it was collected.
    let data = Backing::new("data", DATA_PAGES * PAGE_SIZE).unwrap();
    vm.set_memory_map(map_at(&vm, &data, DATA, true)).unwrap();
    writes_page_5(&mut page_5_writer(&vm));
    vm.sync_dirty_log().unwrap();
    vm.set_memory_map(base).unwrap();
    vm.set_memory_map(map_at(&vm, &data, ELSEWHERE, true)).unwrap();
    assert_eq!(dirty_at(&vm, ELSEWHERE), [5], "kept while unmapped, reported at the new place");
}
