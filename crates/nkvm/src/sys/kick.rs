//! The signal that interrupts `KVM_RUN` on another thread.

use std::sync::Once;

use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

/// The real-time signal nkvm uses to kick vCPU threads (`SIGRTMIN + 0`).
pub(crate) fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: the signal's only job is to make KVM_RUN return EINTR.
}

/// Installs the (empty) kick handler once per process, without SA_RESTART so
/// that `KVM_RUN` returns `EINTR`.
pub(crate) fn install_handler() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result =
            register_signal_handler(kick_signal(), on_kick).map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

/// A thread's pthread handle, in a form an `AtomicU64` can hold
/// (`pthread_t` is an `unsigned long` on Linux).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ThreadId(pub(crate) u64);

/// The calling thread's pthread handle.
pub(crate) fn current_thread() -> ThreadId {
    // SAFETY: pthread_self has no preconditions.
    let thread = unsafe { libc::pthread_self() };
    ThreadId(thread as u64)
}

/// Sends the kick signal to `thread`.
///
/// The caller must know that `thread` is alive (the kicker only signals a
/// thread that is inside `enter_guest`, under the lock the vCPU takes before
/// leaving it).
pub(crate) fn signal_thread(thread: ThreadId) -> std::io::Result<()> {
    // SAFETY: `thread` is a live thread of this process (see above); sending a
    // signal with an installed handler has no other effect on memory.
    let rc = unsafe { libc::pthread_kill(thread.0 as libc::pthread_t, kick_signal()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}
