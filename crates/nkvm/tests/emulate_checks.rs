//! The checks the CPU makes on an instruction's memory operands, made by
//! nkvm's emulator too (`nkvm::emulate::complete` is called directly with
//! the instruction's bytes, as an emulation-failure exit would hand them
//! over): segment bases outside 64-bit code, #GP for a non-canonical
//! address, ROM that keeps its bytes, a `clflush` that touches no device,
//! no panic for an operand at the top of the address space, and the
//! #UD/#NM that CR0.EM/CR0.TS make SSE and XSAVE state instructions raise.

mod common;

use common::*;
use nkvm::emulate::{complete, EmulateError, Emulated};
use nkvm::{Backing, GuestAddress, InternalError, MemoryMap, Region, Regs, Vcpu, Vm};

/// `bytes` as the emulation failure KVM reports for them.
fn failure(bytes: &[u8]) -> InternalError {
    let mut insn = [0u8; 15];
    insn[..bytes.len()].copy_from_slice(bytes);
    InternalError { suberror: 1, data: [0; 16], ndata: 0, insn_bytes: insn, insn_len: bytes.len() as u8 }
}

fn emulate(vcpu: &Vcpu, vm: &Vm, bytes: &[u8]) -> Result<Emulated, EmulateError> {
    complete(vcpu, vm, &failure(bytes))
}

fn set_regs(vcpu: &Vcpu, f: impl FnOnce(&mut Regs)) {
    let mut regs = vcpu.regs().unwrap();
    f(&mut regs);
    vcpu.set_regs(&regs).unwrap();
}

/// A 64-bit guest at CPL 0 that has not run (its state is what the test sets).
fn long_mode(vm: &Vm) -> Vcpu {
    long_mode_guest(vm, 0, |a| a.hlt().unwrap())
}

/// The same, with the host's CPUID and CR4.OSXSAVE: the XSAVE family runs.
fn long_mode_with_xsave(vm: &Vm) -> Vcpu {
    let vcpu = long_mode(vm);
    vcpu.set_cpuid(&hypervisor().supported_cpuid().unwrap()).unwrap();
    let mut sregs = vcpu.sregs().unwrap();
    sregs.cr4 |= 1 << 18; // OSXSAVE
    vcpu.set_sregs(&sregs).unwrap();
    vcpu
}

/// `movbe [rdi], eax`
const MOVBE_STORE: [u8; 4] = [0x0f, 0x38, 0xf1, 0x07];

#[test]
fn a_store_to_rom_leaves_its_bytes_as_they_were() {
    let vm = vm();
    let rom = Backing::new("rom", 0x10000).unwrap();
    rom.write_at(0, &[0xaa; 4]).unwrap();
    let mut regions = vm.memory().regions().to_vec();
    regions.push(Region::new(GuestAddress(0x200_0000), &rom, 0, 0x10000).read_only());
    vm.set_memory_map(MemoryMap::new(regions).unwrap()).unwrap();
    let vcpu = long_mode(&vm);
    set_regs(&vcpu, |r| (r.rdi, r.rax) = (0x200_0000, 0x1122_3344));
    assert!(matches!(emulate(&vcpu, &vm, &MOVBE_STORE), Ok(Emulated::Completed { .. })));
    let mut back = [0u8; 4];
    rom.read_at(0, &mut back).unwrap();
    assert_eq!(back, [0xaa; 4], "ROM keeps its bytes, as KVM's own access would");
}

#[test]
fn a_non_canonical_address_raises_general_protection_and_writes_nothing() {
    let vm = vm();
    let vcpu = long_mode(&vm);
    set_regs(&vcpu, |r| (r.rdi, r.rax) = (0x8000_0000_0060_0000, 0x1122_3344));
    assert!(matches!(emulate(&vcpu, &vm, &MOVBE_STORE), Ok(Emulated::Injected { vector: 13, .. })));
    let mut low = [0u8; 4];
    vm.read_memory(GuestAddress(0x60_0000), &mut low).unwrap();
    assert_eq!(low, [0; 4], "the address's low 48 bits are not where it goes");
}

#[test]
fn xrstor_at_the_top_of_the_address_space_faults_and_does_not_panic() {
    let vm = vm();
    let vcpu = long_mode_with_xsave(&vm);
    // 64-byte aligned and canonical; its header 512 bytes on wraps to 0x1c0.
    set_regs(&vcpu, |r| (r.rdi, r.rax, r.rdx) = (0xffff_ffff_ffff_ffc0, 3, 0));
    let emulated = emulate(&vcpu, &vm, &[0x48, 0x0f, 0xae, 0x2f]); // xrstor64 [rdi]
    assert!(matches!(emulated, Ok(Emulated::Injected { .. }) | Ok(Emulated::Completed { .. })), "{emulated:?}");
}

#[test]
fn a_real_mode_operand_is_at_its_segment_base_plus_offset() {
    let vm = vm();
    let vcpu = real_mode_guest(&vm, 0, |a| a.hlt().unwrap());
    vm.write_memory(GuestAddress(0x1010), &[0x11, 0x22]).unwrap();
    vm.write_memory(GuestAddress(0x10), &[0x33, 0x44]).unwrap();
    let mut sregs = vcpu.sregs().unwrap();
    (sregs.ds.selector, sregs.ds.base) = (0x100, 0x1000);
    vcpu.set_sregs(&sregs).unwrap();
    set_regs(&vcpu, |r| (r.rbx, r.rax) = (0x10, 0));
    // movbe ax, [bx]: DS:BX is linear 0x1010.
    assert!(matches!(emulate(&vcpu, &vm, &[0x0f, 0x38, 0xf0, 0x07]), Ok(Emulated::Completed { .. })));
    assert_eq!(vcpu.regs().unwrap().rax & 0xffff, 0x1122);
}

#[test]
fn clflush_of_an_address_no_device_claims_just_completes() {
    let vm = vm();
    let vcpu = long_mode(&vm);
    set_regs(&vcpu, |r| r.rdi = MMIO_BASE);
    let emulated = emulate(&vcpu, &vm, &[0x0f, 0xae, 0x3f]); // clflush [rdi]
    assert!(matches!(emulated, Ok(Emulated::Completed { .. })), "{emulated:?}");
}

/// The page-directory entry mapping the 2 MiB page at `gva` (below 1 GiB)
/// in the tables `long_mode_guest` installs, and the two levels above it.
fn pde_of(gva: u64) -> GuestAddress {
    GuestAddress(LONG_MODE_TABLES + 0x3000 + 8 * (gva >> 21))
}

fn update_entry(vm: &Vm, at: GuestAddress, f: impl FnOnce(u64) -> u64) {
    let mut bytes = [0u8; 8];
    vm.read_memory(at, &mut bytes).unwrap();
    vm.write_memory(at, &f(u64::from_le_bytes(bytes)).to_le_bytes()).unwrap();
}

/// The exception the emulator left pending: (vector, error code).
fn injected(vcpu: &Vcpu) -> (u8, u32) {
    let events = vcpu.events().unwrap();
    (events.exception.nr, events.exception.error_code)
}

#[test]
fn a_user_mode_store_to_a_supervisor_page_faults_and_to_a_user_page_does_not() {
    let vm = vm();
    let vcpu = long_mode(&vm);
    let mut sregs = vcpu.sregs().unwrap();
    (sregs.cs.selector, sregs.cs.dpl, sregs.ss.selector, sregs.ss.dpl) = (sregs.cs.selector | 3, 3, 0x13, 3);
    vcpu.set_sregs(&sregs).unwrap();
    set_regs(&vcpu, |r| (r.rdi, r.rax) = (0x5000, 0x1122_3344));
    assert!(matches!(emulate(&vcpu, &vm, &MOVBE_STORE), Ok(Emulated::Injected { vector: 14, .. })));
    assert_eq!(injected(&vcpu), (14, 7), "#PF: present, write, user");
    let mut back = [0u8; 4];
    vm.read_memory(GuestAddress(0x5000), &mut back).unwrap();
    assert_eq!(back, [0; 4], "a supervisor page is not written from user mode");
    // The user bit at every level: the store goes through.
    for at in [LONG_MODE_TABLES + 0x1000, LONG_MODE_TABLES + 0x2000, pde_of(0x5000).0] {
        update_entry(&vm, GuestAddress(at), |e| e | 4);
    }
    vcpu.set_events(&nkvm::VcpuEvents::default()).unwrap();
    assert!(matches!(emulate(&vcpu, &vm, &MOVBE_STORE), Ok(Emulated::Completed { .. })));
    vm.read_memory(GuestAddress(0x5000), &mut back).unwrap();
    assert_eq!(back, [0x11, 0x22, 0x33, 0x44]);
}

#[test]
fn a_kernel_store_to_a_read_only_page_faults_while_cr0_wp_is_set() {
    let vm = vm();
    let vcpu = long_mode(&vm);
    update_entry(&vm, pde_of(0x40_0000), |e| e & !2);
    set_regs(&vcpu, |r| (r.rdi, r.rax) = (0x40_0000, 0x1122_3344));
    assert!(matches!(emulate(&vcpu, &vm, &MOVBE_STORE), Ok(Emulated::Injected { vector: 14, .. })));
    assert_eq!(injected(&vcpu), (14, 3), "#PF: present, write");
    let mut sregs = vcpu.sregs().unwrap();
    sregs.cr0 &= !(1 << 16);
    vcpu.set_sregs(&sregs).unwrap();
    vcpu.set_events(&nkvm::VcpuEvents::default()).unwrap();
    assert!(matches!(emulate(&vcpu, &vm, &MOVBE_STORE), Ok(Emulated::Completed { .. })), "CR0.WP clear: allowed");
}

#[test]
fn an_emulated_store_sets_the_dirty_bit_of_the_entry_mapping_the_page() {
    let vm = vm();
    let vcpu = long_mode(&vm);
    update_entry(&vm, pde_of(0x60_0000), |e| e & !0x60);
    set_regs(&vcpu, |r| (r.rdi, r.rax) = (0x60_0000, 0x1122_3344));
    assert!(matches!(emulate(&vcpu, &vm, &MOVBE_STORE), Ok(Emulated::Completed { .. })));
    let mut entry = [0u8; 8];
    vm.read_memory(pde_of(0x60_0000), &mut entry).unwrap();
    assert_eq!(u64::from_le_bytes(entry) & 0x60, 0x60, "accessed and dirty");
}

#[test]
fn sse_and_xsave_state_instructions_raise_ud_and_nm_as_cr0_says() {
    let vm = vm();
    let vcpu = long_mode_with_xsave(&vm);
    set_regs(&vcpu, |r| (r.rdi, r.rax, r.rdx) = (0x60_0000, 3, 0));
    const LDMXCSR: [u8; 3] = [0x0f, 0xae, 0x17]; // ldmxcsr [rdi]
    const XSAVE: [u8; 3] = [0x0f, 0xae, 0x27]; // xsave [rdi]
    let with_cr0 = |bits: u64, bytes: &[u8]| {
        let mut sregs = vcpu.sregs().unwrap();
        sregs.cr0 = (sregs.cr0 & !0xc) | bits;
        vcpu.set_sregs(&sregs).unwrap();
        vcpu.set_events(&nkvm::VcpuEvents::default()).unwrap();
        match emulate(&vcpu, &vm, bytes) {
            Ok(Emulated::Injected { vector, .. }) => Some(vector),
            Ok(Emulated::Completed { .. }) => None,
            other => panic!("{other:?}"),
        }
    };
    const EM: u64 = 1 << 2;
    const TS: u64 = 1 << 3;
    assert_eq!(with_cr0(EM, &LDMXCSR), Some(6), "ldmxcsr with CR0.EM: #UD");
    assert_eq!(with_cr0(TS, &LDMXCSR), Some(7), "ldmxcsr with CR0.TS: #NM");
    assert_eq!(with_cr0(TS, &XSAVE), Some(7), "xsave with CR0.TS: #NM");
    assert_eq!(with_cr0(0, &XSAVE), None, "xsave with neither: done");
    // With neither, ldmxcsr loads what is there, and stmxcsr stores it back.
    vm.write_memory(GuestAddress(0x60_1000), &0x1f81u32.to_le_bytes()).unwrap();
    set_regs(&vcpu, |r| r.rdi = 0x60_1000);
    assert_eq!(with_cr0(0, &LDMXCSR), None, "ldmxcsr with neither: done");
    set_regs(&vcpu, |r| r.rdi = 0x60_2000);
    assert_eq!(with_cr0(0, &[0x0f, 0xae, 0x1f]), None, "stmxcsr [rdi]");
    let mut mxcsr = [0u8; 4];
    vm.read_memory(GuestAddress(0x60_2000), &mut mxcsr).unwrap();
    assert_eq!(u32::from_le_bytes(mxcsr), 0x1f81);
}

#[test]
fn an_evex_move_is_refused_by_name_not_done_as_a_plain_vex_move() {
    let vm = vm();
    let vcpu = long_mode(&vm);
    set_regs(&vcpu, |r| r.rdi = 0x60_0000);
    // vmovaps xmm0{k1}, [rdi]: EVEX, merge-masked by k1; a plain move
    // would overwrite the lanes k1 keeps.
    let emulated = emulate(&vcpu, &vm, &[0x62, 0xf1, 0x7c, 0x09, 0x28, 0x07]);
    match emulated {
        Err(EmulateError::Unsupported { instruction, .. }) => assert!(instruction.contains("vmovaps"), "{instruction}"),
        other => panic!("{other:?}"),
    }
}
