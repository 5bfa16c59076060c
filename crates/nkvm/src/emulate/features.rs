//! What the guest's CPUID offers, for instructions that raise #UD when it
//! does not.

use super::EmulateError;
use crate::Vcpu;

/// A CPUID register.
#[derive(Debug, Clone, Copy)]
pub(super) enum Reg {
    Ebx,
}

/// Whether the vCPU's CPUID leaf `function`.`index` has `bit` set in `reg`.
pub(super) fn guest_has(vcpu: &Vcpu, function: u32, index: u32, reg: Reg, bit: u32) -> Result<bool, EmulateError> {
    let cpuid = vcpu.cpuid()?;
    Ok(cpuid.as_slice().iter().any(|e| {
        let word = match reg {
            Reg::Ebx => e.ebx,
        };
        e.function == function && e.index == index && word & (1 << bit) != 0
    }))
}
