//! A vm-memory region over nkvm's own mapping of a [`Backing`]: the raw
//! pointer half of [`RamView`](crate::ram_view::RamView).

use std::io;

use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};

use crate::Backing;

/// A vm-memory region whose bytes are `backing[offset..offset + len]`, at
/// guest-physical `gpa`: not a new mapping but a window on the one KVM maps
/// (so it sees exactly the guest's bytes, copy-on-write or not), with a
/// write bitmap of its own. `file`, if any, is what the region reports as
/// its file (vhost-user hands it to a backend).
///
/// The region does not own the mapping: dropping it unmaps nothing.
///
/// # Safety
///
/// `backing` (a clone of it) must stay alive for as long as the region, or
/// anything holding it (a `GuestMemoryMmap` and its clones), may read or
/// write memory through it: dropping the last clone of a [`Backing`] unmaps
/// the pages the region points into.
pub(crate) unsafe fn region_over(
    backing: &Backing,
    offset: u64,
    len: u64,
    gpa: u64,
    file: Option<FileOffset>,
) -> io::Result<GuestRegionMmap<AtomicBitmap>> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_string());
    let end = offset.checked_add(len).ok_or_else(|| invalid("range overflows"))?;
    if len == 0 || end > backing.len() {
        return Err(invalid("range outside the backing object"));
    }
    let len = usize::try_from(len).map_err(|_| invalid("range larger than the address space"))?;
    // In bounds of the mapping (checked above), so no wrapping happens.
    let ptr = (backing.host_addr() as *mut u8).wrapping_add(offset as usize);
    let flags = if backing.is_copy_on_write() { libc::MAP_PRIVATE } else { libc::MAP_SHARED };
    let builder = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(flags | libc::MAP_NORESERVE);
    // `ptr..ptr + len` lies inside `backing`'s mapping (bounds checked
    // above), which is mapped read-write for the life of the backing; the
    // caller keeps the backing alive as long as the region is used (this
    // function's contract), and the region never unmaps it (`owned` is
    // false for a raw pointer).
    // SAFETY: the memory stays mapped read-write while the region uses it (above).
    let builder = unsafe { builder.with_raw_mmap_pointer(ptr) };
    let builder = match file {
        Some(file) => builder.with_file_offset(file),
        None => builder,
    };
    let region = builder.build().map_err(io::Error::other)?;
    GuestRegionMmap::new(region, GuestAddress(gpa)).ok_or_else(|| invalid("region wraps the guest address space"))
}
