//! Posted writes to socket regions: which regions have writes the device
//! has not confirmed (a count the exit path checks without a lock), the
//! flush that makes them served before a sync access or an exit to the
//! caller, and KVM's coalesced-MMIO ring that holds posted MMIO writes
//! until a vCPU exits.

use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::Arc;

use super::{Attached, Backend, IoRegions, IoSpace, RegionId};

impl IoRegions {
    /// Whether some region's writes may be waiting in the coalesced ring.
    pub(crate) fn coalescing(&self) -> bool {
        self.any_coalesced.load(AtomicOrdering::Relaxed)
    }

    pub(crate) fn set_coalesced(&self, id: RegionId, on: bool) {
        let mut c = self.coalesced.lock().unwrap_or_else(|p| p.into_inner());
        c.retain(|&r| r != id);
        if on {
            c.push(id);
        }
        self.any_coalesced.store(!c.is_empty(), AtomicOrdering::Relaxed);
    }

    pub(crate) fn is_coalesced(&self, id: RegionId) -> bool {
        self.coalesced.lock().unwrap_or_else(|p| p.into_inner()).contains(&id)
    }

    /// Forwards every write waiting in the coalesced ring, in ring order,
    /// as posted writes. `next` pops one entry (address, size, data).
    pub(crate) fn drain_coalesced(&self, mut next: impl FnMut() -> Option<(u64, u8, u64)>) {
        let _ring = self.ring_lock.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((addr, size, data)) = next() {
            match self.access(IoSpace::Mmio, addr, size, Some(data)) {
                None => log::warn!("coalesced write to {addr:#x} has no region (detached?); dropped"),
                Some(served) => {
                    if let Some(id) = served.failed {
                        self.unreported(id);
                    }
                }
            }
        }
    }

    /// Makes every outstanding posted write served (all regions but `except`,
    /// whose own stream order already puts them first). Returns once they
    /// are, whichever vCPU sent them and whichever is flushing them too.
    #[inline]
    pub(crate) fn flush_posted(&self, except: Option<RegionId>) {
        if self.posted_regions.load(AtomicOrdering::SeqCst) != 0 {
            self.flush_pending(except);
        }
    }

    #[cold]
    fn flush_pending(&self, except: Option<RegionId>) {
        let regions: Vec<Arc<Attached>> = self.regions.read().unwrap_or_else(|p| p.into_inner()).clone();
        // Only the accessed region's stream order is needed for its own.
        for r in regions.iter().filter(|r| Some(r.id) != except && r.posted_pending.load(AtomicOrdering::SeqCst)) {
            self.sync_region(r);
        }
    }

    pub(super) fn sync_region(&self, r: &Attached) {
        if let Backend::Socket(client) = &r.backend {
            let mut client = client.lock().unwrap_or_else(|p| p.into_inner());
            // Clear: another flusher made them served while this one waited.
            if !r.posted_pending.load(AtomicOrdering::SeqCst) {
                return;
            }
            if let Some(c) = client.as_mut() {
                if let Err(e) = c.sync() {
                    self.fail(r, &mut client, &e);
                    self.unreported(r.id);
                }
            }
            self.clear_posted(r);
        }
    }

    /// `r` has posted writes in flight (under its client's lock).
    pub(super) fn mark_posted(&self, r: &Attached) {
        if !r.posted_pending.swap(true, AtomicOrdering::SeqCst) {
            self.posted_regions.fetch_add(1, AtomicOrdering::SeqCst);
        }
    }

    /// `r`'s posted writes are served, or will never be (under its client's lock).
    pub(super) fn clear_posted(&self, r: &Attached) {
        if r.posted_pending.swap(false, AtomicOrdering::SeqCst) {
            self.posted_regions.fetch_sub(1, AtomicOrdering::SeqCst);
        }
    }
}
