//! [`SpinStream`]: a Unix stream socket that polls briefly before it blocks,
//! and [`Deadline`]: one time limit for all the reads of a transaction.
//!
//! A blocking round trip between two processes costs one wake-up on each
//! side; on a nested host that is ~40 µs, four times an exit to user space.
//! Polling the (non-blocking) socket for a short while first answers a busy
//! peer in a few µs; an idle peer still ends in an ordinary blocking read
//! (which honours the socket's read timeout). A blocking read, rather than
//! a wait with epoll and a read after it, because its wake-up is the
//! quicker here (`io_regions`' sync read, alternate runs: 1.75x against
//! 1.92x and worse).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

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

/// A wait this much shorter than the socket's own timeout (a transaction's
/// later waits) sets the socket's timeout to what is left for it.
const SHORTEN_SLACK: Duration = Duration::from_millis(1);

/// One direction of a socket that spins for up to `spin` before blocking.
#[derive(Debug)]
pub struct SpinStream {
    stream: UnixStream,
    spin: Duration,
    /// In a transaction ([`Deadline`]): when its first read started, once
    /// one has.
    transaction: Option<Option<Instant>>,
}

impl SpinStream {
    /// Splits `stream` into a reader and a writer that poll for up to `spin`
    /// before blocking. The socket is switched to non-blocking mode.
    ///
    /// # Errors
    ///
    /// The socket cannot be duplicated or switched to non-blocking mode.
    pub fn pair(stream: UnixStream, spin: Duration) -> io::Result<(SpinStream, SpinStream)> {
        stream.set_nonblocking(true)?;
        let writer = stream.try_clone()?;
        let half = |stream| SpinStream { stream, spin, transaction: None };
        Ok((half(stream), half(writer)))
    }

    /// The socket itself (non-blocking), for what the stream cannot do,
    /// such as passing descriptors.
    pub fn get_ref(&self) -> &UnixStream {
        &self.stream
    }

    /// Runs one blocking call (`read`, else a write) with the socket in
    /// blocking mode, for at most the socket's timeout counted from `from`.
    ///
    /// The reader and the writer of a pair share the socket's non-blocking
    /// flag (one open file), so the other half may switch it back between
    /// the switch here and the call: the call then says "would block"
    /// without having waited. That is retried until the time is up. When
    /// less time is left than the socket's timeout (a transaction's later
    /// waits), the socket's timeout is set to what is left for the call,
    /// and put back after it.
    fn blocking<T>(
        &mut self,
        from: Instant,
        read: bool,
        mut f: impl FnMut(&mut UnixStream) -> io::Result<T>,
    ) -> io::Result<T> {
        let timeout = if read { self.stream.read_timeout()? } else { self.stream.write_timeout()? };
        let set = |stream: &UnixStream, t| if read { stream.set_read_timeout(t) } else { stream.set_write_timeout(t) };
        loop {
            let left = timeout.map(|t| t.saturating_sub(from.elapsed()));
            if left == Some(Duration::ZERO) {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "the peer did not answer in time"));
            }
            let shorten = matches!((left, timeout), (Some(l), Some(t)) if t - l > SHORTEN_SLACK);
            if shorten {
                set(&self.stream, left)?;
            }
            self.stream.set_nonblocking(false)?;
            let result = f(&mut self.stream);
            self.stream.set_nonblocking(true)?;
            if shorten {
                set(&self.stream, timeout)?;
            }
            match result {
                // Spurious, or the time is up: the check above tells.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => return other,
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
                        return self.blocking(from, true, |s| s.read(buf));
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
        match self.stream.write(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.blocking(start, false, |s| s.write(buf)),
            other => other,
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

    /// The other half of the pair switching the shared non-blocking flag
    /// back (as the writer does after a blocking write) while the reader
    /// waits never makes the read fail: it waits on until the data comes.
    #[test]
    fn a_read_waits_on_while_the_writer_half_toggles_the_shared_flag() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut r, w) = SpinStream::pair(a, Duration::ZERO).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let toggling = stop.clone();
        let toggler = std::thread::spawn(move || {
            while !toggling.load(std::sync::atomic::Ordering::Relaxed) {
                w.stream.set_nonblocking(true).unwrap();
                std::thread::yield_now();
            }
        });
        // Bytes that come one by one, later than the spin: each read blocks.
        let slow = std::thread::spawn(move || {
            let mut b = b;
            for i in 0..200u8 {
                std::thread::sleep(Duration::from_millis(1));
                b.write_all(&[i]).unwrap();
            }
            b
        });
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        let read = (0..200).try_for_each(|_| r.read_exact(&mut byte).map(|()| got.push(byte[0])));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        toggler.join().unwrap();
        drop(slow.join().unwrap());
        read.unwrap();
        assert_eq!(got, (0..200u8).collect::<Vec<_>>());
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

    /// The socket's timeout is remembered between waits, but asked again
    /// before a wait gives up: one lifted since (as the pin and bus
    /// sockets lift theirs after the handshake) is honoured.
    #[test]
    fn a_timeout_lifted_on_the_socket_after_a_wait_is_honoured() {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let (mut r, _w) = SpinStream::pair(a, Duration::ZERO).unwrap();
        assert_eq!(r.read(&mut [0u8; 1]).unwrap_err().kind(), io::ErrorKind::TimedOut, "50 ms, remembered");
        r.get_ref().set_read_timeout(None).unwrap();
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let mut b = b;
            b.write_all(b"x").unwrap();
            b
        });
        let mut byte = [0u8; 1];
        r.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"x");
        drop(late.join().unwrap());
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
