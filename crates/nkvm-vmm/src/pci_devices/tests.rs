//! The PCI wiring with a real guest on /dev/kvm: the guest programs the bus
//! through ports 0xcf8/0xcfc, the block device through its BAR (mapped where
//! the BAR points once memory decoding is on), and gets the completion as an
//! MSI-X interrupt through an irqfd route. The same guest drives nkvm's own
//! block device and a vhost-user backend (qemu-storage-daemon), which the
//! test then kills and restarts.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use nkvm::{Exit, GuestAddress, Hypervisor, LongMode, RunState, Vm, VmConfig};

use super::*;

mod bench;
mod dirty_log;
mod process;
mod snapshot;

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
/// The read request's header, buffer and status byte.
const HEADER2: u64 = 0x21_3000;
const DATA2: u64 = 0x21_4000;
const STATUS2: u64 = 0x21_5000;
/// The idle loop reports the device status byte here.
const STATUS_PORT: u16 = 0x71;
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
        Mmio(0x14, 1, 0), // reset (a second run starts over)
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
    emit_driver_script(&mut a, bar);
    a.sti().unwrap();
    // Idle, reporting the device status byte (DEVICE_NEEDS_RESET shows).
    let mut idle = a.create_label();
    a.set_label(&mut idle).unwrap();
    a.mov(rbx, bar + 0x14).unwrap();
    a.mov(al, byte_ptr(rbx)).unwrap();
    a.out(u32::from(STATUS_PORT), al).unwrap();
    a.pause().unwrap();
    a.jmp(idle).unwrap();
    a.assemble(ENTRY).unwrap()
}

/// The IDT, the local APIC and the driver script, as guest code.
fn emit_driver_script(a: &mut CodeAssembler, bar: u64) {
    emit_ops(a, bar, driver_script(bar));
}

/// The IDT, the local APIC and `ops`, as guest code.
fn emit_ops(a: &mut CodeAssembler, bar: u64, ops: Vec<Op>) {
    a.mov(rax, IDTR).unwrap();
    a.lidt(ptr(rax)).unwrap();
    a.mov(rax, 0xfee0_00f0u64).unwrap(); // local APIC on
    a.mov(dword_ptr(rax), 0x1ff).unwrap();
    for op in ops {
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

/// An OUT request for sector 1 (chain 0) and an IN request for sector 2
/// (chain 3) on queue 0, made available; the descriptor table changed by
/// `edit` before it is written (and before the requests are available).
fn write_requests_with(vm: &Vm, edit: impl FnOnce(&mut [u8])) {
    let desc = |addr: u64, len: u32, flags: u16, next: u16| {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        d
    };
    let table = [
        desc(HEADER, 16, 1, 1),
        desc(DATA, 512, 1, 2),
        desc(STATUS, 1, 2, 0),
        desc(HEADER2, 16, 1, 4),
        desc(DATA2, 512, 3, 5), // NEXT | WRITE
        desc(STATUS2, 1, 2, 0),
    ]
    .concat();
    let mut table = table;
    edit(&mut table);
    vm.write_memory(GuestAddress(DESC), &table).unwrap();
    vm.write_memory(GuestAddress(AVAIL), &[0, 0, 2, 0, 0, 0, 3, 0]).unwrap(); // flags, idx 2, ring 0, 3
    let mut header2 = [0u8; 16];
    header2[8] = 2; // VIRTIO_BLK_T_IN, sector 2
    vm.write_memory(GuestAddress(HEADER2), &header2).unwrap();
    vm.write_memory(GuestAddress(STATUS2), &[0xee]).unwrap();
    let mut header = [0u8; 16];
    header[0] = 1; // VIRTIO_BLK_T_OUT
    header[8] = 1; // sector 1
    vm.write_memory(GuestAddress(HEADER), &header).unwrap();
    let mut data = [0u8; 512];
    data[..13].copy_from_slice(b"NKVM-PCI-TEST");
    vm.write_memory(GuestAddress(DATA), &data).unwrap();
    vm.write_memory(GuestAddress(STATUS), &[0xee]).unwrap();
}

/// What sector 2 of every test image holds: the guest's read returns it.
const SECTOR_2: &[u8] = b"NKVM-FILE-SECTOR-2";

/// A fresh 8-sector image whose sector 2 holds [`SECTOR_2`].
fn test_image(name: &str) -> PathBuf {
    let image = std::env::temp_dir().join(format!("nkvm-pci-guest-test-{}-{name}.img", std::process::id()));
    let mut bytes = vec![0u8; 8 * 512];
    bytes[1024..1024 + SECTOR_2.len()].copy_from_slice(SECTOR_2);
    std::fs::write(&image, bytes).unwrap();
    image
}

/// A guest running the driver script.
struct Guest {
    vm: Arc<Vm>,
    vcpu: nkvm::Vcpu,
    run: RunState,
    long_mode: LongMode,
}

impl Guest {
    /// A VM with the PCI devices and `disk`, its vCPU about to run the
    /// driver script with BAR0 at `bar`.
    fn boot(bar: u64, disk: Disk) -> Self {
        Self::boot_with(&PciConfig { disk: Some(disk), ..Default::default() }, &guest_code(bar)).0
    }

    /// A VM with the PCI devices `config` asks for, its vCPU about to run
    /// `code`; and what `attach` started.
    fn boot_with(config: &PciConfig, code: &[u8]) -> (Self, Attached) {
        let hv = Hypervisor::open().expect("this test needs /dev/kvm");
        let vm_config = VmConfig { vcpus: 1, memory: 16 << 20, split_irqchip: true, ..Default::default() };
        let vm = Arc::new(Vm::new(&hv, &vm_config).unwrap());
        let attached = attach(&vm, config).unwrap();
        vm.write_memory(GuestAddress(ENTRY), code).unwrap();
        install_idt(&vm);
        let long_mode = LongMode::install(&vm.memory(), GuestAddress(TABLES)).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        vcpu.set_cpuid(&hv.supported_cpuid().unwrap()).unwrap();
        let mut guest = Self { vm, vcpu, run: RunState::new(), long_mode };
        guest.restart();
        (guest, attached)
    }

    /// Fresh requests and rings, and the vCPU back at the script's start
    /// (which resets the device first).
    fn restart(&mut self) {
        self.restart_with(|_| {});
    }

    /// [`restart`](Self::restart), the descriptor table changed by `edit`
    /// before the requests are made available (a device process restarted
    /// meanwhile never sees the table unchanged).
    fn restart_with(&mut self, edit: impl FnOnce(&mut [u8])) {
        self.vm.write_memory(GuestAddress(USED), &[0u8; 64]).unwrap();
        write_requests_with(&self.vm, edit);
        self.vcpu.set_long_mode(&self.long_mode, GuestAddress(ENTRY), GuestAddress(STACK)).unwrap();
    }

    /// Runs the script to its MSI-X report and checks the two requests
    /// (sector 1 written, sector 2 read) against `image`.
    fn expect_disk_io(&mut self, image: &Path) {
        let outcome = self.run_until_out(REPORT, Duration::from_secs(20), |_| true);
        assert_eq!(outcome, Ok(u64::from(VECTOR)), "the guest should take the MSI-X vector");
        check_disk_io(&self.vm, image);
    }

    /// Runs until the guest writes a value `want` accepts to `port`; returns
    /// it, or the exit that came instead, or a timeout after `limit`.
    fn run_until_out(&mut self, port: u16, limit: Duration, want: impl Fn(u64) -> bool) -> Result<u64, String> {
        self.run_until(limit, |p, data| p == port && want(data)).map(|(_, data)| data)
    }

    /// Runs until the guest makes an `out` that `want(port, data)` accepts.
    fn run_until(&mut self, limit: Duration, want: impl Fn(u16, u64) -> bool) -> Result<(u16, u64), String> {
        let kicker = self.vcpu.kicker();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watchdog = {
            let done = done.clone();
            std::thread::spawn(move || {
                let start = Instant::now();
                while start.elapsed() < limit {
                    if done.load(std::sync::atomic::Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                kicker.kick();
            })
        };
        let start = Instant::now();
        let outcome = loop {
            match self.vcpu.enter_guest(&mut self.run).unwrap() {
                // A kick left over from an earlier call's watchdog.
                Exit::Kicked if start.elapsed() < limit => {}
                Exit::Kicked => break Err(format!("nothing the test waits for within {limit:?}")),
                Exit::IoOut { port, data, .. } if want(port, data) => break Ok((port, data)),
                Exit::IoOut { .. } | Exit::Hlt => {}
                Exit::IoIn { .. } | Exit::MmioRead { .. } => self.run.complete_read(u64::MAX),
                other => break Err(format!("{other:?}")),
            }
        };
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        watchdog.join().unwrap();
        outcome
    }
}

/// Runs the driver script with BAR0 at `bar` against `disk`, whose data is
/// in `image`: the guest writes sector 1 and reads sector 2 through queue 0
/// and takes the MSI-X vector; checks the file, the read buffer, the status
/// bytes and the used ring, and returns the running guest.
fn drive_the_disk(bar: u64, disk: Disk, image: &Path) -> Guest {
    let mut guest = Guest::boot(bar, disk);
    guest.expect_disk_io(image);
    guest
}

/// Checks what the two requests did, once the backend has completed both
/// (a vhost-user backend may signal before, or complete one at a time).
fn check_disk_io(vm: &Vm, image: &Path) {
    let used_idx = |vm: &Vm| {
        let mut idx = [0u8; 2];
        vm.memory().read(GuestAddress(USED + 2), &mut idx).unwrap();
        u16::from_le_bytes(idx)
    };
    let start = Instant::now();
    while used_idx(vm) < 2 && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(used_idx(vm), 2, "two used entries");
    let disk = std::fs::read(image).unwrap();
    assert_eq!(&disk[512..525], b"NKVM-PCI-TEST", "the write is in the file");
    let mut read = [0u8; SECTOR_2.len()];
    vm.memory().read(GuestAddress(DATA2), &mut read).unwrap();
    assert_eq!(&read, SECTOR_2, "the read returned the file's bytes");
    for status in [STATUS, STATUS2] {
        let mut byte = [0u8; 1];
        vm.memory().read(GuestAddress(status), &mut byte).unwrap();
        assert_eq!(byte[0], 0, "VIRTIO_BLK_S_OK at {status:#x}");
    }
    let mut used = [0u8; 20];
    vm.memory().read(GuestAddress(USED), &mut used).unwrap();
    let mut entries: Vec<(u32, u32)> = used[4..]
        .chunks(8)
        .map(|e| (u32::from_le_bytes(e[0..4].try_into().unwrap()), u32::from_le_bytes(e[4..8].try_into().unwrap())))
        .collect();
    entries.sort_unstable();
    assert_eq!(entries, [(0, 1), (3, 513)], "chains 0 and 3, with the bytes written into them");
}

/// Runs the driver script against nkvm's own block device.
fn drive_a_disk_write(bar: u64) -> Arc<Vm> {
    let image = test_image(&format!("{bar:x}"));
    let guest = drive_the_disk(bar, Disk::Image(image.clone()), &image);
    let _ = std::fs::remove_file(&image);
    guest.vm
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

/// qemu-storage-daemon exporting an image as vhost-user-blk; killed on drop.
struct StorageDaemon {
    child: Child,
    socket: PathBuf,
}

impl StorageDaemon {
    fn start(image: &Path, socket: &Path) -> Self {
        let _ = std::fs::remove_file(socket);
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=d0,filename={}", image.display()))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},writable=on",
                socket.display()
            ))
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run qemu-storage-daemon ({e}): install it with `apt-get install -y qemu-utils`")
            });
        let mut daemon = Self { child, socket: socket.to_path_buf() };
        let start = Instant::now();
        while !socket.exists() {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!("qemu-storage-daemon exited with {status} before listening on {}", socket.display());
            }
            assert!(start.elapsed() < Duration::from_secs(10), "qemu-storage-daemon never listened");
            std::thread::sleep(Duration::from_millis(10));
        }
        daemon
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.socket);
    }
}

#[test]
fn a_guest_reads_and_writes_through_a_vhost_user_backend() {
    let image = test_image("vhost-user");
    let socket = image.with_extension("sock");
    let mut daemon = StorageDaemon::start(&image, &socket);
    let mut guest = drive_the_disk(BAR, Disk::VhostUser(socket.clone()), &image);
    // The data path never came through nkvm: no worker, the backend read
    // the kick from KVM's ioeventfd.
    assert!(has_ioeventfd(&guest.vm, BAR + 0x3000));
    let running = guest.run_until_out(STATUS_PORT, Duration::from_secs(10), |s| s == 0xf);
    assert_eq!(running, Ok(0xf), "DRIVER_OK and nothing else");
    // The backend goes away: the device fails, the VM goes on.
    daemon.kill();
    let failed = guest.run_until_out(STATUS_PORT, Duration::from_secs(10), |s| s & 0x40 != 0);
    assert_eq!(failed, Ok(0x4f), "DEVICE_NEEDS_RESET once the backend is gone");
    drop(daemon);
    // A backend on the socket again: nkvm reconnects, and the guest's next
    // reset and set-up hands it the queues. Until nkvm has reconnected the
    // set-up fails (NEEDS_RESET again); then the guest tries again.
    std::fs::write(&image, std::fs::read(test_image("vhost-user-2")).unwrap()).unwrap();
    let _daemon = StorageDaemon::start(&image, &socket);
    until_reconnected(&mut guest, |_| {});
    check_disk_io(&guest.vm, &image);
    let _ = std::fs::remove_file(&image);
}

/// Restarts the guest's device set-up until the disk reports again (its
/// backend came back and nkvm reconnected; until then the set-up fails
/// with NEEDS_RESET); `before_each` runs after each restart. Fails the
/// test after 10 s.
fn until_reconnected(guest: &mut Guest, mut before_each: impl FnMut(&Guest)) {
    let start = Instant::now();
    loop {
        guest.restart();
        before_each(guest);
        let outcome = guest.run_until(Duration::from_secs(20), |port, data| {
            port == REPORT || (port == STATUS_PORT && data & 0x40 != 0)
        });
        match outcome {
            Ok((REPORT, _)) => return,
            Ok(_) if start.elapsed() < Duration::from_secs(10) => std::thread::sleep(Duration::from_millis(100)),
            other => panic!("the device never worked again after the backend came back: {other:?}"),
        }
    }
}

#[test]
fn a_missing_vhost_user_socket_is_a_clear_error_naming_it() {
    let hv = Hypervisor::open().expect("this test needs /dev/kvm");
    let vm = Arc::new(Vm::new(&hv, &VmConfig { vcpus: 1, memory: 16 << 20, ..Default::default() }).unwrap());
    let socket = std::env::temp_dir().join(format!("nkvm-no-such-backend-{}.sock", std::process::id()));
    let err = attach(&vm, &PciConfig { disk: Some(Disk::VhostUser(socket.clone())), ..Default::default() })
        .expect_err("no backend listens there");
    let mut line = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        line.push_str(&format!(": {s}"));
        source = s.source();
    }
    assert!(line.contains(&socket.display().to_string()), "{line}");
    assert!(line.contains("vhost-user"), "{line}");
    assert!(line.contains("No such file"), "{line}");
}

#[test]
fn disk_specs_parse() {
    assert_eq!("a.img".parse::<Disk>(), Ok(Disk::Image("a.img".into())));
    assert_eq!("vhost-user:/run/d.sock".parse::<Disk>(), Ok(Disk::VhostUser("/run/d.sock".into())));
    assert!("vhost-user:".parse::<Disk>().is_err());
}

/// Pages the in-process block device writes (the read's data buffer, the
/// used ring) reach the VM's dirty log, through the write bitmap of its
/// guest-RAM mapping; pages it only reads do not.
#[test]
fn pages_the_block_device_writes_land_in_the_dirty_log() {
    let image = test_image("dirty");
    let mut guest = Guest::boot(BAR, Disk::Image(image.clone()));
    let map = guest.vm.memory();
    let logged = map.regions().iter().map(|r| r.clone().dirty_logged()).collect();
    guest.vm.set_memory_map(nkvm::MemoryMap::new(logged).unwrap()).unwrap();
    let ram = guest.vm.memory().regions().iter().map(|r| r.end()).max().unwrap();
    let dirty = |vm: &Vm| {
        vm.sync_dirty_log().unwrap();
        let pages = vm.collect_dirty(GuestAddress(0), ram, usize::MAX).unwrap();
        assert!(pages.next.is_none());
        pages.pages.into_iter().map(|g| g.0).collect::<Vec<_>>()
    };
    // What the test itself wrote (code, tables, requests) is collected here.
    dirty(&guest.vm);
    assert!(dirty(&guest.vm).is_empty(), "nothing written since the last collection");
    guest.expect_disk_io(&image);
    let _ = std::fs::remove_file(&image);
    let pages = dirty(&guest.vm);
    for (what, gpa) in [("the read's data buffer", DATA2), ("its status byte", STATUS2), ("the used ring", USED)] {
        assert!(pages.contains(&gpa), "{what} at {gpa:#x} is not in the dirty log: {pages:x?}");
    }
    for (what, gpa) in [("the descriptor table", DESC), ("the available ring", AVAIL), ("the write's data", DATA)] {
        assert!(!pages.contains(&gpa), "{what} at {gpa:#x} was only read, yet is in the dirty log");
    }
    // Drained once: the device's bits were cleared as they were folded in.
    assert!(!dirty(&guest.vm).contains(&USED), "the used ring reported twice");
}

/// A backend-served device's sink raises on unmask only the vectors the
/// backend was handed as a queue's call eventfd: re-raising the
/// configuration vector (Linux unmasks it at probe and at every affinity
/// change) made virtio-blk re-read its configuration each time.
#[test]
fn an_unmask_raises_again_only_the_vectors_a_backend_was_handed() {
    let hv = Hypervisor::open().expect("this test needs /dev/kvm");
    let config = VmConfig { vcpus: 1, memory: 16 << 20, split_irqchip: true, ..Default::default() };
    let vm = Arc::new(Vm::new(&hv, &config).unwrap());
    // SAFETY: the mapping lives as long as the keeper, kept in the sink.
    let (_ram, keeper) = unsafe { guest_ram(&vm).unwrap() };
    // Eventfds that are no irqfds: their counters show what the sink wrote.
    let vectors: Vec<(u32, EventFd)> =
        (0..2u32).map(|i| (FIRST_USER_GSI + i, EventFd::new(EFD_NONBLOCK).unwrap())).collect();
    let handed: Arc<[AtomicBool]> = vec![AtomicBool::new(false), AtomicBool::new(true)].into();
    let mut sink =
        IrqfdSink { vm: Arc::downgrade(&vm), vectors, routed: vec![false; 2], handed: Some(handed), _ram: keeper };
    let message = |data| Some(MsiMessage { address: 0xfee0_0000, data });
    for round in 0..2 {
        // Unmasked (at probe), then masked, rewritten and unmasked again.
        sink.route(0, message(0x30 + round));
        sink.route(1, message(0x40 + round));
        assert!(sink.vectors[0].1.read().is_err(), "round {round}: the configuration vector was raised");
        assert_eq!(sink.vectors[1].1.read().unwrap(), 1, "round {round}: the queue's vector is raised once");
        sink.route(0, None);
        sink.route(1, None);
    }
}
