//! Guest RAM as the rust-vmm crates see it: a [`RamView`] is a
//! `vm_memory::GuestMemoryMmap` over the very mapping KVM maps for the
//! guest, for device models (`virtio-queue`, ...) running in this process.
//!
//! A view is not a second mapping of the backing's file. For a memfd the
//! two would be the same; for a copy-on-write mapping of a file
//! ([`Backing::from_file_private`], a restored snapshot) they are not: a
//! second mapping of the file sees the file, never the guest's writes, and
//! its own writes would land in a copy the guest never sees. A view points
//! into the backing's own mapping, so a device reads and writes exactly
//! the guest's bytes either way.
//!
//! Read-only regions (ROM) are left out: a device writing there through a
//! view would change what the guest can only read (on a PC, a DMA write to
//! ROM goes nowhere); an access to one fails as one outside the map does.
//!
//! Each region of a view has a write bitmap (`AtomicBitmap`, a bit per
//! 4 KiB page) that every write through the view sets: what a VMM drains
//! into the VM's dirty log (KVM does not see host writes).
//!
//! The view does not own the mapping: the backings do. A [`RamView`] holds
//! a [`RamKeeper`] (clones of every backing it points into); the plain
//! `GuestMemoryMmap` taken out of it with [`RamView::memory`] does not, so
//! whoever holds one must also hold a keeper — which is why `memory` is
//! `unsafe`.
//!
//! ```
//! use nkvm::ram_view::RamView;
//! use nkvm::{Backing, GuestAddress, MemoryMap};
//! use vm_memory::bitmap::Bitmap;
//! use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
//!
//! let ram = Backing::new("ram", 1 << 20)?;
//! let view = RamView::new(&MemoryMap::ram(&ram)?)?;
//! // A device model gets the memory and, beside it, the keeper.
//! let keeper = view.keeper();
//! // SAFETY: `keeper` lives until the end of this block, past every use
//! // of `memory` (which is dropped first, declared after it).
//! let memory = unsafe { view.memory() };
//! memory.write_obj(0x1234_5678u32, vm_memory::GuestAddress(0x2000)).unwrap();
//! let mut word = [0u8; 4];
//! ram.read_at(0x2000, &mut word)?;
//! assert_eq!(u32::from_le_bytes(word), 0x1234_5678, "the guest's own bytes");
//! // The write is in the region's bitmap, for the dirty log.
//! let region = memory.find_region(vm_memory::GuestAddress(0x2000)).unwrap();
//! assert!(region.bitmap().dirty_at(0x2000));
//! # drop(keeper);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::sync::Arc;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{FileOffset, GuestMemoryMmap, GuestRegionCollectionError};

use crate::memory::RegionName;
use crate::sys::ram_view::region_over;
use crate::{Backing, MemoryMap};

/// Why a [`RamView`] could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RamViewError {
    /// A region could not be viewed (its backing's file could not be
    /// duplicated, or its range does not fit the backing).
    #[error("cannot build a vm-memory view of region {region}")]
    Region {
        /// The region.
        region: RegionName,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// vm-memory refused the regions (a map with no writable region has
    /// none to view).
    #[error("cannot build a vm-memory view of the memory map (does it have writable regions?)")]
    Collection(#[source] GuestRegionCollectionError),
}

/// Keeps the backings of a [`RamView`] mapped: hold one beside every
/// `GuestMemoryMmap` taken from the view. Cheap to clone.
#[derive(Clone)]
pub struct RamKeeper {
    backings: Arc<[Backing]>,
}

impl fmt::Debug for RamKeeper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RamKeeper").field("backings", &self.backings.len()).finish()
    }
}

/// A vm-memory view of a [`MemoryMap`]'s regions, over the backings' own
/// mappings (see the [module](self) documentation).
#[derive(Debug)]
pub struct RamView {
    memory: GuestMemoryMmap<AtomicBitmap>,
    keeper: RamKeeper,
}

impl RamView {
    /// A view of every writable region of `map`, at the same guest-physical
    /// addresses (read-only regions are left out: see the
    /// [module](self) documentation). A region of a memfd (a shared backing) reports that file
    /// as its `FileOffset`, so a vhost-user backend can be given it; a
    /// region of a copy-on-write backing reports none, since its file does
    /// not hold the guest's bytes (and must not be written).
    pub fn new(map: &MemoryMap) -> Result<Self, RamViewError> {
        let mut regions = Vec::with_capacity(map.regions().len());
        let mut backings: Vec<Backing> = Vec::new();
        for r in map.regions().iter().filter(|r| !r.read_only) {
            let failed = |source| RamViewError::Region { region: r.name(), source };
            let file = if r.backing.is_copy_on_write() {
                None
            } else {
                Some(FileOffset::new(r.backing.file().try_clone().map_err(failed)?, r.offset))
            };
            // `backings` gets a clone of `r.backing` below, and the regions
            // live in `memory`, which only `RamView` (holding `keeper`) gives
            // out, through `memory`, whose contract makes the caller hold a
            // keeper as long as it uses the clone.
            // SAFETY: so the backing outlives every use of the region (above).
            let region = unsafe { region_over(&r.backing, r.offset, r.len, r.gpa.0, file) }.map_err(failed)?;
            regions.push(region);
            if !backings.iter().any(|b| b.same_object(&r.backing)) {
                backings.push(r.backing.clone());
            }
        }
        let memory = GuestMemoryMmap::from_regions(regions).map_err(RamViewError::Collection)?;
        Ok(Self { memory, keeper: RamKeeper { backings: backings.into() } })
    }

    /// What keeps the view's memory mapped.
    pub fn keeper(&self) -> RamKeeper {
        self.keeper.clone()
    }

    /// The view as a `GuestMemoryMmap` (a clone: the regions, and their
    /// bitmaps, are shared with the view and every other clone).
    ///
    /// # Safety
    ///
    /// The returned memory, and every clone of it, must be used to read or
    /// write only while this view or a [`RamKeeper`] of it is alive:
    /// hold a [`keeper`](Self::keeper) beside it, in the same owner, so
    /// that the memory cannot outlive it. Past that, its regions point at
    /// unmapped (or reused) addresses.
    pub unsafe fn memory(&self) -> GuestMemoryMmap<AtomicBitmap> {
        self.memory.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use vm_memory::bitmap::Bitmap;
    use vm_memory::{Bytes, GuestAddress as VmAddress, GuestMemoryBackend, GuestMemoryRegion};

    use super::*;
    use crate::{GuestAddress, Region};

    #[test]
    fn a_view_of_a_copy_on_write_backing_sees_the_guests_bytes_and_leaves_the_file_alone() {
        let mut file = tempfile();
        file.write_all(&[0x11; 0x2000]).unwrap();
        let ram = Backing::from_file_private("snap", file.try_clone().unwrap(), 0x4000).unwrap();
        let view = RamView::new(&MemoryMap::ram(&ram).unwrap()).unwrap();
        let _keeper = view.keeper();
        // SAFETY: `_keeper` outlives `memory` (declared before it).
        let memory = unsafe { view.memory() };
        // The guest's write (through the backing) is what the view reads.
        ram.write_at(0x1000, &[0x22]).unwrap();
        assert_eq!(memory.read_obj::<u8>(VmAddress(0x1000)).unwrap(), 0x22);
        assert_eq!(memory.read_obj::<u8>(VmAddress(0x0fff)).unwrap(), 0x11, "unwritten pages read the file");
        // The view's write is what the guest reads, and not in the file.
        memory.write_obj(0x33u8, VmAddress(0x1800)).unwrap();
        let mut byte = [0u8];
        ram.read_at(0x1800, &mut byte).unwrap();
        assert_eq!(byte, [0x33]);
        let mut on_disk = vec![0u8; 0x2000];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut on_disk, 0).unwrap();
        assert!(on_disk.iter().all(|&b| b == 0x11), "the file is never written");
        // It reports no file: its file is not the guest's memory.
        assert!(memory.iter().all(|r| r.file_offset().is_none()));
        assert!(memory.find_region(VmAddress(0x1800)).unwrap().bitmap().dirty_at(0x1800), "the write is logged");
    }

    #[test]
    fn a_view_of_a_memfd_reports_the_memfd_at_each_regions_offset() {
        let ram = Backing::new("ram", 0x4000).unwrap();
        let map = MemoryMap::new(vec![
            Region::new(GuestAddress(0), &ram, 0, 0x1000),
            Region::new(GuestAddress(0x10000), &ram, 0x2000, 0x2000),
        ])
        .unwrap();
        let view = RamView::new(&map).unwrap();
        let _keeper = view.keeper();
        // SAFETY: `_keeper` outlives `memory` (declared before it).
        let memory = unsafe { view.memory() };
        let offsets: Vec<_> = memory.iter().map(|r| r.file_offset().map(FileOffset::start)).collect();
        assert_eq!(offsets, [Some(0), Some(0x2000)]);
        memory.write_obj(7u8, VmAddress(0x10000)).unwrap();
        let mut byte = [0u8];
        ram.read_at(0x2000, &mut byte).unwrap();
        assert_eq!(byte, [7]);
        assert!(memory.read_obj::<u8>(VmAddress(0x1000)).is_err(), "0x1000 is not in the map");
    }

    #[test]
    fn a_keeper_keeps_the_memory_mapped_after_the_map_and_the_view_are_gone() {
        let ram = Backing::new("ram", 0x1000).unwrap();
        ram.write_at(0x10, &[9]).unwrap();
        let view = RamView::new(&MemoryMap::ram(&ram).unwrap()).unwrap();
        let keeper = view.keeper();
        // SAFETY: `keeper` lives to the end of the test, past `memory`.
        let memory = unsafe { view.memory() };
        drop(view);
        drop(ram);
        assert_eq!(memory.read_obj::<u8>(VmAddress(0x10)).unwrap(), 9);
        drop(memory);
        drop(keeper);
    }

    #[test]
    fn a_view_leaves_read_only_regions_out_so_no_device_writes_rom() {
        let ram = Backing::new("ram", 0x2000).unwrap();
        let rom = Backing::new("rom", 0x1000).unwrap();
        rom.write_at(0, &[0x5a; 0x1000]).unwrap();
        let map = MemoryMap::new(vec![
            Region::new(GuestAddress(0), &ram, 0, 0x2000),
            Region::new(GuestAddress(0xf000), &rom, 0, 0x1000).read_only(),
        ])
        .unwrap();
        let view = RamView::new(&map).unwrap();
        let _keeper = view.keeper();
        // SAFETY: `_keeper` outlives `memory` (declared before it).
        let memory = unsafe { view.memory() };
        assert!(memory.write_obj(0u8, VmAddress(0xf010)).is_err(), "a write to ROM fails");
        let mut byte = [0u8];
        rom.read_at(0x10, &mut byte).unwrap();
        assert_eq!(byte, [0x5a], "the ROM is unchanged");
        memory.write_obj(1u8, VmAddress(0x1000)).unwrap();
        let rom_only = MemoryMap::new(vec![Region::new(GuestAddress(0xf000), &rom, 0, 0x1000).read_only()]).unwrap();
        assert!(matches!(RamView::new(&rom_only).unwrap_err(), RamViewError::Collection(_)));
    }

    #[test]
    fn an_empty_map_has_no_view() {
        let err = RamView::new(&MemoryMap::default()).unwrap_err();
        assert!(matches!(err, RamViewError::Collection(_)), "{err}");
    }

    /// An unlinked file in the temporary directory.
    fn tempfile() -> std::fs::File {
        let path = std::env::temp_dir().join(format!(
            "nkvm-ram-view-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }
}
