//! One 8254 counter: its mode, access state, latches and count, computed
//! from PIT ticks (1.193182 MHz) elapsed since the count was loaded.

use crate::snapshot::{SnapshotError, StateReader, StateWriter};

/// Access mode 1: low byte only.
const ACCESS_LOW: u8 = 1;
/// Access mode 2: high byte only.
const ACCESS_HIGH: u8 = 2;
/// Access mode 3: low byte, then high byte.
const ACCESS_WORD: u8 = 3;

/// One counter; see the [module documentation](super).
#[derive(Debug, Clone)]
pub(super) struct Counter {
    mode: u8,
    access: u8,
    bcd: bool,
    /// The count being written, for the low-then-high access.
    pending_low: Option<u8>,
    /// The count in effect: 1-65536.
    reload: u64,
    /// When counting began (PIT ticks); `None` until a count is written.
    loaded_at: Option<u64>,
    gate: bool,
    /// A latched count and whether its high byte is next (word access).
    count_latch: Option<(u16, bool)>,
    status_latch: Option<u8>,
    /// Word access of the live count: the high byte is next.
    read_high_next: bool,
    /// A count was written and has not been loaded into the counter yet.
    null_count: bool,
}

impl Counter {
    /// A counter as at power-on; `gate` is its gate input level.
    pub(super) fn new(gate: bool) -> Self {
        Self {
            mode: 0,
            access: ACCESS_WORD,
            bcd: false,
            pending_low: None,
            reload: 0x1_0000,
            loaded_at: None,
            gate,
            count_latch: None,
            status_latch: None,
            read_high_next: false,
            null_count: true,
        }
    }

    /// The mode, with 6 and 7 read as 2 and 3.
    fn effective_mode(&self) -> u8 {
        if self.mode >= 6 {
            self.mode - 4
        } else {
            self.mode
        }
    }

    /// Ticks since the count was loaded, if it was.
    fn elapsed(&self, now: u64) -> Option<u64> {
        self.loaded_at.map(|at| now.saturating_sub(at))
    }

    /// The count a read would see now (16 bits; 65536 reads as 0).
    pub(super) fn count(&self, now: u64) -> u16 {
        let Some(d) = self.elapsed(now) else { return self.reload as u16 };
        let reload = self.reload;
        let value = match self.effective_mode() {
            2 => reload - d % reload,
            3 => reload - (2 * d) % reload,
            // One-shot modes: the count wraps on after terminal count.
            _ => reload.wrapping_sub(d) & 0xffff,
        };
        value as u16
    }

    /// The output level now.
    pub(super) fn output(&self, now: u64) -> bool {
        let Some(d) = self.elapsed(now) else {
            // Mode 0 holds its output low from the control word on; the
            // others hold it high until counting starts.
            return self.effective_mode() != 0;
        };
        let reload = self.reload;
        match self.effective_mode() {
            0 | 1 => d >= reload,
            2 => d % reload != reload - 1,
            3 => d % reload < reload.div_ceil(2),
            _ => d != reload,
        }
    }

    /// How many rising edges of the output (the ones an 8259 sees) have
    /// happened since the count was loaded.
    pub(super) fn rising_edges(&self, now: u64) -> u64 {
        let Some(d) = self.elapsed(now) else { return 0 };
        match self.effective_mode() {
            // Low for the last tick of each period, high again on reload.
            2 | 3 => d / self.reload,
            0 | 1 => u64::from(d >= self.reload),
            // Modes 4 and 5 pulse low for a tick at terminal count.
            _ => u64::from(d > self.reload),
        }
    }

    /// When (in PIT ticks) the next rising edge happens, if one will.
    pub(super) fn next_edge(&self, now: u64) -> Option<u64> {
        let at = self.loaded_at?;
        let d = now.saturating_sub(at);
        match self.effective_mode() {
            2 | 3 => Some(at + (d / self.reload + 1) * self.reload),
            0 | 1 => (d < self.reload).then_some(at + self.reload),
            _ => (d <= self.reload).then_some(at + self.reload + 1),
        }
    }

    /// A control word for this counter with access 1-3.
    pub(super) fn set_mode(&mut self, access: u8, mode: u8, bcd: bool) {
        if bcd {
            log::debug!("pit: BCD counting requested; counting in binary");
        }
        self.access = access;
        self.mode = mode;
        self.bcd = bcd;
        self.pending_low = None;
        self.count_latch = None;
        self.status_latch = None;
        self.read_high_next = false;
        self.loaded_at = None;
        self.null_count = true;
    }

    /// A byte written to the counter's port; whether it loaded a count (the
    /// low byte of a low/high pair does not).
    pub(super) fn write(&mut self, byte: u8, now: u64) -> bool {
        let count = match self.access {
            ACCESS_LOW => u16::from(byte),
            ACCESS_HIGH => u16::from(byte) << 8,
            _ => match self.pending_low.take() {
                None => {
                    self.pending_low = Some(byte);
                    return false;
                }
                Some(low) => u16::from(low) | (u16::from(byte) << 8),
            },
        };
        self.load(count, now);
        true
    }

    fn load(&mut self, count: u16, now: u64) {
        self.reload = if count == 0 { 0x1_0000 } else { u64::from(count) };
        self.null_count = false;
        // Modes 1 and 5 wait for a gate edge; the others start now (a
        // low gate only pauses modes 2 and 3 on real parts, not modelled).
        if !matches!(self.effective_mode(), 1 | 5) {
            self.loaded_at = Some(now);
        }
    }

    /// The counter-latch command: hold the count for the next reads.
    pub(super) fn latch(&mut self, now: u64) {
        if self.count_latch.is_none() {
            self.count_latch = Some((self.count(now), false));
        }
    }

    /// The read-back command's part for this counter.
    pub(super) fn read_back(&mut self, count: bool, status: bool, now: u64) {
        if status && self.status_latch.is_none() {
            let status = (u8::from(self.output(now)) << 7)
                | (u8::from(self.null_count) << 6)
                | (self.access << 4)
                | (self.mode << 1)
                | u8::from(self.bcd);
            self.status_latch = Some(status);
        }
        if count {
            self.latch(now);
        }
    }

    /// A byte read from the counter's port: a latched status first, then a
    /// latched count, else the live count.
    pub(super) fn read(&mut self, now: u64) -> u8 {
        if let Some(status) = self.status_latch.take() {
            return status;
        }
        if let Some((value, high_next)) = self.count_latch {
            return match self.access {
                ACCESS_LOW => {
                    self.count_latch = None;
                    value as u8
                }
                ACCESS_HIGH => {
                    self.count_latch = None;
                    (value >> 8) as u8
                }
                _ if high_next => {
                    self.count_latch = None;
                    (value >> 8) as u8
                }
                _ => {
                    self.count_latch = Some((value, true));
                    value as u8
                }
            };
        }
        let value = self.count(now);
        match self.access {
            ACCESS_LOW => value as u8,
            ACCESS_HIGH => (value >> 8) as u8,
            _ => {
                self.read_high_next = !self.read_high_next;
                if self.read_high_next {
                    value as u8
                } else {
                    (value >> 8) as u8
                }
            }
        }
    }

    /// The gate input; a rising edge (re)starts modes 1, 2, 3 and 5.
    pub(super) fn set_gate(&mut self, level: bool, now: u64) {
        if level && !self.gate && !self.null_count && matches!(self.effective_mode(), 1 | 2 | 3 | 5) {
            self.loaded_at = Some(now);
        }
        self.gate = level;
    }
}

/// An optional value in a blob: a presence byte, then the value (zero when absent).
fn save_option<T: Copy + Default>(out: &mut StateWriter, value: Option<T>, put: fn(&mut StateWriter, T)) {
    out.bool(value.is_some());
    put(out, value.unwrap_or_default());
}

impl Counter {
    /// Writes the counter's fields; `loaded_at` is on the PIT's time line.
    pub(super) fn save(&self, out: &mut StateWriter) {
        out.u8(self.mode);
        out.u8(self.access);
        out.bool(self.bcd);
        save_option(out, self.pending_low, StateWriter::u8);
        out.u32(self.reload as u32);
        save_option(out, self.loaded_at, StateWriter::u64);
        out.bool(self.gate);
        save_option(out, self.count_latch.map(|(v, _)| v), StateWriter::u16);
        out.bool(self.count_latch.is_some_and(|(_, high)| high));
        save_option(out, self.status_latch, StateWriter::u8);
        out.bool(self.read_high_next);
        out.bool(self.null_count);
    }

    /// Reads what [`save`](Self::save) wrote, checking every field; a count
    /// must have been loaded no later than `now`.
    pub(super) fn from_saved(input: &mut StateReader<'_>, now: u64) -> Result<Self, SnapshotError> {
        let at = input.offset();
        let mode = input.u8("mode")?;
        if mode > 7 {
            return Err(input.invalid("mode", mode.into(), at, "0-7"));
        }
        let at = input.offset();
        let access = input.u8("access")?;
        if !(ACCESS_LOW..=ACCESS_WORD).contains(&access) {
            return Err(input.invalid("access", access.into(), at, "1 (low), 2 (high) or 3 (word)"));
        }
        let bcd = input.bool("BCD")?;
        let pending_low = load_option(input, "pending low byte", StateReader::u8)?;
        let at = input.offset();
        let reload = u64::from(input.u32("reload")?);
        if !(1..=0x1_0000).contains(&reload) {
            return Err(input.invalid("reload", reload, at, "1-65536"));
        }
        let at = input.offset();
        let loaded_at = load_option(input, "loaded at", StateReader::u64)?;
        if let Some(t) = loaded_at.filter(|&t| t > now) {
            return Err(input.invalid("loaded at", t, at + 1, "no later than the saved time"));
        }
        let gate = input.bool("gate")?;
        let latched = load_option(input, "count latch", StateReader::u16)?;
        let high_next = input.bool("count latch high byte next")?;
        let status_latch = load_option(input, "status latch", StateReader::u8)?;
        let read_high_next = input.bool("read high byte next")?;
        let null_count = input.bool("null count")?;
        Ok(Self {
            mode,
            access,
            bcd,
            pending_low,
            reload,
            loaded_at,
            gate,
            count_latch: latched.map(|v| (v, high_next)),
            status_latch,
            read_high_next,
            null_count,
        })
    }
}

/// Reads what [`save_option`] wrote.
fn load_option<'a, T>(
    input: &mut StateReader<'a>,
    field: &'static str,
    get: fn(&mut StateReader<'a>, &'static str) -> Result<T, SnapshotError>,
) -> Result<Option<T>, SnapshotError> {
    let present = input.bool(field)?;
    let value = get(input, field)?;
    Ok(present.then_some(value))
}
