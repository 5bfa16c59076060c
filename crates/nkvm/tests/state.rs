//! Saved state: a guest stopped mid-run, saved, encoded, decoded and
//! restored into a new VM over a copy of its RAM continues exactly where
//! it stopped; bad blobs, and states whose CPU features this host's KVM
//! cannot offer, are refused with an error that names the fault.

mod common;

use common::*;
use iced_x86::code_asm::*;
use nkvm::state::{CpuidRegister, FormatError, MissingFeature, StateError, VcpuState, VmState};
use nkvm::{Exit, GuestAddress, RunState, Vcpu, Vm, VmConfig};

const IA32_TSC: u32 = 0x10;
const IA32_LSTAR: u32 = 0xc000_0082;
const LSTAR: u64 = 0x7700_0000;
/// Where the guests keep their counter and last TSC.
const DATA: u64 = 0x5000;
const LAPIC: u64 = 0xfee0_0000;

/// Runs `vcpu` until its next port write and returns it as (port, data).
fn next_out(vcpu: &mut Vcpu, run: &mut RunState) -> (u16, u32) {
    match vcpu.enter_guest(run).expect("enter_guest") {
        Exit::IoOut { port, data, .. } => (port, data as u32),
        other => panic!("vCPU {}: unexpected {other}", vcpu.id()),
    }
}

/// A new VM with the same configuration and a copy of `old`'s RAM, restored
/// from blobs that went through the byte encoding.
fn restore_into_new_vm(old: &Vm, vm_blob: &[u8], vcpu_blobs: &[Vec<u8>]) -> (Vm, Vec<Vcpu>) {
    let vm_state = VmState::decode(vm_blob).expect("decode VM state");
    let vm = vm_with(vm_state.config());
    let mut ram = vec![0u8; old.config().memory as usize];
    old.read_memory(GuestAddress(0), &mut ram).unwrap();
    vm.write_memory(GuestAddress(0), &ram).unwrap();
    vm.restore_state(&vm_state).expect("restore VM state");
    let vcpus = vcpu_blobs
        .iter()
        .map(|blob| {
            let state = VcpuState::decode(blob).expect("decode vCPU state");
            let mut vcpu = vm.create_vcpu(state.id).unwrap();
            vcpu.restore_state(&state).expect("restore vCPU state");
            vcpu
        })
        .collect();
    (vm, vcpus)
}

/// The counting guest: each turn it reads its step from port 0x12 (the
/// test answers 1) and adds it to RBX, stores RBX at DATA, writes RBX +
/// LSTAR to port 0x10 (so the MSR must survive) and the TSC's advance
/// since the last turn, in units of 2^20 cycles, to port 0x11 (the guest's
/// TSC must not go backwards; on kvm_pvm guests read the host's TSC and
/// KVM ignores TSC writes, so there this holds even without restoring it).
fn counting_guest(a: &mut CodeAssembler) {
    let mut top = a.create_label();
    a.xor(ebx, ebx).unwrap();
    a.mov(rdi, DATA).unwrap();
    a.rdtsc().unwrap();
    a.shl(rdx, 32).unwrap();
    a.or(rax, rdx).unwrap();
    a.mov(qword_ptr(rdi + 8), rax).unwrap();
    a.set_label(&mut top).unwrap();
    a.in_(eax, 0x12).unwrap();
    a.add(rbx, rax).unwrap();
    a.mov(qword_ptr(rdi), rbx).unwrap();
    a.mov(ecx, IA32_LSTAR).unwrap();
    a.rdmsr().unwrap();
    a.add(eax, ebx).unwrap();
    a.out(0x10, eax).unwrap();
    a.rdtsc().unwrap();
    a.shl(rdx, 32).unwrap();
    a.or(rax, rdx).unwrap();
    a.mov(rsi, rax).unwrap();
    a.sub(rax, qword_ptr(rdi + 8)).unwrap();
    a.mov(qword_ptr(rdi + 8), rsi).unwrap();
    a.sar(rax, 20).unwrap();
    a.out(0x11, eax).unwrap();
    a.jmp(top).unwrap();
}

/// Answers the step read of one turn with 1.
fn counting_step(vcpu: &mut Vcpu, run: &mut RunState) {
    match vcpu.enter_guest(run).expect("enter_guest") {
        Exit::IoIn { port: 0x12, .. } => run.complete_read(1),
        other => panic!("expected the step read, got {other}"),
    }
}

/// The rest of a turn after its step read; returns its counter.
fn counting_outputs(vcpu: &mut Vcpu, run: &mut RunState) -> u32 {
    let (port, data) = next_out(vcpu, run);
    assert_eq!(port, 0x10, "the turn's counter follows its step read");
    let counter = data.wrapping_sub(LSTAR as u32);
    let (port, tsc_step) = next_out(vcpu, run);
    assert_eq!(port, 0x11);
    let tsc_step = tsc_step as i32;
    assert!((0..4096).contains(&tsc_step), "turn {counter}: the guest's TSC moved by {tsc_step} << 20 cycles");
    counter
}

/// Runs one turn of the counting guest; returns its counter.
fn counting_turn(vcpu: &mut Vcpu, run: &mut RunState) -> u32 {
    counting_step(vcpu, run);
    counting_outputs(vcpu, run)
}

#[test]
fn a_restored_vcpu_continues_exactly_where_the_saved_one_stopped() {
    let vm = vm_with(VmConfig { vcpus: 1, memory: 16 << 20, ..Default::default() });
    let mut vcpu = long_mode_guest(&vm, 0, counting_guest);
    // A TSC far above what a fresh vCPU starts with (ignored by kvm_pvm).
    assert_eq!(vcpu.set_msrs(&[(IA32_LSTAR, LSTAR), (IA32_TSC, 1 << 40)]).unwrap(), 2);
    let mut run = RunState::new();
    let mut seen: Vec<u32> = (0..10).map(|_| counting_turn(&mut vcpu, &mut run)).collect();
    // Stopped at turn 11's read, answered in the RunState but not yet
    // delivered: save_state must deliver it, or the restored guest would
    // read again.
    counting_step(&mut vcpu, &mut run);

    let state = vcpu.save_state(&mut run).expect("save vCPU state");
    eprintln!(
        "{} MSRs saved: {:x?}; unreadable here: {:x?}",
        state.msrs.len(),
        state.msrs.iter().map(|m| m.0).collect::<Vec<_>>(),
        state.unreadable_msrs
    );
    assert!(state.msrs.iter().any(|&(i, v)| i == IA32_LSTAR && v == LSTAR), "LSTAR saved");
    let blobs = [state.encode()];
    let vm_blob = vm.save_state().expect("save VM state").encode();
    drop(vcpu);

    let (new_vm, mut vcpus) = restore_into_new_vm(&vm, &vm_blob, &blobs);
    let vcpu = &mut vcpus[0];
    let mut run = RunState::new();
    // Turn 11's outputs, then turns 12.. — no gap, no repeat.
    seen.push(counting_outputs(vcpu, &mut run));
    seen.extend((0..10).map(|_| counting_turn(vcpu, &mut run)));
    assert_eq!(seen, (1..=21).collect::<Vec<_>>());
    let mut counter = [0u8; 8];
    new_vm.read_memory(GuestAddress(DATA), &mut counter).unwrap();
    assert_eq!(u64::from_le_bytes(counter), 21);

    // What KVM reports now is what was saved, but for what time moves.
    let back = vcpus[0].save_state(&mut RunState::new()).unwrap();
    assert_eq!(back.sregs, state.sregs);
    assert_eq!(back.xcrs, state.xcrs);
    assert_eq!(back.debug_regs, state.debug_regs);
    assert_eq!(back.cpuid, state.cpuid);
    let msrs = |s: &VcpuState| -> Vec<(u32, u64)> { s.msrs.iter().copied().filter(|&(i, _)| i != IA32_TSC).collect() };
    assert_eq!(msrs(&back), msrs(&state));
}

/// The APIC guest (vCPU `id`): enables its local APIC (SVR), sets TPR to
/// 0x10 + id, starts a one-shot timer (vector 0x40) with interrupts off —
/// so the timer's interrupt stays pending in the IRR — then each turn
/// writes `counter | TPR << 16 | IRR[0x40] << 24 | TMICT != 0 << 25` to
/// port 0x10.
fn apic_guest(id: u32) -> impl FnOnce(&mut CodeAssembler) {
    move |a: &mut CodeAssembler| {
        let mut top = a.create_label();
        a.cli().unwrap();
        a.mov(rdi, LAPIC).unwrap();
        a.mov(dword_ptr(rdi + 0xf0), 0x1ffu32).unwrap(); // SVR: enabled, spurious 0xff
        a.mov(dword_ptr(rdi + 0x80), 0x10 + id).unwrap(); // TPR
        a.mov(dword_ptr(rdi + 0x3e0), 0xbu32).unwrap(); // divide by 1
        a.mov(dword_ptr(rdi + 0x320), 0x40u32).unwrap(); // LVT timer: one-shot, vector 0x40
        a.mov(dword_ptr(rdi + 0x380), 1000u32).unwrap(); // initial count
        a.xor(ebx, ebx).unwrap();
        a.set_label(&mut top).unwrap();
        a.inc(ebx).unwrap();
        a.mov(eax, dword_ptr(rdi + 0x80)).unwrap();
        a.shl(eax, 16).unwrap();
        a.or(eax, ebx).unwrap();
        a.mov(ecx, dword_ptr(rdi + 0x220)).unwrap(); // IRR bits 0x40..0x5f
        a.and(ecx, 1).unwrap();
        a.shl(ecx, 24).unwrap();
        a.or(eax, ecx).unwrap();
        a.mov(ecx, dword_ptr(rdi + 0x380)).unwrap();
        a.test(ecx, ecx).unwrap();
        a.setnz(cl).unwrap();
        a.movzx(ecx, cl).unwrap();
        a.shl(ecx, 25).unwrap();
        a.or(eax, ecx).unwrap();
        a.out(0x10, eax).unwrap();
        a.jmp(top).unwrap();
    }
}

/// (counter, TPR, timer interrupt pending, initial count set) of one turn.
fn apic_turn(vcpu: &mut Vcpu, run: &mut RunState) -> (u32, u32, bool, bool) {
    let (port, data) = next_out(vcpu, run);
    assert_eq!(port, 0x10);
    (data & 0xffff, (data >> 16) & 0xff, data & (1 << 24) != 0, data & (1 << 25) != 0)
}

#[test]
fn two_vcpus_with_in_kernel_apics_keep_tpr_and_a_pending_timer_interrupt() {
    let vm = vm_with(VmConfig { vcpus: 2, memory: 16 << 20, split_irqchip: true, ..Default::default() });
    let mut vcpus: Vec<Vcpu> = (0..2).map(|id| long_mode_guest(&vm, id, apic_guest(id))).collect();
    let mut runs = [RunState::new(), RunState::new()];
    for turn in 1..=5 {
        for (vcpu, run) in vcpus.iter_mut().zip(&mut runs) {
            let (counter, tpr, _, tmict) = apic_turn(vcpu, run);
            assert_eq!((counter, tpr, tmict), (turn, 0x10 + vcpu.id(), true));
        }
    }
    // Let the timer fire (1000 cycles) and be held pending with IF = 0.
    std::thread::sleep(std::time::Duration::from_millis(5));
    for (vcpu, run) in vcpus.iter_mut().zip(&mut runs) {
        let (counter, _, pending, _) = apic_turn(vcpu, run);
        assert_eq!(counter, 6);
        assert!(pending, "vCPU {}: the timer interrupt is pending before the save", vcpu.id());
    }
    let blobs: Vec<Vec<u8>> =
        vcpus.iter_mut().zip(&mut runs).map(|(v, r)| v.save_state(r).expect("save vCPU").encode()).collect();
    let vm_blob = vm.save_state().expect("save VM").encode();
    drop(vcpus);

    let (_new_vm, mut vcpus) = restore_into_new_vm(&vm, &vm_blob, &blobs);
    let mut runs = [RunState::new(), RunState::new()];
    for turn in 7..=10 {
        for (vcpu, run) in vcpus.iter_mut().zip(&mut runs) {
            let got = apic_turn(vcpu, run);
            assert_eq!(got, (turn, 0x10 + vcpu.id(), true, true), "vCPU {} after the restore", vcpu.id());
        }
    }
}

#[test]
fn bad_blobs_and_mismatched_targets_are_refused_with_named_errors() {
    let vm = vm_with(VmConfig { vcpus: 2, memory: 16 << 20, ..Default::default() });
    let mut vcpu = long_mode_guest(&vm, 1, |a| {
        a.hlt().unwrap();
    });
    let blob = vcpu.save_state(&mut RunState::new()).unwrap().encode();

    let err = VcpuState::decode(&blob[..blob.len() - 1]).unwrap_err();
    assert!(matches!(err, FormatError::LengthMismatch { .. }), "{err}");
    let mut newer = blob.clone();
    newer[4] = 9;
    let err = VcpuState::decode(&newer).unwrap_err();
    assert_eq!(err, FormatError::UnsupportedVersion { found: 9, supported: 1 });
    assert!(err.to_string().contains("version 9"), "{err}");
    let mut altered = blob.clone();
    altered[blob.len() / 2] ^= 0x40;
    let err = VcpuState::decode(&altered).unwrap_err();
    assert!(matches!(err, FormatError::Checksum { .. }), "{err}");
    assert!(matches!(VmState::decode(&blob), Err(FormatError::WrongKind { found: 1, .. })));

    let state = VcpuState::decode(&blob).unwrap();
    let mut other = vm.create_vcpu(0).unwrap();
    let err = other.restore_state(&state).unwrap_err();
    assert!(matches!(err, StateError::VcpuIdMismatch { state: 1, vcpu: 0 }), "{err}");

    let vm_state = vm.save_state().unwrap();
    let smaller = vm_with(VmConfig { vcpus: 2, memory: 8 << 20, ..Default::default() });
    let err = smaller.restore_state(&vm_state).unwrap_err();
    assert!(matches!(err, StateError::ConfigMismatch { what: "memory", .. }), "{err}");
}

#[test]
fn a_state_with_a_cpu_feature_kvm_cannot_offer_is_refused_before_anything_is_written() {
    let supported = hypervisor().supported_cpuid().unwrap();
    let vm = vm_with(VmConfig { vcpus: 1, memory: 16 << 20, ..Default::default() });
    let mut vcpu = long_mode_guest(&vm, 0, counting_guest);
    vcpu.set_cpuid(&supported).unwrap();
    assert_eq!(vcpu.set_msrs(&[(IA32_LSTAR, LSTAR)]).unwrap(), 1);
    let mut run = RunState::new();
    assert_eq!((0..3).map(|_| counting_turn(&mut vcpu, &mut run)).collect::<Vec<_>>(), [1, 2, 3]);
    counting_step(&mut vcpu, &mut run);
    let state = VcpuState::decode(&vcpu.save_state(&mut run).unwrap().encode()).unwrap();
    let vm_blob = vm.save_state().unwrap().encode();
    drop(vcpu);

    // A leaf 7 EBX feature bit (none of them is exempt from the check) that
    // this host's KVM neither lists nor gives a vCPU it was given its list
    // (kvm_pvm gives more: the saved CPUID is what KVM gave), given to the
    // saved guest.
    let leaf7 = |e: &kvm_bindings::kvm_cpuid_entry2| e.function == 7 && e.index == 0;
    let listed = supported.as_slice().iter().find(|e| leaf7(e)).expect("KVM lists leaf 7").ebx;
    let given = state.cpuid.iter().find(|e| leaf7(e)).expect("the state has leaf 7").ebx;
    let offered = listed | given;
    let bit = (0..32u8).rev().find(|&b| offered & (1 << b) == 0).expect("a leaf 7 EBX bit KVM does not offer");
    let mut altered = state.clone();
    altered.cpuid.iter_mut().find(|e| leaf7(e)).unwrap().ebx |= 1 << bit;

    let (new_vm, _) = restore_into_new_vm(&vm, &vm_blob, &[]);
    let mut target = new_vm.create_vcpu(0).unwrap();
    let before = (target.regs().unwrap(), target.sregs().unwrap(), target.cpuid().unwrap().as_slice().to_vec());
    let err = target.restore_state(&altered).unwrap_err();
    let text = err.to_string();
    let feature = MissingFeature { leaf: 7, subleaf: 0, register: CpuidRegister::Ebx, bit };
    assert!(matches!(&err, StateError::CpuFeatures { id: 0, missing } if missing[..] == [feature]), "{err}");
    assert!(text.contains(&format!("leaf 0x7 subleaf 0 EBX bit {bit}")), "{text}");
    assert!(text.contains("restore on a host whose CPU and KVM offer them"), "{text}");
    assert!(target.check_cpu_features(&altered).is_err());
    let after = (target.regs().unwrap(), target.sregs().unwrap(), target.cpuid().unwrap().as_slice().to_vec());
    assert!(after == before, "the refused restore wrote to the vCPU");

    // The state as saved passes, and the guest goes on with turn 4.
    target.check_cpu_features(&state).unwrap();
    target.restore_state(&state).expect("restore the untouched state");
    let mut run = RunState::new();
    assert_eq!(counting_outputs(&mut target, &mut run), 4);
    assert_eq!(counting_turn(&mut target, &mut run), 5);
}
