//! A level-triggered interrupt whose handler's EOI is followed by `hlt`
//! with no exit between them is delivered again while its line stays
//! asserted: on hosts that run CPL-0 code in KVM's emulator, KVM holds
//! such an EOI back from the halted vCPU, and nkvm's EOI watch gets it out
//! (kvm-unit-tests' `ioapic`, "retriggered level interrupts"). And a
//! level-triggered interrupt in service when the state is saved gets its
//! EOI to the IOAPIC of the VM the state is restored into.

mod common;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::*;
use iced_x86::code_asm::*;
use nkvm::state::{VcpuState, VmState};
use nkvm::{ApicBus, Exit, GuestAddress, RunState, Vm, VmConfig};
use nkvm_devices::ioapic::{Ioapic, INDEX_REDIRECTION_TABLE, REG_IOREGSEL, REG_IOWIN};
use nkvm_devices::{ApicBusSink, IoDevice, Snapshot};
use nkvm_wire::apic::InterruptMessage;

const PIN: usize = 14;
const VECTOR: u32 = 0x9a;
/// The guest asks for the IOAPIC pin to be raised (value 1) or lowered (0).
const LINE: u16 = 0x72;
/// The guest is done; the value is how often the handler ran.
const DONE: u16 = 0x74;
/// The handler asks for the state to be saved (before its EOI).
const SAVE: u16 = 0x76;
/// The handler's counter.
const COUNT: u64 = 0x5000;

struct Sink(ApicBus);

impl ApicBusSink for Sink {
    fn send(&mut self, message: InterruptMessage) {
        self.0.send(&message).unwrap();
    }
}

type SharedIoapic = Arc<Mutex<Ioapic<Sink>>>;

/// An IOAPIC on the in-process APIC bus, `PIN` level-triggered to `VECTOR`
/// for APIC 0.
fn ioapic(vm: &Vm) -> SharedIoapic {
    let target: Arc<OnceLock<SharedIoapic>> = Arc::default();
    let t = target.clone();
    let bus = vm
        .attach_apic_bus_in_process(Box::new(move |vector: u8| {
            if let Some(io) = t.get() {
                io.lock().unwrap().end_of_interrupt(vector);
            }
        }))
        .unwrap();
    let ioapic = Arc::new(Mutex::new(Ioapic::new(Sink(bus))));
    let _ = target.set(ioapic.clone());
    let mut io = ioapic.lock().unwrap();
    let low = u32::from(INDEX_REDIRECTION_TABLE) + 2 * PIN as u32;
    for (index, value) in [(low, VECTOR | 1 << 15), (low + 1, 0)] {
        io.write(REG_IOREGSEL, &index.to_le_bytes());
        io.write(REG_IOWIN, &value.to_le_bytes());
    }
    drop(io);
    ioapic
}

/// Loads the IDT `install_handler` wrote and enables the local APIC
/// (spurious vector 0xff).
fn apic_prologue(a: &mut CodeAssembler) {
    a.mov(rax, IDTR).unwrap();
    a.lidt(ptr(rax)).unwrap();
    a.mov(rax, 0xfee0_00f0u64).unwrap();
    a.mov(dword_ptr(rax), 0x1ff).unwrap();
}

/// The loop of kvm-unit-tests' `test_ioapic_level_retrigger`: with
/// interrupts off, raise the line; then `sti; hlt; cli` until the handler
/// has run twice. The handler counts, lowers the line on its second run,
/// and EOIs; nothing between its EOI and the next `hlt` exits.
fn retrigger_guest(vm: &Vm) -> nkvm::Vcpu {
    install_handler(vm, u64::from(VECTOR), |a| {
        a.push(rax).unwrap();
        a.mov(rax, COUNT).unwrap();
        a.inc(dword_ptr(rax)).unwrap();
        a.cmp(dword_ptr(rax), 2).unwrap();
        let mut eoi = a.create_label();
        a.jne(eoi).unwrap();
        a.mov(eax, 0).unwrap();
        a.out(u32::from(LINE), eax).unwrap();
        a.set_label(&mut eoi).unwrap();
        a.mov(rax, 0xfee0_00b0u64).unwrap();
        a.mov(dword_ptr(rax), 0).unwrap();
        a.pop(rax).unwrap();
        a.iretq().unwrap();
    });
    let vcpu = long_mode_guest(vm, 0, |a| {
        apic_prologue(a);
        a.cli().unwrap();
        a.mov(eax, 1).unwrap();
        a.out(u32::from(LINE), eax).unwrap();
        a.mov(rbx, COUNT).unwrap();
        let mut again = a.create_label();
        let mut done = a.create_label();
        a.set_label(&mut again).unwrap();
        a.cmp(dword_ptr(rbx), 2).unwrap();
        a.jae(done).unwrap();
        a.sti().unwrap();
        a.hlt().unwrap();
        a.cli().unwrap();
        a.jmp(again).unwrap();
        a.set_label(&mut done).unwrap();
        a.mov(eax, dword_ptr(rbx)).unwrap();
        a.out(u32::from(DONE), eax).unwrap();
        a.hlt().unwrap();
    });
    vcpu.set_cpuid(&hypervisor().supported_cpuid().unwrap()).unwrap();
    vcpu
}

#[test]
fn an_eoi_followed_by_hlt_still_retriggers_an_asserted_level_line() {
    let vm = vm_with(VmConfig { vcpus: 1, memory: 16 << 20, split_irqchip: true, ..Default::default() });
    vm.write_memory(GuestAddress(COUNT), &[0; 4]).unwrap();
    let ioapic = ioapic(&vm);
    let mut vcpu = retrigger_guest(&vm);
    let outcome = run_watched(&mut vcpu, &ioapic, DONE);
    let mut count = [0u8; 4];
    vm.read_memory(GuestAddress(COUNT), &mut count).unwrap();
    assert_eq!(outcome, Ok(2), "the handler ran {} times; the EOI never reached the IOAPIC", u32::from_le_bytes(count));
    // The last EOI, too, reaches the IOAPIC while the guest sits in its
    // final `hlt` (it may still be held when the guest reports done).
    assert!(eoi_reaches(&mut vcpu, &ioapic), "the last EOI never reached the IOAPIC");
}

/// Waits (up to 10 s) while the guest sits in its final `hlt` for the EOI
/// of `PIN`'s interrupt to reach `ioapic`; whether it did.
fn eoi_reaches(vcpu: &mut nkvm::Vcpu, ioapic: &SharedIoapic) -> bool {
    let kicker = vcpu.kicker();
    let io = ioapic.clone();
    let waiter = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while io.lock().unwrap().entry(PIN).unwrap().remote_irr() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        kicker.kick();
    });
    assert_eq!(vcpu.enter_guest(&mut RunState::new()).unwrap(), Exit::Kicked);
    waiter.join().unwrap();
    !ioapic.lock().unwrap().entry(PIN).unwrap().remote_irr()
}

/// Runs `vcpu` until its guest writes `port` (the value written), passing
/// `LINE` to `ioapic`; another exit is the error. A watchdog turns a guest
/// that waits for good into a `Kicked` exit.
fn run_watched(vcpu: &mut nkvm::Vcpu, ioapic: &SharedIoapic, port: u16) -> Result<u64, Exit> {
    let kicker = vcpu.kicker();
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if stopped.recv_timeout(Duration::from_secs(20)).is_err() {
            kicker.kick();
        }
    });
    let mut run = RunState::new();
    let result = loop {
        match vcpu.enter_guest(&mut run).unwrap() {
            Exit::IoOut { port: LINE, data, .. } => ioapic.lock().unwrap().set_irq(PIN, data != 0),
            Exit::IoOut { port: p, data, .. } if p == port => break Ok(data),
            other => break Err(other),
        }
    };
    let _ = stop.send(());
    watchdog.join().unwrap();
    result
}

/// [`run_watched`], failing the test with `what` on another exit.
fn run_until(vcpu: &mut nkvm::Vcpu, ioapic: &SharedIoapic, port: u16, what: &str) {
    if let Err(exit) = run_watched(vcpu, ioapic, port) {
        panic!("{what}: {exit}");
    }
}

/// The guest takes `PIN`'s interrupt, whose handler asks for a save
/// before its EOI; the state goes to a new VM, where the same pin must
/// deliver again (its EOI reached that VM's IOAPIC).
#[test]
fn a_level_interrupt_in_service_at_the_save_is_eoied_in_the_restored_vm() {
    let config = VmConfig { vcpus: 1, memory: 16 << 20, split_irqchip: true, ..Default::default() };
    let vm = vm_with(config.clone());
    let ioapic = ioapic(&vm);
    install_handler(&vm, u64::from(VECTOR), |a| {
        a.out(u32::from(SAVE), eax).unwrap();
        a.mov(rax, 0xfee0_00b0u64).unwrap();
        a.mov(dword_ptr(rax), 0).unwrap();
        a.iretq().unwrap();
    });
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        apic_prologue(a);
        a.mov(eax, 1).unwrap();
        a.out(u32::from(LINE), eax).unwrap();
        for _ in 0..2 {
            a.sti().unwrap();
            a.hlt().unwrap();
            a.cli().unwrap();
            a.out(u32::from(DONE), eax).unwrap();
        }
        a.hlt().unwrap();
    });
    vcpu.set_cpuid(&hypervisor().supported_cpuid().unwrap()).unwrap();
    run_until(&mut vcpu, &ioapic, SAVE, "before the save");
    // The device lowers its line while the handler runs: only the EOI is
    // still to come (on hosts that end service at delivery, KVM holds it).
    ioapic.lock().unwrap().set_irq(PIN, false);
    let vcpu_blob = vcpu.save_state(&mut RunState::new()).unwrap().encode();
    let vm_blob = vm.save_state().unwrap().encode();
    let ioapic_blob = ioapic.lock().unwrap().snapshot();
    let mut ram = vec![0u8; config.memory as usize];
    vm.read_memory(GuestAddress(0), &mut ram).unwrap();
    drop((vcpu, ioapic, vm));

    // A new VM, whose routing table has never carried VECTOR.
    let vm = vm_with(config);
    vm.write_memory(GuestAddress(0), &ram).unwrap();
    vm.restore_state(&VmState::decode(&vm_blob).unwrap()).unwrap();
    let ioapic = self::ioapic(&vm);
    ioapic.lock().unwrap().restore(&ioapic_blob).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.restore_state(&VcpuState::decode(&vcpu_blob).unwrap()).unwrap();
    run_until(&mut vcpu, &ioapic, DONE, "the handler's return");
    // The line goes up again: the IOAPIC delivers only if the EOI came.
    ioapic.lock().unwrap().set_irq(PIN, true);
    run_until(&mut vcpu, &ioapic, SAVE, "the pin stays blocked: the handler's EOI never reached the IOAPIC");
}

/// A save while a level-triggered vector waits for its EOI (so the save
/// gives KVM one entry to hand a held EOI out) keeps an interrupt KVM was
/// delivering when the vCPU stopped (a pause's kick can cut delivery short).
#[test]
fn a_save_with_a_level_vector_outstanding_keeps_an_interrupt_being_delivered() {
    let vm = vm_with(VmConfig { vcpus: 1, memory: 16 << 20, split_irqchip: true, ..Default::default() });
    let ioapic = ioapic(&vm);
    install_handler(&vm, u64::from(VECTOR), |a| {
        a.iretq().unwrap();
    });
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        apic_prologue(a);
        a.cli().unwrap();
        // The line goes up with interrupts off: VECTOR waits for its EOI.
        a.mov(eax, 1).unwrap();
        a.out(u32::from(LINE), eax).unwrap();
        a.out(u32::from(DONE), eax).unwrap();
        a.hlt().unwrap();
    });
    vcpu.set_cpuid(&hypervisor().supported_cpuid().unwrap()).unwrap();
    run_until(&mut vcpu, &ioapic, DONE, "the set-up");
    let mut events = vcpu.events().unwrap();
    events.interrupt.injected = 1;
    events.interrupt.nr = 0x41;
    events.interrupt.soft = 0;
    vcpu.set_events(&events).unwrap();
    let state = vcpu.save_state(&mut RunState::new()).unwrap();
    assert_eq!((state.events.interrupt.injected, state.events.interrupt.nr), (1, 0x41), "the interrupt was dropped");
}
