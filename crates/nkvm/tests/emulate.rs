//! Emulation failures completed in user space, with real guests: `int3` in
//! long mode (an emulation failure on this nested host) becomes the #BP
//! the guest's IDT handler expects; other instructions give a named error.

mod common;

use common::*;
use iced_x86::code_asm::*;
use nkvm::emulate::{complete, EmulateError, Emulated};
use nkvm::{Exit, GuestAddress, RunState};

const IDT: u64 = 0x7000;
const HANDLER: u64 = 0x3_0000;

#[test]
fn int3_is_delivered_to_the_guest_as_a_breakpoint() {
    let vm = vm();
    // #BP handler: report the return address it was given, then return.
    let handler = assemble(64, HANDLER, |a| {
        a.mov(rax, qword_ptr(rsp)).unwrap();
        a.out(0x70u32, eax).unwrap();
        a.iretq().unwrap();
    });
    vm.write_memory(GuestAddress(HANDLER), &handler).unwrap();
    let mut gate = [0u8; 16];
    gate[0..2].copy_from_slice(&(HANDLER as u16).to_le_bytes());
    gate[2..4].copy_from_slice(&0x08u16.to_le_bytes());
    gate[5] = 0x8e;
    gate[6..8].copy_from_slice(&((HANDLER >> 16) as u16).to_le_bytes());
    vm.write_memory(GuestAddress(IDT + 3 * 16), &gate).unwrap();
    let mut idtr = [0u8; 10];
    idtr[0..2].copy_from_slice(&4095u16.to_le_bytes());
    idtr[2..10].copy_from_slice(&IDT.to_le_bytes());
    vm.write_memory(GuestAddress(0x6ff0), &idtr).unwrap();
    let mut after_int3 = 0;
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        a.mov(rax, 0x6ff0u64).unwrap();
        a.lidt(ptr(rax)).unwrap();
        a.int3().unwrap();
        a.mov(eax, 0x1234u32).unwrap();
        a.out(0x71u32, eax).unwrap();
        a.hlt().unwrap();
    });
    // The int3 is 8 bytes in (mov rax, imm64 is 10; lidt [rax] is 3).
    after_int3 += LONG_MODE_ENTRY + 10 + 3 + 1;
    let mut run = RunState::new();
    let mut reports = Vec::new();
    let mut injected = 0;
    loop {
        match vcpu.enter_guest(&mut run).unwrap() {
            Exit::InternalError(e) => {
                let done = complete(&vcpu, &e).expect("int3 can be completed");
                assert_eq!(done, Emulated::Injected { vector: 3, instruction: "int3".into() });
                injected += 1;
            }
            Exit::IoOut { port, data, .. } => reports.push((port, data)),
            Exit::Hlt => break,
            other => panic!("unexpected {other}"),
        }
    }
    // On hosts that emulate int3 themselves, nothing needed completing.
    eprintln!("int3 completions in user space: {injected}");
    assert_eq!(reports, vec![(0x70, after_int3 & 0xffff_ffff), (0x71, 0x1234)]);
}

#[test]
fn an_instruction_nkvm_cannot_complete_is_named() {
    let vm = vm();
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        a.movd(eax, xmm0).unwrap();
        a.hlt().unwrap();
    });
    match vcpu.enter_guest(&mut RunState::new()).unwrap() {
        Exit::InternalError(e) => {
            let err = complete(&vcpu, &e).unwrap_err();
            assert!(matches!(err, EmulateError::Unsupported { .. }));
            assert!(err.to_string().contains("cannot emulate `movd eax,xmm0` at rip 0x100000"), "{err}");
        }
        Exit::Hlt => eprintln!("this host runs SSE in guests: nothing to complete"),
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn popcnt_is_computed_with_its_flags() {
    // `popcnt` is an emulation failure on this nested host; elsewhere the
    // CPU runs it. Either way the guest must see the right result and ZF.
    let vm = vm();
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        a.mov(rdi, 0xf0f0_0000_0000_0001u64).unwrap();
        a.popcnt(rax, rdi).unwrap();
        a.out(0x70u32, eax).unwrap();
        a.xor(edi, edi).unwrap();
        a.popcnt(ecx, edi).unwrap();
        a.setz(al).unwrap();
        a.movzx(eax, al).unwrap();
        a.out(0x71u32, eax).unwrap();
        a.hlt().unwrap();
    });
    let mut run = RunState::new();
    let mut reports = Vec::new();
    loop {
        match vcpu.enter_guest(&mut run).unwrap() {
            Exit::InternalError(e) => {
                complete(&vcpu, &e).expect("popcnt can be completed");
            }
            Exit::IoOut { port, data, .. } => reports.push((port, data)),
            Exit::Hlt => break,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(reports, vec![(0x70, 9), (0x71, 1)]);
}

#[test]
fn fwait_without_a_pending_x87_exception_just_continues() {
    let vm = vm();
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        a.wait().unwrap();
        a.mov(eax, 7u32).unwrap();
        a.out(0x70u32, eax).unwrap();
        a.hlt().unwrap();
    });
    let mut run = RunState::new();
    let mut reports = Vec::new();
    loop {
        match vcpu.enter_guest(&mut run).unwrap() {
            Exit::InternalError(e) => {
                let done = complete(&vcpu, &e).expect("wait can be completed");
                assert_eq!(done, Emulated::Completed { instruction: "wait".into() });
            }
            Exit::IoOut { port, data, .. } => reports.push((port, data)),
            Exit::Hlt => break,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(reports, vec![(0x70, 7)]);
}
