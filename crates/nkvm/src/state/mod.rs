//! Saved state: everything KVM holds for a vCPU ([`VcpuState`]) and a VM
//! ([`VmState`]) as plain values, and their versioned byte encoding
//! (`docs/state-format.md`).
//!
//! ## Save, encode, decode, restore
//!
//! ```no_run
//! use nkvm::state::{VcpuState, VmState};
//! use nkvm::{GuestAddress, Hypervisor, RunState, Vm, VmConfig};
//!
//! let hv = Hypervisor::open()?;
//! let vm = Vm::new(&hv, &VmConfig::default())?;
//! let mut vcpu = vm.create_vcpu(0)?;
//! let mut run = RunState::new();
//! // ... set the vCPU up, enter_guest a while; then, on the vCPU's thread:
//! let vcpu_blob = vcpu.save_state(&mut run)?.encode();
//! let vm_blob = vm.save_state()?.encode();
//! let mut ram = vec![0u8; vm.config().memory as usize];
//! vm.read_memory(GuestAddress(0), &mut ram)?;
//!
//! // Later, or in another process: the same machine again.
//! let vm_state = VmState::decode(&vm_blob)?;
//! let vm2 = Vm::new(&hv, &vm_state.config())?;
//! vm2.write_memory(GuestAddress(0), &ram)?;
//! vm2.restore_state(&vm_state)?;
//! let mut vcpu2 = vm2.create_vcpu(0)?;
//! vcpu2.restore_state(&VcpuState::decode(&vcpu_blob)?)?;
//! // vcpu2.enter_guest(..) continues exactly where vcpu stopped.
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Decoding validates every byte: a truncated, altered, foreign or
//! newer-format blob is a [`FormatError`] that names the section and the
//! offset, never a panic.

mod codec;
mod cpuid_check;
mod fields;
mod vcpu;
mod vm;

pub use codec::{FormatError, StateKind, FORMAT_VERSION, MAGIC};
pub(crate) use cpuid_check::HostCpuid;
pub use cpuid_check::{CpuidRegister, MissingFeature};
pub use vcpu::{Msr, PendingLint, VcpuState, LAPIC_BYTES, XSAVE_WORDS};
pub use vm::VmState;

use crate::{Exit, Hypervisor, VcpuError, VmError};

/// Why saving or restoring state failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A vCPU ioctl failed (the error names which).
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A VM ioctl failed (the error names which).
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A level-triggered interrupt the saved local APIC holds could not be
    /// given the route KVM needs to report its EOI.
    #[error("vCPU {id}: cannot route the EOI of level-triggered vector {vector:#x}, which the saved local APIC holds")]
    EoiRoute {
        /// The vCPU.
        id: u32,
        /// The vector.
        vector: u8,
        /// What failed.
        #[source]
        source: crate::irq::IrqError,
    },
    /// The state belongs to another vCPU.
    #[error("the state is vCPU {state}'s, it cannot be restored into vCPU {vcpu}: create vCPU {state} for it")]
    VcpuIdMismatch {
        /// The id in the state.
        state: u32,
        /// The vCPU restored into.
        vcpu: u32,
    },
    /// KVM refused to take a saved MSR back.
    #[error("vCPU {id}: KVM refused MSR {index:#x} = {value:#x} ({accepted} of {total} MSRs restored)")]
    MsrRejected {
        /// vCPU id.
        id: u32,
        /// The MSR.
        index: u32,
        /// Its saved value.
        value: u64,
        /// MSRs restored before it.
        accepted: usize,
        /// MSRs in the state.
        total: usize,
    },
    /// More CPUID entries than KVM takes.
    #[error("vCPU {id}: the state has {count} CPUID entries, more than KVM takes")]
    TooManyCpuidEntries {
        /// vCPU id.
        id: u32,
        /// Entries in the state.
        count: usize,
    },
    /// The saved CPUID gives the guest CPU features this host's KVM cannot
    /// offer ([`Vcpu::check_cpu_features`](crate::Vcpu::check_cpu_features)):
    /// the guest would fault at their first use. Nothing was written to the
    /// vCPU.
    #[error(
        "vCPU {id}: the saved guest was given CPU features this host's KVM cannot offer: {}; \
         restore on a host whose CPU and KVM offer them, or save from a guest given fewer features",
        cpuid_check::FeatureList(.missing)
    )]
    CpuFeatures {
        /// vCPU id.
        id: u32,
        /// The features, in CPUID order.
        missing: Vec<MissingFeature>,
    },
    /// The VM was not created from the state's configuration.
    #[error("the state is of a VM with {what} = {state}, this VM has {vm}: create it from VmState::config()")]
    ConfigMismatch {
        /// Which setting.
        what: &'static str,
        /// The state's value.
        state: u64,
        /// This VM's value.
        vm: u64,
    },
    /// Finishing the last exit led to another exit, which the caller must
    /// handle before saving (a string I/O instruction's next element).
    #[error("vCPU {id}: completing the last exit led to another ({exit}); handle it, then save again")]
    NotSettled {
        /// vCPU id.
        id: u32,
        /// The new exit.
        exit: Exit,
    },
    /// The saved TSC frequency cannot be set on this host (KVM needs TSC
    /// scaling in hardware to run a guest's TSC at another rate than the
    /// host's).
    #[error(
        "vCPU {id}: the state's TSC runs at {khz} kHz, and this host's KVM cannot set that rate (no TSC scaling?); \
         restore on a host with the same TSC frequency or with TSC scaling"
    )]
    TscRate {
        /// vCPU id.
        id: u32,
        /// The saved frequency.
        khz: u32,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

impl Hypervisor {
    /// The MSRs KVM can save and restore (`KVM_GET_MSR_INDEX_LIST`): the
    /// TSC, kvmclock, `syscall`/`sysenter`, PAT, ... A vCPU's
    /// [`save_state`](crate::Vcpu::save_state) reads each of them.
    pub fn saveable_msrs(&self) -> Result<Vec<u32>, kvm_ioctls::Error> {
        Ok(self.kvm.get_msr_index_list()?.as_slice().to_vec())
    }
}

#[cfg(test)]
mod tests;
