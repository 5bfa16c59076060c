//! Snapshot and restore of a running guest through `nkvm run --api-socket`,
//! `nkvm ctl snapshot` and `nkvm run --restore`, with the pattern guest
//! (tests/pattern_guest) checking its own memory on 2 vCPUs.

mod nkvm_process;
mod pattern_guest;

use nkvm_process::{ctl, scratch, Vmm};
use pattern_guest::{check_console, check_memory, image, passes, MEMORY};

#[test]
fn a_snapshot_restores_in_a_new_process_with_memory_and_console_intact() {
    let dir = scratch("snapshot");
    let img = image(&dir);
    let (api, api2, snap, snap2) = (dir.join("a.sock"), dir.join("b.sock"), dir.join("snap"), dir.join("snap2"));
    let mut source = pattern_source(&img, &api, &[]);
    source.wait_passes(0, 3);
    assert_eq!(ctl(&api, &["pause"])["ok"], true);
    assert_eq!(ctl(&api, &["info"])["state"], "paused");
    let answer = ctl(&api, &["snapshot", snap.to_str().unwrap()]);
    eprintln!("snapshot: {answer}");
    assert_eq!(ctl(&api, &["info"])["state"], "paused", "a snapshot of a paused machine leaves it paused");
    source.kill();
    let before = source.stdout();

    let ram = std::fs::read(snap.join("memory")).unwrap();
    let gens = check_memory(&ram);
    assert!(gens[0] >= 3, "{gens:?}");

    let mut restored = Vmm::run(&["--restore", snap.to_str().unwrap(), "--api-socket", api2.to_str().unwrap()]);
    restored.wait_passes(0, 3);
    eprintln!("{}", restored.stderr().lines().find(|l| l.contains("restored")).unwrap_or("no restore line"));
    let console = before.clone() + &restored.stdout();
    let p = check_console(&console);
    assert!(p.len() >= passes(&before).len() + 3);
    // The restored guest runs on: a second snapshot of it shows later passes.
    ctl(&api2, &["snapshot", snap2.to_str().unwrap()]);
    assert_eq!(ctl(&api2, &["info"])["state"], "running", "a snapshot of a running machine resumes it");
    let later = check_memory(&std::fs::read(snap2.join("memory")).unwrap());
    assert!(later[0] > gens[0] && later[1] > gens[1], "{gens:?} then {later:?}");
    restored.kill();

    // The snapshot was not changed by the restored guest (mapped
    // copy-on-write): it restores again.
    assert_eq!(std::fs::read(snap.join("memory")).unwrap(), ram);

    refuses_damaged_snapshots(&dir, &snap);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A guest restored from a snapshot snapshots into that same directory (a
/// periodic checkpoint), though its memory is a mapping of the memory file
/// being replaced: it runs on, and the new snapshot restores. A snapshot
/// that fails half-way leaves no snapshot there, not a mix of two.
#[test]
fn a_restored_guest_snapshots_over_its_own_snapshot_and_a_failed_one_leaves_none() {
    let dir = scratch("snapshot-over");
    let img = image(&dir);
    let (api, api2, api3, snap) = (dir.join("a.sock"), dir.join("b.sock"), dir.join("c.sock"), dir.join("snap"));
    let mut source = pattern_source(&img, &api, &[]);
    source.wait_passes(0, 2);
    assert_eq!(ctl(&api, &["snapshot", snap.to_str().unwrap()])["ok"], true);
    source.kill();
    let first = check_memory(&std::fs::read(snap.join("memory")).unwrap());

    let mut restored = Vmm::run(&["--restore", snap.to_str().unwrap(), "--api-socket", api2.to_str().unwrap()]);
    restored.wait_passes(0, 2);
    let answer = ctl(&api2, &["snapshot", snap.to_str().unwrap()]);
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(ctl(&api2, &["info"])["state"], "running", "the guest lives on: {}", restored.stderr());
    let seen = passes(&restored.stdout()).len();
    restored.wait_passes(seen, 2);
    restored.kill();
    let second = check_memory(&std::fs::read(snap.join("memory")).unwrap());
    assert!(second[0] > first[0], "the new snapshot is the later guest: {first:?} then {second:?}");

    let mut again = Vmm::run(&["--restore", snap.to_str().unwrap(), "--api-socket", api3.to_str().unwrap()]);
    again.wait_passes(0, 2);
    // One of its files cannot be replaced (a directory in its place).
    std::fs::remove_file(snap.join("vm.state")).unwrap();
    std::fs::create_dir(snap.join("vm.state")).unwrap();
    let out =
        nkvm_process::nkvm().args(["ctl", "--api-socket", api3.to_str().unwrap(), "snapshot"]).arg(&snap).output();
    let answer = String::from_utf8_lossy(&out.unwrap().stdout).into_owned();
    assert!(answer.contains("vm.state: rename into place failed"), "{answer}");
    assert_eq!(ctl(&api3, &["info"])["state"], "running");
    again.kill();
    let out = nkvm_process::nkvm().args(["run", "--restore"]).arg(&snap).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("machine.json"), "a half-written snapshot is refused as none: {stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The built-in machine with its 16550 and test device in device
/// processes: their states are asked of the processes, and the snapshot
/// restores with the devices in process and in new processes, the guest's
/// console and memory intact (the test device's counters travel with it).
#[test]
fn a_machine_with_device_processes_snapshots_and_restores_both_ways() {
    let dir = scratch("snapshot-device-process");
    let img = image(&dir);
    let (api, snap) = (dir.join("a.sock"), dir.join("snap"));
    let mut source = pattern_source(&img, &api, &["--device-process"]);
    source.wait_passes(0, 2);
    assert_eq!(ctl(&api, &["pause"])["ok"], true);
    let answer = ctl(&api, &["snapshot", snap.to_str().unwrap()]);
    assert_eq!(answer["ok"], true, "{answer}");
    // The serial process writes to the same stdout; give its last line time.
    std::thread::sleep(std::time::Duration::from_millis(300));
    source.kill();
    let before = source.stdout();
    let serial = std::fs::read(snap.join("device-serial.state")).unwrap();
    assert!(serial.starts_with(b"NKVD"), "the 16550's state came from its process");
    assert!(snap.join("device-test-device.state").exists());

    // In process, and into new device processes.
    for extra in [&[][..], &["--device-process"][..]] {
        let mut args = vec!["--restore", snap.to_str().unwrap()];
        args.extend_from_slice(extra);
        let mut restored = Vmm::run(&args);
        restored.wait_passes(0, 2);
        std::thread::sleep(std::time::Duration::from_millis(300));
        let p = check_console(&(before.clone() + &restored.stdout()));
        assert!(p.len() >= passes(&before).len() + 2, "{extra:?}");
        restored.kill();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The pattern guest `img` on 2 vCPUs, 16 MiB, its API on `api`, with `extra`.
fn pattern_source(img: &std::path::Path, api: &std::path::Path, extra: &[&str]) -> Vmm {
    let mut args = vec!["--cpus", "2", "--memory", "16M", "--image", img.to_str().unwrap()];
    args.extend_from_slice(&["--api-socket", api.to_str().unwrap()]);
    args.extend_from_slice(extra);
    Vmm::run(&args)
}

/// Every kind of damage gets one clear line and exit status 2.
fn refuses_damaged_snapshots(dir: &std::path::Path, snap: &std::path::Path) {
    let damaged = |name: &str, damage: &dyn Fn(&std::path::Path), expect: &str| {
        let copy = dir.join(name);
        let _ = std::fs::remove_dir_all(&copy);
        std::fs::create_dir_all(&copy).unwrap();
        for entry in std::fs::read_dir(snap).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
        }
        damage(&copy);
        let out = nkvm_process::nkvm().args(["run", "--restore", copy.to_str().unwrap()]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(stderr.contains(expect), "{name}: expected {expect:?} in {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{name}: one line: {stderr}");
    };
    damaged(
        "truncated-memory",
        &|d| std::fs::OpenOptions::new().write(true).open(d.join("memory")).unwrap().set_len(MEMORY / 2).unwrap(),
        "memory is 8388608 bytes but the machine has 16777216 bytes of RAM",
    );
    damaged(
        "flipped-vcpu",
        &|d| {
            let mut b = std::fs::read(d.join("vcpu-1.state")).unwrap();
            b[100] ^= 1;
            std::fs::write(d.join("vcpu-1.state"), b).unwrap();
        },
        "vcpu-1.state: bad state: checksum mismatch",
    );
    damaged(
        "truncated-vm",
        &|d| {
            let b = std::fs::read(d.join("vm.state")).unwrap();
            std::fs::write(d.join("vm.state"), &b[..b.len() - 7]).unwrap();
        },
        "vm.state: bad state",
    );
    damaged(
        "newer-format",
        &|d| {
            let text = std::fs::read_to_string(d.join("machine.json")).unwrap();
            std::fs::write(d.join("machine.json"), text.replace("\"format\": 2", "\"format\": 7")).unwrap();
        },
        "snapshot format 7; this nkvm reads formats 1 to 2",
    );
    damaged(
        "bad-serial",
        &|d| {
            let mut b = std::fs::read(d.join("device-serial.state")).unwrap();
            b[6] = 9; // the model's format version
            std::fs::write(d.join("device-serial.state"), b).unwrap();
        },
        "device serial: bad state: serial-16550 state format version 9",
    );
    damaged("no-vm-state", &|d| std::fs::remove_file(d.join("vm.state")).unwrap(), "vm.state: read failed");
    // Not files a snapshot writes: refused before they are read.
    damaged(
        "fifo-vm-state",
        &|d| {
            std::fs::remove_file(d.join("vm.state")).unwrap();
            assert!(std::process::Command::new("mkfifo").arg(d.join("vm.state")).status().unwrap().success());
        },
        "vm.state: not a regular file",
    );
    damaged(
        "fifo-memory",
        &|d| {
            std::fs::remove_file(d.join("memory")).unwrap();
            assert!(std::process::Command::new("mkfifo").arg(d.join("memory")).status().unwrap().success());
        },
        "memory: not a regular file",
    );
    damaged(
        "dev-zero-vcpu",
        &|d| {
            std::fs::remove_file(d.join("vcpu-0.state")).unwrap();
            std::os::unix::fs::symlink("/dev/zero", d.join("vcpu-0.state")).unwrap();
        },
        "vcpu-0.state: not a regular file",
    );
    damaged(
        "huge-device-state",
        &|d| {
            std::fs::File::options().write(true).open(d.join("device-serial.state")).unwrap().set_len(1 << 30).unwrap()
        },
        "device-serial.state: 1073741824 bytes, more than a state file holds",
    );
}

#[test]
fn the_api_answers_bad_requests_with_errors_and_ctl_fails_cleanly() {
    use std::io::{BufRead, BufReader, Write};
    let dir = scratch("api");
    let img = image(&dir);
    let api = dir.join("api.sock");
    let mut vmm =
        Vmm::run(&["--image", img.to_str().unwrap(), "--memory", "16M", "--api-socket", api.to_str().unwrap()]);
    vmm.wait_passes(0, 1);
    let conn = std::os::unix::net::UnixStream::connect(&api).unwrap();
    let mut lines = BufReader::new(conn.try_clone().unwrap()).lines();
    let mut ask = |request: &str| -> serde_json::Value {
        writeln!(&conn, "{request}").unwrap();
        serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap()
    };
    for (request, expect) in [
        ("hello", "not a JSON object"),
        (r#"{"command":"reboot"}"#, "unknown command \"reboot\""),
        (r#"{"command":"snapshot"}"#, "snapshot needs \"dir\""),
        (r#"{"command":"snapshot","dir":"/proc/nkvm-snap"}"#, "/proc/nkvm-snap: creating the directory failed"),
        (r#"{"command":"migrate","to":"ftp:x"}"#, "bad migration address \"ftp:x\""),
        (r#"{"command":"migrate","to":"tcp:127.0.0.1:1"}"#, ""),
    ] {
        let answer = ask(request);
        if expect.is_empty() {
            continue;
        }
        assert_eq!(answer["ok"], false, "{request}: {answer}");
        assert!(answer["error"].as_str().unwrap().contains(expect), "{request}: {answer}");
    }
    // An endless line is cut off with an answer, and the API serves on.
    let mut long = std::os::unix::net::UnixStream::connect(&api).unwrap();
    // (The server may close before it all went: a broken pipe here is fine.)
    let _ = long.write_all(&vec![b'x'; 100 << 10]);
    let mut answer = String::new();
    BufReader::new(&long).read_line(&mut answer).unwrap();
    assert!(answer.contains("request longer than 65536 bytes"), "{answer}");
    // The refused connection shows in `info`, and the guest runs on.
    let start = std::time::Instant::now();
    let info = loop {
        let info = ask(r#"{"command":"info"}"#);
        if info["migration"]["phase"] == "failed" || start.elapsed().as_secs() > 60 {
            break info;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    assert!(info["migration"]["error"].as_str().unwrap().contains("cannot connect to tcp:127.0.0.1:1"), "{info}");
    assert_eq!(info["state"], "running");
    vmm.kill();

    let out = nkvm_process::nkvm().args(["ctl", "--api-socket", "/nonexistent/nkvm.sock", "info"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("nkvm: cannot reach an nkvm at /nonexistent/nkvm.sock"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
