//! KVM's per-vCPU dirty ring (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL`), which
//! kvm-ioctls lacks: the mapping, the harvest, and `KVM_RESET_DIRTY_RINGS`.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use kvm_bindings::{kvm_dirty_gfn, KVM_DIRTY_LOG_PAGE_OFFSET};
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, kvm_bindings::KVMIO, 0xc7);

const GFN_DIRTY: u32 = 1;
const GFN_RESET: u32 = 2;

/// One vCPU's dirty ring, mapped from its fd.
#[derive(Debug)]
pub(crate) struct DirtyRing {
    ptr: NonNull<kvm_dirty_gfn>,
    entries: u32,
    /// Next entry to look at (the harvester's fetch index).
    next: Mutex<u32>,
}

// SAFETY: the ring is shared memory with the kernel; entries are handed over
// through their `flags` word with acquire/release atomics (the ACQ_REL
// protocol), and the fetch index is behind a mutex.
unsafe impl Send for DirtyRing {}
// SAFETY: see Send.
unsafe impl Sync for DirtyRing {}

impl DirtyRing {
    /// Maps the ring of `bytes` bytes of the vCPU `fd`.
    pub(crate) fn map(fd: RawFd, bytes: u32) -> io::Result<Self> {
        let page = 4096i64;
        // SAFETY: a fresh shared mapping of the vCPU fd at the offset KVM
        // documents for the dirty ring; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                i64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * page,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<kvm_dirty_gfn>()).ok_or_else(io::Error::last_os_error)?;
        let entries = bytes / std::mem::size_of::<kvm_dirty_gfn>() as u32;
        Ok(Self { ptr, entries, next: Mutex::new(0) })
    }

    /// Number of entries.
    pub(crate) fn entries(&self) -> u32 {
        self.entries
    }

    /// Calls `f(slot, page_offset)` for every entry the kernel published
    /// since the last harvest and marks them for reset. Returns the count.
    pub(crate) fn harvest(&self, mut f: impl FnMut(u32, u64)) -> usize {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        loop {
            let idx = (*next % self.entries) as usize;
            // SAFETY: idx < entries, inside the mapping.
            let entry = unsafe { self.ptr.as_ptr().add(idx) };
            // SAFETY: `flags` is a u32 in the live mapping, accessed only
            // atomically by us (and by the kernel with matching barriers).
            let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*entry).flags)) };
            if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                break;
            }
            // SAFETY: the acquire above makes the kernel's slot/offset visible.
            let (slot, offset) = unsafe { ((*entry).slot, (*entry).offset) };
            f(slot, offset);
            flags.store(GFN_RESET, Ordering::Release);
            *next = next.wrapping_add(1);
            n += 1;
        }
        n
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        let bytes = self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), bytes) };
    }
}

/// Re-protects every harvested page of every ring of the VM.
pub(crate) fn reset_dirty_rings(vm: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument and only touches the
    // VM's own rings.
    let rc = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A second, owned fd for the VM fd `fd` (the ring harvester's handle).
pub(crate) fn dup_fd(fd: RawFd) -> io::Result<std::fs::File> {
    // SAFETY: the caller passes the fd of a live VmFd, valid for this borrow.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    Ok(std::fs::File::from(borrowed.try_clone_to_owned()?))
}
