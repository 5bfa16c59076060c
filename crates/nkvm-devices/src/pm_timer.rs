//! The ACPI power-management timer (ACPI 6.5, 4.8.3.3): a free-running
//! counter at 3.579545 MHz that a guest finds through the FADT's
//! `PM_TMR_BLK` (the port is the VMM's choice; QEMU's PIIX4 puts it at
//! 0x608). kvm-unit-tests' `vmexit` benchmark reads it in a loop
//! (`inl_from_pmtimer`), on every CPU at once.
//!
//! # Register
//!
//! | offset | access | meaning |
//! |---|---|---|
//! | 0-3 | R, 32 bits | `TMR_VAL`: ticks since the device was made (on from the count, after a restore), modulo 2^32 |
//!
//! The counter is 32 bits wide, so the VMM's FADT must set `TMR_VAL_EXT`
//! (bit 8 of `Flags`) to tell the guest. QEMU's timer is 24 bits
//! (`acpi_pm_tmr_get` masks with 0xffffff) and its FADT leaves the flag
//! clear; a guest that reads the flag copes with either.
//!
//! A byte or word read returns the lanes it covers (a word at offset 2 is
//! bits 16-31), as on hardware; QEMU returns the low bits whatever the
//! offset, and nothing relies on either. Writes are ignored (the register
//! is read-only, QEMU ignores them too) and logged, like empty accesses
//! and bytes past offset 3 (which read as `0xff`).
//!
//! # Time
//!
//! [`PmTimer::new`] counts from a host [`Instant`] (monotonic, so the count
//! never goes back; it keeps running while the VM is paused, where QEMU's
//! follows the VM's virtual clock). [`PmTimer::with_clock`] takes any
//! clock, for tests. A read costs one clock reading and integer
//! arithmetic: no allocation, no lock. The device is `Clone`, and clones
//! share the clock's origin, so each vCPU can own one and never contend.
//!
//! # Snapshot
//!
//! The saved state is the count ([`Snapshot`](crate::Snapshot)); a restore
//! makes the counter go on from that value on the restoring host's clock
//! (time between the save and the restore does not count, and the counter
//! never runs backwards, modulo its 32-bit wrap). Clones share the restored
//! count as they share the origin.
//!
//! Body (`acpi-pm-timer`), format version 1: u32 count, little-endian.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bad_access::BadAccessLog;
use crate::bus::IoDevice;

/// The timer's frequency in Hz (ACPI: 3.579545 MHz).
pub const PM_TIMER_HZ: u64 = 3_579_545;
/// Size of the timer's register block in ports (`PM_TMR_LEN`).
pub const PM_TIMER_SIZE: u64 = 4;

const NANOS_PER_SEC: u64 = 1_000_000_000;
const NAME: &str = "pm timer";

/// Where the timer's time comes from.
#[derive(Clone)]
enum Clock {
    /// Host monotonic time since the given instant.
    Host(Instant),
    /// Time since an arbitrary origin, from the caller.
    Injected(Arc<dyn Fn() -> Duration + Send + Sync>),
}

impl Clock {
    fn elapsed(&self) -> Duration {
        match self {
            Clock::Host(origin) => origin.elapsed(),
            Clock::Injected(clock) => clock(),
        }
    }
}

/// The ACPI PM timer; see the [module documentation](self).
#[derive(Clone)]
pub struct PmTimer {
    clock: Clock,
    /// Added to the clock's ticks (modulo 2^32): moves the count to the
    /// restored one. Shared by clones.
    adjust: Arc<AtomicU32>,
    bad: BadAccessLog,
}

impl fmt::Debug for PmTimer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = match self.clock {
            Clock::Host(_) => "host",
            Clock::Injected(_) => "injected",
        };
        f.debug_struct("PmTimer").field("clock", &source).field("count", &self.count()).finish_non_exhaustive()
    }
}

impl Default for PmTimer {
    fn default() -> Self {
        Self::new()
    }
}

impl PmTimer {
    /// A timer counting from now, on the host's monotonic clock.
    pub fn new() -> Self {
        Self { clock: Clock::Host(Instant::now()), adjust: Arc::default(), bad: BadAccessLog::default() }
    }

    /// A timer reading `clock`, the time elapsed since any fixed origin
    /// (the count is 0 where `clock` returns zero). `clock` should not go
    /// back; it is shared by the timer's clones, hence `Sync`.
    pub fn with_clock(clock: Box<dyn Fn() -> Duration + Send + Sync>) -> Self {
        Self { clock: Clock::Injected(Arc::from(clock)), adjust: Arc::default(), bad: BadAccessLog::default() }
    }

    /// The counter now: ticks of [`PM_TIMER_HZ`] since the origin, modulo
    /// 2^32.
    pub fn count(&self) -> u32 {
        ticks(self.clock.elapsed()).wrapping_add(self.adjust.load(Ordering::Relaxed))
    }

    /// Makes the counter read `count` now, and count on from there (for
    /// every clone).
    fn continue_from(&self, count: u32) {
        self.adjust.store(count.wrapping_sub(ticks(self.clock.elapsed())), Ordering::Relaxed);
    }
}

impl crate::Snapshot for PmTimer {
    fn snapshot_name(&self) -> &'static str {
        "acpi-pm-timer"
    }

    fn snapshot_version(&self) -> u16 {
        1
    }

    fn save_body(&self, out: &mut crate::snapshot::StateWriter) {
        out.u32(self.count());
    }

    fn load_body(&mut self, input: &mut crate::snapshot::StateReader<'_>) -> Result<(), crate::SnapshotError> {
        let count = input.u32("count")?;
        self.continue_from(count);
        Ok(())
    }
}

/// Whole ticks in `elapsed`, modulo 2^32. The sub-second part is below
/// 10^9 ns, so its product with the frequency (< 3.6 * 10^15) fits in u64.
fn ticks(elapsed: Duration) -> u32 {
    let whole = elapsed.as_secs().wrapping_mul(PM_TIMER_HZ);
    let fraction = u64::from(elapsed.subsec_nanos()) * PM_TIMER_HZ / NANOS_PER_SEC;
    whole.wrapping_add(fraction) as u32
}

impl IoDevice for PmTimer {
    fn save_state(&self) -> Option<Vec<u8>> {
        Some(crate::Snapshot::snapshot(self))
    }

    fn load_state(&mut self, state: &[u8]) -> Option<Result<(), String>> {
        Some(crate::Snapshot::restore(self, state).map_err(|e| e.to_string()))
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let lanes = self.count().to_le_bytes();
        let mut bad = data.is_empty();
        for (i, byte) in data.iter_mut().enumerate() {
            match offset.checked_add(i as u64).and_then(|lane| lanes.get(usize::try_from(lane).ok()?)) {
                Some(&lane) => *byte = lane,
                None => {
                    *byte = 0xff;
                    bad = true;
                }
            }
        }
        if bad {
            self.bad.read(NAME, offset, data.len());
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.bad.write(NAME, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// A timer whose clock reads the nanoseconds stored in the returned cell.
    fn timer_at(nanos: u64) -> (PmTimer, Arc<AtomicU64>) {
        let now = Arc::new(AtomicU64::new(nanos));
        let clock = now.clone();
        (PmTimer::with_clock(Box::new(move || Duration::from_nanos(clock.load(Ordering::Relaxed)))), now)
    }

    fn inl(timer: &mut PmTimer) -> u32 {
        let mut data = [0u8; 4];
        timer.read(0, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn counts_at_3_579545_mhz() {
        let (mut timer, now) = timer_at(0);
        assert_eq!(inl(&mut timer), 0);
        now.store(NANOS_PER_SEC, Ordering::Relaxed);
        assert_eq!(inl(&mut timer), 3_579_545);
        now.store(1_000, Ordering::Relaxed); // 1 µs: 3.58 ticks
        assert_eq!(inl(&mut timer), 3);
        now.store(279, Ordering::Relaxed); // just under one tick (279.37 ns)
        assert_eq!(inl(&mut timer), 0);
        now.store(280, Ordering::Relaxed);
        assert_eq!(inl(&mut timer), 1);
    }

    #[test]
    fn the_counter_wraps_at_32_bits() {
        // 2^32 ticks take 1199.86 s; 1200 s is 2^32 + 486_704 ticks.
        let (mut timer, _) = timer_at(1_200 * NANOS_PER_SEC);
        assert_eq!(inl(&mut timer), 486_704);
        let (timer, _) = timer_at(u64::MAX);
        let expected = ((u128::from(u64::MAX) * u128::from(PM_TIMER_HZ) / 1_000_000_000) as u64) as u32;
        assert_eq!(timer.count(), expected, "no overflow, even after centuries");
    }

    #[test]
    fn narrow_reads_return_their_lanes() {
        let value = 0x1234_5678u32;
        // The first nanosecond at which the count is `value`.
        let (mut timer, _) = timer_at((u64::from(value) * NANOS_PER_SEC).div_ceil(PM_TIMER_HZ));
        assert_eq!(inl(&mut timer), value);
        let mut word = [0u8; 2];
        timer.read(2, &mut word);
        assert_eq!(u16::from_le_bytes(word), 0x1234);
        timer.read(0, &mut word);
        assert_eq!(u16::from_le_bytes(word), 0x5678);
        let mut byte = [0u8];
        timer.read(1, &mut byte);
        assert_eq!(byte, [0x56]);
        timer.read(3, &mut byte);
        assert_eq!(byte, [0x12]);
    }

    #[test]
    fn writes_are_ignored() {
        let (mut timer, now) = timer_at(NANOS_PER_SEC);
        timer.write(0, &0u32.to_le_bytes());
        timer.write(0, &[0xff]);
        assert_eq!(inl(&mut timer), 3_579_545);
        now.store(2 * NANOS_PER_SEC, Ordering::Relaxed);
        assert_eq!(inl(&mut timer), 2 * 3_579_545);
    }

    #[test]
    fn bytes_past_the_register_read_all_ones() {
        let (mut timer, _) = timer_at(0);
        let mut data = [0xaa; 4];
        timer.read(2, &mut data);
        assert_eq!(data, [0, 0, 0xff, 0xff]);
        timer.read(PM_TIMER_SIZE, &mut data);
        assert_eq!(data, [0xff; 4]);
        timer.read(u64::MAX, &mut data);
        assert_eq!(data, [0xff; 4]);
        let mut wide = [0xaa; 8];
        timer.read(0, &mut wide);
        assert_eq!(wide, [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        timer.read(0, &mut []);
        timer.write(u64::MAX, &[]);
    }

    #[test]
    fn clones_share_the_origin() {
        let (timer, now) = timer_at(5 * NANOS_PER_SEC);
        let clone = timer.clone();
        now.store(6 * NANOS_PER_SEC, Ordering::Relaxed);
        assert_eq!(timer.count(), clone.count());
        assert_eq!(clone.count(), 6 * 3_579_545);
    }

    #[test]
    fn a_restored_timer_counts_on_from_the_saved_count() {
        use crate::Snapshot;
        let (timer, now) = timer_at(10 * NANOS_PER_SEC);
        let blob = timer.snapshot();
        // The restoring machine's clock is behind: the count must not go back.
        let (mut copy, later) = timer_at(NANOS_PER_SEC);
        let clone = copy.clone();
        copy.restore(&blob).unwrap();
        assert_eq!(inl(&mut copy), 10 * 3_579_545);
        later.store(2 * NANOS_PER_SEC, Ordering::Relaxed);
        assert_eq!(inl(&mut copy), 11 * 3_579_545);
        assert_eq!(clone.count(), 11 * 3_579_545, "clones share the restored count");
        // Near the wrap, it wraps as it did.
        now.store(1_199 * NANOS_PER_SEC, Ordering::Relaxed);
        copy.restore(&timer.snapshot()).unwrap();
        later.store(3 * NANOS_PER_SEC, Ordering::Relaxed);
        assert_eq!(inl(&mut copy), ticks(Duration::from_secs(1_200)));
        crate::snapshot::check::refuses_damage(&timer.snapshot(), || timer_at(0).0);
    }

    #[test]
    fn the_host_clock_moves_forward() {
        let mut timer = PmTimer::new();
        let first = inl(&mut timer);
        std::thread::sleep(Duration::from_millis(2));
        let second = inl(&mut timer);
        // 2 ms is 7159 ticks; allow for a slow, preempted test machine.
        let advanced = second.wrapping_sub(first);
        assert!((7_000..PM_TIMER_HZ as u32 * 60).contains(&advanced), "advanced {advanced}");
        assert!(format!("{timer:?}").contains("host"));
    }
}
