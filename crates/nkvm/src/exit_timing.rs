//! How long each thread spends in user space per exit: the TSC ticks
//! between one `KVM_RUN` returning and the next starting, summed per thread
//! (feature `exit-timing`, for the `exit_roundtrip` bench; off by default,
//! since it adds two `rdtsc` per exit).
//!
//! On a host whose exits cost several microseconds and drift by hundreds of
//! nanoseconds between rounds, timing whole round trips cannot resolve what
//! the few dozen nanoseconds of user-space work per exit cost; these
//! counters can, because they leave the kernel's share out.
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

/// Buckets of [`Gaps`]: 4 ticks wide, up to 4096 ticks.
const BUCKETS: usize = 1024;
const WIDTH: u64 = 4;

thread_local! {
    /// When this thread's last `KVM_RUN` returned (0: none since `take`).
    static LAST: Cell<u64> = const { Cell::new(0) };
    static GAPS: RefCell<Gaps> = const { RefCell::new(Gaps::new()) };
}

/// The lengths of a series of gaps, in TSC ticks: a histogram, so that its
/// median leaves out the few gaps an interrupt or a preemption stretched.
#[derive(Debug, Clone)]
pub struct Gaps {
    buckets: [u64; BUCKETS],
    /// Gaps of 4096 ticks or more.
    longer: u64,
    count: u64,
}

impl Gaps {
    /// No gaps.
    pub const fn new() -> Self {
        Self { buckets: [0; BUCKETS], longer: 0, count: 0 }
    }

    /// Adds one gap of `ticks`.
    #[inline(always)]
    pub fn record(&mut self, ticks: u64) {
        match self.buckets.get_mut((ticks / WIDTH) as usize) {
            Some(n) => *n += 1,
            None => self.longer += 1,
        }
        self.count += 1;
    }

    /// Adds `other`'s gaps.
    pub fn merge(&mut self, other: &Gaps) {
        self.buckets.iter_mut().zip(&other.buckets).for_each(|(a, b)| *a += b);
        self.longer += other.longer;
        self.count += other.count;
    }

    /// How many gaps.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The median gap in ticks (to the bucket's 4-tick width; `u64::MAX`
    /// if there were no gaps or half of them were 4096 ticks or more).
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

impl Default for Gaps {
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

/// Called just before `KVM_RUN`.
#[inline(always)]
pub(crate) fn entering() {
    let now = tsc();
    let last = LAST.with(Cell::get);
    if last != 0 {
        GAPS.with(|g| g.borrow_mut().record(now.wrapping_sub(last)));
    }
}

/// Called just after `KVM_RUN` returns.
#[inline(always)]
pub(crate) fn left() {
    LAST.with(|l| l.set(tsc()));
}
