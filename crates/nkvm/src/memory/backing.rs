//! [`Backing`]: the memory objects guest memory is made of.

use std::fmt;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{MemoryError, PAGE_SIZE};
use crate::sys::memfd::SharedMapping;

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
        let len = checked_len(size, true)?;
        Self::wrap(name, size, SharedMapping::new(name, len))
    }

    /// Maps an existing memory file, for example a memfd received by a device process.
    /// The file must hold at least `size` bytes: a shorter one is refused
    /// (an access past its end would be a SIGBUS).
    pub fn from_file(name: &str, file: File, size: u64) -> Result<Self, MemoryError> {
        let len = checked_len(size, false)?;
        let short = |held: u64| {
            let msg = format!("the file holds {held} bytes, fewer than the {size} to map");
            std::io::Error::new(std::io::ErrorKind::InvalidInput, msg)
        };
        let mapped = match file.metadata() {
            Ok(meta) if meta.len() < size => Err(short(meta.len())),
            Ok(_) => SharedMapping::map(file, len),
            Err(e) => Err(e),
        };
        Self::wrap(name, size, mapped)
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
        let len = checked_len(size, true)?;
        Self::wrap(name, size, SharedMapping::map_private(file, len))
    }

    /// A new object (a fresh id) over `map`, or the error naming why the
    /// mapping of `size` bytes failed.
    fn wrap(name: &str, size: u64, map: std::io::Result<SharedMapping>) -> Result<Self, MemoryError> {
        let map = map.map_err(|source| MemoryError::Create { name: name.to_string(), size, source })?;
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
    /// file rather than the mapping (see [`MemoryMap::fill`](super::MemoryMap::fill)).
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

/// `size` as a mapping length: not zero, addressable, and (if `whole_pages`)
/// a multiple of 4 KiB.
fn checked_len(size: u64, whole_pages: bool) -> Result<usize, MemoryError> {
    if size == 0 || (whole_pages && size % PAGE_SIZE != 0) {
        return Err(MemoryError::BadSize(size));
    }
    usize::try_from(size).map_err(|_| MemoryError::BadSize(size))
}
