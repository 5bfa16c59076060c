//! The QEMU side: `qemu-system-x86_64 -accel kvm` on the same multiboot
//! image, driven through QMP (`migrate` to a `-incoming tcp:` QEMU over
//! loopback; `migrate exec:cat>FILE` and `-incoming exec:cat FILE` for
//! snapshot and restore).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::figures::{median, Migration, Row, SnapRestore};
use super::process::{switch, Proc};
use super::qmp::Qmp;
use super::{free_port, steady_row, Image, SETTLE_TICKS};

/// The binary.
pub const QEMU: &str = "qemu-system-x86_64";
/// How long a migration may take before it is cancelled as not converging.
const GIVE_UP: Duration = Duration::from_secs(60);
/// The pre-copy parameters set on every source: bandwidth not limited (QEMU
/// 7.2's default is 128 MiB/s; nkvm has no limit) and the downtime target
/// of nkvm's default, 50 ms (QEMU's default is 300 ms).
pub const PARAMETERS: &str = "max-bandwidth 100 GB/s, downtime-limit 50 ms";

/// Whether QEMU can run here (installed, and `/dev/kvm` usable).
pub fn available() -> Result<String, String> {
    let out = Command::new(QEMU).arg("--version").output().map_err(|e| format!("{QEMU}: {e}"))?;
    let version = String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().to_string();
    std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").map_err(|e| format!("/dev/kvm: {e}"))?;
    Ok(version)
}

/// A running QEMU and its QMP connection.
struct Vm {
    proc: Proc,
    qmp: Qmp,
}

impl Vm {
    /// `qemu-system-x86_64 ... -kernel IMAGE [-incoming INCOMING]`.
    fn start(image: &Image, qmp: PathBuf, incoming: Option<&str>) -> Self {
        let _ = std::fs::remove_file(&qmp);
        let mut cmd = Command::new(QEMU);
        cmd.args(["-accel", "kvm", "-machine", "pc", "-m", "512", "-smp", "2", "-display", "none"]);
        cmd.args(["-serial", "stdio", "-kernel", image.path.to_str().unwrap()]);
        cmd.arg("-qmp").arg(format!("unix:{},server=on,wait=off", qmp.display()));
        if let Some(from) = incoming {
            cmd.args(["-incoming", from]);
        }
        let proc = Proc::spawn("qemu", cmd);
        let mut qmp = Qmp::connect(&qmp);
        qmp.execute("migrate-set-parameters", json!({ "max-bandwidth": 100_000_000_000u64, "downtime-limit": 50 }));
        Self { proc, qmp }
    }

    /// Starts a migration to `uri` and polls `query-migrate` until it
    /// ends; the last answer (`status` `completed`, `failed` or
    /// `cancelled`).
    fn migrate(&mut self, uri: &str) -> Value {
        self.qmp.execute("migrate", json!({ "uri": uri }));
        let start = Instant::now();
        loop {
            let info = self.qmp.execute("query-migrate", json!({}));
            match info["status"].as_str() {
                // QEMU 7.2 can show `completed` before it has stored the
                // totals (a run answered total-time 0, downtime 0): ask
                // again until they are there.
                Some("completed") if info["total-time"].as_u64() == Some(0) && start.elapsed() < GIVE_UP => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Some("completed" | "failed" | "cancelled") => return info,
                _ if start.elapsed() > GIVE_UP => {
                    self.qmp.execute("migrate_cancel", json!({}));
                    return json!({ "status": "cancelled (did not converge)", "ram": info["ram"] });
                }
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

/// QEMU's own figures for one migration.
fn migration(info: &Value) -> Migration {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    Migration {
        total_ms: f(&info["total-time"]),
        vmm_downtime_ms: f(&info["downtime"]),
        switch: None,
        rounds: f(&info["ram"]["dirty-sync-count"]),
        mb: f(&info["ram"]["transferred"]) / 1e6,
    }
}

fn summary(info: &Value) -> String {
    let ram = &info["ram"];
    format!(
        "{} in {} ms (setup {} ms, {} rounds, {} normal + {} zero pages, {:.1} MB), downtime {} ms",
        info["status"].as_str().unwrap_or("?"),
        info["total-time"],
        info["setup-time"],
        ram["dirty-sync-count"],
        ram["normal"],
        ram["duplicate"],
        ram["transferred"].as_f64().unwrap_or(f64::NAN) / 1e6,
        info["downtime"],
    )
}

/// Boots `image` and measures its dirtying rate only (MB/s; printed).
pub fn steady_rate(dir: &Path, image: &Image) -> f64 {
    let mut vm = Vm::start(image, dir.join("qemu-probe.qmp"), None);
    vm.proc.wait_ticks(SETTLE_TICKS);
    let rate = steady_row(&vm.proc, image).dirtied_mb_s;
    vm.proc.kill();
    rate
}

/// Boots `image`, measures its dirtying rate, snapshots and restores it
/// `runs` times when `snapshots` is set, then migrates it `runs` times in
/// a chain (each destination is the next source).
pub fn measure(dir: &Path, image: &Image, runs: usize, snapshots: bool) -> (Row, Option<SnapRestore>) {
    let mut vm = Vm::start(image, dir.join("qemu-0.qmp"), None);
    vm.proc.wait_ticks(SETTLE_TICKS);
    let mut row = steady_row(&vm.proc, image);
    let snap = snapshots.then(|| snapshot_restore(dir, image, &mut vm, runs));
    for i in 1..=runs {
        let addr = format!("tcp:127.0.0.1:{}", free_port());
        let mut dest = Vm::start(image, dir.join(format!("qemu-{i}.qmp")), Some(&addr));
        let info = vm.migrate(&addr);
        println!("  QEMU run {i}: {}", summary(&info));
        if info["status"] != "completed" {
            row.skipped = Some(format!("migration {i}: {}", info["status"]));
            break;
        }
        dest.proc.wait_ticks(SETTLE_TICKS);
        let mut m = migration(&info);
        m.switch = switch(&vm.proc.console(), &dest.proc.console());
        row.runs.push(m);
        vm.proc.kill();
        vm = dest;
    }
    (row, snap)
}

/// `migrate exec:cat>FILE` (QEMU's total and downtime; the guest is
/// resumed with `cont`), and a new QEMU with `-incoming exec:cat FILE`
/// (start to first console byte), `runs` times each.
fn snapshot_restore(dir: &Path, image: &Image, vm: &mut Vm, runs: usize) -> SnapRestore {
    let file = dir.join("qemu-snap");
    let (mut total, mut paused) = (Vec::new(), Vec::new());
    for i in 1..=runs {
        let info = vm.migrate(&format!("exec:cat > {}", file.display()));
        println!("  QEMU snapshot {i}: {}", summary(&info));
        total.push(migration(&info).total_ms);
        paused.push(migration(&info).vmm_downtime_ms);
        vm.qmp.execute("cont", json!({}));
    }
    let mut first_byte = Vec::new();
    for i in 1..=runs {
        let start = Instant::now();
        let mut r =
            Vm::start(image, dir.join(format!("qemu-restore-{i}.qmp")), Some(&format!("exec:cat {}", file.display())));
        r.proc.wait_for("the restored guest's console", |p| p.console_len() > 0);
        first_byte.push(r.proc.console()[0].0.duration_since(start).as_secs_f64() * 1e3);
        r.proc.kill();
    }
    let _ = std::fs::remove_file(&file);
    SnapRestore {
        snapshot_ms: median(total),
        snapshot_paused_ms: median(paused),
        restore_ms: f64::NAN,
        restore_to_first_byte_ms: median(first_byte),
        skipped: None,
    }
}
