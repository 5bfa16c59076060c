//! Console input typed while the guest was behind (more than its 16550's
//! 64-byte FIFO) is part of the machine's state: a snapshot and a migration
//! carry it, and the guest reads every byte, in order, where it runs next.
//! With the 16550 in the VMM (up to its backlog's 4 KiB) and in a device
//! process, where typed bytes beyond what its UART holds wait in the
//! console channel and are drained into the state when it is asked for.

mod common;
mod nkvm_process;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nkvm_process::{ctl, scratch, Vmm};

/// What is typed while the guest is paused: `len` bytes, more than the
/// FIFO holds.
fn typed(len: usize) -> String {
    (0..len).map(|i| char::from(b'a' + (i % 26) as u8)).collect()
}

/// A kernel that echoes every byte its 16550 receives (polling the line
/// status).
fn echo_kernel(dir: &Path) -> PathBuf {
    use iced_x86::code_asm::*;
    let mut a = CodeAssembler::new(64).unwrap();
    let mut poll = a.create_label();
    a.set_label(&mut poll).unwrap();
    a.mov(dx, 0x3fd).unwrap();
    a.in_(al, dx).unwrap();
    a.test(al, 1).unwrap();
    a.jz(poll).unwrap();
    a.mov(dx, 0x3f8).unwrap();
    a.in_(al, dx).unwrap();
    a.out(dx, al).unwrap();
    a.jmp(poll).unwrap();
    let path = dir.join("echo.bzImage");
    std::fs::write(&path, common::tiny_bzimage(&a.assemble(0x10_0200).unwrap())).unwrap();
    path
}

/// Starts the echo guest with `extra`, checks it echoes, pauses it and
/// types `input` ahead of it.
fn paused_with_input_ahead(dir: &Path, api: &Path, input: &str, extra: &[&str]) -> Vmm {
    let kernel = echo_kernel(dir);
    let mut args = vec!["--kernel", kernel.to_str().unwrap(), "--cpus", "1", "--memory", "32M"];
    args.extend_from_slice(&["--api-socket", api.to_str().unwrap()]);
    args.extend_from_slice(extra);
    let mut vmm = Vmm::run(&args);
    vmm.type_(b"!");
    vmm.wait_console("!");
    assert_eq!(ctl(api, &["pause"])["ok"], true);
    vmm.type_(input.as_bytes());
    // Let the input reach the UART (or its console channel).
    std::thread::sleep(Duration::from_millis(500));
    vmm
}

/// The guest at `vmm` echoes all of `input`, in order, and nothing else.
fn echoes_everything(vmm: &mut Vmm, input: &str) {
    let want = input;
    let done = vmm.wait_until(Instant::now() + Duration::from_secs(60), |out, _| out.len() >= want.len());
    let out = vmm.stdout();
    assert!(done && out == want, "echoed {} of {} bytes: {out:?}\n{}", out.len(), want.len(), vmm.stderr());
}

#[test]
fn input_typed_ahead_of_the_guest_survives_a_snapshot_and_restore() {
    let dir = scratch("console-snapshot");
    let (api, snap) = (dir.join("a.sock"), dir.join("snap"));
    // In the VMM, the UART holds the FIFO and 4 KiB behind it.
    let input = typed(4000);
    let mut source = paused_with_input_ahead(&dir, &api, &input, &[]);
    let answer = ctl(&api, &["snapshot", snap.to_str().unwrap()]);
    assert_eq!(answer["ok"], true, "{answer}");
    source.kill();
    assert_eq!(source.stdout(), "!", "the paused guest echoed nothing more");
    let mut restored = Vmm::run(&["--restore", snap.to_str().unwrap()]);
    echoes_everything(&mut restored, &input);
    restored.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn input_typed_into_a_16550_process_ahead_of_the_guest_survives_a_migration() {
    let dir = scratch("console-migration");
    let (api, dest_api, to) = (dir.join("a.sock"), dir.join("b.sock"), dir.join("m.sock"));
    let addr = format!("unix:{}", to.display());
    // More than the UART holds: ~4 KiB is still in the console channel
    // (which holds ~13 KiB in 64-byte writes here).
    let input = typed(8000);
    let mut source = paused_with_input_ahead(&dir, &api, &input, &["--device-process"]);
    let mut dest = Vmm::run(&["--incoming", &addr, "--api-socket", dest_api.to_str().unwrap(), "--device-process"]);
    dest.wait_for("the destination to listen", |_, err| err.contains("waiting for a migration"));
    assert_eq!(ctl(&api, &["migrate", &addr])["ok"], true);
    assert!(source.wait_exit(), "the source ends with success: {}", source.stderr());
    assert_eq!(source.stdout(), "!", "the paused guest echoed nothing more");
    dest.wait_for("the guest to resume", |_, err| err.contains("the guest resumes here"));
    echoes_everything(&mut dest, &input);
    dest.kill();
    let _ = std::fs::remove_dir_all(&dir);
}
