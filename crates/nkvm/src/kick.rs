//! [`Kicker`]: make a vCPU leave the guest from another thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::sys::kick::{current_thread, signal_thread};
use crate::sys::run::RunArea;

/// A handle that forces a vCPU out of the guest: its running (or next)
/// [`enter_guest`](crate::Vcpu::enter_guest) returns [`Exit::Kicked`](crate::Exit::Kicked).
///
/// The kick cannot be lost: it sets `kvm_run.immediate_exit` (caught by a
/// vCPU that is just entering) and signals the vCPU thread if it is inside
/// `KVM_RUN` (caught by a running guest). A kick that arrives while the vCPU
/// is outside the guest makes its next entry return at once.
#[derive(Debug, Clone)]
pub struct Kicker {
    shared: Arc<KickShared>,
}

#[derive(Debug)]
pub(crate) struct KickShared {
    run: Arc<RunArea>,
    thread: Mutex<InGuest>,
    /// Set by a [`Kicker`]: the caller asked for the vCPU back. A kick
    /// without it is the VM pausing its vCPUs, which `enter_guest` absorbs.
    user: AtomicBool,
}

#[derive(Debug, Default)]
struct InGuest {
    thread: Option<libc::pthread_t>,
}

impl KickShared {
    pub(crate) fn new(run: Arc<RunArea>) -> Arc<Self> {
        Arc::new(Self { run, thread: Mutex::new(InGuest::default()), user: AtomicBool::new(false) })
    }

    /// Marks the calling thread as inside `KVM_RUN`.
    pub(crate) fn enter(&self) {
        self.thread.lock().unwrap_or_else(|p| p.into_inner()).thread = Some(current_thread());
    }

    /// Marks the calling thread as out of `KVM_RUN`. Taking the lock waits
    /// for a kick in flight, so no signal is ever sent to a thread that may
    /// have exited.
    pub(crate) fn leave(&self) {
        self.thread.lock().unwrap_or_else(|p| p.into_inner()).thread = None;
    }

    /// Consumes a pending kick; returns whether it came from a [`Kicker`].
    pub(crate) fn take(&self) -> bool {
        self.run.take_immediate_exit();
        self.user.swap(false, Ordering::SeqCst)
    }

    /// Forces the vCPU out of (or away from) `KVM_RUN`.
    pub(crate) fn kick(&self) {
        self.run.request_immediate_exit();
        let guard = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(thread) = guard.thread {
            if let Err(e) = signal_thread(thread) {
                log::warn!("cannot signal vCPU thread: {e}");
            }
        }
    }
}

impl Kicker {
    pub(crate) fn new(shared: Arc<KickShared>) -> Self {
        Self { shared }
    }

    /// Kicks the vCPU out of the guest (or makes its next entry return at once).
    pub fn kick(&self) {
        self.shared.user.store(true, Ordering::SeqCst);
        self.shared.kick();
    }
}
