//! The dirty log, kept in user memory: one bitmap per [`Backing`](crate::Backing),
//! so aliases count a page once and a moved region keeps its bits.
//!
//! KVM's per-slot logs are folded into these bitmaps by
//! [`Vm::sync_dirty_log`](crate::Vm::sync_dirty_log) and, before a slot is
//! deleted or changed, by [`Vm::set_memory_map`](crate::Vm::set_memory_map) —
//! with the vCPUs paused, so no write falls between the harvest and the
//! deletion. [`Vm::collect_dirty`](crate::Vm::collect_dirty) answers the
//! RFC's two questions: "what is dirty in this range" (a range smaller than a
//! region is fine) and "don't return more than N pages" (with a cursor); its
//! cost follows the pages returned, thanks to a summary bitmap (one bit per
//! 64 pages). Returning a page re-arms write protection for exactly that page;
//! a query that takes the whole log reads and re-arms it in one
//! `KVM_GET_DIRTY_LOG` per slot instead (manual protection switched off for
//! that read), which is what a raw VMM pays.

use crate::GuestAddress;

mod bitmap;

pub(crate) use bitmap::{low_bits, push_pages, PageBitmap};

/// Where the dirty log is fed from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DirtyLogMode {
    /// Bitmaps with manual protection (`KVM_CLEAR_DIRTY_LOG`) when the host
    /// has them, else the dirty ring, else classic bitmaps. (Measured on the
    /// nested development host, `benches/dirty_collect.rs`: manual-protect
    /// bitmaps collect 0.9-1.1x as fast as a raw `KVM_GET_DIRTY_LOG` scan of
    /// 1-4 GiB at 1-25% dirty, the ring 0.4-0.7x, and the ring can wrap
    /// before KVM exits for it.)
    #[default]
    Auto,
    /// KVM's per-vCPU dirty ring (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL`); an
    /// error if the host lacks it. Harvest cost follows the pages dirtied.
    Ring,
    /// `KVM_GET_DIRTY_LOG` (+ `KVM_CLEAR_DIRTY_LOG` with manual protection):
    /// harvest cost follows the size of the dirty-logged slots.
    Bitmap,
}

/// What the dirty log holds for a region when its logging starts (a region
/// turned [`dirty_logged`](crate::Region::dirty_logged), or a dirty-logged
/// region added or moved).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DirtyLogStart {
    /// Nothing: only pages written after the start are reported. To see
    /// them, KVM write-protects every page of the region when logging
    /// starts, a cost that grows with its size (about 0.27 ms per GiB on the
    /// nested development host with no page mapped by the guest, more with
    /// mapped pages; `benches/dirty_log_toggle.rs`).
    #[default]
    Clean,
    /// Every page: the first [`collect_dirty`](crate::Vm::collect_dirty)
    /// after the start returns the whole region, and write protection is
    /// armed page by page as pages are returned, so the start itself only
    /// costs KVM the slot's bitmap (about 0.02 ms per GiB there). This is
    /// KVM's `KVM_DIRTY_LOG_INITIALLY_SET` with manual protection; with the
    /// dirty ring or without manual protection nkvm marks the pages itself
    /// and KVM still write-protects them all at the start. What a live
    /// migration wants: its first pass copies everything anyway, and the
    /// arming is spread over the pass instead of stalling the start.
    AllDirty,
}

/// Pages found dirty by [`Vm::collect_dirty`](crate::Vm::collect_dirty).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtyPages {
    /// Guest physical addresses of the dirty pages, ascending.
    pub pages: Vec<GuestAddress>,
    /// Where to continue when the budget ran out (`None`: the range is done).
    pub next: Option<GuestAddress>,
}

/// Pages written into guest memory by something other than the guest's
/// vCPUs (a device model writing through its own mapping of guest RAM),
/// recorded by that writer and drained into the VM's dirty log by
/// [`Vm::sync_dirty_log`](crate::Vm::sync_dirty_log); see
/// [`Vm::add_dirty_source`](crate::Vm::add_dirty_source).
///
/// A writer should record cheaply (an atomic bit set per page written) and
/// clear a record only inside [`drain`](Self::drain), as it hands it over:
/// then no write is lost between two syncs.
pub trait DirtySource: Send + Sync + std::fmt::Debug {
    /// Calls `mark(gpa, len)` for every range written since the last call,
    /// clearing the record as it goes.
    fn drain(&self, mark: &mut dyn FnMut(GuestAddress, u64));
}
