//! [`SpinStream`]: a Unix stream socket that polls briefly before it blocks.
//!
//! A blocking round trip between two processes costs one wake-up on each
//! side; on a nested host that is ~40 µs, four times an exit to user space.
//! Polling the (non-blocking) socket for a short while first answers a busy
//! peer in a few µs; an idle peer still ends in an ordinary blocking read
//! (which honours the socket's read timeout).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// One direction of a socket that spins for up to `spin` before blocking.
#[derive(Debug)]
pub struct SpinStream {
    stream: UnixStream,
    spin: Duration,
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
        Ok((SpinStream { stream, spin }, SpinStream { stream: writer, spin }))
    }

    /// The socket itself (non-blocking), for what the stream cannot do,
    /// such as passing descriptors.
    pub fn get_ref(&self) -> &UnixStream {
        &self.stream
    }

    /// Runs one blocking call with the socket in blocking mode.
    ///
    /// The reader and the writer of a pair share the socket's non-blocking
    /// flag (one open file), so the other half may switch it back between
    /// the switch here and the call: the call then says "would block"
    /// without having waited. That is retried; a "would block" after the
    /// socket's own timeout (`timeout`, the read or write timeout) has
    /// passed since `start`, when the caller's call began, is the timeout
    /// and is returned. (The caller's first try may itself have blocked,
    /// for the whole timeout, had the other half switched the flag: then
    /// nothing is tried again.)
    fn blocking<T>(
        &mut self,
        start: Instant,
        timeout: fn(&UnixStream) -> io::Result<Option<Duration>>,
        mut f: impl FnMut(&mut UnixStream) -> io::Result<T>,
    ) -> io::Result<T> {
        loop {
            if timeout(&self.stream)?.is_some_and(|t| start.elapsed() >= t) {
                return Err(io::Error::new(io::ErrorKind::WouldBlock, "timed out (the socket's timeout passed)"));
            }
            self.stream.set_nonblocking(false)?;
            let result = f(&mut self.stream);
            self.stream.set_nonblocking(true)?;
            match result {
                // Spurious, or the timeout: the check above tells.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => return other,
            }
        }
    }
}

impl Read for SpinStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let start = Instant::now();
        loop {
            match self.stream.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if start.elapsed() < self.spin {
                        std::hint::spin_loop();
                    } else {
                        return self.blocking(start, UnixStream::read_timeout, |s| s.read(buf));
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
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.blocking(start, UnixStream::write_timeout, |s| s.write(buf))
            }
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

    #[test]
    fn the_read_timeout_still_applies() {
        let (a, _b) = UnixStream::pair().unwrap();
        a.set_read_timeout(Some(Duration::from_millis(30))).unwrap();
        let (mut r, _w) = SpinStream::pair(a, Duration::from_micros(10)).unwrap();
        let err = r.read(&mut [0u8; 4]).unwrap_err();
        assert!(matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut), "{err:?}");
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
