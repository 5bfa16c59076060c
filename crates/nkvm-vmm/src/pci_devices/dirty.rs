//! Pages the in-process virtio devices write into guest RAM, handed to the
//! VM's dirty log.
//!
//! The devices reach guest RAM through a vm-memory view of the VM's own
//! mapping of it ([`GuestRam`], made by [`nkvm::ram_view::RamView`]), not
//! through the guest's page tables, so KVM never sees those writes. Every write through that mapping — a virtio-blk read's data
//! buffer, a console input buffer, a used-ring entry `virtio-queue` writes —
//! sets one bit per page in its region's `AtomicBitmap` (an atomic OR).
//! [`RamWrites`] drains those bits into nkvm's log on every
//! [`Vm::sync_dirty_log`](nkvm::Vm::sync_dirty_log); a bit is cleared only
//! there, by an atomic swap, so no write between two syncs is lost.
//!
//! Devices in a device process, and any other vhost-user backend, write
//! through their own mapping: their pages come in through vhost-user's
//! log, a bitmap shared with the backend
//! ([`SharedLog`](super::vhost_user::SharedLog), `VHOST_USER_SET_LOG_BASE`).

use nkvm::ram_view::RamKeeper;
use nkvm::{DirtySource, GuestAddress, PAGE_SIZE};
use nkvm_devices::virtio::GuestRam;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

/// The write bitmaps of the in-process devices' view of guest RAM, as a
/// [`DirtySource`] of the VM; the keeper keeps the view's memory mapped
/// while this clone of it lives.
#[derive(Debug)]
pub struct RamWrites {
    ram: GuestRam,
    _keeper: RamKeeper,
}

impl RamWrites {
    /// The bitmaps of `ram`, which `keeper` keeps mapped.
    pub fn new(ram: GuestRam, keeper: RamKeeper) -> Self {
        Self { ram, _keeper: keeper }
    }
}

impl DirtySource for RamWrites {
    fn drain(&self, mark: &mut dyn FnMut(GuestAddress, u64)) {
        for region in self.ram.iter() {
            let mapping: &MmapRegion<_> = region;
            // One bit per host page, 4 KiB on x86-64 as nkvm's pages are.
            mark_words(region.start_addr().0, mapping.bitmap().get_and_reset().into_iter(), mark);
        }
    }
}

/// Hands the set bits of `words` to `mark`, a run of consecutive pages as
/// one range: bit `i` of word `w` is the page `64 * w + i` pages above
/// `start`.
pub(super) fn mark_words(start: u64, words: impl Iterator<Item = u64>, mark: &mut dyn FnMut(GuestAddress, u64)) {
    let mut run: Option<(u64, u64)> = None;
    for (w, mut bits) in words.enumerate() {
        while bits != 0 {
            let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            run = match run {
                Some((first, n)) if first + n == page => Some((first, n + 1)),
                Some((first, n)) => {
                    mark(GuestAddress(start + first * PAGE_SIZE), n * PAGE_SIZE);
                    Some((page, 1))
                }
                None => Some((page, 1)),
            };
        }
    }
    if let Some((first, n)) = run {
        mark(GuestAddress(start + first * PAGE_SIZE), n * PAGE_SIZE);
    }
}
