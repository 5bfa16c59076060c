//! The pages a device process writes into guest RAM, into the VMM's dirty
//! log.
//!
//! vhost-user-backend attaches the log the VMM hands over
//! (`SET_LOG_BASE`) to each region of its guest memory
//! (`BitmapMmapRegion`: marking a range sets its pages' bits in the shared
//! log), but the models write through their own view, [`GuestRam`]. What a
//! batch of requests writes is known before it runs: a model writes only
//! into the writable descriptors of the chains it takes and into the used
//! ring. So before each batch the backend walks the chains the driver has
//! made available (on a copy of the queue: nothing is consumed), and after
//! it marks those ranges and the used ring — after, so no write can fall
//! behind a collection of its page. That costs a few descriptor reads per
//! request, whatever the size of guest RAM. (A driver that rewrites a
//! descriptor it has made available, which virtio forbids, can make the
//! device write a page the walk did not see: only that guest's own memory
//! is then missing from its log.)
//!
//! The driver may make more chains available while the batch runs, and
//! the model may take them. Those were not walked, and walking them after
//! the batch would race with the driver reusing their descriptors once it
//! sees them used. For those batches the backend falls back to the view's
//! own write bitmap (every page written through the view since it was last
//! read, exact but a pass over a bitmap the size of guest RAM) —
//! [`view_writes`].

use vhost_user_backend::bitmap::BitmapMmapRegion;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion};

use nkvm_devices::virtio::GuestRam;

/// The page size of the views' write bitmaps (the host's: 4 KiB on x86-64).
const PAGE: u64 = 4096;
/// At most this many ranges are walked for a batch: a driver can make a
/// queue's chains share one indirect table of 65535 descriptors, and
/// recording them all would cost the process hundreds of MiB per kick.
/// Past it, the batch falls back to [`view_writes`].
const MAX_RANGES: usize = 4096;
/// Bytes of a used ring of `size` entries: flags, index, the entries,
/// `avail_event`.
fn used_ring_len(size: u16) -> u64 {
    4 + 8 * u64::from(size) + 2
}

/// What a batch of requests on one queue may write, walked before it runs.
#[derive(Debug)]
pub(super) struct BatchWrites {
    /// Guest-physical (address, length) of every writable descriptor of
    /// the chains walked.
    ranges: Vec<(u64, u64)>,
    /// The queue's next available index when the batch started.
    next_avail: u16,
    /// Chains walked.
    chains: u16,
    /// The walk stopped at [`MAX_RANGES`]: the view's bitmap tells instead.
    cut: bool,
}

impl BatchWrites {
    /// Walks the chains available on `queue` (a copy of it: the queue is
    /// left as it is).
    pub(super) fn before(queue: &Queue, mem: &GuestRam) -> Self {
        let mut ranges = Vec::new();
        let (mut chains, mut cut) = (0u16, false);
        let mut copy = Queue::try_from(queue.state());
        if let Some(available) = copy.as_mut().ok().and_then(|q| q.iter(mem).ok()) {
            'walk: for chain in available {
                chains = chains.wrapping_add(1);
                // An empty descriptor writes nothing.
                for d in chain.filter(|d| d.is_write_only() && d.len() > 0) {
                    if ranges.len() == MAX_RANGES {
                        cut = true;
                        break 'walk;
                    }
                    ranges.push((d.addr().0, u64::from(d.len())));
                }
            }
        }
        Self { ranges, next_avail: queue.next_avail(), chains, cut }
    }

    /// After the batch: hands `mark` what it may have written — the
    /// walked ranges and the used ring, and, when the model took chains
    /// that were not walked, every page the view recorded.
    pub(super) fn log(self, queue: &Queue, view: &GuestRam, mark: &mut dyn FnMut(u64, u64)) {
        let taken = queue.next_avail().wrapping_sub(self.next_avail);
        if self.cut || taken > self.chains {
            view_writes(view, mark);
        }
        for (gpa, len) in self.ranges {
            mark(gpa, len);
        }
        mark(queue.used_ring(), used_ring_len(queue.size()));
    }
}

/// Hands `mark` every page the models wrote through `view` since the last
/// call (the view's write bitmaps, cleared as they are read).
pub(super) fn view_writes(view: &GuestRam, mark: &mut dyn FnMut(u64, u64)) {
    for region in view.iter() {
        let start = region.start_addr().0;
        let mapping: &MmapRegion<_> = region;
        for (w, mut bits) in mapping.bitmap().get_and_reset().into_iter().enumerate() {
            while bits != 0 {
                let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                mark(start + page * PAGE, PAGE);
            }
        }
    }
}

/// Marks `len` bytes at guest-physical `gpa` dirty in `ram`'s log (a no-op
/// before `SET_LOG_BASE`, and outside guest RAM).
pub(super) fn mark_in(ram: &GuestMemoryMmap<BitmapMmapRegion>, gpa: u64, len: u64) {
    let end = gpa.saturating_add(len);
    let mut at = gpa;
    while at < end {
        let Some(region) = ram.find_region(GuestAddress(at)) else { return };
        let offset = at - region.start_addr().0;
        let n = (region.len() - offset).min(end - at);
        region.bitmap().mark_dirty(offset as usize, n as usize);
        at += n;
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::desc::split::Descriptor;
    use vm_memory::Bytes;

    use super::*;

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const HEADER: u64 = 0x1_0000;
    const BUFFER: u64 = 0x2_0000;
    const LATE_BUFFER: u64 = 0x3_0000;
    const STRAY: u64 = 0x5_0000;

    /// 1 MiB of RAM with a 16-entry queue, and chain 0 available: a
    /// read-only header, then a writable buffer across two pages.
    fn set_up() -> (GuestRam, Queue) {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut queue = Queue::new(16).unwrap();
        queue.set_size(16);
        queue.set_desc_table_address(Some(DESC as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        queue.set_ready(true);
        let write = |i: u64, d: Descriptor| mem.write_obj(d, GuestAddress(DESC + 16 * i)).unwrap();
        write(0, Descriptor::new(HEADER, 16, 1, 1)); // NEXT
        write(1, Descriptor::new(BUFFER, 0x1800, 2, 0)); // WRITE
        write(2, Descriptor::new(LATE_BUFFER, 0x100, 2, 0));
        make_available(&mem, &[0]);
        (mem, queue)
    }

    /// Puts `heads` in the available ring and moves its index past them.
    fn make_available(mem: &GuestRam, heads: &[u16]) {
        for (i, head) in heads.iter().enumerate() {
            mem.write_obj(*head, GuestAddress(AVAIL + 4 + 2 * i as u64)).unwrap();
        }
        mem.write_obj(heads.len() as u16, GuestAddress(AVAIL + 2)).unwrap();
    }

    /// What a model does: takes every available chain, writes `len` bytes
    /// into its last descriptor, and uses it; plus a write nowhere in a
    /// chain.
    fn serve(mem: &GuestRam, queue: &mut Queue) {
        let chains: Vec<_> = queue.iter(mem).unwrap().collect();
        for chain in chains {
            let head = chain.head_index();
            let last = chain.last().unwrap();
            mem.write_slice(&[0xab; 8], last.addr()).unwrap();
            queue.add_used(mem, head, 8).unwrap();
        }
        mem.write_slice(&[1], GuestAddress(STRAY)).unwrap();
    }

    /// The pages of the ranges `log` hands over.
    fn logged(batch: BatchWrites, queue: &Queue, mem: &GuestRam) -> Vec<u64> {
        let mut pages = Vec::new();
        batch.log(queue, mem, &mut |gpa, len| pages.extend((gpa / PAGE..(gpa + len).div_ceil(PAGE)).map(|p| p * PAGE)));
        pages.sort_unstable();
        pages.dedup();
        pages
    }

    #[test]
    fn a_batch_logs_the_writable_descriptors_it_walked_and_the_used_ring() {
        let (mem, mut queue) = set_up();
        let batch = BatchWrites::before(&queue, &mem);
        assert_eq!(queue.next_avail(), 0, "walking consumed nothing");
        serve(&mem, &mut queue);
        // The buffer's two pages and the used ring; not the header, which
        // is only read, and not the stray write: the walk is trusted.
        assert_eq!(logged(batch, &queue, &mem), [USED, BUFFER, BUFFER + PAGE]);
    }

    #[test]
    fn a_batch_that_took_chains_it_did_not_walk_logs_every_page_the_view_wrote() {
        let (mem, mut queue) = set_up();
        let batch = BatchWrites::before(&queue, &mem);
        // The driver makes chain 2 available while the batch runs, and the
        // model takes it too.
        make_available(&mem, &[0, 2]);
        serve(&mem, &mut queue);
        let pages = logged(batch, &queue, &mem);
        for gpa in [USED, BUFFER, BUFFER + PAGE, LATE_BUFFER, STRAY] {
            assert!(pages.contains(&gpa), "{gpa:#x} missing from {pages:x?}");
        }
        assert!(!pages.contains(&HEADER), "only read: {pages:x?}");
    }

    /// A chain of more writable descriptors than the walk keeps (an
    /// indirect table of thousands): the walk stops at its limit, and the
    /// batch logs every page the view wrote instead, the stray one too.
    #[test]
    fn a_walk_past_its_limit_stops_and_the_view_tells_instead() {
        let (mem, mut queue) = set_up();
        // Chain 0 becomes one indirect table of MAX_RANGES + 1 writable
        // descriptors of 8 bytes each, at 0x8_0000.
        const TABLE: u64 = 0x8_0000;
        let n = MAX_RANGES as u64 + 1;
        for i in 0..n {
            // WRITE, and NEXT to the following one but for the last.
            let (flags, next) = if i + 1 < n { (3, i as u16 + 1) } else { (2, 0) };
            let d = Descriptor::new(BUFFER + 8 * (i % 64), 8, flags, next);
            mem.write_obj(d, GuestAddress(TABLE + 16 * i)).unwrap();
        }
        mem.write_obj(Descriptor::new(TABLE, (16 * n) as u32, 4, 0), GuestAddress(DESC)).unwrap(); // INDIRECT
        let batch = BatchWrites::before(&queue, &mem);
        assert!(batch.cut && batch.ranges.len() == MAX_RANGES, "{} ranges kept", batch.ranges.len());
        serve(&mem, &mut queue);
        let pages = logged(batch, &queue, &mem);
        assert!(pages.contains(&STRAY), "the view's record, not the walk: {pages:x?}");
    }
}
