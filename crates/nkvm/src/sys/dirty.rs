//! `KVM_CLEAR_DIRTY_LOG`, which kvm-ioctls lacks.

use kvm_bindings::kvm_clear_dirty_log;
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iowr_nr;

ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, kvm_bindings::KVMIO, 0xc0, kvm_clear_dirty_log);

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
