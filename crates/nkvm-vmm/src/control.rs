//! Pausing and resuming the vCPU threads from another thread (the API
//! socket, a migration): a paused vCPU has completed its last exit, saved
//! its state and waits on its own thread, so a snapshot or the end of a
//! migration sees every vCPU at an instruction boundary.
//!
//! A pause has two phases. First every vCPU leaves the guest and stops,
//! its state still unread; only when all have does each save its state.
//! A vCPU saved while another still ran could be sent an IPI (or an
//! INIT/SIPI) after its local APIC was read: the sender's state would say
//! it was sent, the receiver's never had it.

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

/// What a vCPU stopped for a pause does next ([`Control::stop_here`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Every vCPU is out of the guest: save the state and park.
    Save,
    /// The pause was withdrawn: run on.
    Resume,
    /// The machine is stopping.
    Stopping,
}

/// Where one vCPU is, as the controller sees it.
#[derive(Debug, Clone)]
enum Slot {
    /// In its run loop.
    Running,
    /// Out of the guest for a pause, its state not read yet.
    Stopped,
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
    /// Every vCPU has stopped: they may read their states now.
    save: bool,
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
        let state =
            ControlState { pause: false, save: false, stopping: false, slots: vec![Slot::Running; cpus as usize] };
        Self { wanted: AtomicBool::new(false), state: Mutex::new(state), changed: Condvar::new() }
    }

    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// vCPU side: whether to park now (cheap; called once per exit).
    pub fn pause_wanted(&self) -> bool {
        self.wanted.load(SeqCst)
    }

    /// vCPU side, out of the guest for a pause: waits until every vCPU is
    /// (then it saves its state and [`park`](Self::park)s), the pause is
    /// withdrawn, or the machine stops.
    pub fn stop_here(&self, id: u32) -> Stop {
        let mut s = self.lock();
        if !s.save {
            s.slots[id as usize] = Slot::Stopped;
            self.changed.notify_all();
        }
        while s.pause && !s.save && !s.stopping {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        if s.stopping {
            return Stop::Stopping;
        }
        if !s.pause {
            s.slots[id as usize] = Slot::Running;
            return Stop::Resume;
        }
        Stop::Save
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
            // Phase two once no vCPU runs guest code any more.
            if !s.save && !s.slots.iter().any(|slot| matches!(slot, Slot::Running)) {
                s.save = true;
                self.changed.notify_all();
            }
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
                    Slot::Running | Slot::Stopped => waiting = true,
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
        s.save = false;
        self.wanted.store(false, SeqCst);
        self.changed.notify_all();
        drop(s);
    }

    /// Whether a pause is in force.
    pub fn is_paused(&self) -> bool {
        self.lock().pause
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::sync::Arc;

    use super::*;

    /// No vCPU reads its state while another still runs guest code: the
    /// first to stop waits for the last.
    #[test]
    fn a_stopped_vcpu_saves_only_once_every_vcpu_has_stopped() {
        let control = Arc::new(Control::new(2));
        let pauser = {
            let control = control.clone();
            std::thread::spawn(move || control.pause(|| {}, || None))
        };
        while !control.pause_wanted() {
            std::thread::yield_now();
        }
        let (told, first) = mpsc::channel();
        // vCPU 0 parks (failing the pause) only once vCPU 1 has been told
        // too: a failed pause withdrawn earlier would tell vCPU 1 to resume.
        let (go_on, park) = mpsc::channel::<()>();
        let vcpu0 = {
            let control = control.clone();
            std::thread::spawn(move || {
                let stop = control.stop_here(0);
                told.send(stop).unwrap();
                park.recv().unwrap();
                control.park(0, Err("no state in this test".into()));
            })
        };
        // vCPU 1 is still in the guest: vCPU 0 must not be told to save.
        assert!(first.recv_timeout(Duration::from_millis(300)).is_err(), "vCPU 0 saved while vCPU 1 ran");
        assert_eq!(control.stop_here(1), Stop::Save);
        assert_eq!(first.recv().unwrap(), Stop::Save);
        go_on.send(()).unwrap();
        control.park(1, Err("no state in this test".into()));
        let err = pauser.join().unwrap().unwrap_err();
        assert!(matches!(err, ControlError::SaveFailed { .. }), "{err}");
        vcpu0.join().unwrap();
        assert!(!control.is_paused(), "a failed pause lets the vCPUs go");
    }
}
