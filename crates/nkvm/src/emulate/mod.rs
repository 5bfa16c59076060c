//! Completing in user space what KVM could not emulate.
//!
//! On some hosts (nested KVM through `kvm_pvm` among them, where the guest
//! kernel runs deprivileged and every fault goes through KVM's emulator)
//! instructions such as `int3`, `clac` or `lock cmpxchg16b` come back from
//! `KVM_RUN` as an emulation failure
//! ([`Exit::InternalError`](crate::Exit::InternalError), suberror 1) with
//! their bytes. [`complete`] decodes the instruction (iced-x86) and either
//! performs it — on the vCPU's registers and on guest memory, translated
//! through the guest's page tables — or injects the exception the CPU would
//! have raised, so the vCPU can simply enter the guest again; anything it
//! cannot handle is an error naming the instruction and its address.
//!
//! | instruction | what nkvm does |
//! |---|---|
//! | `int3` | injects #BP (vector 3) with RIP after the `int3`, as the trap the CPU raises |
//! | `wait`/`fwait` | #MF if the x87 status word has an unmasked exception pending (ES), else nothing |
//! | `popcnt r, r/m` | computes it, sets ZF (other arithmetic flags cleared) |
//! | `clac` / `stac` | clears / sets RFLAGS.AC |
//! | `ldmxcsr m32` / `stmxcsr m32` | loads / stores MXCSR through the vCPU's XSAVE image; #GP(0) on reserved bits |
//! | `[lock] cmpxchg16b m128` | one atomic 128-bit compare-exchange on the host mapping of guest RAM; ZF and RDX:RAX as the CPU sets them; #GP(0) if misaligned |
//! | anything else | [`EmulateError::Unsupported`] |
//!
//! A memory operand on a page the guest has not mapped gets the #PF (with
//! CR2 and the error code) the CPU would raise; writes are recorded in the
//! VM's dirty log ([`Vm::mark_dirty`]).
//!
//! ```no_run
//! use nkvm::{emulate, Exit, RunState};
//! # fn f(vm: &nkvm::Vm, vcpu: &mut nkvm::Vcpu) -> Result<(), Box<dyn std::error::Error>> {
//! let mut run = RunState::new();
//! loop {
//!     match vcpu.enter_guest(&mut run)? {
//!         Exit::InternalError(e) if e.is_emulation_failure() => {
//!             let done = emulate::complete(vcpu, vm, &e)?; // or stop the VM with the error
//!             log::debug!("{done:?}");
//!         }
//!         Exit::Hlt => return Ok(()),
//!         _ => {}
//!     }
//! }
//! # }
//! ```

mod guest;
mod regs;

use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, Mnemonic, NasmFormatter, OpKind};

use self::guest::{Fault, GuestMemory};
use self::regs::{gpr, mask, set_gpr, width};
use crate::{InternalError, MemoryError, Vcpu, VcpuError, Vm};

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
    /// A memory operand translated to guest-physical memory that is not RAM
    /// in the VM's map (for example MMIO).
    #[error("memory operand outside guest RAM")]
    Memory(#[source] MemoryError),
}

/// Decodes the instruction in `bytes` at `rip` for a CPU in `bitness`
/// (16, 32 or 64) mode.
pub fn decode_in(bitness: u32, bytes: &[u8], rip: u64) -> Option<(Instruction, String)> {
    let mut decoder = Decoder::with_ip(bitness, bytes, rip, DecoderOptions::NONE);
    let insn = decoder.decode();
    if insn.is_invalid() {
        return None;
    }
    let mut text = String::new();
    NasmFormatter::new().format(&insn, &mut text);
    Some((insn, text))
}

/// Decodes the 64-bit instruction in `bytes` at `rip`.
pub fn decode(bytes: &[u8], rip: u64) -> Option<(Instruction, String)> {
    decode_in(64, bytes, rip)
}

/// What one instruction does, before it is applied.
enum Outcome {
    /// Registers changed (RIP is advanced by the caller).
    Done,
    /// The instruction faults.
    Fault(Fault),
    /// A trap or fault vector without error code, RIP already set.
    Vector(u8),
    /// Not handled.
    Unsupported,
}

/// Completes the instruction of an emulation failure on `vcpu` (of `vm`,
/// whose memory its operands live in), so that the next `enter_guest`
/// continues the guest.
pub fn complete(vcpu: &Vcpu, vm: &Vm, failure: &InternalError) -> Result<Emulated, EmulateError> {
    if !failure.is_emulation_failure() || failure.instruction().is_empty() {
        return Err(EmulateError::NoInstruction(failure.to_string()));
    }
    let mut regs = vcpu.regs()?;
    let sregs = vcpu.sregs()?;
    let bytes = failure.instruction();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let bitness = if sregs.cs.l != 0 {
        64
    } else if sregs.cs.db != 0 {
        32
    } else {
        16
    };
    let rip = regs.rip;
    let unsupported = |instruction: String| EmulateError::Unsupported { rip, instruction, bytes: hex.clone() };
    let Some((insn, text)) = decode_in(bitness, bytes, sregs.cs.base.wrapping_add(rip)) else {
        return Err(unsupported("(invalid)".into()));
    };
    let next_rip = rip.wrapping_add(insn.len() as u64);
    let mem = GuestMemory { vcpu, vm, cpl: (sregs.cs.selector & 3) as u8 };
    let outcome = match insn.mnemonic() {
        Mnemonic::Int3 => {
            // A trap: the saved RIP is the next instruction.
            regs.rip = next_rip;
            Outcome::Vector(3)
        }
        Mnemonic::Wait => {
            regs.rip = next_rip;
            if vcpu.fpu()?.fsw & 0x80 != 0 {
                Outcome::Vector(16)
            } else {
                Outcome::Done
            }
        }
        Mnemonic::Clac | Mnemonic::Stac => {
            const AC: u64 = 1 << 18;
            regs.rflags = if insn.mnemonic() == Mnemonic::Clac { regs.rflags & !AC } else { regs.rflags | AC };
            Outcome::Done
        }
        Mnemonic::Popcnt => popcnt(&insn, &mut regs, &sregs, &mem)?,
        Mnemonic::Ldmxcsr | Mnemonic::Stmxcsr => mxcsr(&insn, &regs, &sregs, &mem)?,
        Mnemonic::Cmpxchg16b => cmpxchg16b(&insn, &mut regs, &sregs, &mem)?,
        _ => Outcome::Unsupported,
    };
    match outcome {
        Outcome::Unsupported => Err(unsupported(text)),
        Outcome::Done => {
            regs.rip = next_rip;
            vcpu.set_regs(&regs)?;
            Ok(Emulated::Completed { instruction: text })
        }
        Outcome::Vector(vector) => {
            vcpu.set_regs(&regs)?;
            inject(vcpu, vector, None)?;
            Ok(Emulated::Injected { vector, instruction: text })
        }
        // A fault: RIP stays on the instruction, registers unchanged.
        Outcome::Fault(Fault::General) => {
            inject(vcpu, 13, Some(0))?;
            Ok(Emulated::Injected { vector: 13, instruction: text })
        }
        Outcome::Fault(Fault::Page { addr, error_code }) => {
            let mut sregs = sregs;
            sregs.cr2 = addr;
            vcpu.set_sregs(&sregs)?;
            inject(vcpu, 14, Some(error_code))?;
            Ok(Emulated::Injected { vector: 14, instruction: text })
        }
    }
}

/// `popcnt r, r/m`.
fn popcnt(
    insn: &Instruction,
    regs: &mut crate::Regs,
    sregs: &crate::Sregs,
    mem: &GuestMemory<'_>,
) -> Result<Outcome, EmulateError> {
    let Some(w) = width(insn.op0_register()) else { return Ok(Outcome::Unsupported) };
    let value = match insn.op1_kind() {
        OpKind::Register => match gpr(regs, insn.op1_register()) {
            Some(v) => v,
            None => return Ok(Outcome::Unsupported),
        },
        OpKind::Memory => {
            let Some(addr) = GuestMemory::operand_address(insn, 1, regs, sregs) else {
                return Ok(Outcome::Unsupported);
            };
            let mut buf = [0u8; 8];
            if let Err(fault) = mem.read(addr, &mut buf[..(w / 8) as usize])? {
                return Ok(Outcome::Fault(fault));
            }
            u64::from_le_bytes(buf)
        }
        _ => return Ok(Outcome::Unsupported),
    } & mask(w);
    set_gpr(regs, insn.op0_register(), u64::from(value.count_ones()));
    const ARITH: u64 = 0x8d5; // CF PF AF ZF SF OF
    regs.rflags = (regs.rflags & !ARITH) | if value == 0 { 1 << 6 } else { 0 };
    Ok(Outcome::Done)
}

/// MXCSR bits a guest may set (the FXSAVE MXCSR_MASK of current CPUs).
const MXCSR_MASK: u32 = 0xffff;

/// `ldmxcsr m32` and `stmxcsr m32`.
fn mxcsr(
    insn: &Instruction,
    regs: &crate::Regs,
    sregs: &crate::Sregs,
    mem: &GuestMemory<'_>,
) -> Result<Outcome, EmulateError> {
    let Some(addr) = GuestMemory::operand_address(insn, 0, regs, sregs) else { return Ok(Outcome::Unsupported) };
    if insn.mnemonic() == Mnemonic::Stmxcsr {
        return Ok(match mem.write(addr, &mem.vcpu.mxcsr()?.to_le_bytes())? {
            Ok(()) => Outcome::Done,
            Err(fault) => Outcome::Fault(fault),
        });
    }
    let mut buf = [0u8; 4];
    if let Err(fault) = mem.read(addr, &mut buf)? {
        return Ok(Outcome::Fault(fault));
    }
    let value = u32::from_le_bytes(buf);
    if value & !MXCSR_MASK != 0 {
        return Ok(Outcome::Fault(Fault::General));
    }
    mem.vcpu.set_mxcsr(value)?;
    Ok(Outcome::Done)
}

/// `[lock] cmpxchg16b m128`: compare RDX:RAX with the operand; if equal,
/// store RCX:RBX and set ZF, else load the operand into RDX:RAX and clear
/// ZF. Done as one atomic operation on the host mapping.
fn cmpxchg16b(
    insn: &Instruction,
    regs: &mut crate::Regs,
    sregs: &crate::Sregs,
    mem: &GuestMemory<'_>,
) -> Result<Outcome, EmulateError> {
    let Some(addr) = GuestMemory::operand_address(insn, 0, regs, sregs) else { return Ok(Outcome::Unsupported) };
    let current = u128::from(regs.rax) | (u128::from(regs.rdx) << 64);
    let new = u128::from(regs.rbx) | (u128::from(regs.rcx) << 64);
    const ZF: u64 = 1 << 6;
    match mem.compare_exchange_u128(addr, current, new)? {
        Err(fault) => return Ok(Outcome::Fault(fault)),
        Ok(Ok(_)) => regs.rflags |= ZF,
        Ok(Err(found)) => {
            regs.rflags &= !ZF;
            regs.rax = found as u64;
            regs.rdx = (found >> 64) as u64;
        }
    }
    Ok(Outcome::Done)
}

/// Injects exception `vector` on `vcpu`, with `error_code` if it has one.
fn inject(vcpu: &Vcpu, vector: u8, error_code: Option<u32>) -> Result<(), VcpuError> {
    let mut events = vcpu.events()?;
    events.exception.injected = 1;
    events.exception.nr = vector;
    events.exception.has_error_code = u8::from(error_code.is_some());
    events.exception.error_code = error_code.unwrap_or(0);
    vcpu.set_events(&events)
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
}
