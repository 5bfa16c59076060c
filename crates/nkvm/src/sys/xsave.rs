//! `KVM_SET_XSAVE`, whose kvm-ioctls wrapper is `unsafe` because the
//! kernel may read past 4 KiB when dynamically enabled XSTATE features
//! (AMX) are on; nkvm never enables them.

use kvm_bindings::kvm_xsave;
use kvm_ioctls::VcpuFd;

/// Writes back an XSAVE image read from the same vCPU with `KVM_GET_XSAVE`.
pub(crate) fn set_xsave(fd: &VcpuFd, xsave: &kvm_xsave) -> Result<(), kvm_ioctls::Error> {
    // SAFETY: `xsave` is a full 4096-byte `kvm_xsave`; nkvm never enables dynamic XSTATE features
    // (ARCH_REQ_XCOMP_GUEST_PERM), so the kernel reads at most 4096 bytes, nothing past the struct.
    unsafe { fd.set_xsave(xsave) }
}
