//! The dirty log a vhost-user backend shares with nkvm
//! (`VHOST_USER_PROTOCOL_F_LOG_SHMFD`), and the message that hands it over.
//!
//! The log is a memfd holding one bit per 4 KiB page of guest-physical
//! address, from address 0 to the end of guest RAM: page `p` is bit
//! `p % 8` of byte `p / 8` — on x86-64, bit `p % 64` of little-endian
//! 64-bit word `p / 64`. The backend maps it when it gets
//! `VHOST_USER_SET_LOG_BASE` and, while `VHOST_F_LOG_ALL` is among the
//! features it was given, sets the bit of every page it writes with an
//! atomic OR: data buffers, and the used ring (at the guest-physical
//! address `SET_VRING_ADDR` gives as `log_guest_addr`).
//!
//! [`SharedLog`] is a [`DirtySource`] of the VM: on every
//! [`Vm::sync_dirty_log`](nkvm::Vm::sync_dirty_log) it takes each non-zero
//! word with an atomic swap to 0, so a bit the backend sets at the same
//! moment lands either in this drain or in the next, never nowhere. (The
//! backend's one-byte atomic OR and this eight-byte atomic swap are both
//! locked read-modify-writes of one cache line: x86 keeps each whole.)
//!
//! `SET_LOG_BASE` is sent here rather than with the `vhost` crate's
//! `Frontend::set_log_base`, which waits for a 16-byte reply body:
//! libvhost-user backends (qemu-storage-daemon) reply with an 8-byte one,
//! so that call would sit until the socket times out. This module writes
//! the request on the same socket and reads the reply's header and
//! whatever body it announces.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};

use nkvm::{Backing, DirtySource, GuestAddress, PAGE_SIZE};
use vm_memory::{FileOffset, MmapRegion, VolatileMemory};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::pci_devices::dirty::mark_words;

/// `VHOST_USER_SET_LOG_BASE`.
const SET_LOG_BASE: u32 = 6;
/// Header flags: protocol version 1.
const VERSION_1: u32 = 0x1;
/// Header flags: this is a reply.
const REPLY: u32 = 0x4;
/// The largest reply body accepted (the spec's is 8 or 16 bytes).
const MAX_REPLY_BODY: u32 = 64;

/// Why the log could not be made or handed over.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The memfd could not be created.
    #[error("cannot create the {size}-byte vhost-user dirty log")]
    Create {
        /// Its size.
        size: u64,
        /// What nkvm's memory layer reported.
        #[source]
        source: nkvm::MemoryError,
    },
    /// The memfd could not be mapped here.
    #[error("cannot map the vhost-user dirty log: {0}")]
    Map(String),
    /// The message could not be sent or its reply read.
    #[error("SET_LOG_BASE on the vhost-user socket")]
    Socket(#[source] io::Error),
    /// The backend answered something else.
    #[error(
        "the backend answered SET_LOG_BASE with request {request}, flags {flags:#x}, {size} bytes \
         (not a SET_LOG_BASE reply)"
    )]
    BadReply {
        /// The request code it answered with.
        request: u32,
        /// Its header flags.
        flags: u32,
        /// Its body size.
        size: u32,
    },
}

/// A dirty log shared with vhost-user backends: one bit per 4 KiB page of
/// guest-physical address, set by the backend, drained into the VM's log.
pub struct SharedLog {
    /// The memfd the backend maps.
    backing: Backing,
    /// This process's mapping of it, for atomic word access.
    map: MmapRegion<()>,
    /// 64-bit words in the log.
    words: usize,
}

impl std::fmt::Debug for SharedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLog").field("words", &self.words).finish_non_exhaustive()
    }
}

impl SharedLog {
    /// A zeroed log covering guest-physical addresses `0..ram_end`.
    pub fn new(ram_end: u64) -> Result<Self, LogError> {
        let words = ram_end.div_ceil(PAGE_SIZE).div_ceil(64).max(1);
        // The memfd is whole pages; the backend is told the bytes in use.
        let size = (words * 8).next_multiple_of(PAGE_SIZE);
        let backing = Backing::new("vhost-user-log", size).map_err(|source| LogError::Create { size, source })?;
        let file = backing.file().try_clone().map_err(|e| LogError::Map(e.to_string()))?;
        let map =
            MmapRegion::from_file(FileOffset::new(file, 0), size as usize).map_err(|e| LogError::Map(e.to_string()))?;
        Ok(Self { backing, map, words: words as usize })
    }

    /// The memfd, as the backend is given it.
    pub fn file(&self) -> &File {
        self.backing.file()
    }

    /// The bytes of the log the backend uses (`mmap_size`).
    pub fn size(&self) -> u64 {
        self.words as u64 * 8
    }

    fn word(&self, w: usize) -> Option<&AtomicU64> {
        self.map.get_atomic_ref::<AtomicU64>(w * 8).ok()
    }

    /// Sets the bit of the page at `gpa` (as a backend would: tests).
    #[cfg(test)]
    pub fn set(&self, gpa: u64) {
        let page = gpa / PAGE_SIZE;
        if let Some(word) = self.word((page / 64) as usize) {
            word.fetch_or(1 << (page % 64), Ordering::Relaxed);
        }
    }
}

impl SharedLog {
    /// Marks every page: what a backend that died may have written
    /// without logging it yet (it logs after the used entry it publishes).
    pub fn set_all(&self) {
        for w in 0..self.words {
            if let Some(word) = self.word(w) {
                word.store(u64::MAX, Ordering::Release);
            }
        }
    }
}

impl DirtySource for SharedLog {
    /// Pages a vhost-user backend wrote since the last drain. A backend
    /// that was not given the log (it does not offer
    /// `VHOST_USER_PROTOCOL_F_LOG_SHMFD` and `VHOST_F_LOG_ALL`) sets no
    /// bit here: its writes are not in the VM's dirty log.
    fn drain(&self, mark: &mut dyn FnMut(GuestAddress, u64)) {
        let words = (0..self.words).map(|w| match self.word(w) {
            // Most words are clear: a load, and a locked swap only when
            // there is something to take.
            Some(word) if word.load(Ordering::Relaxed) != 0 => word.swap(0, Ordering::AcqRel),
            _ => 0,
        });
        mark_words(0, words, mark);
    }
}

/// Sends `VHOST_USER_SET_LOG_BASE` with `log`'s memfd on `socket` (a clone
/// of the frontend's connection, idle while this runs) and waits for the
/// backend's reply, which says it has mapped the log.
pub fn set_log_base(socket: &UnixStream, log: &SharedLog) -> Result<(), LogError> {
    let mut message = Vec::with_capacity(28);
    message.extend_from_slice(&SET_LOG_BASE.to_le_bytes());
    message.extend_from_slice(&VERSION_1.to_le_bytes());
    message.extend_from_slice(&16u32.to_le_bytes());
    message.extend_from_slice(&log.size().to_le_bytes()); // mmap_size
    message.extend_from_slice(&0u64.to_le_bytes()); // mmap_offset
    let sent = socket.send_with_fd(&message[..], log.file().as_raw_fd()).map_err(|e| LogError::Socket(e.into()))?;
    if sent != message.len() {
        return Err(LogError::Socket(io::Error::new(io::ErrorKind::WriteZero, "short write")));
    }
    let mut reader = socket;
    let mut header = [0u8; 12];
    reader.read_exact(&mut header).map_err(LogError::Socket)?;
    let field = |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let (request, flags, size) = (field(0), field(4), field(8));
    if request != SET_LOG_BASE || flags & REPLY == 0 || size > MAX_REPLY_BODY {
        return Err(LogError::BadReply { request, flags, size });
    }
    let mut body = vec![0u8; size as usize];
    reader.read_exact(&mut body).map_err(LogError::Socket)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drained(log: &SharedLog) -> Vec<(u64, u64)> {
        let mut ranges = Vec::new();
        log.drain(&mut |gpa, len| ranges.push((gpa.0, len)));
        ranges
    }

    #[test]
    fn set_all_marks_every_page_once() {
        let log = SharedLog::new(1 << 20).unwrap();
        log.set_all();
        assert_eq!(drained(&log), [(0, 1 << 20)]);
        assert!(drained(&log).is_empty());
    }

    #[test]
    fn a_drain_takes_each_bit_once_as_runs_of_pages() {
        let log = SharedLog::new(3 << 20).unwrap();
        assert_eq!(log.size(), 3 * 256 / 64 * 8, "one bit per page of 3 MiB");
        for gpa in [0x1000, 0x2000, 0x3fff, 0x4_0000, 0x2f_f000] {
            log.set(gpa);
        }
        assert_eq!(drained(&log), [(0x1000, 0x3000), (0x4_0000, 0x1000), (0x2f_f000, 0x1000)]);
        assert!(drained(&log).is_empty(), "taken, and cleared as taken");
    }

    #[test]
    fn the_backend_sees_the_bits_through_its_own_mapping_of_the_memfd() {
        let log = SharedLog::new(1 << 20).unwrap();
        let theirs = MmapRegion::<()>::from_file(FileOffset::new(log.file().try_clone().unwrap(), 0), 4096).unwrap();
        // Page 9: bit 1 of byte 1, as a backend sets it.
        theirs.get_atomic_ref::<std::sync::atomic::AtomicU8>(1).unwrap().fetch_or(1 << 1, Ordering::Relaxed);
        assert_eq!(drained(&log), [(9 * PAGE_SIZE, PAGE_SIZE)]);
        assert_eq!(theirs.get_atomic_ref::<std::sync::atomic::AtomicU8>(1).unwrap().load(Ordering::Relaxed), 0);
    }
}
