//! [`Kicker`]: make a vCPU leave the guest from another thread.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;

use crate::sys::kick::{current_ids, signal_thread, ThreadId};
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

/// Bit 0 of [`KickShared::state`]: the vCPU thread is inside `KVM_RUN` (or
/// about to enter it).
const IN_GUEST: u64 = 1;
/// One kicker that may be signalling the vCPU thread (the bits above bit 0
/// count them).
const SIGNALLER: u64 = 2;

/// The state a vCPU shares with its kickers, lock-free on the vCPU's side:
/// entering and leaving the guest are one atomic read-modify-write each.
/// Its fields fit one cache line, aligned to one: an exit touches them all,
/// and on this host each line touched after `KVM_RUN` returns is a miss.
#[derive(Debug)]
#[repr(align(64))]
pub(crate) struct KickShared {
    /// The vCPU's `kvm_run` mapping (owned here, so a kicker's write to
    /// `immediate_exit` can never outlive it).
    run: RunArea,
    /// `IN_GUEST` plus `SIGNALLER` times the kickers between deciding to
    /// signal and having signalled. Every change is a read-modify-write of
    /// this one word, so a kicker and a leaving vCPU always agree on who was
    /// first: either the kicker saw `IN_GUEST` clear (and sends nothing), or
    /// the vCPU saw the kicker counted (and waits for its signal to be sent
    /// before it may return — and its thread exit).
    state: AtomicU64,
    /// The vCPU thread while `IN_GUEST` is set (written before it is set).
    thread: AtomicU64,
    /// Set by a [`Kicker`]: the caller asked for the vCPU back. A kick
    /// without it is the VM pausing its vCPUs, which `enter_guest` absorbs.
    user: AtomicBool,
    /// Set by the EOI watch: the vCPU should look whether KVM holds an EOI
    /// back while it is halted (`eoi_watch`).
    poke: AtomicBool,
    /// The kernel thread id of the thread that last entered (0: none yet),
    /// for the EOI watch to see whether it sleeps in a halt.
    tid: AtomicI32,
    /// LINT0/LINT1 requests wait in the vCPU's `LintState`
    /// (`irq.rs`); checked at every entry.
    lints: AtomicBool,
}

impl KickShared {
    pub(crate) fn new(run: RunArea) -> Arc<Self> {
        Arc::new(Self {
            run,
            state: AtomicU64::new(0),
            thread: AtomicU64::new(0),
            user: AtomicBool::new(false),
            poke: AtomicBool::new(false),
            tid: AtomicI32::new(0),
            lints: AtomicBool::new(false),
        })
    }

    /// The vCPU's `kvm_run` mapping. Only code holding `&mut Vcpu` (the
    /// vCPU's own thread) may use it beyond `immediate_exit`: `RunArea`'s
    /// `Send`/`Sync` rest on that.
    pub(crate) fn run_area(&self) -> &RunArea {
        &self.run
    }

    /// Whether LINT requests wait to be delivered.
    pub(crate) fn lints_pending(&self) -> bool {
        self.lints.load(Ordering::SeqCst)
    }

    /// Records that LINT requests wait (after queueing them, before the
    /// kick that announces them).
    pub(crate) fn set_lints_pending(&self) {
        self.lints.store(true, Ordering::SeqCst);
    }

    /// Clears the LINT flag before the vCPU looks at its requests: one
    /// raised meanwhile sets it again, or is seen by that look.
    pub(crate) fn clear_lints_pending(&self) {
        self.lints.store(false, Ordering::SeqCst);
    }

    /// Marks the calling thread as inside `KVM_RUN`.
    pub(crate) fn enter(&self) {
        let (ThreadId(me), tid) = current_ids();
        // Two plain loads per entry; stores only when the vCPU moved to
        // another thread (both ids: glibc reuses a dead thread's handle).
        if self.thread.load(Ordering::Relaxed) != me || self.tid.load(Ordering::Relaxed) != tid {
            self.thread.store(me, Ordering::Relaxed);
            self.tid.store(tid, Ordering::Relaxed);
        }
        self.state.fetch_or(IN_GUEST, Ordering::SeqCst);
    }

    /// Marks the calling thread as out of `KVM_RUN`. A kick in flight is
    /// waited for, so no signal is ever sent to a thread that may have exited.
    pub(crate) fn leave(&self) {
        // Only this thread sets and clears IN_GUEST, and it is set: taking
        // 1 clears it and borrows nothing (one `lock xadd`, where a
        // `fetch_and` whose result is used is a compare-exchange loop).
        let before = self.state.fetch_sub(IN_GUEST, Ordering::SeqCst);
        if before >= SIGNALLER {
            self.wait_for_signallers();
        }
    }

    /// Rare: a kicker saw us inside and is signalling (a few µs).
    #[cold]
    fn wait_for_signallers(&self) {
        while self.state.load(Ordering::SeqCst) >= SIGNALLER {
            std::thread::yield_now();
        }
    }

    /// Whether the vCPU thread is inside (or entering) `KVM_RUN`.
    pub(crate) fn in_guest(&self) -> bool {
        self.state.load(Ordering::SeqCst) & IN_GUEST != 0
    }

    /// Whether a [`Kicker`]'s kick or a poke waits to be consumed (without
    /// consuming it).
    pub(crate) fn pending(&self) -> bool {
        self.user.load(Ordering::SeqCst) || self.poke.load(Ordering::SeqCst)
    }

    /// Consumes a pending kick; returns whether it came from a [`Kicker`].
    pub(crate) fn take(&self) -> bool {
        self.run.take_immediate_exit();
        self.user.swap(false, Ordering::SeqCst)
    }

    /// Pokes the vCPU if its thread sleeps in KVM's halt (its wchan is
    /// `kvm_vcpu_block` or `kvm_vcpu_halt`), or if that cannot be read; a
    /// vCPU running guest code is left alone: on this host a kicked entry
    /// can deliver the last injected interrupt a second time.
    pub(crate) fn poke_if_halted(&self) {
        let tid = self.tid.load(Ordering::Relaxed);
        if tid == 0 || !self.in_guest() {
            return;
        }
        let halted = match std::fs::read_to_string(format!("/proc/self/task/{tid}/wchan")) {
            Ok(wchan) => wchan.starts_with("kvm_vcpu_block") || wchan.starts_with("kvm_vcpu_halt"),
            Err(_) => true,
        };
        if halted {
            self.poke();
        }
    }

    /// Kicks the vCPU to look whether KVM holds an EOI back (`eoi_watch`).
    pub(crate) fn poke(&self) {
        self.poke.store(true, Ordering::SeqCst);
        self.kick();
    }

    /// Consumes a pending poke.
    pub(crate) fn take_poke(&self) -> bool {
        self.poke.swap(false, Ordering::SeqCst)
    }

    /// Forces the vCPU out of (or away from) `KVM_RUN`.
    pub(crate) fn kick(&self) {
        // First the flag a vCPU about to enter sees, then the signal for one
        // already inside.
        self.run.request_immediate_exit();
        let before = self.state.fetch_add(SIGNALLER, Ordering::SeqCst);
        if before & IN_GUEST != 0 {
            // `thread` was stored before IN_GUEST was set (we read it after
            // seeing the bit), and cannot change until this kicker is uncounted.
            let thread = ThreadId(self.thread.load(Ordering::Relaxed));
            if let Err(e) = signal_thread(thread) {
                log::warn!("cannot signal vCPU thread: {e}");
            }
        }
        self.state.fetch_sub(SIGNALLER, Ordering::SeqCst);
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
