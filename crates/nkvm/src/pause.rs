//! Pausing every vCPU of a VM for as long as a memory-map change takes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

use crate::kick::KickShared;

/// vCPUs hold the gate shared while inside `KVM_RUN`; a memory-map change
/// raises `pausing`, kicks them all and takes it exclusively.
#[derive(Debug, Default)]
pub(crate) struct PauseGate {
    lock: RwLock<()>,
    pausing: AtomicBool,
    vcpus: Mutex<Vec<Weak<KickShared>>>,
}

/// The exclusive side of the gate: the vCPUs stay out while it lives.
#[derive(Debug)]
pub(crate) struct Paused<'a> {
    gate: &'a PauseGate,
    _guard: RwLockWriteGuard<'a, ()>,
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.gate.pausing.store(false, Ordering::SeqCst);
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

    /// Taken by a vCPU around `KVM_RUN`.
    pub(crate) fn enter(&self) -> RwLockReadGuard<'_, ()> {
        loop {
            let guard = self.lock.read().unwrap_or_else(|p| p.into_inner());
            if !self.pausing.load(Ordering::SeqCst) {
                return guard;
            }
            // A pause is starting: step aside until the writer is done (its
            // write() makes read() wait once it is queued).
            drop(guard);
            std::thread::yield_now();
        }
    }

    /// Kicks every vCPU out of the guest and keeps them out until the guard drops.
    pub(crate) fn pause(&self) -> Paused<'_> {
        self.pausing.store(true, Ordering::SeqCst);
        let vcpus: Vec<Arc<KickShared>> =
            self.vcpus.lock().unwrap_or_else(|p| p.into_inner()).iter().filter_map(Weak::upgrade).collect();
        for v in &vcpus {
            v.kick();
        }
        // Every vCPU inside KVM_RUN leaves (signal), one about to enter
        // returns at once (immediate_exit), and none re-enters while
        // `pausing` is set.
        let guard = self.lock.write().unwrap_or_else(|p| p.into_inner());
        Paused { gate: self, _guard: guard }
    }
}
