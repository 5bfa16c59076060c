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
//! | bytes that decode to no instruction (`movbe` with a register operand, ...) | injects #UD, RIP on the instruction |
//! | `int3` | injects #BP (vector 3) with RIP after the `int3`, as the trap the CPU raises |
//! | `int1` (`icebp`) / `into` | injects #DB / #OF (if RFLAGS.OF) with RIP after the instruction |
//! | `int n` | delivers interrupt `n` through the guest's IDT with RIP after the `int`; #GP(`n*8+2`) past the IDT limit or for a gate DPL below CPL, #NP for a gate or code segment not present |
//! | `wait`/`fwait` | #MF if the x87 status word has an unmasked exception pending (ES), else nothing |
//! | `popcnt r, r/m` | computes it, sets ZF (other arithmetic flags cleared) |
//! | `movbe r, m` / `movbe m, r` | 16/32/64-bit load or store with the bytes reversed |
//! | `clac` / `stac` | clears / sets RFLAGS.AC |
//! | `ldmxcsr m32` / `stmxcsr m32` | loads / stores MXCSR through the vCPU's XSAVE image; #UD with CR0.EM or without CR4.OSFXSR, #NM with CR0.TS, #GP(0) on reserved bits |
//! | `[lock] cmpxchg16b m128` | one atomic 128-bit compare-exchange on the host mapping of guest RAM; ZF and RDX:RAX as the CPU sets them; #GP(0) if misaligned |
//! | `xsave`, `xsaveopt`, `xsavec`, `xrstor` (and their `64` forms) | through the vCPU's XSAVE image ([`Vcpu::xsave`]), components laid out as the guest's CPUID leaf 0xd says; #UD without CR4.OSXSAVE, #NM with CR0.TS, #GP(0) if not 64-byte aligned, for a malformed header or reserved MXCSR bits |
//! | `xgetbv` / `xsetbv` | XCR0 (and XINUSE, ECX = 1) through `KVM_GET_XCRS`/`KVM_SET_XCRS`; #GP(0) for other ECX, at CPL > 0 or for a value KVM refuses |
//! | `clflush` / `clflushopt` / `clwb` | nothing (guest RAM is coherent), but #PF on an unmapped address |
//! | `movd`/`movq` with an MMX register, `emms` | moves between MMX registers (the x87 registers), general registers and memory or device memory; #UD/#NM/#MF first (`mmx.rs`) |
//! | `vzeroall` / `vzeroupper`, `vmovdqa`/`vmovdqu`/`vmovaps`/`vmovups`/`vmovapd`/`vmovupd`/`vmovntdq`/`vmovntdqa` between XMM/YMM registers and memory | through the XSAVE image (XMM in the legacy area, upper halves in YMM_Hi128; a VEX.128 write zeroes the upper half); #UD without CR4.OSXSAVE or XCR0.AVX, #NM with CR0.TS, #GP(0) for a misaligned aligned move (`avx.rs`) |
//! | `verr` / `verw` | ZF as the GDT/LDT descriptor the selector names allows a read / write at this CPL and RPL (a stock kernel's `verw` before `hlt` on Intel parts with MDS-class bugs); #UD in real and virtual-8086 mode (`segment.rs`) |
//! | `rdpru` | #UD when the guest's CPUID lacks RDPRU |
//! | `invpcid r64, m128` | #UD without INVPCID in CPUID; #GP(0) on a bad type or descriptor; else a full guest TLB flush (`tlb.rs`) |
//! | anything else | [`EmulateError::Unsupported`] |
//!
//! An instruction that crosses a page boundary, of which KVM hands over only
//! the first bytes, is read whole from guest memory.
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

mod avx;
mod features;
mod guest;
mod mmx;
mod paging;
mod regs;
mod segment;
mod tlb;
mod xsave;

use iced_x86::{Decoder, DecoderError, DecoderOptions, Formatter, Instruction, Mnemonic, NasmFormatter, OpKind};

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

/// Up to 15 instruction bytes at `pc`, as many as can be read (more than
/// the `have` KVM gave), or `None` if no more can be.
fn fetch(mem: &GuestMemory<'_>, pc: u64, have: usize) -> Result<Option<Vec<u8>>, EmulateError> {
    let mem = GuestMemory { paging: mem.paging.fetch(), ..*mem };
    for len in (have + 1..=15).rev() {
        let mut buf = vec![0u8; len];
        if mem.read(pc, &mut buf)?.is_ok() {
            return Ok(Some(buf));
        }
    }
    Ok(None)
}

/// What one instruction does, before it is applied.
enum Outcome {
    /// Registers changed (RIP is advanced by the caller).
    Done,
    /// The instruction faults.
    Fault(Fault),
    /// A trap or fault vector without error code, RIP already set.
    Vector(u8),
    /// A software interrupt through the IDT (`int n`), RIP already set.
    Interrupt(u8),
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
    let pc = sregs.cs.base.wrapping_add(rip);
    let cpl = if sregs.cr0 & 1 == 0 {
        0
    } else if regs.rflags & RFLAGS_VM != 0 {
        3
    } else {
        sregs.ss.dpl
    };
    let mut paging = paging::Paging::of(&sregs, regs.rflags);
    if paging.needs_pkru() {
        paging = paging.with_pkru(xsave::pkru(vcpu)?);
    }
    let mem = GuestMemory { vcpu, vm, cpl, long_mode: sregs.efer & crate::mode::EFER_LMA != 0, paging };
    let decode = |bytes: &[u8]| {
        let mut decoder = Decoder::with_ip(bitness, bytes, pc, DecoderOptions::NONE);
        let insn = decoder.decode();
        (insn, decoder.last_error())
    };
    let (mut insn, mut error) = decode(bytes);
    if error == DecoderError::NoMoreBytes {
        // KVM handed over fewer bytes than the instruction needs (it stops
        // at a page boundary): fetch them from guest memory.
        if let Some(fetched) = fetch(&mem, pc, bytes.len())? {
            (insn, error) = decode(&fetched);
        }
    }
    match error {
        DecoderError::None => {}
        // Bytes no CPU of this mode runs (such as `movbe` with a register
        // operand): the CPU raises #UD, RIP on the instruction.
        DecoderError::InvalidInstruction => {
            inject(vcpu, 6, None)?;
            return Ok(Emulated::Injected { vector: 6, instruction: "(invalid)".into() });
        }
        // KVM handed over fewer bytes than the instruction needs.
        _ => return Err(unsupported("(truncated)".into())),
    }
    let mut text = String::new();
    NasmFormatter::new().format(&insn, &mut text);
    let next_rip = rip.wrapping_add(insn.len() as u64);
    let outcome = match insn.mnemonic() {
        Mnemonic::Int3 => {
            // A trap: the saved RIP is the next instruction.
            regs.rip = next_rip;
            Outcome::Vector(3)
        }
        Mnemonic::Int1 => {
            // `icebp`: a #DB trap, like int3.
            regs.rip = next_rip;
            Outcome::Vector(1)
        }
        Mnemonic::Into => {
            // #OF as a trap if RFLAGS.OF is set (64-bit mode decodes it as
            // invalid, which is #UD above).
            regs.rip = next_rip;
            if regs.rflags & (1 << 11) != 0 {
                Outcome::Vector(4)
            } else {
                Outcome::Done
            }
        }
        Mnemonic::Int => {
            regs.rip = next_rip;
            software_interrupt(insn.immediate8(), &sregs, &mem)?
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
        Mnemonic::Movbe => movbe(&insn, &mut regs, &sregs, &mem)?,
        Mnemonic::Ldmxcsr | Mnemonic::Stmxcsr => mxcsr(&insn, &regs, &sregs, &mem)?,
        Mnemonic::Cmpxchg16b => cmpxchg16b(&insn, &mut regs, &sregs, &mem)?,
        Mnemonic::Xsave
        | Mnemonic::Xsave64
        | Mnemonic::Xsaveopt
        | Mnemonic::Xsaveopt64
        | Mnemonic::Xsavec
        | Mnemonic::Xsavec64
        | Mnemonic::Xrstor
        | Mnemonic::Xrstor64
        | Mnemonic::Xgetbv
        | Mnemonic::Xsetbv => xsave::complete(&insn, &mut regs, &sregs, &mem)?,
        Mnemonic::Invpcid => tlb::invpcid(vcpu, &insn, &regs, &sregs, &mem)?,
        Mnemonic::Verr | Mnemonic::Verw => segment::verify(&insn, &mut regs, &sregs, &mem)?,
        // RDPRU (CPUID.80000008h:EBX bit 4) is never offered by KVM: #UD
        // when the guest's CPUID lacks it, as the CPU raises.
        Mnemonic::Rdpru if !features::guest_has(vcpu, 0x8000_0008, 0, features::Reg::Ebx, 4)? => Outcome::Vector(6),
        Mnemonic::Emms => mmx::emms(vcpu, &sregs)?,
        Mnemonic::Movd | Mnemonic::Movq if mmx::is_mmx_move(&insn) => {
            mmx::complete(vcpu, &insn, &mut regs, &sregs, &mem)?
        }
        _ if avx::handles(&insn) => avx::complete(vcpu, &insn, &regs, &sregs, &mem)?,
        Mnemonic::Clflush | Mnemonic::Clflushopt | Mnemonic::Clwb => {
            // Guest RAM is coherent: nothing to flush, but an unmapped
            // address faults as a read would.
            let Some(addr) = GuestMemory::operand_address(&insn, 0, &regs, &sregs) else {
                return Err(unsupported(text));
            };
            match mem.probe(addr)? {
                Ok(()) => Outcome::Done,
                Err(fault) => Outcome::Fault(fault),
            }
        }
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
        Outcome::Interrupt(vector) => {
            vcpu.set_regs(&regs)?;
            inject_interrupt(vcpu, vector)?;
            Ok(Emulated::Injected { vector, instruction: text })
        }
        // A fault: RIP stays on the instruction, registers unchanged.
        Outcome::Fault(Fault::General(code)) => {
            inject(vcpu, 13, Some(code))?;
            Ok(Emulated::Injected { vector: 13, instruction: text })
        }
        Outcome::Fault(Fault::NotPresent(code)) => {
            inject(vcpu, 11, Some(code))?;
            Ok(Emulated::Injected { vector: 11, instruction: text })
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

/// `movbe r, m` and `movbe m, r` (16, 32 or 64 bits): a load or store
/// with the bytes reversed. A 16-bit load keeps the register's upper bits,
/// a 32-bit one clears them, as `mov` does.
fn movbe(
    insn: &Instruction,
    regs: &mut crate::Regs,
    sregs: &crate::Sregs,
    mem: &GuestMemory<'_>,
) -> Result<Outcome, EmulateError> {
    let (reg, op) = match (insn.op0_kind(), insn.op1_kind()) {
        (OpKind::Register, OpKind::Memory) => (insn.op0_register(), 1),
        (OpKind::Memory, OpKind::Register) => (insn.op1_register(), 0),
        _ => return Ok(Outcome::Unsupported),
    };
    let (Some(w), Some(addr)) = (width(reg), GuestMemory::operand_address(insn, op, regs, sregs)) else {
        return Ok(Outcome::Unsupported);
    };
    let n = (w / 8) as usize;
    if op == 1 {
        let mut buf = [0u8; 8];
        if let Err(fault) = mem.read(addr, &mut buf[..n])? {
            return Ok(Outcome::Fault(fault));
        }
        buf[..n].reverse();
        set_gpr(regs, reg, u64::from_le_bytes(buf));
        return Ok(Outcome::Done);
    }
    let Some(value) = gpr(regs, reg) else { return Ok(Outcome::Unsupported) };
    let mut buf = value.to_le_bytes();
    buf[..n].reverse();
    Ok(match mem.write(addr, &buf[..n])? {
        Ok(()) => Outcome::Done,
        Err(fault) => Outcome::Fault(fault),
    })
}

/// MXCSR bits a guest may set (the FXSAVE MXCSR_MASK of current CPUs).
/// RFLAGS.VM: virtual-8086 mode (CPL 3 whatever CS holds).
const RFLAGS_VM: u64 = 1 << 17;

const MXCSR_MASK: u32 = 0xffff;

/// `ldmxcsr m32` and `stmxcsr m32`.
fn mxcsr(
    insn: &Instruction,
    regs: &crate::Regs,
    sregs: &crate::Sregs,
    mem: &GuestMemory<'_>,
) -> Result<Outcome, EmulateError> {
    // CR0.EM or no CR4.OSFXSR: #UD; CR0.TS: #NM, before the operand.
    const CR0_EM: u64 = 1 << 2;
    const CR0_TS: u64 = 1 << 3;
    const CR4_OSFXSR: u64 = 1 << 9;
    if sregs.cr0 & CR0_EM != 0 || sregs.cr4 & CR4_OSFXSR == 0 {
        return Ok(Outcome::Vector(6));
    }
    if sregs.cr0 & CR0_TS != 0 {
        return Ok(Outcome::Vector(7));
    }
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
        return Ok(Outcome::Fault(Fault::General(0)));
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

/// `int n` in protected or long mode: the checks the CPU makes before it
/// delivers a software interrupt, done here because this host's delivery
/// skips them — the gate must lie inside the IDT, have DPL >= CPL and be
/// present (#GP / #NP with the IDT error code `n * 8 + 2`), and its code
/// segment must be present (#NP with the selector). The delivery itself
/// (stack switch, frame) is KVM's.
fn software_interrupt(n: u8, sregs: &crate::Sregs, mem: &GuestMemory<'_>) -> Result<Outcome, EmulateError> {
    if sregs.cr0 & 1 == 0 {
        return Ok(Outcome::Interrupt(n));
    }
    let idt_error = u32::from(n) * 8 + 2;
    let gate_size: u64 = if sregs.efer & (1 << 10) != 0 { 16 } else { 8 };
    let offset = u64::from(n) * gate_size;
    if offset + gate_size - 1 > u64::from(sregs.idt.limit) {
        return Ok(Outcome::Fault(Fault::General(idt_error)));
    }
    let mut gate = [0u8; 8];
    if let Err(fault) = mem.read(sregs.idt.base.wrapping_add(offset), &mut gate)? {
        return Ok(Outcome::Fault(fault));
    }
    if (gate[5] >> 5) & 3 < mem.cpl {
        return Ok(Outcome::Fault(Fault::General(idt_error)));
    }
    if gate[5] & 0x80 == 0 {
        return Ok(Outcome::Fault(Fault::NotPresent(idt_error)));
    }
    let selector = u16::from_le_bytes([gate[2], gate[3]]);
    let index = u64::from(selector & !7);
    // A GDT code segment (an LDT one is left to KVM): its present bit.
    if selector & 4 == 0 && index != 0 && index + 7 <= u64::from(sregs.gdt.limit) {
        let mut descriptor = [0u8; 8];
        if let Err(fault) = mem.read(sregs.gdt.base.wrapping_add(index), &mut descriptor)? {
            return Ok(Outcome::Fault(fault));
        }
        if descriptor[5] & 0x80 == 0 {
            return Ok(Outcome::Fault(Fault::NotPresent(u32::from(selector & 0xfffc))));
        }
    }
    Ok(Outcome::Interrupt(n))
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

/// Injects a software interrupt `vector` through the guest's IDT, RIP
/// already past the `int n`. It goes in as an interrupt with `soft` clear:
/// KVM then pushes the RIP as set, on every vendor, where `soft` would make
/// VMX and real-mode delivery add an instruction length that
/// `KVM_SET_VCPU_EVENTS` cannot carry. The gate's DPL check, the one thing
/// that tells a software interrupt apart, is done before
/// ([`software_interrupt`]).
fn inject_interrupt(vcpu: &Vcpu, vector: u8) -> Result<(), VcpuError> {
    let mut events = vcpu.events()?;
    events.interrupt.injected = 1;
    events.interrupt.nr = vector;
    events.interrupt.soft = 0;
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
