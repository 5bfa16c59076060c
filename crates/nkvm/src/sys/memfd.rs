//! memfd-backed shared mappings: the storage behind guest RAM.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;

/// The byte ranges `[start, end)` of the first `len` bytes of `file` that may
/// hold data, ascending (`lseek(SEEK_DATA/SEEK_HOLE)`); the rest is holes,
/// which read as zero. A file system without hole support gives one range.
/// Moves the file's offset: callers read and write it at explicit offsets.
pub(crate) fn data_ranges(file: &File, len: u64) -> Vec<(u64, u64)> {
    let whole = vec![(0, len)];
    let fd = file.as_raw_fd();
    let seek = |offset: u64, whence| {
        // SAFETY: lseek only reads the fd (owned by `file`, open for the
        // call) and moves its offset, which no caller relies on (they read
        // and write at explicit offsets).
        let r = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
        u64::try_from(r).ok()
    };
    let mut ranges = Vec::new();
    let mut at = 0;
    while at < len {
        let Some(start) = seek(at, libc::SEEK_DATA) else {
            // ENXIO: no data past `at`. Anything else: no hole support.
            if io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return whole;
        };
        let Some(end) = seek(start, libc::SEEK_HOLE) else { return whole };
        if start >= len {
            break;
        }
        ranges.push((start, end.min(len)));
        at = end;
    }
    ranges
}

/// A `MAP_SHARED` mapping of a whole memfd. Another process that maps the same
/// memfd sees the same bytes, which is how device models outside the VMM reach
/// guest memory.
#[derive(Debug)]
pub(crate) struct SharedMapping {
    file: File,
    ptr: NonNull<u8>,
    len: usize,
    /// `MAP_PRIVATE`: the file does not see writes through the mapping.
    private: bool,
}

// SAFETY: the mapping is plain shared memory owned by this value until drop;
// every access goes through raw-pointer copies that tolerate concurrent
// writers (the guest writes it concurrently anyway).
unsafe impl Send for SharedMapping {}
// SAFETY: as above; no interior state besides the memory itself.
unsafe impl Sync for SharedMapping {}

impl SharedMapping {
    /// Creates a memfd named `name` of `len` bytes and maps it shared. Its
    /// size is sealed (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`): the fd
    /// goes to device processes and vhost-user backends, and one that
    /// shrank it would make every host access past the new end a SIGBUS
    /// in the VMM.
    pub(crate) fn new(name: &str, len: usize) -> io::Result<Self> {
        let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `cname` is a valid NUL-terminated string that outlives the call;
        // memfd_create reads it and returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64)?;
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS on the memfd this function owns; it takes an
        // int and touches no memory.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Self::map(file, len)
    }

    /// Maps an existing memory file (for example a memfd received from the VMM).
    pub(crate) fn map(file: File, len: usize) -> io::Result<Self> {
        Self::map_with(file, len, libc::MAP_SHARED)
    }

    /// Maps a file copy-on-write (`MAP_PRIVATE`): reads see the file, writes
    /// stay in this process and never reach the file. Pages are read from
    /// the file when first touched, so the cost does not grow with `len`.
    pub(crate) fn map_private(file: File, len: usize) -> io::Result<Self> {
        Self::map_with(file, len, libc::MAP_PRIVATE)
    }

    fn map_with(file: File, len: usize, kind: libc::c_int) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: we ask for a fresh shared or private mapping of `len` bytes of
        // `file`; the kernel picks the address and checks the fd. The result is
        // checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                kind | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Self { file, ptr, len, private: kind == libc::MAP_PRIVATE })
    }

    /// The byte ranges `[start, end)` of the mapping that may hold data,
    /// ascending; the rest is holes, which read as zero. Found with
    /// `lseek(SEEK_DATA/SEEK_HOLE)` on a shared mapping's file; a private
    /// mapping (whose writes the file does not see), or a file system
    /// without hole support, is one range.
    pub(crate) fn data_ranges(&self) -> Vec<(u64, u64)> {
        if self.private {
            return vec![(0, self.len as u64)];
        }
        data_ranges(&self.file, self.len as u64)
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// `MAP_PRIVATE`: the file does not see writes through the mapping.
    pub(crate) fn is_private(&self) -> bool {
        self.private
    }

    /// Copies `buf.len()` bytes at `offset` out of the mapping.
    /// Returns `None` if the range is outside the mapping.
    pub(crate) fn read(&self, offset: usize, buf: &mut [u8]) -> Option<()> {
        let end = offset.checked_add(buf.len())?;
        if end > self.len {
            return None;
        }
        // SAFETY: offset..end lies inside the mapping (checked above), `buf` is a
        // distinct Rust allocation of exactly buf.len() bytes.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(offset), buf.as_mut_ptr(), buf.len()) };
        Some(())
    }

    /// Copies `buf` into the mapping at `offset`.
    /// Returns `None` if the range is outside the mapping.
    pub(crate) fn write(&self, offset: usize, buf: &[u8]) -> Option<()> {
        let end = offset.checked_add(buf.len())?;
        if end > self.len {
            return None;
        }
        // SAFETY: offset..end lies inside the mapping (checked above), `buf` is a
        // distinct Rust allocation of exactly buf.len() bytes.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), self.ptr.as_ptr().add(offset), buf.len()) };
        Some(())
    }

    /// Writes `bufs`, one after another, at `offset` through the file
    /// (`pwritev`) instead of the mapping: memory nobody has touched yet
    /// costs one system call per batch instead of one page fault (and one
    /// page clearing) per page. A private mapping is written through the
    /// mapping, since its file does not hold its memory.
    /// Returns `None` if the range is outside the mapping.
    pub(crate) fn fill(&self, offset: usize, bufs: &[&[u8]]) -> Option<io::Result<()>> {
        let total = bufs.iter().try_fold(0usize, |n, b| n.checked_add(b.len()))?;
        if offset.checked_add(total)? > self.len {
            return None;
        }
        if self.private {
            let mut at = offset;
            for buf in bufs {
                self.write(at, buf)?;
                at += buf.len();
            }
            return Some(Ok(()));
        }
        Some(pwritev_all(&self.file, offset, bufs))
    }

    /// Whether the `len` bytes at `offset` are all zero, read in place.
    /// Returns `None` if the range is outside the mapping.
    pub(crate) fn is_zero(&self, offset: usize, len: usize) -> Option<bool> {
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        let mut chunk = [0u8; 256];
        let mut at = offset;
        while at < end {
            let n = chunk.len().min(end - at);
            self.read(at, &mut chunk[..n])?;
            if chunk[..n].iter().any(|&b| b != 0) {
                return Some(false);
            }
            at += n;
        }
        Some(true)
    }

    /// Drops this process's page-table entries for the whole pages in
    /// `offset..offset+len`, keeping the bytes; KVM's MMU notifier sees the
    /// pages go, so the guest's mappings of them are rebuilt. A shared
    /// mapping uses `MADV_DONTNEED` (the bytes stay in the memfd and come
    /// back on the next touch). A copy-on-write mapping cannot: there
    /// `MADV_DONTNEED` would throw away the guest's own copy of the page, so
    /// it is protected `PROT_NONE` and back instead, as QEMU's pc-testdev
    /// does (an access by another thread in between faults, as it does in
    /// QEMU: this is a test device's operation).
    /// Returns `None` if the range is outside the mapping or not page aligned.
    pub(crate) fn drop_host_pages(&self, offset: usize, len: usize) -> Option<io::Result<()>> {
        let end = offset.checked_add(len)?;
        if end > self.len || offset % 4096 != 0 || len % 4096 != 0 {
            return None;
        }
        // MADV_DONTNEED on a MAP_SHARED file mapping only drops page-table
        // entries; mprotect changes only the protection, restored at once.
        // SAFETY: offset..end is page aligned inside this mapping (checked
        // above), and neither call moves or frees its contents (see above).
        let rc = unsafe {
            let at = self.ptr.as_ptr().add(offset).cast();
            if self.private {
                match libc::mprotect(at, len, libc::PROT_NONE) {
                    0 => libc::mprotect(at, len, libc::PROT_READ | libc::PROT_WRITE),
                    rc => rc,
                }
            } else {
                libc::madvise(at, len, libc::MADV_DONTNEED)
            }
        };
        Some(if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) })
    }

    /// One atomic 128-bit compare-exchange at `offset` (16-byte aligned),
    /// as the guest's `lock cmpxchg16b` would do it: if the 16 bytes equal
    /// `current`, they become `new`. Returns `Ok(current)` on success, or
    /// `Err(actual)` with what is there. `None` if the range is outside the
    /// mapping, misaligned, or the host CPU lacks `cmpxchg16b`.
    pub(crate) fn compare_exchange_u128(&self, offset: usize, current: u128, new: u128) -> Option<Result<u128, u128>> {
        let end = offset.checked_add(16)?;
        if end > self.len || offset % 16 != 0 || !std::arch::is_x86_feature_detected!("cmpxchg16b") {
            return None;
        }
        // The guest may write the same bytes concurrently: that is exactly
        // what the locked instruction arbitrates.
        // SAFETY: offset..offset+16 is inside the mapping, 16-byte aligned (page-aligned mmap, offset % 16 == 0)
        // as cmpxchg16b requires, and the CPU has the instruction (both checked above).
        let actual = unsafe { cmpxchg16b_at(self.ptr.as_ptr().add(offset).cast::<u128>(), current, new) };
        Some(if actual == current { Ok(actual) } else { Err(actual) })
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe the mapping created in `map`, unmapped exactly once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The most buffers one `pwritev` takes (`IOV_MAX` on Linux).
const IOV_MAX: usize = 1024;

/// Writes every byte of `bufs`, in order, at `offset` of `file`, however
/// many calls it takes.
fn pwritev_all(file: &File, mut offset: usize, bufs: &[&[u8]]) -> io::Result<()> {
    let mut slices: Vec<io::IoSlice<'_>> = bufs.iter().map(|b| io::IoSlice::new(b)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let count = rest.len().min(IOV_MAX);
        let at = libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // `IoSlice` is ABI-compatible with `struct iovec` on Unix (std
        // guarantees it); the first `count` of them point at buffers borrowed
        // for the whole call, which pwritev only reads.
        // SAFETY: valid iovecs (above); the fd is owned by `file`, open for the call.
        let written = unsafe { libc::pwritev(file.as_raw_fd(), rest.as_ptr().cast(), count as libc::c_int, at) };
        match written {
            n if n > 0 => {
                offset += n as usize;
                io::IoSlice::advance_slices(&mut rest, n as usize);
            }
            0 => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// One piece of a gather write ([`write_gather`]).
#[derive(Clone, Copy)]
pub(crate) enum Out<'a> {
    /// The caller's bytes.
    Bytes(&'a [u8]),
    /// `len` bytes at `offset` of a mapping, read in place by the kernel.
    Mapped(&'a SharedMapping, usize, usize),
}

/// Writes every piece, in order, to `fd` with `writev`, however many calls
/// it takes; returns the bytes written. `None` if a mapped range is
/// outside its mapping (then nothing is written).
pub(crate) fn write_gather(fd: std::os::fd::BorrowedFd<'_>, pieces: &[Out<'_>]) -> Option<io::Result<u64>> {
    let mut iov = Vec::with_capacity(pieces.len());
    for piece in pieces {
        let (base, len) = match *piece {
            Out::Bytes(bytes) => (bytes.as_ptr(), bytes.len()),
            Out::Mapped(map, offset, len) => {
                if offset.checked_add(len)? > map.len {
                    return None;
                }
                // SAFETY: offset..offset+len lies inside the mapping (checked above).
                (unsafe { map.ptr.as_ptr().add(offset) }.cast_const(), len)
            }
        };
        iov.push(libc::iovec { iov_base: base.cast_mut().cast(), iov_len: len });
    }
    let mut rest = &mut iov[..];
    let mut total = 0u64;
    while !rest.is_empty() {
        let count = rest.len().min(IOV_MAX);
        // Every iovec points into a `Bytes` slice or a mapping (bounds
        // checked above) that `pieces` borrows for this whole call, so the
        // memory stays mapped and readable; the guest may change it
        // meanwhile, and the kernel copies what it finds (no Rust reference
        // to it is made).
        // SAFETY: readable iovecs (above), which writev only reads; `fd` is borrowed open.
        let written = unsafe { libc::writev(fd.as_raw_fd(), rest.as_ptr(), count as libc::c_int) };
        let mut n = match written {
            n if n > 0 => n as usize,
            0 => return Some(Err(io::Error::from(io::ErrorKind::WriteZero))),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Some(Err(e));
            }
        };
        total += n as u64;
        // Skip what was written: whole iovecs, then part of the next.
        while let Some(first) = rest.first_mut() {
            if n < first.iov_len {
                // SAFETY: n < iov_len, so the advanced base stays inside
                // the same buffer.
                first.iov_base = unsafe { first.iov_base.cast::<u8>().add(n) }.cast();
                first.iov_len -= n;
                break;
            }
            n -= first.iov_len;
            rest = &mut rest[1..];
        }
    }
    Some(Ok(total))
}

/// `lock cmpxchg16b` on `dst`; returns the value found there.
///
/// Inline assembly rather than `core::arch::x86_64::cmpxchg16b`, which
/// unoptimized builds lower to a libatomic call that Rust does not link.
///
/// # Safety
///
/// `dst` must be valid for reads and writes of 16 bytes, 16-byte aligned,
/// and the CPU must support `cmpxchg16b`.
unsafe fn cmpxchg16b_at(dst: *mut u128, current: u128, new: u128) -> u128 {
    let (found_lo, found_hi): (u64, u64);
    // SAFETY: the caller guarantees a valid, aligned 16-byte location and CPU
    // support. RBX is reserved by the compiler, so the new low half is
    // swapped into it for the instruction and the original restored after.
    unsafe {
        std::arch::asm!(
            "xchg {new_lo}, rbx",
            "lock cmpxchg16b xmmword ptr [{dst}]",
            "mov rbx, {new_lo}",
            dst = in(reg) dst,
            new_lo = inout(reg) new as u64 => _,
            inout("rax") current as u64 => found_lo,
            inout("rdx") (current >> 64) as u64 => found_hi,
            in("rcx") (new >> 64) as u64,
            options(nostack),
        );
    }
    u128::from(found_lo) | (u128::from(found_hi) << 64)
}
