//! Snapshot, restore and live-migration figures, one run, `nkvm` processes
//! driven as an operator would (`--api-socket`, `nkvm ctl`, `--restore`,
//! `--incoming` over loopback TCP):
//!
//! - an idle 512 MiB guest on 2 vCPUs (both spin on `pause`): snapshot
//!   time, restore time, migration total time, downtime, rounds, bytes;
//! - a 512 MiB guest whose 2 vCPUs dirty their RAM (one store per page,
//!   a delay loop between stores setting the rate), at three rates,
//!   measured from the guest's own progress dots on the console;
//! - the pattern guest of tests/pattern_guest (16 MiB, 2 vCPUs sweeping
//!   all their RAM and checking it, as fast as this host runs it).
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

use iced_x86::code_asm::*;
use pattern_guest::{ctl, passes, scratch, Vmm, HALF};

const RUNS: usize = 5;

fn main() {
    let dir = scratch("bench-migration");
    let spin = dir.join("spin.bin");
    std::fs::write(&spin, [0xf3, 0x90, 0xeb, 0xfc]).unwrap(); // pause; jmp $-2
    let pattern = pattern_guest::image(&dir);
    println!("{:<46} {:>9} {:>8} {:>16} {:>6} {:>8}", "guest", "snapshot", "restore", "migrate", "rounds", "MB sent");
    println!("{:<46} {:>9} {:>8} {:>16} {:>6} {:>8}", "", "ms", "ms", "ms (downtime)", "", "");
    figures(&dir, "idle, 512 MiB, 2 vCPUs", &spin, "512M", Probe::None);
    for delay in [150, 40, 0] {
        let path = dir.join(format!("dirty-{delay}.bin"));
        std::fs::write(&path, dirtier(delay)).unwrap();
        figures(&dir, "dirtying, 512 MiB, 2 vCPUs", &path, "512M", Probe::Dots);
    }
    figures(&dir, "pattern, 16 MiB, 2 vCPUs", &pattern, "16M", Probe::Passes);
    let _ = std::fs::remove_dir_all(&dir);
}

/// How the guest shows its dirtying rate.
#[derive(Clone, Copy, PartialEq)]
enum Probe {
    /// It does not dirty.
    None,
    /// `pass` lines (the pattern guest).
    Passes,
    /// A `.` per [`DOT_PAGES`] pages stored by vCPU 0 (the dirtier).
    Dots,
}

/// Pages vCPU 0 of the dirtier stores between two dots.
const DOT_PAGES: u64 = 1024;
/// The dirtier's RAM, and where its sweep starts.
const DIRTY_MEMORY: u64 = 512 << 20;
const DIRTY_START: u64 = 2 << 20;

/// A guest whose vCPUs each sweep their half of the RAM above 2 MiB, one
/// store per page and `delay` loop turns between stores; vCPU 0 prints a
/// dot every [`DOT_PAGES`] pages.
fn dirtier(delay: u32) -> Vec<u8> {
    let half_pages = (DIRTY_MEMORY - DIRTY_START) / 4096 / 2;
    let mut a = CodeAssembler::new(64).unwrap();
    let (mut outer, mut inner, mut wait, mut no_dot) =
        (a.create_label(), a.create_label(), a.create_label(), a.create_label());
    a.mov(r12, rdi).unwrap();
    a.imul_3(r12, r12, (half_pages * 4096) as i32).unwrap();
    a.mov(rax, DIRTY_START).unwrap();
    a.add(r12, rax).unwrap();
    a.xor(eax, eax).unwrap();
    a.set_label(&mut outer).unwrap();
    a.inc(rax).unwrap();
    a.mov(rsi, r12).unwrap();
    a.mov(rcx, half_pages).unwrap();
    a.set_label(&mut inner).unwrap();
    a.mov(qword_ptr(rsi), rax).unwrap();
    a.add(rsi, 4096).unwrap();
    a.mov(edx, delay + 1).unwrap();
    a.set_label(&mut wait).unwrap();
    a.dec(edx).unwrap();
    a.jnz(wait).unwrap();
    a.test(rdi, rdi).unwrap();
    a.jnz(no_dot).unwrap();
    a.test(ecx, (DOT_PAGES - 1) as u32).unwrap();
    a.jnz(no_dot).unwrap();
    a.mov(r8, rax).unwrap();
    a.mov(dx, 0x3f8u32).unwrap();
    a.mov(al, b'.' as u32).unwrap();
    a.out(dx, al).unwrap();
    a.mov(rax, r8).unwrap();
    a.set_label(&mut no_dot).unwrap();
    a.dec(rcx).unwrap();
    a.jnz(inner).unwrap();
    a.jmp(outer).unwrap();
    a.assemble(0x10_0000).unwrap()
}

/// The `nkvm: restored DIR in N ms` line, once it is whole.
fn restored(stderr: &str) -> Option<&str> {
    stderr.lines().find(|l| l.starts_with("nkvm: restored") && l.ends_with(" ms"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn figures(dir: &Path, name: &str, image: &Path, memory: &str, probe: Probe) {
    let api = dir.join("bench.sock");
    let mut vmm = Vmm::run(
        &["--image", image.to_str().unwrap(), "--cpus", "2", "--memory", memory]
            .into_iter()
            .chain(["--api-socket", api.to_str().unwrap()])
            .collect::<Vec<_>>(),
    );
    vmm.wait_for("the API socket", |_, _| api.exists());
    let mut rate = String::new();
    match probe {
        Probe::Passes => {
            vmm.wait_passes(0, 2);
            let (n0, t0) = (passes(&vmm.stdout()).len(), Instant::now());
            vmm.wait_passes(n0, 5);
            let secs = t0.elapsed().as_secs_f64();
            let bytes = (passes(&vmm.stdout()).len() - n0) as f64 * (2 * HALF * 4096) as f64;
            rate = format!(", {:.0} MB/s dirtied", bytes / secs / 1e6);
        }
        Probe::Dots => {
            let dots = |out: &str| out.matches('.').count();
            vmm.wait_for("dots", |out, _| dots(out) >= 2);
            let (n0, t0) = (dots(&vmm.stdout()), Instant::now());
            std::thread::sleep(Duration::from_secs(3));
            let secs = t0.elapsed().as_secs_f64();
            // Both vCPUs store at vCPU 0's pace.
            let bytes = (dots(&vmm.stdout()) - n0) as f64 * (2 * DOT_PAGES * 4096) as f64;
            rate = format!(", {:.0} MB/s dirtied", bytes / secs / 1e6);
        }
        Probe::None => std::thread::sleep(Duration::from_millis(300)),
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
            // The whole line: stderr is unbuffered, a line can arrive in pieces.
            r.wait_for("the restore line", |_, err| err.contains('\n') && restored(err).is_some());
            let stderr = r.stderr();
            r.kill();
            let line = restored(&stderr).unwrap();
            let ms = line.rsplit(" in ").next().and_then(|s| s.split(' ').next()).unwrap();
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
        "{:<46} {:>9.1} {:>8.1} {:>9.1} ({:>4.1}) {:>6.0} {:>8.1}",
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
