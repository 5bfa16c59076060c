//! How the RTC writes numbers into its date and time registers, as status
//! B selects: BCD or binary (`DM`), 24-hour or 12-hour (`24H`; then bit 7
//! of the hours register means PM and hours run 12, 1, ..., 11).

use super::{REG_B_24H, REG_B_BINARY};

/// Hours register, 12-hour mode: PM.
const HOUR_PM: u8 = 0x80;

/// How status B says date and time registers are written.
#[derive(Debug, Clone, Copy)]
pub(super) struct Format(pub(super) u8);

impl Format {
    fn binary(self) -> bool {
        self.0 & REG_B_BINARY != 0
    }

    /// `value` (0-99) as the register holds it.
    pub(super) fn encode(self, value: u8) -> u8 {
        if self.binary() {
            value
        } else {
            (value / 10) << 4 | (value % 10)
        }
    }

    /// The number in a register. Lenient: a BCD nibble above 9 just counts
    /// as its value.
    pub(super) fn decode(self, value: u8) -> u8 {
        if self.binary() {
            value
        } else {
            (value >> 4) * 10 + (value & 0xf)
        }
    }

    /// `hour` (0-23) as the hours register holds it.
    pub(super) fn encode_hour(self, hour: u8) -> u8 {
        if self.0 & REG_B_24H != 0 {
            return self.encode(hour);
        }
        let on_clock = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(on_clock) | if hour >= 12 { HOUR_PM } else { 0 }
    }

    /// The hour (0-23) in an hours register; 12-hour values out of range
    /// wrap modulo 12.
    pub(super) fn decode_hour(self, value: u8) -> u8 {
        if self.0 & REG_B_24H != 0 {
            return self.decode(value);
        }
        self.decode(value & !HOUR_PM) % 12 + if value & HOUR_PM != 0 { 12 } else { 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BCD_24H: Format = Format(REG_B_24H);
    const BINARY_24H: Format = Format(REG_B_24H | REG_B_BINARY);
    const BCD_12H: Format = Format(0);
    const BINARY_12H: Format = Format(REG_B_BINARY);

    #[test]
    fn bcd_and_binary_round_trip_every_register_value() {
        for value in 0..100 {
            assert_eq!(BCD_24H.decode(BCD_24H.encode(value)), value);
            assert_eq!(BINARY_24H.encode(value), value);
        }
        assert_eq!(BCD_24H.encode(59), 0x59);
        assert_eq!(BCD_24H.decode(0x59), 59);
    }

    #[test]
    fn twelve_hour_clock_faces() {
        let faces = [(0, 0x12), (1, 0x01), (11, 0x11), (12, 0x92), (13, 0x81), (23, 0x91)];
        for (hour, bcd) in faces {
            assert_eq!(BCD_12H.encode_hour(hour), bcd, "{hour}");
            assert_eq!(BCD_12H.decode_hour(bcd), hour, "{bcd:#x}");
            let binary = BINARY_12H.encode_hour(hour);
            assert_eq!(BINARY_12H.decode_hour(binary), hour);
        }
        assert_eq!(BINARY_12H.encode_hour(12), 0x8c);
        assert_eq!(BCD_24H.encode_hour(23), 0x23);
    }

    #[test]
    fn invalid_bcd_decodes_without_panicking() {
        assert_eq!(BCD_24H.decode(0xff), 165);
        assert_eq!(BCD_12H.decode_hour(0xff), 13, "7F is 85, 85 % 12 = 1, plus PM");
        assert_eq!(BCD_12H.decode_hour(0x00), 0);
    }
}
