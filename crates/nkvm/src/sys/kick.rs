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

/// The calling thread's pthread handle.
pub(crate) fn current_thread() -> libc::pthread_t {
    // SAFETY: pthread_self has no preconditions.
    unsafe { libc::pthread_self() }
}

/// Sends the kick signal to `thread`.
///
/// The caller must know that `thread` is alive (the kicker only signals a
/// thread that is inside `enter_guest`, under the lock the vCPU takes before
/// leaving it).
pub(crate) fn signal_thread(thread: libc::pthread_t) -> std::io::Result<()> {
    // SAFETY: `thread` is a live thread of this process (see above); sending a
    // signal with an installed handler has no other effect on memory.
    let rc = unsafe { libc::pthread_kill(thread, kick_signal()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}
