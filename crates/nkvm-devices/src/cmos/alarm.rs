//! The RTC's alarm: CMOS bytes 1, 3 and 5 (seconds, minutes, hours) in the
//! format status B selects; a byte with its top two bits set (0xc0-0xff) is
//! "don't care" and matches any value. The alarm goes off at each second
//! boundary where the three match the time.

use super::format::Format;

/// Top bits that make an alarm byte match anything.
pub(super) const DONT_CARE: u8 = 0xc0;
const DAY: i64 = 86_400;

/// The alarm bytes as the guest wrote them, and the format to read them in.
#[derive(Debug, Clone, Copy)]
pub(super) struct Alarm {
    pub(super) second: u8,
    pub(super) minute: u8,
    pub(super) hour: u8,
    pub(super) format: Format,
}

fn dont_care(byte: u8) -> bool {
    byte & DONT_CARE == DONT_CARE
}

impl Alarm {
    /// Whether the alarm matches the guest time `t` (seconds since the epoch).
    pub(super) fn matches(&self, t: i64) -> bool {
        let of_day = t.rem_euclid(DAY);
        let (hour, minute, second) = ((of_day / 3600) as u8, (of_day / 60 % 60) as u8, (of_day % 60) as u8);
        (dont_care(self.second) || self.format.decode(self.second) == second)
            && (dont_care(self.minute) || self.format.decode(self.minute) == minute)
            && (dont_care(self.hour) || self.format.decode_hour(self.hour) == hour)
    }

    /// The first second after `after` (exclusive) the alarm matches; `None`
    /// if it never does (a byte out of range).
    pub(super) fn next_after(&self, after: i64) -> Option<i64> {
        (after.saturating_add(1)..=after.saturating_add(DAY)).find(|&t| self.matches(t))
    }

    /// Whether the alarm went off in `(from, to]`.
    pub(super) fn went_off(&self, from: i64, to: i64) -> bool {
        self.next_after(from).is_some_and(|t| t <= to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmos::REG_B_24H;

    fn alarm(second: u8, minute: u8, hour: u8) -> Alarm {
        Alarm { second, minute, hour, format: Format(REG_B_24H) }
    }

    #[test]
    fn all_dont_care_goes_off_every_second() {
        let a = alarm(0xc0, 0xff, 0xc0);
        assert_eq!(a.next_after(1000), Some(1001));
        assert!(a.went_off(1000, 1001));
        assert!(!a.went_off(1000, 1000));
    }

    #[test]
    fn a_set_time_goes_off_once_a_day() {
        // 01:02:03 BCD.
        let a = alarm(0x03, 0x02, 0x01);
        let at = 3600 + 2 * 60 + 3;
        assert_eq!(a.next_after(0), Some(at));
        assert_eq!(a.next_after(at), Some(at + DAY));
        assert!(!a.went_off(at, at + DAY - 1));
    }

    #[test]
    fn seconds_only_goes_off_once_a_minute() {
        let a = alarm(0x30, 0xc0, 0xc0);
        assert_eq!(a.next_after(0), Some(30));
        assert_eq!(a.next_after(30), Some(90));
    }

    #[test]
    fn an_impossible_alarm_never_goes_off() {
        assert_eq!(alarm(0x61, 0xc0, 0xc0).next_after(0), None);
    }
}
