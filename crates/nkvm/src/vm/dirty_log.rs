//! The dirty log in user memory: one bitmap per backing object, fed from
//! KVM's dirty ring or from `KVM_GET_DIRTY_LOG`, queried by range and by
//! work budget, re-armed with `KVM_CLEAR_DIRTY_LOG` for exactly the pages
//! returned.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{MapState, Vm, VmError};
use crate::dirty::{DirtyPages, PageBitmap};
use crate::memory::{Region, PAGE_SIZE};
use crate::sys::ring::{reset_dirty_rings, DirtyRing};
use crate::GuestAddress;

/// The memory state vCPUs keep alive, and the dirty-ring harvest they
/// trigger when a ring fills.
#[derive(Debug)]
pub(super) struct DirtyShared {
    pub(super) state: Mutex<MapState>,
    /// Ring size in bytes; 0 when dirty pages come from `KVM_GET_DIRTY_LOG`.
    pub(super) ring_bytes: u32,
    pub(super) rings: Mutex<Vec<Arc<DirtyRing>>>,
    /// A duplicate of the VM fd, for `KVM_RESET_DIRTY_RINGS`.
    pub(super) vm_file: std::fs::File,
}

impl DirtyShared {
    /// Moves every published ring entry into the bitmaps, then lets KVM
    /// re-protect those pages.
    pub(super) fn harvest_rings(&self, state: &mut MapState) -> std::io::Result<()> {
        let rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        let MapState { installed, bitmaps, .. } = state;
        let by_slot: HashMap<u32, &Region> = installed.iter().map(|(r, slot)| (*slot, r)).collect();
        let mut total = 0;
        let mut overflowed = false;
        for ring in rings.iter() {
            let n = ring.harvest(|slot, offset| {
                if let Some(region) = by_slot.get(&(slot & 0xffff)) {
                    if let Some(bitmap) = bitmaps.get_mut(&region.backing.id()) {
                        bitmap.set(region.offset / PAGE_SIZE + offset);
                    }
                }
            });
            // A ring found completely full may have wrapped: KVM is meant to
            // exit at its soft limit, but on this nested host (kvm_pvm) the
            // exit can come late and entries are overwritten.
            overflowed |= n >= ring.entries() as usize;
            total += n;
        }
        if overflowed {
            log::warn!("a dirty ring overflowed before KVM exited: reporting all dirty-logged memory as dirty");
            for (region, _) in installed.iter().filter(|(r, _)| r.dirty_log) {
                if let Some(bitmap) = bitmaps.get_mut(&region.backing.id()) {
                    bitmap.set_range(region.offset / PAGE_SIZE, region.len / PAGE_SIZE);
                }
            }
        }
        if total > 0 {
            reset_dirty_rings(&self.vm_file)?;
        }
        Ok(())
    }
}

impl crate::vcpu::RingFull for DirtyShared {
    fn ring_full(&self) -> std::io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.harvest_rings(&mut state)
    }
}

impl Vm {
    /// Records that `len` bytes at `gpa` were written on the guest's behalf
    /// (by an emulated instruction or a device model writing guest RAM in
    /// this process): the pages are marked dirty in their backing's bitmap
    /// if the region is dirty-logged, so migration does not miss them.
    pub fn mark_dirty(&self, gpa: GuestAddress, len: u64) {
        if len == 0 {
            return;
        }
        let mut state = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        let MapState { installed, bitmaps, .. } = &mut *state;
        let end = gpa.0.saturating_add(len);
        let first = installed.partition_point(|(r, _)| r.end() <= gpa.0);
        for (region, _) in installed[first..].iter().take_while(|(r, _)| r.gpa.0 < end) {
            if let Some(bitmap) = bitmaps.get_mut(&region.backing.id()).filter(|_| region.dirty_log) {
                let lo = gpa.0.max(region.gpa.0) - region.gpa.0 + region.offset;
                let hi = end.min(region.end()) - region.gpa.0 + region.offset;
                let first_page = lo / PAGE_SIZE;
                bitmap.set_range(first_page, hi.div_ceil(PAGE_SIZE) - first_page);
            }
        }
    }

    /// Folds KVM's dirty log of every dirty-logged slot into the bitmaps
    /// kept in user memory (one per backing object). Call it before
    /// [`collect_dirty`](Self::collect_dirty) to see the latest writes.
    pub fn sync_dirty_log(&self) -> Result<(), VmError> {
        let mut state = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if self.shared.ring_bytes > 0 {
            return self.shared.harvest_rings(&mut state).map_err(VmError::DirtyRing);
        }
        let MapState { installed, bitmaps, .. } = &mut *state;
        for (region, slot) in installed.iter().filter(|(r, _)| r.dirty_log) {
            self.harvest_slot(bitmaps, region, *slot)?;
        }
        Ok(())
    }

    /// Returns (and clears) at most `max_pages` dirty pages in the guest
    /// physical range `start..start+len`, in address order, with the address
    /// to continue from if the budget ran out. Write tracking is re-armed for
    /// exactly the pages returned, before this returns: a page written after
    /// it was collected is reported again. Aliased pages are reported once,
    /// at the first address in the range that maps them.
    pub fn collect_dirty(&self, start: GuestAddress, len: u64, max_pages: usize) -> Result<DirtyPages, VmError> {
        let mut out = DirtyPages::default();
        self.collect_dirty_into(start, len, max_pages, &mut out)?;
        Ok(out)
    }

    /// [`collect_dirty`](Self::collect_dirty) into `out` (cleared first),
    /// reusing its allocation: a migration loop that passes the same
    /// `DirtyPages` every round allocates nothing after the first one (and
    /// takes no page faults on fresh memory, which are expensive nested).
    ///
    /// ```no_run
    /// # fn f(vm: &nkvm::Vm) -> Result<(), nkvm::VmError> {
    /// use nkvm::{DirtyPages, GuestAddress};
    /// let mut dirty = DirtyPages::default();
    /// vm.sync_dirty_log()?;
    /// let mut cursor = Some(GuestAddress(0));
    /// while let Some(start) = cursor {
    ///     vm.collect_dirty_into(start, u64::MAX - start.0, 4096, &mut dirty)?;
    ///     // ... send dirty.pages ...
    ///     cursor = dirty.next;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn collect_dirty_into(
        &self,
        start: GuestAddress,
        len: u64,
        max_pages: usize,
        out: &mut DirtyPages,
    ) -> Result<(), VmError> {
        out.pages.clear();
        out.next = None;
        let end = start.0.saturating_add(len);
        let mut state = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        let MapState { installed, bitmaps, taken, rearm_bits, .. } = &mut *state;
        let first = installed.partition_point(|(r, _)| r.end() <= start.0);
        // Backing pages taken, for all regions; `spans` says whose they are.
        taken.clear();
        let mut spans: Vec<(u64, usize, usize)> = Vec::new();
        for (region, _) in installed[first..].iter().take_while(|(r, _)| r.gpa.0 < end) {
            let Some(bitmap) = bitmaps.get_mut(&region.backing.id()).filter(|_| region.dirty_log) else {
                continue;
            };
            let lo = start.0.max(region.gpa.0);
            let hi = end.min(region.end());
            let to_page = |gpa: u64| (gpa - region.gpa.0 + region.offset) / PAGE_SIZE;
            let from = taken.len();
            let budget = max_pages - out.pages.len();
            let resume = bitmap.take(to_page(lo), to_page(hi + PAGE_SIZE - 1), from + budget, taken);
            let to_gpa = |page: u64| GuestAddress(region.gpa.0 + page * PAGE_SIZE - region.offset);
            out.pages.extend(taken[from..].iter().map(|&p| to_gpa(p)));
            spans.push((region.backing.id(), from, taken.len()));
            if let Some(p) = resume {
                out.next = Some(to_gpa(p));
                break;
            }
            if out.pages.len() >= max_pages {
                out.next = (hi < end).then_some(GuestAddress(hi));
                break;
            }
        }
        if self.manual_protect && self.shared.ring_bytes == 0 {
            for &(backing, from, to) in spans.iter().filter(|(_, from, to)| to > from) {
                self.rearm(installed, backing, &taken[from..to], rearm_bits)?;
            }
        }
        Ok(())
    }

    /// Re-arms write tracking for backing pages `pages` (ascending) in every
    /// slot that maps them (aliases included): one `KVM_CLEAR_DIRTY_LOG` per
    /// slot, whose bitmap spans the returned pages.
    fn rearm(
        &self,
        installed: &[(Region, u32)],
        backing: u64,
        pages: &[u64],
        bits: &mut Vec<u64>,
    ) -> Result<(), VmError> {
        for (region, slot) in installed.iter().filter(|(r, _)| r.dirty_log && r.backing.id() == backing) {
            let first = region.offset / PAGE_SIZE;
            let count = region.len / PAGE_SIZE;
            let inside = |p: &&u64| **p >= first && **p < first + count;
            let (Some(&lo), Some(&hi)) = (pages.iter().find(inside), pages.iter().rev().find(inside)) else {
                continue;
            };
            let base = (lo - first) & !63;
            // KVM wants a multiple of 64 pages, or a range ending at the slot's end.
            let num = ((hi - first) - base + 1).next_multiple_of(64).min(count - base);
            bits.clear();
            bits.resize(num.div_ceil(64) as usize, 0);
            for &p in pages.iter().filter(|p| inside(p)) {
                let rel = p - first - base;
                bits[(rel / 64) as usize] |= 1 << (rel % 64);
            }
            let num = u32::try_from(num).unwrap_or(u32::MAX);
            crate::sys::dirty::clear_dirty_log(&self.fd, *slot, base, num, bits)
                .map_err(|source| VmError::ClearDirtyLog { slot: *slot, source })?;
        }
        Ok(())
    }

    /// Reads KVM's dirty log of `slot` into the bitmap of `region`'s backing.
    pub(super) fn harvest_slot(
        &self,
        bitmaps: &mut HashMap<u64, PageBitmap>,
        region: &Region,
        slot: u32,
    ) -> Result<(), VmError> {
        let bits = self
            .fd
            .get_dirty_log(slot, region.len as usize)
            .map_err(|source| VmError::Kvm { op: "KVM_GET_DIRTY_LOG", source })?;
        if let Some(bitmap) = bitmaps.get_mut(&region.backing.id()) {
            bitmap.or_bits(region.offset / PAGE_SIZE, &bits);
        }
        Ok(())
    }
}
