//! Installing guest memory slots.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;

/// Installs (or, with `memory_size == 0`, deletes) one KVM memory slot.
///
/// # Safety
///
/// `userspace_addr..userspace_addr+memory_size` must be a live mapping that
/// stays mapped for as long as the slot is installed: the kernel reads and
/// writes it on behalf of the guest.
pub(crate) unsafe fn set_user_memory_region(
    vm: &VmFd,
    region: kvm_userspace_memory_region,
) -> Result<(), kvm_ioctls::Error> {
    // SAFETY: the caller guarantees the host range outlives the slot.
    unsafe { vm.set_user_memory_region(region) }
}
