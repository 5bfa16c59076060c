//! What one migration and one row of migrations measured, for either VMM.

use std::time::Duration;

use super::process::Switch;

/// One migration.
#[derive(Clone, Debug)]
pub struct Migration {
    /// The VMM's own total time, ms.
    pub total_ms: f64,
    /// The VMM's own downtime, ms.
    pub vmm_downtime_ms: f64,
    /// What the consoles showed.
    pub switch: Option<Switch>,
    /// Rounds (nkvm: pre-copy rounds; QEMU: `dirty-sync-count`).
    pub rounds: f64,
    /// Megabytes the VMM sent.
    pub mb: f64,
}

/// A VMM's figures for one row.
#[derive(Clone, Debug, Default)]
pub struct Row {
    /// The guest's dirtying rate as its console showed it, MB/s.
    pub dirtied_mb_s: f64,
    /// Each migration, in order.
    pub runs: Vec<Migration>,
    /// Why there are no figures, if there are none.
    pub skipped: Option<String>,
}

/// The median of `v` (`NaN` when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

impl Row {
    fn med(&self, f: impl Fn(&Migration) -> Option<f64>) -> f64 {
        median(self.runs.iter().filter_map(f).collect())
    }

    /// Median VMM-reported total time, ms.
    pub fn total_ms(&self) -> f64 {
        self.med(|m| Some(m.total_ms))
    }

    /// Median guest-visible downtime (console gap), ms.
    pub fn guest_downtime_ms(&self) -> f64 {
        self.med(|m| m.switch.map(|s| s.gap.as_secs_f64() * 1e3))
    }

    /// Median VMM-reported downtime, ms.
    pub fn vmm_downtime_ms(&self) -> f64 {
        self.med(|m| Some(m.vmm_downtime_ms))
    }

    /// Median rounds.
    pub fn rounds(&self) -> f64 {
        self.med(|m| Some(m.rounds))
    }

    /// Median MB sent.
    pub fn mb(&self) -> f64 {
        self.med(|m| Some(m.mb))
    }

    /// `k/n`: switch-overs whose console continued in sequence.
    pub fn in_sequence(&self) -> String {
        let k = self.runs.iter().filter(|m| m.switch.is_some_and(|s| s.in_sequence)).count();
        format!("{k}/{}", self.runs.len())
    }

    /// The largest guest-visible downtime, ms.
    pub fn worst_guest_downtime_ms(&self) -> f64 {
        self.runs.iter().filter_map(|m| m.switch).map(|s| s.gap).max().unwrap_or(Duration::ZERO).as_secs_f64() * 1e3
    }
}

/// Snapshot and restore figures for one VMM.
#[derive(Clone, Debug, Default)]
pub struct SnapRestore {
    /// The VMM's own snapshot time (total), ms.
    pub snapshot_ms: f64,
    /// How long the guest was paused for it, ms.
    pub snapshot_paused_ms: f64,
    /// The VMM's own restore time, ms (`NaN` when it reports none).
    pub restore_ms: f64,
    /// From starting the restoring process to the guest's first console
    /// byte, ms.
    pub restore_to_first_byte_ms: f64,
    /// Why there are no figures, if there are none.
    pub skipped: Option<String>,
}
