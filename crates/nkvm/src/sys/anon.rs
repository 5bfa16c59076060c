//! Zeroed words in an anonymous mapping of their own, for the buffers KVM
//! copies dirty logs into.
//!
//! On this project's nested host (`kvm_pvm`), `KVM_GET_DIRTY_LOG` into a
//! large `Vec` (one glibc places in a mapping among others) took 5-6 times
//! as long as into the same number of bytes in a mapping of its own, 2 MiB
//! aligned and touched once: 88 µs against 17 µs for a 5 GiB slot's 160 KiB
//! log, the same ioctl and slot (docs/benchmarks.md, "Twelfth session").
//! Why the host charges so much for a shared neighbourhood is not known;
//! the buffers that take KVM's logs are therefore allocated here.

use std::io;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// The alignment of a mapping: the span of one page-directory entry.
const ALIGN: usize = 2 << 20;

/// `len` zeroed `u64`s in a private anonymous mapping of their own that
/// starts on a 2 MiB boundary, every page touched once; freed on drop.
pub(crate) struct AnonWords {
    ptr: NonNull<u64>,
    len: usize,
    /// Bytes mapped at `ptr` (a whole number of pages; 0 for no words).
    mapped: usize,
}

// SAFETY: the mapping is owned by this value alone, like a `Vec`'s buffer;
// access goes through `&`/`&mut` slices.
unsafe impl Send for AnonWords {}
// SAFETY: as above; shared access is read-only.
unsafe impl Sync for AnonWords {}

impl AnonWords {
    /// `len` zeroed words. Fails if the mapping cannot be made.
    pub(crate) fn new(len: usize) -> io::Result<Self> {
        if len == 0 {
            return Ok(Self::default());
        }
        let bytes = len.checked_mul(8).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        let mapped = bytes.next_multiple_of(4096);
        let reserve = mapped.checked_add(ALIGN).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        // SAFETY: a fresh private anonymous mapping the kernel places; the
        // result is checked before use.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserve,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let start = (base as usize).next_multiple_of(ALIGN);
        let (head, tail) = (start - base as usize, reserve - (start - base as usize) - mapped);
        // SAFETY: both ranges lie inside the mapping just made and outside
        // `start..start + mapped`, which stays mapped; nothing refers to them.
        unsafe {
            if head > 0 {
                libc::munmap(base, head);
            }
            if tail > 0 {
                libc::munmap((start + mapped) as *mut libc::c_void, tail);
            }
        }
        let ptr = NonNull::new(start as *mut u64).ok_or_else(io::Error::last_os_error)?;
        // SAFETY: `ptr..ptr + mapped` is mapped writable and owned here;
        // writing zeros touches every page once (it reads as zero anyway).
        unsafe { std::ptr::write_bytes(ptr.as_ptr().cast::<u8>(), 0, mapped) };
        Ok(Self { ptr, len, mapped })
    }
}

impl Deref for AnonWords {
    type Target = [u64];

    fn deref(&self) -> &[u64] {
        // SAFETY: `ptr` holds `len` initialised words (zeroed at creation)
        // for as long as `self` lives; dangling only when `len` is 0.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AnonWords {
    fn deref_mut(&mut self) -> &mut [u64] {
        // SAFETY: as in `deref`, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AnonWords {
    fn drop(&mut self) {
        if self.mapped > 0 {
            // SAFETY: the mapping made in `new`, no longer referred to.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.mapped) };
        }
    }
}

impl std::fmt::Debug for AnonWords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AnonWords({} words)", self.len)
    }
}

impl Default for AnonWords {
    /// No words (nothing mapped).
    fn default() -> Self {
        Self { ptr: NonNull::dangling(), len: 0, mapped: 0 }
    }
}

#[cfg(test)]
impl Clone for AnonWords {
    /// A copy in a mapping of its own (for tests: panics if none can be made).
    fn clone(&self) -> Self {
        let mut copy = Self::new(self.len).unwrap_or_else(|e| panic!("copying {} dirty-log words: {e}", self.len));
        copy.copy_from_slice(self);
        copy
    }
}

impl PartialEq for AnonWords {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_zeroed_aligned_and_writable() {
        for len in [0, 1, 511, 512, 513, 40_000] {
            let mut w = AnonWords::new(len).unwrap();
            assert_eq!(w.len(), len);
            assert!(w.iter().all(|&x| x == 0));
            if len > 0 {
                assert_eq!(w.as_ptr() as usize % ALIGN, 0);
                w[len - 1] = u64::MAX;
                assert_eq!(w[len - 1], u64::MAX);
            }
        }
    }
}
