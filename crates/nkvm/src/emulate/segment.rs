//! `verr` / `verw`: whether the segment a selector names could be read or
//! written from the current privilege level, as ZF.
//!
//! A stock Linux kernel runs `verw` before `hlt` and on every return to
//! user space on CPUs with the MDS-class bugs (Intel's MMIO stale data
//! among them): on those parts the instruction also clears the CPU's
//! buffers, which is the host's business and nothing a guest can see, so
//! completing it here is the flag alone.

use iced_x86::{Instruction, Mnemonic, OpKind};

use super::guest::GuestMemory;
use super::regs::gpr;
use super::{EmulateError, Outcome};
use crate::{Regs, Sregs};

const ZF: u64 = 1 << 6;
/// RFLAGS.VM: virtual-8086 mode.
const VM: u64 = 1 << 17;

/// Completes `verr r/m16` or `verw r/m16`: #UD in real and virtual-8086
/// mode (as the CPU raises), else ZF as the descriptor says.
pub(super) fn verify(
    insn: &Instruction,
    regs: &mut Regs,
    sregs: &Sregs,
    mem: &GuestMemory<'_>,
) -> Result<Outcome, EmulateError> {
    if sregs.cr0 & 1 == 0 || regs.rflags & VM != 0 {
        return Ok(Outcome::Vector(6));
    }
    let selector = match insn.op0_kind() {
        OpKind::Register => match gpr(regs, insn.op0_register()) {
            Some(v) => v as u16,
            None => return Ok(Outcome::Unsupported),
        },
        OpKind::Memory => {
            let Some(addr) = GuestMemory::operand_address(insn, 0, regs, sregs) else {
                return Ok(Outcome::Unsupported);
            };
            let mut bytes = [0u8; 2];
            if let Err(fault) = mem.read(addr, &mut bytes)? {
                return Ok(Outcome::Fault(fault));
            }
            u16::from_le_bytes(bytes)
        }
        _ => return Ok(Outcome::Unsupported),
    };
    let descriptor = match descriptor(selector, sregs, mem)? {
        Ok(d) => d,
        Err(outcome) => return Ok(outcome),
    };
    let ok = descriptor.is_some_and(|d| allows(d, selector, mem.cpl, insn.mnemonic() == Mnemonic::Verw));
    regs.rflags = if ok { regs.rflags | ZF } else { regs.rflags & !ZF };
    Ok(Outcome::Done)
}

/// The 8-byte descriptor `selector` names in the GDT or LDT; `None` for a
/// null selector or one past its table's limit (ZF clear, no fault).
fn descriptor(
    selector: u16,
    sregs: &Sregs,
    mem: &GuestMemory<'_>,
) -> Result<Result<Option<u64>, Outcome>, EmulateError> {
    let index = u64::from(selector & !7);
    let (base, limit) = if selector & 4 != 0 {
        if sregs.ldt.unusable != 0 || sregs.ldt.present == 0 {
            return Ok(Ok(None));
        }
        (sregs.ldt.base, u64::from(sregs.ldt.limit))
    } else {
        if index == 0 {
            return Ok(Ok(None));
        }
        (sregs.gdt.base, u64::from(sregs.gdt.limit))
    };
    if index + 7 > limit {
        return Ok(Ok(None));
    }
    let mut bytes = [0u8; 8];
    // The table is read as the CPU does, with supervisor rights (an
    // implicit access: RFLAGS.AC does not lift SMAP for it).
    let table = GuestMemory { cpl: 0, paging: mem.paging.implicit(), ..*mem };
    Ok(match table.read(base.wrapping_add(index), &mut bytes)? {
        Ok(()) => Ok(Some(u64::from_le_bytes(bytes))),
        Err(fault) => Err(Outcome::Fault(fault)),
    })
}

/// Whether a `verw` (`write`) or `verr` at `cpl` passes for `descriptor`:
/// a code or data segment (not a system one) whose DPL is at least CPL
/// and the selector's RPL (conforming code segments are exempt, for
/// `verr`), writable data for `verw`, readable data or code for `verr`.
fn allows(descriptor: u64, selector: u16, cpl: u8, write: bool) -> bool {
    let kind = (descriptor >> 40) & 0xf;
    let code_or_data = descriptor & (1 << 44) != 0;
    let dpl = ((descriptor >> 45) & 3) as u8;
    let rpl = (selector & 3) as u8;
    let code = kind & 0b1000 != 0;
    let conforming = code && kind & 0b0100 != 0;
    if !code_or_data || (!conforming && (cpl > dpl || rpl > dpl)) {
        return false;
    }
    // Bit 1 of the type: writable for data, readable for code.
    match (write, code) {
        (true, code) => !code && kind & 0b0010 != 0,
        (false, true) => kind & 0b0010 != 0,
        (false, false) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flat descriptor of `kind` (type bits) at `dpl`, code/data, present.
    fn flat(kind: u64, dpl: u64) -> u64 {
        0x00cf_0000_0000_ffff | (kind << 40) | (1 << 44) | (dpl << 45) | (1 << 47)
    }

    #[test]
    fn verw_passes_writable_data_at_or_above_the_privilege_level_only() {
        let data_rw = flat(0b0011, 0);
        assert!(allows(data_rw, 0x18, 0, true), "the kernel's own data segment");
        assert!(!allows(data_rw, 0x18, 3, true), "DPL 0 from CPL 3");
        assert!(!allows(data_rw, 0x1b, 0, true), "RPL 3 above DPL 0");
        assert!(allows(flat(0b0011, 3), 0x2b, 3, true), "user data from user mode");
        assert!(!allows(flat(0b0001, 0), 0x18, 0, true), "read-only data");
        assert!(!allows(flat(0b1011, 0), 0x10, 0, true), "code is never writable");
        assert!(!allows(flat(0b0011, 0) & !(1 << 44), 0x18, 0, true), "a system segment");
    }

    #[test]
    fn verr_passes_readable_code_and_any_data_and_skips_the_check_for_conforming_code() {
        assert!(allows(flat(0b1010, 0), 0x10, 0, false), "readable code");
        assert!(!allows(flat(0b1000, 0), 0x10, 0, false), "execute-only code");
        assert!(allows(flat(0b0001, 0), 0x18, 0, false), "read-only data");
        assert!(allows(flat(0b1110, 0), 0x13, 3, false), "conforming readable code, any level");
        assert!(!allows(flat(0b1010, 0), 0x13, 3, false), "non-conforming code from CPL 3");
    }
}
