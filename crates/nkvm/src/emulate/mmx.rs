//! MMX moves: `movd`/`movq` between MMX registers, general registers and
//! memory (which may be device memory).
//!
//! MMX register *i* is x87 physical register R*i*; the XSAVE image holds
//! the stack in ST order (ST(*j*) = R((TOP + *j*) mod 8)) from byte 32. The
//! state goes through `KVM_GET/SET_XSAVE` (x87 bit set in XSTATE_BV),
//! because this host's `KVM_SET_FPU` drops the data registers. An MMX
//! instruction leaves TOP = 0 and every tag valid, and a register it writes
//! gets exponent bits all ones, as the CPU does. The checks come first:
//! CR0.EM → #UD, CR0.TS → #NM, a pending x87 exception (FSW.ES) → #MF.

use iced_x86::{Instruction, OpKind, Register};

use super::guest::GuestMemory;
use super::regs::{gpr, set_gpr, width};
use super::{EmulateError, Outcome};
use crate::{Regs, Sregs, Vcpu};

const CR0_EM: u64 = 1 << 2;
const CR0_TS: u64 = 1 << 3;
const FSW_ES: u16 = 1 << 7;
const FSW_TOP: u16 = 7 << 11;
/// Offsets in the XSAVE image: FSW, the abridged tag word, the registers,
/// the XSTATE_BV byte and its x87 bit.
const FSW: usize = 2;
const FTW: usize = 4;
const ST_SPACE: usize = 32;
const XSTATE_BV: usize = 512;
const XSTATE_X87: u8 = 1;

/// The MMX register number of `r`, if it is one.
fn mm(r: Register) -> Option<usize> {
    let n = (r as u32).checked_sub(Register::MM0 as u32)?;
    (n < 8).then_some(n as usize)
}

/// Whether `insn` is a `movd`/`movq` with an MMX register operand.
pub(super) fn is_mmx_move(insn: &Instruction) -> bool {
    (0..insn.op_count()).any(|i| insn.op_kind(i) == OpKind::Register && mm(insn.op_register(i)).is_some())
}

/// Completes `emms`: every x87 tag empty (after the same checks).
pub(super) fn emms(vcpu: &Vcpu, sregs: &Sregs) -> Result<Outcome, EmulateError> {
    let mut image = match mmx_state(vcpu, sregs)? {
        Ok(image) => image,
        Err(outcome) => return Ok(outcome),
    };
    image[FTW] = 0;
    image[XSTATE_BV] |= XSTATE_X87;
    vcpu.set_xsave(&image)?;
    Ok(Outcome::Done)
}

/// The XSAVE image for an MMX instruction, or the exception it raises
/// first: CR0.EM → #UD, CR0.TS → #NM, a pending x87 exception → #MF.
fn mmx_state(vcpu: &Vcpu, sregs: &Sregs) -> Result<Result<Vec<u8>, Outcome>, EmulateError> {
    if sregs.cr0 & CR0_EM != 0 {
        return Ok(Err(Outcome::Vector(6)));
    }
    if sregs.cr0 & CR0_TS != 0 {
        return Ok(Err(Outcome::Vector(7)));
    }
    let image = vcpu.xsave()?;
    if image.len() < XSTATE_BV + 8 {
        return Ok(Err(Outcome::Unsupported));
    }
    if u16::from_le_bytes([image[FSW], image[FSW + 1]]) & FSW_ES != 0 {
        return Ok(Err(Outcome::Vector(16)));
    }
    Ok(Ok(image))
}

/// Completes a `movd`/`movq` with an MMX operand.
pub(super) fn complete(
    vcpu: &Vcpu,
    insn: &Instruction,
    regs: &mut Regs,
    sregs: &Sregs,
    mem: &GuestMemory<'_>,
) -> Result<Outcome, EmulateError> {
    let mut image = match mmx_state(vcpu, sregs)? {
        Ok(image) => image,
        Err(outcome) => return Ok(outcome),
    };
    let fsw = u16::from_le_bytes([image[FSW], image[FSW + 1]]);
    let top = usize::from((fsw & FSW_TOP) >> 11);
    // Physical registers R0..R7 from the ST-ordered array.
    let mut phys = [[0u8; 16]; 8];
    for (st, slot) in image[ST_SPACE..ST_SPACE + 128].chunks(16).enumerate() {
        phys[(top + st) % 8].copy_from_slice(slot);
    }
    let bytes = if insn.mnemonic() == iced_x86::Mnemonic::Movd { 4 } else { 8 };
    // The source value.
    let value = match insn.op1_kind() {
        OpKind::Register => match mm(insn.op1_register()) {
            Some(i) => u64::from_le_bytes(phys[i][..8].try_into().unwrap_or_default()),
            None => match (gpr(regs, insn.op1_register()), width(insn.op1_register())) {
                (Some(v), Some(_)) => v,
                _ => return Ok(Outcome::Unsupported),
            },
        },
        OpKind::Memory => {
            let Some(addr) = GuestMemory::operand_address(insn, 1, regs, sregs) else {
                return Ok(Outcome::Unsupported);
            };
            let mut buf = [0u8; 8];
            if let Err(fault) = mem.read(addr, &mut buf[..bytes])? {
                return Ok(Outcome::Fault(fault));
            }
            u64::from_le_bytes(buf)
        }
        _ => return Ok(Outcome::Unsupported),
    };
    let value = if bytes == 4 { value & 0xffff_ffff } else { value };
    // The destination.
    match insn.op0_kind() {
        OpKind::Register => match mm(insn.op0_register()) {
            Some(i) => {
                phys[i][..8].copy_from_slice(&value.to_le_bytes());
                phys[i][8] = 0xff;
                phys[i][9] = 0xff;
            }
            None if width(insn.op0_register()).is_some() => set_gpr(regs, insn.op0_register(), value),
            None => return Ok(Outcome::Unsupported),
        },
        OpKind::Memory => {
            let Some(addr) = GuestMemory::operand_address(insn, 0, regs, sregs) else {
                return Ok(Outcome::Unsupported);
            };
            if let Err(fault) = mem.write(addr, &value.to_le_bytes()[..bytes])? {
                return Ok(Outcome::Fault(fault));
            }
        }
        _ => return Ok(Outcome::Unsupported),
    }
    // MMX state: TOP = 0 (so ST(i) = R(i)), every tag valid.
    image[FSW..FSW + 2].copy_from_slice(&(fsw & !FSW_TOP).to_le_bytes());
    image[FTW] = 0xff;
    for (i, reg) in phys.iter().enumerate() {
        image[ST_SPACE + 16 * i..ST_SPACE + 16 * (i + 1)].copy_from_slice(reg);
    }
    image[XSTATE_BV] |= XSTATE_X87;
    vcpu.set_xsave(&image)?;
    Ok(Outcome::Done)
}
