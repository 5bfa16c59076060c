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
/// Entries below the ring size that KVM's soft limit is sure to be above
/// (it keeps 64 plus the CPU's dirty-log buffer, at most 512, in reserve).
const SOFT_LIMIT_MARGIN: u32 = 1024;

/// One vCPU's dirty ring, mapped from its fd.
#[derive(Debug)]
pub(crate) struct DirtyRing {
    ptr: NonNull<kvm_dirty_gfn>,
    entries: u32,
    cursor: Mutex<Cursor>,
}

/// Where the harvester is in the ring.
#[derive(Debug, Default)]
struct Cursor {
    /// Next entry to look at (the harvester's fetch index).
    next: u32,
    /// The ring overflowed: KVM pushed more entries than the ring holds
    /// before it exited, so entries were overwritten and KVM's push index
    /// is no longer where the harvester can find it. From then on the ring
    /// is not read; its entries are only handed back when KVM stops the
    /// vCPU for them (see [`DirtyRing::release_stale`]).
    poisoned: bool,
}

/// What one harvest did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Harvest {
    /// Entries the kernel published, handed to the callback.
    pub(crate) published: usize,
    /// The ring overflowed, in this harvest or before: its entries say
    /// nothing reliable about which pages were written.
    pub(crate) poisoned: bool,
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
        Ok(Self { ptr, entries, cursor: Mutex::new(Cursor::default()) })
    }

    /// Number of entries.
    pub(crate) fn entries(&self) -> u32 {
        self.entries
    }

    /// The flags word of entry `index` (taken modulo the ring size).
    fn flags(&self, index: u32) -> &AtomicU32 {
        let idx = (index % self.entries) as usize;
        // SAFETY: idx < entries, inside the mapping, which lives as long as
        // `self`; `flags` is a u32 accessed only atomically by us (and by
        // the kernel with matching barriers).
        unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*self.ptr.as_ptr().add(idx)).flags)) }
    }

    /// Calls `f(slot, page_offset)` for every entry the kernel published
    /// since the last harvest and marks them for reset. A poisoned ring
    /// (one that overflowed) is not read.
    pub(crate) fn harvest(&self, mut f: impl FnMut(u32, u64)) -> Harvest {
        let mut cursor = self.cursor.lock().unwrap_or_else(|p| p.into_inner());
        let mut done = Harvest { published: 0, poisoned: cursor.poisoned };
        if cursor.poisoned {
            return done;
        }
        loop {
            let flags = self.flags(cursor.next);
            if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                break;
            }
            let idx = (cursor.next % self.entries) as usize;
            // SAFETY: idx < entries, inside the mapping; the acquire above
            // makes the kernel's slot/offset visible.
            let (slot, offset) = unsafe {
                let entry = self.ptr.as_ptr().add(idx);
                ((*entry).slot, (*entry).offset)
            };
            f(slot, offset);
            flags.store(GFN_RESET, Ordering::Release);
            cursor.next = cursor.next.wrapping_add(1);
            done.published += 1;
        }
        if done.published >= self.entries as usize {
            // Every entry was dirty: KVM went past the ring's end before it
            // exited (this nested host does), overwriting entries.
            cursor.poisoned = true;
            done.poisoned = true;
        }
        done
    }

    /// Whether the ring overflowed (and is no longer read).
    pub(crate) fn poisoned(&self) -> bool {
        self.cursor.lock().unwrap_or_else(|p| p.into_inner()).poisoned
    }

    /// For a poisoned ring whose vCPU exited ring-full: KVM counts entries
    /// in use that the harvester cannot tell apart. Hands back as many as
    /// KVM is sure to count (fewer than its soft limit, which it is at when
    /// it stops the vCPU, so its reset index never passes its push index),
    /// unread, so that the vCPU can run again. Returns how many; 0 if the
    /// ring is not poisoned.
    pub(crate) fn release_stale(&self) -> u32 {
        let mut cursor = self.cursor.lock().unwrap_or_else(|p| p.into_inner());
        if !cursor.poisoned {
            return 0;
        }
        let count = self.entries.saturating_sub(SOFT_LIMIT_MARGIN);
        for i in 0..count {
            self.flags(cursor.next.wrapping_add(i)).store(GFN_RESET, Ordering::Release);
        }
        cursor.next = cursor.next.wrapping_add(count);
        count
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
