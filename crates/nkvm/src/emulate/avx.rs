//! AVX register moves: `vzeroall`, `vzeroupper`, and the whole-register
//! moves `vmovdqa`/`vmovdqu`/`vmovaps`/`vmovups`/`vmovapd`/`vmovupd`/
//! `vmovntdq`/`vmovntdqa` between XMM/YMM registers and memory (which may
//! be device memory).
//!
//! YMM register *i* is XMM *i* (the XSAVE legacy area, byte 160 + 16*i*)
//! and its upper half (the YMM_Hi128 component, byte 576 + 16*i* of the
//! standard-format image); the state goes through `KVM_GET/SET_XSAVE`. A
//! VEX.128 write zeroes the upper half, as the CPU does. A component whose
//! XSTATE_BV bit is clear is in its initial state (zeros). The checks come
//! first: CR4.OSXSAVE clear or XCR0 without SSE|AVX → #UD, CR0.TS → #NM;
//! an aligned move (`vmova*`, `vmovnt*`) of a misaligned address → #GP(0).

use iced_x86::{EncodingKind, Instruction, Mnemonic, OpKind, Register};

use super::guest::{Fault, GuestMemory};
use super::{EmulateError, Outcome};
use crate::{Regs, Sregs, Vcpu};

const CR0_TS: u64 = 1 << 3;
const CR4_OSXSAVE: u64 = 1 << 18;
/// XCR0 bits AVX needs: SSE and AVX (YMM_Hi128).
const XCR0_SSE_AVX: u64 = 0b110;
/// Offsets in the standard-format XSAVE image.
const XMM_SPACE: usize = 160;
const YMM_HI: usize = 576;
const XSTATE_BV: usize = 512;
const XSTATE_SSE: u8 = 1 << 1;
const XSTATE_AVX: u8 = 1 << 2;

/// Whether `insn` is an AVX instruction this module completes: VEX-encoded
/// only. The EVEX (AVX-512) forms of the same mnemonics can carry an
/// opmask, zeroing or broadcast, which a plain move would get wrong: they
/// are left unsupported (an error naming them, not a wrong result).
pub(super) fn handles(insn: &Instruction) -> bool {
    if insn.encoding() != EncodingKind::VEX {
        return false;
    }
    match insn.mnemonic() {
        Mnemonic::Vzeroall | Mnemonic::Vzeroupper => true,
        Mnemonic::Vmovdqa
        | Mnemonic::Vmovdqu
        | Mnemonic::Vmovaps
        | Mnemonic::Vmovups
        | Mnemonic::Vmovapd
        | Mnemonic::Vmovupd
        | Mnemonic::Vmovntdq
        | Mnemonic::Vmovntdqa => (0..insn.op_count()).any(|i| vector_reg(insn, i).is_some()),
        _ => false,
    }
}

/// The register number and width in bytes (16 or 32) of operand `op`, if
/// it is an XMM or YMM register.
fn vector_reg(insn: &Instruction, op: u32) -> Option<(usize, usize)> {
    if insn.op_kind(op) != OpKind::Register {
        return None;
    }
    let r = insn.op_register(op);
    let n = |base: Register| (r as u32).checked_sub(base as u32).filter(|n| *n < 16).map(|n| n as usize);
    n(Register::YMM0).map(|i| (i, 32)).or_else(|| n(Register::XMM0).map(|i| (i, 16)))
}

/// Completes `insn` (see [`handles`]).
pub(super) fn complete(
    vcpu: &Vcpu,
    insn: &Instruction,
    regs: &Regs,
    sregs: &Sregs,
    mem: &GuestMemory<'_>,
) -> Result<Outcome, EmulateError> {
    if sregs.cr4 & CR4_OSXSAVE == 0 || vcpu.xcr0()? & XCR0_SSE_AVX != XCR0_SSE_AVX {
        return Ok(Outcome::Vector(6));
    }
    if sregs.cr0 & CR0_TS != 0 {
        return Ok(Outcome::Vector(7));
    }
    let mut image = vcpu.xsave()?;
    if image.len() < YMM_HI + 256 {
        return Ok(Outcome::Unsupported);
    }
    // Components in their initial state read as zeros.
    if image[XSTATE_BV] & XSTATE_SSE == 0 {
        image[XMM_SPACE..XMM_SPACE + 256].fill(0);
    }
    if image[XSTATE_BV] & XSTATE_AVX == 0 {
        image[YMM_HI..YMM_HI + 256].fill(0);
    }
    match insn.mnemonic() {
        Mnemonic::Vzeroall => {
            image[XMM_SPACE..XMM_SPACE + 256].fill(0);
            image[YMM_HI..YMM_HI + 256].fill(0);
        }
        Mnemonic::Vzeroupper => image[YMM_HI..YMM_HI + 256].fill(0),
        _ => {
            if let Err(outcome) = mov(&mut image, insn, regs, sregs, mem)? {
                return Ok(outcome);
            }
            // A store leaves the registers as they were.
            if insn.op0_kind() != OpKind::Register {
                return Ok(Outcome::Done);
            }
        }
    }
    image[XSTATE_BV] |= XSTATE_SSE | XSTATE_AVX;
    vcpu.set_xsave(&image)?;
    Ok(Outcome::Done)
}

/// A whole-register move into or out of `image`; `Err` is the exception.
fn mov(
    image: &mut [u8],
    insn: &Instruction,
    regs: &Regs,
    sregs: &Sregs,
    mem: &GuestMemory<'_>,
) -> Result<Result<(), Outcome>, EmulateError> {
    let Some((_, len)) = vector_reg(insn, 0).or_else(|| vector_reg(insn, 1)) else {
        return Ok(Err(Outcome::Unsupported));
    };
    let aligned = matches!(
        insn.mnemonic(),
        Mnemonic::Vmovdqa | Mnemonic::Vmovaps | Mnemonic::Vmovapd | Mnemonic::Vmovntdq | Mnemonic::Vmovntdqa
    );
    let mut value = [0u8; 32];
    match insn.op1_kind() {
        OpKind::Register => match vector_reg(insn, 1) {
            Some((i, _)) => read_reg(image, i, &mut value[..len]),
            None => return Ok(Err(Outcome::Unsupported)),
        },
        OpKind::Memory => {
            let Some(addr) = GuestMemory::operand_address(insn, 1, regs, sregs) else {
                return Ok(Err(Outcome::Unsupported));
            };
            if aligned && addr % len as u64 != 0 {
                return Ok(Err(Outcome::Fault(Fault::General(0))));
            }
            if let Err(fault) = mem.read(addr, &mut value[..len])? {
                return Ok(Err(Outcome::Fault(fault)));
            }
        }
        _ => return Ok(Err(Outcome::Unsupported)),
    }
    match insn.op0_kind() {
        OpKind::Register => match vector_reg(insn, 0) {
            // VEX.128 zeroes bits 255:128 of the destination.
            Some((i, _)) => write_reg(image, i, &value),
            None => return Ok(Err(Outcome::Unsupported)),
        },
        OpKind::Memory => {
            let Some(addr) = GuestMemory::operand_address(insn, 0, regs, sregs) else {
                return Ok(Err(Outcome::Unsupported));
            };
            if aligned && addr % len as u64 != 0 {
                return Ok(Err(Outcome::Fault(Fault::General(0))));
            }
            if let Err(fault) = mem.write(addr, &value[..len])? {
                return Ok(Err(Outcome::Fault(fault)));
            }
        }
        _ => return Ok(Err(Outcome::Unsupported)),
    }
    Ok(Ok(()))
}

/// Register `i`'s low `out.len()` bytes (16: XMM, 32: YMM).
fn read_reg(image: &[u8], i: usize, out: &mut [u8]) {
    out[..16].copy_from_slice(&image[XMM_SPACE + 16 * i..XMM_SPACE + 16 * (i + 1)]);
    if out.len() == 32 {
        out[16..].copy_from_slice(&image[YMM_HI + 16 * i..YMM_HI + 16 * (i + 1)]);
    }
}

/// Writes all 256 bits of register `i`.
fn write_reg(image: &mut [u8], i: usize, value: &[u8; 32]) {
    image[XMM_SPACE + 16 * i..XMM_SPACE + 16 * (i + 1)].copy_from_slice(&value[..16]);
    image[YMM_HI + 16 * i..YMM_HI + 16 * (i + 1)].copy_from_slice(&value[16..]);
}
