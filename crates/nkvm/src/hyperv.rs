//! Hyper-V enlightenments: what KVM can emulate of Microsoft's hypervisor
//! interface (the reference counter and TSC page, SynIC, synthetic timers,
//! hypercalls), for guests written against it (Windows, Linux's Hyper-V
//! code, kvm-unit-tests' `hyperv_*`).
//!
//! KVM turns them on for a vCPU whose CPUID names Hyper-V ("Hv#1" in leaf
//! 0x4000_0001): [`Hypervisor::supported_hv_cpuid`] gives the leaves,
//! [`with_hyperv`] puts them in front of KVM's own, and
//! [`Vcpu::enable_hyperv_synic`] switches on the synthetic interrupt
//! controller (the timers deliver through it).
//!
//! ```no_run
//! let hv = nkvm::Hypervisor::open()?;
//! let vm = nkvm::Vm::new(&hv, &nkvm::VmConfig { split_irqchip: true, ..Default::default() })?;
//! let cpuid = nkvm::hyperv::with_hyperv(&hv.supported_cpuid()?, &hv.supported_hv_cpuid()?);
//! let vcpu = vm.create_vcpu(0)?;
//! vcpu.set_cpuid(&cpuid)?;
//! vcpu.enable_hyperv_synic()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use kvm_bindings::{kvm_enable_cap, KVM_CAP_HYPERV_CPUID, KVM_CAP_HYPERV_SYNIC2, KVM_CAP_SYS_HYPERV_CPUID};

use crate::{Cpuid, Hypervisor, HypervisorError, Vcpu, VcpuError};

/// Where a hypervisor's CPUID leaves start.
const BASE: u32 = 0x4000_0000;
/// Where KVM's own leaves go when Hyper-V's take [`BASE`]: the next block,
/// where KVM and Linux look for the "KVMKVMKVM" signature too.
const KVM_BASE_BEHIND_HYPERV: u32 = 0x4000_0100;

impl Hypervisor {
    /// The Hyper-V CPUID leaves (0x4000_0000..) KVM can emulate on this
    /// host (`KVM_GET_SUPPORTED_HV_CPUID` on `/dev/kvm`).
    pub fn supported_hv_cpuid(&self) -> Result<Cpuid, HypervisorError> {
        let cap = |c: u32| self.kvm.check_extension_raw(c.into()) > 0;
        if !cap(KVM_CAP_SYS_HYPERV_CPUID) {
            let per_vcpu = if cap(KVM_CAP_HYPERV_CPUID) { " (only per vCPU: a kernel older than 5.11)" } else { "" };
            return Err(HypervisorError::NoHyperv(per_vcpu));
        }
        crate::sys::hyperv::supported_hv_cpuid(&self.kvm).map_err(HypervisorError::HvCpuid)
    }
}

impl Vcpu {
    /// Turns on the Hyper-V synthetic interrupt controller (SynIC) of this
    /// vCPU (`KVM_CAP_HYPERV_SYNIC2`: its message and event pages start
    /// zeroed). Needs an in-kernel local APIC (a split irqchip), and a
    /// CPUID from [`with_hyperv`] for the guest to see it.
    pub fn enable_hyperv_synic(&self) -> Result<(), VcpuError> {
        let cap = kvm_enable_cap { cap: KVM_CAP_HYPERV_SYNIC2, ..Default::default() };
        self.fd.enable_cap(&cap).map_err(|source| self.err("KVM_ENABLE_CAP(HYPERV_SYNIC2)", source))
    }
}

/// `base` (a CPUID for the guest) with the Hyper-V leaves `hv` at
/// 0x4000_0000.. and `base`'s own hypervisor leaves (KVM's signature,
/// features, kvmclock) moved to 0x4000_0100.., as QEMU lays them out.
pub fn with_hyperv(base: &Cpuid, hv: &Cpuid) -> Cpuid {
    let is_hypervisor_leaf = |f: u32| (BASE..BASE + 0x100).contains(&f);
    let mut entries: Vec<_> = base.as_slice().iter().filter(|e| !is_hypervisor_leaf(e.function)).copied().collect();
    entries.extend(hv.as_slice().iter().filter(|e| is_hypervisor_leaf(e.function)).copied());
    for e in base.as_slice().iter().filter(|e| is_hypervisor_leaf(e.function)) {
        let mut moved = *e;
        moved.function = e.function - BASE + KVM_BASE_BEHIND_HYPERV;
        if e.function == BASE {
            // EAX: the highest leaf of the block, which moved with it.
            moved.eax = e.eax.saturating_sub(BASE) + KVM_BASE_BEHIND_HYPERV;
        }
        entries.push(moved);
    }
    Cpuid::from_entries(&entries).unwrap_or_else(|_| base.clone())
}

#[cfg(test)]
mod tests {
    use kvm_bindings::kvm_cpuid_entry2;

    use super::*;

    fn entry(function: u32, eax: u32, ebx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, eax, ebx, ..Default::default() }
    }

    #[test]
    fn hyperv_leaves_take_the_base_and_kvms_move_one_block_up() {
        let kvm = u32::from_le_bytes(*b"KVMK");
        let base =
            Cpuid::from_entries(&[entry(1, 0x1, 0), entry(BASE, BASE + 1, kvm), entry(BASE + 1, 0x7f, 0)]).unwrap();
        let hv_sig = u32::from_le_bytes(*b"Hv#1");
        let hv = Cpuid::from_entries(&[entry(BASE, BASE + 0xa, 0x7263694d), entry(BASE + 1, hv_sig, 0)]).unwrap();
        let merged = with_hyperv(&base, &hv);
        let find = |f: u32| merged.as_slice().iter().find(|e| e.function == f).copied().unwrap();
        assert_eq!(find(1).eax, 1);
        assert_eq!((find(BASE).eax, find(BASE).ebx), (BASE + 0xa, 0x7263694d));
        assert_eq!(find(BASE + 1).eax, hv_sig);
        assert_eq!((find(0x4000_0100).eax, find(0x4000_0100).ebx), (0x4000_0101, kvm));
        assert_eq!(find(0x4000_0101).eax, 0x7f);
        assert_eq!(merged.as_slice().len(), 5);
    }
}
