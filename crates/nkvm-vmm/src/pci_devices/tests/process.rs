//! The same guests against virtio-blk in an nkvm device process (`nkvm
//! device --model virtio-blk`): the guest-visible behaviour, the sandbox,
//! and the restart after a SIGKILL in the middle of a stream of writes.
//!
//! The process is the `nkvm` binary beside this test binary (cargo builds
//! it for `cargo test -p nkvm-vmm`).

use std::sync::Mutex;

use super::*;
use crate::pci_devices::device_process::ProcessLog;
use crate::pci_devices::vhost_user::MAX_RESTARTS;
use crate::virtio_process::{FORBIDDEN_CALL_ENV, GUEST_QUEUE_ERROR_EXIT};

/// The `nkvm` executable cargo built beside the test binary.
pub(super) fn nkvm_exe() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let nkvm = exe.parent().and_then(Path::parent).unwrap().join("nkvm");
    assert!(nkvm.exists(), "{} is missing: run the tests with `cargo test -p nkvm-vmm`", nkvm.display());
    nkvm
}

/// PCI devices with `image` served by a device process.
pub(super) fn in_a_process(image: &Path) -> PciConfig {
    PciConfig { disk: Some(Disk::Image(image.into())), device_process: Some(nkvm_exe()), ..Default::default() }
}

fn log_of(attached: &Attached) -> Arc<Mutex<ProcessLog>> {
    attached.block_process.clone().expect("the disk is served by a device process")
}

/// A line of /proc/PID/status.
fn proc_status(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix(field)).map(|v| v.trim().to_string()).unwrap_or_default()
}

#[test]
fn a_guest_reads_and_writes_through_a_device_process() {
    for bar in [BAR, MOVED_BAR] {
        let image = test_image(&format!("process-{bar:x}"));
        let (mut guest, attached) = Guest::boot_with(&in_a_process(&image), &guest_code(bar));
        guest.expect_disk_io(&image);
        // The kick went from KVM's ioeventfd to the process, no worker here.
        assert!(has_ioeventfd(&guest.vm, bar + 0x3000));
        let running = guest.run_until_out(STATUS_PORT, Duration::from_secs(10), |s| s == 0xf);
        assert_eq!(running, Ok(0xf), "DRIVER_OK and nothing else");
        let pid = log_of(&attached).lock().unwrap().pid;
        assert_eq!(proc_status(pid, "Seccomp:"), "2", "the process runs under a seccomp filter");
        assert_eq!(proc_status(pid, "NoNewPrivs:"), "1");
        // Its descriptors: stdio, the image, the connection, guest RAM's
        // memfd, kick, call and the backend's own eventfds and epolls.
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
        assert!(fds < 20, "the process holds {fds} descriptors");
        let _ = std::fs::remove_file(&image);
    }
}

#[test]
fn a_forbidden_system_call_kills_the_process_and_is_reported_by_name() {
    let image = test_image("forbidden");
    let mut config = in_a_process(&image);
    config.device_process_env = vec![(FORBIDDEN_CALL_ENV.into(), "1".into())];
    let (mut guest, attached) = Guest::boot_with(&config, &guest_code(BAR));
    // Each process dies on its first request (or on the kick already
    // pending when the driver hands it the queue, which fails the set-up):
    // the guest sees DEVICE_NEEDS_RESET, resets and sets the device up
    // again, until the restarts are spent and the device has failed.
    let log = log_of(&attached);
    for _ in 0..2 * (MAX_RESTARTS + 2) {
        let outcome = guest.run_until(Duration::from_secs(60), |port, data| {
            port == REPORT || (port == STATUS_PORT && data & 0x40 != 0)
        });
        assert!(outcome.is_ok(), "the VM goes on: {outcome:?}");
        if log.lock().unwrap().failed {
            break;
        }
        guest.restart();
    }
    // Given up on: the next set-up fails at once, the VM still runs.
    guest.restart();
    let failed = guest.run_until_out(STATUS_PORT, Duration::from_secs(60), |s| s & 0x40 != 0);
    assert_eq!(failed, Ok(0x4f), "DEVICE_NEEDS_RESET once the restarts are spent");
    let log = log.lock().unwrap();
    assert!(log.failed);
    assert_eq!(log.restarts, MAX_RESTARTS);
    assert_eq!(log.deaths.len() as u32, log.restarts + 1);
    for death in &log.deaths {
        assert_eq!(death.signal, Some(libc::SIGSYS), "{death}");
        assert_eq!(death.forbidden_call, Some(libc::SYS_socket), "{death}");
        let line = death.to_string();
        assert!(line.contains(&format!("forbidden system call {} (socket)", libc::SYS_socket)), "{line}");
    }
    let _ = std::fs::remove_file(&image);
}

/// A guest whose first request has no status byte (its last descriptor is
/// not device-writable) breaks its queue: in process the device sets
/// `DEVICE_NEEDS_RESET`. A device process used to return the error to
/// vhost-user-backend, which ended the queue's thread: the device went
/// silent and nobody knew. Now the process ends with
/// [`GUEST_QUEUE_ERROR_EXIT`]; the VMM names that, restarts it, and after
/// the restarts (each meeting the broken ring again) fails the device. No
/// request completes, the valid one after the broken one included.
#[test]
fn a_malformed_request_ends_the_device_process_and_fails_the_device_after_its_restarts() {
    let image = test_image("malformed");
    let (mut guest, attached) = Guest::boot_with(&in_a_process(&image), &guest_code(BAR));
    // Chain 0's status descriptor (index 2): flags 0, not WRITE. Written
    // into the table before the requests are made available: a process the
    // VMM restarts meanwhile would otherwise serve the intact requests.
    let break_chain = |table: &mut [u8]| table[2 * 16 + 12..2 * 16 + 14].fill(0);
    guest.restart_with(break_chain);
    let log = log_of(&attached);
    for _ in 0..2 * (MAX_RESTARTS + 2) {
        let outcome = guest.run_until(Duration::from_secs(60), |port, data| {
            port == REPORT || (port == STATUS_PORT && data & 0x40 != 0)
        });
        // The interrupt may be the config change that comes with
        // DEVICE_NEEDS_RESET: the used ring says whether anything completed.
        assert!(outcome.is_ok(), "the VM goes on: {outcome:?}");
        assert_eq!(used_index(&guest), 0, "no request completed");
        if log.lock().unwrap().failed {
            break;
        }
        guest.restart_with(break_chain);
    }
    guest.restart();
    let failed = guest.run_until_out(STATUS_PORT, Duration::from_secs(60), |s| s & 0x40 != 0);
    assert_eq!(failed, Ok(0x4f), "DEVICE_NEEDS_RESET once the restarts are spent");
    assert_eq!(used_index(&guest), 0, "no request completed");
    let log = log.lock().unwrap();
    assert!(log.failed);
    assert_eq!(log.restarts, MAX_RESTARTS);
    for death in &log.deaths {
        assert_eq!((death.signal, death.code), (None, Some(GUEST_QUEUE_ERROR_EXIT)), "{death}");
        assert!(death.to_string().contains("its guest broke a queue"), "{death}");
    }
    let _ = std::fs::remove_file(&image);
}

/// Queue 0's used index.
fn used_index(guest: &Guest) -> u16 {
    let mut idx = [0u8; 2];
    guest.vm.read_memory(GuestAddress(USED + 2), &mut idx).unwrap();
    u16::from_le_bytes(idx)
}

/// Where the stream guest reports "request i submitted".
const SUBMITTED: u16 = 0x72;
/// Where it reports that every request completed.
const DONE: u16 = 0x73;
/// Requests in the stream.
const STREAM: u64 = 48;
/// What sector i holds after the stream: this ORed with i.
const STREAM_MAGIC: u64 = 0x4e4b_564d_0000_0000;

/// The driver script, then one write of sector i per request, queue depth
/// 1: header and data filled in, the available index moved, the queue
/// notified, i reported on [`SUBMITTED`], the used index awaited.
fn stream_code(bar: u64) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    emit_driver_script(&mut a, bar);
    let mut next = a.create_label();
    let mut wait = a.create_label();
    a.xor(r12, r12).unwrap();
    a.set_label(&mut next).unwrap();
    a.mov(rbx, HEADER).unwrap();
    a.mov(dword_ptr(rbx), 1).unwrap(); // VIRTIO_BLK_T_OUT
    a.mov(qword_ptr(rbx + 8), r12).unwrap(); // sector i
    a.mov(rax, STREAM_MAGIC).unwrap();
    a.or(rax, r12).unwrap();
    a.mov(rbx, DATA).unwrap();
    a.mov(qword_ptr(rbx), rax).unwrap();
    a.mov(rbx, STATUS).unwrap();
    a.mov(byte_ptr(rbx), 0xee).unwrap();
    a.lea(rax, qword_ptr(r12 + 1)).unwrap();
    a.mov(rbx, AVAIL + 2).unwrap();
    a.mov(word_ptr(rbx), ax).unwrap(); // avail.idx = i + 1 (every ring slot holds head 0)
    a.mov(rbx, bar + 0x3000).unwrap();
    a.mov(word_ptr(rbx), 0).unwrap(); // notify queue 0
    a.mov(eax, r12d).unwrap();
    a.out(u32::from(SUBMITTED), eax).unwrap();
    a.lea(rdx, qword_ptr(r12 + 1)).unwrap();
    a.set_label(&mut wait).unwrap();
    a.pause().unwrap();
    a.mov(rbx, USED + 2).unwrap();
    a.movzx(eax, word_ptr(rbx)).unwrap();
    a.cmp(ax, dx).unwrap();
    a.jne(wait).unwrap();
    a.inc(r12).unwrap();
    a.cmp(r12, STREAM as i32).unwrap();
    a.jb(next).unwrap();
    a.mov(eax, 1).unwrap();
    a.out(u32::from(DONE), eax).unwrap();
    let mut idle = a.create_label();
    a.set_label(&mut idle).unwrap();
    a.hlt().unwrap();
    a.jmp(idle).unwrap();
    a.assemble(ENTRY).unwrap()
}

/// Chain 0 (header, data, status) and empty rings for the stream.
fn stream_rings(vm: &Vm) {
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
    vm.write_memory(GuestAddress(AVAIL), &[0u8; 64]).unwrap();
    vm.write_memory(GuestAddress(USED), &[0u8; 256]).unwrap();
    vm.write_memory(GuestAddress(DATA), &[0u8; 512]).unwrap();
}

#[test]
fn a_device_process_killed_mid_stream_is_restarted_and_no_completed_write_is_lost() {
    let image = std::env::temp_dir().join(format!("nkvm-pci-stream-{}.img", std::process::id()));
    std::fs::write(&image, vec![0u8; (STREAM as usize + 8) * 512]).unwrap();
    let (mut guest, attached) = Guest::boot_with(&in_a_process(&image), &stream_code(BAR));
    stream_rings(&guest.vm);
    let log = log_of(&attached);
    let first_pid = log.lock().unwrap().pid;
    // Request 10 is on its way to the process: kill it.
    let submitted = guest.run_until_out(SUBMITTED, Duration::from_secs(60), |i| i == 10);
    assert_eq!(submitted, Ok(10));
    let killed = Command::new("kill").args(["-KILL", &first_pid.to_string()]).status().unwrap();
    assert!(killed.success());
    // The VM goes on; the guest finishes its stream on the new process.
    let done = guest.run_until_out(DONE, Duration::from_secs(120), |_| true);
    assert_eq!(done, Ok(1), "the guest saw every request complete");
    let disk = std::fs::read(&image).unwrap();
    for i in 0..STREAM as usize {
        let sector = u64::from_le_bytes(disk[i * 512..i * 512 + 8].try_into().unwrap());
        assert_eq!(sector, STREAM_MAGIC | i as u64, "sector {i} holds the guest's write");
    }
    let log = log.lock().unwrap();
    assert_eq!(log.restarts, 1);
    assert_eq!(log.deaths.len(), 1);
    assert_eq!(log.deaths[0].pid, first_pid);
    assert_eq!(log.deaths[0].signal, Some(libc::SIGKILL));
    assert_ne!(log.pid, first_pid, "a new process serves the disk");
    assert!(!log.failed);
    let _ = std::fs::remove_file(&image);
}

/// The console's transmit queue set up (no disk: the console is 00:01.0),
/// one buffer sent, its completion awaited, then [`DONE`].
fn console_code() -> Vec<u8> {
    use Op::*;
    let ops = vec![
        Config(0x04, 0x6),
        Mmio(0x14, 1, 0),
        Mmio(0x14, 1, 1),
        Mmio(0x14, 1, 3),
        Mmio(0x08, 4, 1),
        Mmio(0x0c, 4, 1), // VERSION_1
        Mmio(0x14, 1, 0xb),
        Mmio(0x16, 2, 1), // queue 1: transmit
        Mmio(0x18, 2, 16),
        Mmio(0x20, 4, DESC as u32),
        Mmio(0x24, 4, 0),
        Mmio(0x28, 4, AVAIL as u32),
        Mmio(0x2c, 4, 0),
        Mmio(0x30, 4, USED as u32),
        Mmio(0x34, 4, 0),
        Mmio(0x1c, 2, 1),
        Mmio(0x14, 1, 0xf),
        Mmio(0x3004, 2, 1), // notify queue 1
    ];
    let mut a = CodeAssembler::new(64).unwrap();
    emit_ops(&mut a, BAR, ops);
    let mut wait = a.create_label();
    a.mov(rbx, USED + 2).unwrap();
    a.set_label(&mut wait).unwrap();
    a.pause().unwrap();
    a.movzx(eax, word_ptr(rbx)).unwrap();
    a.cmp(eax, 1).unwrap();
    a.jne(wait).unwrap();
    a.out(u32::from(DONE), eax).unwrap();
    let mut idle = a.create_label();
    a.set_label(&mut idle).unwrap();
    a.hlt().unwrap();
    a.jmp(idle).unwrap();
    a.assemble(ENTRY).unwrap()
}

#[test]
fn a_guest_writes_to_a_console_in_a_device_process_and_its_successor() {
    const TEXT: &[u8] = b"hello from a sandboxed virtio-console\n";
    let output = std::env::temp_dir().join(format!("nkvm-console-{}.out", std::process::id()));
    let _ = std::fs::remove_file(&output);
    let config = PciConfig {
        device_process: Some(nkvm_exe()),
        device_process_stdout: Some(output.clone()),
        ..Default::default()
    };
    let (mut guest, attached) = Guest::boot_with(&config, &console_code());
    let mut desc = [0u8; 16];
    desc[0..8].copy_from_slice(&DATA.to_le_bytes());
    desc[8..12].copy_from_slice(&(TEXT.len() as u32).to_le_bytes());
    guest.vm.write_memory(GuestAddress(DESC), &desc).unwrap();
    guest.vm.write_memory(GuestAddress(DATA), TEXT).unwrap();
    guest.vm.write_memory(GuestAddress(AVAIL), &[0, 0, 1, 0, 0, 0]).unwrap(); // idx 1, ring[0] = 0
    guest.vm.write_memory(GuestAddress(USED), &[0u8; 64]).unwrap();
    let done = guest.run_until_out(DONE, Duration::from_secs(60), |_| true);
    assert_eq!(done, Ok(1), "the console completed the buffer");
    assert_eq!(std::fs::read(&output).unwrap(), TEXT, "the process wrote the guest's bytes");
    let log = attached.console_process.expect("the console is served by a device process");
    let pid = log.lock().unwrap().pid;
    assert_eq!(proc_status(pid, "Seccomp:"), "2");
    // A second buffer made available without a notify, then the process
    // killed: its successor takes the queue at used.idx 1, is kicked, and
    // sends it.
    const MORE: &[u8] = b"and again from its successor\n";
    let mut desc = [0u8; 16];
    desc[0..8].copy_from_slice(&DATA2.to_le_bytes());
    desc[8..12].copy_from_slice(&(MORE.len() as u32).to_le_bytes());
    guest.vm.write_memory(GuestAddress(DESC + 16), &desc).unwrap();
    guest.vm.write_memory(GuestAddress(DATA2), MORE).unwrap();
    guest.vm.write_memory(GuestAddress(AVAIL + 6), &1u16.to_le_bytes()).unwrap(); // ring[1] = 1
    guest.vm.write_memory(GuestAddress(AVAIL + 2), &2u16.to_le_bytes()).unwrap(); // idx 2
    assert!(Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap().success());
    let start = Instant::now();
    let used_idx = || {
        let mut idx = [0u8; 2];
        guest.vm.memory().read(GuestAddress(USED + 2), &mut idx).unwrap();
        u16::from_le_bytes(idx)
    };
    while used_idx() < 2 && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(used_idx(), 2, "the restarted console completed the second buffer");
    assert_eq!(std::fs::read(&output).unwrap(), [TEXT, MORE].concat());
    let log = log.lock().unwrap();
    assert_eq!((log.restarts, log.deaths[0].signal), (1, Some(libc::SIGKILL)));
    let _ = std::fs::remove_file(&output);
}

#[test]
fn a_device_process_that_cannot_start_is_a_clear_error_naming_it() {
    let hv = Hypervisor::open().expect("this test needs /dev/kvm");
    let vm = Arc::new(Vm::new(&hv, &VmConfig { vcpus: 1, memory: 16 << 20, ..Default::default() }).unwrap());
    let image = test_image("no-exe");
    let exe = std::env::temp_dir().join("nkvm-no-such-executable");
    let config = PciConfig { device_process: Some(exe.clone()), ..in_a_process(&image) };
    let err = attach(&vm, &config).expect_err("there is no such executable");
    let line = err.to_string();
    assert!(line.contains("virtio-blk device process"), "{line}");
    assert!(line.contains(&exe.display().to_string()), "{line}");
    let _ = std::fs::remove_file(&image);
}

#[test]
fn a_read_only_disk_in_a_device_process_fails_writes_and_serves_reads() {
    let image = test_image("read-only");
    let config = PciConfig { disk_read_only: true, ..in_a_process(&image) };
    let (mut guest, _attached) = Guest::boot_with(&config, &guest_code(BAR));
    let outcome = guest.run_until_out(REPORT, Duration::from_secs(60), |_| true);
    assert_eq!(outcome, Ok(u64::from(VECTOR)), "the guest should take the MSI-X vector");
    let start = Instant::now();
    let used_idx = |vm: &Vm| {
        let mut idx = [0u8; 2];
        vm.memory().read(GuestAddress(USED + 2), &mut idx).unwrap();
        u16::from_le_bytes(idx)
    };
    while used_idx(&guest.vm) < 2 && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = |at: u64| {
        let mut byte = [0u8; 1];
        guest.vm.memory().read(GuestAddress(at), &mut byte).unwrap();
        byte[0]
    };
    assert_eq!(status(STATUS), 1, "the write completes with VIRTIO_BLK_S_IOERR");
    assert_eq!(status(STATUS2), 0, "the read completes with VIRTIO_BLK_S_OK");
    let mut read = [0u8; SECTOR_2.len()];
    guest.vm.memory().read(GuestAddress(DATA2), &mut read).unwrap();
    assert_eq!(&read, SECTOR_2);
    assert!(std::fs::read(&image).unwrap()[512..1024].iter().all(|&b| b == 0), "sector 1 untouched");
    let _ = std::fs::remove_file(&image);
}

/// The driver script with queue 0's MSI-X vector masked; once the used
/// ring shows both requests done, the guest unmasks it and idles.
fn masked_vector_guest() -> Vec<u8> {
    let mut ops = driver_script(BAR);
    // Entry 1's vector control: masked (set before the queue is handed over).
    let at = ops.iter().position(|op| matches!(op, Op::Mmio(0x401c, ..))).unwrap();
    ops[at] = Op::Mmio(0x401c, 4, 1);
    let mut a = CodeAssembler::new(64).unwrap();
    emit_ops(&mut a, BAR, ops);
    a.sti().unwrap();
    let mut wait = a.create_label();
    a.set_label(&mut wait).unwrap();
    a.mov(rbx, USED + 2).unwrap();
    a.movzx(eax, word_ptr(rbx)).unwrap();
    a.cmp(eax, 2).unwrap();
    a.jb(wait).unwrap();
    a.mov(rbx, BAR + 0x401c).unwrap();
    a.mov(dword_ptr(rbx), 0).unwrap(); // unmask
    let mut idle = a.create_label();
    a.set_label(&mut idle).unwrap();
    a.out(u32::from(STATUS_PORT), al).unwrap();
    a.pause().unwrap();
    a.jmp(idle).unwrap();
    a.assemble(ENTRY).unwrap()
}

#[test]
fn an_interrupt_raised_while_its_vector_is_masked_arrives_when_it_is_unmasked() {
    // In process the MSI-X model keeps the pending bit; a device process
    // writes the irqfd itself, so the VMM raises the vector on unmask.
    for config in [None, Some(())] {
        let image = test_image(&format!("masked-{}", config.is_some()));
        let pci = if config.is_some() {
            in_a_process(&image)
        } else {
            PciConfig { disk: Some(Disk::Image(image.clone())), ..Default::default() }
        };
        let (mut guest, _attached) = Guest::boot_with(&pci, &masked_vector_guest());
        let outcome = guest.run_until_out(REPORT, Duration::from_secs(20), |_| true);
        assert_eq!(outcome, Ok(u64::from(VECTOR)), "device process: {}", config.is_some());
        check_disk_io(&guest.vm, &image);
        let _ = std::fs::remove_file(&image);
    }
}
