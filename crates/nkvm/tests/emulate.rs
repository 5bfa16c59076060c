//! Emulation failures completed in user space, with real guests: `int3` in
//! long mode (an emulation failure on this nested host) becomes the #BP
//! the guest's IDT handler expects, as do `int n` and `int1`, and invalid
//! encodings become #UD; `clac`/`stac`, `ldmxcsr`/`stmxcsr`, `popcnt`,
//! `movbe`, `lock cmpxchg16b`, the XSAVE family and `clflush` are performed
//! on the guest's registers and memory; other instructions give a named
//! error. On hosts whose KVM runs
//! these instructions itself nothing needs completing, and the guest must
//! see the same results.

mod common;

use common::*;
use iced_x86::code_asm::*;
use nkvm::emulate::{complete, EmulateError, Emulated};
use nkvm::{Exit, GuestAddress, RunState, Vcpu, Vm};

#[test]
fn int3_is_delivered_to_the_guest_as_a_breakpoint() {
    let vm = vm();
    // #BP handler: report the return address it was given, then return.
    install_handler(&vm, 3, |a| {
        a.mov(rax, qword_ptr(rsp)).unwrap();
        a.out(0x70u32, eax).unwrap();
        a.iretq().unwrap();
    });
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        a.mov(rax, IDTR).unwrap();
        a.lidt(ptr(rax)).unwrap();
        a.int3().unwrap();
        a.mov(eax, 0x1234u32).unwrap();
        a.out(0x71u32, eax).unwrap();
        a.hlt().unwrap();
    });
    // The int3 is 13 bytes in (mov rax, imm64 is 10; lidt [rax] is 3).
    let after_int3 = LONG_MODE_ENTRY + 10 + 3 + 1;
    let (reports, done) = run_completing(&vm, &mut vcpu);
    // On hosts that emulate int3 themselves, nothing needed completing.
    eprintln!("int3 completions in user space: {}", done.len());
    assert!(done.iter().all(|d| *d == Emulated::Injected { vector: 3, instruction: "int3".into() }), "{done:?}");
    assert_eq!(reports, vec![(0x70, after_int3 & 0xffff_ffff), (0x71, 0x1234)]);
}

#[test]
fn an_invalid_instruction_raises_invalid_opcode() {
    let vm = vm();
    // #UD handler: report the faulting RIP, then skip the 4-byte instruction.
    install_handler(&vm, 6, |a| {
        a.mov(rax, qword_ptr(rsp)).unwrap();
        a.out(0x70u32, eax).unwrap();
        a.add(qword_ptr(rsp), 4).unwrap();
        a.iretq().unwrap();
    });
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        a.mov(rax, IDTR).unwrap();
        a.lidt(ptr(rax)).unwrap();
        // `movbe eax, eax`: movbe takes only a memory operand, so no CPU
        // runs this encoding and the assembler will not produce it.
        a.db(&[0x0f, 0x38, 0xf0, 0xc0]).unwrap();
        a.mov(eax, 0x600du32).unwrap();
        a.out(0x71u32, eax).unwrap();
        a.hlt().unwrap();
    });
    let at_invalid = LONG_MODE_ENTRY + 10 + 3;
    let (reports, done) = run_completing(&vm, &mut vcpu);
    eprintln!("completed in user space: {done:?}");
    assert!(done.iter().all(|d| matches!(d, Emulated::Injected { vector: 6, .. })), "{done:?}");
    assert_eq!(reports, vec![(0x70, at_invalid), (0x71, 0x600d)]);
}

#[test]
fn int_n_and_int1_reach_their_idt_handlers_with_rip_after_them() {
    let vm = vm();
    // Both handlers report their vector's port and the return address.
    for (vector, port) in [(0x21, 0x72u32), (1, 0x73u32)] {
        install_handler(&vm, vector, |a| {
            a.mov(rax, qword_ptr(rsp)).unwrap();
            a.out(port, eax).unwrap();
            a.iretq().unwrap();
        });
    }
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        a.mov(rax, IDTR).unwrap();
        a.lidt(ptr(rax)).unwrap();
        a.int(0x21).unwrap();
        a.int1().unwrap();
        a.mov(eax, 0x600du32).unwrap();
        a.out(0x71u32, eax).unwrap();
        a.hlt().unwrap();
    });
    let after_int = LONG_MODE_ENTRY + 10 + 3 + 2;
    let (reports, done) = run_completing(&vm, &mut vcpu);
    eprintln!("completed in user space: {done:?}");
    assert_eq!(reports, vec![(0x72, after_int), (0x73, after_int + 1), (0x71, 0x600d)]);
}

#[test]
fn int_n_through_a_not_present_gate_raises_segment_not_present() {
    let vm = vm();
    // #NP handler: report the error code, skip the 2-byte int n.
    install_handler(&vm, 11, |a| {
        a.pop(rax).unwrap();
        a.out(0x72u32, eax).unwrap();
        a.add(qword_ptr(rsp), 2).unwrap();
        a.iretq().unwrap();
    });
    install_handler(&vm, 0x22, |a| {
        a.iretq().unwrap();
    });
    // Clear the present bit of gate 0x22.
    vm.write_memory(GuestAddress(IDT + 16 * 0x22 + 5), &[0x0e]).unwrap();
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        a.mov(rax, IDTR).unwrap();
        a.lidt(ptr(rax)).unwrap();
        a.int(0x22).unwrap();
        a.mov(eax, 0x600du32).unwrap();
        a.out(0x70u32, eax).unwrap();
        a.hlt().unwrap();
    });
    let (reports, done) = run_completing(&vm, &mut vcpu);
    eprintln!("completed in user space: {done:?}");
    // The IDT error code: vector * 8 + 2.
    assert_eq!(reports, vec![(0x72, 0x22 * 8 + 2), (0x70, 0x600d)]);
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
            let err = complete(&vcpu, &vm, &e).unwrap_err();
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
    let (reports, _) = run_completing(&vm, &mut vcpu);
    assert_eq!(reports, vec![(0x70, 9), (0x71, 1)]);
}

#[test]
#[ignore = "on this nested host KVM's emulator raises #UD for movbe itself (guest CPUID.1.ECX.MOVBE = 1), \
            so nkvm never sees it; run where movbe comes back as an emulation failure"]
fn movbe_loads_and_stores_with_the_bytes_reversed() {
    let vm = vm();
    vm.write_memory(GuestAddress(0x5000), &0x0102_0304_0506_0708u64.to_le_bytes()).unwrap();
    // A #UD (what this host's KVM raises for movbe) is reported, not a triple fault.
    install_handler(&vm, 6, |a| {
        a.mov(eax, 6u32).unwrap();
        a.out(0x7fu32, eax).unwrap();
        a.hlt().unwrap();
    });
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        a.mov(rax, IDTR).unwrap();
        a.lidt(ptr(rax)).unwrap();
        a.mov(rbx, 0x5000u64).unwrap();
        a.mov(rax, u64::MAX).unwrap();
        a.movbe(ax, word_ptr(rbx)).unwrap(); // keeps the upper 48 bits
        a.mov(rsi, rax).unwrap();
        a.out(0x70u32, eax).unwrap();
        a.shr(rsi, 32).unwrap();
        a.mov(eax, esi).unwrap();
        a.out(0x71u32, eax).unwrap();
        a.mov(rax, u64::MAX).unwrap();
        a.movbe(eax, dword_ptr(rbx)).unwrap(); // clears the upper 32 bits
        a.mov(rsi, rax).unwrap();
        a.out(0x72u32, eax).unwrap();
        a.shr(rsi, 32).unwrap();
        a.mov(eax, esi).unwrap();
        a.out(0x73u32, eax).unwrap();
        a.movbe(rax, qword_ptr(rbx)).unwrap();
        a.out(0x74u32, eax).unwrap();
        a.mov(rcx, 0x1122_3344_5566_7788u64).unwrap();
        a.movbe(qword_ptr(rbx + 0x10), rcx).unwrap();
        a.movbe(dword_ptr(rbx + 0x20), ecx).unwrap();
        a.movbe(word_ptr(rbx + 0x30), cx).unwrap();
        a.hlt().unwrap();
    });
    vcpu.set_cpuid(&hypervisor().supported_cpuid().unwrap()).unwrap();
    let (reports, done) = run_completing(&vm, &mut vcpu);
    eprintln!("completed in user space: {done:?}");
    assert_eq!(
        reports,
        vec![(0x70, 0xffff_0807), (0x71, 0xffff_ffff), (0x72, 0x0807_0605), (0x73, 0), (0x74, 0x0403_0201)]
    );
    let mut stored = [0u8; 0x38];
    vm.read_memory(GuestAddress(0x5000), &mut stored).unwrap();
    assert_eq!(stored[0x10..0x18], 0x8877_6655_4433_2211u64.to_le_bytes());
    assert_eq!(stored[0x20..0x28], 0x8877_6655u64.to_le_bytes());
    assert_eq!(stored[0x30..0x38], 0x8877u64.to_le_bytes());
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
    let (reports, done) = run_completing(&vm, &mut vcpu);
    assert!(done.iter().all(|d| *d == Emulated::Completed { instruction: "wait".into() }), "{done:?}");
    assert_eq!(reports, vec![(0x70, 7)]);
}

/// A long-mode guest with CPUID from KVM's supported list (so it may set
/// CR4.OSXSAVE), XSAVE enabled and XCR0 = x87 | SSE, then `body`.
fn xsave_guest(vm: &Vm, body: impl FnOnce(&mut iced_x86::code_asm::CodeAssembler)) -> Vcpu {
    let vcpu = long_mode_guest(vm, 0, |a| {
        a.mov(rax, IDTR).unwrap();
        a.lidt(ptr(rax)).unwrap();
        a.mov(rax, cr4).unwrap();
        a.or(rax, 1 << 18).unwrap();
        a.mov(cr4, rax).unwrap();
        a.xor(ecx, ecx).unwrap();
        a.xor(edx, edx).unwrap();
        a.mov(eax, 3u32).unwrap();
        a.xsetbv().unwrap();
        body(a);
        a.hlt().unwrap();
    });
    vcpu.set_cpuid(&hypervisor().supported_cpuid().unwrap()).unwrap();
    vcpu
}

#[test]
fn xrstor_loads_and_xsave_and_xsavec_store_sse_state() {
    let vm = vm();
    // A standard-format image: MXCSR 0x3f80, XMM1 a pattern, XSTATE_BV = SSE.
    let mut image = [0u8; 576];
    image[24..28].copy_from_slice(&0x3f80u32.to_le_bytes());
    image[176..192].copy_from_slice(&0x0123_4567_89ab_cdef_fedc_ba98_7654_3210u128.to_le_bytes());
    image[512] = 2;
    vm.write_memory(GuestAddress(0x8000), &image).unwrap();
    let mut vcpu = xsave_guest(&vm, |a| {
        a.xor(ecx, ecx).unwrap();
        a.xgetbv().unwrap();
        a.out(0x70u32, eax).unwrap();
        a.mov(rbx, 0x8000u64).unwrap();
        a.mov(eax, 3u32).unwrap();
        a.xor(edx, edx).unwrap();
        a.xrstor64(ptr(rbx)).unwrap();
        a.xsave64(ptr(rbx + 0x1000)).unwrap();
        a.xsavec64(ptr(rbx + 0x2000)).unwrap();
        a.stmxcsr(dword_ptr(rbx + 0x3000)).unwrap();
        a.mov(eax, dword_ptr(rbx + 0x3000)).unwrap();
        a.out(0x71u32, eax).unwrap();
    });
    let (reports, done) = run_completing(&vm, &mut vcpu);
    eprintln!("completed in user space: {done:?}");
    assert_eq!(reports, vec![(0x70, 3), (0x71, 0x3f80)]);
    let mut saved = [0u8; 576];
    vm.read_memory(GuestAddress(0x9000), &mut saved).unwrap();
    assert_eq!(saved[24..28], 0x3f80u32.to_le_bytes());
    assert_eq!(saved[176..192], image[176..192]);
    assert_eq!(saved[512] & 2, 2, "XSTATE_BV says SSE is in use");
    vm.read_memory(GuestAddress(0xa000), &mut saved).unwrap();
    assert_eq!(saved[176..192], image[176..192]);
    assert_eq!(saved[520..528], (3u64 | 1 << 63).to_le_bytes(), "XCOMP_BV = RFBM | compacted");
}

#[test]
fn xsave_family_faults_as_the_sdm_says() {
    let vm = vm();
    // #GP and #PF handlers report the vector's port and the error code,
    // then skip the 4-byte instruction.
    for (vector, port) in [(13, 0x72u32), (14, 0x73u32)] {
        install_handler(&vm, vector, |a| {
            a.pop(rax).unwrap();
            a.out(port, eax).unwrap();
            a.add(qword_ptr(rsp), 4).unwrap();
            a.iretq().unwrap();
        });
    }
    let mut vcpu = xsave_guest(&vm, |a| {
        a.mov(eax, 3u32).unwrap();
        a.xor(edx, edx).unwrap();
        // Not 64-byte aligned: #GP(0).
        a.mov(rbx, 0x8020u64).unwrap();
        a.xsave64(ptr(rbx)).unwrap();
        // Unmapped: #PF, a write for xsave, a read for xrstor and clflush.
        a.mov(rbx, 0x7700_0000_0000u64).unwrap();
        a.xsave64(ptr(rbx)).unwrap();
        a.xrstor64(ptr(rbx)).unwrap();
        a.clflush(byte_ptr(rbx + 1)).unwrap();
        // Mapped: clflush is a no-op.
        a.mov(rbx, 0x8000u64).unwrap();
        a.clflush(byte_ptr(rbx)).unwrap();
        a.mov(eax, 0x600du32).unwrap();
        a.out(0x70u32, eax).unwrap();
    });
    let (reports, done) = run_completing(&vm, &mut vcpu);
    eprintln!("completed in user space: {done:?}");
    assert_eq!(reports, vec![(0x72, 0), (0x73, 2), (0x73, 0), (0x73, 0), (0x70, 0x600d)]);
}

#[test]
fn clac_and_stac_flip_rflags_ac() {
    let vm = vm();
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        a.stac().unwrap();
        a.pushfq().unwrap();
        a.pop(rax).unwrap();
        a.out(0x70u32, eax).unwrap();
        a.clac().unwrap();
        a.pushfq().unwrap();
        a.pop(rax).unwrap();
        a.out(0x71u32, eax).unwrap();
        a.hlt().unwrap();
    });
    let (reports, done) = run_completing(&vm, &mut vcpu);
    eprintln!("completed in user space: {done:?}");
    assert_eq!(reports.len(), 2, "{reports:x?}");
    assert_eq!(reports[0].1 & (1 << 18), 1 << 18, "stac sets AC");
    assert_eq!(reports[1].1 & (1 << 18), 0, "clac clears AC");
}

#[test]
fn ldmxcsr_and_stmxcsr_round_trip_through_guest_memory() {
    let vm = vm();
    // 0x7f80: all exceptions masked, flush-to-zero off, round toward -inf.
    vm.write_memory(GuestAddress(0x5000), &0x3f80u32.to_le_bytes()).unwrap();
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        a.mov(rbx, 0x5000u64).unwrap();
        a.ldmxcsr(dword_ptr(rbx)).unwrap();
        a.stmxcsr(dword_ptr(rbx + 8)).unwrap();
        a.mov(eax, dword_ptr(rbx + 8)).unwrap();
        a.out(0x70u32, eax).unwrap();
        a.hlt().unwrap();
    });
    let (reports, done) = run_completing(&vm, &mut vcpu);
    eprintln!("completed in user space: {done:?}");
    assert_eq!(reports, vec![(0x70, 0x3f80)]);
    let mut stored = [0u8; 4];
    vm.read_memory(GuestAddress(0x5008), &mut stored).unwrap();
    assert_eq!(u32::from_le_bytes(stored), 0x3f80);
}

#[test]
fn ldmxcsr_with_reserved_bits_raises_general_protection() {
    let vm = vm();
    install_handler(&vm, 13, |a| {
        // Report the error code and skip the 3-byte ldmxcsr [rbx].
        a.pop(rax).unwrap();
        a.out(0x72u32, eax).unwrap();
        a.add(qword_ptr(rsp), 3).unwrap();
        a.iretq().unwrap();
    });
    vm.write_memory(GuestAddress(0x5000), &0x0001_1f80u32.to_le_bytes()).unwrap();
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        a.mov(rax, IDTR).unwrap();
        a.lidt(ptr(rax)).unwrap();
        a.mov(rbx, 0x5000u64).unwrap();
        a.ldmxcsr(dword_ptr(rbx)).unwrap();
        a.mov(eax, 0x600du32).unwrap();
        a.out(0x70u32, eax).unwrap();
        a.hlt().unwrap();
    });
    let (reports, done) = run_completing(&vm, &mut vcpu);
    eprintln!("completed in user space: {done:?}");
    assert_eq!(reports, vec![(0x72, 0), (0x70, 0x600d)]);
}

#[test]
fn popcnt_reads_a_memory_operand() {
    let vm = vm();
    vm.write_memory(GuestAddress(0x5000), &0x0000_ffff_0000_0007u64.to_le_bytes()).unwrap();
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        a.mov(rsi, 0x4ff8u64).unwrap();
        a.popcnt(rax, qword_ptr(rsi + 8)).unwrap();
        a.out(0x70u32, eax).unwrap();
        a.hlt().unwrap();
    });
    let (reports, _) = run_completing(&vm, &mut vcpu);
    assert_eq!(reports, vec![(0x70, 19)]);
}

#[test]
fn cmpxchg16b_swaps_when_equal_and_loads_when_not() {
    let vm = vm();
    let old: u128 = 0x1111_2222_3333_4444_5555_6666_7777_8888;
    vm.write_memory(GuestAddress(0x5000), &old.to_le_bytes()).unwrap();
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        a.mov(rdi, 0x5000u64).unwrap();
        // Equal: RDX:RAX == memory, so RCX:RBX is stored and ZF set.
        a.mov(rax, 0x5555_6666_7777_8888u64).unwrap();
        a.mov(rdx, 0x1111_2222_3333_4444u64).unwrap();
        a.mov(rbx, 0xaaaa_bbbb_cccc_ddddu64).unwrap();
        a.mov(rcx, 0xeeee_ffff_0000_1111u64).unwrap();
        a.lock().cmpxchg16b(xmmword_ptr(rdi)).unwrap();
        a.setz(al).unwrap();
        a.movzx(eax, al).unwrap();
        a.out(0x70u32, eax).unwrap();
        // Not equal (RDX:RAX is stale now): memory is loaded into RDX:RAX, ZF clear.
        a.mov(rax, 1u64).unwrap();
        a.mov(rdx, 2u64).unwrap();
        a.lock().cmpxchg16b(xmmword_ptr(rdi)).unwrap();
        a.mov(rsi, rax).unwrap();
        a.setz(al).unwrap();
        a.movzx(eax, al).unwrap();
        a.out(0x71u32, eax).unwrap();
        a.mov(rax, rsi).unwrap();
        a.out(0x72u32, eax).unwrap();
        a.mov(rax, rdx).unwrap();
        a.shr(rax, 32).unwrap();
        a.out(0x73u32, eax).unwrap();
        a.hlt().unwrap();
    });
    let (reports, done) = run_completing(&vm, &mut vcpu);
    eprintln!("completed in user space: {done:?}");
    assert_eq!(reports, vec![(0x70, 1), (0x71, 0), (0x72, 0xcccc_dddd), (0x73, 0xeeee_ffff)]);
    let mut now = [0u8; 16];
    vm.read_memory(GuestAddress(0x5000), &mut now).unwrap();
    assert_eq!(u128::from_le_bytes(now), 0xeeee_ffff_0000_1111_aaaa_bbbb_cccc_dddd);
}

#[test]
fn cmpxchg16b_is_atomic_against_another_vcpu() {
    // Two vCPUs each add 1 to a 128-bit counter 2000 times with a
    // cmpxchg16b retry loop: with a torn or non-atomic exchange some
    // increments would be lost.
    const ROUNDS: u32 = 2000;
    let vm = std::sync::Arc::new(vm());
    let body = |a: &mut iced_x86::code_asm::CodeAssembler| {
        let mut again = a.create_label();
        let mut retry = a.create_label();
        a.mov(rdi, 0x5000u64).unwrap();
        a.mov(r8d, ROUNDS).unwrap();
        a.set_label(&mut again).unwrap();
        a.mov(rax, qword_ptr(rdi)).unwrap();
        a.mov(rdx, qword_ptr(rdi + 8)).unwrap();
        a.set_label(&mut retry).unwrap();
        a.mov(rbx, rax).unwrap();
        a.mov(rcx, rdx).unwrap();
        a.add(rbx, 1).unwrap();
        a.adc(rcx, 0).unwrap();
        a.lock().cmpxchg16b(xmmword_ptr(rdi)).unwrap();
        a.jnz(retry).unwrap();
        a.dec(r8d).unwrap();
        a.jnz(again).unwrap();
        a.hlt().unwrap();
    };
    let vcpus = [long_mode_guest(&vm, 0, body), long_mode_guest(&vm, 1, body)];
    let threads: Vec<_> = vcpus
        .into_iter()
        .map(|mut vcpu| {
            let vm = vm.clone();
            std::thread::spawn(move || run_completing(&vm, &mut vcpu).1.len())
        })
        .collect();
    let completions: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    eprintln!("cmpxchg16b completed in user space {completions} times");
    let mut now = [0u8; 16];
    vm.read_memory(GuestAddress(0x5000), &mut now).unwrap();
    assert_eq!(u128::from_le_bytes(now), u128::from(2 * ROUNDS));
}

#[test]
fn a_memory_operand_on_an_unmapped_page_raises_a_page_fault() {
    let vm = vm();
    install_handler(&vm, 14, |a| {
        // Report the error code and CR2, then skip the 4-byte popcnt.
        a.pop(rax).unwrap();
        a.out(0x72u32, eax).unwrap();
        a.mov(rax, cr2).unwrap();
        a.shr(rax, 32).unwrap();
        a.out(0x73u32, eax).unwrap();
        a.add(qword_ptr(rsp), 5).unwrap();
        a.iretq().unwrap();
    });
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        a.mov(rax, IDTR).unwrap();
        a.lidt(ptr(rax)).unwrap();
        // Far above the identity map the test's page tables provide.
        a.mov(rsi, 0x7700_0000_0000u64).unwrap();
        a.popcnt(rax, qword_ptr(rsi)).unwrap();
        a.mov(eax, 0x600du32).unwrap();
        a.out(0x70u32, eax).unwrap();
        a.hlt().unwrap();
    });
    let (reports, done) = run_completing(&vm, &mut vcpu);
    eprintln!("completed in user space: {done:?}");
    assert_eq!(reports, vec![(0x72, 0), (0x73, 0x7700), (0x70, 0x600d)]);
}
