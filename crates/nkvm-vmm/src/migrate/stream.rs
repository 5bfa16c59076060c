//! The migration stream's bytes (`docs/migration.md`): a 16-byte header,
//! then records of `type (u8) | length (u32 LE) | payload`; the destination
//! answers with one record. No `unsafe`, no allocation past
//! [`MAX_RECORD`] whatever the peer sends.

use std::io::{self, Read, Write};
use std::os::fd::BorrowedFd;

use nkvm::gather::Piece;
use nkvm::{GuestAddress, MemoryError, MemoryMap};

use super::MigrateError;

/// The stream's first eight bytes.
pub const STREAM_MAGIC: [u8; 8] = *b"NKVMMIG\0";
/// The stream format version this nkvm speaks.
pub const STREAM_VERSION: u16 = 2;
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
    /// Source → destination, after `Ready`: run the guest; the source
    /// will never resume it.
    Go = 7,
    /// Destination → source: restored, waiting for `Go`.
    Ready = 0x80,
    /// Destination → source: refused; UTF-8 reason.
    Failed = 0x81,
    /// Destination → source, after `Go`: the guest runs here.
    Running = 0x82,
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
            7 => Self::Go,
            0x80 => Self::Ready,
            0x81 => Self::Failed,
            0x82 => Self::Running,
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
        Self::resume(inner, 16)
    }

    /// A reader positioned at `offset` of the stream (where another reader
    /// of the same stream stopped).
    pub fn resume(inner: R, offset: u64) -> Self {
        Self { inner, offset, buf: Vec::new() }
    }

    /// Where the next record starts in the stream.
    pub fn offset(&self) -> u64 {
        self.offset
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

/// Builds `PAGES` records whose page data goes from guest memory to the
/// link without a copy in user space ([`MemoryMap::write_gather`]).
#[derive(Debug, Default)]
pub struct PageBatch {
    /// Each page's entry word: its address, with [`ZERO_PAGE`] when all zero.
    entries: Vec<[u8; 8]>,
}

impl PageBatch {
    /// Adds the guest page at `gpa`: a zero page as a flag, any other by
    /// reference (its bytes are read when the record is sent).
    pub fn push(&mut self, map: &MemoryMap, gpa: u64) -> Result<(), MemoryError> {
        let zero = map.is_zero(GuestAddress(gpa), PAGE)?;
        self.entries.push((gpa | if zero { ZERO_PAGE } else { 0 }).to_le_bytes());
        Ok(())
    }

    /// Adds the guest page at `gpa` unless it is all zero (memory the
    /// destination has not filled yet is zero); returns whether it did.
    pub fn push_data(&mut self, map: &MemoryMap, gpa: u64) -> Result<bool, MemoryError> {
        if map.is_zero(GuestAddress(gpa), PAGE)? {
            return Ok(false);
        }
        self.entries.push(gpa.to_le_bytes());
        Ok(true)
    }

    /// Pages added since the last flush.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Writes the record to `out` (nothing when empty); returns its size.
    /// Pages the guest changed since [`push`](Self::push) are sent as they
    /// are now (their dirty bit sends them again); a page that was zero
    /// stays a flag.
    pub fn flush(&mut self, map: &MemoryMap, out: BorrowedFd<'_>) -> Result<u64, MemoryError> {
        if self.entries.is_empty() {
            return Ok(0);
        }
        let with_data = self.entries.iter().filter(|e| e[0] & ZERO_PAGE as u8 == 0).count();
        let len = 4 + 8 * self.entries.len() + PAGE * with_data;
        let mut head = [0u8; 9];
        head[0] = RecordType::Pages as u8;
        head[1..5].copy_from_slice(&(len as u32).to_le_bytes());
        head[5..].copy_from_slice(&(self.entries.len() as u32).to_le_bytes());
        let mut pieces = Vec::with_capacity(1 + 2 * self.entries.len());
        pieces.push(Piece::Bytes(&head));
        for entry in &self.entries {
            pieces.push(Piece::Bytes(entry));
            if entry[0] & ZERO_PAGE as u8 == 0 {
                pieces.push(Piece::Guest(GuestAddress(u64::from_le_bytes(*entry)), PAGE));
            }
        }
        let sent = map.write_gather(out, &pieces)?;
        self.entries.clear();
        Ok(sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record of `pages` (address, fill byte; 0 is a zero page) as
    /// `PageBatch` sends it from a small guest memory.
    fn record_of(pages: &[(u64, u8)]) -> Vec<u8> {
        use std::io::Read;
        use std::os::fd::AsFd;
        let ram = nkvm::Backing::new("t", 1 << 20).unwrap();
        let map = MemoryMap::ram(&ram).unwrap();
        let mut batch = PageBatch::default();
        for &(gpa, byte) in pages {
            map.write(GuestAddress(gpa), &[byte; PAGE]).unwrap();
            batch.push(&map, gpa).unwrap();
        }
        let (mut rx, tx) = std::os::unix::net::UnixStream::pair().unwrap();
        let sent = batch.flush(&map, tx.as_fd()).unwrap();
        assert_eq!(batch.len(), 0);
        drop(tx);
        let mut out = Vec::new();
        rx.read_to_end(&mut out).unwrap();
        assert_eq!(sent, out.len() as u64);
        out
    }

    #[test]
    fn pages_round_trip_with_zero_pages_sent_as_flags() {
        let out = record_of(&[(0x1000, 7), (0x5000, 0)]);
        assert_eq!(out.len(), 5 + 4 + 8 + PAGE + 8);
        let mut r = RecordReader::new(&out[..]);
        let (kind, payload, _) = r.next().unwrap();
        assert_eq!(kind, RecordType::Pages);
        let pages = parse_pages(payload, 0).unwrap();
        assert_eq!(pages, vec![(0x1000, Some(&[7u8; PAGE][..])), (0x5000, None)]);
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
        let good = record_of(&[(0x2000, 9), (0x3000, 0)]);
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
