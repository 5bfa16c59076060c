//! Guest memory: [`Backing`] objects (memfd-backed, shareable with device
//! processes) placed at guest physical addresses by [`Region`]s of a
//! [`MemoryMap`].
//!
//! The same backing range may appear at several addresses (the RFC's BIOS at
//! 0xe0000 *and* 0xfffe0000), and a region can be moved by installing a new
//! map in which it sits elsewhere.
//!
//! ```
//! use nkvm::{Backing, GuestAddress, MemoryMap, Region};
//!
//! let ram = Backing::new("ram", 16 << 20)?;
//! let bios = Backing::new("bios", 128 << 10)?;
//! let map = MemoryMap::new(vec![
//!     Region::new(GuestAddress(0), &ram, 0, 0xe0000),
//!     // The top 128 KiB of the BIOS image at 0xe0000 ...
//!     Region::new(GuestAddress(0xe0000), &bios, 0, 0x20000).read_only(),
//!     // ... and the same bytes again just below 4 GiB.
//!     Region::new(GuestAddress(0xfffe0000), &bios, 0, 0x20000).read_only(),
//! ])?;
//! bios.write_at(0, b"\xea\x5b\xe0\x00\xf0")?;
//! let mut buf = [0u8; 5];
//! map.read(GuestAddress(0xfffe0000), &mut buf)?;
//! assert_eq!(&buf, b"\xea\x5b\xe0\x00\xf0");
//! # Ok::<(), nkvm::MemoryError>(())
//! ```

use std::fmt;

use crate::GuestAddress;

mod backing;

pub use backing::Backing;

/// The page size guest memory is managed in.
pub const PAGE_SIZE: u64 = 4096;

/// Errors building or accessing guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// A region reaches past the 52-bit guest-physical address space x86
    /// has (KVM refuses such a slot).
    #[error("region {region} ends at {end:#x}, past the 52-bit guest-physical address space")]
    BeyondAddressWidth {
        /// The region.
        region: RegionName,
        /// Where it ends.
        end: u64,
    },
    /// Creating or mapping a memfd failed.
    #[error("cannot create {size:#x}-byte guest memory object {name:?}")]
    Create {
        /// The object's name.
        name: String,
        /// Its size.
        size: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A size of 0 or one that is not a multiple of the page size.
    #[error("memory size {0:#x} must be a non-zero multiple of 4 KiB")]
    BadSize(u64),
    /// Reading the file a backing copies ([`Backing::copy_of`]) failed.
    #[error("cannot read {len:#x} bytes at offset {offset:#x} of the file to copy into guest memory")]
    CopyFrom {
        /// Where in the file.
        offset: u64,
        /// How much.
        len: usize,
        /// The OS error (`UnexpectedEof`: the file is shorter than the
        /// object).
        #[source]
        source: std::io::Error,
    },
    /// A region's address, offset or length is not page aligned.
    #[error("region {0} is not 4 KiB aligned (address, offset into its backing and length must all be)")]
    Unaligned(RegionName),
    /// A region of length zero.
    #[error("region {0} is empty")]
    Empty(RegionName),
    /// A region reaches past the end of its backing object.
    #[error("region {region} maps offset {offset:#x}+{len:#x} of a {backing_len:#x}-byte backing object")]
    OutsideBacking {
        /// The region.
        region: RegionName,
        /// Its offset into the backing.
        offset: u64,
        /// Its length.
        len: u64,
        /// The backing object's size.
        backing_len: u64,
    },
    /// The host could not drop its mapping of a guest page.
    #[error("cannot drop the host mapping of guest page {gpa:#x}")]
    DropHostMapping {
        /// The page.
        gpa: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Two regions overlap in guest physical space.
    #[error("region {0} overlaps region {1}")]
    Overlap(RegionName, RegionName),
    /// More regions than KVM has memory slots.
    #[error("the map has {count} regions but this host's KVM has only {max} memory slots")]
    TooManyRegions {
        /// Regions in the map.
        count: usize,
        /// `KVM_CAP_NR_MEMSLOTS`.
        max: u32,
    },
    /// The host could not give a dirty-logged backing object its dirty
    /// log; the map was refused and the installed one stays.
    #[error(
        "cannot allocate the {bytes}-byte dirty log of guest memory object {backing:?}; the memory map was not changed"
    )]
    DirtyLog {
        /// The backing object's name.
        backing: String,
        /// The size of its log (a bit per page).
        bytes: u64,
        /// The OS error (`ENOMEM`).
        #[source]
        source: std::io::Error,
    },
    /// An access to guest memory that no region covers.
    #[error("guest physical range {addr}+{len:#x} is not (entirely) backed by memory")]
    Unmapped {
        /// Start of the access.
        addr: GuestAddress,
        /// Its length.
        len: usize,
    },
    /// An access outside a backing object.
    #[error("offset {offset:#x}+{len:#x} is outside the {backing_len:#x}-byte backing object")]
    OutOfBounds {
        /// Offset of the access.
        offset: u64,
        /// Its length.
        len: usize,
        /// The object's size.
        backing_len: u64,
    },
    /// A gather write of guest memory to a file or socket failed.
    #[error("cannot write guest memory out")]
    Gather {
        /// The OS error (the peer went away, ...).
        #[source]
        source: std::io::Error,
    },
    /// Writing guest memory through its file failed.
    #[error("cannot write {len:#x} bytes at offset {offset:#x} of a guest memory file")]
    Fill {
        /// Offset of the write.
        offset: u64,
        /// Its length.
        len: usize,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A region's identity in error messages: `0xfffe0000+0x20000`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionName {
    /// Guest physical address.
    pub gpa: GuestAddress,
    /// Length in bytes.
    pub len: u64,
}

impl fmt::Display for RegionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}+{:#x}", self.gpa.0, self.len)
    }
}

/// One mapping of (part of) a [`Backing`] into guest physical space.
#[derive(Debug, Clone)]
pub struct Region {
    /// Where the region starts in guest physical space.
    pub gpa: GuestAddress,
    /// Length in bytes.
    pub len: u64,
    /// The memory object behind it.
    pub backing: Backing,
    /// Offset of the region's first byte in `backing`.
    pub offset: u64,
    /// The guest cannot write it (writes exit as MMIO).
    pub read_only: bool,
    /// Writes by the guest are tracked in the dirty log.
    pub dirty_log: bool,
}

impl Region {
    /// A writable, untracked region mapping `backing[offset..offset+len]` at `gpa`.
    pub fn new(gpa: GuestAddress, backing: &Backing, offset: u64, len: u64) -> Self {
        Self { gpa, len, backing: backing.clone(), offset, read_only: false, dirty_log: false }
    }

    /// The same region, read-only for the guest.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// The same region, with dirty logging.
    pub fn dirty_logged(mut self) -> Self {
        self.dirty_log = true;
        self
    }

    /// The region's identity for messages.
    pub fn name(&self) -> RegionName {
        RegionName { gpa: self.gpa, len: self.len }
    }

    /// One past the last guest physical address.
    pub fn end(&self) -> u64 {
        self.gpa.0.saturating_add(self.len)
    }

    /// Whether `gpa` falls inside the region.
    pub fn contains(&self, gpa: GuestAddress) -> bool {
        gpa.0 >= self.gpa.0 && gpa.0 < self.end()
    }

    /// Same placement, backing range and flags.
    pub fn same_mapping(&self, other: &Region) -> bool {
        self.gpa == other.gpa
            && self.len == other.len
            && self.offset == other.offset
            && self.read_only == other.read_only
            && self.dirty_log == other.dirty_log
            && self.backing.same_object(&other.backing)
    }

    /// This region's [`RegionKey`].
    pub(crate) fn key(&self) -> RegionKey {
        let flags = u64::from(self.read_only) | (u64::from(self.dirty_log) << 1);
        [self.gpa.0, self.len, self.offset, (self.backing.id() << 2) | flags]
    }

    fn validate(&self) -> Result<(), MemoryError> {
        if self.len == 0 {
            return Err(MemoryError::Empty(self.name()));
        }
        if self.gpa.0 % PAGE_SIZE != 0 || self.len % PAGE_SIZE != 0 || self.offset % PAGE_SIZE != 0 {
            return Err(MemoryError::Unaligned(self.name()));
        }
        if self.gpa.0.checked_add(self.len).is_none_or(|end| end > MAX_GPA) {
            return Err(MemoryError::BeyondAddressWidth {
                region: self.name(),
                end: self.gpa.0.saturating_add(self.len),
            });
        }
        if self.offset.checked_add(self.len).is_none_or(|end| end > self.backing.len()) {
            return Err(MemoryError::OutsideBacking {
                region: self.name(),
                offset: self.offset,
                len: self.len,
                backing_len: self.backing.len(),
            });
        }
        Ok(())
    }
}

/// The end of x86's guest-physical address space (52 bits): no region
/// reaches past it.
pub const MAX_GPA: u64 = 1 << 52;

/// A whole guest physical memory map: validated, sorted, non-overlapping regions.
///
/// Cheap to clone (the regions are shared), so a VMM can keep the maps it
/// switches between and hand one to [`Vm::set_memory_map`](crate::Vm::set_memory_map)
/// without copying or freeing hundreds of regions on every change.
#[derive(Debug, Clone, Default)]
pub struct MemoryMap {
    regions: std::sync::Arc<[Region]>,
    /// Each region's [`RegionKey`], in the same order: what
    /// [`Vm::set_memory_map`](crate::Vm::set_memory_map) compares, a few
    /// words per region instead of the regions themselves.
    keys: std::sync::Arc<[RegionKey]>,
}

/// A region's mapping as four words — guest address, length, offset and
/// (backing id, read-only, dirty-log) — so that two regions have equal keys
/// exactly when [`Region::same_mapping`] holds (backing ids are never
/// reused). Slices of keys compare with `memcmp`.
pub(crate) type RegionKey = [u64; 4];

impl MemoryMap {
    /// Validates `regions` (alignment, bounds, no overlap) and sorts them by address.
    pub fn new(mut regions: Vec<Region>) -> Result<Self, MemoryError> {
        for r in &regions {
            r.validate()?;
        }
        regions.sort_by_key(|r| r.gpa);
        for pair in regions.windows(2) {
            if pair[1].gpa.0 < pair[0].end() {
                return Err(MemoryError::Overlap(pair[0].name(), pair[1].name()));
            }
        }
        let keys = regions.iter().map(Region::key).collect();
        Ok(Self { regions: regions.into(), keys })
    }

    /// Plain RAM of `size` bytes from one backing: below 3 GiB at address 0,
    /// the rest from 4 GiB up (leaving the 32-bit MMIO hole free).
    pub fn ram(backing: &Backing) -> Result<Self, MemoryError> {
        const LOW_LIMIT: u64 = 3 << 30;
        let size = backing.len();
        let mut regions = vec![Region::new(GuestAddress(0), backing, 0, size.min(LOW_LIMIT))];
        if size > LOW_LIMIT {
            regions.push(Region::new(GuestAddress(4 << 30), backing, LOW_LIMIT, size - LOW_LIMIT));
        }
        Self::new(regions)
    }

    /// The regions, sorted by guest physical address.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The regions' keys, in the order of [`regions`](Self::regions).
    pub(crate) fn keys(&self) -> &[RegionKey] {
        &self.keys
    }

    /// The region containing `gpa`.
    pub fn find(&self, gpa: GuestAddress) -> Option<&Region> {
        let idx = self.regions.partition_point(|r| r.end() <= gpa.0);
        self.regions.get(idx).filter(|r| r.contains(gpa))
    }

    /// Reads guest physical memory (the range may span adjacent regions).
    pub fn read(&self, gpa: GuestAddress, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.for_each_chunk(gpa, buf.len(), |region, off, start, n| {
            region.backing.read_at(off, &mut buf[start..start + n])
        })
    }

    /// Writes guest physical memory (the range may span adjacent regions).
    /// A range that is not mapped throughout is refused with nothing
    /// written.
    pub fn write(&self, gpa: GuestAddress, buf: &[u8]) -> Result<(), MemoryError> {
        if self.find(gpa).is_none_or(|r| buf.len() as u64 > r.end() - gpa.0) {
            // Across regions (or none): checked whole before any byte goes.
            self.for_each_chunk(gpa, buf.len(), |_, _, _, _| Ok(()))?;
        }
        self.for_each_chunk(gpa, buf.len(), |region, off, start, n| {
            region.backing.write_at(off, &buf[start..start + n])
        })
    }

    /// Writes `bufs`, one after another, at `gpa` (the range may span
    /// adjacent regions), through each backing's file (`pwritev`) instead
    /// of the mapping. Meant for filling memory that nothing has touched
    /// yet, such as an incoming migration's pages: a write through the
    /// mapping costs a page fault and a page clearing per fresh page, this
    /// one system call per batch of up to 1024 buffers. The result is the
    /// same as [`write`](Self::write) of the buffers joined; like it, this
    /// does not mark pages in the dirty log.
    ///
    /// ```
    /// use nkvm::{Backing, GuestAddress, MemoryMap};
    /// let ram = Backing::new("ram", 1 << 20)?;
    /// let map = MemoryMap::ram(&ram)?;
    /// let (a, b) = ([1u8; 4096], [2u8; 4096]);
    /// map.fill(GuestAddress(0x1000), &[&a, &b])?;
    /// let mut back = [0u8; 4];
    /// map.read(GuestAddress(0x2000 - 2), &mut back)?;
    /// assert_eq!(back, [1, 1, 2, 2]);
    /// # Ok::<(), nkvm::MemoryError>(())
    /// ```
    pub fn fill(&self, gpa: GuestAddress, bufs: &[&[u8]]) -> Result<(), MemoryError> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        let region = self.find(gpa).ok_or(MemoryError::Unmapped { addr: gpa, len })?;
        let in_region = gpa.0 - region.gpa.0;
        if len as u64 > region.len - in_region {
            // Across regions, through the mappings, one buffer at a time
            // (joining them would allocate whatever length a caller, or a
            // migration stream, claims), once the whole range is known to
            // be mapped: nothing is written when it is not.
            self.for_each_chunk(gpa, len, |_, _, _, _| Ok(()))?;
            let mut at = gpa;
            for buf in bufs {
                self.write(at, buf)?;
                at = GuestAddress(at.0 + buf.len() as u64);
            }
            return Ok(());
        }
        region.backing.fill_at(region.offset + in_region, bufs)
    }

    /// Makes the host forget its mapping of the guest page at `gpa` and
    /// build it again on the next access: KVM invalidates the guest's view
    /// of it (what QEMU's pc-testdev "flush page" port does for
    /// kvm-unit-tests). The page's contents are kept.
    pub fn drop_host_mapping(&self, gpa: GuestAddress) -> Result<(), MemoryError> {
        let page = GuestAddress(gpa.0 & !0xfff);
        self.for_each_chunk(page, 4096, |region, off, _, n| {
            let unmapped = || MemoryError::OutOfBounds { offset: off, len: n, backing_len: region.backing.len() };
            let at = usize::try_from(off).map_err(|_| unmapped())?;
            match region.backing.mapping().drop_host_pages(at, n) {
                Some(Ok(())) => Ok(()),
                Some(Err(source)) => Err(MemoryError::DropHostMapping { gpa: page.0, source }),
                None => Err(unmapped()),
            }
        })
    }

    fn for_each_chunk(
        &self,
        gpa: GuestAddress,
        len: usize,
        mut f: impl FnMut(&Region, u64, usize, usize) -> Result<(), MemoryError>,
    ) -> Result<(), MemoryError> {
        let mut done = 0usize;
        while done < len {
            let addr = GuestAddress(gpa.0.wrapping_add(done as u64));
            let region = self.find(addr).ok_or(MemoryError::Unmapped { addr: gpa, len })?;
            let in_region = addr.0 - region.gpa.0;
            let n = ((region.len - in_region) as usize).min(len - done);
            f(region, region.offset + in_region, done, n)?;
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
