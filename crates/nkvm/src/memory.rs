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
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::sys::memfd::SharedMapping;
use crate::GuestAddress;

/// The page size guest memory is managed in.
pub const PAGE_SIZE: u64 = 4096;

/// Errors building or accessing guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
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

static NEXT_BACKING_ID: AtomicU64 = AtomicU64::new(1);

/// A memory object that guest memory is made of: a memfd mapped shared.
///
/// Cheap to clone (reference counted). Its file can be passed to another
/// process, which then sees the same bytes as the guest.
#[derive(Clone)]
pub struct Backing {
    inner: Arc<BackingInner>,
}

struct BackingInner {
    id: u64,
    name: String,
    map: SharedMapping,
}

impl fmt::Debug for Backing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backing")
            .field("id", &self.inner.id)
            .field("name", &self.inner.name)
            .field("len", &self.len())
            .finish()
    }
}

impl Backing {
    /// Creates a zero-filled memfd-backed object of `size` bytes (a multiple of 4 KiB).
    pub fn new(name: &str, size: u64) -> Result<Self, MemoryError> {
        if size == 0 || size % PAGE_SIZE != 0 {
            return Err(MemoryError::BadSize(size));
        }
        let len = usize::try_from(size).map_err(|_| MemoryError::BadSize(size))?;
        let map = SharedMapping::new(name, len).map_err(|source| MemoryError::Create {
            name: name.to_string(),
            size,
            source,
        })?;
        let id = NEXT_BACKING_ID.fetch_add(1, Ordering::Relaxed);
        Ok(Self { inner: Arc::new(BackingInner { id, name: name.to_string(), map }) })
    }

    /// Maps an existing memory file, for example a memfd received by a device process.
    pub fn from_file(name: &str, file: File, size: u64) -> Result<Self, MemoryError> {
        let len = usize::try_from(size).map_err(|_| MemoryError::BadSize(size))?;
        if size == 0 {
            return Err(MemoryError::BadSize(size));
        }
        let map = SharedMapping::map(file, len).map_err(|source| MemoryError::Create {
            name: name.to_string(),
            size,
            source,
        })?;
        let id = NEXT_BACKING_ID.fetch_add(1, Ordering::Relaxed);
        Ok(Self { inner: Arc::new(BackingInner { id, name: name.to_string(), map }) })
    }

    /// Maps a file copy-on-write, for example a snapshot's memory file: the
    /// guest sees its bytes, and its writes stay in this process (the file
    /// is never changed, so the snapshot can be restored again). Nothing is
    /// copied up front: a page is read from the file when first touched, so
    /// the cost does not grow with `size`. The file is shorter than `size`:
    /// touching past its end faults, so check its length first.
    ///
    /// [`file`](Self::file) is then the original file, which does not see
    /// the guest's writes: do not hand it to a device process.
    pub fn from_file_private(name: &str, file: File, size: u64) -> Result<Self, MemoryError> {
        let len = usize::try_from(size).map_err(|_| MemoryError::BadSize(size))?;
        if size == 0 || size % PAGE_SIZE != 0 {
            return Err(MemoryError::BadSize(size));
        }
        let map = SharedMapping::map_private(file, len).map_err(|source| MemoryError::Create {
            name: name.to_string(),
            size,
            source,
        })?;
        let id = NEXT_BACKING_ID.fetch_add(1, Ordering::Relaxed);
        Ok(Self { inner: Arc::new(BackingInner { id, name: name.to_string(), map }) })
    }

    /// A new memfd-backed object of `size` bytes holding a copy of the first
    /// `size` bytes of `file` (for example a snapshot's memory file, when
    /// other processes must map guest RAM and a copy-on-write mapping
    /// would hide the guest's writes from them). Only the file's data
    /// ranges are copied (`SEEK_DATA`/`SEEK_HOLE`); its holes stay holes, so
    /// the cost grows with the data the file holds, not with `size`.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let file = std::fs::File::open("snapshot/memory")?;
    /// let size = file.metadata()?.len();
    /// let ram = nkvm::Backing::copy_of("ram", &file, size)?;
    /// assert_eq!(ram.len(), size);
    /// # Ok(())
    /// # }
    /// ```
    pub fn copy_of(name: &str, file: &File, size: u64) -> Result<Self, MemoryError> {
        use std::os::unix::fs::FileExt;
        /// Bytes per read and write.
        const CHUNK: usize = 1 << 20;
        let found = file.metadata().map_err(|source| MemoryError::CopyFrom { offset: 0, len: 0, source })?.len();
        if found < size {
            let source = std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("the file holds {found:#x} bytes, not {size:#x}"),
            );
            return Err(MemoryError::CopyFrom { offset: found, len: (size - found) as usize, source });
        }
        let ram = Self::new(name, size)?;
        let mut buf = vec![0u8; CHUNK];
        for (start, end) in crate::sys::memfd::data_ranges(file, size) {
            let mut at = start;
            while at < end {
                let len = usize::try_from(end - at).map_or(CHUNK, |left| left.min(CHUNK));
                let chunk = &mut buf[..len];
                file.read_exact_at(chunk, at).map_err(|source| MemoryError::CopyFrom { offset: at, len, source })?;
                ram.fill_at(at, &[chunk])?;
                at += len as u64;
            }
        }
        Ok(ram)
    }

    /// The byte ranges `[start, end)` of the object that may hold non-zero
    /// data, ascending; everything outside them reads as zero. For a memfd
    /// these are the pages ever written (`SEEK_DATA`/`SEEK_HOLE`), so a
    /// snapshot or a migration's first copy costs what the guest used,
    /// not its size; for a copy-on-write mapping
    /// ([`from_file_private`](Self::from_file_private)) it is the whole object.
    pub fn data_ranges(&self) -> Vec<(u64, u64)> {
        self.inner.map.data_ranges()
    }

    /// A process-unique id (stable for the life of the object).
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// The name given at creation.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.inner.map.len() as u64
    }

    /// Always false: backings are never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The memfd, for handing to another process.
    pub fn file(&self) -> &File {
        self.inner.map.file()
    }

    /// The mapping itself, for the crate's in-place I/O ([`crate::gather`]).
    pub(crate) fn mapping(&self) -> &SharedMapping {
        &self.inner.map
    }

    pub(crate) fn host_addr(&self) -> u64 {
        self.inner.map.as_ptr() as u64
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let off = usize::try_from(offset).ok();
        off.and_then(|o| self.inner.map.read(o, buf)).ok_or(MemoryError::OutOfBounds {
            offset,
            len: buf.len(),
            backing_len: self.len(),
        })
    }

    /// Writes `buf` at `offset`.
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), MemoryError> {
        let off = usize::try_from(offset).ok();
        off.and_then(|o| self.inner.map.write(o, buf)).ok_or(MemoryError::OutOfBounds {
            offset,
            len: buf.len(),
            backing_len: self.len(),
        })
    }

    /// Writes `bufs`, one after another, at `offset`, through the memory
    /// file rather than the mapping (see [`MemoryMap::fill`]).
    pub fn fill_at(&self, offset: u64, bufs: &[&[u8]]) -> Result<(), MemoryError> {
        let len = bufs.iter().map(|b| b.len()).sum();
        let outside = || MemoryError::OutOfBounds { offset, len, backing_len: self.len() };
        let off = usize::try_from(offset).map_err(|_| outside())?;
        match self.inner.map.fill(off, bufs) {
            Some(Ok(())) => Ok(()),
            Some(Err(source)) => Err(MemoryError::Fill { offset, len, source }),
            None => Err(outside()),
        }
    }

    /// One atomic 128-bit compare-exchange at `offset` (16-byte aligned), the
    /// host side of a guest's `lock cmpxchg16b`: if the 16 bytes equal
    /// `current` they become `new`. Returns `Ok(current)` when it swapped,
    /// `Err(found)` when it did not.
    pub fn compare_exchange_u128(
        &self,
        offset: u64,
        current: u128,
        new: u128,
    ) -> Result<Result<u128, u128>, MemoryError> {
        let off = usize::try_from(offset).ok();
        off.and_then(|o| self.inner.map.compare_exchange_u128(o, current, new)).ok_or(MemoryError::OutOfBounds {
            offset,
            len: 16,
            backing_len: self.len(),
        })
    }

    /// Whether two handles are the same object.
    pub fn same_object(&self, other: &Backing) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Whether this is a copy-on-write mapping of its file
    /// ([`from_file_private`](Self::from_file_private)): then
    /// [`file`](Self::file) does not hold the guest's bytes, and only this
    /// process's mapping (for in-process users, a
    /// [`RamView`](crate::ram_view::RamView)) does.
    pub fn is_copy_on_write(&self) -> bool {
        self.inner.map.is_private()
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
        if self.gpa.0.checked_add(self.len).is_none()
            || self.offset.checked_add(self.len).is_none_or(|end| end > self.backing.len())
        {
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
    pub fn write(&self, gpa: GuestAddress, buf: &[u8]) -> Result<(), MemoryError> {
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
            // Across regions: joined and written through the mappings.
            return self.write(gpa, &bufs.concat());
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
            match region.backing.inner.map.drop_host_pages(at, n) {
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
