//! memfd-backed shared mappings: the storage behind guest RAM.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;

/// A `MAP_SHARED` mapping of a whole memfd. Another process that maps the same
/// memfd sees the same bytes, which is how device models outside the VMM reach
/// guest memory.
#[derive(Debug)]
pub(crate) struct SharedMapping {
    file: File,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value until drop;
// every access goes through raw-pointer copies that tolerate concurrent
// writers (the guest writes it concurrently anyway).
unsafe impl Send for SharedMapping {}
// SAFETY: as above; no interior state besides the memory itself.
unsafe impl Sync for SharedMapping {}

impl SharedMapping {
    /// Creates a memfd named `name` of `len` bytes and maps it shared.
    pub(crate) fn new(name: &str, len: usize) -> io::Result<Self> {
        let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `cname` is a valid NUL-terminated string that outlives the call;
        // memfd_create reads it and returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64)?;
        Self::map(file, len)
    }

    /// Maps an existing memory file (for example a memfd received from the VMM).
    pub(crate) fn map(file: File, len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: we ask for a fresh shared mapping of `len` bytes of `file`; the
        // kernel picks the address and checks the fd. The result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Self { file, ptr, len })
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
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe the mapping created in `map`, unmapped exactly once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
