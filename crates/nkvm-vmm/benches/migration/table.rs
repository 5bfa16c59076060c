//! The table the bench ends with.

use super::figures::{Row, SnapRestore};
use super::{Image, RUNS};

/// One row of the migration table.
pub struct Line {
    /// What the row is.
    pub name: String,
    /// Its dirtying rate, MB/s (the target's, or QEMU's measured one).
    pub rate: f64,
    /// nkvm's figures.
    pub nkvm: Row,
    /// QEMU's figures.
    pub qemu: Row,
    /// The guest nkvm ran.
    pub nkvm_image: Image,
    /// The guest QEMU ran.
    pub qemu_image: Image,
    /// Figures beside the rows, with no target of their own.
    pub info: Info,
}

/// What a row beside the rows holds.
#[derive(Clone, Copy, PartialEq)]
pub enum Info {
    /// One of the rows (a target applies).
    No,
    /// nkvm's guest slowed to the rate QEMU's managed (QEMU's figures are
    /// the busiest row's).
    NkvmAtQemusRate,
    /// QEMU's guest sped up to the rate nkvm's managed (nkvm's figures are
    /// the busiest row's).
    QemuAtNkvmsRate,
}

fn verdict(met: bool) -> &'static str {
    if met {
        "MET"
    } else {
        "NOT MET"
    }
}

fn line(row: &str, vmm: &str, image: &Image, r: &Row) {
    if let Some(why) = &r.skipped {
        if r.runs.is_empty() {
            println!("{row:<10} {vmm:<5} {:<32} skipped: {why}", image.describe());
            return;
        }
    }
    println!(
        "{row:<10} {vmm:<5} {:<32} {:>7.1} {:>7.1} {:>10.1} {:>8.1} {:>6.0} {:>7.2} {:>7}{}",
        image.describe(),
        r.dirtied_mb_s,
        r.total_ms(),
        r.guest_downtime_ms(),
        r.vmm_downtime_ms(),
        r.rounds(),
        r.mb(),
        r.in_sequence(),
        r.skipped.as_ref().map(|w| format!("  (then {w})")).unwrap_or_default(),
    );
}

/// Prints the migration rows and the snapshot/restore figures.
pub fn print(rows: &[Line], snaps: &(SnapRestore, SnapRestore)) {
    println!();
    println!("== Live migration, 512 MiB, 2 vCPUs, loopback TCP (median of {RUNS} chained migrations) ==");
    println!(
        "{:<10} {:<5} {:<32} {:>7} {:>7} {:>10} {:>8} {:>6} {:>7} {:>7}",
        "row", "VMM", "guest", "dirtied", "total", "downtime", "downtime", "rounds", "sent", "console"
    );
    println!(
        "{:<10} {:<5} {:<32} {:>7} {:>7} {:>10} {:>8} {:>6} {:>7} {:>7}",
        "", "", "", "MB/s", "ms", "guest ms", "VMM ms", "", "MB", "in seq"
    );
    for Line { name, rate, nkvm: n, qemu: q, nkvm_image: ni, qemu_image: qi, info } in rows {
        if *info != Info::No {
            let what = if *info == Info::NkvmAtQemusRate {
                line(name, "nkvm", ni, n);
                "nkvm's guest at the rate QEMU's managed in the busiest row"
            } else {
                line(name, "QEMU", qi, q);
                "QEMU's guest storing more pages a tick, towards the rate nkvm's managed in the busiest row"
            };
            println!(
                "{:<16} info (no target): {what}; total nkvm {:.1} vs QEMU {:.1} ms, guest downtime {:.1} vs {:.1} ms",
                "",
                n.total_ms(),
                q.total_ms(),
                n.guest_downtime_ms(),
                q.guest_downtime_ms()
            );
            continue;
        }
        line(name, "nkvm", ni, n);
        line("", "QEMU", qi, q);
        let same = ni.kind == qi.kind;
        let mut goals = Vec::new();
        if *rate == 50.0 {
            let worst = n.worst_guest_downtime_ms();
            goals.push(format!(
                "nkvm downtime <= 50 ms (worst of {}: {worst:.1} ms): {}",
                n.runs.len(),
                verdict(worst <= 50.0)
            ));
        }
        if q.runs.is_empty() {
            goals.push("at or below QEMU: no QEMU figures".to_string());
        } else {
            let total = n.total_ms() <= q.total_ms();
            let down = n.guest_downtime_ms() <= q.guest_downtime_ms();
            goals.push(format!(
                "total at or below QEMU's ({:.1} vs {:.1} ms): {}; guest downtime at or below QEMU's ({:.1} vs {:.1} ms): {}{}",
                n.total_ms(),
                q.total_ms(),
                verdict(total),
                n.guest_downtime_ms(),
                q.guest_downtime_ms(),
                verdict(down),
                if same { "" } else { " [DIFFERENT GUESTS: indicative only, not the issue's comparison]" },
            ));
        }
        for g in goals {
            println!("{:<16} target: {g}", "");
        }
    }
    println!();
    println!("== Snapshot and restore, the idle guest, 512 MiB, 2 vCPUs (median of {RUNS}) ==");
    println!(
        "{:<5} {:>14} {:>14} {:>14} {:>24}",
        "VMM", "snapshot ms", "guest paused", "restore ms", "restore: start to first"
    );
    println!("{:<5} {:>14} {:>14} {:>14} {:>24}", "", "(VMM's own)", "ms", "(VMM's own)", "guest byte, ms");
    for (vmm, s) in [("nkvm", &snaps.0), ("QEMU", &snaps.1)] {
        match &s.skipped {
            Some(why) => println!("{vmm:<5} skipped: {why}"),
            None => println!(
                "{vmm:<5} {:>14.1} {:>14.1} {:>14} {:>24.1}",
                s.snapshot_ms,
                s.snapshot_paused_ms,
                if s.restore_ms.is_nan() { "-".to_string() } else { format!("{:.1}", s.restore_ms) },
                s.restore_to_first_byte_ms
            ),
        }
    }
    println!(
        "{:<16} target: nkvm restore <= 5 ms ({:.1} ms, its own report): {}",
        "",
        snaps.0.restore_ms,
        verdict(snaps.0.restore_ms <= 5.0)
    );
}
