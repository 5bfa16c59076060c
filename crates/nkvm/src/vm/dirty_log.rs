//! The dirty log in user memory: one bitmap per backing object, fed from
//! KVM's dirty ring or from `KVM_GET_DIRTY_LOG`, queried by range and by
//! work budget, re-armed with `KVM_CLEAR_DIRTY_LOG` for exactly the pages
//! returned.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_enable_cap, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE};

use super::{MapState, Vm, VmError};
use crate::dirty::{low_bits, push_pages, DirtyPages, DirtySource, PageBitmap};
use crate::memory::{MemoryError, Region, RegionKey, PAGE_SIZE};
use crate::sys::ring::{reset_dirty_rings, DirtyRing};
use crate::GuestAddress;

/// The memory state vCPUs keep alive, and the dirty-ring harvest they
/// trigger when a ring fills.
#[derive(Debug)]
pub(super) struct DirtyShared {
    pub(super) state: Mutex<MapState>,
    /// Ring size in bytes; 0 when dirty pages come from `KVM_GET_DIRTY_LOG`.
    pub(super) ring_bytes: u32,
    /// Each vCPU's ring, by vCPU id.
    pub(super) rings: Mutex<Vec<(u32, Arc<DirtyRing>)>>,
    /// A duplicate of the VM fd, for `KVM_RESET_DIRTY_RINGS`.
    pub(super) vm_file: std::fs::File,
    /// Other writers of guest memory, drained on every sync.
    pub(super) sources: Mutex<Vec<Arc<dyn DirtySource>>>,
}

impl DirtyShared {
    /// Moves every published ring entry into the bitmaps, then lets KVM
    /// re-protect those pages. Returns how many entries were published.
    pub(super) fn harvest_rings(&self, state: &mut MapState) -> std::io::Result<usize> {
        let rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        let MapState { installed, bitmaps, ring_entries, .. } = state;
        // Copy the entries out first: the kernel gets its slots back at
        // once, and the bitmap updates below look a slot up only when it
        // changes (entries come in runs), not once per page.
        ring_entries.clear();
        let mut poisoned = false;
        for (id, ring) in rings.iter() {
            let done = ring.harvest(|slot, offset| ring_entries.push((slot & 0xffff, offset)));
            if done.published >= ring.entries() as usize {
                log::warn!(
                    "vCPU {id}'s dirty ring overflowed before KVM exited (a bug of this host): from now on every \
                     sync reports all dirty-logged memory dirty; DirtyLogMode::Bitmap avoids this"
                );
            }
            poisoned |= done.poisoned;
        }
        let by_slot: HashMap<u32, &Region> = installed.iter().map(|(r, slot)| (*slot, r)).collect();
        let mut current: Option<(u32, u64, Option<&mut PageBitmap>)> = None;
        for &(slot, offset) in ring_entries.iter() {
            if current.as_ref().is_none_or(|(s, ..)| *s != slot) {
                current = Some(match by_slot.get(&slot) {
                    Some(region) => (slot, region.offset / PAGE_SIZE, bitmaps.get_mut(&region.backing.id())),
                    None => (slot, 0, None),
                });
            }
            if let Some((_, first, Some(bitmap))) = current.as_mut() {
                bitmap.set(*first + offset);
            }
        }
        if poisoned {
            // A ring overflowed, now or before: which pages its lost
            // entries named is unknown, so report every page.
            for (region, _) in installed.iter().filter(|(r, _)| r.dirty_log) {
                if let Some(bitmap) = bitmaps.get_mut(&region.backing.id()) {
                    bitmap.set_range(region.offset / PAGE_SIZE, region.len / PAGE_SIZE);
                }
            }
        }
        if !ring_entries.is_empty() {
            reset_dirty_rings(&self.vm_file)?;
        }
        Ok(ring_entries.len())
    }
}

impl crate::vcpu::RingFull for DirtyShared {
    fn ring_full(&self, vcpu: u32) -> std::io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let ring = |id: u32| {
            let rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
            rings.iter().find(|(r, _)| *r == id).map(|(_, ring)| ring.clone())
        };
        // This vCPU's own ring decides, not whether the others held entries.
        let overflowed_before = ring(vcpu).is_some_and(|r| r.poisoned());
        let harvested = self.harvest_rings(&mut state)?;
        if !overflowed_before {
            // Harvested now, or already by another thread (a collector's
            // sync, another vCPU's ring-full) after KVM decided to exit, or
            // found overflowed by this harvest (handed back at the next
            // ring-full, when KVM is sure to be at its limit): the vCPU
            // enters again and KVM checks again.
            if harvested == 0 {
                log::debug!("vCPU {vcpu}: dirty ring full, but another thread had emptied it");
            }
            return Ok(());
        }
        // Overflowed earlier: KVM still counts entries nkvm no longer reads.
        // Hand them back (no page is lost: a poisoned ring makes every sync
        // report all memory).
        let released = ring(vcpu).map_or(0, |r| r.release_stale());
        log::debug!("vCPU {vcpu}: handed back {released} entries of its overflowed dirty ring");
        reset_dirty_rings(&self.vm_file)
    }
}

impl Vm {
    /// Turns the dirty logging of installed region `i` on or off in place:
    /// the same slot, only its flags change, so KVM keeps the slot's
    /// mappings (only the write protection changes), and no vCPU is paused.
    /// A log that stops is harvested first. A write racing with the stop,
    /// between the harvest and the flags change, may go unreported: it is
    /// as if it came just after the stop, when nothing is reported either
    /// (through this slot; an alias still logged reports what is written
    /// through itself). So a stop never holds the vCPUs for KVM's walk over
    /// the slot.
    pub(super) fn toggle_logging(
        &self,
        state: &mut MapState,
        i: usize,
        region: &Region,
        key: RegionKey,
    ) -> Result<(), VmError> {
        let MapState { installed, installed_keys, bitmaps, harvest_bits, .. } = state;
        let slot = installed[i].1;
        if !region.dirty_log && self.shared.ring_bytes == 0 {
            self.harvest_ending(bitmaps, harvest_bits, &installed[i].0, slot);
        }
        self.install_slot(slot, region, false)?;
        if region.dirty_log {
            self.log_starts(bitmaps, region);
        }
        installed[i] = (region.clone(), slot);
        installed_keys[i] = key;
        Ok(())
    }

    /// Gives each region of `new` that a change starts logging (`add` and
    /// the new side of `toggles`) a bitmap for its backing if it has none,
    /// before any slot changes: a host out of memory refuses the whole map
    /// and leaves the installed one as it was.
    pub(super) fn make_bitmaps(
        bitmaps: &mut HashMap<u64, PageBitmap>,
        new: &[Region],
        add: &[usize],
        toggles: &[(usize, usize)],
    ) -> Result<(), MemoryError> {
        let starting = add.iter().chain(toggles.iter().map(|(_, j)| j)).map(|&j| &new[j]);
        // Kept aside until all are made: a refused map leaves nothing held.
        let mut made: Vec<(u64, PageBitmap)> = Vec::new();
        for region in starting.filter(|r| r.dirty_log) {
            let id = region.backing.id();
            if bitmaps.contains_key(&id) || made.iter().any(|(made_id, _)| *made_id == id) {
                continue;
            }
            let pages = region.backing.len() / PAGE_SIZE;
            let bitmap = PageBitmap::new(pages).map_err(|source| MemoryError::DirtyLog {
                backing: region.backing.name().to_owned(),
                bytes: pages.div_ceil(8),
                source,
            })?;
            made.push((id, bitmap));
        }
        bitmaps.extend(made);
        Ok(())
    }

    /// A slot of `region` was installed with dirty logging (its backing has
    /// a bitmap: [`make_bitmaps`](Self::make_bitmaps)): with
    /// [`DirtyLogStart::AllDirty`] where KVM does not start the log all
    /// set, the region's pages are marked here (a word per 64 pages).
    ///
    /// [`DirtyLogStart::AllDirty`]: crate::DirtyLogStart::AllDirty
    pub(super) fn log_starts(&self, bitmaps: &mut HashMap<u64, PageBitmap>, region: &Region) {
        debug_assert!(bitmaps.contains_key(&region.backing.id()), "make_bitmaps made none for {}", region.name());
        if let Some(bitmap) = bitmaps.get_mut(&region.backing.id()).filter(|_| self.mark_all_at_start) {
            bitmap.set_range(region.offset / PAGE_SIZE, region.len / PAGE_SIZE);
        }
    }

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

    /// Adds a writer of guest memory whose writes
    /// [`sync_dirty_log`](Self::sync_dirty_log) folds into this VM's dirty
    /// log, next to the guest's own: for example a VMM's in-process virtio
    /// devices, writing through a vm-memory mapping with an
    /// `AtomicBitmap`. Ranges outside dirty-logged regions are ignored.
    pub fn add_dirty_source(&self, source: Arc<dyn DirtySource>) {
        self.shared.sources.lock().unwrap_or_else(|p| p.into_inner()).push(source);
    }

    /// Moves every [`DirtySource`]'s pages into the bitmaps.
    pub(super) fn drain_dirty_sources(&self) {
        let sources = self.shared.sources.lock().unwrap_or_else(|p| p.into_inner());
        for source in sources.iter() {
            source.drain(&mut |gpa, len| self.mark_dirty(gpa, len));
        }
    }

    /// Folds KVM's dirty log of every dirty-logged slot, and the pages of
    /// every [`DirtySource`], into the bitmaps kept in user memory (one per
    /// backing object). Call it before
    /// [`collect_dirty`](Self::collect_dirty) to see the latest writes.
    ///
    /// With bitmaps and manual protection (unless KVM starts logs all set,
    /// [`DirtyLogStart::AllDirty`](crate::DirtyLogStart::AllDirty) where the
    /// host has `KVM_DIRTY_LOG_INITIALLY_SET`), KVM's logs are read by the
    /// next query, of any range, rather than here: it sees writes up to the
    /// query (a superset), and a read that fails fails that query. If that
    /// query takes every logged page it reads and re-arms each slot in one
    /// `KVM_GET_DIRTY_LOG`; any other copies the logs, and queries re-arm
    /// only what they return.
    pub fn sync_dirty_log(&self) -> Result<(), VmError> {
        self.drain_dirty_sources();
        let mut state = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if self.shared.ring_bytes > 0 {
            return self.shared.harvest_rings(&mut state).map(drop).map_err(VmError::DirtyRing);
        }
        if self.classic_reads {
            state.unread = true;
            return Ok(());
        }
        self.read_logs(&mut state)
    }

    /// Reads KVM's log of every dirty-logged slot into the bitmaps, the way
    /// `KVM_GET_DIRTY_LOG` is set to read (`state.classic_get`).
    fn read_logs(&self, state: &mut MapState) -> Result<(), VmError> {
        let MapState { installed, bitmaps, harvest_bits, .. } = state;
        for (region, slot) in installed.iter().filter(|(r, _)| r.dirty_log) {
            self.harvest_slot(bitmaps, harvest_bits, region, *slot, false)?;
        }
        Ok(())
    }

    /// Sets whether `KVM_GET_DIRTY_LOG` clears and re-protects what it
    /// copies (`classic`) or only copies (manual protection). Returns
    /// whether KVM now reads that way. After KVM refused once, whole-log
    /// queries no longer ask (they read by copying, as partial ones do).
    fn set_classic_get(&self, state: &mut MapState, classic: bool) -> bool {
        if state.classic_get == classic {
            return true;
        }
        if classic && state.classic_refused {
            return false;
        }
        let mut cap = kvm_enable_cap { cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, ..Default::default() };
        cap.args[0] = if classic { 0 } else { u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE) };
        match self.fd.enable_cap(&cap) {
            Ok(()) => {
                state.classic_get = classic;
                true
            }
            Err(e) => {
                // Either way every page read is re-armed once: classic reads
                // re-arm more than a ranged query returns, never less.
                if !state.classic_refused {
                    log::warn!("switching KVM_GET_DIRTY_LOG to classic={classic} failed: {e}");
                }
                state.classic_refused = true;
                false
            }
        }
    }

    /// The reading a [`sync_dirty_log`](Self::sync_dirty_log) left to this
    /// query of `start..end` with a budget of `max_pages`. A query that
    /// takes every dirty-logged page reads the classic way, which also
    /// re-arms; any other copies. Returns whether every logged page is
    /// re-armed now (nothing left for `rearm`).
    fn read_for_query(&self, state: &mut MapState, start: u64, end: u64, max_pages: usize) -> Result<bool, VmError> {
        if !state.unread {
            return Ok(false);
        }
        let logged = state.installed.iter().filter(|(r, _)| r.dirty_log);
        let (mut pages, mut lo, mut hi) = (0u64, u64::MAX, 0u64);
        for (region, _) in logged {
            pages += region.len / PAGE_SIZE;
            lo = lo.min(region.gpa.0);
            hi = hi.max(region.end());
        }
        let whole = start <= lo && end >= hi && max_pages as u64 >= pages;
        // Back to copying for a partial query; should KVM refuse, reads stay
        // classic, which re-arm everything they copy.
        let classic = if whole { self.set_classic_get(state, true) } else { !self.set_classic_get(state, false) };
        self.read_logs(state)?;
        state.unread = false;
        Ok(classic)
    }

    /// Returns (and clears) at most `max_pages` dirty pages in the guest
    /// physical range `start..start+len`, in address order, with the address
    /// to continue from if the budget ran out. Write tracking is re-armed for
    /// the pages returned before this returns: a page written after it was
    /// collected is reported again. A query that takes part of the log
    /// re-arms exactly what it returns (so it stalls the guest for those
    /// pages only); the first query after a sync that covers every
    /// dirty-logged region with a budget no smaller than their pages reads
    /// and re-arms each slot in one `KVM_GET_DIRTY_LOG`, as a raw VMM would
    /// (see [`sync_dirty_log`](Self::sync_dirty_log); should KVM refuse to
    /// switch back to copying, reads keep re-arming whole slots: more than
    /// returned, never less). On an error nothing is returned and the pages
    /// taken stay in the log.
    /// Aliased pages are reported once, at the first address in the range
    /// that maps them.
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
        let armed = self.read_for_query(&mut state, start.0, end, max_pages)?;
        let MapState { installed, bitmaps, taken, rearm_bits, .. } = &mut *state;
        let first = installed.partition_point(|(r, _)| r.end() <= start.0);
        // Backing words taken, for all regions; `spans` says whose they are.
        taken.clear();
        let mut spans: Vec<(u64, usize, usize)> = Vec::new();
        for (region, _) in installed[first..].iter().take_while(|(r, _)| r.gpa.0 < end) {
            let Some(bitmap) = bitmaps.get_mut(&region.backing.id()).filter(|_| region.dirty_log) else {
                continue;
            };
            let lo = start.0.max(region.gpa.0);
            let hi = end.min(region.end());
            let to_page = |gpa: u64| (gpa - region.gpa.0 + region.offset) / PAGE_SIZE;
            // Guest address of backing page 0 through this region (may wrap;
            // only pages inside the region are ever added to it).
            let origin = region.gpa.0.wrapping_sub(region.offset);
            let to_gpa = |page: u64| GuestAddress(origin.wrapping_add(page * PAGE_SIZE));
            let from = taken.len();
            let budget = max_pages - out.pages.len();
            let pages = &mut out.pages;
            let (first_page, end_page) = (to_page(lo), to_page(hi + PAGE_SIZE - 1));
            let resume = if armed && budget as u64 >= end_page - first_page {
                // Read and re-armed by KVM already, and all of it returned:
                // the plain scan, with nothing to note for a re-arm.
                bitmap.take_all(first_page, end_page, pages, origin);
                None
            } else {
                let (_, resume) = bitmap.take(first_page, end_page, budget, |w, bits| {
                    if !armed {
                        taken.push((w, bits));
                    }
                    let before = pages.len();
                    push_pages(pages, origin, w, bits);
                    pages.len() - before
                });
                resume
            };
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
        if self.manual_protect && self.shared.ring_bytes == 0 && !armed {
            for &(backing, from, to) in spans.iter().filter(|(_, from, to)| to > from) {
                if let Err(e) = self.rearm(installed, backing, &taken[from..to], rearm_bits) {
                    // The pages go back into the log: KVM may no longer hold
                    // their bits (a classic read took them), and a page taken
                    // but not returned must not be lost.
                    for &(backing, from, to) in &spans {
                        if let Some(bitmap) = bitmaps.get_mut(&backing) {
                            taken[from..to].iter().for_each(|&(w, bits)| bitmap.or_word(w, bits));
                        }
                    }
                    out.pages.clear();
                    out.next = None;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Re-arms write tracking for the backing pages in `words` ((word
    /// index, bits), ascending) in every slot that maps them (aliases
    /// included): one `KVM_CLEAR_DIRTY_LOG` per slot, whose bitmap spans the
    /// returned pages and is built a word at a time in `bits`, which is all
    /// zero between calls (so it is never cleared in full).
    fn rearm(
        &self,
        installed: &[(Region, u32)],
        backing: u64,
        words: &[(usize, u64)],
        bits: &mut Vec<u64>,
    ) -> Result<(), VmError> {
        // Bits `a..b` of a word (a, b <= 64).
        let span = |a: u64, b: u64| low_bits(b) & !low_bits(a);
        for (region, slot) in installed.iter().filter(|(r, _)| r.dirty_log && r.backing.id() == backing) {
            let first = region.offset / PAGE_SIZE;
            let count = region.len / PAGE_SIZE;
            // The taken words this slot maps; only its first and last word
            // can be partly outside it.
            let (lo_w, hi_w) = ((first / 64) as usize, ((first + count - 1) / 64) as usize);
            let sel = &words[words.partition_point(|&(w, _)| w < lo_w)..words.partition_point(|&(w, _)| w <= hi_w)];
            let clip = |&(w, b): &(usize, u64)| {
                if w != lo_w && w != hi_w {
                    return (w, b);
                }
                let base = w as u64 * 64;
                (w, b & span(first.saturating_sub(base).min(64), (first + count).saturating_sub(base).min(64)))
            };
            let (Some((w0, b0)), Some((w1, b1))) =
                (sel.iter().map(clip).find(|c| c.1 != 0), sel.iter().rev().map(clip).find(|c| c.1 != 0))
            else {
                continue;
            };
            let lo = w0 as u64 * 64 + u64::from(b0.trailing_zeros());
            let hi = w1 as u64 * 64 + 63 - u64::from(b1.leading_zeros());
            // KVM wants the first page a multiple of 64, and a multiple of
            // 64 pages or a range ending at the slot's end.
            let base = (lo - first) & !63;
            let num = ((hi - first) - base + 1).next_multiple_of(64).min(count - base);
            let nwords = num.div_ceil(64) as usize;
            if bits.len() < nwords {
                bits.resize(nwords, 0);
            }
            // Backing page `origin + i` is bit i of the bitmap: backing word
            // w lands in word w - word0, shifted right by `shift`, its low
            // `shift` pages at the top of the word before.
            let origin = first + base;
            let (word0, shift) = ((origin / 64) as usize, origin % 64);
            let words_in = sel.iter().map(clip).filter(|c| c.1 != 0);
            if shift == 0 {
                for (w, b) in words_in {
                    bits[w - word0] |= b;
                }
            } else {
                for (w, b) in words_in {
                    if b >> shift != 0 {
                        bits[w - word0] |= b >> shift;
                    }
                    if b << (64 - shift) != 0 {
                        bits[w - word0 - 1] |= b << (64 - shift);
                    }
                }
            }
            let num32 = u32::try_from(num).unwrap_or(u32::MAX);
            let cleared = crate::sys::dirty::clear_dirty_log(&self.fd, *slot, base, num32, &bits[..nwords]);
            // Back to all zero: in full when most words were used, else
            // only the words that can have been set.
            if sel.len() >= nwords / 8 {
                bits[..nwords].fill(0);
            } else {
                for &(w, _) in sel {
                    let i = w.wrapping_sub(word0);
                    for j in [i, i.wrapping_sub(1)] {
                        if let Some(word) = bits.get_mut(j) {
                            *word = 0;
                        }
                    }
                }
            }
            cleared.map_err(|source| VmError::ClearDirtyLog { slot: *slot, source })?;
        }
        Ok(())
    }
}
