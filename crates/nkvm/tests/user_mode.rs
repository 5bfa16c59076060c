//! Guest code at CPL 3 (user segments, user pages), as a Linux guest's user
//! space runs: SSE works there without any completion in user space, and
//! `syscall` lands at the kernel's LSTAR with the return address in RCX.
//!
//! On the nested development host (`kvm_pvm`) this is where a stock Linux
//! guest stops: `syscall` from user mode jumps to LSTAR *without* entering
//! supervisor mode (CS stays the user selector), so the kernel's entry code
//! faults at CPL 3 and init is killed. The test prints the CPL found there;
//! docs/architecture.md ("Host quirks") has the details.

mod common;

use common::*;
use iced_x86::code_asm::*;
use nkvm::{Exit, GuestAddress, RunState, Vcpu, Vm};

const PML4: u64 = 0x4_0000;
const GDT: u64 = 0x4_3000;
const USER_CODE: u64 = 0x10_0000;
const KERNEL_ENTRY: u64 = 0x30_0000;
/// Linux's GDT layout: kernel CS 0x10, kernel DS 0x18, user DS 0x2b, user CS 0x33.
const STAR: u64 = (0x23 << 48) | (0x10 << 32);

/// A vCPU at CPL 3 about to run `user`, with syscall MSRs pointing at
/// `kernel` (loaded at KERNEL_ENTRY, on user-accessible pages so that a
/// host which forgets the mode switch still runs it).
fn user_mode_vcpu(vm: &Vm, user: impl FnOnce(&mut CodeAssembler), kernel: impl FnOnce(&mut CodeAssembler)) -> Vcpu {
    let (pdpt, pd) = (PML4 + 0x1000, PML4 + 0x2000);
    let user_rw = 1 | 2 | 4;
    vm.write_memory(GuestAddress(PML4), &(pdpt | user_rw).to_le_bytes()).unwrap();
    vm.write_memory(GuestAddress(pdpt), &(pd | user_rw).to_le_bytes()).unwrap();
    for i in 0..8u64 {
        vm.write_memory(GuestAddress(pd + i * 8), &((i << 21) | user_rw | 0x80).to_le_bytes()).unwrap();
    }
    let gdt: [u64; 7] = [
        0,
        0,
        0x00af_9b00_0000_ffff, // 0x10 kernel code
        0x00cf_9300_0000_ffff, // 0x18 kernel data
        0x00cf_fb00_0000_ffff, // 0x20 user code (32-bit)
        0x00cf_f300_0000_ffff, // 0x28 user data
        0x00af_fb00_0000_ffff, // 0x30 user code (64-bit)
    ];
    let bytes: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
    vm.write_memory(GuestAddress(GDT), &bytes).unwrap();
    vm.write_memory(GuestAddress(KERNEL_ENTRY), &assemble(64, KERNEL_ENTRY, kernel)).unwrap();
    let vcpu = long_mode_guest(vm, 0, |_| {});
    vm.write_memory(GuestAddress(USER_CODE), &assemble(64, USER_CODE, user)).unwrap();
    let mut s = vcpu.sregs().unwrap();
    s.cr3 = PML4;
    s.efer |= 1; // SCE
    s.gdt.base = GDT;
    s.gdt.limit = 7 * 8 - 1;
    s.cs.selector = 0x33;
    s.cs.dpl = 3;
    for seg in [&mut s.ds, &mut s.es, &mut s.ss, &mut s.fs, &mut s.gs] {
        seg.selector = 0x2b;
        seg.dpl = 3;
    }
    vcpu.set_sregs(&s).unwrap();
    // SFMASK clears IF, TF, DF, AC like Linux's.
    vcpu.set_msrs(&[(0xc000_0081, STAR), (0xc000_0082, KERNEL_ENTRY), (0xc000_0084, 0x4_7700)]).unwrap();
    let mut r = vcpu.regs().unwrap();
    r.rip = USER_CODE;
    r.rsp = 0x8_0000;
    r.rflags = 0x3202; // IOPL 3 (so `out` works at CPL 3), IF
    vcpu.set_regs(&r).unwrap();
    vcpu
}

/// Port writes until the first exit that is not one (returned too).
fn outs(vcpu: &mut Vcpu) -> (Vec<(u16, u64)>, Exit) {
    let mut run = RunState::new();
    let mut seen = Vec::new();
    loop {
        match vcpu.enter_guest(&mut run).unwrap() {
            Exit::IoOut { port, data, .. } => seen.push((port, data)),
            other => return (seen, other),
        }
        assert!(seen.len() < 100, "runaway guest");
    }
}

#[test]
fn sse_at_cpl3_needs_no_completion_in_user_space() {
    let vm = vm();
    let mut vcpu = user_mode_vcpu(
        &vm,
        |a| {
            a.mov(eax, 0x1234_5678u32).unwrap();
            a.movd(xmm1, eax).unwrap();
            a.pxor(xmm0, xmm0).unwrap();
            a.paddd(xmm0, xmm1).unwrap();
            a.paddd(xmm0, xmm1).unwrap();
            a.movd(eax, xmm0).unwrap();
            a.out(0x80u32, eax).unwrap();
            a.pcmpeqb(xmm2, xmm2).unwrap();
            a.pmovmskb(eax, xmm2).unwrap();
            a.out(0x81u32, eax).unwrap();
            a.syscall().unwrap();
        },
        |a| {
            a.out(0x90u32, eax).unwrap();
        },
    );
    let (seen, last) = outs(&mut vcpu);
    assert!(!matches!(last, Exit::InternalError(_)), "SSE at CPL 3 came back as {last}");
    assert_eq!(seen[..2], [(0x80, 0x2468_acf0), (0x81, 0xffff)], "{seen:x?} then {last}");
}

#[test]
fn syscall_from_user_mode_lands_at_lstar_with_the_return_address_in_rcx() {
    let vm = vm();
    let mut vcpu = user_mode_vcpu(
        &vm,
        |a| {
            a.mov(eax, 1u32).unwrap();
            a.out(0x80u32, eax).unwrap();
            a.syscall().unwrap();
            a.hlt().unwrap();
        },
        |a| {
            a.mov(rax, rcx).unwrap();
            a.out(0x90u32, eax).unwrap();
            a.mov(rax, r11).unwrap();
            a.out(0x91u32, eax).unwrap();
            a.hlt().unwrap();
        },
    );
    let (seen, last) = outs(&mut vcpu);
    let code_segment = vcpu.sregs().unwrap().cs;
    eprintln!(
        "after syscall: CS {:#x} (DPL {}), then {last}; ports {seen:x?}",
        code_segment.selector, code_segment.dpl
    );
    // syscall is 2 bytes after the 5-byte mov and the 2-byte out.
    let return_rip = USER_CODE + 5 + 2 + 2;
    assert_eq!(seen.len(), 3, "{seen:x?} then {last}");
    assert_eq!(seen[1], (0x90, return_rip), "RCX holds the return address");
    assert_eq!(seen[2].1 & 0x200, 0x200, "R11 holds RFLAGS from before (IF set): {seen:x?}");
}
