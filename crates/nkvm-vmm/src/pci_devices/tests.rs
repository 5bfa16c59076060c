//! The PCI wiring with a real guest on /dev/kvm: the guest programs the bus
//! through ports 0xcf8/0xcfc, the block device through its BAR (mapped where
//! the BAR points once memory decoding is on), and gets the completion as an
//! MSI-X interrupt through an irqfd route.

use std::time::Duration;

use iced_x86::code_asm::*;
use nkvm::{Exit, GuestAddress, Hypervisor, LongMode, RunState, Vm, VmConfig};

use super::*;

#[test]
fn bars_are_aligned_in_the_window_and_the_window_ends() {
    let mut w = Window { next: PCI_MMIO_BASE + 0x10 };
    assert_eq!(w.take(0x8000).unwrap(), PCI_MMIO_BASE + 0x8000);
    assert_eq!(w.take(0x1000).unwrap(), PCI_MMIO_BASE + 0x10000);
    assert!(matches!(w.take(1 << 31), Err(PciSetupError::WindowFull { .. })));
}

const ENTRY: u64 = 0x10_0000;
const TABLES: u64 = 0x2_0000;
const STACK: u64 = 0x9_0000;
const IDT: u64 = 0x7000;
const IDTR: u64 = 0x6ff0;
const HANDLER: u64 = 0x3_0000;
const DESC: u64 = 0x20_0000;
const AVAIL: u64 = 0x20_1000;
const USED: u64 = 0x20_2000;
const HEADER: u64 = 0x21_0000;
const DATA: u64 = 0x21_1000;
const STATUS: u64 = 0x21_2000;
/// The vector the guest gives queue 0's MSI-X entry.
const VECTOR: u8 = 0x40;
const REPORT: u16 = 0x70;
/// Offset of the MSI-X capability: after the four virtio capabilities.
const MSIX_CAP: u32 = 0x84;
const BAR: u64 = PCI_MMIO_BASE;
/// Where the moving-BAR test has the guest put BAR0 (aligned to its size).
const MOVED_BAR: u64 = PCI_MMIO_BASE + 0x10_0000;

/// One access of the guest's driver script.
enum Op {
    /// Write a configuration register of 00:01.0 through 0xcf8/0xcfc.
    Config(u32, u32),
    /// Write `size` bytes of `value` at BAR0 + offset.
    Mmio(u64, u32, u32),
}

/// The driver's accesses, with BAR0 moved to `bar` first if it is not
/// where the VMM put it.
fn driver_script(bar: u64) -> Vec<Op> {
    use Op::*;
    let mut script = vec![Config(0x04, 0x6)]; // memory decoding, bus master
    if bar != BAR {
        script.push(Config(0x10, bar as u32 | 0x4)); // BAR0, 64-bit memory
    }
    script.extend([
        Config(MSIX_CAP, 0x8000_0000),
        Mmio(0x4010, 4, 0xfee0_0000), // MSI-X entry 1 (queue 0): APIC 0, vector 0x40, unmasked
        Mmio(0x4014, 4, 0),
        Mmio(0x4018, 4, u32::from(VECTOR)),
        Mmio(0x401c, 4, 0),
        Mmio(0x14, 1, 1), // ACKNOWLEDGE
        Mmio(0x14, 1, 3), // DRIVER
        Mmio(0x08, 4, 1), // driver features 63:32: VERSION_1
        Mmio(0x0c, 4, 1),
        Mmio(0x14, 1, 0xb), // FEATURES_OK
        Mmio(0x16, 2, 0),   // queue 0
        Mmio(0x18, 2, 16),
        Mmio(0x1a, 2, 1),
        Mmio(0x20, 4, DESC as u32),
        Mmio(0x24, 4, 0),
        Mmio(0x28, 4, AVAIL as u32),
        Mmio(0x2c, 4, 0),
        Mmio(0x30, 4, USED as u32),
        Mmio(0x34, 4, 0),
        Mmio(0x1c, 2, 1),   // queue enable
        Mmio(0x14, 1, 0xf), // DRIVER_OK
        Mmio(0x3000, 2, 0), // notify queue 0
    ]);
    script
}

fn guest_code(bar: u64) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rax, IDTR).unwrap();
    a.lidt(ptr(rax)).unwrap();
    a.mov(rax, 0xfee0_00f0u64).unwrap(); // local APIC on
    a.mov(dword_ptr(rax), 0x1ff).unwrap();
    for op in driver_script(bar) {
        match op {
            Op::Config(register, value) => {
                a.mov(eax, 0x8000_0000 | 1 << 11 | register).unwrap();
                a.mov(dx, 0xcf8u32).unwrap();
                a.out(dx, eax).unwrap();
                a.mov(eax, value).unwrap();
                a.mov(dx, 0xcfcu32).unwrap();
                a.out(dx, eax).unwrap();
            }
            Op::Mmio(offset, size, value) => {
                a.mov(rbx, bar + offset).unwrap();
                a.mov(eax, value).unwrap();
                match size {
                    1 => a.mov(byte_ptr(rbx), al).unwrap(),
                    2 => a.mov(word_ptr(rbx), ax).unwrap(),
                    _ => a.mov(dword_ptr(rbx), eax).unwrap(),
                }
            }
        }
    }
    a.sti().unwrap();
    let mut idle = a.create_label();
    a.set_label(&mut idle).unwrap();
    a.hlt().unwrap();
    a.jmp(idle).unwrap();
    a.assemble(ENTRY).unwrap()
}

fn install_idt(vm: &Vm) {
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(eax, u32::from(VECTOR)).unwrap();
    a.out(u32::from(REPORT), eax).unwrap();
    a.mov(rax, 0xfee0_00b0u64).unwrap(); // EOI
    a.mov(dword_ptr(rax), 0).unwrap();
    a.iretq().unwrap();
    vm.write_memory(GuestAddress(HANDLER), &a.assemble(HANDLER).unwrap()).unwrap();
    let idt = nkvm::Idt::new(GuestAddress(IDT));
    idt.set_gate(&vm.memory(), VECTOR, GuestAddress(HANDLER)).unwrap();
    idt.write_idtr(&vm.memory(), GuestAddress(IDTR)).unwrap();
}

/// An OUT request for sector 1 on queue 0, made available.
fn write_request(vm: &Vm) {
    let desc = |addr: u64, len: u32, flags: u16, next: u16| {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        d
    };
    let table = [desc(HEADER, 16, 1, 1), desc(DATA, 512, 1, 2), desc(STATUS, 1, 2, 0)].concat();
    vm.write_memory(GuestAddress(DESC), &table).unwrap();
    vm.write_memory(GuestAddress(AVAIL), &[0, 0, 1, 0, 0, 0]).unwrap(); // flags, idx 1, ring[0] = 0
    let mut header = [0u8; 16];
    header[0] = 1; // VIRTIO_BLK_T_OUT
    header[8] = 1; // sector 1
    vm.write_memory(GuestAddress(HEADER), &header).unwrap();
    let mut data = [0u8; 512];
    data[..13].copy_from_slice(b"NKVM-PCI-TEST");
    vm.write_memory(GuestAddress(DATA), &data).unwrap();
    vm.write_memory(GuestAddress(STATUS), &[0xee]).unwrap();
}

/// Runs the driver script with BAR0 at `bar`: the guest writes sector 1
/// through queue 0 and takes the MSI-X vector; checks the disk, the status
/// byte and the used ring, and returns the VM.
fn drive_a_disk_write(bar: u64) -> Arc<Vm> {
    let image = std::env::temp_dir().join(format!("nkvm-pci-guest-test-{}-{bar:x}.img", std::process::id()));
    std::fs::write(&image, vec![0u8; 8 * 512]).unwrap();
    let hv = Hypervisor::open().expect("this test needs /dev/kvm");
    let vm = Arc::new(
        Vm::new(&hv, &VmConfig { vcpus: 1, memory: 16 << 20, split_irqchip: true, ..Default::default() }).unwrap(),
    );
    attach(&vm, &PciConfig { disk: Some(image.clone()), ..Default::default() }).unwrap();
    vm.write_memory(GuestAddress(ENTRY), &guest_code(bar)).unwrap();
    install_idt(&vm);
    write_request(&vm);
    let lm = LongMode::install(&vm.memory(), GuestAddress(TABLES)).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_cpuid(&hv.supported_cpuid().unwrap()).unwrap();
    vcpu.set_long_mode(&lm, GuestAddress(ENTRY), GuestAddress(STACK)).unwrap();
    let kicker = vcpu.kicker();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(20));
        kicker.kick();
    });
    let mut run = RunState::new();
    let outcome = loop {
        match vcpu.enter_guest(&mut run).unwrap() {
            Exit::IoOut { port: REPORT, data, .. } => break Ok(data),
            Exit::IoIn { .. } | Exit::MmioRead { .. } => run.complete_read(u64::MAX),
            Exit::Hlt => {}
            other => break Err(other),
        }
    };
    drop(watchdog);
    let disk = std::fs::read(&image).unwrap();
    let _ = std::fs::remove_file(&image);
    assert_eq!(outcome, Ok(u64::from(VECTOR)), "the guest should take the MSI-X vector");
    assert_eq!(&disk[512..525], b"NKVM-PCI-TEST");
    let mut status = [0u8; 1];
    vm.memory().read(GuestAddress(STATUS), &mut status).unwrap();
    assert_eq!(status[0], 0, "VIRTIO_BLK_S_OK");
    let mut used = [0u8; 12];
    vm.memory().read(GuestAddress(USED), &mut used).unwrap();
    assert_eq!(u16::from_le_bytes([used[2], used[3]]), 1, "one used entry");
    assert_eq!(u32::from_le_bytes([used[8], used[9], used[10], used[11]]), 1, "status byte written");
    vm
}

/// Whether KVM has an ioeventfd at `addr` (registering another one fails).
fn has_ioeventfd(vm: &Vm, addr: u64) -> bool {
    let fd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    let taken = vm.ioeventfd(nkvm::IoSpace::Mmio, addr, None, &fd).is_err();
    if !taken {
        vm.remove_ioeventfd(nkvm::IoSpace::Mmio, addr, None, &fd).unwrap();
    }
    taken
}

#[test]
fn a_guest_writes_the_disk_through_pci_and_gets_an_msix_interrupt() {
    let vm = drive_a_disk_write(BAR);
    // The notification went through the worker's ioeventfd: KVM has one on
    // queue 0's notify register.
    assert!(has_ioeventfd(&vm, BAR + 0x3000));
}

#[test]
fn a_moved_bar_takes_its_queue_notifications_along() {
    let vm = drive_a_disk_write(MOVED_BAR);
    assert!(has_ioeventfd(&vm, MOVED_BAR + 0x3000), "the ioeventfd moved with BAR0");
    assert!(!has_ioeventfd(&vm, BAR + 0x3000), "and left nothing behind");
}
