//! `KVM_CLEAR_DIRTY_LOG`, which kvm-ioctls lacks, and `KVM_GET_DIRTY_LOG`
//! into a buffer kept across calls (kvm-ioctls allocates one per call).

use kvm_bindings::{kvm_clear_dirty_log, kvm_dirty_log};
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::{ioctl_iow_nr, ioctl_iowr_nr};

use super::anon::AnonWords;

ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, kvm_bindings::KVMIO, 0xc0, kvm_clear_dirty_log);
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, kvm_bindings::KVMIO, 0x42, kvm_dirty_log);

/// Copies KVM's dirty log of `slot`, whose length is `pages` pages, into
/// the first `ceil(pages / 64)` words of `bitmap` (grown if need be; its
/// allocation is reused, so a sync of a large slot takes no page faults on a
/// fresh buffer) and returns them. Bit i is page i of the slot. Without
/// manual protection this also clears KVM's log and write-protects the
/// pages it reports.
pub(crate) fn get_dirty_log_into<'a>(
    vm: &VmFd,
    slot: u32,
    pages: u64,
    bitmap: &'a mut AnonWords,
) -> std::io::Result<&'a [u64]> {
    let words = usize::try_from(pages.div_ceil(64)).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    if bitmap.len() < words {
        *bitmap = AnonWords::new(words)?;
    }
    get_dirty_log(vm, slot, pages, &mut bitmap[..words])?;
    Ok(&bitmap[..words])
}

/// Copies KVM's dirty log of `slot`, whose length is `pages` pages, into
/// `words`, which must hold exactly `ceil(pages / 64)` words (an error
/// otherwise): bit i is page i of the slot; bits past the last page are 0.
pub(crate) fn get_dirty_log(vm: &VmFd, slot: u32, pages: u64, words: &mut [u64]) -> std::io::Result<()> {
    if words.len() as u64 != pages.div_ceil(64) {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    let mut arg = kvm_dirty_log { slot, ..Default::default() };
    arg.__bindgen_anon_1.dirty_bitmap = words.as_mut_ptr().cast();
    // The kernel writes the slot's log, ceil(npages / 64) words (KVM rounds
    // the bitmap to whole longs), into `words`, which holds exactly that
    // many for a slot of `pages` pages (checked above; the caller passes the
    // length it installed the slot with).
    // SAFETY: `words` is that large (above) and lives for the call.
    let rc = unsafe { ioctl_with_ref(vm, KVM_GET_DIRTY_LOG(), &arg) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Clears (and write-protects again) the pages of `slot` whose bits are set
/// in `bitmap`, which covers `num_pages` pages from `first_page` (a multiple
/// of 64). Requires manual dirty-log protection to be enabled on the VM.
pub(crate) fn clear_dirty_log(
    vm: &VmFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &[u64],
) -> std::io::Result<()> {
    if (bitmap.len() as u64) * 64 < u64::from(num_pages) {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    let mut arg = kvm_clear_dirty_log { slot, num_pages, first_page, ..Default::default() };
    arg.__bindgen_anon_1.dirty_bitmap = bitmap.as_ptr() as *mut libc::c_void;
    // SAFETY: the kernel reads ceil(num_pages / 64) u64 words from
    // `dirty_bitmap`, which points into `bitmap` (checked long enough above)
    // and lives for the call; `arg` is a valid kvm_clear_dirty_log.
    let rc = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
