//! Saving and restoring a device model's state: the [`Snapshot`] trait
//! and its versioned byte envelope (`docs/migration.md`, "Device state").
//!
//! A blob is: magic `NKVD`, envelope version, the model's own format
//! version, the model's name, the body length, the body (the model's
//! fields, little-endian), and a CRC-32 of everything before it. Decoding
//! is total: a truncated, altered, foreign or newer-format blob is a
//! [`SnapshotError`] naming the device and the field, never a panic; and a
//! refused blob leaves the device as it was.
//!
//! ```
//! use nkvm_devices::snapshot::Snapshot;
//! use nkvm_devices::test_device::TestDevice;
//! use nkvm_devices::IoDevice;
//!
//! let mut dev = TestDevice::new();
//! dev.write(0x20, &7u64.to_le_bytes()); // SCRATCH0
//! let blob = dev.snapshot();
//! let mut copy = TestDevice::new();
//! copy.restore(&blob).unwrap();
//! assert_eq!(copy.scratch(0), Some(7));
//! assert!(copy.restore(&blob[..blob.len() - 1]).is_err());
//! ```

/// The four bytes every device blob starts with.
pub const DEVICE_MAGIC: [u8; 4] = *b"NKVD";
/// The envelope version this crate writes and reads.
pub const ENVELOPE_VERSION: u16 = 1;
/// Longest model name the envelope holds.
pub const MAX_NAME_LEN: usize = 64;

/// Why a device state blob was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// The blob ends before a field it must hold.
    #[error("{device} state truncated: {field} needs {needed} bytes at offset {offset}, {available} left")]
    Truncated {
        /// The device model (or "device" before the name is known).
        device: String,
        /// The field being read.
        field: &'static str,
        /// Offset in the blob.
        offset: usize,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes left.
        available: usize,
    },
    /// Not a device state blob.
    #[error("not an nkvm device state: bytes 0..4 are {found:02x?}, expected \"NKVD\"")]
    BadMagic {
        /// The first four bytes.
        found: [u8; 4],
    },
    /// Written by another envelope version.
    #[error("device state envelope version {found} (offset 4); this nkvm reads version {supported}")]
    UnsupportedEnvelope {
        /// The version in the blob.
        found: u16,
        /// [`ENVELOPE_VERSION`].
        supported: u16,
    },
    /// The blob is another model's state.
    #[error("the blob holds a {found:?} state, it cannot be restored into a {expected}")]
    WrongDevice {
        /// The model restored into.
        expected: &'static str,
        /// The name in the blob.
        found: String,
    },
    /// The model's body was written by another format version.
    #[error("{device} state format version {found}; this nkvm reads version {supported}")]
    UnsupportedVersion {
        /// The model.
        device: &'static str,
        /// The version in the blob.
        found: u16,
        /// The model's own version.
        supported: u16,
    },
    /// The header's body length disagrees with the blob's size.
    #[error("{device} state: the header says the body is {declared} bytes, the blob holds {actual}")]
    LengthMismatch {
        /// The model.
        device: String,
        /// Body length in the header.
        declared: u32,
        /// Body bytes present.
        actual: usize,
    },
    /// The CRC-32 trailer does not match: the blob was altered.
    #[error("{device} state checksum mismatch at offset {offset}: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// The model.
        device: String,
        /// Offset of the trailer.
        offset: usize,
        /// The trailer.
        stored: u32,
        /// CRC-32 of everything before it.
        computed: u32,
    },
    /// A field holds a value the model cannot take.
    #[error("{device} state: {field} = {value:#x} at offset {offset} is invalid ({expected})")]
    Invalid {
        /// The model.
        device: &'static str,
        /// The field.
        field: &'static str,
        /// The value found.
        value: u64,
        /// Offset of the field in the blob.
        offset: usize,
        /// What is allowed.
        expected: &'static str,
    },
    /// The state is of a device set up differently from the one restored
    /// into (another disk size, another read-only setting...).
    #[error("{device} state: {field} is {saved} in the saved state but {here} on this machine")]
    Mismatch {
        /// The model.
        device: &'static str,
        /// What differs.
        field: &'static str,
        /// The value in the blob.
        saved: u64,
        /// The value of the device restored into.
        here: u64,
    },
    /// The body holds more bytes than the model reads.
    #[error("{device} state: {count} unread bytes at the end of the body")]
    TrailingBytes {
        /// The model.
        device: &'static str,
        /// Bytes left over.
        count: usize,
    },
}

/// A device model whose state can be saved and restored.
///
/// Implementors write their fields in [`save_body`](Self::save_body) and
/// read them back, in the same order, in [`load_body`](Self::load_body),
/// which must validate every value and change the device only once all of
/// them are read (a refused blob leaves the device as it was). What a model
/// is connected to (its interrupt line, its output, its event channel) is
/// not state: the restored device keeps the connections it was built with.
pub trait Snapshot {
    /// The model's name in the blob (`"serial-16550"`, ...).
    fn snapshot_name(&self) -> &'static str;
    /// The version of the model's body format; bump it when the fields change.
    fn snapshot_version(&self) -> u16;
    /// Writes the model's fields.
    fn save_body(&self, out: &mut StateWriter);
    /// Reads the fields [`save_body`](Self::save_body) wrote and takes them.
    fn load_body(&mut self, input: &mut StateReader<'_>) -> Result<(), SnapshotError>;

    /// The device's state as a versioned, checksummed blob.
    fn snapshot(&self) -> Vec<u8> {
        let mut body = StateWriter::default();
        self.save_body(&mut body);
        let name = self.snapshot_name().as_bytes();
        let name = &name[..name.len().min(MAX_NAME_LEN)];
        let mut blob = Vec::with_capacity(17 + name.len() + body.buf.len());
        blob.extend_from_slice(&DEVICE_MAGIC);
        blob.extend_from_slice(&ENVELOPE_VERSION.to_le_bytes());
        blob.extend_from_slice(&self.snapshot_version().to_le_bytes());
        blob.push(name.len() as u8);
        blob.extend_from_slice(name);
        blob.extend_from_slice(&(body.buf.len() as u32).to_le_bytes());
        blob.extend_from_slice(&body.buf);
        let crc = crc32(&blob);
        blob.extend_from_slice(&crc.to_le_bytes());
        blob
    }

    /// Restores a blob [`snapshot`](Self::snapshot) wrote (by this model).
    fn restore(&mut self, blob: &[u8]) -> Result<(), SnapshotError> {
        let name = self.snapshot_name();
        let (body, at) = open(blob, name, self.snapshot_version())?;
        let mut input = StateReader { buf: body, pos: 0, base: at, device: name };
        // A model takes what it read once it has read all of it; bytes past
        // its body are found only then: the state it had is put back.
        let before = self.snapshot();
        self.load_body(&mut input)?;
        input.finish().inspect_err(|_| {
            let (body, at) = open(&before, name, self.snapshot_version()).expect("the model's own snapshot");
            let mut own = StateReader { buf: body, pos: 0, base: at, device: name };
            if let Err(e) = self.load_body(&mut own) {
                log::error!("{name}: cannot take back its own state after a refused one: {e}");
            }
        })
    }
}

/// Checks a blob's envelope; returns its body and the body's offset.
fn open<'a>(blob: &'a [u8], device: &'static str, version: u16) -> Result<(&'a [u8], usize), SnapshotError> {
    let mut head = StateReader { buf: blob, pos: 0, base: 0, device: "device" };
    let magic: [u8; 4] = head.array("magic")?;
    if magic != DEVICE_MAGIC {
        return Err(SnapshotError::BadMagic { found: magic });
    }
    let envelope = head.u16("envelope version")?;
    if envelope != ENVELOPE_VERSION {
        return Err(SnapshotError::UnsupportedEnvelope { found: envelope, supported: ENVELOPE_VERSION });
    }
    let found_version = head.u16("format version")?;
    let name_len = usize::from(head.u8("name length")?);
    let found_name = String::from_utf8_lossy(head.bytes("name", name_len)?).into_owned();
    if found_name != device {
        return Err(SnapshotError::WrongDevice { expected: device, found: found_name });
    }
    if found_version != version {
        return Err(SnapshotError::UnsupportedVersion { device, found: found_version, supported: version });
    }
    let declared = head.u32("body length")?;
    let at = head.pos;
    let actual = blob.len().saturating_sub(at + 4);
    if blob.len() < at + 4 || declared as usize != actual {
        return Err(SnapshotError::LengthMismatch { device: device.to_string(), declared, actual });
    }
    let crc_at = blob.len() - 4;
    let stored = u32::from_le_bytes([blob[crc_at], blob[crc_at + 1], blob[crc_at + 2], blob[crc_at + 3]]);
    let computed = crc32(&blob[..crc_at]);
    if stored != computed {
        return Err(SnapshotError::Checksum { device: device.to_string(), offset: crc_at, stored, computed });
    }
    Ok((&blob[at..crc_at], at))
}

/// Where a model writes its fields (little-endian).
#[derive(Debug, Default)]
pub struct StateWriter {
    buf: Vec<u8>,
}

impl StateWriter {
    /// One byte.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    /// A boolean as one byte, 0 or 1.
    pub fn bool(&mut self, v: bool) {
        self.buf.push(u8::from(v));
    }
    /// Two bytes.
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Four bytes.
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Eight bytes.
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// The bytes written so far.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
    /// A length (u32) then the bytes.
    pub fn blob(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.buf.extend_from_slice(v);
    }
}

/// Reads a model's fields back, every read bounds-checked.
#[derive(Debug)]
pub struct StateReader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Offset of `buf` in the blob, for messages.
    base: usize,
    device: &'static str,
}

impl<'a> StateReader<'a> {
    /// The next `n` bytes, for `field`.
    pub fn bytes(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], SnapshotError> {
        let available = self.buf.len() - self.pos;
        if n > available {
            return Err(SnapshotError::Truncated {
                device: self.device.to_string(),
                field,
                offset: self.base + self.pos,
                needed: n,
                available,
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], SnapshotError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(field, N)?);
        Ok(out)
    }

    /// One byte.
    pub fn u8(&mut self, field: &'static str) -> Result<u8, SnapshotError> {
        Ok(self.array::<1>(field)?[0])
    }
    /// Two bytes.
    pub fn u16(&mut self, field: &'static str) -> Result<u16, SnapshotError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    /// Four bytes.
    pub fn u32(&mut self, field: &'static str) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    /// Eight bytes.
    pub fn u64(&mut self, field: &'static str) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
    /// A boolean byte: 0 or 1, anything else is an error.
    pub fn bool(&mut self, field: &'static str) -> Result<bool, SnapshotError> {
        let at = self.offset();
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(self.invalid(field, u64::from(v), at, "0 or 1")),
        }
    }
    /// A length-prefixed byte string of at most `max` bytes.
    pub fn blob(&mut self, field: &'static str, max: usize) -> Result<&'a [u8], SnapshotError> {
        let at = self.offset();
        let len = self.u32(field)? as usize;
        if len > max {
            return Err(self.invalid(field, len as u64, at, "a length within the model's limit"));
        }
        self.bytes(field, len)
    }

    /// The offset of the next field in the blob.
    pub fn offset(&self) -> usize {
        self.base + self.pos
    }

    /// An [`SnapshotError::Invalid`] for `field` read at `offset`.
    pub fn invalid(&self, field: &'static str, value: u64, offset: usize, expected: &'static str) -> SnapshotError {
        SnapshotError::Invalid { device: self.device, field, value, offset, expected }
    }

    /// A [`SnapshotError::Mismatch`]: `field` is `saved` in the blob but
    /// `here` on the device restored into.
    pub fn mismatch(&self, field: &'static str, saved: u64, here: u64) -> SnapshotError {
        SnapshotError::Mismatch { device: self.device, field, saved, here }
    }

    /// A [`SnapshotError::TrailingBytes`] if bytes are left unread: a model
    /// that changes itself in steps (one nested blob, then another) checks
    /// this before its first step, so trailing bytes change nothing.
    pub fn expect_end(&self) -> Result<(), SnapshotError> {
        self.finish()
    }

    /// A reader over a bare body, for models' unit tests.
    #[cfg(test)]
    pub(crate) fn for_test(body: Vec<u8>, device: &'static str) -> StateReader<'static> {
        StateReader { buf: Box::leak(body.into_boxed_slice()), pos: 0, base: 0, device }
    }

    fn finish(&self) -> Result<(), SnapshotError> {
        match self.buf.len() - self.pos {
            0 => Ok(()),
            count => Err(SnapshotError::TrailingBytes { device: self.device, count }),
        }
    }
}

/// CRC-32 as zlib computes it (reflected, polynomial 0xedb88320).
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xedb8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// Implements [`Snapshot`] for a device that holds no state (each access
/// acts at once): an empty body at format version 1. The blob still
/// carries the name and version, so a machine's device set is checked
/// whole and a later format can add fields.
macro_rules! stateless_snapshot {
    ($ty:ty, $name:literal) => {
        impl $crate::snapshot::Snapshot for $ty {
            fn snapshot_name(&self) -> &'static str {
                $name
            }

            fn snapshot_version(&self) -> u16 {
                1
            }

            fn save_body(&self, _out: &mut $crate::snapshot::StateWriter) {}

            fn load_body(
                &mut self,
                _input: &mut $crate::snapshot::StateReader<'_>,
            ) -> Result<(), $crate::snapshot::SnapshotError> {
                Ok(())
            }
        }
    };
}
pub(crate) use stateless_snapshot;

/// Test helpers every model's snapshot tests share: a blob survives a
/// round trip, and every truncation, every flipped byte and a wrong
/// version are refused without a panic and without changing the device.
#[cfg(test)]
pub(crate) mod check {
    use super::*;

    /// `restore` refuses every prefix of `blob`, every single-bit flip
    /// (the CRC catches them), and a bumped version; `fresh` makes a device
    /// to restore into, whose snapshot must be unchanged by the refusals.
    pub(crate) fn refuses_damage<D: Snapshot>(blob: &[u8], fresh: impl Fn() -> D) {
        let mut dev = fresh();
        let before = dev.snapshot();
        for len in 0..blob.len() {
            assert!(dev.restore(&blob[..len]).is_err(), "a {len}-byte prefix was accepted");
        }
        for i in 0..blob.len() {
            let mut bad = blob.to_vec();
            bad[i] ^= 0x10;
            assert!(dev.restore(&bad).is_err(), "a flip at byte {i} was accepted");
        }
        // One byte more in the body than the model reads (length and CRC
        // made right): refused, after the model has read its fields.
        let body_len_at = 9 + usize::from(blob[8]);
        let body_len = u32::from_le_bytes(blob[body_len_at..body_len_at + 4].try_into().unwrap());
        let mut longer = blob[..blob.len() - 4].to_vec();
        longer[body_len_at..body_len_at + 4].copy_from_slice(&(body_len + 1).to_le_bytes());
        longer.push(0);
        let crc = crc32(&longer);
        longer.extend_from_slice(&crc.to_le_bytes());
        assert!(dev.restore(&longer).is_err(), "a body with a byte too many was accepted");
        assert_eq!(dev.snapshot(), before, "a body refused for its extra byte changed the device");
        let mut newer = blob.to_vec();
        newer[6] = newer[6].wrapping_add(1);
        let err = dev.restore(&newer).unwrap_err();
        assert!(matches!(err, SnapshotError::UnsupportedVersion { .. }), "{err}");
        assert_eq!(dev.snapshot(), before, "a refused blob changed the device");
        dev.restore(blob).unwrap();
        assert_eq!(dev.snapshot(), blob, "the round trip changed the state");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_device::TestDevice;

    #[test]
    fn crc32_matches_zlib() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn another_models_blob_is_refused_by_name() {
        let blob = TestDevice::new().snapshot();
        let mut serial = crate::serial::Serial::new(Box::new(|_| {}), Vec::new());
        let err = serial.restore(&blob).unwrap_err();
        assert!(matches!(err, SnapshotError::WrongDevice { expected: "serial-16550", .. }), "{err}");
        assert!(err.to_string().contains("test-device"), "{err}");
    }

    #[test]
    fn garbage_is_not_a_device_state() {
        let mut dev = TestDevice::new();
        assert!(matches!(dev.restore(b"hello, world, this is not a blob"), Err(SnapshotError::BadMagic { .. })));
        let mut blob = dev.snapshot();
        blob[4] = 9;
        assert!(matches!(dev.restore(&blob), Err(SnapshotError::UnsupportedEnvelope { found: 9, .. })));
    }

    #[test]
    fn pseudo_random_input_never_panics() {
        // A small deterministic fuzz of the decoder: xorshift bytes behind
        // a valid header, with and without a fixed-up CRC.
        let good = TestDevice::new().snapshot();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut dev = TestDevice::new();
        for round in 0..2000 {
            let mut blob = good.clone();
            let n = (x % 64) as usize;
            for _ in 0..n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = (x as usize) % blob.len();
                blob[at] = (x >> 32) as u8;
            }
            if round % 2 == 0 && blob.len() > 4 {
                let crc_at = blob.len() - 4;
                let crc = crc32(&blob[..crc_at]);
                blob[crc_at..].copy_from_slice(&crc.to_le_bytes());
            }
            let _ = dev.restore(&blob);
        }
    }
}
