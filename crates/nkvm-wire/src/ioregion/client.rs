//! A blocking VM-side endpoint: one access at a time, posted writes
//! batched until the next non-posted access or an explicit flush.

use std::io::{self, BufWriter, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::{
    read_frame, vm_handshake, write_frame, AccessSize, Handshake, InFlight, IoFrame, Op, RegionInfo, Reply, Request,
};
use crate::error::WireError;
use crate::handshake::VersionRange;
use crate::spin::{Deadline, SpinStream};

/// The VM side of one I/O-region connection.
///
/// Every method that waits for a reply first flushes the posted writes
/// queued before it, so the device sees them in guest order. Any error
/// leaves the connection unusable: drop the client.
///
/// Each answer (a reply, the hello-ack, a state load's answer) is one
/// [`Deadline`] transaction: over a [`SpinStream`] the socket's read
/// timeout bounds the whole answer, however it is cut up.
#[derive(Debug)]
pub struct Client<R: Read + Deadline, W: Write> {
    reader: R,
    writer: BufWriter<W>,
    handshake: Handshake,
    in_flight: InFlight,
    /// How long one state may take to arrive ([`STATE_DEADLINE`]).
    pub(crate) state_deadline: Duration,
}

/// How long a device's state may take to arrive in all: no read of it
/// starts later (a read under way has the socket's own timeout), so a model
/// that sends it slowly, by chunks or by bytes, cannot hold a snapshot, or
/// a switch-over with the guest paused, for longer. A whole 1 MiB state
/// takes milliseconds.
pub const STATE_DEADLINE: Duration = Duration::from_secs(10);

impl Client<SpinStream, SpinStream> {
    /// Handshake over a connected stream socket, polling for up to `spin`
    /// before each blocking wait (see [`SpinStream`]).
    ///
    /// # Errors
    ///
    /// As for [`Client::over`].
    pub fn over_spinning(stream: UnixStream, region: RegionInfo, spin: Duration) -> Result<Self, WireError> {
        let (reader, writer) = SpinStream::pair(stream, spin)?;
        Client::connect(reader, writer, region)
    }
}

impl Client<UnixStream, UnixStream> {
    /// Handshake over a connected stream socket (see [`Client::connect`]).
    ///
    /// # Errors
    ///
    /// [`WireError::Io`] if the socket cannot be duplicated, and the errors
    /// of [`Client::connect`].
    pub fn over(stream: UnixStream, region: RegionInfo) -> Result<Self, WireError> {
        let writer = stream.try_clone()?;
        Client::connect(stream, writer, region)
    }
}

impl<R: Read + Deadline, W: Write> Client<R, W> {
    /// Handshake for `region`, offering [`VersionRange::IO_REGION`].
    ///
    /// # Errors
    ///
    /// The errors of [`vm_handshake`].
    pub fn connect(mut reader: R, writer: W, region: RegionInfo) -> Result<Self, WireError> {
        let mut writer = BufWriter::new(writer);
        reader.begin();
        let handshake = vm_handshake(&mut reader, &mut writer, region, VersionRange::IO_REGION);
        reader.end();
        let handshake = handshake?;
        Ok(Client { reader, writer, handshake, in_flight: InFlight::new(), state_deadline: STATE_DEADLINE })
    }

    /// What the handshake agreed on.
    pub fn handshake(&self) -> &Handshake {
        &self.handshake
    }

    /// Read `size` bytes at `offset` in the region; waits for the reply.
    ///
    /// # Errors
    ///
    /// [`WireError::OutsideRegion`] (nothing sent), and the errors of a
    /// round trip: I/O, decoding, a closed connection
    /// ([`WireError::ShortRead`]), a reply not matching the request.
    pub fn read(&mut self, offset: u64, size: AccessSize) -> Result<u64, WireError> {
        let tag = self.in_flight.next_tag();
        let request = Request::Read { tag, space: self.handshake.region.space, offset, size };
        match self.round_trip(request)? {
            Reply::Read { data, .. } => Ok(data),
            // Unreachable: `InFlight::complete` checked the reply's op.
            other => Err(WireError::ReplyMismatch { tag, request: Op::Read, reply: other.op() }),
        }
    }

    /// Write the low `size` bytes of `data` at `offset`; waits until the
    /// device has served it.
    ///
    /// # Errors
    ///
    /// As for [`Client::read`].
    pub fn write(&mut self, offset: u64, size: AccessSize, data: u64) -> Result<(), WireError> {
        let request = self.write_request(offset, size, data, false);
        self.round_trip(request).map(drop)
    }

    /// Queue a posted write: it goes out with the next flush or non-posted
    /// access (or when the buffer fills), and no reply comes back.
    ///
    /// # Errors
    ///
    /// [`WireError::OutsideRegion`] (nothing queued), [`WireError::Io`].
    pub fn post(&mut self, offset: u64, size: AccessSize, data: u64) -> Result<(), WireError> {
        let request = self.write_request(offset, size, data, true);
        request.validate_in(&self.handshake.region)?;
        write_frame(&mut self.writer, &IoFrame::Request(request))
    }

    /// Barrier: returns once the device has served everything sent before.
    ///
    /// # Errors
    ///
    /// As for [`Client::read`].
    pub fn sync(&mut self) -> Result<(), WireError> {
        let tag = self.in_flight.next_tag();
        self.round_trip(Request::Sync { tag }).map(drop)
    }

    /// The device model's saved state (version 2): asked for in the stream,
    /// so every write sent before (posted ones too) is served first; waits
    /// for the whole answer.
    ///
    /// # Errors
    ///
    /// [`WireError::StateNotInVersion`] (nothing sent) on a version 1
    /// connection, [`WireError::NoDeviceState`] if the model has none (the
    /// connection stays usable), and otherwise the errors of a round trip
    /// and of [`StateAssembly::push`](super::StateAssembly::push), after
    /// which the connection is out of step and must be dropped.
    pub fn save_state(&mut self) -> Result<Vec<u8>, WireError> {
        if self.handshake.version < super::state::STATE_VERSION {
            return Err(WireError::StateNotInVersion { version: self.handshake.version });
        }
        let tag = self.in_flight.next_tag();
        write_frame(&mut self.writer, &IoFrame::StateRequest(super::StateRequest { tag }))?;
        self.flush()?;
        self.read_chunks(tag)
    }

    /// Gives the device model `state` to take (version 2), in the stream
    /// after every write sent before; waits for its answer.
    ///
    /// # Errors
    ///
    /// [`WireError::StateNotInVersion`] (nothing sent) on a version 1
    /// connection, [`WireError::StateTooLarge`] (nothing sent) past 1 MiB,
    /// [`WireError::StateRefused`] with the model's reason and
    /// [`WireError::NoDeviceState`] (the connection stays usable after
    /// either), and otherwise the errors of a round trip, after which the
    /// connection is out of step and must be dropped.
    pub fn load_state(&mut self, state: &[u8]) -> Result<(), WireError> {
        use super::state::{LoadStatus, MAX_STATE_LEN};
        if self.handshake.version < super::state::STATE_VERSION {
            return Err(WireError::StateNotInVersion { version: self.handshake.version });
        }
        let total = u32::try_from(state.len()).unwrap_or(u32::MAX);
        if total > MAX_STATE_LEN {
            return Err(WireError::StateTooLarge { total });
        }
        let tag = self.in_flight.next_tag();
        write_frame(&mut self.writer, &IoFrame::StateLoad(super::StateLoad { tag, total }))?;
        for chunk in super::StateChunk::split(tag, Some(state)) {
            write_frame(&mut self.writer, &IoFrame::StateChunk(chunk))?;
        }
        self.flush()?;
        self.reader.begin();
        let answer = read_frame(&mut self.reader);
        self.reader.end();
        let loaded = match answer? {
            Some(IoFrame::StateLoaded(loaded)) if loaded.tag == tag => loaded,
            Some(IoFrame::StateLoaded(other)) => return Err(WireError::UnknownTag { tag: other.tag }),
            Some(other) => return Err(WireError::UnexpectedFrame { expected: "state loaded", found: other.name() }),
            None => return Err(WireError::ShortRead { got: 0, expected: super::StateLoaded::FRAME_LEN }),
        };
        match loaded.status {
            LoadStatus::Taken => Ok(()),
            LoadStatus::NoState => Err(WireError::NoDeviceState),
            LoadStatus::Refused => {
                let reason = self.read_chunks(tag)?;
                Err(WireError::StateRefused { reason: String::from_utf8_lossy(&reason).into_owned() })
            }
        }
    }

    /// The state chunks answering tag `tag`, joined.
    fn read_chunks(&mut self, tag: u32) -> Result<Vec<u8>, WireError> {
        let mut assembly = super::StateAssembly::new(tag);
        let limit = self.state_deadline;
        let mut reader = Until { inner: &mut self.reader, until: Instant::now() + limit };
        let (mut received, mut total) = (0usize, 0u32);
        loop {
            let frame = match read_frame(&mut reader) {
                Err(WireError::Io(e)) if e.kind() == io::ErrorKind::TimedOut && reader.passed() => {
                    return Err(WireError::StateTooSlow { received, total, limit });
                }
                other => other?,
            };
            match frame {
                Some(IoFrame::StateChunk(chunk)) => {
                    if let Some(state) = assembly.push(&chunk)? {
                        return Ok(state);
                    }
                    received += usize::from(chunk.len);
                    total = chunk.total;
                }
                Some(other) => return Err(WireError::UnexpectedFrame { expected: "state chunk", found: other.name() }),
                None => return Err(WireError::ShortRead { got: 0, expected: super::StateChunk::FRAME_LEN }),
            }
        }
    }

    /// Send the queued posted writes now, without waiting for anything.
    ///
    /// # Errors
    ///
    /// [`WireError::Io`].
    pub fn flush(&mut self) -> Result<(), WireError> {
        self.writer.flush().map_err(WireError::Io)
    }

    /// Drops the connection without sending what is queued (posted writes
    /// not yet flushed): dropping the client instead flushes them first,
    /// which against a device that stopped reading waits out the write
    /// timeout again.
    pub fn abandon(self) {
        let (_writer, _unsent) = self.writer.into_parts();
    }

    fn write_request(&mut self, offset: u64, size: AccessSize, data: u64, posted: bool) -> Request {
        Request::Write {
            tag: self.in_flight.next_tag(),
            space: self.handshake.region.space,
            offset,
            size,
            data: data & size.mask(),
            posted,
        }
    }

    fn round_trip(&mut self, request: Request) -> Result<Reply, WireError> {
        request.validate_in(&self.handshake.region)?;
        self.in_flight.track(&request)?;
        write_frame(&mut self.writer, &IoFrame::Request(request))?;
        self.flush()?;
        self.reader.begin();
        let answer = read_frame(&mut self.reader);
        self.reader.end();
        match answer? {
            Some(IoFrame::Reply(reply)) => {
                self.in_flight.complete(&reply)?;
                Ok(reply)
            }
            Some(other) => Err(WireError::UnexpectedFrame { expected: "reply", found: other.name() }),
            None => Err(WireError::ShortRead { got: 0, expected: Reply::FRAME_LEN }),
        }
    }
}

/// A reader that starts no read after `until` (a read under way still has
/// the socket's own timeout): what bounds a whole state's arrival.
struct Until<'a, R> {
    inner: &'a mut R,
    until: Instant,
}

impl<R> Until<'_, R> {
    fn passed(&self) -> bool {
        Instant::now() > self.until
    }
}

impl<R: Read> Read for Until<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.passed() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "the state's deadline has passed"));
        }
        self.inner.read(buf)
    }
}
