//! Interrupts with real guests: MSI through irqfd and KVM_SIGNAL_MSI to the
//! right vCPU, ioeventfd without an exit, an APIC-less core driven through
//! LINT0/LINT1 by a PIC; an IOAPIC model on the APIC bus (`ioapic_bus`) and
//! the bus's fast paths (version 2, `fast_path`).

#[path = "../common/mod.rs"]
mod common;
mod fast_path;
mod ioapic_bus;

use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::*;
use iced_x86::code_asm::*;
use nkvm::io::IoRange;
use nkvm::irq::MsiMessage;
use nkvm::{Exit, GuestAddress, IoSpace, Lapic, RunState, Vcpu, VcpuConfig, Vm, VmConfig};
use nkvm_devices::IoDevice;
use vmm_sys_util::eventfd::EventFd;

const IDT: u64 = 0x7000;
const IDTR: u64 = 0x6ff0;
const HANDLERS: u64 = 0x3_0000;
const VECTORS: [u8; 6] = [2, 0x30, 0x40, 0x41, 0x50, 0x51];
const REPORT: u16 = 0x70;
const READY: u16 = 0x71;

fn irq_vm(vcpus: u32) -> Vm {
    vm_with(VmConfig { vcpus, memory: 16 << 20, split_irqchip: true, ..Default::default() })
}

/// Installs an IDT whose handlers report their vector on port 0x70 and,
/// with a visible APIC, write the local APIC's EOI register.
fn install_idt(vm: &Vm, eoi: bool) {
    install_idt_for(vm, eoi, &VECTORS);
}

/// [`install_idt`] with handlers for `vectors`.
fn install_idt_for(vm: &Vm, eoi: bool, vectors: &[u8]) {
    let idt = nkvm::Idt::new(GuestAddress(IDT));
    for &v in vectors {
        let at = HANDLERS + u64::from(v) * 0x40;
        let code = assemble(64, at, |a| {
            a.push(rax).unwrap();
            a.mov(eax, u32::from(v)).unwrap();
            a.out(u32::from(REPORT), eax).unwrap();
            if eoi {
                a.mov(rax, 0xfee0_00b0u64).unwrap();
                a.mov(dword_ptr(rax), 0).unwrap();
            }
            a.pop(rax).unwrap();
            a.iretq().unwrap();
        });
        vm.write_memory(GuestAddress(at), &code).unwrap();
        idt.set_gate(&vm.memory(), v, GuestAddress(at)).unwrap();
    }
    idt.write_idtr(&vm.memory(), GuestAddress(IDTR)).unwrap();
}

/// lidt; (enable the local APIC); `before`; report ready; sti; hlt forever.
fn waiting_guest(vm: &Vm, id: u32, config: VcpuConfig, before: impl FnOnce(&mut CodeAssembler)) -> Vcpu {
    let code_at = LONG_MODE_ENTRY + 0x1000 * u64::from(id);
    let code = assemble(64, code_at, |a| {
        a.mov(rax, IDTR).unwrap();
        a.lidt(ptr(rax)).unwrap();
        if config.lapic == Lapic::Visible {
            a.mov(rax, 0xfee0_00f0u64).unwrap(); // spurious-interrupt vector register
            a.mov(dword_ptr(rax), 0x1ff).unwrap();
        }
        before(a);
        a.mov(eax, id).unwrap();
        a.out(u32::from(READY), eax).unwrap();
        a.sti().unwrap();
        let mut idle = a.create_label();
        a.set_label(&mut idle).unwrap();
        a.hlt().unwrap();
        a.jmp(idle).unwrap();
    });
    vm.write_memory(GuestAddress(code_at), &code).unwrap();
    let lm = nkvm::LongMode::install(&vm.memory(), GuestAddress(LONG_MODE_TABLES)).unwrap();
    let vcpu = vm.create_vcpu_with(id, config).unwrap();
    vcpu.set_cpuid(&hypervisor().supported_cpuid().unwrap()).unwrap();
    vcpu.set_long_mode(&lm, GuestAddress(code_at), GuestAddress(LONG_MODE_STACK - 0x1_0000 * u64::from(id))).unwrap();
    vcpu
}

/// Runs a vCPU on a thread, forwarding its exits until kicked.
struct Running {
    exits: Receiver<Exit>,
    kicker: nkvm::Kicker,
    thread: Option<JoinHandle<()>>,
}

impl Running {
    fn start(mut vcpu: Vcpu) -> Running {
        let (tx, exits) = mpsc::channel();
        let kicker = vcpu.kicker();
        let thread = thread::spawn(move || {
            let mut run = RunState::new();
            loop {
                let exit = vcpu.enter_guest(&mut run).expect("enter_guest");
                if let Exit::MmioRead { .. } | Exit::IoIn { .. } = exit {
                    run.complete_read(0);
                }
                let stop = matches!(exit, Exit::Kicked | Exit::Shutdown | Exit::InternalError(_));
                if tx.send(exit).is_err() || stop {
                    return;
                }
            }
        });
        Running { exits, kicker, thread: Some(thread) }
    }

    /// The next exit (ignoring ones `skip` accepts), within 10 s.
    fn next(&self) -> Exit {
        self.exits.recv_timeout(Duration::from_secs(10)).expect("the guest did not exit in time")
    }

    fn expect_report(&self, vector: u8) {
        assert_eq!(self.next(), Exit::IoOut { port: REPORT, size: 4, data: u64::from(vector) });
    }

    fn expect_ready(&self) {
        assert!(matches!(self.next(), Exit::IoOut { port: READY, .. }));
    }

    fn quiet_for(&self, d: Duration) -> bool {
        self.exits.recv_timeout(d).is_err()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kicker.kick();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn msi_through_irqfd_reaches_the_guest_handler() {
    let vm = irq_vm(1);
    install_idt(&vm, true);
    let run = Running::start(waiting_guest(&vm, 0, VcpuConfig::default(), |_| {}));
    run.expect_ready();
    let evt = EventFd::new(0).unwrap();
    vm.set_msi_route(30, Some(MsiMessage::fixed(0, 0x40))).unwrap();
    vm.irqfd(30, &evt).unwrap();
    assert!(run.quiet_for(Duration::from_millis(50)), "nothing happens before the eventfd is written");
    evt.write(1).unwrap();
    run.expect_report(0x40);
    evt.write(1).unwrap();
    run.expect_report(0x40);
}

#[test]
fn signal_msi_reaches_the_addressed_vcpu_only() {
    let vm = irq_vm(2);
    install_idt(&vm, true);
    let run0 = Running::start(waiting_guest(&vm, 0, VcpuConfig::default(), |_| {}));
    let run1 = Running::start(waiting_guest(&vm, 1, VcpuConfig::default(), |_| {}));
    run0.expect_ready();
    run1.expect_ready();
    vm.signal_msi(MsiMessage::fixed(1, 0x41)).unwrap();
    run1.expect_report(0x41);
    assert!(run0.quiet_for(Duration::from_millis(100)), "vCPU 0 took an MSI addressed to vCPU 1");
    vm.signal_msi(MsiMessage::fixed(0, 0x40)).unwrap();
    run0.expect_report(0x40);
}

#[test]
fn msi_routes_reject_gsis_kept_for_the_ioapic_and_need_the_irqchip() {
    let vm = irq_vm(1);
    let err = vm.set_msi_route(3, Some(MsiMessage::fixed(0, 0x40))).unwrap_err();
    assert!(err.to_string().contains("GSI 3 is reserved"), "{err}");
    let plain = vm_with(VmConfig { vcpus: 1, memory: 16 << 20, ..Default::default() });
    let err = plain.signal_msi(MsiMessage::fixed(0, 0x40)).unwrap_err();
    assert!(err.to_string().contains("split irqchip"), "{err}");
}

#[test]
fn ioeventfd_fires_on_a_guest_write_without_an_exit_until_removed() {
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<Exit>>>);
    impl nkvm::Tracer for Seen {
        fn on_exit(&mut self, r: &nkvm::ExitRecord) {
            self.0.lock().unwrap().push(r.exit.clone());
        }
    }
    let vm = vm();
    let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    vm.ioeventfd(IoSpace::Mmio, MMIO_BASE, None, &evt).unwrap();
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        a.mov(rbx, MMIO_BASE).unwrap();
        for i in 0..3 {
            a.mov(dword_ptr(rbx), i).unwrap();
        }
        a.mov(dword_ptr(rbx + 8), 9).unwrap(); // not the ioeventfd address: exits
        a.hlt().unwrap();
        a.mov(dword_ptr(rbx), 7).unwrap(); // after the ioeventfd is removed: exits
        a.hlt().unwrap();
    });
    let seen = Seen::default();
    vcpu.add_tracer(Box::new(seen.clone()));
    let exits = run_to_hlt(&mut vcpu, |_| 0);
    assert_eq!(exits, vec![Exit::MmioWrite { addr: GuestAddress(MMIO_BASE + 8), size: 4, data: 9 }]);
    assert_eq!(evt.read().unwrap(), 3, "three guest writes, three signals");
    {
        let traced = seen.0.lock().unwrap();
        assert!(
            !traced.iter().any(|e| matches!(e, Exit::MmioWrite { addr, .. } if addr.0 == MMIO_BASE)),
            "the trace shows no exit for the ioeventfd writes: {traced:?}"
        );
    }
    // Removed (as when a BAR moves), the address exits again and the
    // eventfd stays quiet; removing it twice is an error, not a no-op.
    vm.remove_ioeventfd(IoSpace::Mmio, MMIO_BASE, None, &evt).unwrap();
    let err = vm.remove_ioeventfd(IoSpace::Mmio, MMIO_BASE, None, &evt).unwrap_err();
    assert!(err.to_string().contains("KVM_IOEVENTFD(deassign)"), "{err}");
    assert_eq!(run_to_hlt(&mut vcpu, |_| 0), vec![Exit::MmioWrite { addr: GuestAddress(MMIO_BASE), size: 4, data: 7 }]);
    assert!(evt.read().is_err(), "no signal after removal");
}

#[test]
fn a_hidden_apic_core_takes_lint0_interrupts_and_lint1_nmis() {
    let vm = irq_vm(1);
    install_idt(&vm, false);
    let hidden = VcpuConfig { lapic: Lapic::Hidden };
    let vcpu = waiting_guest(&vm, 0, hidden, |a| {
        a.mov(eax, 1).unwrap();
        a.cpuid().unwrap();
        a.mov(eax, edx).unwrap();
        a.out(0x72, eax).unwrap();
    });
    let lint = vcpu.lint();
    let run = Running::start(vcpu);
    match run.next() {
        Exit::IoOut { port: 0x72, data, .. } => assert_eq!(data & (1 << 9), 0, "CPUID.1:EDX.APIC must be clear"),
        other => panic!("expected the CPUID report, got {other}"),
    }
    run.expect_ready();
    lint.raise_lint0(0x30);
    run.expect_report(0x30);
    lint.nmi();
    run.expect_report(2);
    lint.raise_lint0(0x51);
    run.expect_report(0x51);
}

/// An nkvm-devices model as an in-process handler.
struct Dev<D>(D);

impl<D: IoDevice> nkvm::IoHandler for Dev<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.read(offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.write(offset, data);
    }
}

#[test]
fn a_pic_drives_an_apic_less_core_through_lint0_in_virtual_wire_mode() {
    use nkvm_devices::pic::{Pic, SharedPic};
    let vm = irq_vm(1);
    install_idt(&vm, false);
    let pic = SharedPic::new(Pic::new());
    vm.attach_handler(IoRange::pio(0x20, 2), Box::new(Dev(pic.master_port()))).unwrap();
    vm.attach_handler(IoRange::pio(0xa0, 2), Box::new(Dev(pic.slave_port()))).unwrap();
    // The guest programs the 8259s (vectors 0x50.. and 0x58..), unmasks
    // IRQ 1, and reports ready with interrupts still off for a while.
    let vcpu = waiting_guest(&vm, 0, VcpuConfig { lapic: Lapic::Hidden }, |a| {
        for (port, value) in [
            (0x20u32, 0x11u32),
            (0x21, 0x50),
            (0x21, 0x04),
            (0x21, 0x01),
            (0xa0, 0x11),
            (0xa1, 0x58),
            (0xa1, 0x02),
            (0xa1, 0x01),
            (0x21, 0xfd),
            (0xa1, 0xff),
        ] {
            a.mov(al, value).unwrap();
            a.out(port, al).unwrap();
        }
    });
    let lint = vcpu.lint();
    // Handler for vector 0x51 reports and sends the PIC a non-specific EOI.
    let at = HANDLERS + 0x51 * 0x40;
    vm.write_memory(
        GuestAddress(at),
        &assemble(64, at, |a| {
            a.push(rax).unwrap();
            a.mov(eax, 0x51u32).unwrap();
            a.out(u32::from(REPORT), eax).unwrap();
            a.mov(al, 0x20).unwrap();
            a.out(0x20u32, al).unwrap();
            a.pop(rax).unwrap();
            a.iretq().unwrap();
        }),
    )
    .unwrap();
    let run = Running::start(vcpu);
    run.expect_ready();
    // The INTA cycle: the 8259 names the vector, LINT0 carries it as ExtINT.
    // The guest's EOI to the 8259 may land just after its report: until
    // it does, the new request waits in the IRR (as on real hardware).
    let raise = |pic: &SharedPic| {
        pic.lock().set_irq(1, true);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pic.lock().has_interrupt() {
            assert!(Instant::now() < deadline, "the 8259 never raised INTR: {:?}", *pic.lock());
            thread::sleep(Duration::from_millis(1));
        }
        let mut p = pic.lock();
        let vector = p.acknowledge();
        p.set_irq(1, false);
        assert_eq!(vector, 0x51);
        lint.raise_lint0(vector);
    };
    raise(&pic);
    run.expect_report(0x51);
    raise(&pic);
    run.expect_report(0x51);
    assert!(!pic.lock().has_interrupt());
}

/// A one-vCPU VM with `vm`'s RAM (for a saved vCPU to be restored into).
fn copy_of(vm: &Vm) -> Vm {
    let copy = irq_vm(1);
    let mut ram = vec![0u8; vm.config().memory as usize];
    vm.read_memory(GuestAddress(0), &mut ram).unwrap();
    copy.write_memory(GuestAddress(0), &ram).unwrap();
    copy
}

/// A VM whose one core has no visible local APIC, its guest past READY
/// with IF=0 (it waits for LINT0 interrupts until its `sti`).
fn apic_less_guest_with_if_clear() -> (Vm, Vcpu, RunState) {
    let vm = irq_vm(1);
    install_idt(&vm, false);
    let mut vcpu = waiting_guest(&vm, 0, VcpuConfig { lapic: Lapic::Hidden }, |_| {});
    let mut run = RunState::new();
    assert!(matches!(vcpu.enter_guest(&mut run).unwrap(), Exit::IoOut { port: READY, .. }));
    (vm, vcpu, run)
}

#[test]
fn a_lint0_vector_the_guest_has_not_taken_travels_with_the_saved_state() {
    // The guest reports READY with IF=0; a vector raised on LINT0 then waits
    // for its `sti`. Saved at that moment, it must be in the state, and a
    // vCPU restored from it on another VM must take it.
    let (vm, mut vcpu, mut run) = apic_less_guest_with_if_clear();
    vcpu.lint().raise_lint0(0x30);
    let state = vcpu.save_state(&mut run).unwrap();
    assert_eq!(state.pending_lint, nkvm::state::PendingLint { extint: vec![0x30], nmi: false });
    let blob = state.encode();
    drop(vcpu);

    let copy = copy_of(&vm);
    let mut restored = copy.create_vcpu_with(0, VcpuConfig { lapic: Lapic::Hidden }).unwrap();
    restored.restore_state(&nkvm::state::VcpuState::decode(&blob).unwrap()).unwrap();
    let run = Running::start(restored);
    run.expect_report(0x30);
    assert!(run.quiet_for(Duration::from_millis(200)), "the vector is taken once");
}

#[test]
fn lint0_raised_over_and_over_while_the_guest_keeps_if_clear_waits_once_per_vector() {
    // A PIC (or a hostile APIC-bus peer) raising LINT0 20000 times while
    // the guest has IF=0: each vector waits once, as in an 8259's request
    // register, so the queue stays bounded and the saved state loads.
    let (_vm, mut vcpu, mut run) = apic_less_guest_with_if_clear();
    let lint = vcpu.lint();
    for i in 0..20_000u32 {
        lint.raise_lint0((i % 256) as u8);
    }
    let state = vcpu.save_state(&mut run).unwrap();
    assert_eq!(state.pending_lint.extint, (0..=255u8).collect::<Vec<_>>(), "each vector once, first raised first");
    let back = nkvm::state::VcpuState::decode(&state.encode()).expect("a state nkvm saved loads");
    assert_eq!(back.pending_lint, state.pending_lint);
}

#[test]
fn a_lint0_vector_raised_while_the_guest_can_take_it_is_in_a_state_saved_then() {
    // IF=1 at READY: the vector is given to the next entry, which the
    // save's kick cuts short. Handed to KVM then, it would sit where no
    // saved state shows it; it must be in the state instead, and the
    // source (going on) and the copy each take it once.
    let vm = irq_vm(1);
    install_idt(&vm, false);
    let mut vcpu = waiting_guest(&vm, 0, VcpuConfig { lapic: Lapic::Hidden }, |a| {
        a.sti().unwrap();
        a.nop().unwrap();
    });
    let mut run = RunState::new();
    assert!(matches!(vcpu.enter_guest(&mut run).unwrap(), Exit::IoOut { port: READY, .. }));
    assert!(run.ready_for_interrupt_injection(), "the guest can take it");
    vcpu.lint().raise_lint0(0x30);
    let state = vcpu.save_state(&mut run).unwrap();
    assert_eq!(state.pending_lint.extint, [0x30], "saved as waiting");
    let blob = state.encode();

    let copy = copy_of(&vm);
    let mut restored = copy.create_vcpu_with(0, VcpuConfig { lapic: Lapic::Hidden }).unwrap();
    restored.restore_state(&nkvm::state::VcpuState::decode(&blob).unwrap()).unwrap();
    let in_copy = Running::start(restored);
    in_copy.expect_report(0x30);
    assert!(in_copy.quiet_for(Duration::from_millis(200)), "the copy takes it once");
    drop(in_copy);
    let (tx, exits) = mpsc::channel();
    let kicker = vcpu.kicker();
    let source = thread::spawn(move || loop {
        let exit = vcpu.enter_guest(&mut run).unwrap();
        if exit == Exit::Kicked || tx.send(exit).is_err() {
            return;
        }
    });
    let report = Exit::IoOut { port: REPORT, size: 4, data: 0x30 };
    assert_eq!(exits.recv_timeout(Duration::from_secs(10)).unwrap(), report, "the source takes it too");
    assert!(exits.recv_timeout(Duration::from_millis(200)).is_err(), "once");
    kicker.kick();
    source.join().unwrap();
}
