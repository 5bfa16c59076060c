//! The PC's Intel 8254 programmable interval timer (PIT) at ports
//! 0x40-0x43, and the PC speaker port 0x61 bits that belong to it.
//!
//! # Ports
//!
//! | port | window, offset | access | meaning |
//! |---|---|---|---|
//! | 0x40-0x42 | [`PitWindow::Counters`], 0-2 | RW | counter 0-2: write the initial count, read the count (or a latch) |
//! | 0x43 | [`PitWindow::Counters`], 3 | W | control word: mode, access, counter latch, read-back |
//! | 0x61 | [`PitWindow::Speaker`], 0 | RW | bit 0 counter 2 gate, bit 1 speaker data (kept), bit 4 refresh toggle (R), bit 5 counter 2 output (R) |
//!
//! The counters run at [`PIT_HZ`] (1.193182 MHz) from the clock the model is
//! given ([`Pit::new`]: the host's monotonic clock, or any clock with
//! [`Pit::with_clock`]); counts are computed from the time elapsed since the
//! count was loaded, as QEMU's `i8254` does, so no tick is simulated.
//!
//! Modes: 0 (interrupt on terminal count), 1 and 5 (retriggered by a rising
//! gate), 2 (rate generator), 3 (square wave), 4 (software strobe); 6 and 7
//! are 2 and 3. Access modes: low byte, high byte, low then high. The
//! counter latch and the read-back command (count and status) work; BCD
//! counting is recorded in the status but the count is always binary.
//!
//! # Interrupt
//!
//! Counter 0's output drives IRQ 0 ([`IrqLine`], an edge per rising output:
//! a pulse, as the 8259 only needs the edge). The model owns no thread:
//! whoever runs it calls [`Pit::poll`] at the times it returns (the VMM's
//! timer thread does); edges missed between two polls are coalesced into
//! one, as a late timer interrupt is on a PC.
//!
//! The bare [`Pit`] is the counters' window as an [`IoDevice`] (what
//! `nkvm device --model pit` serves); [`SharedPit`] gives both windows and
//! the poller one model.
//!
//! The state saves and restores ([`Snapshot`](crate::Snapshot)): each
//! counter's mode, access state, latches, reload, gate and the time its
//! count was loaded, the port 0x61 bits and the edges already raised. The
//! restored PIT's time line goes on from the saved instant on the
//! restoring host's clock, so every counter counts on from the count it had
//! (time between the save and the restore does not count). The poller must
//! [`poll`](Pit::poll) again after a restore: the next edge is the
//! restored counter's.
//!
//! Not modelled: counter 1's DRAM refresh (its count runs, nothing listens),
//! the speaker sound, BCD counting.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::bus::{IoDevice, IrqLine};

mod counter;
mod snapshot;

use counter::Counter;

/// The first counter's port; the counters and the control port take 4.
pub const PIT_PORT: u16 = 0x40;
/// Size of the counters' region in ports.
pub const PIT_SIZE: u64 = 4;
/// The speaker / NMI status port (port B of the old 8255).
pub const SPEAKER_PORT: u16 = 0x61;
/// Size of the speaker port's region.
pub const SPEAKER_SIZE: u64 = 1;
/// The counters' input clock in Hz.
pub const PIT_HZ: u64 = 1_193_182;
/// The ISA IRQ counter 0 drives.
pub const PIT_IRQ: usize = 0;
/// Port 0x61: counter 2 gate.
pub const SPEAKER_GATE2: u8 = 1 << 0;
/// Port 0x61: speaker data enable (stored, no sound).
pub const SPEAKER_DATA: u8 = 1 << 1;
/// Port 0x61: the DRAM refresh toggle (read-only, flips every 15.085 µs).
pub const SPEAKER_REFRESH: u8 = 1 << 4;
/// Port 0x61: counter 2's output (read-only).
pub const SPEAKER_OUT2: u8 = 1 << 5;

const CONTROL_OFFSET: u64 = 3;
const REFRESH_NANOS: u128 = 15_085;
const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Which register window an access goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PitWindow {
    /// Counters 0-2 (offsets 0-2) and the control word (offset 3).
    Counters,
    /// The speaker port 0x61 (offset 0).
    Speaker,
}

/// The 8254 and its speaker-port bits; see the [module documentation](self).
pub struct Pit {
    counters: [Counter; 3],
    speaker: u8,
    clock: Box<dyn Fn() -> Duration + Send>,
    irq: Box<dyn IrqLine>,
    /// Counter 0's output edges already signalled since its last load.
    edges_signalled: u64,
    /// Added to the clock's ticks (wrapping): a restore sets it so the
    /// PIT's time line goes on from the saved instant.
    base: u64,
}

impl fmt::Debug for Pit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pit")
            .field("counters", &self.counters)
            .field("speaker", &self.speaker)
            .field("edges_signalled", &self.edges_signalled)
            .finish_non_exhaustive()
    }
}

impl Pit {
    /// A PIT as at power-on (no counter loaded), counting on the host's
    /// monotonic clock, counter 0 driving `irq`.
    pub fn new(irq: Box<dyn IrqLine>) -> Self {
        let start = Instant::now();
        Self::with_clock(irq, Box::new(move || start.elapsed()))
    }

    /// Like [`Pit::new`], with time read from `clock` (any monotonic
    /// origin).
    pub fn with_clock(irq: Box<dyn IrqLine>, clock: Box<dyn Fn() -> Duration + Send>) -> Self {
        Self {
            counters: [Counter::new(true), Counter::new(true), Counter::new(false)],
            speaker: 0,
            clock,
            irq,
            edges_signalled: 0,
            base: 0,
        }
    }

    /// Now, in PIT ticks on the model's time line.
    fn now_ticks(&self) -> u64 {
        nanos_to_ticks((self.clock)()).wrapping_add(self.base)
    }

    /// The shortest wait [`poll`](Self::poll) asks for.
    pub const MIN_POLL: Duration = Duration::from_micros(200);

    /// Signals counter 0's output edges that have passed (at most one pulse
    /// on IRQ 0) and returns how long until the next one, or `None` when
    /// counter 0 will raise no more (not loaded, or a one-shot mode that
    /// has fired). Call it again at that time, and after every write.
    pub fn poll(&mut self) -> Option<Duration> {
        let now = self.now_ticks();
        let counter = &self.counters[0];
        let edges = counter.rising_edges(now);
        if edges > self.edges_signalled {
            self.edges_signalled = edges;
            self.irq.pulse();
        }
        let next = counter.next_edge(now)?;
        // No sooner than MIN_POLL: a guest loading a count of 1 would wake
        // the caller a million times a second (edges in between are
        // merged into one pulse, as KVM's in-kernel PIT does below its
        // 200 µs minimum period).
        Some(ticks_to_duration(next.saturating_sub(now)).max(Self::MIN_POLL))
    }

    /// Loads counter `index` as the guest would: `mode` (0-5) with the
    /// low/high access and `count` (0 means 65536). What firmware does
    /// before a kernel runs (e.g. counter 0 in mode 3 with count 0: 18.2 Hz).
    pub fn program(&mut self, index: usize, mode: u8, count: u16) {
        let Some(port) = (index < 3).then_some(index as u64) else { return };
        let control = ((index as u8) << 6) | (3 << 4) | ((mode & 7) << 1);
        self.write(CONTROL_OFFSET, &[control]);
        self.write(port, &[count as u8]);
        self.write(port, &[(count >> 8) as u8]);
    }

    fn write_control(&mut self, value: u8, now: u64) {
        let select = value >> 6;
        if select == 3 {
            // Read-back: bit 5 clear latches counts, bit 4 clear latches status.
            for (i, counter) in self.counters.iter_mut().enumerate() {
                if value & (2 << i) != 0 {
                    counter.read_back(value & 0x20 == 0, value & 0x10 == 0, now);
                }
            }
            return;
        }
        let counter = &mut self.counters[usize::from(select)];
        let access = (value >> 4) & 3;
        if access == 0 {
            counter.latch(now);
        } else {
            counter.set_mode(access, (value >> 1) & 7, value & 1 != 0);
            if select == 0 {
                self.edges_signalled = 0;
            }
        }
    }

    fn read_speaker(&self, now: u64) -> u8 {
        let refresh = ((self.clock)().as_nanos() / REFRESH_NANOS) & 1 != 0;
        let out2 = self.counters[2].output(now);
        (self.speaker & (SPEAKER_GATE2 | SPEAKER_DATA))
            | if refresh { SPEAKER_REFRESH } else { 0 }
            | if out2 { SPEAKER_OUT2 } else { 0 }
    }

    fn write_speaker(&mut self, value: u8, now: u64) {
        self.speaker = value & (SPEAKER_GATE2 | SPEAKER_DATA);
        self.counters[2].set_gate(value & SPEAKER_GATE2 != 0, now);
    }

    /// A read in `window` (one byte at a time; wider reads repeat it).
    fn read_window(&mut self, window: PitWindow, offset: u64, data: &mut [u8]) {
        let now = self.now_ticks();
        for byte in data.iter_mut() {
            *byte = match (window, offset) {
                (PitWindow::Counters, 0..=2) => self.counters[offset as usize].read(now),
                (PitWindow::Speaker, 0) => self.read_speaker(now),
                _ => 0xff,
            };
        }
    }

    fn write_window(&mut self, window: PitWindow, offset: u64, data: &[u8]) {
        let now = self.now_ticks();
        for &byte in data {
            match (window, offset) {
                (PitWindow::Counters, 0..=2) => {
                    // Only a count actually loaded starts counting edges
                    // anew (the old count runs on until the high byte).
                    if self.counters[offset as usize].write(byte, now) && offset == 0 {
                        self.edges_signalled = 0;
                    }
                }
                (PitWindow::Counters, CONTROL_OFFSET) => self.write_control(byte, now),
                (PitWindow::Speaker, 0) => self.write_speaker(byte, now),
                _ => log::debug!("pit: ignored write of {byte:#x} at {window:?}+{offset}"),
            }
        }
    }
}

/// The counters' window (ports 0x40-0x43) of a bare [`Pit`].
impl IoDevice for Pit {
    fn save_state(&self) -> Option<Vec<u8>> {
        Some(crate::Snapshot::snapshot(self))
    }

    fn load_state(&mut self, state: &[u8]) -> Option<Result<(), String>> {
        Some(crate::Snapshot::restore(self, state).map_err(|e| e.to_string()))
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.read_window(PitWindow::Counters, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.write_window(PitWindow::Counters, offset, data);
    }
}

fn nanos_to_ticks(t: Duration) -> u64 {
    (t.as_nanos() * u128::from(PIT_HZ) / NANOS_PER_SEC) as u64
}

fn ticks_to_duration(ticks: u64) -> Duration {
    // Round up, so a poll at that time finds the edge passed.
    let nanos = (u128::from(ticks) * NANOS_PER_SEC).div_ceil(u128::from(PIT_HZ));
    Duration::from_nanos(nanos as u64)
}

/// A [`Pit`] shared by its two windows and the thread that polls it.
#[derive(Debug, Clone)]
pub struct SharedPit(Arc<Mutex<Pit>>);

impl SharedPit {
    /// Shares `pit`.
    pub fn new(pit: Pit) -> Self {
        Self(Arc::new(Mutex::new(pit)))
    }

    /// Locks the model (a poisoned lock is taken over: the model's state
    /// is always consistent between accesses).
    pub fn lock(&self) -> MutexGuard<'_, Pit> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device for one window; `on_write` runs after each write to it
    /// (the VMM's timer thread wants to poll again).
    pub fn port(&self, window: PitWindow, on_write: Box<dyn Fn() + Send>) -> PitPort {
        PitPort { pit: self.clone(), window, on_write }
    }
}

/// One window of a [`SharedPit`], as an [`IoDevice`].
pub struct PitPort {
    pit: SharedPit,
    window: PitWindow,
    on_write: Box<dyn Fn() + Send>,
}

impl fmt::Debug for PitPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PitPort").field("window", &self.window).finish_non_exhaustive()
    }
}

impl IoDevice for PitPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.pit.lock().read_window(self.window, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.pit.lock().write_window(self.window, offset, data);
        (self.on_write)();
    }
}

#[cfg(test)]
mod tests;
