//! Registers, CPUID (with KVM's paravirtual leaves), MSRs and FPU state go
//! in and out through the vCPU, and the guest sees what was set.

mod common;

use common::*;
use iced_x86::code_asm::*;
use nkvm::{Exit, RunState};

#[test]
fn registers_set_by_the_vmm_are_seen_by_the_guest_and_back() {
    let vm = vm();
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        a.add(rax, rbx).unwrap();
        a.hlt().unwrap();
    });
    let mut regs = vcpu.regs().unwrap();
    regs.rax = 40;
    regs.rbx = 2;
    vcpu.set_regs(&regs).unwrap();
    assert_eq!(vcpu.enter_guest(&mut RunState::new()).unwrap(), Exit::Hlt);
    assert_eq!(vcpu.regs().unwrap().rax, 42);
    let sregs = vcpu.sregs().unwrap();
    assert_ne!(sregs.efer & (1 << 10), 0, "long mode active (EFER.LMA)");
}

#[test]
fn cpuid_includes_kvm_paravirtual_leaves_with_kvmclock() {
    let hv = hypervisor();
    let cpuid = hv.supported_cpuid().unwrap();
    let vm = vm();
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        // Report the hypervisor signature leaf and the KVM features leaf.
        a.mov(eax, 0x4000_0000u32).unwrap();
        a.cpuid().unwrap();
        a.mov(eax, ebx).unwrap();
        a.out(0x10, eax).unwrap();
        a.mov(eax, ecx).unwrap();
        a.out(0x10, eax).unwrap();
        a.mov(eax, edx).unwrap();
        a.out(0x10, eax).unwrap();
        a.mov(eax, 0x4000_0001u32).unwrap();
        a.cpuid().unwrap();
        a.out(0x11, eax).unwrap();
        a.hlt().unwrap();
    });
    vcpu.set_cpuid(&cpuid).unwrap();
    let exits = run_to_hlt(&mut vcpu, |_| 0);
    let mut signature = Vec::new();
    let mut features = None;
    for exit in exits {
        match exit {
            Exit::IoOut { port: 0x10, data, .. } => signature.extend_from_slice(&(data as u32).to_le_bytes()),
            Exit::IoOut { port: 0x11, data, .. } => features = Some(data as u32),
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(&signature[..9], b"KVMKVMKVM");
    let features = features.expect("features leaf");
    // KVM_FEATURE_CLOCKSOURCE2 (bit 3): kvmclock at the new MSRs.
    assert_ne!(features & (1 << 3), 0, "kvmclock offered: {features:#x}");
}

#[test]
fn msrs_set_by_the_vmm_are_read_by_the_guest() {
    const IA32_SYSENTER_ESP: u32 = 0x175;
    let vm = vm();
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        a.mov(ecx, IA32_SYSENTER_ESP).unwrap();
        a.rdmsr().unwrap();
        a.out(0x10, eax).unwrap();
        a.mov(eax, 0x1234u32).unwrap();
        a.xor(edx, edx).unwrap();
        a.wrmsr().unwrap();
        a.hlt().unwrap();
    });
    assert_eq!(vcpu.set_msrs(&[(IA32_SYSENTER_ESP, 0xabcd_0000)]).unwrap(), 1);
    let exits = run_to_hlt(&mut vcpu, |_| 0);
    assert_eq!(exits, vec![Exit::IoOut { port: 0x10, size: 4, data: 0xabcd_0000 }]);
    assert_eq!(vcpu.msrs(&[IA32_SYSENTER_ESP]).unwrap(), vec![(IA32_SYSENTER_ESP, 0x1234)]);
}

#[test]
fn fpu_state_round_trips_through_kvm() {
    // On this nested host (kvm_pvm) SSE instructions in the guest come back
    // as emulation failures, KVM_GET_FPU reports MXCSR as 0, and the guest's
    // x87 control word after KVM_SET_FPU is the reset value 0x37f: the FPU
    // state is checked through KVM, and what the guest saw is printed.
    let vm = vm();
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        a.mov(rbx, 0x6000u64).unwrap();
        a.fnstcw(word_ptr(rbx)).unwrap();
        a.hlt().unwrap();
    });
    let mut fpu = vcpu.fpu().unwrap();
    fpu.fcw = 0x27f; // 53-bit precision
    fpu.xmm[0][..4].copy_from_slice(&[1, 2, 3, 4]);
    vcpu.set_fpu(&fpu).unwrap();
    let back = vcpu.fpu().unwrap();
    assert_eq!(back.fcw, 0x27f);
    assert_eq!(&back.xmm[0][..4], &[1, 2, 3, 4]);
    assert!(run_to_hlt(&mut vcpu, |_| 0).is_empty());
    let mut buf = [0u8; 2];
    vm.read_memory(nkvm::GuestAddress(0x6000), &mut buf).unwrap();
    eprintln!("guest FCW after KVM_SET_FPU(0x27f): {:#x}", u16::from_le_bytes(buf));
}
