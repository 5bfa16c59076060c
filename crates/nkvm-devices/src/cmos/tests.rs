use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::*;

/// 2026-06-26 13:45:07 UTC, a Friday.
pub(super) const FRIDAY_AFTERNOON: u64 = 1_782_481_507;
pub(super) const SECOND: u64 = NANOS_PER_SEC as u64;

/// An RTC whose clock reads the nanoseconds since the epoch in the cell.
pub(super) fn cmos_at(seconds: u64) -> (Cmos, Arc<AtomicU64>) {
    let now = Arc::new(AtomicU64::new(seconds * SECOND));
    let clock = now.clone();
    (Cmos::with_clock(Box::new(move || Duration::from_nanos(clock.load(Ordering::Relaxed)))), now)
}

pub(super) fn rtc_in(cmos: &mut Cmos, index: u8) -> u8 {
    cmos.write(0, &[index]);
    let mut byte = [0u8];
    cmos.read(1, &mut byte);
    byte[0]
}

pub(super) fn rtc_out(cmos: &mut Cmos, index: u8, value: u8) {
    cmos.write(0, &[index]);
    cmos.write(1, &[value]);
}

pub(super) fn date_and_time(cmos: &mut Cmos) -> [u8; 8] {
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
    let mut cmos = Cmos::with_clock(Box::new(move || Duration::from_nanos(clock.fetch_add(20_000, Ordering::Relaxed))));
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

/// What s3.c does: wait for an update, clear the flags, every alarm byte
/// "don't care", `AIE` on.
fn arm_every_second(cmos: &mut Cmos) {
    rtc_in(cmos, RTC_REG_C);
    for index in [RTC_SECONDS_ALARM, RTC_MINUTES_ALARM, RTC_HOURS_ALARM] {
        rtc_out(cmos, index, RTC_ALARM_DONT_CARE);
    }
    let b = rtc_in(cmos, RTC_REG_B);
    rtc_out(cmos, RTC_REG_B, b | REG_B_AIE);
}

#[test]
fn the_s3_test_alarm_goes_off_at_the_next_second() {
    let (mut cmos, now) = cmos_at(FRIDAY_AFTERNOON);
    now.store(FRIDAY_AFTERNOON * SECOND + 1000, Ordering::Relaxed);
    arm_every_second(&mut cmos);
    assert_eq!(cmos.alarm_in(), Some(Duration::from_nanos(SECOND - 1000)));
    now.store((FRIDAY_AFTERNOON + 1) * SECOND, Ordering::Relaxed);
    assert_eq!(cmos.alarm_in(), Some(Duration::ZERO), "due, and the flag is not read yet");
    assert_eq!(rtc_in(&mut cmos, RTC_REG_C), REG_C_AF | REG_C_IRQF);
    assert_eq!(rtc_in(&mut cmos, RTC_REG_C), 0, "a read clears the flags");
    assert_eq!(cmos.alarm_in(), Some(Duration::from_secs(1)));
}

#[test]
fn an_alarm_at_a_set_time_in_bcd() {
    let (mut cmos, now) = cmos_at(FRIDAY_AFTERNOON); // 13:45:07
    rtc_out(&mut cmos, RTC_SECONDS_ALARM, 0x10);
    rtc_out(&mut cmos, RTC_MINUTES_ALARM, 0x45);
    rtc_out(&mut cmos, RTC_HOURS_ALARM, 0x13);
    assert_eq!(cmos.alarm_in(), None, "AIE is clear");
    rtc_out(&mut cmos, RTC_REG_B, REG_B_DEFAULT | REG_B_AIE);
    assert_eq!(cmos.alarm_in(), Some(Duration::from_secs(3)));
    now.store((FRIDAY_AFTERNOON + 5) * SECOND, Ordering::Relaxed);
    assert_eq!(rtc_in(&mut cmos, RTC_REG_C), REG_C_AF | REG_C_IRQF);
    assert_eq!(cmos.alarm_in(), Some(Duration::from_secs(86_400 - 2)), "tomorrow");
}

#[test]
fn the_alarm_flag_is_set_without_aie_but_irqf_is_not() {
    let (mut cmos, now) = cmos_at(FRIDAY_AFTERNOON);
    for index in [RTC_SECONDS_ALARM, RTC_MINUTES_ALARM, RTC_HOURS_ALARM] {
        rtc_out(&mut cmos, index, 0xff);
    }
    now.store((FRIDAY_AFTERNOON + 2) * SECOND, Ordering::Relaxed);
    assert_eq!(rtc_in(&mut cmos, RTC_REG_C), REG_C_AF);
    assert_eq!(cmos.alarm_in(), None);
}

#[test]
fn a_held_clock_or_an_impossible_alarm_never_goes_off() {
    let (mut cmos, _) = cmos_at(FRIDAY_AFTERNOON);
    arm_every_second(&mut cmos);
    rtc_out(&mut cmos, RTC_SECONDS_ALARM, 0x75);
    assert_eq!(cmos.alarm_in(), None, "second 75 does not exist");
    arm_every_second(&mut cmos);
    rtc_out(&mut cmos, RTC_REG_B, REG_B_SET | REG_B_AIE | REG_B_24H);
    assert_eq!(cmos.alarm_in(), None, "the clock is held");
}

/// The guest sets its clock back an hour after a status C read and arms
/// an alarm 10 s ahead on the new clock: it goes off then, not a day late.
#[test]
fn an_alarm_armed_after_the_clock_is_set_back_goes_off_on_the_new_clock() {
    let (mut cmos, now) = cmos_at(FRIDAY_AFTERNOON); // 13:45:07
    rtc_in(&mut cmos, RTC_REG_C);
    rtc_out(&mut cmos, RTC_HOURS, 0x12); // 12:45:07
    rtc_out(&mut cmos, RTC_SECONDS_ALARM, 0x17);
    rtc_out(&mut cmos, RTC_MINUTES_ALARM, 0x45);
    rtc_out(&mut cmos, RTC_HOURS_ALARM, 0x12);
    rtc_out(&mut cmos, RTC_REG_B, REG_B_DEFAULT | REG_B_AIE);
    assert_eq!(cmos.alarm_in(), Some(std::time::Duration::from_secs(10)));
    now.store((FRIDAY_AFTERNOON + 20) * SECOND, Ordering::Relaxed); // 12:45:27
    assert_eq!(cmos.alarm_in(), Some(std::time::Duration::ZERO));
    assert_eq!(rtc_in(&mut cmos, RTC_REG_C), REG_C_AF | REG_C_IRQF);
}

/// A clock set forward past the alarm time never lived through it: no
/// alarm. One that went off before the change is still reported after it.
#[test]
fn a_clock_set_forward_jumps_over_the_alarm_but_keeps_one_already_gone_off() {
    let (mut cmos, now) = cmos_at(FRIDAY_AFTERNOON); // 13:45:07
    rtc_out(&mut cmos, RTC_SECONDS_ALARM, 0x00);
    rtc_out(&mut cmos, RTC_MINUTES_ALARM, 0x00);
    rtc_out(&mut cmos, RTC_HOURS_ALARM, 0x14); // 14:00:00
    rtc_in(&mut cmos, RTC_REG_C);
    rtc_out(&mut cmos, RTC_REG_B, REG_B_DEFAULT | REG_B_AIE);
    rtc_out(&mut cmos, RTC_HOURS, 0x15); // 15:45:07: 14:00:00 never passed
    assert_ne!(cmos.alarm_in(), Some(std::time::Duration::ZERO));
    assert_eq!(rtc_in(&mut cmos, RTC_REG_C), 0);
    // Back to 13:59:57, three seconds before the alarm; it goes off at
    // 14:00:00, and the clock is then set again before status C is read.
    rtc_out(&mut cmos, RTC_HOURS, 0x13);
    rtc_out(&mut cmos, RTC_MINUTES, 0x59);
    rtc_out(&mut cmos, RTC_SECONDS, 0x57);
    now.store((FRIDAY_AFTERNOON + 5) * SECOND, Ordering::Relaxed);
    rtc_out(&mut cmos, RTC_HOURS, 0x09);
    assert_eq!(cmos.alarm_in(), Some(std::time::Duration::ZERO), "it went off before the change");
    assert_eq!(rtc_in(&mut cmos, RTC_REG_C), REG_C_AF | REG_C_IRQF);
    assert_eq!(rtc_in(&mut cmos, RTC_REG_C), 0, "a read clears it");
}
