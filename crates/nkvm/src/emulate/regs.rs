//! General-purpose register operands, with x86-64's width rules.

use iced_x86::Register;

use crate::Regs;

/// All ones in the low `width` bits.
pub(super) fn mask(width: u32) -> u64 {
    if width >= 64 {
        u64::MAX
    } else {
        (1u64 << width) - 1
    }
}

/// Bits of a general-purpose register operand.
pub(super) fn width(r: Register) -> Option<u32> {
    if r.is_gpr64() {
        Some(64)
    } else if r.is_gpr32() {
        Some(32)
    } else if r.is_gpr16() {
        Some(16)
    } else if r.is_gpr8() {
        Some(8)
    } else {
        None
    }
}

fn slot(regs: &mut Regs, r: Register) -> Option<&mut u64> {
    Some(match r.full_register() {
        Register::RAX => &mut regs.rax,
        Register::RBX => &mut regs.rbx,
        Register::RCX => &mut regs.rcx,
        Register::RDX => &mut regs.rdx,
        Register::RSI => &mut regs.rsi,
        Register::RDI => &mut regs.rdi,
        Register::RSP => &mut regs.rsp,
        Register::RBP => &mut regs.rbp,
        Register::R8 => &mut regs.r8,
        Register::R9 => &mut regs.r9,
        Register::R10 => &mut regs.r10,
        Register::R11 => &mut regs.r11,
        Register::R12 => &mut regs.r12,
        Register::R13 => &mut regs.r13,
        Register::R14 => &mut regs.r14,
        Register::R15 => &mut regs.r15,
        Register::RIP => &mut regs.rip,
        _ => return None,
    })
}

/// The high-byte registers (AH, CH, DH, BH) live in bits 8..16.
fn high_byte(r: Register) -> bool {
    matches!(r, Register::AH | Register::CH | Register::DH | Register::BH)
}

/// The value of a general-purpose register operand, zero-extended.
pub(super) fn gpr(regs: &Regs, r: Register) -> Option<u64> {
    let mut copy = *regs;
    let full = *slot(&mut copy, r)?;
    let w = width(r).unwrap_or(64);
    Some(if high_byte(r) { (full >> 8) & 0xff } else { full & mask(w) })
}

/// Writes `value` to a register operand with x86-64 semantics: 32-bit
/// writes zero the upper half, 16- and 8-bit writes keep the rest.
pub(super) fn set_gpr(regs: &mut Regs, r: Register, value: u64) {
    let w = width(r).unwrap_or(64);
    let high = high_byte(r);
    if let Some(v) = slot(regs, r) {
        *v = match w {
            64 => value,
            32 => value & 0xffff_ffff,
            8 if high => (*v & !0xff00) | ((value & 0xff) << 8),
            _ => (*v & !mask(w)) | (value & mask(w)),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_writes_follow_x86_64_width_rules() {
        let mut regs = Regs { rax: u64::MAX, rbx: u64::MAX, rcx: u64::MAX, ..Default::default() };
        set_gpr(&mut regs, Register::EAX, 5);
        assert_eq!(regs.rax, 5);
        set_gpr(&mut regs, Register::BX, 7);
        assert_eq!(regs.rbx, 0xffff_ffff_ffff_0007);
        set_gpr(&mut regs, Register::CH, 0x12);
        assert_eq!(regs.rcx, 0xffff_ffff_ffff_12ff);
        assert_eq!(gpr(&regs, Register::CH), Some(0x12));
        assert_eq!(gpr(&regs, Register::CL), Some(0xff));
        assert_eq!(gpr(&regs, Register::R15), Some(0));
        assert_eq!(width(Register::XMM0), None);
    }
}
