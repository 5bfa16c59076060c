//! The migration stream's bytes (`docs/migration.md`): a 16-byte header,
//! then records of `type (u8) | length (u32 LE) | payload`; the destination
//! answers with one record. No `unsafe`, no allocation past
//! [`MAX_RECORD`] whatever the peer sends.

use std::io::{self, Read, Write};

use super::MigrateError;

/// The stream's first eight bytes.
pub const STREAM_MAGIC: [u8; 8] = *b"NKVMMIG\0";
/// The stream format version this nkvm speaks.
pub const STREAM_VERSION: u16 = 1;
/// Guest page size in the stream.
pub const PAGE: usize = 4096;
/// The largest record a peer may send (a page batch of 1024 pages fits).
pub const MAX_RECORD: u32 = 8 << 20;
/// Pages per `PAGES` record.
pub const PAGES_PER_RECORD: usize = 256;
/// Bit 0 of a page entry's address: the page is all zero, no data follows.
pub const ZERO_PAGE: u64 = 1;

/// Record types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordType {
    /// `machine.json` text: what to build.
    Config = 1,
    /// A batch of guest pages.
    Pages = 2,
    /// The VM state blob (`NKVS`, kind 2).
    VmState = 3,
    /// One vCPU's state blob (`NKVS`, kind 1).
    VcpuState = 4,
    /// One device's state: name length (u8), name, `NKVD` blob.
    DeviceState = 5,
    /// Everything is sent; the source is paused, waiting for the answer.
    End = 6,
    /// Destination → source: restored, the guest runs here now.
    Resumed = 0x80,
    /// Destination → source: refused; UTF-8 reason.
    Failed = 0x81,
}

impl RecordType {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Config,
            2 => Self::Pages,
            3 => Self::VmState,
            4 => Self::VcpuState,
            5 => Self::DeviceState,
            6 => Self::End,
            0x80 => Self::Resumed,
            0x81 => Self::Failed,
            _ => return None,
        })
    }
}

/// The 16-byte header: magic, version, flags (0), page size.
pub fn header() -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(&STREAM_MAGIC);
    h[8..10].copy_from_slice(&STREAM_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(PAGE as u32).to_le_bytes());
    h
}

/// Reads and checks the header.
pub fn read_header(r: &mut impl Read) -> Result<(), MigrateError> {
    let mut h = [0u8; 16];
    r.read_exact(&mut h).map_err(|e| MigrateError::link("reading the stream header", e))?;
    let bad = |why: String| MigrateError::Stream { offset: 0, why };
    if h[..8] != STREAM_MAGIC {
        return Err(bad(format!("not an nkvm migration stream: it starts with {:02x?}", &h[..8])));
    }
    let version = u16::from_le_bytes([h[8], h[9]]);
    if version != STREAM_VERSION {
        return Err(bad(format!("stream version {version}; this nkvm speaks version {STREAM_VERSION}")));
    }
    let page = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    if page != PAGE as u32 || h[10..12] != [0, 0] {
        return Err(bad(format!("page size {page} or flags {:02x?} this nkvm does not support", &h[10..12])));
    }
    Ok(())
}

/// Writes one record.
pub fn write_record(w: &mut impl Write, kind: RecordType, payload: &[u8]) -> io::Result<()> {
    let mut head = [0u8; 5];
    head[0] = kind as u8;
    head[1..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    w.write_all(&head)?;
    w.write_all(payload)
}

/// Reads records, counting the offset for messages.
#[derive(Debug)]
pub struct RecordReader<R> {
    inner: R,
    offset: u64,
    buf: Vec<u8>,
}

impl<R: Read> RecordReader<R> {
    /// A reader positioned after the header.
    pub fn new(inner: R) -> Self {
        Self { inner, offset: 16, buf: Vec::new() }
    }

    /// The next record: its type, its payload and its offset.
    pub fn next(&mut self) -> Result<(RecordType, &[u8], u64), MigrateError> {
        let at = self.offset;
        let mut head = [0u8; 5];
        self.inner.read_exact(&mut head).map_err(|e| MigrateError::link("reading a record header", e))?;
        let kind = RecordType::from_u8(head[0])
            .ok_or_else(|| MigrateError::Stream { offset: at, why: format!("unknown record type {:#x}", head[0]) })?;
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
        if len > MAX_RECORD {
            return Err(MigrateError::Stream {
                offset: at,
                why: format!("a {len}-byte record, more than the {MAX_RECORD} allowed"),
            });
        }
        self.buf.resize(len as usize, 0);
        self.inner.read_exact(&mut self.buf).map_err(|e| MigrateError::link("reading a record", e))?;
        self.offset += 5 + u64::from(len);
        Ok((kind, &self.buf, at))
    }

    /// The underlying stream.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// The underlying stream back.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// One page of a `PAGES` record: its address and its data (`None`: all zero).
pub type PageEntry<'a> = (u64, Option<&'a [u8]>);

/// Splits a `PAGES` payload into its pages, checking its structure.
pub fn parse_pages(payload: &[u8], at: u64) -> Result<Vec<PageEntry<'_>>, MigrateError> {
    let bad = |why: String| MigrateError::Stream { offset: at, why };
    if payload.len() < 4 {
        return Err(bad("a PAGES record without its count".into()));
    }
    let count = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]) as usize;
    let mut pages = Vec::with_capacity(count.min(4096));
    let mut pos = 4;
    for _ in 0..count {
        let Some(entry) = payload.get(pos..pos + 8) else {
            return Err(bad(format!("a PAGES record of {count} pages ends at entry {}", pages.len())));
        };
        let word = u64::from_le_bytes(entry.try_into().unwrap_or([0; 8]));
        pos += 8;
        let addr = word & !(PAGE as u64 - 1);
        if word & (PAGE as u64 - 1) & !ZERO_PAGE != 0 {
            return Err(bad(format!("page entry {word:#x} has unknown flag bits")));
        }
        if word & ZERO_PAGE != 0 {
            pages.push((addr, None));
            continue;
        }
        let Some(data) = payload.get(pos..pos + PAGE) else {
            return Err(bad(format!("page {addr:#x}'s data is cut short")));
        };
        pos += PAGE;
        pages.push((addr, Some(data)));
    }
    if pos != payload.len() {
        return Err(bad(format!("{} bytes after the last page", payload.len() - pos)));
    }
    Ok(pages)
}

/// Builds `PAGES` payloads.
#[derive(Debug, Default)]
pub struct PageBatch {
    buf: Vec<u8>,
    count: u32,
}

impl PageBatch {
    /// Adds one page (sent as a zero page when it is all zero).
    pub fn push(&mut self, gpa: u64, data: &[u8]) {
        if self.buf.is_empty() {
            self.buf.extend_from_slice(&[0; 4]);
        }
        if data.iter().all(|&b| b == 0) {
            self.buf.extend_from_slice(&(gpa | ZERO_PAGE).to_le_bytes());
        } else {
            self.buf.extend_from_slice(&gpa.to_le_bytes());
            self.buf.extend_from_slice(data);
        }
        self.count += 1;
    }

    /// Pages in the batch.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Writes the batch as one record (if not empty) and empties it;
    /// returns the bytes written.
    pub fn flush(&mut self, w: &mut impl Write) -> io::Result<u64> {
        if self.count == 0 {
            return Ok(0);
        }
        self.buf[..4].copy_from_slice(&self.count.to_le_bytes());
        write_record(w, RecordType::Pages, &self.buf)?;
        let n = 5 + self.buf.len() as u64;
        self.buf.clear();
        self.count = 0;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_round_trip_with_zero_pages_sent_as_flags() {
        let mut batch = PageBatch::default();
        let data = [7u8; PAGE];
        batch.push(0x1000, &data);
        batch.push(0x5000, &[0u8; PAGE]);
        let mut out = Vec::new();
        assert_eq!(batch.flush(&mut out).unwrap(), out.len() as u64);
        assert_eq!(out.len(), 5 + 4 + 8 + PAGE + 8);
        let mut r = RecordReader::new(&out[..]);
        let (kind, payload, _) = r.next().unwrap();
        assert_eq!(kind, RecordType::Pages);
        let pages = parse_pages(payload, 0).unwrap();
        assert_eq!(pages, vec![(0x1000, Some(&data[..])), (0x5000, None)]);
    }

    #[test]
    fn bad_streams_are_named() {
        let err = read_header(&mut &b"GET / HTTP/1.1\r\n"[..]).unwrap_err().to_string();
        assert!(err.contains("not an nkvm migration stream"), "{err}");
        let mut h = header();
        h[8] = 9;
        let err = read_header(&mut &h[..]).unwrap_err().to_string();
        assert!(err.contains("stream version 9"), "{err}");
        let err = RecordReader::new(&[0x42u8, 0, 0, 0, 0][..]).next().unwrap_err().to_string();
        assert!(err.contains("unknown record type 0x42"), "{err}");
        let huge = [2u8, 0xff, 0xff, 0xff, 0xff];
        let err = RecordReader::new(&huge[..]).next().unwrap_err().to_string();
        assert!(err.contains("more than"), "{err}");
        let err = parse_pages(&[2, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0], 0).unwrap_err().to_string();
        assert!(err.contains("cut short"), "{err}");
        let err = parse_pages(&[1, 0, 0, 0, 2, 0x10, 0, 0, 0, 0, 0, 0], 0).unwrap_err().to_string();
        assert!(err.contains("unknown flag bits"), "{err}");
    }

    #[test]
    fn pseudo_random_records_never_panic() {
        // A small deterministic fuzz of the record and page decoders.
        let mut batch = PageBatch::default();
        batch.push(0x2000, &[9u8; PAGE]);
        batch.push(0x3000, &[0u8; PAGE]);
        let mut good = Vec::new();
        batch.flush(&mut good).unwrap();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..3000 {
            let mut blob = good.clone();
            for _ in 0..(x % 8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = (x as usize) % blob.len();
                blob[at] = (x >> 40) as u8;
            }
            blob.truncate(blob.len() - (x % 3) as usize * 100);
            let mut r = RecordReader::new(&blob[..]);
            if let Ok((RecordType::Pages, payload, at)) = r.next() {
                let _ = parse_pages(payload, at);
            }
        }
    }

    #[test]
    fn truncated_streams_are_link_errors_not_panics() {
        let mut out = Vec::new();
        write_record(&mut out, RecordType::Config, b"{}").unwrap();
        for len in 0..out.len() {
            assert!(RecordReader::new(&out[..len]).next().is_err());
        }
    }
}
