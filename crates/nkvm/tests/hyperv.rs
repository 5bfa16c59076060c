//! Hyper-V enlightenments (`nkvm::hyperv`): on a host whose KVM emulates
//! them, a guest given `with_hyperv`'s CPUID sees Hyper-V's signature and
//! reads the reference counter; on a host whose KVM does not (this
//! project's nested `kvm_pvm` development host), nkvm says so, SynIC cannot
//! be enabled, and the guest's read of the reference counter raises #GP.

mod common;

use common::*;
use iced_x86::code_asm::*;
use nkvm::hyperv::with_hyperv;
use nkvm::{Exit, HypervisorError, RunState, Vcpu, Vm, VmConfig};

/// `HV_X64_MSR_TIME_REF_COUNT`: 100 ns ticks since the VM started.
const TIME_REF_COUNT: u32 = 0x4000_0020;
/// "Hv#1", the interface signature in leaf 0x4000_0001's EAX.
const HV_SIGNATURE: u32 = u32::from_le_bytes(*b"Hv#1");

/// A guest that reports leaf 0x4000_0001's EAX on port 0x70, then
/// TIME_REF_COUNT's low half twice on port 0x71 (its #GP handler reports 13
/// on 0x77 and skips the `rdmsr`), then writes port 0x7f.
fn reference_counter_guest(vm: &Vm) -> Vcpu {
    install_handler(vm, 13, |a| {
        a.add(rsp, 8).unwrap();
        a.mov(eax, 13u32).unwrap();
        a.out(0x77u32, eax).unwrap();
        a.add(qword_ptr(rsp), 2).unwrap();
        a.iretq().unwrap();
    });
    long_mode_guest(vm, 0, |a| {
        a.mov(rax, IDTR).unwrap();
        a.lidt(ptr(rax)).unwrap();
        a.mov(eax, 0x4000_0001u32).unwrap();
        a.xor(ecx, ecx).unwrap();
        a.cpuid().unwrap();
        a.out(0x70u32, eax).unwrap();
        for _ in 0..2 {
            a.mov(ecx, TIME_REF_COUNT).unwrap();
            a.xor(eax, eax).unwrap();
            a.rdmsr().unwrap();
            a.out(0x71u32, eax).unwrap();
            // Let some time pass: the counter ticks every 100 ns.
            a.mov(ecx, 100_000u32).unwrap();
            let mut spin = a.create_label();
            a.set_label(&mut spin).unwrap();
            a.dec(ecx).unwrap();
            a.jnz(spin).unwrap();
        }
        a.out(0x7fu32, eax).unwrap();
        a.hlt().unwrap();
    })
}

/// Runs to the write of port 0x7f; returns the port writes before it.
fn port_writes(vcpu: &mut Vcpu) -> Vec<(u16, u64)> {
    let mut run = RunState::new();
    let mut out = Vec::new();
    loop {
        match vcpu.enter_guest(&mut run).unwrap() {
            Exit::IoOut { port: 0x7f, .. } => return out,
            Exit::IoOut { port, data, .. } => out.push((port, data)),
            other => panic!("unexpected {other} after {out:x?}"),
        }
    }
}

#[test]
fn hyperv_is_offered_when_the_host_emulates_it_and_refused_with_the_reason_when_not() {
    let hv = hypervisor();
    let vm = vm_with(VmConfig { vcpus: 1, memory: 16 << 20, split_irqchip: true, ..Default::default() });
    let mut vcpu = reference_counter_guest(&vm);
    match hv.supported_hv_cpuid() {
        Ok(leaves) => {
            assert!(hv.capabilities().hyperv);
            vcpu.set_cpuid(&with_hyperv(&hv.supported_cpuid().unwrap(), &leaves)).unwrap();
            vcpu.enable_hyperv_synic().expect("SynIC with an in-kernel local APIC");
            let writes = port_writes(&mut vcpu);
            assert_eq!(writes[0], (0x70, u64::from(HV_SIGNATURE)), "{writes:x?}");
            let (first, second) = (writes[1], writes[2]);
            assert_eq!((first.0, second.0), (0x71, 0x71), "reference counter reads: {writes:x?}");
            assert!(second.1 > first.1, "the reference counter advances: {writes:x?}");
        }
        Err(err) => {
            assert!(!hv.capabilities().hyperv);
            assert!(matches!(err, HypervisorError::NoHyperv(_)), "{err}");
            assert!(err.to_string().contains("KVM_CAP_SYS_HYPERV_CPUID"), "{err}");
            let synic = vcpu.enable_hyperv_synic().unwrap_err();
            assert!(synic.to_string().contains("HYPERV_SYNIC2"), "{synic}");
            // The host fact behind the refusal: no Hyper-V MSRs at all.
            vcpu.set_cpuid(&hv.supported_cpuid().unwrap()).unwrap();
            let writes = port_writes(&mut vcpu);
            assert_eq!(&writes[1..], &[(0x77, 13), (0x71, 13), (0x77, 13), (0x71, 13)], "{writes:x?}");
        }
    }
}

#[test]
fn with_hyperv_keeps_kvms_signature_one_block_up() {
    let hv = hypervisor();
    let base = hv.supported_cpuid().unwrap();
    let kvm_sig = base.as_slice().iter().find(|e| e.function == 0x4000_0000).map(|e| (e.ebx, e.ecx, e.edx));
    let hv_leaves = nkvm::Cpuid::from_entries(&[kvm_bindings::kvm_cpuid_entry2 {
        function: 0x4000_0001,
        eax: HV_SIGNATURE,
        ..Default::default()
    }])
    .unwrap();
    let merged = with_hyperv(&base, &hv_leaves);
    let at = |f: u32| merged.as_slice().iter().find(|e| e.function == f).copied();
    assert_eq!(at(0x4000_0100).map(|e| (e.ebx, e.ecx, e.edx)), kvm_sig);
    assert_eq!(at(0x4000_0001).map(|e| e.eax), Some(HV_SIGNATURE));
    // A guest sees what was set.
    let vm = vm();
    let vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_cpuid(&merged).unwrap();
    let seen = vcpu.cpuid().unwrap();
    assert!(seen.as_slice().iter().any(|e| e.function == 0x4000_0001 && e.eax == HV_SIGNATURE));
}
