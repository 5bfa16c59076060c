//! `KVM_GET_SUPPORTED_HV_CPUID`, which kvm-ioctls does not wrap.

use std::os::fd::AsRawFd;

use kvm_bindings::{kvm_cpuid2, CpuId, KVMIO, KVM_MAX_CPUID_ENTRIES};
use vmm_sys_util::ioctl::ioctl_with_mut_ptr;
use vmm_sys_util::ioctl_iowr_nr;

ioctl_iowr_nr!(KVM_GET_SUPPORTED_HV_CPUID, KVMIO, 0xc1, kvm_cpuid2);

/// The Hyper-V CPUID leaves KVM can emulate, from the system fd (with
/// `KVM_CAP_SYS_HYPERV_CPUID`) or a vCPU fd (`KVM_CAP_HYPERV_CPUID`).
pub(crate) fn supported_hv_cpuid(fd: &impl AsRawFd) -> Result<CpuId, kvm_ioctls::Error> {
    let mut cpuid = CpuId::new(KVM_MAX_CPUID_ENTRIES).map_err(|_| kvm_ioctls::Error::new(libc::ENOMEM))?;
    // SAFETY: the argument is a `kvm_cpuid2` header followed by room for `nent` (KVM_MAX_CPUID_ENTRIES)
    // entries, all owned by `cpuid`; the kernel writes at most `nent` entries and updates `nent`, which
    // the wrapper reads back as its length.
    let ret = unsafe { ioctl_with_mut_ptr(fd, KVM_GET_SUPPORTED_HV_CPUID(), cpuid.as_mut_fam_struct_ptr()) };
    if ret != 0 {
        return Err(kvm_ioctls::Error::last());
    }
    Ok(cpuid)
}
