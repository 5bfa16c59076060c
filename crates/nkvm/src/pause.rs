//! Pausing every vCPU of a VM for as long as a memory-map change takes.
//!
//! The vCPU side takes no lock: each vCPU's "inside `KVM_RUN`" bit (kept in
//! its [`KickShared`] for the kicker anyway) is the gate. A vCPU sets the
//! bit and then looks at `pausing`; a pauser sets `pausing` and then looks
//! at the bits. Both are sequentially consistent, so at least one of them
//! sees the other: the vCPU steps back out, or the pauser waits for it.
//! Locks and the condition variable are only used on the slow paths (a
//! pause is starting or running).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};

use crate::kick::KickShared;

/// vCPUs mark themselves inside while in `KVM_RUN`; a memory-map change
/// raises `pausing`, kicks them all and waits until none is inside.
#[derive(Debug, Default)]
pub(crate) struct PauseGate {
    pausing: AtomicBool,
    /// One pause at a time.
    pausers: Mutex<()>,
    /// Guards the waits on `wake`: vCPUs waiting for a pause to end, a
    /// pauser waiting for vCPUs to leave.
    waits: Mutex<()>,
    wake: Condvar,
    vcpus: Mutex<Vec<Weak<KickShared>>>,
}

/// A vCPU inside the gate; leaving (drop) clears its bit.
#[derive(Debug)]
pub(crate) struct Inside<'a> {
    gate: &'a PauseGate,
    vcpu: &'a KickShared,
}

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        self.gate.leave(self.vcpu);
    }
}

/// The exclusive side of the gate: the vCPUs stay out while it lives.
#[derive(Debug)]
pub(crate) struct Paused<'a> {
    gate: &'a PauseGate,
    _one_at_a_time: MutexGuard<'a, ()>,
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        let _waits = self.gate.waits.lock().unwrap_or_else(|p| p.into_inner());
        self.gate.pausing.store(false, Ordering::SeqCst);
        self.gate.wake.notify_all();
    }
}

impl PauseGate {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub(crate) fn register(&self, vcpu: &Arc<KickShared>) {
        let mut vcpus = self.vcpus.lock().unwrap_or_else(|p| p.into_inner());
        vcpus.retain(|w| w.strong_count() > 0);
        vcpus.push(Arc::downgrade(vcpu));
    }

    /// Taken by a vCPU around `KVM_RUN` (and marks it inside for kickers).
    #[inline]
    pub(crate) fn enter<'a>(&'a self, vcpu: &'a KickShared) -> Inside<'a> {
        vcpu.enter();
        if !self.pausing.load(Ordering::SeqCst) {
            return Inside { gate: self, vcpu };
        }
        self.enter_after_pause(vcpu)
    }

    /// A pause is starting: step aside until it is over, then enter.
    #[cold]
    fn enter_after_pause<'a>(&'a self, vcpu: &'a KickShared) -> Inside<'a> {
        loop {
            self.leave(vcpu);
            let mut waits = self.waits.lock().unwrap_or_else(|p| p.into_inner());
            while self.pausing.load(Ordering::SeqCst) {
                waits = self.wake.wait(waits).unwrap_or_else(|p| p.into_inner());
            }
            drop(waits);
            vcpu.enter();
            if !self.pausing.load(Ordering::SeqCst) {
                return Inside { gate: self, vcpu };
            }
        }
    }

    #[inline]
    fn leave(&self, vcpu: &KickShared) {
        vcpu.leave();
        if self.pausing.load(Ordering::SeqCst) {
            self.wake_pauser();
        }
    }

    /// The pauser may be waiting for this vCPU; it checks the bits under
    /// `waits`, so this wake-up cannot fall between its check and its wait.
    #[cold]
    fn wake_pauser(&self) {
        let _waits = self.waits.lock().unwrap_or_else(|p| p.into_inner());
        self.wake.notify_all();
    }

    /// Kicks every vCPU out of the guest and keeps them out until the guard drops.
    pub(crate) fn pause(&self) -> Paused<'_> {
        let one_at_a_time = self.pausers.lock().unwrap_or_else(|p| p.into_inner());
        self.pausing.store(true, Ordering::SeqCst);
        let vcpus: Vec<Arc<KickShared>> =
            self.vcpus.lock().unwrap_or_else(|p| p.into_inner()).iter().filter_map(Weak::upgrade).collect();
        for v in &vcpus {
            v.kick();
        }
        // Every vCPU inside KVM_RUN leaves (signal), one about to enter
        // returns at once (immediate_exit), and none re-enters while
        // `pausing` is set.
        let mut waits = self.waits.lock().unwrap_or_else(|p| p.into_inner());
        while vcpus.iter().any(|v| v.in_guest()) {
            waits = self.wake.wait(waits).unwrap_or_else(|p| p.into_inner());
        }
        Paused { gate: self, _one_at_a_time: one_at_a_time }
    }
}
