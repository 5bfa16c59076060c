//! How long each thread spends in user space per exit: the TSC ticks
//! between one `KVM_RUN` returning and the next starting, summed per thread
//! (feature `exit-timing`, for the `exit_roundtrip` bench; off by default,
//! since it adds two `rdtsc` per exit). Beside them, the ticks each
//! `KVM_RUN` itself takes ([`take_kvm_run`]): the kernel's share.
//!
//! On a host whose exits cost several microseconds and drift by hundreds of
//! nanoseconds between rounds, timing whole round trips cannot resolve what
//! the few dozen nanoseconds of user-space work per exit cost; these
//! counters can, because they leave the kernel's share out. And the median
//! of every `KVM_RUN`, rather than a round's mean, shows whether the kernel
//! takes longer for one VM than for another.
//!
//! ```no_run
//! # fn f(vcpu: &mut nkvm::Vcpu, run: &mut nkvm::RunState) -> Result<(), nkvm::VcpuError> {
//! nkvm::exit_timing::take();
//! for _ in 0..1000 {
//!     vcpu.enter_guest(run)?;
//! }
//! let gaps = nkvm::exit_timing::take();
//! println!("median {} TSC ticks in user space per exit", gaps.median());
//! # Ok(()) }
//! ```

use std::cell::{Cell, RefCell};

thread_local! {
    /// When this thread's last `KVM_RUN` returned (0: none since `take`).
    static LAST: Cell<u64> = const { Cell::new(0) };
    /// When this thread's current `KVM_RUN` started.
    static ENTERED: Cell<u64> = const { Cell::new(0) };
    static GAPS: RefCell<Gaps> = const { RefCell::new(Gaps::new()) };
    static KVM_RUNS: RefCell<KvmRuns> = const { RefCell::new(KvmRuns::new()) };
}

/// The user-space gaps between `KVM_RUN`s: 4-tick buckets up to 4096 ticks.
pub type Gaps = Histogram<4, 1024>;

/// The `KVM_RUN` calls themselves: 8-tick buckets up to 65536 ticks (tens
/// of microseconds at this host's TSC rates).
pub type KvmRuns = Histogram<8, 8192>;

/// Lengths in TSC ticks, in `N` buckets `WIDTH` ticks wide: a histogram, so
/// that its median leaves out the few an interrupt or a preemption
/// stretched.
#[derive(Debug, Clone)]
pub struct Histogram<const WIDTH: u64, const N: usize> {
    buckets: [u64; N],
    /// Lengths of `WIDTH * N` ticks or more.
    longer: u64,
    count: u64,
}

impl<const WIDTH: u64, const N: usize> Histogram<WIDTH, N> {
    /// Nothing recorded.
    pub const fn new() -> Self {
        Self { buckets: [0; N], longer: 0, count: 0 }
    }

    /// Adds one length of `ticks`.
    #[inline(always)]
    pub fn record(&mut self, ticks: u64) {
        match self.buckets.get_mut((ticks / WIDTH) as usize) {
            Some(n) => *n += 1,
            None => self.longer += 1,
        }
        self.count += 1;
    }

    /// Adds `other`'s lengths.
    pub fn merge(&mut self, other: &Self) {
        self.buckets.iter_mut().zip(&other.buckets).for_each(|(a, b)| *a += b);
        self.longer += other.longer;
        self.count += other.count;
    }

    /// How many lengths.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The median in ticks (to the bucket's width; `u64::MAX` if nothing
    /// was recorded or half of it was `WIDTH * N` ticks or more).
    pub fn median(&self) -> u64 {
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen * 2 > self.count {
                return i as u64 * WIDTH + WIDTH / 2;
            }
        }
        u64::MAX
    }
}

impl<const WIDTH: u64, const N: usize> Default for Histogram<WIDTH, N> {
    fn default() -> Self {
        Self::new()
    }
}

/// The time-stamp counter.
#[inline(always)]
pub fn tsc() -> u64 {
    // SAFETY: `rdtsc` reads a counter; it touches no memory.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// This thread's gaps since the last call, each from a `KVM_RUN` returning
/// to the next one starting; the next `KVM_RUN` starts a new series.
pub fn take() -> Gaps {
    LAST.with(|l| l.set(0));
    GAPS.with(|g| std::mem::take(&mut *g.borrow_mut()))
}

/// This thread's `KVM_RUN` calls since the last call, each from its start
/// to its return.
pub fn take_kvm_run() -> KvmRuns {
    KVM_RUNS.with(|g| std::mem::take(&mut *g.borrow_mut()))
}

/// Called just before `KVM_RUN`.
#[inline(always)]
pub(crate) fn entering() {
    let now = tsc();
    let last = LAST.with(Cell::get);
    if last != 0 {
        GAPS.with(|g| g.borrow_mut().record(now.wrapping_sub(last)));
    }
    // Read last, so the bookkeeping above is not counted as the kernel's.
    ENTERED.with(|e| e.set(tsc()));
}

/// Called just after `KVM_RUN` returns.
#[inline(always)]
pub(crate) fn left() {
    let now = tsc();
    KVM_RUNS.with(|g| g.borrow_mut().record(now.wrapping_sub(ENTERED.with(Cell::get))));
    // Read after the bookkeeping, so that the user-space gap leaves it out.
    LAST.with(|l| l.set(tsc()));
}
