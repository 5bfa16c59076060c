//! Snapshot, restore and live-migration figures, one run, `nkvm` processes
//! driven as an operator would (`--api-socket`, `nkvm ctl`, `--restore`,
//! `--incoming` over loopback TCP):
//!
//! - an idle 512 MiB guest on 2 vCPUs (both spin on `pause`): snapshot
//!   time, restore time, migration total time, downtime, rounds, bytes;
//! - the pattern guest of tests/pattern_guest (16 MiB, 2 vCPUs sweeping
//!   all their RAM, as fast as this host runs it): the same, with its
//!   dirtying rate measured from its own progress.
//!
//! Targets (issue 13): restore <= 5 ms; idle migration at or below QEMU
//! 7.2's 78-87 ms total, 4-6 ms downtime; downtime <= 50 ms while dirtying.
//! Downtime here is the source's pause: from asking the vCPUs to park to
//! the destination's answer that it runs the guest.
//!
//! Run: `cargo bench -p nkvm-vmm --bench migration`.

#[path = "../tests/pattern_guest/mod.rs"]
mod pattern_guest;

use std::path::Path;
use std::time::{Duration, Instant};

use pattern_guest::{ctl, passes, scratch, Vmm, HALF};

const RUNS: usize = 5;

fn main() {
    let dir = scratch("bench-migration");
    let spin = dir.join("spin.bin");
    std::fs::write(&spin, [0xf3, 0x90, 0xeb, 0xfc]).unwrap(); // pause; jmp $-2
    let pattern = pattern_guest::image(&dir);
    println!("{:<34} {:>10} {:>10} {:>10} {:>7} {:>9}", "guest", "snapshot", "restore", "migrate", "rounds", "MB sent");
    println!("{:<34} {:>10} {:>10} {:>10} {:>7} {:>9}", "", "ms", "ms", "ms (down)", "", "");
    figures(&dir, "idle, 512 MiB, 2 vCPUs", &spin, "512M", None);
    figures(&dir, "pattern, 16 MiB, 2 vCPUs", &pattern, "16M", Some(()));
    let _ = std::fs::remove_dir_all(&dir);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn figures(dir: &Path, name: &str, image: &Path, memory: &str, pattern: Option<()>) {
    let api = dir.join("bench.sock");
    let mut vmm = Vmm::run(
        &["--image", image.to_str().unwrap(), "--cpus", "2", "--memory", memory]
            .into_iter()
            .chain(["--api-socket", api.to_str().unwrap()])
            .collect::<Vec<_>>(),
    );
    vmm.wait_for("the API socket", |_, _| api.exists());
    let mut rate = String::new();
    if pattern.is_some() {
        vmm.wait_passes(0, 2);
        let (n0, t0) = (passes(&vmm.stdout()).len(), Instant::now());
        vmm.wait_passes(n0, 5);
        let secs = t0.elapsed().as_secs_f64();
        let bytes = (passes(&vmm.stdout()).len() - n0) as f64 * (2 * HALF * 4096) as f64;
        rate = format!(" ({:.0} MB/s dirtied)", bytes / secs / 1e6);
    } else {
        std::thread::sleep(Duration::from_millis(300));
    }
    let snap = dir.join("snap");
    let snapshot: Vec<f64> = (0..RUNS)
        .map(|_| {
            let _ = std::fs::remove_dir_all(&snap);
            ctl(&api, &["snapshot", snap.to_str().unwrap()])["paused_ms"].as_f64().unwrap()
        })
        .collect();
    let restore: Vec<f64> = (0..RUNS)
        .map(|_| {
            let mut r = Vmm::run(&["--restore", snap.to_str().unwrap()]);
            r.wait_for("the restore line", |_, err| err.contains("restored"));
            let line = r.stderr();
            r.kill();
            let ms = line.split(" in ").nth(1).and_then(|s| s.split(' ').next()).unwrap();
            ms.parse().unwrap()
        })
        .collect();
    let (mut total, mut down, mut rounds, mut mb) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut api = api;
    for i in 0..RUNS {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let next_api = dir.join(format!("bench-{i}.sock"));
        let addr = format!("tcp:127.0.0.1:{port}");
        let mut dest = Vmm::run(&["--incoming", &addr, "--api-socket", next_api.to_str().unwrap()]);
        dest.wait_for("the destination", |_, err| err.contains("waiting for a migration"));
        ctl(&api, &["migrate", &addr]);
        assert!(vmm.wait_exit(), "{}", vmm.stderr());
        let line = vmm.stderr().lines().find(|l| l.contains("migrated to")).unwrap().to_string();
        let num = |after: &str| -> f64 {
            let rest = &line[line.find(after).unwrap() + after.len()..];
            rest.trim_start_matches(['(', ' ']).split([' ', ',']).next().unwrap().parse().unwrap()
        };
        total.push(num(" in "));
        down.push(num("downtime "));
        rounds.push(num("ms ("));
        mb.push(num("pages, "));
        dest.wait_for("the guest to resume", |_, err| err.contains("resumes here"));
        vmm = dest;
        api = next_api;
    }
    println!(
        "{:<34} {:>10.1} {:>10.1} {:>5.1} ({:.1}) {:>7.0} {:>9.1}",
        format!("{name}{rate}"),
        median(snapshot),
        median(restore),
        median(total),
        median(down),
        median(rounds),
        median(mb)
    );
    vmm.kill();
}
