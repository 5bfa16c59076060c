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

/// Runs `vcpu` until its next exit, kicked out after `limit` (a hung
/// vCPU shows as `Exit::Kicked`, not as a hung test).
fn next_exit_within(vcpu: &mut nkvm::Vcpu, run: &mut RunState, limit: std::time::Duration) -> Exit {
    let kicker = vcpu.kicker();
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if finished.recv_timeout(limit).is_err() {
            kicker.kick();
        }
    });
    let exit = vcpu.enter_guest(run).unwrap();
    let _ = done.send(());
    watchdog.join().unwrap();
    exit
}

/// A vCPU saved while an INIT and a SIPI sent to it wait in its local
/// APIC: KVM acts on them when the MP state is read, so the registers
/// must be read after that, or the restored vCPU resumes the old code
/// (or waits for a SIPI that was already used).
#[test]
fn a_vcpu_saved_with_init_and_sipi_pending_restores_into_the_sipi_code() {
    const LAPIC: u64 = 0xfee0_0000;
    let config = nkvm::VmConfig { vcpus: 2, memory: 16 << 20, split_irqchip: true, ..Default::default() };
    let vm = vm_with(config);
    // The SIPI vector 0x10's code, at 0x10000: out 0x30, al; hlt.
    vm.write_memory(nkvm::GuestAddress(0x10000), &[0xe6, 0x30, 0xf4]).unwrap();
    let mut ap = long_mode_guest(&vm, 1, |a| {
        let mut top = a.create_label();
        a.set_label(&mut top).unwrap();
        a.out(0x10, eax).unwrap();
        a.jmp(top).unwrap();
    });
    let mut bsp = long_mode_guest(&vm, 0, |a| {
        a.mov(rdi, LAPIC).unwrap();
        a.mov(dword_ptr(rdi + 0xf0), 0x1ffu32).unwrap(); // software enable
        a.mov(dword_ptr(rdi + 0x310), 1u32 << 24).unwrap();
        a.mov(dword_ptr(rdi + 0x300), 0x4500u32).unwrap(); // INIT to APIC 1
        a.mov(dword_ptr(rdi + 0x310), 1u32 << 24).unwrap();
        a.mov(dword_ptr(rdi + 0x300), 0x4610u32).unwrap(); // SIPI, vector 0x10
        a.out(0x20, eax).unwrap();
        a.hlt().unwrap();
    });
    let (mut bsp_run, mut ap_run) = (RunState::new(), RunState::new());
    assert!(matches!(ap.enter_guest(&mut ap_run).unwrap(), Exit::IoOut { port: 0x10, .. }));
    assert!(matches!(bsp.enter_guest(&mut bsp_run).unwrap(), Exit::IoOut { port: 0x20, .. }));
    let saved_ap = ap.save_state(&mut ap_run).unwrap();
    let saved_bsp = bsp.save_state(&mut bsp_run).unwrap();
    let saved_vm = vm.save_state().unwrap();
    assert_eq!(saved_ap.regs.rip, 0, "the SIPI's entry (CS 0x1000, IP 0) is what was saved");
    assert_eq!(saved_ap.sregs.cs.selector, 0x1000);
    let original = next_exit_within(&mut ap, &mut ap_run, std::time::Duration::from_secs(5));
    assert!(matches!(original, Exit::IoOut { port: 0x30, .. }), "{original}");
    // The same in a new VM, from the saved values.
    let vm2 = vm_with(saved_vm.config());
    let mut ram = vec![0u8; 16 << 20];
    vm.read_memory(nkvm::GuestAddress(0), &mut ram).unwrap();
    vm2.write_memory(nkvm::GuestAddress(0), &ram).unwrap();
    vm2.restore_state(&saved_vm).unwrap();
    vm2.create_vcpu(0).unwrap().restore_state(&saved_bsp).unwrap();
    let mut restored = vm2.create_vcpu(1).unwrap();
    restored.restore_state(&saved_ap).unwrap();
    let exit = next_exit_within(&mut restored, &mut RunState::new(), std::time::Duration::from_secs(5));
    assert_eq!(exit.to_string(), original.to_string(), "the restored vCPU continues as the original did");
}

/// A state restored over a vCPU whose last exit (an MMIO read) was never
/// completed: KVM must not apply that read over the restored registers.
#[test]
fn restoring_over_an_unanswered_read_resumes_where_the_state_was_saved() {
    let vm = vm();
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        a.out(0x10, eax).unwrap();
        a.mov(rdi, MMIO_BASE).unwrap();
        a.mov(eax, dword_ptr(rdi)).unwrap();
        a.out(0x11, eax).unwrap();
        a.hlt().unwrap();
    });
    let mut run = RunState::new();
    assert!(matches!(vcpu.enter_guest(&mut run).unwrap(), Exit::IoOut { port: 0x10, .. }));
    let saved = vcpu.save_state(&mut run).unwrap();
    assert!(matches!(vcpu.enter_guest(&mut run).unwrap(), Exit::MmioRead { .. }), "left unanswered");
    vcpu.restore_state(&saved).unwrap();
    let mut run = RunState::new();
    let exit = next_exit_within(&mut vcpu, &mut run, std::time::Duration::from_secs(5));
    assert!(matches!(exit, Exit::MmioRead { .. }), "the read again, not the instruction after it: {exit}");
}

/// The guest's TSC rate travels with the state: restored at another
/// rate, the vCPU runs at that rate (a host with TSC scaling) or the
/// restore says why it cannot, naming the rate.
#[test]
fn the_tsc_rate_is_saved_and_a_different_one_is_set_or_refused_by_name() {
    let vm = vm();
    let mut vcpu = long_mode_guest(&vm, 0, |a| a.hlt().unwrap());
    let mut run = RunState::new();
    let mut saved = vcpu.save_state(&mut run).unwrap();
    let khz = saved.tsc_khz.expect("KVM reports the TSC rate");
    assert!(khz > 100_000, "{khz} kHz");
    saved.tsc_khz = Some(khz + khz / 10);
    let mut other = vm.create_vcpu(1).unwrap();
    saved.id = 1;
    match other.restore_state(&saved) {
        Ok(()) => assert_eq!(other.save_state(&mut RunState::new()).unwrap().tsc_khz, saved.tsc_khz),
        Err(e) => assert!(e.to_string().contains(&format!("TSC runs at {} kHz", khz + khz / 10)), "{e}"),
    }
}
