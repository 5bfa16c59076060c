//! `nkvm run --restore` of a `--kernel` bzImage machine (the Linux kind:
//! PCI, virtio) maps the snapshot's memory file copy-on-write, and its
//! in-process virtio-blk serves the guest through that mapping.
//!
//! A tiny bzImage (no Linux: a few dozen instructions) brings virtio-blk
//! to DRIVER_OK with one read request in its descriptor table, says
//! `ready` and waits for a byte on the 16550. It is snapshotted there.
//! Each restore is sent a byte: the guest then makes the request available
//! (written into its copy-on-write pages only), notifies the queue, waits
//! for the used ring and prints the sector the device read into its
//! memory. The snapshot restores twice to the same output, and its memory
//! file is unchanged byte for byte. The machine also migrates live, with
//! its devices in process or in device processes.

mod common;
mod nkvm_process;

use std::path::Path;

use common::tiny_bzimage;
use iced_x86::code_asm::*;
use nkvm_process::{ctl, scratch, Vmm};

/// Where the 64-bit entry of the tiny bzImage runs.
const ENTRY: u64 = 0x10_0200;
/// The queue, the request and its buffers (free RAM at 32 MiB).
const DESC: u64 = 0x200_0000;
const AVAIL: u64 = 0x200_1000;
const USED: u64 = 0x200_2000;
const HEADER: u64 = 0x200_3000;
const DATA: u64 = 0x200_4000;
const STATUS: u64 = 0x200_5000;
/// What sector 0 of the disk holds; the guest prints it after the restore.
const SECTOR: &[u8] = b"SECTOR-0-OF-THE-DISK";
const COM1: u16 = 0x3f8;

/// A PCI configuration write to 00:01.0 (the disk).
fn config_write(a: &mut CodeAssembler, register: u32, value: u32) -> Result<(), IcedError> {
    a.mov(eax, 0x8000_0000 | 1 << 11 | register)?;
    a.mov(dx, 0xcf8u32)?;
    a.out(dx, eax)?;
    a.mov(eax, value)?;
    a.mov(dx, 0xcfcu32)?;
    a.out(dx, eax)
}

/// `text` on the 16550.
fn print(a: &mut CodeAssembler, text: &[u8]) -> Result<(), IcedError> {
    a.mov(dx, u32::from(COM1))?;
    for &b in text {
        a.mov(al, u32::from(b))?;
        a.out(dx, al)?;
    }
    Ok(())
}

/// A descriptor: address, length, flags, next.
fn descriptor(a: &mut CodeAssembler, n: u64, addr: u64, len: u32, flags: u16, next: u16) -> Result<(), IcedError> {
    a.mov(rdi, DESC + 16 * n)?;
    a.mov(rax, addr)?;
    a.mov(qword_ptr(rdi), rax)?;
    a.mov(dword_ptr(rdi + 8), len)?;
    a.mov(word_ptr(rdi + 12), u32::from(flags))?;
    a.mov(word_ptr(rdi + 14), u32::from(next))
}

/// The guest (see the module documentation).
fn guest() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    // BAR0, where the VMM put it (64-bit memory BAR: the low dword, flags off).
    config_write(&mut a, 0x04, 0x6)?; // memory decoding, bus master
    a.mov(eax, 0x8000_0000u32 | 1 << 11 | 0x10)?;
    a.mov(dx, 0xcf8u32)?;
    a.out(dx, eax)?;
    a.mov(dx, 0xcfcu32)?;
    a.in_(eax, dx)?;
    a.and(eax, 0xffff_fff0u32)?;
    a.mov(ebx, eax)?; // rbx: BAR0 (below 4 GiB)
                      // The request: IN of sector 0 (header, 512-byte buffer, status).
    a.mov(rdi, HEADER)?;
    a.mov(qword_ptr(rdi), 0)?; // VIRTIO_BLK_T_IN
    a.mov(qword_ptr(rdi + 8), 0)?; // sector 0
    descriptor(&mut a, 0, HEADER, 16, 1, 1)?;
    descriptor(&mut a, 1, DATA, 512, 3, 2)?; // NEXT | WRITE
    descriptor(&mut a, 2, STATUS, 1, 2, 0)?; // WRITE
    a.mov(rdi, AVAIL)?;
    a.mov(dword_ptr(rdi), 0)?; // flags, idx 0: nothing available yet
    a.mov(word_ptr(rdi + 4), 0)?; // ring[0]: chain 0
    a.mov(rdi, STATUS)?;
    a.mov(byte_ptr(rdi), 0xee)?;
    // The device to DRIVER_OK, queue 0 of 16 at the addresses above.
    for (offset, size, value) in [
        (0x14u32, 1u8, 0u32), // reset
        (0x14, 1, 1),         // ACKNOWLEDGE
        (0x14, 1, 3),         // DRIVER
        (0x08, 4, 1),         // driver features 63:32: VERSION_1
        (0x0c, 4, 1),
        (0x14, 1, 0xb), // FEATURES_OK
        (0x16, 2, 0),   // queue 0
        (0x18, 2, 16),
        (0x20, 4, DESC as u32),
        (0x24, 4, 0),
        (0x28, 4, AVAIL as u32),
        (0x2c, 4, 0),
        (0x30, 4, USED as u32),
        (0x34, 4, 0),
        (0x1c, 2, 1),   // queue enable
        (0x14, 1, 0xf), // DRIVER_OK
    ] {
        a.mov(eax, value)?;
        match size {
            1 => a.mov(byte_ptr(rbx + offset as i32), al)?,
            2 => a.mov(word_ptr(rbx + offset as i32), ax)?,
            _ => a.mov(dword_ptr(rbx + offset as i32), eax)?,
        }
    }
    print(&mut a, b"ready\n")?;
    // Wait for a byte on the 16550 (the snapshot is taken here).
    let mut poll = a.create_label();
    a.set_label(&mut poll)?;
    a.mov(dx, u32::from(COM1) + 5)?;
    a.in_(al, dx)?;
    a.test(al, 1)?;
    a.jz(poll)?;
    a.mov(dx, u32::from(COM1))?;
    a.in_(al, dx)?;
    // Make chain 0 available (idx 1) and notify queue 0.
    a.mov(rdi, AVAIL)?;
    a.mov(word_ptr(rdi + 2), 1)?;
    a.xor(eax, eax)?;
    a.mov(word_ptr(rbx + 0x3000), ax)?;
    // Wait for the used ring, then print the status byte and the sector.
    let mut wait = a.create_label();
    a.set_label(&mut wait)?;
    a.mov(rdi, USED)?;
    a.mov(ax, word_ptr(rdi + 2))?;
    a.cmp(ax, 1)?;
    a.jb(wait)?;
    print(&mut a, b"status ")?;
    a.mov(rdi, STATUS)?;
    a.mov(al, byte_ptr(rdi))?;
    a.add(al, b'0' as i32)?;
    a.out(dx, al)?;
    print(&mut a, b" read ")?;
    a.mov(rsi, DATA)?;
    a.mov(ecx, SECTOR.len() as u32)?;
    let mut byte = a.create_label();
    a.set_label(&mut byte)?;
    a.mov(al, byte_ptr(rsi))?;
    a.out(dx, al)?;
    a.inc(rsi)?;
    a.dec(ecx)?;
    a.jnz(byte)?;
    print(&mut a, b"\n")?;
    let mut hang = a.create_label();
    a.set_label(&mut hang)?;
    a.cli()?;
    a.hlt()?;
    a.jmp(hang)?;
    a.assemble(ENTRY)
}

/// The restored guest's console once it has been sent a byte: the status
/// of its request and the sector it read.
fn restore_and_read(snap: &Path) -> String {
    let mut restored = Vmm::run(&["--restore", snap.to_str().unwrap()]);
    restored.type_(b"g");
    restored.wait_console("read ");
    restored.wait_console("\n");
    let console = restored.stdout();
    restored.kill();
    let stderr = restored.stderr();
    eprintln!("{}", stderr.lines().find(|l| l.contains("restored")).unwrap_or("no restore line"));
    assert!(stderr.contains("nkvm: restored"), "{stderr}");
    console
}

/// The guest's disk image in `dir`: 8 sectors, [`SECTOR`] in the first.
fn write_disk(dir: &Path) -> std::path::PathBuf {
    let disk = dir.join("disk.img");
    let mut sectors = vec![0u8; 8 * 512];
    sectors[..SECTOR.len()].copy_from_slice(SECTOR);
    std::fs::write(&disk, &sectors).unwrap();
    disk
}

/// The tiny guest and its disk in `dir`, started with an API socket
/// there and `extra`; returns it once it is ready, and the API socket's
/// path.
fn start_ready(dir: &Path, extra: &[&str]) -> (Vmm, std::path::PathBuf) {
    let disk = write_disk(dir);
    start_ready_on(dir, disk.to_str().unwrap(), extra)
}

/// The tiny guest with `--disk DISK`, as [`start_ready`].
fn start_ready_on(dir: &Path, disk: &str, extra: &[&str]) -> (Vmm, std::path::PathBuf) {
    let kernel = dir.join("tiny.bzImage");
    std::fs::write(&kernel, tiny_bzimage(&guest().unwrap())).unwrap();
    let api = dir.join("api.sock");
    let mut args = vec![
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "64M",
        "--disk",
        disk,
        "--api-socket",
        api.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let mut source = Vmm::run(&args);
    source.wait_console("ready\n");
    (source, api)
}

/// Starts `nkvm run --incoming` (with `extra`) on a free loopback port and
/// asks the source behind `api` to migrate there; returns the destination.
fn migrate_to_a_new_destination(api: &Path, extra: &[&str]) -> Vmm {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("tcp:127.0.0.1:{port}");
    let mut args = vec!["--incoming", addr.as_str()];
    args.extend_from_slice(extra);
    let mut dest = Vmm::run(&args);
    dest.wait_stderr("waiting for a migration");
    let answer = ctl(api, &["migrate", &addr]);
    assert_eq!(answer["ok"], true, "{answer}");
    dest
}

/// What the guest prints once its request is served.
fn served() -> String {
    format!("status 0 read {}\n", std::str::from_utf8(SECTOR).unwrap())
}

#[test]
fn a_restored_kernel_machines_virtio_disk_writes_the_guests_mapped_memory_and_not_the_snapshot() {
    let dir = scratch("kernel-restore-virtio");
    let (source, api) = start_ready(&dir, &[]);
    let snap = dir.join("snap");
    assert_eq!(ctl(&api, &["pause"])["ok"], true);
    let answer = ctl(&api, &["snapshot", snap.to_str().unwrap()]);
    assert_eq!(answer["ok"], true, "{answer}");
    drop(source);
    let machine = std::fs::read_to_string(snap.join("machine.json")).unwrap();
    assert!(machine.contains("\"kind\": \"linux\""), "a --kernel bzImage machine: {machine}");
    let memory = std::fs::read(snap.join("memory")).unwrap();

    for round in ["first", "second"] {
        let console = restore_and_read(&snap);
        let want = served();
        assert!(console.ends_with(&want), "{round} restore: the guest saw {console:?}, not {want:?}");
        assert!(std::fs::read(snap.join("memory")).unwrap() == memory, "{round} restore wrote the memory file");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same machine migrated live (the guest polls its 16550) to a
/// destination that builds it while the memory arrives: there the virtio
/// disk, restored with its queue, serves the request the guest makes
/// after the move, into pages the destination wrote through its memory
/// file.
#[test]
fn a_kernel_machine_migrated_live_serves_its_virtio_disk_on_the_destination() {
    migrate_and_serve("kernel-migrate-virtio", &[]);
}

/// The same with its 16550, virtio-blk and virtio-console in device
/// processes, into a destination that starts new ones: the migration takes
/// their states from the processes (the disk's queue stopped where the
/// driver left it) and gives them to the new processes, whose disk serves
/// the request the guest makes after the move, typed into the 16550's
/// process.
#[test]
fn a_kernel_machine_with_device_processes_migrates_into_new_ones_and_serves_its_disk() {
    migrate_and_serve("kernel-migrate-device-process", &["--device-process"]);
}

/// Starts the ready guest with `extra`, migrates it to a destination run
/// with the same, and checks that it serves the request the guest makes
/// after the move.
fn migrate_and_serve(name: &str, extra: &[&str]) {
    let dir = scratch(name);
    let (source, api) = start_ready(&dir, extra);
    migrate_ready_and_serve(source, &api, extra);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Migrates the ready guest `source` (its API on `api`) to a destination
/// run with `extra` and checks that it serves the request the guest makes
/// after the move (typed on its console).
fn migrate_ready_and_serve(mut source: Vmm, api: &Path, extra: &[&str]) {
    let mut dest = migrate_to_a_new_destination(api, extra);
    source.wait_stderr("this process ends");
    dest.wait_stderr("the guest resumes here");
    dest.type_(b"g");
    dest.wait_console("read ");
    dest.wait_console("\n");
    let console = dest.stdout();
    assert!(console.ends_with(&served()), "the destination's guest saw {console:?}");
    assert!(!console.contains("ready"), "the guest started again on the destination: {console:?}");
    drop(dest);
    drop(source);
}

/// qemu-storage-daemon exporting `image` as vhost-user-blk on `socket`,
/// with file locking off, so a second daemon can serve the same image as a
/// second host on shared storage would. Killed when dropped.
struct StorageDaemon(std::process::Child);

impl StorageDaemon {
    fn start(image: &Path, socket: &Path) -> Self {
        let child = std::process::Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=d0,filename={},locking=off", image.display()))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},writable=on",
                socket.display()
            ))
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run qemu-storage-daemon ({e}): `apt-get install -y qemu-utils`"));
        let daemon = Self(child);
        let start = std::time::Instant::now();
        while !socket.exists() {
            assert!(start.elapsed() < std::time::Duration::from_secs(10), "qemu-storage-daemon never listened");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        daemon
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The same machine with its disk behind qemu-storage-daemon: the backend's
/// queue is stopped where the driver left it and travels as a position. The
/// destination finds a backend at the same socket path (here a second
/// daemon on the same image, bound after the first one's file is gone, as
/// another host's would be), hands it the queue there, and it serves the
/// request the guest makes after the move.
#[test]
fn a_kernel_machine_with_a_vhost_user_disk_migrates_to_the_backend_at_the_same_path() {
    let dir = scratch("kernel-migrate-vhost-user");
    let disk = write_disk(&dir);
    let socket = dir.join("qsd.sock");
    let first = StorageDaemon::start(&disk, &socket);
    let (source, api) = start_ready_on(&dir, &format!("vhost-user:{}", socket.display()), &[]);
    let snap = dir.join("snap");
    let answer = ctl(&api, &["snapshot", snap.to_str().unwrap()]);
    assert_eq!(answer["ok"], true, "{answer}");
    let machine = std::fs::read_to_string(snap.join("machine.json")).unwrap();
    assert!(machine.contains(&format!("\"vhost_user_disk\": {:?}", socket.display().to_string())), "{machine}");
    std::fs::remove_file(&socket).unwrap();
    let second = StorageDaemon::start(&disk, &socket);
    migrate_ready_and_serve(source, &api, &[]);
    // The snapshot restores onto the backend at that path too (its memory
    // copied into shared memory the backend can map).
    let console = restore_and_read(&snap);
    assert!(console.ends_with(&served()), "the restored guest saw {console:?}");
    drop((first, second));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A destination that cannot open the machine's disk refuses the guest as
/// soon as the configuration arrives, while the source is still sending
/// memory: the source names the destination's reason (not a broken link),
/// and its guest runs on and is served by its disk; the destination waits
/// for another source.
#[test]
fn a_destination_without_the_disk_refuses_and_the_source_says_why() {
    let dir = scratch("kernel-migrate-no-disk");
    let (mut source, api) = start_ready(&dir, &[]);
    // The source has the disk open; at the same path the destination finds none.
    std::fs::rename(dir.join("disk.img"), dir.join("moved.img")).unwrap();
    let mut dest = migrate_to_a_new_destination(&api, &[]);
    source.wait_stderr("the guest runs on here");
    let said = source.stderr();
    let line = said.lines().find(|l| l.contains("the guest runs on here")).unwrap();
    assert!(
        line.contains("the destination refused the guest") && line.contains("disk.img"),
        "the source does not say why: {line}"
    );
    // The destination took nothing and waits on for a source it can serve.
    dest.wait_for("the destination's refusal", |_, err| {
        err.lines().any(|l| l.contains("refused a connection") && l.contains("disk.img") && l.contains("still waiting"))
    });
    assert!(!dest.stderr().contains("the guest resumes here"), "{}", dest.stderr());
    dest.kill();
    source.type_(b"g");
    source.wait_console("read ");
    source.wait_console(&served());
    let _ = std::fs::remove_dir_all(&dir);
}
