//! Snapshot, restore and live migration of a `--kernel` machine: a tiny
//! multiboot kernel assembled here counts on the 16550 (`tick N`, one
//! line a step, N in hex) and ends through the test-exit port after
//! [`LIMIT`] lines; it is snapshotted and restored, and migrated over
//! loopback TCP, mid-run, and the console read across both processes
//! must hold every line once, in order; the same with the devices in
//! device processes. Then the failure paths: a saved machine whose disk is
//! missing or another size is refused.

mod common;
mod nkvm_process;
mod pattern_guest;

use std::net::TcpListener;
use std::path::{Path, PathBuf};

use iced_x86::code_asm::*;
use nkvm_process::{ctl, nkvm, scratch, Vmm};

const LOAD: u32 = 0x40_0000;
const COM1: u16 = 0x3f8;
/// The counter, the prefix and the hex digits, from [`LOAD`].
const COUNTER: u32 = 0x800;
const PREFIX: u32 = 0x810;
const DIGITS: u32 = 0x820;
/// Lines the guest prints before it ends.
const LIMIT: u32 = 48;
/// Iterations of the delay loop between lines (under the host's
/// instruction emulator: tens of milliseconds).
const DELAY: u32 = 60_000;
/// The test-exit port: a write of 0 ends nkvm with status 1.
const TEST_EXIT: u16 = 0xf4;

/// The counting guest as a multiboot ELF in `dir`.
fn counting_guest(dir: &Path) -> PathBuf {
    let mut a = CodeAssembler::new(32).unwrap();
    let mut next = a.create_label();
    let mut digit = a.create_label();
    let mut prefix = a.create_label();
    let mut spin = a.create_label();
    a.mov(esp, LOAD).unwrap();
    a.mov(dx, COM1 as u32).unwrap();
    a.set_label(&mut next).unwrap();
    // "tick "
    a.mov(esi, LOAD + PREFIX).unwrap();
    a.set_label(&mut prefix).unwrap();
    a.lodsb().unwrap();
    a.out(dx, al).unwrap();
    a.cmp(byte_ptr(esi), 0).unwrap();
    a.jne(prefix).unwrap();
    // The counter, 8 hex digits, then a newline.
    a.mov(ebx, dword_ptr(LOAD + COUNTER)).unwrap();
    a.mov(ecx, 8).unwrap();
    a.set_label(&mut digit).unwrap();
    a.rol(ebx, 4).unwrap();
    a.mov(eax, ebx).unwrap();
    a.and(eax, 0xf).unwrap();
    a.mov(al, byte_ptr(eax + (LOAD + DIGITS))).unwrap();
    a.out(dx, al).unwrap();
    a.dec(ecx).unwrap();
    a.jne(digit).unwrap();
    a.mov(al, b'\n' as u32).unwrap();
    a.out(dx, al).unwrap();
    a.mov(ecx, DELAY).unwrap();
    a.set_label(&mut spin).unwrap();
    a.dec(ecx).unwrap();
    a.jne(spin).unwrap();
    a.inc(dword_ptr(LOAD + COUNTER)).unwrap();
    a.cmp(dword_ptr(LOAD + COUNTER), LIMIT as i32).unwrap();
    a.jb(next).unwrap();
    a.mov(al, 0).unwrap();
    a.out(TEST_EXIT as u32, al).unwrap();
    a.hlt().unwrap();
    let mut code = a.assemble(u64::from(LOAD)).unwrap();
    assert!(code.len() <= COUNTER as usize, "the code overlaps the data");
    code.resize(COUNTER as usize + 0x30, 0);
    code[PREFIX as usize..PREFIX as usize + 5].copy_from_slice(b"tick ");
    code[DIGITS as usize..DIGITS as usize + 16].copy_from_slice(b"0123456789abcdef");
    let path = dir.join("count.elf");
    std::fs::write(&path, common::elf32(&code, LOAD)).unwrap();
    path
}

/// The counts on a console, checking that every line is a whole `tick`
/// line and each is one more than the one before, from 0. A last line
/// without its newline (the guest was printing it) is left out.
fn ticks(console: &str) -> Vec<u32> {
    let whole = console.rfind('\n').map_or("", |end| &console[..=end]);
    let counts: Vec<u32> = whole
        .lines()
        .map(|l| {
            let n = l.strip_prefix("tick ").filter(|n| n.len() == 8);
            n.and_then(|n| u32::from_str_radix(n, 16).ok())
                .unwrap_or_else(|| panic!("not a tick line {l:?}:\n{console}"))
        })
        .collect();
    for (i, &n) in counts.iter().enumerate() {
        assert_eq!(n, i as u32, "a line is lost or repeated:\n{console}");
    }
    counts
}

/// Waits until the console shows at least `n` whole lines.
fn wait_ticks(vmm: &mut Vmm, n: usize) {
    vmm.wait_for(&format!("{n} ticks"), |out, _| out.matches('\n').count() >= n);
}

/// Starts the counting guest on the multiboot machine, 2 vCPUs (the AP
/// waits for a SIPI that never comes: its state travels too), with `extra`.
fn source(kernel: &Path, api: &Path, extra: &[&str]) -> Vmm {
    let mut args = vec!["--kernel", kernel.to_str().unwrap(), "--cpus", "2", "--memory", "32M"];
    args.extend_from_slice(&["--api-socket", api.to_str().unwrap()]);
    args.extend_from_slice(extra);
    Vmm::run(&args)
}

/// Waits for the guest's own end (test-exit 0: status 1; the callers
/// check that every line came before it).
fn wait_test_exit(vmm: &mut Vmm) {
    assert!(!vmm.wait_exit(), "the guest ends through the test-exit port (status 1): {}", vmm.stderr());
    let stderr = vmm.stderr();
    assert!(!stderr.contains("guest stopped"), "nkvm reported: {stderr}");
}

/// `nkvm ctl` whatever it answers: (exit success, the JSON answer).
fn ctl_answer(socket: &Path, args: &[&str]) -> (bool, serde_json::Value) {
    let out = nkvm().arg("ctl").arg("--api-socket").arg(socket).args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success(), serde_json::from_str(text.lines().next().unwrap_or("null")).unwrap())
}

#[test]
fn a_multiboot_guest_snapshotted_mid_run_restores_and_counts_on() {
    let dir = scratch("kernel-snapshot");
    let kernel = counting_guest(&dir);
    let (api, snap) = (dir.join("a.sock"), dir.join("snap"));
    let mut src = source(&kernel, &api, &[]);
    wait_ticks(&mut src, 4);
    assert_eq!(ctl(&api, &["pause"])["ok"], true);
    let answer = ctl(&api, &["snapshot", snap.to_str().unwrap()]);
    eprintln!("snapshot: {answer}");
    let info = ctl(&api, &["info"]);
    assert_eq!((info["kind"].as_str(), info["state"].as_str()), (Some("multiboot"), Some("paused")), "{info}");
    src.kill();
    let before = src.stdout();
    let machine = std::fs::read_to_string(snap.join("machine.json")).unwrap();
    assert!(machine.contains("\"kind\": \"multiboot\"") && machine.contains("\"split_irqchip\": true"), "{machine}");

    let mut restored = Vmm::run(&["--restore", snap.to_str().unwrap()]);
    wait_test_exit(&mut restored);
    eprintln!("{}", restored.stderr().lines().find(|l| l.contains("restored")).unwrap_or("no restore line"));
    let counts = ticks(&(before.clone() + &restored.stdout()));
    assert_eq!(counts.len(), LIMIT as usize, "every line, once: {before}");
    assert!(ticks(&before).len() >= 4);

    // The snapshot restores again, to the same end.
    let mut again = Vmm::run(&["--restore", snap.to_str().unwrap()]);
    wait_test_exit(&mut again);
    assert_eq!(ticks(&(before + &again.stdout())).len(), LIMIT as usize);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_multiboot_guest_migrates_over_tcp_mid_run_and_counts_on() {
    let dir = scratch("kernel-migration");
    let kernel = counting_guest(&dir);
    let api = dir.join("src.sock");
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("tcp:127.0.0.1:{port}");
    let mut src = source(&kernel, &api, &[]);
    let mut dest = Vmm::run(&["--incoming", &addr]);
    dest.wait_for("the destination to listen", |_, err| err.contains("waiting for a migration"));
    wait_ticks(&mut src, 4);
    assert_eq!(ctl(&api, &["migrate", &addr, "--wait"])["ok"], true);
    assert!(src.wait_exit(), "the source ends with success once the guest moved: {}", src.stderr());
    let summary = src.stderr().lines().find(|l| l.contains("migrated to")).map(str::to_string);
    eprintln!("{}", summary.expect("the source says where the guest went"));
    dest.wait_for("the guest to resume", |_, err| err.contains("the guest resumes here"));
    wait_test_exit(&mut dest);
    let counts = ticks(&(src.stdout() + &dest.stdout()));
    assert_eq!(counts.len(), LIMIT as usize, "every line, once");
    assert!(ticks(&src.stdout()).len() >= 4);
    let _ = std::fs::remove_dir_all(&dir);
}

/// With `--device-process` the 16550, the CMOS, the PM timer and the I/O
/// RAM run in their own processes: their states are asked of them over
/// their sockets, and the source runs on after a snapshot. A migration to
/// a destination with `--device-process` gives the states to new
/// processes; the snapshot restores with the devices in process and again
/// in new processes. Every console line once, each time.
#[test]
fn a_device_process_machine_snapshots_runs_on_migrates_and_restores_both_ways() {
    let dir = scratch("kernel-device-process");
    let kernel = counting_guest(&dir);
    let (api, snap) = (dir.join("a.sock"), dir.join("snap"));
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("tcp:127.0.0.1:{port}");
    let mut src = source(&kernel, &api, &["--device-process"]);
    wait_ticks(&mut src, 2);
    assert_eq!(ctl(&api, &["pause"])["ok"], true);
    // The console process's output reaches nkvm's through a pipe: wait
    // until it has stopped growing.
    let mut seen = src.stdout();
    for _ in 0..50 {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let now = src.stdout();
        if now == seen {
            break;
        }
        seen = now;
    }
    let (ok, answer) = ctl_answer(&api, &["snapshot", snap.to_str().unwrap()]);
    assert!(ok, "{answer}");
    let before = src.stdout();
    let machine = std::fs::read_to_string(snap.join("machine.json")).unwrap();
    for name in ["\"serial\"", "\"cmos\"", "\"pm-timer\"", "\"pc-testdev-ioram\""] {
        assert!(machine.contains(name), "{name} is saved: {machine}");
    }
    // The source runs on, its device processes serving as before.
    assert_eq!(ctl(&api, &["resume"])["ok"], true);
    let saved_lines = ticks(&before).len();
    wait_ticks(&mut src, saved_lines + 2);

    let mut dest = Vmm::run(&["--incoming", &addr, "--device-process"]);
    dest.wait_for("the destination to listen", |_, err| err.contains("waiting for a migration"));
    assert_eq!(ctl(&api, &["migrate", &addr, "--wait"])["ok"], true);
    assert!(src.wait_exit(), "the source ends with success once the guest moved: {}", src.stderr());
    wait_test_exit(&mut dest);
    assert_eq!(ticks(&(src.stdout() + &dest.stdout())).len(), LIMIT as usize, "every line once, across the move");

    for extra in [&[][..], &["--device-process"][..]] {
        let mut args = vec!["--restore", snap.to_str().unwrap()];
        args.extend_from_slice(extra);
        let mut restored = Vmm::run(&args);
        wait_test_exit(&mut restored);
        let whole = before.clone() + &restored.stdout();
        assert_eq!(ticks(&whole).len(), LIMIT as usize, "every line once, across the restore {extra:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A saved Linux machine names its disk; restoring it where the disk is
/// missing, or of another size, is refused before anything runs. The
/// snapshot is the built-in machine's, its configuration rewritten as a
/// Linux machine's: the disk is checked before the state is read.
#[test]
fn a_restore_whose_disk_is_missing_or_resized_is_refused() {
    let dir = scratch("kernel-disk");
    let img = pattern_guest::image(&dir);
    let (api, snap) = (dir.join("a.sock"), dir.join("snap"));
    let mut src =
        Vmm::run(&["--image", img.to_str().unwrap(), "--memory", "16M", "--api-socket", api.to_str().unwrap()]);
    src.wait_passes(0, 1);
    ctl(&api, &["snapshot", snap.to_str().unwrap()]);
    src.kill();
    let disk = dir.join("disk.img");
    let machine = std::fs::read_to_string(snap.join("machine.json")).unwrap();
    let as_linux = machine
        .replace("\"kind\": \"builtin\"", "\"kind\": \"linux\"")
        .replace("\"split_irqchip\": false", "\"split_irqchip\": true")
        .replace(
            "\"cpus\":",
            &format!("\"disk\": {{\"path\": {:?}, \"size\": 1048576, \"read_only\": false}}, \"cpus\":", disk),
        );
    assert_ne!(as_linux, machine);
    std::fs::write(snap.join("machine.json"), as_linux).unwrap();
    let restore = || {
        let out = nkvm().args(["run", "--restore", snap.to_str().unwrap()]).output().unwrap();
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        stderr
    };
    let stderr = restore();
    assert!(stderr.contains("disk.img: opening the saved machine's disk failed"), "{stderr}");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let stderr = restore();
    assert!(stderr.contains("disk.img is 4096 bytes but the saved machine's disk was 1048576 bytes"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
