//! `invpcid`: TLB invalidation by process-context identifier.
//!
//! Without INVPCID in the guest's CPUID the instruction raises #UD. With
//! it, the SDM's checks come first — #GP(0) for a type above 3, a
//! descriptor with reserved bits (63:12 of its first quadword) set, a
//! non-canonical address for type 0, or a non-zero PCID for types 0 and 1
//! while CR4.PCIDE is clear — and then nkvm flushes the whole guest TLB
//! (more than types 0 and 1 ask, which the architecture allows) by having
//! KVM reload the MMU context: CR4.PGE toggled through `KVM_SET_SREGS`.

use iced_x86::{Instruction, OpKind};

use super::features::{guest_has, Reg};
use super::guest::{Fault, GuestMemory};
use super::regs::gpr;
use super::{EmulateError, Outcome};
use crate::{Regs, Sregs, Vcpu};

const CR4_PGE: u64 = 1 << 7;
const CR4_PCIDE: u64 = 1 << 17;

/// Completes `invpcid r64, m128`.
pub(super) fn invpcid(
    vcpu: &Vcpu,
    insn: &Instruction,
    regs: &Regs,
    sregs: &Sregs,
    mem: &GuestMemory<'_>,
) -> Result<Outcome, EmulateError> {
    // CPUID.(EAX=7,ECX=0):EBX bit 10.
    if !guest_has(vcpu, 7, 0, Reg::Ebx, 10)? {
        return Ok(Outcome::Vector(6));
    }
    if insn.op0_kind() != OpKind::Register || insn.op1_kind() != OpKind::Memory {
        return Ok(Outcome::Unsupported);
    }
    if mem.cpl > 0 {
        return Ok(Outcome::Fault(Fault::General(0)));
    }
    let (Some(kind), Some(addr)) = (gpr(regs, insn.op0_register()), GuestMemory::operand_address(insn, 1, regs, sregs))
    else {
        return Ok(Outcome::Unsupported);
    };
    let mut desc = [0u8; 16];
    if let Err(fault) = mem.read(addr, &mut desc)? {
        return Ok(Outcome::Fault(fault));
    }
    let first = u64::from_le_bytes(desc[..8].try_into().unwrap_or_default());
    let linear = u64::from_le_bytes(desc[8..].try_into().unwrap_or_default());
    let pcid = first & 0xfff;
    let canonical = ((linear as i64) << 16 >> 16) as u64 == linear;
    let pcide = sregs.cr4 & CR4_PCIDE != 0;
    let bad = kind > 3 || first >> 12 != 0 || (kind == 0 && !canonical) || (kind <= 1 && !pcide && pcid != 0);
    if bad {
        return Ok(Outcome::Fault(Fault::General(0)));
    }
    flush_tlb(vcpu, sregs)?;
    Ok(Outcome::Done)
}

/// Makes KVM drop every guest translation: CR4.PGE toggled and restored.
fn flush_tlb(vcpu: &Vcpu, sregs: &Sregs) -> Result<(), EmulateError> {
    let mut toggled = *sregs;
    toggled.cr4 ^= CR4_PGE;
    vcpu.set_sregs(&toggled)?;
    vcpu.set_sregs(sregs)?;
    Ok(())
}
