//! The RTC's [`Snapshot`]: the index, the NMI-disable bit, the 128 CMOS
//! bytes (NVRAM, status A and B, the alarm bytes, the date and time
//! registers as held while the clock is stopped), the guest's offset from
//! the host clock, the start of the alarm flag's window (the last status C
//! read) and the guest time at the save.
//!
//! Body, format version 1 (little-endian): u8 index (0-0x7f), u8 NMI
//! disable (0/1), the 128 CMOS bytes (status A's bit 7 clear), i64 guest
//! offset from the host clock (s), i64 guest time of the last status C read
//! (s since the epoch), i64 guest time at the save (s since the epoch); the
//! three within ±2^40 s.
//!
//! # The guest clock across a restore
//!
//! The RTC keeps following the host's UTC clock with the guest's own
//! offset, as QEMU's `-rtc base=utc,clock=host` does and as a PC's battery
//! clock does while it is switched off: a snapshot restored an hour later
//! shows a time an hour later, and a migrated guest's clock keeps time with
//! the world. It never goes back: when the restoring host's clock is
//! behind the saving host's (unsynchronised hosts, a host whose clock was
//! set back), the offset is raised so the guest time continues from the
//! saved second instead. The alarm flag then covers the seconds that passed
//! (an alarm due in them reads as having gone off, as on a PC).

use super::{Cmos, CMOS_BYTES, REG_A_UIP, RTC_REG_A};
use crate::snapshot::{Snapshot, SnapshotError, StateReader, StateWriter};

/// The largest time, offset or second count a state may hold, in seconds.
const MAX_SECONDS: u64 = 1 << 40;

impl Snapshot for Cmos {
    fn snapshot_name(&self) -> &'static str {
        "cmos-rtc"
    }

    fn snapshot_version(&self) -> u16 {
        1
    }

    fn save_body(&self, out: &mut StateWriter) {
        out.u8(self.index);
        out.bool(self.nmi_disabled);
        self.bytes.iter().for_each(|&b| out.u8(b));
        out.u64(self.offset as u64);
        out.u64(self.flags_since as u64);
        out.u64(self.guest_now().0 as u64);
    }

    fn load_body(&mut self, input: &mut StateReader<'_>) -> Result<(), SnapshotError> {
        let at = input.offset();
        let index = input.u8("index")?;
        if index > 0x7f {
            return Err(input.invalid("index", index.into(), at, "0-0x7f (bit 7 is the NMI bit)"));
        }
        let nmi_disabled = input.bool("NMI disable")?;
        let at = input.offset();
        let mut bytes = [0u8; CMOS_BYTES];
        bytes.copy_from_slice(input.bytes("CMOS bytes", CMOS_BYTES)?);
        let status_a = bytes[usize::from(RTC_REG_A)];
        if status_a & REG_A_UIP != 0 {
            let at = at + usize::from(RTC_REG_A);
            return Err(input.invalid("status A", status_a.into(), at, "UIP clear: it is never stored"));
        }
        // Times in seconds, each within ±2^40 (34 000 years): what a guest
        // can set; beyond it the arithmetic on them could overflow.
        let mut time = |field: &'static str| -> Result<i64, SnapshotError> {
            let at = input.offset();
            let raw = input.u64(field)?;
            let value = raw as i64;
            if value.unsigned_abs() > MAX_SECONDS {
                return Err(input.invalid(field, raw, at, "within ±2^40 seconds of the epoch"));
            }
            Ok(value)
        };
        let offset = time("offset")?;
        let flags_since = time("alarm flags since")?;
        let saved_now = time("guest time")?;
        (self.index, self.nmi_disabled, self.bytes, self.flags_since) = (index, nmi_disabled, bytes, flags_since);
        // Follow the host clock with the saved offset, but never behind the
        // saved second (see the module documentation).
        let host = self.guest_now().0.saturating_sub(self.offset);
        self.offset = offset.max(saved_now.saturating_sub(host));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::cmos::tests::{cmos_at, date_and_time, rtc_in, rtc_out, FRIDAY_AFTERNOON, SECOND};
    use crate::cmos::*;
    use crate::snapshot::check::refuses_damage;
    use crate::IoDevice;

    /// An RTC a guest has used: NVRAM written, the minutes set (an offset
    /// from the host), the alarm every second with AIE, the index and the
    /// NMI bit left set.
    fn used() -> (Cmos, std::sync::Arc<std::sync::atomic::AtomicU64>) {
        let (mut cmos, now) = cmos_at(FRIDAY_AFTERNOON); // 13:45:07
        rtc_out(&mut cmos, 0x40, 0x5a);
        rtc_out(&mut cmos, RTC_MINUTES, 0x10); // 13:10:07 from now on
        for index in [RTC_SECONDS_ALARM, RTC_MINUTES_ALARM, RTC_HOURS_ALARM] {
            rtc_out(&mut cmos, index, RTC_ALARM_DONT_CARE);
        }
        rtc_out(&mut cmos, RTC_REG_B, REG_B_DEFAULT | REG_B_AIE);
        rtc_in(&mut cmos, RTC_REG_C);
        cmos.write(0, &[0x80 | 0x40]);
        (cmos, now)
    }

    #[test]
    fn the_restored_clock_follows_the_host_with_the_guest_offset() {
        let (cmos, _) = used();
        let blob = cmos.snapshot();
        let (mut copy, now) = cmos_at(FRIDAY_AFTERNOON + 60);
        copy.restore(&blob).unwrap();
        assert!(copy.nmi_disabled());
        let mut byte = [0u8];
        copy.read(1, &mut byte);
        assert_eq!(byte, [0x5a], "the index and NVRAM survive");
        // A minute later on the host: 13:11:07, the guest's offset kept.
        assert_eq!(date_and_time(&mut copy)[..3], [0x07, 0x11, 0x13]);
        assert_eq!(rtc_in(&mut copy, RTC_REG_C), REG_C_AF | REG_C_IRQF, "the alarm went off in that minute");
        now.store((FRIDAY_AFTERNOON + 60) * SECOND + SECOND / 2, Ordering::Relaxed);
        assert_eq!(copy.alarm_in(), Some(std::time::Duration::from_nanos(SECOND / 2)));
        refuses_damage(&blob, || cmos_at(FRIDAY_AFTERNOON).0);
    }

    #[test]
    fn a_host_clock_behind_the_saved_one_does_not_send_the_guest_back() {
        let (cmos, _) = used();
        let blob = cmos.snapshot();
        let (mut copy, now) = cmos_at(FRIDAY_AFTERNOON - 3600);
        copy.restore(&blob).unwrap();
        assert_eq!(date_and_time(&mut copy)[..3], [0x07, 0x10, 0x13], "the saved second, not an hour earlier");
        now.store((FRIDAY_AFTERNOON - 3600 + 2) * SECOND, Ordering::Relaxed);
        assert_eq!(date_and_time(&mut copy)[..3], [0x09, 0x10, 0x13], "and on from there");
    }

    #[test]
    fn a_held_clock_stays_held_with_what_the_guest_wrote() {
        let (mut cmos, _) = cmos_at(FRIDAY_AFTERNOON);
        rtc_out(&mut cmos, RTC_REG_B, REG_B_DEFAULT | REG_B_SET);
        rtc_out(&mut cmos, RTC_SECONDS, 0x30);
        let blob = cmos.snapshot();
        let (mut copy, _) = cmos_at(FRIDAY_AFTERNOON + 500);
        copy.restore(&blob).unwrap();
        assert_eq!(date_and_time(&mut copy)[..3], [0x30, 0x45, 0x13]);
        rtc_out(&mut copy, RTC_REG_B, REG_B_DEFAULT);
        assert_eq!(date_and_time(&mut copy)[..3], [0x30, 0x45, 0x13], "runs from what was set");
        refuses_damage(&blob, || cmos_at(FRIDAY_AFTERNOON).0);
    }

    #[test]
    fn a_stored_uip_bit_or_a_wide_index_is_refused() {
        let body = |index: u8, status_a: u8| {
            let mut w = StateWriter::default();
            w.u8(index);
            w.bool(false);
            (0..CMOS_BYTES).for_each(|i| w.u8(if i == usize::from(RTC_REG_A) { status_a } else { 0 }));
            (0..3).for_each(|_| w.u64(0));
            StateReader::for_test(w.into_bytes(), "cmos-rtc")
        };
        let (mut cmos, _) = cmos_at(FRIDAY_AFTERNOON);
        let err = cmos.load_body(&mut body(0x80, 0x26)).unwrap_err();
        assert!(err.to_string().contains("index = 0x80"), "{err}");
        let err = cmos.load_body(&mut body(0, 0xa6)).unwrap_err();
        assert!(err.to_string().contains("status A = 0xa6 at offset 12"), "{err}");
        assert!(cmos.load_body(&mut body(0, 0x26)).is_ok());
    }

    /// Times a guest could never set (here an offset of -2^63 s, with the
    /// alarm armed) are refused by name, not left to overflow later.
    #[test]
    fn a_time_past_2_to_the_40_seconds_is_refused() {
        let body = |times: [u64; 3]| {
            let mut w = StateWriter::default();
            w.u8(0);
            w.bool(false);
            (0..CMOS_BYTES).for_each(|i| w.u8(if i == usize::from(RTC_REG_B) { REG_B_DEFAULT | REG_B_AIE } else { 0 }));
            times.iter().for_each(|&t| w.u64(t));
            StateReader::for_test(w.into_bytes(), "cmos-rtc")
        };
        let (mut cmos, _) = cmos_at(FRIDAY_AFTERNOON);
        let err = cmos.load_body(&mut body([i64::MIN as u64, (i64::MAX / 2) as u64, 0])).unwrap_err();
        assert!(err.to_string().contains("offset = 0x8000000000000000"), "{err}");
        let err = cmos.load_body(&mut body([0, (i64::MAX / 2) as u64, 0])).unwrap_err();
        assert!(err.to_string().contains("alarm flags since"), "{err}");
        let now = FRIDAY_AFTERNOON;
        assert!(cmos.load_body(&mut body([0, now, now])).is_ok());
        cmos.alarm_in();
    }

    #[test]
    fn noise_with_a_fixed_up_crc_never_panics_nor_breaks_the_clock() {
        let (cmos, _) = used();
        let good = cmos.snapshot();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            let mut blob = good.clone();
            for _ in 0..(x % 8 + 1) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = 21 + (x as usize) % (blob.len() - 25);
                blob[at] = (x >> 40) as u8;
            }
            let crc_at = blob.len() - 4;
            let crc = crate::snapshot::crc32(&blob[..crc_at]);
            blob[crc_at..].copy_from_slice(&crc.to_le_bytes());
            let (mut copy, _) = cmos_at(FRIDAY_AFTERNOON);
            if copy.restore(&blob).is_ok() {
                date_and_time(&mut copy);
                rtc_in(&mut copy, RTC_REG_C);
                copy.alarm_in();
            }
        }
    }
}
