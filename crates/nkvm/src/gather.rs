//! Guest memory to a socket without a copy in user space: a gather write
//! (`writev`) whose pieces are the caller's bytes and ranges of guest RAM,
//! read by the kernel straight from the VM's mapping. This is how a
//! migration's pages leave the source: a page is read once, by the
//! kernel, instead of being copied into a buffer and then into the socket.
//!
//! The guest may write a page while it is being sent; the kernel copies
//! whatever it finds. A caller that needs a consistent copy collects the
//! page's dirty bit before the send, so a write during it dirties the page
//! again and it is sent again.
//!
//! ```
//! use nkvm::gather::Piece;
//! use nkvm::{Backing, GuestAddress, MemoryMap};
//! use std::io::Read;
//! use std::os::fd::AsFd;
//!
//! let ram = Backing::new("ram", 1 << 20)?;
//! let map = MemoryMap::ram(&ram)?;
//! map.write(GuestAddress(0x2000), b"guest bytes")?;
//! let (mut rx, tx) = std::os::unix::net::UnixStream::pair().unwrap();
//! let sent = map.write_gather(tx.as_fd(), &[Piece::Bytes(b"head:"), Piece::Guest(GuestAddress(0x2000), 11)])?;
//! assert_eq!(sent, 16);
//! let mut got = [0u8; 16];
//! rx.read_exact(&mut got).unwrap();
//! assert_eq!(&got, b"head:guest bytes");
//! assert!(!map.is_zero(GuestAddress(0x2000), 4096)?);
//! assert!(map.is_zero(GuestAddress(0x3000), 4096)?);
//! # Ok::<(), nkvm::MemoryError>(())
//! ```

use std::os::fd::BorrowedFd;

use crate::memory::{MemoryError, MemoryMap};
use crate::sys::memfd;
use crate::GuestAddress;

/// One piece of a gather write.
#[derive(Debug, Clone, Copy)]
pub enum Piece<'a> {
    /// The caller's bytes (a record header, ...).
    Bytes(&'a [u8]),
    /// `len` bytes of guest memory at the address, inside one region.
    Guest(GuestAddress, usize),
}

impl MemoryMap {
    /// Writes `pieces`, in order, to `out` (a socket, a pipe, a file),
    /// guest memory straight from its mapping; returns the bytes written.
    /// Every [`Piece::Guest`] must lie inside one region of this map.
    /// Nothing is written if one does not.
    pub fn write_gather(&self, out: BorrowedFd<'_>, pieces: &[Piece<'_>]) -> Result<u64, MemoryError> {
        let mut outs = Vec::with_capacity(pieces.len());
        for piece in pieces {
            outs.push(match *piece {
                Piece::Bytes(bytes) => memfd::Out::Bytes(bytes),
                Piece::Guest(gpa, len) => {
                    let (region, offset) = self.locate(gpa, len)?;
                    memfd::Out::Mapped(region.backing.mapping(), offset, len)
                }
            });
        }
        match memfd::write_gather(out, &outs) {
            Some(Ok(sent)) => Ok(sent),
            Some(Err(source)) => Err(MemoryError::Gather { source }),
            // `locate` checked every range against its region.
            None => Err(MemoryError::Gather { source: std::io::Error::from(std::io::ErrorKind::InvalidInput) }),
        }
    }

    /// Whether the `len` bytes of guest memory at `gpa` (inside one
    /// region) are all zero, read in place: a page that is can be sent as
    /// a flag instead of its 4 KiB.
    pub fn is_zero(&self, gpa: GuestAddress, len: usize) -> Result<bool, MemoryError> {
        let (region, offset) = self.locate(gpa, len)?;
        region.backing.mapping().is_zero(offset, len).ok_or(MemoryError::Unmapped { addr: gpa, len })
    }

    /// The region holding all of `gpa..gpa+len`, and the offset into its
    /// backing.
    fn locate(&self, gpa: GuestAddress, len: usize) -> Result<(&crate::memory::Region, usize), MemoryError> {
        let unmapped = MemoryError::Unmapped { addr: gpa, len };
        let region = self.find(gpa).ok_or(unmapped)?;
        let in_region = gpa.0 - region.gpa.0;
        if len as u64 > region.len - in_region {
            return Err(MemoryError::Unmapped { addr: gpa, len });
        }
        usize::try_from(region.offset + in_region)
            .map(|o| (region, o))
            .map_err(|_| MemoryError::Unmapped { addr: gpa, len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{Backing, Region};
    use std::io::Read;
    use std::os::fd::AsFd;

    #[test]
    fn a_gather_write_sends_every_piece_in_order_past_the_socket_buffer() {
        let ram = Backing::new("t", 16 << 20).unwrap();
        let map = MemoryMap::ram(&ram).unwrap();
        let pages: Vec<u64> = (0..2000u64).map(|i| 0x1000 * (2 * i + 1)).collect();
        for (i, &gpa) in pages.iter().enumerate() {
            map.write(GuestAddress(gpa), &vec![(i % 250) as u8 + 1; 4096]).unwrap();
        }
        let heads: Vec<[u8; 8]> = pages.iter().map(|g| g.to_le_bytes()).collect();
        let mut pieces = Vec::new();
        for (head, &gpa) in heads.iter().zip(&pages) {
            pieces.push(Piece::Bytes(head));
            pieces.push(Piece::Guest(GuestAddress(gpa), 4096));
        }
        let (mut rx, tx) = std::os::unix::net::UnixStream::pair().unwrap();
        // 8 MB: far more than the socket holds, so the writes are partial
        // and resume mid-piece.
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            rx.read_to_end(&mut all).unwrap();
            all
        });
        let sent = map.write_gather(tx.as_fd(), &pieces).unwrap();
        drop(tx);
        let all = reader.join().unwrap();
        assert_eq!(sent, all.len() as u64);
        assert_eq!(all.len(), pages.len() * (8 + 4096));
        for (i, rec) in all.chunks(8 + 4096).enumerate() {
            assert_eq!(rec[..8], pages[i].to_le_bytes(), "header {i}");
            assert!(rec[8..].iter().all(|&b| b == (i % 250) as u8 + 1), "page {i}");
        }
    }

    #[test]
    fn a_piece_outside_one_region_is_refused_and_nothing_is_sent() {
        let ram = Backing::new("t", 4 << 20).unwrap();
        let map = MemoryMap::new(vec![
            Region::new(GuestAddress(0), &ram, 0, 2 << 20),
            Region::new(GuestAddress(2 << 20), &ram, 2 << 20, 2 << 20),
        ])
        .unwrap();
        let (mut rx, tx) = std::os::unix::net::UnixStream::pair().unwrap();
        for bad in [GuestAddress((2 << 20) - 0x800), GuestAddress(4 << 20)] {
            let pieces = [Piece::Bytes(b"x"), Piece::Guest(bad, 4096)];
            assert!(matches!(map.write_gather(tx.as_fd(), &pieces), Err(MemoryError::Unmapped { .. })), "{bad:?}");
            assert!(matches!(map.is_zero(bad, 4096), Err(MemoryError::Unmapped { .. })));
        }
        drop(tx);
        let mut all = Vec::new();
        rx.read_to_end(&mut all).unwrap();
        assert!(all.is_empty(), "nothing was sent: {all:?}");
        map.write(GuestAddress(0x1fff), &[1]).unwrap();
        assert!(!map.is_zero(GuestAddress(0x1000), 4096).unwrap());
        assert!(map.is_zero(GuestAddress(0x2000), 4096).unwrap());
    }
}
