//! Memory-map changes that cannot happen as asked, and the writes recorded
//! around them: a region past the address width is refused before anything
//! changes; a change KVM refuses midway leaves `memory()` saying what is
//! installed, loses no dirty bit and no slot number; a device's write
//! recorded before a region moves is reported at the region's new place.

mod common;

use common::*;
use nkvm::{Backing, GuestAddress, MemoryMap, Region, PAGE_SIZE};

const RAM: u64 = 16 << 20;

fn ram_region(vm: &nkvm::Vm) -> Region {
    Region::new(GuestAddress(0), vm.ram(), 0, RAM)
}

fn small_vm() -> nkvm::Vm {
    vm_with(nkvm::VmConfig { vcpus: 1, memory: RAM, ..Default::default() })
}

/// Writes a device recorded by guest-physical address.
#[derive(Debug, Default)]
struct Writes(std::sync::Mutex<Vec<(GuestAddress, u64)>>);

impl nkvm::DirtySource for Writes {
    fn drain(&self, mark: &mut dyn FnMut(GuestAddress, u64)) {
        for (gpa, len) in self.0.lock().unwrap().drain(..) {
            mark(gpa, len);
        }
    }
}

#[test]
fn a_region_past_the_52_bit_address_space_is_refused_before_anything_changes() {
    let vm = small_vm();
    let mem = Backing::new("far", 0x10000).unwrap();
    let err = MemoryMap::new(vec![ram_region(&vm), Region::new(GuestAddress(1 << 56), &mem, 0, 0x10000)]).unwrap_err();
    assert!(err.to_string().contains("past the 52-bit guest-physical address space"), "{err}");
    assert_eq!(vm.memory().regions().len(), 1);
    assert_guest_reads_ram(&vm);
}

/// A region of more pages than a KVM slot holds (2^31 - 1, past the
/// checks nkvm makes itself): KVM refuses it after the old region was
/// removed, and the change is taken back: the map before it is installed
/// again. Again and again: the slot numbers come back each time.
#[test]
fn a_change_kvm_refuses_midway_is_taken_back_and_loses_no_dirty_bit_or_slot() {
    let vm = small_vm();
    let data = Backing::new("data", 0x100000).unwrap();
    let at = |gpa: u64| Region::new(GuestAddress(gpa), &data, 0, 0x100000).dirty_logged();
    let old = MemoryMap::new(vec![ram_region(&vm), at(0x100_0000)]).unwrap();
    vm.set_memory_map(old.clone()).unwrap();
    vm.mark_dirty(GuestAddress(0x100_5000), 8);
    // A sparse object of 8 TiB + a page: never touched.
    let huge = Backing::new("huge", (1 << 43) + PAGE_SIZE).unwrap();
    let too_big = Region::new(GuestAddress(1 << 44), &huge, 0, huge.len());
    // More rounds than KVM has slot numbers (32768 here): a number taken
    // by a refused slot and never given back would run them out. Each
    // round adds a region before the refused one, moves the data region
    // and starts the RAM's log: every kind of step is taken back.
    let extra = Backing::new("extra", 0x10000).unwrap();
    let rounds = hypervisor().capabilities().max_memory_slots + 100;
    for round in 0..rounds {
        let map = MemoryMap::new(vec![
            ram_region(&vm).dirty_logged(),
            Region::new(GuestAddress(0x300_0000), &extra, 0, 0x10000),
            at(0x200_0000),
            too_big.clone(),
        ])
        .unwrap();
        let err = vm.set_memory_map(map).unwrap_err();
        assert!(err.to_string().contains("KVM_SET_USER_MEMORY_REGION"), "{err}");
        let now = vm.memory();
        let same = now.regions().len() == old.regions().len()
            && now.regions().iter().zip(old.regions()).all(|(a, b)| a.same_mapping(b));
        assert!(same, "round {round}: the map before the change is back: {:?}", now.regions());
    }
    assert_guest_reads_ram(&vm);
    // The page marked before the first refusal is still reported, where
    // the data region is.
    vm.sync_dirty_log().unwrap();
    let dirty = vm.collect_dirty(GuestAddress(0x100_0000), 0x100000, 100).unwrap().pages;
    assert!(dirty.contains(&GuestAddress(0x100_5000)), "{dirty:?}");
    // And the map changes as asked afterwards.
    vm.set_memory_map(MemoryMap::new(vec![ram_region(&vm), at(0x200_0000)]).unwrap()).unwrap();
    assert_eq!(vm.memory().regions().iter().map(|r| r.gpa.0).collect::<Vec<_>>(), [0, 0x200_0000]);
}

/// A change that stops a region's log and is then refused (here by its
/// one add) ran with the vCPUs going, a log switch pausing nobody: taken
/// back, the region's log starts again with every page of it reported,
/// since the guest may have written there while nothing logged it.
#[test]
fn a_refused_change_that_had_stopped_a_log_reports_that_region_whole() {
    let vm = small_vm();
    let data = Backing::new("data", 0x40000).unwrap();
    let logged = Region::new(GuestAddress(0x100_0000), &data, 0, 0x40000).dirty_logged();
    vm.set_memory_map(MemoryMap::new(vec![ram_region(&vm), logged.clone()]).unwrap()).unwrap();
    vm.sync_dirty_log().unwrap();
    let _ = vm.collect_dirty(GuestAddress(0x100_0000), 0x40000, 1000).unwrap();
    let huge = Backing::new("huge", (1 << 43) + PAGE_SIZE).unwrap();
    let unlogged = Region::new(GuestAddress(0x100_0000), &data, 0, 0x40000);
    let refused =
        MemoryMap::new(vec![ram_region(&vm), unlogged, Region::new(GuestAddress(1 << 44), &huge, 0, huge.len())]);
    assert!(vm.set_memory_map(refused.unwrap()).is_err());
    assert!(vm.memory().regions()[1].dirty_log, "the log is on again");
    vm.sync_dirty_log().unwrap();
    let dirty = vm.collect_dirty(GuestAddress(0x100_0000), 0x40000, 1000).unwrap().pages;
    assert_eq!(dirty.len(), 0x40, "every page of the region: {dirty:?}");
}

#[test]
fn a_device_write_recorded_before_its_region_moves_is_reported_at_the_new_place() {
    let vm = small_vm();
    let data = Backing::new("data", 0x100000).unwrap();
    let at = |gpa: u64| Region::new(GuestAddress(gpa), &data, 0, 0x100000).dirty_logged();
    vm.set_memory_map(MemoryMap::new(vec![ram_region(&vm), at(0x100_0000)]).unwrap()).unwrap();
    let writes = std::sync::Arc::new(Writes::default());
    vm.add_dirty_source(writes.clone());
    // A device writes the region's page 3, by the address it has now.
    writes.0.lock().unwrap().push((GuestAddress(0x100_3000), 8));
    vm.set_memory_map(MemoryMap::new(vec![ram_region(&vm), at(0x200_0000)]).unwrap()).unwrap();
    vm.sync_dirty_log().unwrap();
    let dirty = vm.collect_dirty(GuestAddress(0), 0x300_0000, 100).unwrap().pages;
    assert_eq!(dirty, [GuestAddress(0x200_3000)]);
}
