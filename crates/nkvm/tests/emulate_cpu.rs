//! Instructions that depend on the guest's CPUID or on the x87/MMX state,
//! completed in user space with real guests: `invpcid` (#UD without CPUID
//! support, #GP on a bad type), MMX moves and `emms`, `rdpru` (#UD),
//! `verr`/`verw` (ZF from the GDT descriptor).

mod common;

use common::*;
use iced_x86::code_asm::*;
use nkvm::Vcpu;
use nkvm::Vm;

/// A guest that runs `invpcid` of type `kind` on a zeroed descriptor after
/// setting the vCPU's CPUID (INVPCID offered or not); #UD and #GP handlers
/// report their vector and skip the 5-byte instruction.
fn invpcid_guest(vm: &Vm, offer_invpcid: bool, kind: u32) -> Vcpu {
    for (vector, port) in [(6u64, 0x76u32), (13, 0x77)] {
        install_handler(vm, vector, |a| {
            if vector == 13 {
                a.add(rsp, 8).unwrap(); // the error code
            }
            a.mov(eax, vector as u32).unwrap();
            a.out(port, eax).unwrap();
            a.add(qword_ptr(rsp), 5).unwrap();
            a.iretq().unwrap();
        });
    }
    let vcpu = long_mode_guest(vm, 0, |a| {
        a.mov(rax, IDTR).unwrap();
        a.lidt(ptr(rax)).unwrap();
        a.mov(ecx, kind).unwrap();
        a.mov(eax, 0x9000u32).unwrap(); // a zeroed 16-byte descriptor
        a.invpcid(rcx, ptr(rax)).unwrap();
        a.mov(eax, 0x600du32).unwrap();
        a.out(0x71u32, eax).unwrap();
        a.hlt().unwrap();
    });
    let mut cpuid = hypervisor().supported_cpuid().unwrap();
    for e in cpuid.as_mut_slice().iter_mut().filter(|e| e.function == 7 && e.index == 0) {
        e.ebx = if offer_invpcid { e.ebx | 1 << 10 } else { e.ebx & !(1 << 10) };
    }
    vcpu.set_cpuid(&cpuid).unwrap();
    vcpu
}

#[test]
fn invpcid_raises_invalid_opcode_without_cpuid_support_and_checks_its_type_with_it() {
    // Without INVPCID in CPUID: #UD.
    let without = vm();
    let mut vcpu = invpcid_guest(&without, false, 2);
    let (reports, done) = run_completing(&without, &mut vcpu);
    eprintln!("completed in user space: {done:?}");
    assert_eq!(reports, vec![(0x76, 6), (0x71, 0x600d)]);
    // With it: type 2 (all contexts) is fine, type 4 is #GP(0). A host
    // whose KVM drops INVPCID from the vCPU's CPUID (this one does) still
    // gets #UD: what counts is the CPUID the guest sees.
    for kind in [2, 4] {
        let with = vm();
        let mut vcpu = invpcid_guest(&with, true, kind);
        let offered =
            vcpu.cpuid().unwrap().as_slice().iter().any(|e| e.function == 7 && e.index == 0 && e.ebx & 1 << 10 != 0);
        let (reports, done) = run_completing(&with, &mut vcpu);
        eprintln!("type {kind}, INVPCID offered: {offered}, completed in user space: {done:?}");
        let expected = match (offered, kind) {
            (false, _) => vec![(0x76, 6), (0x71, 0x600d)],
            (true, 2) => vec![(0x71, 0x600d)],
            (true, _) => vec![(0x77, 13), (0x71, 0x600d)],
        };
        assert_eq!(reports, expected, "type {kind}");
    }
}

#[test]
fn mmx_moves_reach_general_registers_and_memory_through_the_x87_registers() {
    let vm = vm();
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        a.fninit().unwrap();
        a.mov(rax, 0x0102_0304_0506_0708u64).unwrap();
        a.movq(mm0, rax).unwrap(); // register to MMX
        a.mov(ecx, 0x9000u32).unwrap();
        a.movq(qword_ptr(rcx), mm0).unwrap(); // MMX to memory
        a.mov(rax, qword_ptr(rcx)).unwrap();
        a.out(0x70u32, eax).unwrap();
        a.shr(rax, 32).unwrap();
        a.out(0x71u32, eax).unwrap();
        a.mov(qword_ptr(rcx + 8), 0x1122_3344u32 as i32).unwrap();
        a.movq(mm3, qword_ptr(rcx + 8)).unwrap(); // memory to MMX
        a.movq(mm5, mm3).unwrap(); // MMX to MMX
        a.movd(eax, mm5).unwrap(); // MMX to register (32 bits)
        a.out(0x72u32, eax).unwrap();
        a.emms().unwrap();
        a.hlt().unwrap();
    });
    let (reports, done) = run_completing(&vm, &mut vcpu);
    eprintln!("completed in user space: {done:?}");
    assert_eq!(reports, vec![(0x70, 0x0506_0708), (0x71, 0x0102_0304), (0x72, 0x1122_3344)]);
}

#[test]
fn rdpru_raises_invalid_opcode_when_cpuid_lacks_it() {
    let vm = vm();
    install_handler(&vm, 6, |a| {
        a.mov(rax, qword_ptr(rsp)).unwrap();
        a.out(0x70u32, eax).unwrap();
        a.add(qword_ptr(rsp), 3).unwrap();
        a.iretq().unwrap();
    });
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        a.mov(rax, IDTR).unwrap();
        a.lidt(ptr(rax)).unwrap();
        a.xor(ecx, ecx).unwrap();
        a.db(&[0x0f, 0x01, 0xfd]).unwrap(); // rdpru
        a.mov(eax, 0x600du32).unwrap();
        a.out(0x71u32, eax).unwrap();
        a.hlt().unwrap();
    });
    let offered = vcpu.cpuid().unwrap().as_slice().iter().any(|e| e.function == 0x8000_0008 && e.ebx & 1 << 4 != 0);
    assert!(!offered, "KVM does not offer RDPRU to guests");
    let (reports, done) = run_completing(&vm, &mut vcpu);
    eprintln!("completed in user space: {done:?}");
    assert_eq!(reports, vec![(0x70, LONG_MODE_ENTRY + 10 + 3 + 2), (0x71, 0x600d)]);
}

/// `verw` / `verr` on the selectors of the long-mode GDT (null, 64-bit
/// code 0x08, data 0x10, limit 0x17): ZF says whether the segment could be
/// written / read from CPL 0. A stock kernel runs `verw [mem]` before
/// `hlt` on Intel hosts with MDS-class bugs, where this host's KVM cannot
/// emulate it; on any host the flags must come out as the CPU sets them.
#[test]
fn verw_and_verr_set_zf_as_the_gdt_descriptor_allows() {
    let vm = vm();
    // (instruction, selector): the guest reports ZF on port 0x70 + i.
    let cases: [(bool, u16, u64); 8] = [
        (true, 0x10, 1),  // writable data
        (true, 0x08, 0),  // code is never writable
        (true, 0x00, 0),  // null
        (true, 0x18, 0),  // past the GDT's limit
        (true, 0x13, 0),  // RPL 3 above the data segment's DPL 0
        (false, 0x08, 1), // readable code
        (false, 0x10, 1), // data is always readable
        (false, 0x00, 0),
    ];
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        for (i, &(write, selector, _)) in cases.iter().enumerate() {
            a.mov(eax, 0x9000u32).unwrap();
            a.mov(word_ptr(rax), u32::from(selector)).unwrap();
            // Set ZF to the opposite of what is expected first, so a
            // flag left as it was shows.
            a.mov(ecx, 1u32).unwrap();
            a.test(ecx, ecx).unwrap();
            if write {
                a.verw(word_ptr(rax)).unwrap();
            } else {
                a.verr(word_ptr(rax)).unwrap();
            }
            a.setz(al).unwrap();
            a.movzx(eax, al).unwrap();
            a.out(0x70 + i as u32, eax).unwrap();
        }
        // The register form.
        a.mov(ecx, 0x10u32).unwrap();
        a.verw(cx).unwrap();
        a.setz(al).unwrap();
        a.movzx(eax, al).unwrap();
        a.out(0x7fu32, eax).unwrap();
        a.hlt().unwrap();
    });
    let (reports, done) = run_completing(&vm, &mut vcpu);
    eprintln!("completed in user space: {done:?}");
    let mut expected: Vec<(u16, u64)> = cases.iter().enumerate().map(|(i, c)| (0x70 + i as u16, c.2)).collect();
    expected.push((0x7f, 1));
    assert_eq!(reports, expected);
}
