//! A saved machine coming in: `--restore DIR` (the snapshot read, its
//! memory file mapped) or `--incoming ADDR` (the migration received). Both
//! end as a [`Resumed`]: a VM with its RAM filled and the decoded states,
//! whose configuration says which machine to build around them.

use std::io;
use std::time::Instant;

use nkvm::{Hypervisor, Vm};

use super::MachineError;
use crate::cli::RunArgs;
use crate::migrate::receive::{self, Answer};
use crate::saved::LoadError;
use crate::snapshot::{self, DecodedState};

/// Why a saved machine could not be brought back.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The snapshot or stream was refused.
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    /// The saved devices do not fit this machine's, or one refused its state.
    #[error(transparent)]
    Devices(#[from] LoadError),
    /// KVM refused the VM or a vCPU state.
    #[error(transparent)]
    State(#[from] nkvm::state::StateError),
    /// Reading the image failed.
    #[error("cannot read the guest image {path}")]
    Image {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Setting the machine up failed.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// Receiving a migration failed.
    #[error(transparent)]
    Incoming(#[from] crate::migrate::MigrateError),
    /// The API socket could not be served.
    #[error("cannot serve the API socket {path}")]
    Api {
        /// The socket path.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// What `--restore` or `--incoming` brings.
#[derive(Debug)]
pub enum Intake {
    /// Everything is here: a snapshot read.
    Saved(Resumed),
    /// A migration whose configuration has come: build the machine, then
    /// [`Arriving::finish`] it.
    Arriving(Arriving),
}

/// A migration's VM, created from the configuration it sent, while its
/// memory and state are still on the way.
#[derive(Debug)]
pub struct Arriving {
    /// The VM, its RAM still zero.
    pub vm: Vm,
    /// The rest of the stream.
    pub stream: receive::Arriving,
    /// When the receiving began.
    pub since: Instant,
}

impl Arriving {
    /// Receives the rest: the whole saved machine, not yet running.
    pub fn finish(self) -> Result<Resumed, RestoreError> {
        let (state, answer) = self.stream.finish(&self.vm)?;
        Ok(Resumed { vm: self.vm, state, answer: Some(answer), since: self.since })
    }
}

/// A saved machine's VM and state, not yet running.
#[derive(Debug)]
pub struct Resumed {
    /// The VM, created from the saved configuration, its RAM filled.
    pub vm: Vm,
    /// The decoded states (the configuration among them).
    pub state: DecodedState,
    /// The link back to a migration's source: confirm once the guest is
    /// ready here, refuse if it cannot be.
    pub answer: Option<Answer>,
    /// When the restore or the receiving began.
    pub since: Instant,
}

impl Resumed {
    /// Tells a migration's source that the guest cannot run here (it then
    /// runs on there); nothing for a snapshot.
    pub fn refuse(answer: Option<&mut Answer>, why: &dyn std::error::Error) {
        if let Some(answer) = answer {
            answer.refuse(&chain(why));
        }
    }

    /// What to say once the guest runs: where it came from, how long it took.
    pub fn announce(answer: Option<Answer>, args: &RunArgs, since: Instant) -> Result<(), RestoreError> {
        if let Some(answer) = answer {
            answer.confirm()?;
            eprintln!("nkvm: migration received; the guest resumes here");
        } else if let Some(dir) = &args.restore {
            eprintln!("nkvm: restored {} in {:.1} ms", dir.display(), since.elapsed().as_secs_f64() * 1e3);
        }
        Ok(())
    }
}

/// An error and its causes on one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}

/// The saved machine `--restore` names, or the migration `--incoming`
/// names (this waits for its configuration), or `None` for a fresh boot.
pub fn take(hv: &Hypervisor, args: &RunArgs) -> Result<Option<Intake>, RestoreError> {
    let since = Instant::now();
    if let Some(dir) = &args.restore {
        // What the vCPU states are checked against, read beside the files.
        hv.prepare_restore();
        // Device processes map guest RAM themselves: then it is a copy.
        let loaded = snapshot::read(dir, args.device_process)?;
        loaded.state.config.check_disk()?;
        let state = loaded.state.decode(&dir.display().to_string())?;
        // The snapshot's memory file, mapped copy-on-write: nothing is read
        // up front. A Linux machine's in-process virtio devices see the
        // same mapping (`nkvm::ram_view`), not the file.
        let vm = Vm::with_ram(hv, &state.config.vm_config(), loaded.ram).map_err(MachineError::from)?;
        return Ok(Some(Intake::Saved(Resumed { vm, state, answer: None, since })));
    }
    if let Some(uri) = &args.incoming {
        let (vm, stream) = receive::start(hv, uri)?;
        return Ok(Some(Intake::Arriving(Arriving { vm, stream, since })));
    }
    Ok(None)
}
