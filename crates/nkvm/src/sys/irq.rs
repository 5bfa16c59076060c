//! `KVM_INTERRUPT`, which kvm-ioctls lacks.

use std::os::fd::AsRawFd;

use kvm_bindings::kvm_interrupt;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

ioctl_iow_nr!(KVM_INTERRUPT, kvm_bindings::KVMIO, 0x86, kvm_interrupt);

/// Queues an external interrupt (`vector`) on a vCPU: with a split irqchip,
/// the interrupt of an 8259 on LINT0 (ExtINT) or of an APIC-less core.
pub(crate) fn interrupt(vcpu: &impl AsRawFd, vector: u8) -> std::io::Result<()> {
    let arg = kvm_interrupt { irq: u32::from(vector) };
    // SAFETY: KVM reads one kvm_interrupt from `arg`, which lives for the call.
    let rc = unsafe { ioctl_with_ref(vcpu, KVM_INTERRUPT(), &arg) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
