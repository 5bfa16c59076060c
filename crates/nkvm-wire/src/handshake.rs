//! What both protocols share in their handshake: a range of protocol
//! versions, the choice of one, and the acknowledgement the device side
//! sends back.
//!
//! The VM side opens every connection with a hello naming the versions it
//! speaks and the identity of the thing on the socket (a region, a bus).
//! The device side answers with a [`HelloAck`]: the highest version both
//! speak and the identity echoed back, or version 0 and its own range if
//! there is none, after which it closes the connection.

use std::fmt;

use crate::error::WireError;
use crate::frame::{self, get_u16, get_u64, put, Protocol, HEADER_LEN};

/// Frame type of [`HelloAck`] in both protocols.
pub const FRAME_HELLO_ACK: u8 = 2;
/// Payload length of [`HelloAck`].
pub const HELLO_ACK_PAYLOAD_LEN: usize = 16;

/// An inclusive range of protocol versions. Version 0 does not exist: it
/// means "refused" in a [`HelloAck`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VersionRange {
    /// Oldest version spoken.
    pub min: u16,
    /// Newest version spoken.
    pub max: u16,
}

impl VersionRange {
    /// Version 1 alone: what every protocol started with (the APIC bus
    /// before fast paths, the I/O-region protocol before state transfer).
    pub const CURRENT: VersionRange = VersionRange { min: 1, max: 1 };
    /// The APIC-bus protocol's versions: 1, and 2, which adds fast paths
    /// ([`crate::apic::FRAME_FAST_PATH`]: an eventfd per message, so a
    /// device delivers a repeated edge-triggered interrupt with no thread
    /// of the VMM in between).
    pub const APIC_BUS: VersionRange = VersionRange { min: 1, max: 2 };
    /// The I/O-region protocol's versions: 1, and 2, which adds device
    /// state transfer ([`crate::ioregion::state`]).
    pub const IO_REGION: VersionRange = VersionRange { min: 1, max: 2 };

    /// Check that the range is non-empty and does not include version 0.
    ///
    /// # Errors
    ///
    /// [`WireError::BadVersionRange`].
    pub fn validate(self) -> Result<(), WireError> {
        if self.min == 0 || self.min > self.max {
            return Err(WireError::BadVersionRange { min: self.min, max: self.max });
        }
        Ok(())
    }

    /// Whether `version` is in the range.
    pub fn contains(self, version: u16) -> bool {
        (self.min..=self.max).contains(&version)
    }

    /// The newest version both ranges contain, if any.
    pub fn negotiate(self, other: VersionRange) -> Option<u16> {
        let low = self.min.max(other.min);
        let high = self.max.min(other.max);
        (low != 0 && low <= high).then_some(high)
    }
}

impl fmt::Display for VersionRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..={}", self.min, self.max)
    }
}

/// The device side's answer to a hello.
///
/// | payload offset | size | field |
/// |---|---|---|
/// | 0 | 2 | chosen version, 0 = refused |
/// | 2 | 2 | device's oldest version |
/// | 4 | 2 | device's newest version |
/// | 6 | 2 | reserved, 0 |
/// | 8 | 8 | identity from the hello, echoed |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HelloAck {
    /// The version both ends now speak, or 0 if there is none.
    pub version: u16,
    /// The versions the device side speaks.
    pub supported: VersionRange,
    /// The identity the hello carried (region or bus id).
    pub id: u64,
}

impl HelloAck {
    /// Length of the encoded frame.
    pub const FRAME_LEN: usize = HEADER_LEN + HELLO_ACK_PAYLOAD_LEN;

    /// Encode as a frame of `protocol`.
    pub fn encode(&self, protocol: Protocol) -> [u8; Self::FRAME_LEN] {
        let mut out = frame::frame_with_header(protocol, FRAME_HELLO_ACK);
        let p = &mut out[HEADER_LEN..];
        put(p, 0, &self.version.to_le_bytes());
        put(p, 2, &self.supported.min.to_le_bytes());
        put(p, 4, &self.supported.max.to_le_bytes());
        put(p, 8, &self.id.to_le_bytes());
        out
    }

    /// Decode exactly one hello-ack frame of `protocol`.
    ///
    /// # Errors
    ///
    /// Any header error ([`frame::Header::decode`]),
    /// [`WireError::UnexpectedFrame`] for another frame type,
    /// [`WireError::ReservedNotZero`].
    pub fn decode(protocol: Protocol, bytes: &[u8]) -> Result<HelloAck, WireError> {
        let type_name = match protocol {
            Protocol::IoRegion => crate::ioregion::frame_name,
            Protocol::ApicBus => crate::apic::frame_name,
        };
        let p = frame::payload_of(bytes, protocol, FRAME_HELLO_ACK, "hello-ack", type_name)?;
        Self::decode_payload(p)
    }

    pub(crate) fn decode_payload(p: &[u8]) -> Result<HelloAck, WireError> {
        frame::check_reserved(p, 6..8, "hello-ack reserved")?;
        Ok(HelloAck {
            version: get_u16(p, 0),
            supported: VersionRange { min: get_u16(p, 2), max: get_u16(p, 4) },
            id: get_u64(p, 8),
        })
    }

    /// The device side's answer to a hello offering `offered` for `id`,
    /// when it speaks `supported`.
    pub fn answer(supported: VersionRange, offered: VersionRange, id: u64) -> HelloAck {
        HelloAck { version: supported.negotiate(offered).unwrap_or(0), supported, id }
    }

    /// The VM side's check of an answer to its hello (`offered`, `id`):
    /// returns the version to speak.
    ///
    /// # Errors
    ///
    /// [`WireError::NoCommonVersion`] if the device refused,
    /// [`WireError::VersionNotOffered`] if it chose a version the VM side
    /// did not offer, [`WireError::IdMismatch`] if it echoed another id.
    pub fn check(&self, offered: VersionRange, id: u64) -> Result<u16, WireError> {
        if self.version == 0 {
            return Err(WireError::NoCommonVersion { ours: offered, theirs: self.supported });
        }
        if !offered.contains(self.version) {
            return Err(WireError::VersionNotOffered { version: self.version, offered });
        }
        if self.id != id {
            return Err(WireError::IdMismatch { sent: id, got: self.id });
        }
        Ok(self.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiate_picks_newest_common_version() {
        let a = VersionRange { min: 1, max: 3 };
        let b = VersionRange { min: 2, max: 5 };
        assert_eq!(a.negotiate(b), Some(3));
        assert_eq!(b.negotiate(a), Some(3));
        assert_eq!(a.negotiate(VersionRange { min: 4, max: 4 }), None);
        assert_eq!(VersionRange { min: 0, max: 0 }.negotiate(VersionRange { min: 0, max: 1 }), None);
    }

    #[test]
    fn bad_ranges_are_rejected() {
        assert!(VersionRange::CURRENT.validate().is_ok());
        let err = VersionRange { min: 3, max: 2 }.validate().unwrap_err();
        assert_eq!(err.to_string(), "version range 3..=2 is empty or includes 0");
        assert!(VersionRange { min: 0, max: 2 }.validate().is_err());
    }

    #[test]
    fn hello_ack_round_trips_in_both_protocols() {
        let ack = HelloAck { version: 1, supported: VersionRange { min: 1, max: 7 }, id: 0xdead_beef_0123 };
        for protocol in [Protocol::IoRegion, Protocol::ApicBus] {
            let bytes = ack.encode(protocol);
            assert_eq!(HelloAck::decode(protocol, &bytes).unwrap(), ack);
        }
        let bytes = ack.encode(Protocol::IoRegion);
        assert!(matches!(HelloAck::decode(Protocol::ApicBus, &bytes), Err(WireError::WrongProtocol { found: 1, .. })));
    }

    #[test]
    fn check_reports_refusal_wrong_version_and_wrong_id() {
        let offered = VersionRange::CURRENT;
        let refused = HelloAck::answer(VersionRange { min: 2, max: 2 }, offered, 5);
        assert_eq!(refused.version, 0);
        let err = refused.check(offered, 5).unwrap_err();
        assert_eq!(err.to_string(), "no common protocol version: this end speaks 1..=1, the peer 2..=2");

        let rogue = HelloAck { version: 9, supported: VersionRange { min: 9, max: 9 }, id: 5 };
        assert!(matches!(rogue.check(offered, 5), Err(WireError::VersionNotOffered { version: 9, .. })));

        let other = HelloAck::answer(offered, offered, 6);
        assert!(matches!(other.check(offered, 5), Err(WireError::IdMismatch { sent: 5, got: 6 })));
        assert_eq!(HelloAck::answer(offered, offered, 5).check(offered, 5).unwrap(), 1);
    }
}
