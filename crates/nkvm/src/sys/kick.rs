//! The signal that interrupts `KVM_RUN` on another thread, and an entry
//! made with that signal already pending.

use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::sync::Once;

use vmm_sys_util::ioctl::{ioctl_with_ptr, ioctl_with_ref};
use vmm_sys_util::ioctl_iow_nr;
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

thread_local! {
    /// The thread's pthread handle and kernel thread id, asked on first
    /// use (0: not yet). Const-initialised, so that reading it is a load
    /// from the thread's block, not a call into a lazy initialiser.
    static IDS: Cell<(u64, i32)> = const { Cell::new((0, 0)) };
}

/// The calling thread's pthread handle and kernel thread id, kept per
/// thread: `pthread_self` is a call through the GOT, and the exit path
/// asks on every entry (its user-space time tracks its instruction count;
/// see `docs/benchmarks.md`).
#[inline]
pub(crate) fn current_ids() -> (ThreadId, i32) {
    let ids = IDS.get();
    if ids.1 != 0 {
        return (ThreadId(ids.0), ids.1);
    }
    first_ids()
}

#[cold]
fn first_ids() -> (ThreadId, i32) {
    // SAFETY: pthread_self and gettid have no preconditions.
    let ids = unsafe { (libc::pthread_self() as u64, libc::gettid()) };
    IDS.set(ids);
    (ThreadId(ids.0), ids.1)
}

/// The calling thread's pthread handle.
#[inline]
pub(crate) fn current_thread() -> ThreadId {
    current_ids().0
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

ioctl_iow_nr!(KVM_SET_SIGNAL_MASK, kvm_bindings::KVMIO, 0x8b, kvm_bindings::kvm_signal_mask);

/// `struct kvm_signal_mask` with its one 64-bit kernel sigset.
#[repr(C)]
struct SignalMask {
    len: u32,
    sigset: [u8; 8],
}

/// A sigset holding only the kick signal.
fn kick_only() -> libc::sigset_t {
    // SAFETY: a zeroed sigset_t is a valid value; sigemptyset/sigaddset only
    // write inside it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, kick_signal());
        set
    }
}

/// Runs `f` (one `KVM_RUN` on `vcpu`) with the kick signal already pending,
/// so that KVM handles the vCPU's pending requests and then returns `EINTR`
/// before running a single guest instruction (unless a request itself exits
/// to user space first).
///
/// The kick signal is blocked on this thread and raised on it, and KVM is
/// told (`KVM_SET_SIGNAL_MASK`) to unblock it inside `KVM_RUN` only; after
/// `f`, KVM's mask is cleared, every kick still pending is consumed and the
/// thread's mask restored. A kick another thread sends meanwhile has set
/// `immediate_exit` as well, so it is not lost with its signal.
pub(crate) fn run_with_kick_pending<R>(vcpu: &impl AsRawFd, f: impl FnOnce() -> R) -> std::io::Result<R> {
    let only = kick_only();
    // SAFETY: a zeroed sigset_t is a valid value for pthread_sigmask to fill.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: both sets are live sigset_t values on this stack.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &only, &mut old) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    let result = run_blocked(vcpu, &old, f);
    // SAFETY: restores the mask read above; `old` lives for the call.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    result
}

fn run_blocked<R>(vcpu: &impl AsRawFd, old: &libc::sigset_t, f: impl FnOnce() -> R) -> std::io::Result<R> {
    let mut during = *old;
    // SAFETY: `during` is a valid sigset_t copied from `old`.
    unsafe { libc::sigdelset(&mut during, kick_signal()) };
    let mut mask = SignalMask { len: 8, sigset: [0; 8] };
    // SAFETY: sigset_t is at least 8 bytes; the kernel's x86-64 sigset is its
    // first 64 bits.
    let bytes = unsafe { std::slice::from_raw_parts(std::ptr::from_ref(&during).cast::<u8>(), 8) };
    mask.sigset.copy_from_slice(bytes);
    // SAFETY: KVM reads a kvm_signal_mask header and `len` (8) bytes of sigset
    // from `mask`, which lives for the call.
    if unsafe { ioctl_with_ref(vcpu, KVM_SET_SIGNAL_MASK(), &mask) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The signal stays pending: it is blocked on this thread until KVM_RUN
    // swaps in `during`.
    let raised = signal_thread(current_thread());
    let out = raised.map(|()| f());
    // SAFETY: a null argument tells KVM to stop using a signal mask for KVM_RUN.
    unsafe { ioctl_with_ptr(vcpu, KVM_SET_SIGNAL_MASK(), std::ptr::null::<SignalMask>()) };
    let only = kick_only();
    let now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `only` and `now` are live; no siginfo is asked for.
    while unsafe { libc::sigtimedwait(&only, std::ptr::null_mut(), &now) } == kick_signal() {}
    out
}
