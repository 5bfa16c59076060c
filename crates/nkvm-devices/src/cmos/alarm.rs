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
    /// Whether the alarm matches the guest time `t` (seconds since the
    /// epoch): the rule [`next_after`](Self::next_after) is tested against.
    #[cfg(test)]
    fn matches(&self, t: i64) -> bool {
        let of_day = t.rem_euclid(DAY);
        let (hour, minute, second) = ((of_day / 3600) as u8, (of_day / 60 % 60) as u8, (of_day % 60) as u8);
        (dont_care(self.second) || self.format.decode(self.second) == second)
            && (dont_care(self.minute) || self.format.decode(self.minute) == minute)
            && (dont_care(self.hour) || self.format.decode_hour(self.hour) == hour)
    }

    /// The first second after `after` (exclusive) the alarm matches; `None`
    /// if it never does (a byte out of range). Found field by field (the
    /// next hour, minute or second that can match), a few dozen steps at
    /// most: a guest reads register C in a loop, and a scan through a day
    /// of seconds cost up to 86400 checks per read.
    pub(super) fn next_after(&self, after: i64) -> Option<i64> {
        let field = |byte: u8, value: u8, limit: u8| match dont_care(byte) {
            true => Some(None),
            false => (value < limit).then_some(Some(i64::from(value))),
        };
        let second = field(self.second, self.format.decode(self.second), 60)?;
        let minute = field(self.minute, self.format.decode(self.minute), 60)?;
        let hour = field(self.hour, self.format.decode_hour(self.hour), 24)?;
        let mut t = after.checked_add(1)?;
        // Each turn fixes one field or moves to the next hour: 24 hours,
        // 60 minutes and a second or two bound it.
        for _ in 0..256 {
            let of_day = t.rem_euclid(DAY);
            let (h, m, s) = (of_day / 3600, of_day / 60 % 60, of_day % 60);
            if hour.is_some_and(|want| want != h) {
                t = t.checked_add(3600 - of_day % 3600)?;
            } else if minute.is_some_and(|want| want != m) {
                t = t.checked_add(60 - s)?;
            } else if let Some(want) = second.filter(|&want| want != s) {
                t = t.checked_add((want - s).rem_euclid(60))?;
            } else {
                return Some(t);
            }
        }
        None
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

    /// The field-by-field search finds what a scan through the next day
    /// of seconds finds, for alarms with every mix of set and don't-care
    /// fields (out-of-range ones too) and times across day boundaries.
    #[test]
    fn the_next_match_is_the_one_a_second_by_second_scan_finds() {
        let scan = |a: &Alarm, after: i64| (after + 1..=after + DAY).find(|&t| a.matches(t));
        let bytes = [0x00, 0x30, 0x59, 0x60, 0xc0];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for &second in &bytes {
            for &minute in &bytes {
                for &hour in &[0x00, 0x12, 0x23, 0x24, 0xc0] {
                    let a = alarm(second, minute, hour);
                    for _ in 0..4 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let after = (x % (3 * DAY as u64)) as i64 - DAY;
                        assert_eq!(a.next_after(after), scan(&a, after), "{a:?} after {after}");
                    }
                }
            }
        }
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
