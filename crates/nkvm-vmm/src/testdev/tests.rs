//! The platform's saved state with real guests: a guest on one VM puts
//! state in every model through its ports, the platform is saved, a second
//! VM with a fresh platform restores it, and a second guest reads the state
//! back through the same ports.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::mpsc::{channel, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use nkvm::{Exit, GuestAddress, Hypervisor, RunState, Vcpu, VmConfig};
use nkvm_devices::fw_cfg::FW_CFG_RAM_SIZE;

use super::*;
use crate::sleep::Sleep;

const MEMORY: u64 = 16 << 20;
const ENTRY: u64 = 0x1_0000;
/// Ports the guests report on (not handled: each `out` exits to the test).
const REPORT: u16 = 0x3000;
/// The source guest reports this when its state is in place.
const SAVE_HERE: u16 = REPORT;
const LATCH_LOW: u16 = REPORT + 1;
const SOURCE_PM: u16 = REPORT + 2;
const LATCH_HIGH: u16 = REPORT + 3;
const SOURCE_DONE: u16 = REPORT + 4;
/// The reading guest's reports, in order, then its end.
const READS: u16 = REPORT + 0x10;
const READ_DONE: u16 = REPORT + 0x1f;
const IO_RAM_WORD: u32 = 0xff00_0100;

/// A VM with the platform attached and one vCPU about to run `code` in
/// flat 32-bit protected mode (interrupts off).
struct Board {
    vcpu: Vcpu,
    run: RunState,
    platform: Platform,
    saved: SavedDevices,
    _events: Receiver<PowerEvent>,
    _vm: Arc<Vm>,
}

fn board(cpus: u32, code: &[u8]) -> Board {
    let hv = Hypervisor::open().expect("this test needs /dev/kvm");
    let config = VmConfig { vcpus: cpus, memory: MEMORY, split_irqchip: true, ..Default::default() };
    let vm = Arc::new(Vm::new(&hv, &config).unwrap());
    let ioapic = crate::ioapic::attach(&vm, acpi::IOAPIC_ADDR).unwrap();
    let (events, rx) = channel();
    let machine = Machine { cpus, memory: MEMORY, events, device_processes: false, boot_lint: BootLint::default() };
    let platform = attach(&vm, &ioapic, &machine).unwrap();
    let mut saved = SavedDevices::default();
    platform.register_saved(&mut saved);
    vm.write_memory(GuestAddress(ENTRY), code).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_cpuid(&hv.supported_cpuid().unwrap()).unwrap();
    vcpu.set_flat_protected_mode(GuestAddress(ENTRY), 0, 0).unwrap();
    Board { vcpu, run: RunState::new(), platform, saved, _events: rx, _vm: vm }
}

impl Board {
    /// Runs until the guest reports on `until`; returns every report
    /// (port, value) before it. Fails after 20 s or on another exit.
    fn run_until(&mut self, until: u16) -> Vec<(u16, u32)> {
        let kicker = self.vcpu.kicker();
        let done = Arc::new(AtomicBool::new(false));
        let watchdog = {
            let done = done.clone();
            thread::spawn(move || {
                let start = Instant::now();
                while !done.load(SeqCst) {
                    if start.elapsed() > Duration::from_secs(20) {
                        kicker.kick();
                        return;
                    }
                    thread::sleep(Duration::from_millis(10));
                }
            })
        };
        let mut reports = Vec::new();
        loop {
            match self.vcpu.enter_guest(&mut self.run).unwrap() {
                Exit::IoOut { port, .. } if port == until => break,
                Exit::IoOut { port, data, .. } if port & !0xff == REPORT => reports.push((port, data as u32)),
                other => panic!("the guest stopped with {other:?} after {reports:x?}"),
            }
        }
        done.store(true, SeqCst);
        watchdog.join().unwrap();
        reports
    }
}

/// `out REPORT+n, eax`.
fn report(a: &mut CodeAssembler, port: u16) {
    a.mov(dx, u32::from(port)).unwrap();
    a.out(dx, eax).unwrap();
}

/// The guest that leaves state in every model, then reads the rest of a
/// half-read PIT latch after the save.
fn source_guest() -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    // pc-testdev scratch.
    a.mov(eax, 0x1234_5678u32).unwrap();
    a.out(0xe0, eax).unwrap();
    // CMOS byte 0x40, then the index left on it with the NMI bit set.
    for (port, value) in [(0x70, 0x40u32), (0x71, 0x5a), (0x70, 0xc0)] {
        a.mov(al, value).unwrap();
        a.out(port, al).unwrap();
    }
    // A20 off.
    a.mov(al, 0u32).unwrap();
    a.out(0x92, al).unwrap();
    // fw_cfg: RAM_SIZE selected, three of its eight bytes read.
    a.mov(eax, u32::from(FW_CFG_RAM_SIZE)).unwrap();
    a.mov(dx, 0x510u32).unwrap();
    a.out(dx, ax).unwrap();
    a.mov(dx, 0x511u32).unwrap();
    for _ in 0..3 {
        a.in_(al, dx).unwrap();
    }
    // The I/O RAM, through an MMIO exit.
    a.mov(ebx, IO_RAM_WORD).unwrap();
    a.mov(dword_ptr(ebx), 0xcafe_f00du32).unwrap();
    // pc-testdev line 5 high.
    a.mov(dx, 0x2005u32).unwrap();
    a.mov(al, 1u32).unwrap();
    a.out(dx, al).unwrap();
    // PIT counter 2: mode 0, word access, count 0xffff; latched, low byte read.
    for (port, value) in [(0x43, 0xb0u32), (0x42, 0xff), (0x42, 0xff), (0x43, 0x80)] {
        a.mov(al, value).unwrap();
        a.out(port, al).unwrap();
    }
    a.xor(eax, eax).unwrap();
    a.in_(al, 0x42).unwrap();
    report(&mut a, LATCH_LOW);
    a.mov(dx, u32::from(acpi::PM_TIMER_PORT)).unwrap();
    a.in_(eax, dx).unwrap();
    report(&mut a, SOURCE_PM);
    report(&mut a, SAVE_HERE);
    // After the save: the latch's high byte, as the source saw it.
    a.xor(eax, eax).unwrap();
    a.in_(al, 0x42).unwrap();
    report(&mut a, LATCH_HIGH);
    report(&mut a, SOURCE_DONE);
    let mut spin = a.create_label();
    a.set_label(&mut spin).unwrap();
    a.jmp(spin).unwrap();
    a.assemble(ENTRY).unwrap()
}

/// The guest that reads every piece back, reporting each on READS + i.
fn reading_guest() -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    let mut n = READS;
    let mut next = |a: &mut CodeAssembler| {
        report(a, n);
        n += 1;
    };
    a.xor(eax, eax).unwrap();
    a.in_(al, 0x71).unwrap(); // CMOS data at the saved index
    next(&mut a);
    a.in_(eax, 0xe0).unwrap(); // scratch
    next(&mut a);
    a.xor(eax, eax).unwrap();
    a.in_(al, 0x92).unwrap();
    next(&mut a);
    a.mov(dx, 0x511u32).unwrap(); // fw_cfg: the fourth byte of RAM_SIZE
    a.xor(eax, eax).unwrap();
    a.in_(al, dx).unwrap();
    next(&mut a);
    a.mov(ebx, IO_RAM_WORD).unwrap();
    a.mov(eax, dword_ptr(ebx)).unwrap();
    next(&mut a);
    a.xor(eax, eax).unwrap(); // PIT: the latch's high byte
    a.in_(al, 0x42).unwrap();
    next(&mut a);
    a.mov(al, 0xe8u32).unwrap(); // read-back: counter 2's status
    a.out(0x43, al).unwrap();
    a.xor(eax, eax).unwrap();
    a.in_(al, 0x42).unwrap();
    next(&mut a);
    a.mov(dx, u32::from(acpi::PM_TIMER_PORT)).unwrap();
    a.in_(eax, dx).unwrap();
    next(&mut a);
    report(&mut a, READ_DONE);
    a.hlt().unwrap();
    a.assemble(ENTRY).unwrap()
}

fn value(reports: &[(u16, u32)], port: u16) -> u32 {
    reports.iter().find(|(p, _)| *p == port).unwrap_or_else(|| panic!("no report on {port:#x}: {reports:x?}")).1
}

#[test]
fn a_guest_reads_back_the_platform_state_another_vm_saved() {
    let mut source = board(1, &source_guest());
    let reports = source.run_until(SAVE_HERE);
    let blobs = source.saved.save_all().unwrap();
    let names: Vec<&str> = blobs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "fw-cfg",
            "pic",
            "pit",
            "cmos",
            "pm-timer",
            "pc-testdev-ioram",
            "port92",
            "isa-debug-exit",
            "pc-testdev-ports",
            "pc-testdev-irq-lines",
            "acpi-s3"
        ]
    );
    let latch_low = value(&reports, LATCH_LOW);
    let source_pm = value(&reports, SOURCE_PM);
    let latch_high = value(&source.run_until(SOURCE_DONE), LATCH_HIGH);

    let mut dest = board(1, &reading_guest());
    dest.platform.hold_interrupts_until_restored();
    dest.saved.restore_all(&blobs).unwrap();
    let reads = dest.run_until(READ_DONE);
    let read = |i: u16| value(&reads, READS + i);
    assert_eq!(read(0), 0x5a, "CMOS: the saved index still selects byte 0x40");
    assert_eq!(read(1), 0x1234_5678, "pc-testdev scratch");
    assert_eq!(read(2), 0x00, "port 0x92: A20 still off (a fresh machine reads 0x02)");
    assert_eq!(read(3), 0x01, "fw_cfg: the fourth byte of RAM_SIZE (16 MiB), after the three read");
    assert_eq!(read(4), 0xcafe_f00d, "the I/O RAM");
    assert_eq!(read(5), latch_high, "the half-read latch gives its high byte (low byte was {latch_low:#x})");
    assert_eq!(read(6) & 0x7f, 0x30, "counter 2: count loaded (no null count), word access, mode 0");
    let pm = read(7);
    assert!(pm.wrapping_sub(source_pm) < 1 << 31, "the PM timer went back: {source_pm:#x} then {pm:#x}");
    let lines = dest.platform.models.irq_lines.lock().unwrap().levels();
    assert_eq!(lines, 1 << 5, "pc-testdev line 5 is recorded high");
}

#[test]
fn a_machine_with_another_cpu_count_is_refused_before_anything_changes() {
    let source = board(1, &[0xf4]);
    let blobs = source.saved.save_all().unwrap();
    let dest = board(2, &[0xf4]);
    let err = dest.saved.restore_all(&blobs).unwrap_err();
    assert!(err.to_string().contains("device fw-cfg"), "{err}");
    let cause = std::error::Error::source(&err).unwrap().to_string();
    assert!(cause.contains("NB_CPUS (the CPU count) = 0x1"), "{cause}");
    let mut damaged = blobs.clone();
    let pit = damaged.iter_mut().find(|(n, _)| n == "pit").unwrap();
    pit.1.truncate(20);
    let err = board(1, &[0xf4]).saved.restore_all(&damaged).unwrap_err();
    assert!(err.to_string().contains("device pit: bad state"), "{err}");
}

#[test]
fn a_machine_asleep_in_s3_cannot_be_saved() {
    let Board { platform, saved, .. } = board(1, &[0xf4]);
    let sleep = Sleep::new(GuestAddress(0xe_0040), platform.wake);
    sleep.request(|| {});
    let err = saved.save_all().unwrap_err().to_string();
    assert!(err.contains("acpi-s3") && err.contains("asleep in ACPI S3"), "{err}");
}
