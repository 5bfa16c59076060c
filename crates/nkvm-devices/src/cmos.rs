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
//! | 0x01, 0x03, 0x05 | alarm seconds, minutes, hours | plain storage (no alarm interrupt) |
//! | 0x06 | day of week | 1-7, Sunday = 1 |
//! | 0x07, 0x08, 0x09 | day of month, month, year | current date; year modulo 100 |
//! | 0x0a | status A | bit 7 `UIP` (read-only), bits 0-6 divider and rate, default 0x26 |
//! | 0x0b | status B | bit 7 `SET`, bit 2 `DM` (1 = binary), bit 1 `24H`; default 0x02 |
//! | 0x0c | status C | interrupt flags: always 0, read-only |
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
//! Not modelled: periodic, alarm and update-ended interrupts (there is no
//! IRQ 8 output; status C stays 0), QEMU's 0x37 alias of the century
//! byte, and the BIOS contents of NVRAM (memory sizes, equipment byte),
//! which nothing in kvm-unit-tests reads. Writes to status C and D, empty
//! accesses and bytes past port 0x71 are logged and ignored (reading
//! `0xff`).

use std::fmt;
use std::time::{Duration, SystemTime};

use crate::bad_access::BadAccessLog;
use crate::bus::IoDevice;

mod calendar;
mod format;

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
        Self { index: 0, nmi_disabled: false, bytes, clock, offset: 0, bad: BadAccessLog::default() }
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
            RTC_REG_C => 0,
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
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use super::*;

    /// 2026-06-26 13:45:07 UTC, a Friday.
    const FRIDAY_AFTERNOON: u64 = 1_782_481_507;
    const SECOND: u64 = NANOS_PER_SEC as u64;

    /// An RTC whose clock reads the nanoseconds since the epoch in the cell.
    fn cmos_at(seconds: u64) -> (Cmos, Arc<AtomicU64>) {
        let now = Arc::new(AtomicU64::new(seconds * SECOND));
        let clock = now.clone();
        (Cmos::with_clock(Box::new(move || Duration::from_nanos(clock.load(Ordering::Relaxed)))), now)
    }

    fn rtc_in(cmos: &mut Cmos, index: u8) -> u8 {
        cmos.write(0, &[index]);
        let mut byte = [0u8];
        cmos.read(1, &mut byte);
        byte[0]
    }

    fn rtc_out(cmos: &mut Cmos, index: u8, value: u8) {
        cmos.write(0, &[index]);
        cmos.write(1, &[value]);
    }

    fn date_and_time(cmos: &mut Cmos) -> [u8; 8] {
        TIME_REGISTERS.map(|index| rtc_in(cmos, index))
    }

    #[test]
    fn reads_the_clock_in_bcd_24_hour() {
        let (mut cmos, _) = cmos_at(FRIDAY_AFTERNOON);
        // seconds, minutes, hours, weekday (Friday = 6), day, month, year, century
        assert_eq!(date_and_time(&mut cmos), [0x07, 0x45, 0x13, 0x06, 0x26, 0x06, 0x26, 0x20]);
    }

    #[test]
    fn binary_mode_when_status_b_says_so() {
        let (mut cmos, _) = cmos_at(FRIDAY_AFTERNOON);
        rtc_out(&mut cmos, RTC_REG_B, REG_B_24H | REG_B_BINARY);
        assert_eq!(date_and_time(&mut cmos), [7, 45, 13, 6, 26, 6, 26, 20]);
    }

    #[test]
    fn twelve_hour_mode_marks_pm_and_shows_midnight_as_12() {
        let (mut cmos, now) = cmos_at(FRIDAY_AFTERNOON);
        rtc_out(&mut cmos, RTC_REG_B, 0);
        assert_eq!(rtc_in(&mut cmos, RTC_HOURS), 0x81, "1 PM, BCD");
        rtc_out(&mut cmos, RTC_REG_B, REG_B_BINARY);
        assert_eq!(rtc_in(&mut cmos, RTC_HOURS), 0x81, "1 PM, binary");
        now.store(1_782_433_800 * SECOND, Ordering::Relaxed); // 00:30 the same day
        assert_eq!(rtc_in(&mut cmos, RTC_HOURS), 12, "12 AM");
        now.store((1_782_433_800 + 12 * 3600) * SECOND, Ordering::Relaxed);
        assert_eq!(rtc_in(&mut cmos, RTC_HOURS), 0x80 | 12, "12 PM");
    }

    #[test]
    fn the_time_follows_the_clock() {
        let (mut cmos, now) = cmos_at(FRIDAY_AFTERNOON);
        now.store((FRIDAY_AFTERNOON + 24 * 3600 + 53) * SECOND, Ordering::Relaxed);
        assert_eq!(date_and_time(&mut cmos), [0x00, 0x46, 0x13, 0x07, 0x27, 0x06, 0x26, 0x20]);
    }

    #[test]
    fn status_registers_start_as_on_a_pc() {
        let (mut cmos, _) = cmos_at(FRIDAY_AFTERNOON);
        assert_eq!(rtc_in(&mut cmos, RTC_REG_A), REG_A_DEFAULT);
        assert_eq!(rtc_in(&mut cmos, RTC_REG_B), 0x02);
        assert_eq!(rtc_in(&mut cmos, RTC_REG_C), 0);
        assert_eq!(rtc_in(&mut cmos, RTC_REG_D), 0x80);
    }

    #[test]
    fn uip_is_set_in_the_last_244_us_of_each_second() {
        let (mut cmos, now) = cmos_at(FRIDAY_AFTERNOON);
        let start = FRIDAY_AFTERNOON * SECOND;
        now.store(start + u64::from(NANOS_PER_SEC - UIP_HOLD_NANOS) - 1, Ordering::Relaxed);
        assert_eq!(rtc_in(&mut cmos, RTC_REG_A), REG_A_DEFAULT);
        now.store(start + u64::from(NANOS_PER_SEC - UIP_HOLD_NANOS), Ordering::Relaxed);
        assert_eq!(rtc_in(&mut cmos, RTC_REG_A), REG_A_DEFAULT | REG_A_UIP);
        rtc_out(&mut cmos, RTC_REG_B, REG_B_DEFAULT | REG_B_SET);
        assert_eq!(rtc_in(&mut cmos, RTC_REG_A), REG_A_DEFAULT, "no update cycle while stopped");
    }

    #[test]
    fn s3_wait_for_an_update_cycle_ends() {
        // s3.c: while (!(rtc_in(A) & UIP)); while (rtc_in(A) & UIP);
        // with a clock moving 20 µs per reading.
        let now = Arc::new(AtomicU64::new(FRIDAY_AFTERNOON * SECOND));
        let clock = now.clone();
        let mut cmos =
            Cmos::with_clock(Box::new(move || Duration::from_nanos(clock.fetch_add(20_000, Ordering::Relaxed))));
        let mut reads = 0;
        while rtc_in(&mut cmos, RTC_REG_A) & REG_A_UIP == 0 {
            reads += 1;
            assert!(reads < 100_000, "UIP never rose");
        }
        while rtc_in(&mut cmos, RTC_REG_A) & REG_A_UIP != 0 {
            reads += 1;
            assert!(reads < 100_000, "UIP never fell");
        }
        assert_eq!(rtc_in(&mut cmos, RTC_SECONDS), 0x08, "just after the update to the next second");
    }

    #[test]
    fn the_guest_sets_the_time_with_the_set_bit() {
        let (mut cmos, now) = cmos_at(FRIDAY_AFTERNOON);
        rtc_out(&mut cmos, RTC_REG_B, REG_B_DEFAULT | REG_B_SET);
        // 1999-12-31 23:59:59, a Friday.
        for (index, value) in TIME_REGISTERS.into_iter().zip([0x59, 0x59, 0x23, 0x06, 0x31, 0x12, 0x99, 0x19]) {
            rtc_out(&mut cmos, index, value);
        }
        now.store((FRIDAY_AFTERNOON + 5) * SECOND, Ordering::Relaxed);
        assert_eq!(rtc_in(&mut cmos, RTC_SECONDS), 0x59, "held while SET");
        rtc_out(&mut cmos, RTC_REG_B, REG_B_DEFAULT);
        assert_eq!(date_and_time(&mut cmos), [0x59, 0x59, 0x23, 0x06, 0x31, 0x12, 0x99, 0x19]);
        now.store((FRIDAY_AFTERNOON + 6) * SECOND, Ordering::Relaxed);
        // 2000-01-01 00:00:00, a Saturday.
        assert_eq!(date_and_time(&mut cmos), [0x00, 0x00, 0x00, 0x07, 0x01, 0x01, 0x00, 0x20]);
    }

    #[test]
    fn writing_one_register_while_running_changes_only_it() {
        let (mut cmos, now) = cmos_at(FRIDAY_AFTERNOON);
        rtc_out(&mut cmos, RTC_MINUTES, 0x00);
        assert_eq!(date_and_time(&mut cmos), [0x07, 0x00, 0x13, 0x06, 0x26, 0x06, 0x26, 0x20]);
        now.store((FRIDAY_AFTERNOON + 60) * SECOND, Ordering::Relaxed);
        assert_eq!(rtc_in(&mut cmos, RTC_MINUTES), 0x01);
        // A weekday write changes nothing: the weekday follows the date.
        rtc_out(&mut cmos, RTC_DAY_OF_WEEK, 0x02);
        assert_eq!(rtc_in(&mut cmos, RTC_DAY_OF_WEEK), 0x06);
    }

    #[test]
    fn a_divider_reset_holds_the_clock() {
        let (mut cmos, now) = cmos_at(FRIDAY_AFTERNOON);
        rtc_out(&mut cmos, RTC_REG_A, 0x70);
        now.store((FRIDAY_AFTERNOON + 30) * SECOND, Ordering::Relaxed);
        assert_eq!(rtc_in(&mut cmos, RTC_SECONDS), 0x07);
        rtc_out(&mut cmos, RTC_REG_A, REG_A_DEFAULT);
        now.store((FRIDAY_AFTERNOON + 32) * SECOND, Ordering::Relaxed);
        assert_eq!(rtc_in(&mut cmos, RTC_SECONDS), 0x09, "runs on from where it was held");
    }

    #[test]
    fn status_bits_the_guest_cannot_set() {
        let (mut cmos, _) = cmos_at(FRIDAY_AFTERNOON);
        rtc_out(&mut cmos, RTC_REG_A, REG_A_UIP | REG_A_DEFAULT);
        assert_eq!(rtc_in(&mut cmos, RTC_REG_A), REG_A_DEFAULT, "UIP is read-only");
        rtc_out(&mut cmos, RTC_REG_B, REG_B_SET | REG_B_UIE | REG_B_24H);
        assert_eq!(rtc_in(&mut cmos, RTC_REG_B), REG_B_SET | REG_B_24H, "SET clears UIE");
        rtc_out(&mut cmos, RTC_REG_C, 0xff);
        rtc_out(&mut cmos, RTC_REG_D, 0x00);
        assert_eq!(rtc_in(&mut cmos, RTC_REG_C), 0);
        assert_eq!(rtc_in(&mut cmos, RTC_REG_D), REG_D_VRT);
    }

    #[test]
    fn index_port_keeps_nmi_disable_and_reads_0xff() {
        // init.c: rtc_out(0x0f, 0x0a) sets the shutdown status for a warm reset.
        let (mut cmos, _) = cmos_at(FRIDAY_AFTERNOON);
        cmos.write(0, &[0x80 | CMOS_SHUTDOWN_STATUS]);
        assert!(cmos.nmi_disabled());
        cmos.write(1, &[0x0a]);
        assert_eq!(cmos.shutdown_status(), 0x0a);
        let mut byte = [0u8];
        cmos.read(0, &mut byte);
        assert_eq!(byte, [0xff]);
        assert_eq!(rtc_in(&mut cmos, CMOS_SHUTDOWN_STATUS), 0x0a);
        assert!(!cmos.nmi_disabled());
    }

    #[test]
    fn the_rest_is_plain_nvram() {
        let (mut cmos, _) = cmos_at(FRIDAY_AFTERNOON);
        for index in [0x01, 0x03, 0x05, 0x0e, 0x10, 0x31, 0x33, 0x7f] {
            assert_eq!(rtc_in(&mut cmos, index), 0);
            rtc_out(&mut cmos, index, index ^ 0xa5);
        }
        for index in [0x01, 0x03, 0x05, 0x0e, 0x10, 0x31, 0x33, 0x7f] {
            assert_eq!(rtc_in(&mut cmos, index), index ^ 0xa5);
        }
    }

    #[test]
    fn a_word_access_covers_index_then_data() {
        let (mut cmos, _) = cmos_at(FRIDAY_AFTERNOON);
        cmos.write(0, &[0x40, 0x77]);
        assert_eq!(rtc_in(&mut cmos, 0x40), 0x77);
        let mut word = [0u8; 2];
        cmos.read(0, &mut word);
        assert_eq!(word, [0xff, 0x77]);
    }

    #[test]
    fn bad_accesses_and_garbage_time_are_harmless() {
        let (mut cmos, _) = cmos_at(FRIDAY_AFTERNOON);
        rtc_out(&mut cmos, 0x40, 0x11);
        cmos.write(1, &[0x22, 0x33]); // the second byte is past port 0x71
        cmos.write(CMOS_SIZE, &[0x44]);
        cmos.write(u64::MAX, &[0x55, 0x66]);
        cmos.write(1, &[]);
        let mut data = [0u8; 3];
        cmos.read(1, &mut data);
        assert_eq!(data, [0x22, 0xff, 0xff]);
        cmos.read(u64::MAX, &mut data);
        assert_eq!(data, [0xff; 3]);
        cmos.read(0, &mut []);
        for index in TIME_REGISTERS {
            rtc_out(&mut cmos, index, 0xff);
        }
        rtc_out(&mut cmos, RTC_REG_B, REG_B_BINARY);
        rtc_out(&mut cmos, RTC_HOURS, 0xff);
        date_and_time(&mut cmos);
        let mut far = Cmos::with_clock(Box::new(|| Duration::MAX));
        date_and_time(&mut far);
        rtc_out(&mut far, RTC_YEAR, 0x30);
        assert_eq!(rtc_in(&mut far, RTC_YEAR), 0x30);
        assert!(format!("{far:?}").starts_with("Cmos"));
    }
}
