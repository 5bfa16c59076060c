//! [`SpinStream`]: a Unix stream socket that polls briefly before it blocks,
//! and [`Deadline`]: one time limit for all the reads of a transaction.
//!
//! A blocking round trip between two processes costs one wake-up on each
//! side; on a nested host that is ~40 µs, four times an exit to user space.
//! Polling the (non-blocking) socket for a short while first answers a busy
//! peer in a few µs; an idle peer is then waited for with epoll, for as
//! long as the socket's read (or write) timeout allows.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// A reader whose reads can share one time limit.
///
/// Between [`begin`](Deadline::begin) and [`end`](Deadline::end) (one
/// transaction: a reply, a hello-ack, a state answer), the reader's
/// timeout counts from the transaction's first read, so a peer that
/// sends its answer a byte at a time cannot stretch the wait to one
/// timeout per byte. Outside a transaction each read has its own timeout.
/// The default methods do nothing: a plain [`UnixStream`] keeps its
/// per-read timeout.
pub trait Deadline {
    /// Starts a transaction.
    fn begin(&mut self) {}
    /// Ends it.
    fn end(&mut self) {}
}

impl Deadline for UnixStream {}

impl<T: Deadline + ?Sized> Deadline for &mut T {
    fn begin(&mut self) {
        (**self).begin();
    }
    fn end(&mut self) {
        (**self).end();
    }
}

/// One direction of a socket that spins for up to `spin` before blocking.
#[derive(Debug)]
pub struct SpinStream {
    stream: UnixStream,
    spin: Duration,
    /// In a transaction ([`Deadline`]): when its first read started, once
    /// one has.
    transaction: Option<Option<Instant>>,
    /// What waits with, made at the first wait: an epoll set holding the
    /// socket, and the events it is registered for.
    poller: Option<(Epoll, EventSet)>,
}

impl SpinStream {
    /// Splits `stream` into a reader and a writer that poll for up to `spin`
    /// before blocking. The socket is switched to non-blocking mode (and
    /// stays so: waits are epoll waits); its read and write timeouts, as set
    /// on the socket at the time of each wait, bound the waits.
    ///
    /// # Errors
    ///
    /// The socket cannot be duplicated or switched to non-blocking mode.
    pub fn pair(stream: UnixStream, spin: Duration) -> io::Result<(SpinStream, SpinStream)> {
        stream.set_nonblocking(true)?;
        let writer = stream.try_clone()?;
        let half = |stream| SpinStream { stream, spin, transaction: None, poller: None };
        Ok((half(stream), half(writer)))
    }

    /// The socket itself (non-blocking), for what the stream cannot do,
    /// such as passing descriptors.
    pub fn get_ref(&self) -> &UnixStream {
        &self.stream
    }

    /// Waits until the socket is ready for `events` (or has an error or
    /// hang-up for the next call to report), at most until `timeout` has
    /// passed since `from`; a timeout of `None` waits as long as it takes.
    fn wait(&mut self, events: EventSet, from: Instant, timeout: Option<Duration>) -> io::Result<()> {
        let fd = self.stream.as_raw_fd();
        let (epoll, registered) = match &mut self.poller {
            Some(poller) => poller,
            None => {
                let epoll = Epoll::new()?;
                epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, 0))?;
                self.poller.insert((epoll, events))
            }
        };
        if *registered != events {
            epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(events, 0))?;
            *registered = events;
        }
        let until = timeout.map(|t| from + t);
        loop {
            let ms = match until {
                None => -1,
                Some(until) => {
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "the peer did not answer in time"));
                    }
                    // Rounded up: a wait never ends just short of the limit.
                    left.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32
                }
            };
            let mut ready = [EpollEvent::default()];
            match epoll.wait(ms, &mut ready) {
                // The limit passed (the check above says so) or it was early.
                Ok(0) => {}
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Deadline for SpinStream {
    fn begin(&mut self) {
        self.transaction = Some(None);
    }

    fn end(&mut self) {
        self.transaction = None;
    }
}

impl Read for SpinStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let start = Instant::now();
        // In a transaction the limit counts from its first read.
        let from = match &mut self.transaction {
            Some(first) => *first.get_or_insert(start),
            None => start,
        };
        loop {
            match self.stream.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if start.elapsed() < self.spin {
                        std::hint::spin_loop();
                    } else {
                        let timeout = self.stream.read_timeout()?;
                        self.wait(EventSet::IN, from, timeout)?;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }
}

impl Write for SpinStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let start = Instant::now();
        loop {
            match self.stream.write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let timeout = self.stream.write_timeout()?;
                    self.wait(EventSet::OUT, start, timeout)?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_was_written_and_blocks_after_spinning() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut ar, mut aw) = SpinStream::pair(a, Duration::from_micros(50)).unwrap();
        let (mut br, mut bw) = SpinStream::pair(b, Duration::from_micros(50)).unwrap();
        aw.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        br.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            bw.write_all(b"late").unwrap();
        });
        // Longer than the spin: the read must block, not fail.
        ar.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"late");
        t.join().unwrap();
    }

    /// In a transaction, a peer that sends its answer a byte at a time,
    /// each byte within the timeout, still gets one timeout in all; outside
    /// one, each read has its own.
    #[test]
    fn a_transaction_has_one_timeout_however_slowly_its_bytes_come() {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let (mut r, _w) = SpinStream::pair(a, Duration::ZERO).unwrap();
        let drip = std::thread::spawn(move || {
            let mut b = b;
            for i in 0..24u8 {
                std::thread::sleep(Duration::from_millis(60));
                if b.write_all(&[i]).is_err() {
                    break;
                }
            }
        });
        // Each byte comes within the timeout, so only a deadline for the
        // whole transaction ends the read before the 24th.
        r.begin();
        let mut reply = [0u8; 24];
        let err = r.read_exact(&mut reply).unwrap_err();
        r.end();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err:?}");
        // Outside a transaction the next bytes come each within the timeout.
        let mut byte = [0u8; 1];
        r.read_exact(&mut byte).unwrap();
        r.read_exact(&mut byte).unwrap();
        drop(r);
        drip.join().unwrap();
    }

    #[test]
    fn the_read_timeout_still_applies() {
        let (a, _b) = UnixStream::pair().unwrap();
        a.set_read_timeout(Some(Duration::from_millis(30))).unwrap();
        let (mut r, _w) = SpinStream::pair(a, Duration::from_micros(10)).unwrap();
        let err = r.read(&mut [0u8; 4]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err:?}");
    }

    #[test]
    fn a_full_socket_buffer_blocks_the_writer_instead_of_failing() {
        let (a, b) = UnixStream::pair().unwrap();
        let (_r, mut w) = SpinStream::pair(a, Duration::from_micros(10)).unwrap();
        let reader = std::thread::spawn(move || {
            let mut b = b;
            let mut total = 0;
            let mut buf = vec![0u8; 65536];
            while total < 4 << 20 {
                total += b.read(&mut buf).unwrap();
            }
            total
        });
        let chunk = vec![7u8; 65536];
        for _ in 0..64 {
            w.write_all(&chunk).unwrap();
        }
        assert_eq!(reader.join().unwrap(), 4 << 20);
    }
}
