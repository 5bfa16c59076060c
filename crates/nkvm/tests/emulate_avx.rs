//! AVX moves at CPL 0, which this host's KVM emulator cannot run:
//! `nkvm::emulate` completes `vzeroall` and whole-register `vmov*` moves
//! through the XSAVE image (XMM in the legacy area, the upper halves in the
//! YMM_Hi128 component), and raises #GP(0) for a misaligned aligned move.

mod common;

use common::*;
use iced_x86::code_asm::*;
use nkvm::GuestAddress;

const DATA: u64 = 0x9000;
/// YMM_Hi128 in the standard XSAVE image, and XMM0 in the legacy area.
const YMM_HI: usize = 576;
const XMM: usize = 160;

#[test]
fn ymm_moves_and_vzeroall_go_through_the_xsave_image() {
    let vm = vm();
    let pattern: Vec<u8> = (1..=32).collect();
    vm.write_memory(GuestAddress(DATA), &pattern).unwrap();
    install_handler(&vm, 13, |a| {
        a.add(rsp, 8).unwrap(); // the error code
        a.mov(eax, 13).unwrap();
        a.out(0x77u32, eax).unwrap();
        a.add(qword_ptr(rsp), 5).unwrap(); // past the 5-byte vmovdqa
        a.iretq().unwrap();
    });
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        a.mov(rax, IDTR).unwrap();
        a.lidt(ptr(rax)).unwrap();
        a.mov(rax, cr4).unwrap();
        a.or(rax, 1 << 18).unwrap(); // OSXSAVE
        a.mov(cr4, rax).unwrap();
        a.xor(ecx, ecx).unwrap();
        a.xor(edx, edx).unwrap();
        a.mov(eax, 7).unwrap(); // x87 | SSE | AVX
        a.xsetbv().unwrap();
        a.mov(ecx, DATA as u32).unwrap();
        a.vzeroall().unwrap();
        a.vmovdqa(ymm3, ptr(rcx)).unwrap(); // memory to YMM
        a.vmovdqa(ymm12, ymm3).unwrap(); // YMM to YMM
        a.vmovntdq(ptr(rcx + 0x40), ymm12).unwrap(); // YMM to memory
        a.vmovdqu(ptr(rcx + 0x81), ymm12).unwrap(); // unaligned store
        a.vmovdqa(xmm5, ptr(rcx)).unwrap(); // VEX.128: zeroes the upper half
        a.vmovdqa(ymm0, ptr(rcx + 1)).unwrap(); // misaligned: #GP(0)
        a.mov(eax, 0x600du32).unwrap();
        a.out(0x71u32, eax).unwrap();
        a.hlt().unwrap();
    });
    vcpu.set_cpuid(&hypervisor().supported_cpuid().unwrap()).unwrap();
    let (reports, done) = run_completing(&vm, &mut vcpu);
    eprintln!("completed in user space: {done:?}");
    assert_eq!(reports, vec![(0x77, 13), (0x71, 0x600d)]);
    for at in [DATA + 0x40, DATA + 0x81] {
        let mut stored = vec![0u8; 32];
        vm.read_memory(GuestAddress(at), &mut stored).unwrap();
        assert_eq!(stored, pattern, "the 32 bytes stored at {at:#x}");
    }
    let image = vcpu.xsave().unwrap();
    let ymm =
        |i: usize| [&image[XMM + 16 * i..XMM + 16 * (i + 1)], &image[YMM_HI + 16 * i..YMM_HI + 16 * (i + 1)]].concat();
    assert_eq!(ymm(3), pattern, "ymm3");
    assert_eq!(ymm(12), pattern, "ymm12");
    assert_eq!(ymm(5), [&pattern[..16], &[0u8; 16][..]].concat(), "xmm5, upper half zeroed");
    assert_eq!(ymm(0), vec![0u8; 32], "ymm0: zeroed by vzeroall, the faulting load changed nothing");
}

#[test]
fn avx_moves_raise_invalid_opcode_while_xcr0_lacks_avx() {
    let vm = vm();
    install_handler(&vm, 6, |a| {
        a.mov(eax, 6).unwrap();
        a.out(0x76u32, eax).unwrap();
        a.add(qword_ptr(rsp), 3).unwrap(); // past the 3-byte vzeroall
        a.iretq().unwrap();
    });
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        a.mov(rax, IDTR).unwrap();
        a.lidt(ptr(rax)).unwrap();
        a.vzeroall().unwrap(); // CR4.OSXSAVE clear: #UD
        a.mov(eax, 0x600du32).unwrap();
        a.out(0x71u32, eax).unwrap();
        a.hlt().unwrap();
    });
    vcpu.set_cpuid(&hypervisor().supported_cpuid().unwrap()).unwrap();
    let (reports, done) = run_completing(&vm, &mut vcpu);
    eprintln!("completed in user space: {done:?}");
    assert_eq!(reports, vec![(0x76, 6), (0x71, 0x600d)]);
}

#[test]
fn an_instruction_across_a_page_boundary_is_fetched_from_guest_memory() {
    // KVM hands over only the bytes before the page boundary; the rest are
    // read from guest memory.
    let vm = vm();
    let pattern: Vec<u8> = (101..=132).collect();
    vm.write_memory(GuestAddress(DATA), &pattern).unwrap();
    let prologue = |a: &mut CodeAssembler| {
        a.mov(rax, cr4).unwrap();
        a.or(rax, 1 << 18).unwrap();
        a.mov(cr4, rax).unwrap();
        a.xor(ecx, ecx).unwrap();
        a.xor(edx, edx).unwrap();
        a.mov(eax, 7).unwrap();
        a.xsetbv().unwrap();
        a.mov(ecx, DATA as u32).unwrap();
    };
    let before = assemble(64, LONG_MODE_ENTRY, prologue).len();
    // `vmovdqa ymm0, [rcx]` is 4 bytes: start it 2 bytes before the page end.
    let pad = 0x1000 - 2 - before;
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        prologue(a);
        a.db(&vec![0x90; pad]).unwrap();
        a.vmovdqa(ymm0, ptr(rcx)).unwrap();
        a.vmovdqu(ptr(rcx + 0x40), ymm0).unwrap();
        a.hlt().unwrap();
    });
    vcpu.set_cpuid(&hypervisor().supported_cpuid().unwrap()).unwrap();
    let (reports, done) = run_completing(&vm, &mut vcpu);
    eprintln!("completed in user space: {done:?}");
    assert!(reports.is_empty());
    let mut stored = vec![0u8; 32];
    vm.read_memory(GuestAddress(DATA + 0x40), &mut stored).unwrap();
    assert_eq!(stored, pattern);
}
