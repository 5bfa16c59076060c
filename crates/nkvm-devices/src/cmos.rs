//! The PC's MC146818 real-time clock and its 128 bytes of CMOS RAM, at
//! ports 0x70 (index) and 0x71 (data).
//!
//! # Ports
//!
//! | port | offset | access | meaning |
//! |---|---|---|---|
//! | 0x70 | 0 | W | bits 0-6: the CMOS byte 0x71 reads and writes; bit 7: NMI disable |
//! | 0x70 | 0 | R | 0xff, as in QEMU (the index is write-only) |
//! | 0x71 | 1 | RW | the selected CMOS byte |
//!
//! The NMI-disable bit is kept ([`Cmos::nmi_disabled`]) but has no effect:
//! QEMU drops it, and no model here raises NMIs. A wider access touches
//! both ports in turn, as QEMU's byte-wide implementation does.
//!
//! # CMOS bytes
//!
//! | index | name | meaning |
//! |---|---|---|
//! | 0x00, 0x02, 0x04 | seconds, minutes, hours | current time |
//! | 0x01, 0x03, 0x05 | alarm seconds, minutes, hours | the alarm time; 0xc0-0xff in a byte: don't care |
//! | 0x06 | day of week | 1-7, Sunday = 1 |
//! | 0x07, 0x08, 0x09 | day of month, month, year | current date; year modulo 100 |
//! | 0x0a | status A | bit 7 `UIP` (read-only), bits 0-6 divider and rate, default 0x26 |
//! | 0x0b | status B | bit 7 `SET`, bit 5 `AIE` (alarm interrupt enable), bit 2 `DM` (1 = binary), bit 1 `24H`; default 0x02 |
//! | 0x0c | status C | interrupt flags, read-only, cleared by a read: bit 5 `AF` (the alarm went off since the last read), bit 7 `IRQF` (`AF` with `AIE`) |
//! | 0x0d | status D | 0x80, `VRT` (RAM and time valid), read-only |
//! | 0x0f | shutdown status | plain storage; [`Cmos::shutdown_status`] for the VMM's reset path |
//! | 0x32 | century | current century (20 for 2026) |
//! | others | NVRAM | plain storage, zero at start |
//!
//! The time is the host's UTC time ([`Cmos::new`]) or any clock
//! ([`Cmos::with_clock`]), plus whatever offset the guest sets. Date and
//! time registers are BCD unless `DM` is set, and 24-hour unless `24H` is
//! clear (then hours are 1-12 with bit 7 for PM).
//!
//! Like QEMU and the chip: the clock runs unless `SET` is set or the
//! divider (status A bits 4-6) is above 010. While it is stopped, the date
//! and time registers hold what they held when it stopped, and writes to
//! them are kept as they are; when it runs again, they are the new time.
//! Writing one of them while the clock runs sets the time at once (the
//! other fields keep the current time). `UIP` reads as 1 in the last 244 µs
//! of each second, as in QEMU, so a guest waiting for an update cycle (the
//! suite's `s3.c` does) sees one.
//!
//! The alarm has no IRQ 8 output; it is a wake event: [`Cmos::alarm_in`]
//! says when it next goes off while `AIE` is set, and a sleeping VMM
//! (ACPI S3) wakes then, as the RTC alarm wakes a PC.
//!
//! The state saves and restores ([`Snapshot`](crate::Snapshot)); how the
//! guest's clock goes on after a restore is in the snapshot module's
//! documentation: it follows the host's UTC time with the guest's offset,
//! and never goes back.
//!
//! Not modelled: periodic and update-ended interrupts and their flags, the
//! alarm's IRQ 8 while running, QEMU's 0x37 alias of the century
//! byte, and the BIOS contents of NVRAM (memory sizes, equipment byte),
//! which nothing in kvm-unit-tests reads. Writes to status C and D, empty
//! accesses and bytes past port 0x71 are logged and ignored (reading
//! `0xff`).

use std::fmt;
use std::time::{Duration, SystemTime};

use crate::bad_access::BadAccessLog;
use crate::bus::IoDevice;

mod alarm;
mod calendar;
mod format;
mod snapshot;

use alarm::Alarm;

use calendar::DateTime;
use format::Format;

/// The index port; the data port is the next one.
pub const CMOS_PORT: u16 = 0x70;
/// Size of the device's region in ports.
pub const CMOS_SIZE: u64 = 2;
/// Number of CMOS bytes the index selects from.
pub const CMOS_BYTES: usize = 128;
/// CMOS index of the seconds register.
pub const RTC_SECONDS: u8 = 0x00;
/// CMOS index of the alarm seconds register.
pub const RTC_SECONDS_ALARM: u8 = 0x01;
/// CMOS index of the alarm minutes register.
pub const RTC_MINUTES_ALARM: u8 = 0x03;
/// CMOS index of the alarm hours register.
pub const RTC_HOURS_ALARM: u8 = 0x05;
/// CMOS index of the minutes register.
pub const RTC_MINUTES: u8 = 0x02;
/// CMOS index of the hours register.
pub const RTC_HOURS: u8 = 0x04;
/// CMOS index of the day-of-week register (1-7, Sunday = 1).
pub const RTC_DAY_OF_WEEK: u8 = 0x06;
/// CMOS index of the day-of-month register.
pub const RTC_DAY_OF_MONTH: u8 = 0x07;
/// CMOS index of the month register.
pub const RTC_MONTH: u8 = 0x08;
/// CMOS index of the year register (year modulo 100).
pub const RTC_YEAR: u8 = 0x09;
/// CMOS index of status register A.
pub const RTC_REG_A: u8 = 0x0a;
/// CMOS index of status register B.
pub const RTC_REG_B: u8 = 0x0b;
/// CMOS index of status register C.
pub const RTC_REG_C: u8 = 0x0c;
/// CMOS index of status register D.
pub const RTC_REG_D: u8 = 0x0d;
/// CMOS index of the shutdown status byte.
pub const CMOS_SHUTDOWN_STATUS: u8 = 0x0f;
/// CMOS index of the century register.
pub const RTC_CENTURY: u8 = 0x32;
/// Status A: update in progress (read-only).
pub const REG_A_UIP: u8 = 0x80;
/// Status A at start: 32.768 kHz time base (divider 010), 1024 Hz rate.
pub const REG_A_DEFAULT: u8 = 0x26;
/// Status B: stop the clock so the guest can set it.
pub const REG_B_SET: u8 = 0x80;
/// Status B: update-ended interrupt enable (cleared while `SET` is set).
pub const REG_B_UIE: u8 = 0x10;
/// Status B: alarm interrupt enable.
pub const REG_B_AIE: u8 = 0x20;
/// Status C: an enabled interrupt's flag is set.
pub const REG_C_IRQF: u8 = 0x80;
/// Status C: the alarm went off.
pub const REG_C_AF: u8 = 0x20;
/// An alarm byte matching any value (any of 0xc0-0xff).
pub const RTC_ALARM_DONT_CARE: u8 = 0xc0;
/// Status B: data mode binary (clear: BCD).
pub const REG_B_BINARY: u8 = 0x04;
/// Status B: 24-hour mode (clear: 12-hour).
pub const REG_B_24H: u8 = 0x02;
/// Status B at start: BCD, 24-hour, clock running.
pub const REG_B_DEFAULT: u8 = REG_B_24H;
/// Status D: valid RAM and time.
pub const REG_D_VRT: u8 = 0x80;

/// The date and time registers, in the order they are filled.
const TIME_REGISTERS: [u8; 8] =
    [RTC_SECONDS, RTC_MINUTES, RTC_HOURS, RTC_DAY_OF_WEEK, RTC_DAY_OF_MONTH, RTC_MONTH, RTC_YEAR, RTC_CENTURY];
/// Status A: the divider field; above 010 the clock is held.
const REG_A_DIVIDER: u8 = 0x70;
const DIVIDER_NORMAL: u8 = 0x20;
const NANOS_PER_SEC: u32 = 1_000_000_000;
/// How long before each second boundary `UIP` reads 1: 8 periods of the
/// 32.768 kHz time base, as in QEMU.
const UIP_HOLD_NANOS: u32 = 244_140;
const OFFSET_INDEX: u64 = 0;
const OFFSET_DATA: u64 = 1;
const NAME: &str = "cmos";

/// The RTC and CMOS RAM; see the [module documentation](self).
pub struct Cmos {
    index: u8,
    nmi_disabled: bool,
    bytes: [u8; CMOS_BYTES],
    /// Time since the UNIX epoch, from the host or a test.
    clock: Box<dyn Fn() -> Duration + Send>,
    /// The guest's time minus the clock's, in seconds.
    offset: i64,
    /// Guest time (seconds) of the last read of status C: the alarm flag
    /// covers the seconds after it.
    flags_since: i64,
    bad: BadAccessLog,
}

impl fmt::Debug for Cmos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cmos")
            .field("index", &self.index)
            .field("nmi_disabled", &self.nmi_disabled)
            .field("status_a", &self.bytes[usize::from(RTC_REG_A)])
            .field("status_b", &self.bytes[usize::from(RTC_REG_B)])
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new()
    }
}

impl Cmos {
    /// An RTC showing the host's UTC time, NVRAM zeroed.
    pub fn new() -> Self {
        Self::with_clock(Box::new(|| SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default()))
    }

    /// An RTC whose time comes from `clock`: the time since the UNIX
    /// epoch (1970-01-01 00:00:00 UTC).
    pub fn with_clock(clock: Box<dyn Fn() -> Duration + Send>) -> Self {
        let mut bytes = [0u8; CMOS_BYTES];
        bytes[usize::from(RTC_REG_A)] = REG_A_DEFAULT;
        bytes[usize::from(RTC_REG_B)] = REG_B_DEFAULT;
        bytes[usize::from(RTC_REG_D)] = REG_D_VRT;
        let mut cmos = Self {
            index: 0,
            nmi_disabled: false,
            bytes,
            clock,
            offset: 0,
            flags_since: 0,
            bad: BadAccessLog::default(),
        };
        cmos.flags_since = cmos.guest_now().0;
        cmos
    }

    /// How long until the alarm goes off, while `AIE` is set and the clock
    /// runs: zero if it went off since status C was last read. `None`
    /// when it cannot go off (interrupt disabled, clock held, an alarm
    /// byte out of range).
    pub fn alarm_in(&self) -> Option<Duration> {
        if self.byte(RTC_REG_B) & REG_B_AIE == 0 || !self.running() {
            return None;
        }
        if self.latched_alarm() {
            return Some(Duration::ZERO);
        }
        let at = self.alarm().next_after(self.flags_since)?;
        let (seconds, nanos) = self.guest_now();
        if at <= seconds {
            return Some(Duration::ZERO);
        }
        let whole = Duration::from_secs(u64::try_from(at.saturating_sub(seconds)).unwrap_or(u64::MAX));
        Some(whole.saturating_sub(Duration::from_nanos(u64::from(nanos))))
    }

    fn alarm(&self) -> Alarm {
        Alarm {
            second: self.byte(RTC_SECONDS_ALARM),
            minute: self.byte(RTC_MINUTES_ALARM),
            hour: self.byte(RTC_HOURS_ALARM),
            format: Format(self.byte(RTC_REG_B)),
        }
    }

    /// Status C: the alarm flag for the seconds since the last read, which
    /// this read clears.
    fn read_flags(&mut self) -> u8 {
        let now = self.guest_now().0;
        let went_off = self.latched_alarm() || (self.running() && self.alarm().went_off(self.flags_since, now));
        self.flags_since = now;
        self.bytes[usize::from(RTC_REG_C)] &= !REG_C_AF;
        match (went_off, self.byte(RTC_REG_B) & REG_B_AIE != 0) {
            (false, _) => 0,
            (true, false) => REG_C_AF,
            (true, true) => REG_C_AF | REG_C_IRQF,
        }
    }

    /// Whether the alarm went off in a window a clock change or stop
    /// closed before status C was read. Kept in status C's own byte (which
    /// reads are computed from, and guests cannot write), so it travels
    /// with the CMOS bytes in a snapshot.
    fn latched_alarm(&self) -> bool {
        self.byte(RTC_REG_C) & REG_C_AF != 0
    }

    /// The guest time jumps or stops: the alarm flag's window so far is
    /// closed (its alarm, if it went off, kept for the next status C read),
    /// and the next one starts at `reopen` (called after the change).
    fn close_alarm_window(&mut self) {
        let now = self.guest_now().0;
        if self.running() && self.alarm().went_off(self.flags_since, now) {
            self.bytes[usize::from(RTC_REG_C)] |= REG_C_AF;
        }
    }

    /// Whether the guest last wrote the index port with bit 7 (NMI
    /// disable) set.
    pub fn nmi_disabled(&self) -> bool {
        self.nmi_disabled
    }

    /// The shutdown status byte (CMOS 0x0f), which a BIOS reads after a
    /// reset to decide where to resume.
    pub fn shutdown_status(&self) -> u8 {
        self.bytes[usize::from(CMOS_SHUTDOWN_STATUS)]
    }

    fn byte(&self, index: u8) -> u8 {
        self.bytes[usize::from(index)]
    }

    fn running(&self) -> bool {
        self.byte(RTC_REG_B) & REG_B_SET == 0 && self.byte(RTC_REG_A) & REG_A_DIVIDER <= DIVIDER_NORMAL
    }

    /// The guest's time: whole seconds since the epoch and the nanoseconds
    /// into the current second.
    fn guest_now(&self) -> (i64, u32) {
        let now = (self.clock)();
        let seconds = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        (seconds.saturating_add(self.offset), now.subsec_nanos())
    }

    /// Fill the date and time registers with the guest's time, in the
    /// format status B selects.
    fn latch_time(&mut self) {
        let now = DateTime::from_unix(self.guest_now().0);
        let format = Format(self.byte(RTC_REG_B));
        let values = [
            format.encode(now.second),
            format.encode(now.minute),
            format.encode_hour(now.hour),
            format.encode(now.weekday + 1),
            format.encode(now.day),
            format.encode(now.month),
            format.encode(now.year.rem_euclid(100) as u8),
            format.encode(now.year.div_euclid(100).rem_euclid(100) as u8),
        ];
        for (index, value) in TIME_REGISTERS.into_iter().zip(values) {
            self.bytes[usize::from(index)] = value;
        }
    }

    /// Make the date and time registers, read in `format`, the guest's
    /// time from now on.
    fn set_time_from_registers(&mut self, format: Format) {
        let year =
            i64::from(format.decode(self.byte(RTC_CENTURY))) * 100 + i64::from(format.decode(self.byte(RTC_YEAR)));
        let set = DateTime {
            year,
            month: format.decode(self.byte(RTC_MONTH)),
            day: format.decode(self.byte(RTC_DAY_OF_MONTH)),
            hour: format.decode_hour(self.byte(RTC_HOURS)),
            minute: format.decode(self.byte(RTC_MINUTES)),
            second: format.decode(self.byte(RTC_SECONDS)),
            weekday: 0,
        };
        let host = self.guest_now().0.saturating_sub(self.offset);
        self.offset = set.to_unix().saturating_sub(host);
        // The seconds the clock jumped over (or back to) were never lived.
        self.flags_since = self.guest_now().0;
    }

    fn update_in_progress(&self) -> bool {
        self.running() && self.guest_now().1 >= NANOS_PER_SEC - UIP_HOLD_NANOS
    }

    fn read_data(&mut self) -> u8 {
        let index = self.index;
        match index {
            _ if TIME_REGISTERS.contains(&index) => {
                if self.running() {
                    self.latch_time();
                }
                self.byte(index)
            }
            RTC_REG_A if self.update_in_progress() => self.byte(index) | REG_A_UIP,
            RTC_REG_C => self.read_flags(),
            RTC_REG_D => REG_D_VRT,
            _ => self.byte(index),
        }
    }

    fn write_data(&mut self, value: u8) {
        let index = self.index;
        match index {
            _ if TIME_REGISTERS.contains(&index) => {
                let running = self.running();
                if running {
                    self.close_alarm_window();
                    self.latch_time();
                }
                self.bytes[usize::from(index)] = value;
                if running {
                    self.set_time_from_registers(Format(self.byte(RTC_REG_B)));
                }
            }
            RTC_REG_A => self.write_status(index, value & !REG_A_UIP),
            RTC_REG_B if value & REG_B_SET != 0 => self.write_status(index, value & !REG_B_UIE),
            RTC_REG_B => self.write_status(index, value),
            RTC_REG_C | RTC_REG_D => {
                self.bad.log(NAME, format_args!("write {value:#x} to read-only status register {index:#x}"))
            }
            _ => self.bytes[usize::from(index)] = value,
        }
    }

    /// Write status A or B, stopping or restarting the clock as the new
    /// value says. Registers latched before a stop are in the old format,
    /// and the time is read back in the format in force while stopped.
    fn write_status(&mut self, index: u8, value: u8) {
        let was_running = self.running();
        let old_format = Format(self.byte(RTC_REG_B));
        if was_running {
            self.close_alarm_window();
            self.latch_time();
        }
        self.bytes[usize::from(index)] = value;
        if !was_running && self.running() {
            self.set_time_from_registers(old_format);
        }
    }

    fn read_port(&mut self, port: Option<u64>) -> Option<u8> {
        match port? {
            OFFSET_INDEX => Some(0xff),
            OFFSET_DATA => Some(self.read_data()),
            _ => None,
        }
    }

    fn write_port(&mut self, port: Option<u64>, value: u8) -> bool {
        match port {
            Some(OFFSET_INDEX) => {
                self.index = value & 0x7f;
                self.nmi_disabled = value & 0x80 != 0;
            }
            Some(OFFSET_DATA) => self.write_data(value),
            _ => return false,
        }
        true
    }
}

impl IoDevice for Cmos {
    fn save_state(&self) -> Option<Vec<u8>> {
        Some(crate::Snapshot::snapshot(self))
    }

    fn load_state(&mut self, state: &[u8]) -> Option<Result<(), String>> {
        Some(crate::Snapshot::restore(self, state).map_err(|e| e.to_string()))
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut bad = data.is_empty();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.read_port(offset.checked_add(i as u64)).unwrap_or_else(|| {
                bad = true;
                0xff
            });
        }
        if bad {
            self.bad.read(NAME, offset, data.len());
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut bad = data.is_empty();
        for (i, &byte) in data.iter().enumerate() {
            bad |= !self.write_port(offset.checked_add(i as u64), byte);
        }
        if bad {
            self.bad.write(NAME, offset, data);
        }
    }
}

#[cfg(test)]
mod tests;
