//! The byte encoding shared by every saved state (`docs/state-format.md`):
//! a header (magic, format version, kind, body length), tagged sections,
//! a CRC-32 trailer; little-endian throughout.
//!
//! Decoding is total: every read is bounds-checked and every failure is a
//! [`FormatError`] naming the section and the offset in the blob.

/// The four bytes every state blob starts with.
pub const MAGIC: [u8; 4] = *b"NKVS";
/// The format version this library writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Header bytes: magic, version, kind, body length.
pub(crate) const HEADER_LEN: usize = 12;
/// Trailer bytes: the CRC-32.
pub(crate) const TRAILER_LEN: usize = 4;

/// What a blob holds (header bytes 6..8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateKind {
    /// A [`VcpuState`](super::VcpuState).
    Vcpu = 1,
    /// A [`VmState`](super::VmState).
    Vm = 2,
}

impl StateKind {
    fn name(self) -> &'static str {
        match self {
            Self::Vcpu => "vCPU state",
            Self::Vm => "VM state",
        }
    }
}

/// Why a state blob was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The blob ends before a field it must hold.
    #[error("truncated {section}: {needed} bytes needed at offset {offset}, {available} left")]
    Truncated {
        /// The part being read (a section name, "header", ...).
        section: &'static str,
        /// Offset in the blob.
        offset: usize,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes left in the blob or section.
        available: usize,
    },
    /// The blob does not start with [`MAGIC`]: not an nkvm state.
    #[error("not an nkvm state: bytes 0..4 are {found:02x?}, expected \"NKVS\"")]
    BadMagic {
        /// The first four bytes.
        found: [u8; 4],
    },
    /// Written by another format version.
    #[error("state format version {found} (offset 4); this nkvm reads version {supported}")]
    UnsupportedVersion {
        /// The version in the blob.
        found: u16,
        /// [`FORMAT_VERSION`].
        supported: u16,
    },
    /// The blob holds another kind of state.
    #[error("expected a {expected} but the kind at offset 6 is {found}")]
    WrongKind {
        /// What the caller decodes.
        expected: &'static str,
        /// The kind in the blob (1 = vCPU, 2 = VM).
        found: u16,
    },
    /// The header's body length disagrees with the blob's size.
    #[error("the header (offset 8) says the body is {declared} bytes, but the blob holds {actual}")]
    LengthMismatch {
        /// Body length in the header.
        declared: u32,
        /// Body bytes actually present (blob minus header and trailer).
        actual: usize,
    },
    /// The CRC-32 trailer does not match: the blob was altered.
    #[error("checksum mismatch at offset {offset}: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// Offset of the trailer.
        offset: usize,
        /// The trailer.
        stored: u32,
        /// CRC-32 of everything before it.
        computed: u32,
    },
    /// A section tag this format version does not define.
    #[error("unknown section tag {tag} at offset {offset}")]
    UnknownSection {
        /// The tag.
        tag: u16,
        /// Offset of the section header.
        offset: usize,
    },
    /// A section repeated or out of order (tags must strictly increase).
    #[error("section {section} (tag {tag}) at offset {offset} is repeated or out of order")]
    SectionOrder {
        /// The section's name.
        section: &'static str,
        /// The tag.
        tag: u16,
        /// Offset of the section header.
        offset: usize,
    },
    /// A section the format requires is absent.
    #[error("section {section} (tag {tag}) is missing")]
    MissingSection {
        /// The section's name.
        section: &'static str,
        /// The tag.
        tag: u16,
    },
    /// A section's length is not what its contents need.
    #[error("section {section} at offset {offset} is {length} bytes, its contents need {expected}")]
    SectionLength {
        /// The section's name.
        section: &'static str,
        /// Offset of the section's payload.
        offset: usize,
        /// Its declared length.
        length: usize,
        /// What the fields read from it need.
        expected: usize,
    },
    /// A field holds a value the format forbids.
    #[error("section {section}, offset {offset}: {field} = {value} is invalid ({why})")]
    InvalidValue {
        /// The section's name.
        section: &'static str,
        /// Offset of the field.
        offset: usize,
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// What is allowed.
        why: &'static str,
    },
}

/// Builds a blob: header, sections, trailer.
#[derive(Debug)]
pub(crate) struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn new(kind: StateKind) -> Self {
        let mut buf = Vec::with_capacity(8192);
        buf.extend_from_slice(&MAGIC);
        buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        buf.extend_from_slice(&(kind as u16).to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes()); // body length, patched by `finish`
        Self { buf }
    }

    /// Appends section `tag`, its payload written by `body`.
    pub(crate) fn section(&mut self, tag: u16, body: impl FnOnce(&mut Out<'_>)) {
        self.buf.extend_from_slice(&tag.to_le_bytes());
        self.buf.extend_from_slice(&0u16.to_le_bytes());
        let len_at = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_le_bytes());
        let start = self.buf.len();
        body(&mut Out(&mut self.buf));
        let len = (self.buf.len() - start) as u32;
        self.buf[len_at..len_at + 4].copy_from_slice(&len.to_le_bytes());
    }

    pub(crate) fn finish(mut self) -> Vec<u8> {
        let body = (self.buf.len() - HEADER_LEN) as u32;
        self.buf[8..12].copy_from_slice(&body.to_le_bytes());
        let crc = crc32(&self.buf);
        self.buf.extend_from_slice(&crc.to_le_bytes());
        self.buf
    }
}

/// Little-endian writes into a section payload.
#[derive(Debug)]
pub(crate) struct Out<'a>(&'a mut Vec<u8>);

impl Out<'_> {
    pub(crate) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub(crate) fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn bytes(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }
}

/// A section's payload being read: bounds-checked, offsets absolute.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of `data[0]` in the blob.
    base: usize,
    section: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(data: &'a [u8], base: usize, section: &'static str) -> Self {
        Self { data, pos: 0, base, section }
    }

    /// The blob offset of the next byte.
    pub(crate) fn offset(&self) -> usize {
        self.base + self.pos
    }

    /// Bytes left in the section.
    pub(crate) fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if self.remaining() < n {
            return Err(FormatError::Truncated {
                section: self.section,
                offset: self.offset(),
                needed: n,
                available: self.remaining(),
            });
        }
        let out = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.array::<1>()?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, FormatError> {
        self.array().map(u16::from_le_bytes)
    }
    pub(crate) fn u32(&mut self) -> Result<u32, FormatError> {
        self.array().map(u32::from_le_bytes)
    }
    pub(crate) fn u64(&mut self) -> Result<u64, FormatError> {
        self.array().map(u64::from_le_bytes)
    }

    /// Reads a `u32` element count, checks it against `max` and that the
    /// rest of the section is exactly `count * entry` bytes.
    pub(crate) fn count(&mut self, field: &'static str, max: u32, entry: usize) -> Result<usize, FormatError> {
        let offset = self.offset();
        let count = self.u32()?;
        if count > max {
            return Err(self.invalid(offset, field, u64::from(count), "more entries than the format allows"));
        }
        let need = count as usize * entry;
        if self.remaining() != need {
            return Err(FormatError::SectionLength {
                section: self.section,
                offset: self.base,
                length: self.data.len(),
                expected: self.pos + need,
            });
        }
        Ok(count as usize)
    }

    pub(crate) fn invalid(&self, offset: usize, field: &'static str, value: u64, why: &'static str) -> FormatError {
        FormatError::InvalidValue { section: self.section, offset, field, value, why }
    }

    /// Checks that the whole section was read.
    pub(crate) fn finish(self) -> Result<(), FormatError> {
        if self.pos != self.data.len() {
            return Err(FormatError::SectionLength {
                section: self.section,
                offset: self.base,
                length: self.data.len(),
                expected: self.pos,
            });
        }
        Ok(())
    }
}

/// The sections of a validated blob, in tag order.
#[derive(Debug)]
pub(crate) struct Sections<'a> {
    found: Vec<(u16, usize, &'a [u8])>,
    known: &'static [(u16, &'static str)],
    optional: &'static [(u16, &'static str)],
}

impl<'a> Sections<'a> {
    /// Checks the header, the length and the checksum of `blob`, then splits
    /// its body into sections, each of which must be one of `known` (all of
    /// them required), in increasing tag order.
    pub(crate) fn open(
        blob: &'a [u8],
        kind: StateKind,
        known: &'static [(u16, &'static str)],
    ) -> Result<Self, FormatError> {
        Self::open_with_optional(blob, kind, known, &[])
    }

    /// [`open`](Self::open), also accepting the `optional` sections: ones a
    /// writer leaves out when they would be empty, so a state without them
    /// reads the same as one from before they existed.
    pub(crate) fn open_with_optional(
        blob: &'a [u8],
        kind: StateKind,
        known: &'static [(u16, &'static str)],
        optional: &'static [(u16, &'static str)],
    ) -> Result<Self, FormatError> {
        let mut header = Reader::new(blob, 0, "header");
        let magic: [u8; 4] = header.array()?;
        if magic != MAGIC {
            return Err(FormatError::BadMagic { found: magic });
        }
        let version = header.u16()?;
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion { found: version, supported: FORMAT_VERSION });
        }
        let found_kind = header.u16()?;
        if found_kind != kind as u16 {
            return Err(FormatError::WrongKind { expected: kind.name(), found: found_kind });
        }
        let declared = header.u32()?;
        let actual = blob.len().saturating_sub(HEADER_LEN + TRAILER_LEN);
        if blob.len() < HEADER_LEN + TRAILER_LEN || declared as usize != actual {
            return Err(FormatError::LengthMismatch { declared, actual });
        }
        let crc_at = blob.len() - TRAILER_LEN;
        let stored = u32::from_le_bytes([blob[crc_at], blob[crc_at + 1], blob[crc_at + 2], blob[crc_at + 3]]);
        let computed = crc32(&blob[..crc_at]);
        if stored != computed {
            return Err(FormatError::Checksum { offset: crc_at, stored, computed });
        }
        let mut body = Reader::new(&blob[HEADER_LEN..crc_at], HEADER_LEN, "section header");
        let mut found: Vec<(u16, usize, &[u8])> = Vec::new();
        while body.remaining() > 0 {
            let at = body.offset();
            let tag = body.u16()?;
            let Some(&(_, name)) = known.iter().chain(optional).find(|(t, _)| *t == tag) else {
                return Err(FormatError::UnknownSection { tag, offset: at });
            };
            if found.last().is_some_and(|&(last, _, _)| last >= tag) {
                return Err(FormatError::SectionOrder { section: name, tag, offset: at });
            }
            let reserved = body.u16()?;
            if reserved != 0 {
                return Err(body.invalid(at + 2, "reserved", u64::from(reserved), "must be 0"));
            }
            let len = body.u32()? as usize;
            let payload_at = body.offset();
            let payload = body.bytes(len).map_err(|e| match e {
                FormatError::Truncated { offset, needed, available, .. } => {
                    FormatError::Truncated { section: name, offset, needed, available }
                }
                e => e,
            })?;
            found.push((tag, payload_at, payload));
        }
        if let Some(&(tag, section)) = known.iter().find(|(t, _)| !found.iter().any(|(f, _, _)| f == t)) {
            return Err(FormatError::MissingSection { section, tag });
        }
        Ok(Self { found, known, optional })
    }

    /// A reader over optional section `tag`'s payload, if the blob has it.
    pub(crate) fn get_optional(&self, tag: u16) -> Option<Reader<'a>> {
        let name = self.optional.iter().find(|(t, _)| *t == tag).map_or("?", |(_, n)| n);
        let &(_, at, payload) = self.found.iter().find(|(t, _, _)| *t == tag)?;
        Some(Reader::new(payload, at, name))
    }

    /// A reader over section `tag`'s payload.
    pub(crate) fn get(&self, tag: u16) -> Reader<'a> {
        let name = self.known.iter().find(|(t, _)| *t == tag).map_or("?", |(_, n)| n);
        // `open` checked that every known section is present.
        let (_, at, payload) = self.found.iter().find(|(t, _, _)| *t == tag).copied().unwrap_or((tag, 0, &[]));
        Reader::new(payload, at, name)
    }
}

/// CRC-32 as zlib computes it (reflected, polynomial 0xedb88320, initial
/// and final XOR 0xffffffff).
pub(crate) fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xedb8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_zlib() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn a_section_longer_than_the_blob_is_truncated_not_a_panic() {
        let mut w = Writer::new(StateKind::Vm);
        w.section(1, |o| o.u32(7));
        let mut blob = w.finish();
        blob[HEADER_LEN + 4..HEADER_LEN + 8].copy_from_slice(&100u32.to_le_bytes());
        let crc_at = blob.len() - 4;
        let crc = crc32(&blob[..crc_at]);
        blob[crc_at..].copy_from_slice(&crc.to_le_bytes());
        let err = Sections::open(&blob, StateKind::Vm, &[(1, "one")]).unwrap_err();
        assert!(
            matches!(err, FormatError::Truncated { section: "one", offset: 20, needed: 100, available: 4 }),
            "{err}"
        );
    }
}
