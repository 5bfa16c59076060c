//! Completing in user space what KVM could not emulate.
//!
//! On some hosts (nested KVM through `kvm_pvm` among them) instructions
//! such as `int3` come back from `KVM_RUN` as an emulation failure
//! ([`Exit::InternalError`](crate::Exit::InternalError), suberror 1) with
//! their bytes. [`complete`] decodes the instruction (iced-x86) and either
//! performs it or injects the exception the CPU would have raised, so the
//! vCPU can simply enter the guest again; anything it cannot handle is an
//! error naming the instruction and its address.
//!
//! | instruction | what nkvm does |
//! |---|---|
//! | `int3` | injects #BP (vector 3) with RIP after the `int3`, as the trap the CPU raises |
//! | `wait`/`fwait` | #MF if the x87 status word has an unmasked exception pending (ES), else nothing; RIP advanced |
//! | `popcnt r, r` | computes it, sets ZF (other arithmetic flags cleared), advances RIP |
//! | anything else | [`EmulateError::Unsupported`] |

use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, Mnemonic, NasmFormatter, OpKind, Register};

use crate::{InternalError, Vcpu, VcpuError};

/// What [`complete`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Emulated {
    /// The instruction was performed in user space.
    Completed {
        /// The instruction, as text.
        instruction: String,
    },
    /// An exception was injected (the guest's handler runs next).
    Injected {
        /// The vector.
        vector: u8,
        /// The instruction, as text.
        instruction: String,
    },
}

/// Why an emulation failure could not be completed.
#[derive(Debug, thiserror::Error)]
pub enum EmulateError {
    /// The exit is not an emulation failure, or carries no instruction bytes.
    #[error("not an emulation failure with instruction bytes: {0}")]
    NoInstruction(String),
    /// nkvm does not handle this instruction.
    #[error("cannot emulate `{instruction}` at rip {rip:#x} (bytes {bytes})")]
    Unsupported {
        /// Where.
        rip: u64,
        /// The instruction, as text.
        instruction: String,
        /// Its bytes, hex.
        bytes: String,
    },
    /// Reading or writing vCPU state failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
}

/// Decodes the 64-bit instruction in `bytes` at `rip`.
pub fn decode(bytes: &[u8], rip: u64) -> Option<(Instruction, String)> {
    let mut decoder = Decoder::with_ip(64, bytes, rip, DecoderOptions::NONE);
    let insn = decoder.decode();
    if insn.is_invalid() {
        return None;
    }
    let mut text = String::new();
    NasmFormatter::new().format(&insn, &mut text);
    Some((insn, text))
}

/// Completes the instruction of an emulation failure on `vcpu`, so that the
/// next `enter_guest` continues the guest.
pub fn complete(vcpu: &Vcpu, failure: &InternalError) -> Result<Emulated, EmulateError> {
    if !failure.is_emulation_failure() || failure.instruction().is_empty() {
        return Err(EmulateError::NoInstruction(failure.to_string()));
    }
    let mut regs = vcpu.regs()?;
    let bytes = failure.instruction();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let Some((insn, text)) = decode(bytes, regs.rip) else {
        return Err(EmulateError::Unsupported { rip: regs.rip, instruction: "(invalid)".into(), bytes: hex });
    };
    match insn.mnemonic() {
        Mnemonic::Int3 => {
            // A trap: the saved RIP is the next instruction.
            regs.rip = insn.next_ip();
            vcpu.set_regs(&regs)?;
            inject(vcpu, 3)?;
            Ok(Emulated::Injected { vector: 3, instruction: text })
        }
        Mnemonic::Wait => {
            regs.rip = insn.next_ip();
            vcpu.set_regs(&regs)?;
            let fsw = vcpu.fpu()?.fsw;
            if fsw & 0x80 != 0 {
                inject(vcpu, 16)?;
                return Ok(Emulated::Injected { vector: 16, instruction: text });
            }
            Ok(Emulated::Completed { instruction: text })
        }
        Mnemonic::Popcnt if insn.op1_kind() == OpKind::Register => {
            let (Some(src), Some(width)) = (gpr(&regs, insn.op1_register()), width(insn.op0_register())) else {
                return Err(EmulateError::Unsupported { rip: regs.rip, instruction: text, bytes: hex });
            };
            let value = src & mask(width);
            set_gpr(&mut regs, insn.op0_register(), u64::from(value.count_ones()));
            const ARITH: u64 = 0x8d5; // CF PF AF ZF SF OF
            regs.rflags = (regs.rflags & !ARITH) | if value == 0 { 1 << 6 } else { 0 };
            regs.rip = insn.next_ip();
            vcpu.set_regs(&regs)?;
            Ok(Emulated::Completed { instruction: text })
        }
        _ => Err(EmulateError::Unsupported { rip: regs.rip, instruction: text, bytes: hex }),
    }
}

/// Injects exception `vector` (without an error code) on `vcpu`.
fn inject(vcpu: &Vcpu, vector: u8) -> Result<(), VcpuError> {
    let mut events = vcpu.events()?;
    events.exception.injected = 1;
    events.exception.nr = vector;
    events.exception.has_error_code = 0;
    events.exception.error_code = 0;
    vcpu.set_events(&events)
}

fn mask(width: u32) -> u64 {
    if width >= 64 {
        u64::MAX
    } else {
        (1u64 << width) - 1
    }
}

/// Bits of a general-purpose register operand.
fn width(r: Register) -> Option<u32> {
    if r.is_gpr64() {
        Some(64)
    } else if r.is_gpr32() {
        Some(32)
    } else if r.is_gpr16() {
        Some(16)
    } else {
        None
    }
}

fn slot(regs: &mut crate::Regs, r: Register) -> Option<&mut u64> {
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
        _ => return None,
    })
}

fn gpr(regs: &crate::Regs, r: Register) -> Option<u64> {
    let mut copy = *regs;
    slot(&mut copy, r).map(|v| *v)
}

/// Writes `value` to a register operand with x86-64 semantics: 32-bit
/// writes zero the upper half, 16-bit writes keep it.
fn set_gpr(regs: &mut crate::Regs, r: Register, value: u64) {
    let w = width(r).unwrap_or(64);
    if let Some(v) = slot(regs, r) {
        *v = match w {
            64 => value,
            32 => value & 0xffff_ffff,
            _ => (*v & !mask(w)) | (value & mask(w)),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_instructions_this_host_fails_on() {
        let (i, t) = decode(&[0xcc, 0x90], 0x1000).unwrap();
        assert_eq!(i.mnemonic(), Mnemonic::Int3);
        assert_eq!(t, "int3");
        assert_eq!(i.next_ip(), 0x1001);
        let (i, t) = decode(&[0xf0, 0x48, 0x0f, 0xc7, 0x4d, 0x20], 0).unwrap();
        assert_eq!(i.mnemonic(), Mnemonic::Cmpxchg16b);
        assert!(t.starts_with("lock cmpxchg16b"), "{t}");
        let (i, _) = decode(&[0x48, 0x0f, 0xae, 0x2f], 0).unwrap();
        assert_eq!(i.mnemonic(), Mnemonic::Xrstor64);
        assert!(decode(&[0x0f, 0xff], 0).is_none_or(|(i, _)| i.mnemonic() != Mnemonic::Int3));
    }

    #[test]
    fn register_writes_follow_x86_64_width_rules() {
        let mut regs = crate::Regs { rax: u64::MAX, rbx: u64::MAX, ..Default::default() };
        set_gpr(&mut regs, Register::EAX, 5);
        assert_eq!(regs.rax, 5);
        set_gpr(&mut regs, Register::BX, 7);
        assert_eq!(regs.rbx, 0xffff_ffff_ffff_0007);
        assert_eq!(gpr(&regs, Register::R15), Some(0));
        assert_eq!(width(Register::XMM0), None);
    }
}
