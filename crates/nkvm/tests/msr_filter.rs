//! `Vm::deny_msrs`: a denied MSR raises #GP in the guest on `rdmsr` and
//! `wrmsr`, an MSR beside it in the same filter range still works.

mod common;

use common::*;
use iced_x86::code_asm::*;
use nkvm::{Exit, RunState, Vcpu, Vm};

/// The MSR the tests deny: IA32_SYSENTER_CS, readable and writable on every
/// x86-64 CPU.
const DENIED: u32 = 0x174;
/// An MSR in the same filter range as [`DENIED`] that must keep working.
const KEPT: u32 = 0x175; // IA32_SYSENTER_ESP

/// A guest that writes 0x1234 to `msr`, reads it back and reports `eax` on
/// port 0x70; its #GP handler reports 13 on port 0x77 (leaving 13 in `eax`)
/// and skips the 2-byte instruction.
fn msr_guest(vm: &Vm, msr: u32) -> Vcpu {
    install_handler(vm, 13, |a| {
        a.add(rsp, 8).unwrap(); // the error code
        a.mov(eax, 13u32).unwrap();
        a.out(0x77u32, eax).unwrap();
        a.add(qword_ptr(rsp), 2).unwrap();
        a.iretq().unwrap();
    });
    long_mode_guest(vm, 0, |a| {
        a.mov(rax, IDTR).unwrap();
        a.lidt(ptr(rax)).unwrap();
        a.mov(ecx, msr).unwrap();
        a.mov(eax, 0x1234u32).unwrap();
        a.xor(edx, edx).unwrap();
        a.wrmsr().unwrap();
        a.xor(eax, eax).unwrap();
        a.rdmsr().unwrap();
        a.out(0x70u32, eax).unwrap();
        a.hlt().unwrap();
    })
}

fn port_writes(vcpu: &mut Vcpu) -> Vec<(u16, u64)> {
    let mut run = RunState::new();
    let mut out = Vec::new();
    loop {
        match vcpu.enter_guest(&mut run).unwrap() {
            Exit::IoOut { port, data, .. } => out.push((port, data)),
            Exit::Hlt => return out,
            other => panic!("unexpected {other} after {out:x?}"),
        }
    }
}

fn run_with_filter(msr: u32, deny: Option<&[u32]>) -> Vec<(u16, u64)> {
    let vm = vm();
    if let Some(deny) = deny {
        vm.deny_msrs(deny).expect("this host's KVM has the MSR filter");
    }
    let mut vcpu = msr_guest(&vm, msr);
    vcpu.set_cpuid(&hypervisor().supported_cpuid().unwrap()).unwrap();
    port_writes(&mut vcpu)
}

#[test]
fn a_denied_msr_raises_gp_on_write_and_read() {
    assert_eq!(run_with_filter(DENIED, Some(&[DENIED])), vec![(0x77, 13), (0x77, 13), (0x70, 13)]);
}

#[test]
fn an_msr_beside_a_denied_one_still_reads_what_was_written() {
    assert_eq!(run_with_filter(KEPT, Some(&[DENIED])), vec![(0x70, 0x1234)]);
}

#[test]
fn without_a_filter_the_msr_works_and_an_empty_list_removes_the_filter() {
    assert_eq!(run_with_filter(DENIED, None), vec![(0x70, 0x1234)]);
    let vm = vm();
    vm.deny_msrs(&[DENIED]).unwrap();
    vm.deny_msrs(&[]).unwrap();
    let mut vcpu = msr_guest(&vm, DENIED);
    vcpu.set_cpuid(&hypervisor().supported_cpuid().unwrap()).unwrap();
    assert_eq!(port_writes(&mut vcpu), vec![(0x70, 0x1234)]);
}

#[test]
fn msrs_spread_over_more_than_sixteen_ranges_are_refused() {
    let spread: Vec<u32> = (0..17).map(|i| i * 0x10_0000).collect();
    let err = vm().deny_msrs(&spread).unwrap_err();
    assert!(err.to_string().contains("17 filter ranges"), "{err}");
}
