//! Carrying out a memory-map change in KVM's slots, and taking it back if
//! KVM refuses a step midway: `set_memory_map` leaves either the new map or
//! the old one installed.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};

use super::{MapState, Vm, VmError};
use crate::memory::{MemoryMap, Region, RegionKey, PAGE_SIZE};

/// A step of a change already made in KVM, with what undoes it.
#[derive(Debug)]
pub(super) enum Step {
    /// A slot's dirty logging was switched; `old` is what it was.
    Toggled { slot: u32, old: Region, old_key: RegionKey },
    /// A region's slot was deleted.
    Removed { region: Region, key: RegionKey },
    /// A slot was created.
    Added { slot: u32 },
}

impl Vm {
    /// Makes the change `set_memory_map` worked out: the toggles, then the
    /// removals (last first), then the additions, each recorded in
    /// `state.steps`. Stops at the first step KVM refuses.
    pub(super) fn apply_changes(
        &self,
        state: &mut MapState,
        map: &MemoryMap,
        remove: &[usize],
        add: &[usize],
        toggles: &[(usize, usize)],
    ) -> Result<(), VmError> {
        for &(i, j) in toggles {
            let (old, slot) = state.installed[i].clone();
            let old_key = state.installed_keys[i];
            self.toggle_logging(state, i, &map.regions()[j], map.keys()[j])?;
            state.steps.push(Step::Toggled { slot, old, old_key });
        }
        for &i in remove.iter().rev() {
            let (region, key, slot) = self.delete_slot(state, i)?;
            state.free_slots.push(slot);
            state.steps.push(Step::Removed { region, key });
        }
        for &j in add {
            let region = &map.regions()[j];
            let slot = Self::take_slot(state);
            if let Err(e) = self.install_slot(slot, region, false) {
                state.free_slots.push(slot);
                return Err(e);
            }
            if region.dirty_log {
                self.log_starts(&mut state.bitmaps, region);
            }
            Self::list(state, region.clone(), map.keys()[j], slot);
            state.steps.push(Step::Added { slot });
        }
        Ok(())
    }

    /// Undoes `state.steps`, last first: the slots are those of the map
    /// before the change again. A removed region's dirty bits were
    /// harvested into its backing's bitmap (and the vCPUs were kept out from
    /// the removal on); a region whose log was stopped, with the vCPUs
    /// running, is marked dirty whole when its log starts again: no dirty
    /// bit is lost. Fails at the first step KVM refuses too.
    pub(super) fn roll_back(&self, state: &mut MapState) -> Result<(), VmError> {
        while let Some(step) = state.steps.pop() {
            match step {
                Step::Added { slot } => {
                    let i = state.installed.iter().position(|(_, s)| *s == slot).expect("an added slot is listed");
                    if let Err(e) = self.delete_slot(state, i) {
                        state.steps.push(Step::Added { slot });
                        return Err(e);
                    }
                    state.free_slots.push(slot);
                }
                Step::Removed { region, key } => {
                    let slot = Self::take_slot(state);
                    if let Err(e) = self.install_slot(slot, &region, false) {
                        state.free_slots.push(slot);
                        state.steps.push(Step::Removed { region, key });
                        return Err(e);
                    }
                    if region.dirty_log {
                        self.log_starts(&mut state.bitmaps, &region);
                    }
                    Self::list(state, region, key, slot);
                }
                Step::Toggled { slot, old, old_key } => {
                    let i = state.installed.iter().position(|(_, s)| *s == slot).expect("a toggled slot is listed");
                    if let Err(e) = self.toggle_logging(state, i, &old, old_key) {
                        state.steps.push(Step::Toggled { slot, old, old_key });
                        return Err(e);
                    }
                    if old.dirty_log {
                        // Its log was stopped and the vCPUs may have run
                        // meanwhile (a toggle pauses nobody): what they
                        // wrote then was logged nowhere, so every page of
                        // the region counts as written.
                        if let Some(bitmap) = state.bitmaps.get_mut(&old.backing.id()) {
                            bitmap.set_range(old.offset / PAGE_SIZE, old.len / PAGE_SIZE);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Deletes the slot of installed region `i`, its log harvested first;
    /// returns the region, its key and the slot number. A slot KVM keeps
    /// stays listed.
    fn delete_slot(&self, state: &mut MapState, i: usize) -> Result<(Region, RegionKey, u32), VmError> {
        let (region, slot) = state.installed.remove(i);
        let key = state.installed_keys.remove(i);
        if region.dirty_log && self.shared.ring_bytes == 0 {
            let MapState { bitmaps, harvest_bits, .. } = &mut *state;
            self.harvest_ending(bitmaps, harvest_bits, &region, slot);
        }
        if let Err(e) = self.install_slot(slot, &region, true) {
            Self::list(state, region, key, slot);
            return Err(e);
        }
        Ok((region, key, slot))
    }

    /// A free slot number.
    fn take_slot(state: &mut MapState) -> u32 {
        state.free_slots.pop().unwrap_or_else(|| {
            state.next_slot += 1;
            state.next_slot - 1
        })
    }

    /// Lists `region` as installed in `slot`, in address order.
    fn list(state: &mut MapState, region: Region, key: RegionKey, slot: u32) {
        let at = state.installed.partition_point(|(r, _)| r.gpa < region.gpa);
        state.installed.insert(at, (region, slot));
        state.installed_keys.insert(at, key);
    }

    pub(super) fn install_slot(&self, slot: u32, region: &Region, delete: bool) -> Result<(), VmError> {
        let mut flags = 0;
        if region.read_only {
            flags |= KVM_MEM_READONLY;
        }
        if region.dirty_log {
            flags |= KVM_MEM_LOG_DIRTY_PAGES;
        }
        let raw = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: region.gpa.0,
            memory_size: if delete { 0 } else { region.len },
            userspace_addr: region.backing.host_addr() + region.offset,
        };
        // SAFETY: the host range lies inside `region.backing`'s mapping
        // (validated by MemoryMap), and the slot table keeps a clone of the
        // region, hence of the backing, until the slot is deleted.
        unsafe { crate::sys::slot::set_user_memory_region(&self.fd, raw) }
            .map_err(|source| VmError::Kvm { op: "KVM_SET_USER_MEMORY_REGION", source })
    }
}
