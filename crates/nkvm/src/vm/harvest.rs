//! The last read of a slot's dirty log, and a read while it lives:
//! `KVM_GET_DIRTY_LOG` into the backing's bitmap (or through a buffer kept
//! across calls), and the sizing of that buffer before a map change ends a
//! log, so that no change loses one for want of memory.

use std::collections::HashMap;

use super::{MapState, Vm, VmError};
use crate::dirty::PageBitmap;
use crate::memory::{MemoryError, Region, PAGE_SIZE};
use crate::sys::anon::AnonWords;

impl Vm {
    /// The last read of a slot's log before the slot goes or stops logging.
    /// Its buffer was sized before any slot changed ([`Vm::size_harvest`]);
    /// should KVM refuse the read anyway, every page of the region is
    /// reported dirty instead: more than was written, never less.
    pub(super) fn harvest_ending(
        &self,
        bitmaps: &mut HashMap<u64, PageBitmap>,
        scratch: &mut AnonWords,
        region: &Region,
        slot: u32,
    ) {
        if let Err(e) = self.harvest_slot(bitmaps, scratch, region, slot, true) {
            log::warn!(
                "{}: the last read of its dirty log failed ({e}); every page of it is reported dirty",
                region.name()
            );
            if let Some(bitmap) = bitmaps.get_mut(&region.backing.id()) {
                bitmap.set_range(region.offset / PAGE_SIZE, region.len / PAGE_SIZE);
            }
        }
    }

    /// Sizes the buffer the last reads of the logs a change ends go
    /// through (`removed` installed regions, and the installed side of
    /// `toggles` that stop logging), before any slot changes: a host out of
    /// memory refuses the whole map rather than losing a slot's log.
    pub(super) fn size_harvest(
        state: &mut MapState,
        removed: &[usize],
        toggles: &[(usize, usize)],
        new: &[Region],
    ) -> Result<(), MemoryError> {
        let ending = removed
            .iter()
            .map(|&i| &state.installed[i].0)
            .chain(toggles.iter().filter(|&&(_, j)| !new[j].dirty_log).map(|&(i, _)| &state.installed[i].0))
            .filter(|r| r.dirty_log);
        let Some(pages) = ending.map(|r| r.len / PAGE_SIZE).max() else { return Ok(()) };
        let words = usize::try_from(pages.div_ceil(64)).unwrap_or(usize::MAX);
        if state.harvest_bits.len() < words {
            state.harvest_bits = AnonWords::new(words).map_err(|source| MemoryError::DirtyLog {
                backing: "the buffer for the last read of a slot's dirty log".to_owned(),
                bytes: pages.div_ceil(8),
                source,
            })?;
        }
        Ok(())
    }

    /// Reads KVM's dirty log of `slot` into the bitmap of `region`'s
    /// backing, through `scratch` (kept by the caller across calls).
    /// `ending`: the slot's log ends here (logging stops, or the slot
    /// goes), so what it leaves is usually nothing: ORed in, it marks only
    /// the words it sets, and a clean bitmap stays clean for the next start
    /// (whose first read KVM then writes straight into it).
    pub(super) fn harvest_slot(
        &self,
        bitmaps: &mut HashMap<u64, PageBitmap>,
        scratch: &mut AnonWords,
        region: &Region,
        slot: u32,
        ending: bool,
    ) -> Result<(), VmError> {
        let failed = |e: std::io::Error| VmError::Kvm {
            op: "KVM_GET_DIRTY_LOG",
            source: kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(0)),
        };
        let pages = region.len / PAGE_SIZE;
        let first = region.offset / PAGE_SIZE;
        if let Some(bitmap) = bitmaps.get_mut(&region.backing.id()).filter(|_| !ending) {
            // Where the bitmap is clean (a collection took everything), KVM
            // writes its log straight into it: one pass over memory fewer
            // (every word of it is marked in the summary, set or not).
            let direct =
                bitmap.fill_clean(first, pages, |words| crate::sys::dirty::get_dirty_log(&self.fd, slot, pages, words));
            if let Some(result) = direct {
                return result.map_err(failed);
            }
        }
        // Through the kept buffer, ORed in; with no bitmap for the backing
        // the log is still taken (and, without manual protection, cleared).
        let bits = crate::sys::dirty::get_dirty_log_into(&self.fd, slot, pages, scratch).map_err(failed)?;
        if let Some(bitmap) = bitmaps.get_mut(&region.backing.id()) {
            bitmap.or_bits(first, bits);
        }
        Ok(())
    }
}
