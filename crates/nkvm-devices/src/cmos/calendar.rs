//! UTC calendar dates and times, to and from seconds since the UNIX epoch
//! (1970-01-01 00:00:00), in the proleptic Gregorian calendar: what the
//! RTC's date registers hold. Days are counted with the usual "days from
//! civil" arithmetic on 400-year eras, which is exact for any `i64` day.

const SECONDS_PER_DAY: i64 = 86_400;
/// Days from 0000-03-01 to 1970-01-01.
const EPOCH_SHIFT: i64 = 719_468;
const DAYS_PER_ERA: i64 = 146_097;

/// A UTC date and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct DateTime {
    pub(super) year: i64,
    /// 1-12.
    pub(super) month: u8,
    /// 1-31.
    pub(super) day: u8,
    pub(super) hour: u8,
    pub(super) minute: u8,
    pub(super) second: u8,
    /// Day of the week, 0 = Sunday.
    pub(super) weekday: u8,
}

impl DateTime {
    /// The date and time `seconds` after the epoch (before it if negative).
    pub(super) fn from_unix(seconds: i64) -> Self {
        let days = seconds.div_euclid(SECONDS_PER_DAY);
        let in_day = seconds.rem_euclid(SECONDS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        Self {
            year,
            month,
            day,
            hour: (in_day / 3600) as u8,
            minute: (in_day / 60 % 60) as u8,
            second: (in_day % 60) as u8,
            // 1970-01-01 was a Thursday.
            weekday: (days + 4).rem_euclid(7) as u8,
        }
    }

    /// Seconds since the epoch. `weekday` is ignored. Fields out of range
    /// (a guest can write anything to the RTC) roll over instead of
    /// failing: day 32 is the next month's first, hour 24 the next day's
    /// midnight; a month outside 1-12 is clamped.
    pub(super) fn to_unix(self) -> i64 {
        let days = days_from_civil(self.year, self.month.clamp(1, 12), self.day);
        days * SECONDS_PER_DAY + i64::from(self.hour) * 3600 + i64::from(self.minute) * 60 + i64::from(self.second)
    }
}

/// Year, month (1-12) and day (1-31) of day `days` after the epoch.
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    // Eras of 400 years starting on March 1st, so leap days end a year.
    let z = days + EPOCH_SHIFT;
    let era = z.div_euclid(DAYS_PER_ERA);
    let day_of_era = z - era * DAYS_PER_ERA;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 { month_from_march + 3 } else { month_from_march - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month as u8, day as u8)
}

/// Days from the epoch to `year`-`month`-`day` (`month` 1-12; `day` may
/// run past the month's end).
fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = (i64::from(month) + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * DAYS_PER_ERA + day_of_era - EPOCH_SHIFT
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(year: i64, month: u8, day: u8, hour: u8, minute: u8, second: u8, weekday: u8) -> DateTime {
        DateTime { year, month, day, hour, minute, second, weekday }
    }

    #[test]
    fn known_dates_convert_both_ways() {
        // Checked against Python's calendar.timegm.
        let cases = [
            (0, at(1970, 1, 1, 0, 0, 0, 4)),
            (1_782_481_507, at(2026, 6, 26, 13, 45, 7, 5)),
            (951_782_400, at(2000, 2, 29, 0, 0, 0, 2)),
            (946_684_799, at(1999, 12, 31, 23, 59, 59, 5)),
            (4_107_585_600, at(2100, 3, 1, 12, 0, 0, 1)),
            (-1, at(1969, 12, 31, 23, 59, 59, 3)),
        ];
        for (seconds, date) in cases {
            assert_eq!(DateTime::from_unix(seconds), date, "{seconds}");
            assert_eq!(date.to_unix(), seconds, "{date:?}");
        }
    }

    #[test]
    fn every_day_for_centuries_round_trips() {
        // 1900-2200 covers the non-leap centuries 1900 and 2100 and leap 2000.
        let mut previous = DateTime::from_unix(-70 * 365 * SECONDS_PER_DAY - SECONDS_PER_DAY);
        for day in -70 * 365..230 * 365 {
            let date = DateTime::from_unix(day * SECONDS_PER_DAY + 3661);
            assert_eq!(date.to_unix(), day * SECONDS_PER_DAY + 3661);
            assert_eq!((date.hour, date.minute, date.second), (1, 1, 1));
            assert_eq!(date.weekday, (previous.weekday + 1) % 7);
            let next_month = date.day == 1 && (date.month == previous.month % 12 + 1);
            assert!(date.day == previous.day + 1 || next_month, "{previous:?} then {date:?}");
            previous = date;
        }
    }

    #[test]
    fn out_of_range_fields_roll_over() {
        assert_eq!(at(2026, 1, 32, 0, 0, 0, 0).to_unix(), at(2026, 2, 1, 0, 0, 0, 0).to_unix());
        assert_eq!(at(2026, 2, 28, 24, 0, 0, 0).to_unix(), at(2026, 3, 1, 0, 0, 0, 0).to_unix());
        assert_eq!(at(2026, 0, 1, 0, 0, 0, 0).to_unix(), at(2026, 1, 1, 0, 0, 0, 0).to_unix());
        assert_eq!(at(2026, 99, 1, 0, 0, 0, 0).to_unix(), at(2026, 12, 1, 0, 0, 0, 0).to_unix());
        // The largest values BCD decoding can give do not overflow.
        let garbage = at(16_665, 165, 165, 165, 165, 165, 0);
        assert_eq!(DateTime::from_unix(garbage.to_unix()).year, 16_666);
    }
}
