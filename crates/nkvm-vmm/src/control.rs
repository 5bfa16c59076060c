//! Pausing and resuming the vCPU threads from another thread (the API
//! socket, a migration): a paused vCPU has completed its last exit, saved
//! its state and waits on its own thread, so a snapshot or the end of a
//! migration sees every vCPU at an instruction boundary.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use nkvm::state::VcpuState;

/// Why the vCPUs could not be paused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A vCPU thread has ended (the guest halted it or failed): there is no
    /// state to take.
    #[error("vCPU {id} has stopped running (halted or failed): the machine cannot be paused")]
    VcpuGone {
        /// The vCPU.
        id: u32,
    },
    /// A vCPU could not save its state.
    #[error("vCPU {id} could not save its state: {why}")]
    SaveFailed {
        /// The vCPU.
        id: u32,
        /// The error, as text (it crossed threads).
        why: String,
    },
    /// The machine is shutting down.
    #[error("the machine is shutting down")]
    Stopping,
    /// The machine is in a state whose vCPUs cannot park (asleep in S3:
    /// they wait for the wake-up, not in the guest).
    #[error("{0}")]
    CannotPause(String),
}

/// Where one vCPU is, as the controller sees it.
#[derive(Debug, Clone)]
enum Slot {
    /// In its run loop.
    Running,
    /// Parked with this state.
    Parked(Box<VcpuState>),
    /// Could not save its state.
    Failed(String),
    /// Its thread ended.
    Gone,
}

#[derive(Debug)]
struct ControlState {
    /// The vCPUs are asked to park.
    pause: bool,
    /// The machine is stopping: parked vCPUs leave.
    stopping: bool,
    slots: Vec<Slot>,
}

/// The pause gate the vCPU threads and the controllers share.
#[derive(Debug)]
pub struct Control {
    /// Fast path for the vCPU loop: set while a pause is asked for.
    wanted: AtomicBool,
    state: Mutex<ControlState>,
    changed: Condvar,
}

impl Control {
    /// A gate for `cpus` running vCPUs.
    pub fn new(cpus: u32) -> Self {
        let state = ControlState { pause: false, stopping: false, slots: vec![Slot::Running; cpus as usize] };
        Self { wanted: AtomicBool::new(false), state: Mutex::new(state), changed: Condvar::new() }
    }

    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// vCPU side: whether to park now (cheap; called once per exit).
    pub fn pause_wanted(&self) -> bool {
        self.wanted.load(SeqCst)
    }

    /// vCPU side: park with `state` (or the error saving it) until the
    /// machine resumes or stops. Returns false when it stops.
    pub fn park(&self, id: u32, state: Result<VcpuState, String>) -> bool {
        let mut s = self.lock();
        s.slots[id as usize] = match state {
            Ok(state) => Slot::Parked(Box::new(state)),
            Err(why) => Slot::Failed(why),
        };
        self.changed.notify_all();
        while s.pause && !s.stopping {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.slots[id as usize] = Slot::Running;
        !s.stopping
    }

    /// vCPU side: its thread is ending.
    pub fn gone(&self, id: u32) {
        self.lock().slots[id as usize] = Slot::Gone;
        self.changed.notify_all();
    }

    /// Releases parked vCPUs for good (the machine is stopping).
    pub fn stop(&self) {
        self.lock().stopping = true;
        self.changed.notify_all();
    }

    /// Asks every vCPU to park, `kick`s them out of the guest, and waits
    /// until all have: returns their states, by id. Gives up when
    /// `cannot_pause` says why the vCPUs cannot park (before or while it
    /// waits). On an error the vCPUs that parked are released again.
    pub fn pause(
        &self,
        kick: impl Fn(),
        cannot_pause: impl Fn() -> Option<String>,
    ) -> Result<Vec<VcpuState>, ControlError> {
        let mut s = self.lock();
        s.pause = true;
        self.wanted.store(true, SeqCst);
        kick();
        loop {
            if s.stopping {
                drop(s);
                self.resume();
                return Err(ControlError::Stopping);
            }
            if let Some(why) = cannot_pause() {
                drop(s);
                self.resume();
                return Err(ControlError::CannotPause(why));
            }
            let mut states = Vec::with_capacity(s.slots.len());
            let mut waiting = false;
            let mut error = None;
            for (id, slot) in s.slots.iter().enumerate() {
                match slot {
                    Slot::Parked(state) => states.push((**state).clone()),
                    Slot::Running => waiting = true,
                    Slot::Gone => error = Some(ControlError::VcpuGone { id: id as u32 }),
                    Slot::Failed(why) => error = Some(ControlError::SaveFailed { id: id as u32, why: why.clone() }),
                }
            }
            if let Some(e) = error {
                drop(s);
                self.resume();
                return Err(e);
            }
            if !waiting {
                return Ok(states);
            }
            // A vCPU kicked while it handled an exit sees the pause at its
            // next loop turn; re-kick now and then in case one re-entered.
            let (next, timeout) =
                self.changed.wait_timeout(s, Duration::from_millis(20)).unwrap_or_else(|p| p.into_inner());
            s = next;
            if timeout.timed_out() {
                kick();
            }
        }
    }

    /// Lets the parked vCPUs run on.
    pub fn resume(&self) {
        let mut s = self.lock();
        s.pause = false;
        self.wanted.store(false, SeqCst);
        self.changed.notify_all();
        drop(s);
    }

    /// Whether a pause is in force.
    pub fn is_paused(&self) -> bool {
        self.lock().pause
    }
}
