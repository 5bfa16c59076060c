//! The nkvm side: `nkvm run ... --api-socket`, `nkvm ctl migrate` to an
//! `nkvm run --incoming` over loopback TCP, `nkvm ctl snapshot` and
//! `nkvm run --restore`, as an operator runs them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::figures::{median, Migration, Row, SnapRestore};
use super::process::{switch, Proc};
use super::{free_port, steady_row, Image, SETTLE_TICKS};

fn nkvm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nkvm"))
}

/// `nkvm ctl --api-socket SOCKET ARGS...`: the JSON answer (asserts success).
fn ctl(socket: &Path, args: &[&str]) -> Value {
    let out = nkvm().arg("ctl").arg("--api-socket").arg(socket).args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "nkvm ctl {args:?}: {text}{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(text.lines().next().unwrap_or("")).unwrap()
}

/// A running nkvm and its API socket.
struct Vm {
    proc: Proc,
    api: PathBuf,
}

impl Vm {
    fn boot(image: &Image, api: PathBuf) -> Self {
        let mut cmd = nkvm();
        cmd.arg("run").args([image.nkvm_flag(), image.path.to_str().unwrap()]);
        cmd.args(["--cpus", "2", "--memory", "512M", "--api-socket", api.to_str().unwrap()]);
        let mut proc = Proc::spawn("nkvm", cmd);
        proc.wait_for("the API socket", |_| api.exists());
        Self { proc, api }
    }

    fn incoming(addr: &str, api: PathBuf) -> Self {
        let mut cmd = nkvm();
        cmd.args(["run", "--incoming", addr, "--api-socket", api.to_str().unwrap()]);
        let mut proc = Proc::spawn("nkvm --incoming", cmd);
        proc.wait_for("the destination", |p| p.stderr().contains("waiting for a migration"));
        Self { proc, api }
    }
}

/// `nkvm: migrated to ... in T ms (R rounds, P pages, M MB), downtime D ms`.
fn parse_migrated(stderr: &str) -> Option<Migration> {
    let line = stderr.lines().find(|l| l.contains("migrated to"))?;
    let num = |after: &str| -> Option<f64> {
        let rest = &line[line.find(after)? + after.len()..];
        rest.trim_start_matches(['(', ' ']).split([' ', ',']).next()?.parse().ok()
    };
    Some(Migration {
        total_ms: num(" in ")?,
        vmm_downtime_ms: num("downtime ")?,
        switch: None,
        rounds: num("ms (")?,
        mb: num("pages, ")?,
    })
}

/// Boots `image`, measures its dirtying rate, snapshots and restores it
/// `runs` times when `snapshots` is set, then migrates it `runs` times in
/// a chain (each destination is the next source).
pub fn measure(dir: &Path, image: &Image, runs: usize, snapshots: bool) -> (Row, Option<SnapRestore>) {
    let mut vm = Vm::boot(image, dir.join("nkvm-0.sock"));
    vm.proc.wait_ticks(SETTLE_TICKS);
    let mut row = steady_row(&vm.proc, image);
    let snap = snapshots.then(|| snapshot_restore(dir, &vm, runs));
    for i in 1..=runs {
        match migrate(dir, &mut vm, i) {
            Ok((m, dest)) => {
                row.runs.push(m);
                vm = dest;
            }
            Err(why) => {
                println!("  nkvm run {i} failed: {why}");
                row.skipped = Some(format!("migration {i} failed"));
                break;
            }
        }
    }
    (row, snap)
}

/// Migrates `vm` to a new `nkvm run --incoming` (migration `i`): its
/// figures and the destination, now running the guest.
fn migrate(dir: &Path, vm: &mut Vm, i: usize) -> Result<(Migration, Vm), String> {
    let addr = format!("tcp:127.0.0.1:{}", free_port());
    let mut dest = Vm::incoming(&addr, dir.join(format!("nkvm-{i}.sock")));
    let out = nkvm().arg("ctl").arg("--api-socket").arg(&vm.api).args(["migrate", &addr]).output();
    let out = out.map_err(|e| format!("nkvm ctl: {e}"))?;
    if !out.status.success() {
        return Err(format!("nkvm ctl migrate: {}", String::from_utf8_lossy(&out.stdout).trim()));
    }
    // The source ends once the destination has the guest, or says why not.
    let start = Instant::now();
    loop {
        if vm.proc.stderr().contains("failed, the guest runs on here") {
            return Err(vm.proc.stderr());
        }
        if let Some(code) = vm.proc.exit_code() {
            std::thread::sleep(Duration::from_millis(100));
            if code != Some(0) {
                return Err(format!("the source ended with {code:?}:\n{}", vm.proc.stderr()));
            }
            break;
        }
        if start.elapsed() > Duration::from_secs(120) {
            return Err(format!("the migration did not end in 120 s:\n{}", vm.proc.stderr()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let stderr = vm.proc.stderr();
    let mut m = parse_migrated(&stderr).ok_or_else(|| format!("no migration line:\n{stderr}"))?;
    println!("  nkvm run {i}: {}", stderr.lines().find(|l| l.contains("migrated to")).unwrap_or_default());
    dest.proc.wait_until("the guest to resume", |p| p.stderr().contains("resumes here"))?;
    dest.proc.wait_until("the guest's console", |p| p.console_len() >= SETTLE_TICKS)?;
    m.switch = switch(&vm.proc.console(), &dest.proc.console());
    Ok((m, dest))
}

/// `nkvm ctl snapshot` (the guest's pause) and `nkvm run --restore` (its
/// own report, and start to first console byte), `runs` times each.
fn snapshot_restore(dir: &Path, vm: &Vm, runs: usize) -> SnapRestore {
    let snap = dir.join("nkvm-snap");
    let paused: Vec<f64> = (0..runs)
        .map(|_| {
            let _ = std::fs::remove_dir_all(&snap);
            ctl(&vm.api, &["snapshot", snap.to_str().unwrap()])["paused_ms"].as_f64().unwrap()
        })
        .collect();
    let (mut own, mut first_byte) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let mut cmd = nkvm();
        cmd.args(["run", "--restore", snap.to_str().unwrap()]);
        let start = Instant::now();
        let mut r = Proc::spawn("nkvm --restore", cmd);
        r.wait_for("the restored guest's console", |p| p.console_len() > 0);
        first_byte.push(r.console()[0].0.duration_since(start).as_secs_f64() * 1e3);
        // The whole line: stderr is unbuffered, a line can arrive in pieces.
        r.wait_for("the restore line", |p| restored_ms(&p.stderr()).is_some());
        own.push(restored_ms(&r.stderr()).unwrap());
        r.kill();
    }
    let _ = std::fs::remove_dir_all(&snap);
    let paused = median(paused);
    SnapRestore {
        snapshot_ms: paused,
        snapshot_paused_ms: paused,
        restore_ms: median(own),
        restore_to_first_byte_ms: median(first_byte),
        skipped: None,
    }
}

/// N of the `nkvm: restored DIR in N ms` line, once the line is whole.
fn restored_ms(stderr: &str) -> Option<f64> {
    let line = stderr.lines().find(|l| l.starts_with("nkvm: restored") && l.ends_with(" ms"))?;
    line.rsplit(" in ").next()?.split(' ').next()?.parse().ok()
}

/// Whether a `--kernel` machine can be migrated: `nkvm run --kernel IMAGE
/// --api-socket` runs and `nkvm ctl snapshot` takes its state; the
/// refusal's words if not.
pub fn kernel_machines_migrate(dir: &Path, image: &Image) -> Result<(), String> {
    let api = dir.join("probe.sock");
    let mut cmd = nkvm();
    cmd.args(["run", "--kernel", image.path.to_str().unwrap(), "--cpus", "2", "--memory", "512M"]);
    cmd.args(["--api-socket", api.to_str().unwrap()]);
    let mut proc = Proc::spawn("nkvm --kernel probe", cmd);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if api.exists() {
            // Taking its state is what migration needs too.
            let snap = dir.join("probe-snap");
            let out = nkvm().arg("ctl").arg("--api-socket").arg(&api).arg("snapshot").arg(&snap).output();
            proc.kill();
            let _ = std::fs::remove_dir_all(&snap);
            let out = out.map_err(|e| format!("nkvm ctl: {e}"))?;
            return match out.status.success() {
                true => Ok(()),
                false => Err(format!(
                    "its snapshot is refused: {}{}",
                    String::from_utf8_lossy(&out.stdout).trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                )),
            };
        }
        if let Some(code) = proc.exit_code() {
            std::thread::sleep(Duration::from_millis(100));
            let stderr = proc.stderr();
            let why = stderr.lines().find(|l| l.contains("error") || l.starts_with("nkvm:")).unwrap_or_default();
            return Err(format!("exit {code:?}: {}", why.trim()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err("no API socket after 30 s".into())
}
