//! [`Running`]: a machine whose vCPUs run, as the API socket and a
//! migration act on it: pause, resume, its state as values, a snapshot.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nkvm::state::VcpuState;
use nkvm::Vm;
use serde_json::{json, Value};

use crate::control::ControlError;
use crate::machine::Shared;
use crate::migrate::MigrationStatus;
use crate::saved::{SaveError, SavedDevices};
use crate::snapshot::{self, MachineConfig, MachineState, SnapshotError};

/// Why an operation on a running machine failed.
#[derive(Debug, thiserror::Error)]
pub enum RunningError {
    /// The vCPUs could not be paused.
    #[error(transparent)]
    Pause(#[from] ControlError),
    /// Saving the VM's state failed.
    #[error("cannot save the VM state")]
    SaveVm(#[source] nkvm::state::StateError),
    /// Writing the snapshot failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A device's state could not be taken.
    #[error(transparent)]
    Save(#[from] SaveError),
    /// A migration is running; pause, resume and snapshot wait for it.
    #[error("a migration is in progress")]
    Migrating,
    /// The guest migrated away: it runs on the destination now, and this
    /// process is ending.
    #[error("the guest migrated to {0} and runs there now; this process is ending")]
    MigratedAway(String),
    /// Another command that pauses or resumes the guest is under way.
    #[error(
        "another command is in progress (a snapshot being written, a pause or a resume); try again when it is done"
    )]
    Busy,
}

/// A running machine, shared by its API server and migrations.
#[derive(Debug)]
pub struct Running {
    /// The VM.
    pub vm: Arc<Vm>,
    /// What the vCPU threads share (the pause gate among it).
    pub shared: Arc<Shared>,
    /// The device models whose state travels.
    pub devices: SavedDevices,
    /// What the machine was built from.
    pub config: MachineConfig,
    /// The last (or current) migration's progress.
    pub migration: Mutex<MigrationStatus>,
    /// Held by a command that pauses or resumes the guest (pause, resume,
    /// snapshot, a migration's start), so that one never resumes a guest
    /// another has paused for its own purpose.
    ops: Mutex<()>,
    /// The running migration's link and whether it was cancelled (under
    /// the `migration` lock's ordering: see [`crate::migrate::send::cancel`]).
    pub(crate) cancel: Mutex<Cancel>,
}

/// What `nkvm ctl cancel` needs of a running migration.
#[derive(Debug, Default)]
pub(crate) struct Cancel {
    /// Set by a cancel; the migration ends at its next step.
    pub(crate) requested: bool,
    /// A handle on the migration's connection, to unblock its sends.
    pub(crate) link: Option<crate::migrate::Conn>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Running {
    /// A handle on the machine.
    pub fn new(vm: Arc<Vm>, shared: Arc<Shared>, devices: SavedDevices, config: MachineConfig) -> Self {
        Self {
            vm,
            shared,
            devices,
            config,
            migration: Mutex::new(MigrationStatus::default()),
            ops: Mutex::new(()),
            cancel: Mutex::default(),
        }
    }

    /// The right to pause or resume the guest for one command, or
    /// [`RunningError::Busy`] while another command has it.
    pub fn exclusive(&self) -> Result<std::sync::MutexGuard<'_, ()>, RunningError> {
        match self.ops.try_lock() {
            Ok(guard) => Ok(guard),
            Err(std::sync::TryLockError::Poisoned(p)) => Ok(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => Err(RunningError::Busy),
        }
    }

    /// Whether a command may pause or resume the guest now, decided from
    /// one look at the migration's phase: not while a migration runs
    /// ([`RunningError::Migrating`]), and never once one has handed the guest
    /// over ([`RunningError::MigratedAway`]; the phase turns `done` before
    /// the vCPUs stop). One look, so no hand-over falls between two checks;
    /// and no migration starts after it while the caller holds
    /// [`exclusive`](Self::exclusive).
    pub fn may_pause_or_resume(&self) -> Result<(), RunningError> {
        let status = self.migration.lock().unwrap_or_else(|p| p.into_inner());
        if status.phase == crate::migrate::Phase::Done {
            return Err(RunningError::MigratedAway(status.to.clone()));
        }
        if status.active() {
            return Err(RunningError::Migrating);
        }
        Ok(())
    }

    /// Whether a migration is between its start and its end.
    pub fn migrating(&self) -> bool {
        self.migration.lock().unwrap_or_else(|p| p.into_inner()).active()
    }

    /// Pauses every vCPU (each completes its exit and saves its state);
    /// returns the states. Pausing a paused machine returns the same states.
    pub fn pause(&self) -> Result<Vec<VcpuState>, RunningError> {
        // The devices first: nothing reaches a vCPU after its state is taken.
        self.devices.pause_all();
        let paused = self.shared.control.pause(|| self.shared.kick_all(), || self.devices.unpausable());
        if paused.is_err() {
            self.devices.resume_all();
        }
        Ok(paused?)
    }

    /// Lets the vCPUs run on.
    pub fn resume(&self) {
        self.shared.control.resume();
        self.devices.resume_all();
    }

    /// The machine's state besides RAM, with the vCPUs paused in `vcpus`.
    /// The devices first: saving a virtio device serves what its driver
    /// made available, which writes guest memory; take RAM after this.
    pub fn machine_state(&self, vcpus: &[VcpuState]) -> Result<MachineState, RunningError> {
        let devices = self.devices.save_all()?;
        let vm = self.vm.save_state().map_err(RunningError::SaveVm)?.encode();
        Ok(MachineState {
            config: self.config.clone(),
            vm,
            vcpus: vcpus.iter().map(VcpuState::encode).collect(),
            devices,
        })
    }

    /// Writes a snapshot to `dir`: pauses (if running), saves, resumes (if
    /// it was running). Returns how long the vCPUs were paused for it.
    pub fn snapshot(&self, dir: &Path) -> Result<Duration, RunningError> {
        if self.migrating() {
            return Err(RunningError::Migrating);
        }
        // Refused before the guest pauses for it.
        self.devices.saveable()?;
        let was_paused = self.shared.control.is_paused();
        let start = Instant::now();
        let result = self.pause().and_then(|vcpus| {
            let state = self.machine_state(&vcpus)?;
            Ok(snapshot::write(dir, &state, self.vm.ram())?)
        });
        if !was_paused {
            self.resume();
        }
        result.map(|()| start.elapsed())
    }

    /// What `info` reports.
    pub fn info(&self) -> Value {
        let state = if self.shared.control.is_paused() { "paused" } else { "running" };
        let migration = self.migration.lock().unwrap_or_else(|p| p.into_inner()).to_json();
        json!({
            "state": state,
            "kind": self.config.kind.name(),
            "cpus": self.config.cpus,
            "memory": self.config.memory,
            "migration": migration,
        })
    }
}
