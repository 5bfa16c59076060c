//! Helpers shared by the integration tests: tiny guests assembled from
//! readable assembly (iced-x86's code assembler) and run on /dev/kvm.
#![allow(dead_code, missing_docs)]

use iced_x86::code_asm::CodeAssembler;
use nkvm::emulate::{complete, Emulated};
use nkvm::{Exit, GuestAddress, Hypervisor, LongMode, RunState, Vcpu, Vm, VmConfig};

/// Where real-mode test code is loaded (CS=0, IP=REAL_MODE_ENTRY).
pub const REAL_MODE_ENTRY: u64 = 0x1000;
/// Where long-mode test code is loaded.
pub const LONG_MODE_ENTRY: u64 = 0x10_0000;
/// Where the long-mode GDT and page tables are installed.
pub const LONG_MODE_TABLES: u64 = 0x2_0000;
/// Top of the long-mode stack of vCPU 0 (each vCPU gets 64 KiB below it).
pub const LONG_MODE_STACK: u64 = 0x9_0000;
/// An address no memory region covers: accesses exit as MMIO.
pub const MMIO_BASE: u64 = 0xd000_0000;

pub fn hypervisor() -> Hypervisor {
    Hypervisor::open().expect("these tests need a working /dev/kvm")
}

pub fn vm_with(config: VmConfig) -> Vm {
    Vm::new(&hypervisor(), &config).expect("create VM")
}

pub fn vm() -> Vm {
    vm_with(VmConfig { vcpus: 2, memory: 16 << 20, ..Default::default() })
}

/// Assembles `body` for `bitness` at `ip`.
pub fn assemble(bitness: u32, ip: u64, body: impl FnOnce(&mut CodeAssembler)) -> Vec<u8> {
    let mut a = CodeAssembler::new(bitness).expect("assembler");
    body(&mut a);
    a.assemble(ip).expect("assemble test guest")
}

/// Loads 16-bit code at REAL_MODE_ENTRY and returns vCPU `id` about to run it.
pub fn real_mode_guest(vm: &Vm, id: u32, body: impl FnOnce(&mut CodeAssembler)) -> Vcpu {
    let code = assemble(16, REAL_MODE_ENTRY, body);
    vm.write_memory(GuestAddress(REAL_MODE_ENTRY), &code).expect("load code");
    let vcpu = vm.create_vcpu(id).expect("create vCPU");
    vcpu.set_real_mode(0, REAL_MODE_ENTRY as u16).expect("real mode");
    vcpu
}

/// Loads 64-bit code at LONG_MODE_ENTRY (+ 0x1000 × id) and returns vCPU
/// `id` in long mode about to run it.
pub fn long_mode_guest(vm: &Vm, id: u32, body: impl FnOnce(&mut CodeAssembler)) -> Vcpu {
    let entry = LONG_MODE_ENTRY + 0x1000 * u64::from(id);
    let code = assemble(64, entry, body);
    vm.write_memory(GuestAddress(entry), &code).expect("load code");
    let lm = LongMode::install(&vm.memory(), GuestAddress(LONG_MODE_TABLES)).expect("long mode tables");
    let vcpu = vm.create_vcpu(id).expect("create vCPU");
    let stack = LONG_MODE_STACK - 0x1_0000 * u64::from(id);
    vcpu.set_long_mode(&lm, GuestAddress(entry), GuestAddress(stack)).expect("long mode");
    vcpu
}

/// [`run_to_hlt`] with a deadline: a watchdog kicks the vCPU after
/// `limit`, and a kick ends the test with a failure instead of a hang (for
/// guests that could spin inside `enter_guest`).
pub fn run_to_hlt_within(vcpu: &mut Vcpu, limit: std::time::Duration) -> Vec<Exit> {
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let kicker = vcpu.kicker();
    let watchdog = std::thread::spawn(move || {
        if finished.recv_timeout(limit).is_err() {
            kicker.kick();
        }
    });
    let exits = run_to_hlt(vcpu, |_| 0);
    let _ = done.send(());
    watchdog.join().unwrap();
    assert!(!exits.contains(&Exit::Kicked), "the guest did not reach hlt within {limit:?}: {exits:?}");
    exits
}

/// Runs until `hlt` (or a kick, returned as the last exit), collecting
/// every other exit; completes reads with `read`.
pub fn run_to_hlt(vcpu: &mut Vcpu, mut read: impl FnMut(&Exit) -> u64) -> Vec<Exit> {
    let mut run = RunState::new();
    let mut exits = Vec::new();
    loop {
        let exit = vcpu.enter_guest(&mut run).expect("enter_guest");
        match exit {
            Exit::Hlt => return exits,
            Exit::Kicked => {
                exits.push(exit);
                return exits;
            }
            Exit::IoIn { .. } | Exit::MmioRead { .. } => run.complete_read(read(&exit)),
            Exit::Shutdown | Exit::InternalError(_) | Exit::FailEntry { .. } | Exit::Unknown { .. } => {
                panic!("guest failed: {exit} after {exits:?}")
            }
            _ => {}
        }
        exits.push(exit);
        assert!(exits.len() < 100_000, "guest never reached hlt");
    }
}

/// Where the emulation tests' IDT lives.
pub const IDT: u64 = 0x7000;
/// Where the IDTR image for `lidt` lives.
pub const IDTR: u64 = 0x6ff0;
/// Where exception handlers go (0x100 bytes per vector).
pub const HANDLER: u64 = 0x3_0000;

/// Installs a 64-bit interrupt gate for `vector` whose handler is `body`,
/// and the IDTR image at [`IDTR`] for the guest to `lidt`.
pub fn install_handler(vm: &Vm, vector: u64, body: impl FnOnce(&mut iced_x86::code_asm::CodeAssembler)) {
    let at = HANDLER + 0x100 * vector;
    vm.write_memory(GuestAddress(at), &assemble(64, at, body)).unwrap();
    let idt = nkvm::Idt::new(GuestAddress(IDT));
    idt.set_gate(&vm.memory(), vector as u8, GuestAddress(at)).unwrap();
    idt.write_idtr(&vm.memory(), GuestAddress(IDTR)).unwrap();
}

/// Runs `vcpu` to `hlt`, completing every emulation failure in user space;
/// returns the port writes and what was completed.
pub fn run_completing(vm: &Vm, vcpu: &mut Vcpu) -> (Vec<(u16, u64)>, Vec<Emulated>) {
    let mut run = RunState::new();
    let (mut reports, mut done) = (Vec::new(), Vec::new());
    loop {
        match vcpu.enter_guest(&mut run).unwrap() {
            Exit::InternalError(e) => done.push(complete(vcpu, vm, &e).unwrap_or_else(|err| panic!("{err}"))),
            Exit::IoOut { port, data, .. } => reports.push((port, data)),
            Exit::Hlt => return (reports, done),
            other => panic!("unexpected {other} after {reports:x?}"),
        }
    }
}

/// A guest that reads the byte at 0x1000 (written here) and reports it: the
/// installed map still serves RAM there.
pub fn assert_guest_reads_ram(vm: &Vm) {
    use iced_x86::code_asm::{al, byte_ptr};
    vm.write_memory(GuestAddress(0x1000), &[0x5a]).unwrap();
    let mut vcpu = long_mode_guest(vm, 0, |a| {
        a.mov(al, byte_ptr(0x1000)).unwrap();
        a.out(0x10, al).unwrap();
        a.hlt().unwrap();
    });
    assert_eq!(run_to_hlt(&mut vcpu, |_| 0), vec![Exit::IoOut { port: 0x10, size: 1, data: 0x5a }]);
}
