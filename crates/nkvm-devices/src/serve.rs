//! Serving an I/O-region socket: what a device process links to put an
//! [`IoDevice`] behind a region the VMM assigned to a socket.
//!
//! A [`Server`] performs the device side of the handshake, then reads
//! requests, checks each against the region, runs it on the device, and
//! answers every non-posted one; posted writes get no reply. Requests are
//! read through a buffer and replies are batched: they go out when no
//! complete request is left in the input buffer, just before the next read
//! that may block, so a burst of posted writes followed by a read costs one
//! wake-up each way.
//!
//! Any malformed input ends [`Server::serve`] with the [`WireError`] naming
//! it; nothing is read or written outside the region and the device is not
//! called for the bad request. The caller logs the error and drops the
//! connection. The wire format is `docs/wire-format.md`.
//!
//! ```no_run
//! use std::os::unix::net::UnixStream;
//! use nkvm_devices::serve::serve;
//! use nkvm_devices::test_device::TestDevice;
//!
//! let stream = UnixStream::connect("/run/nkvm/region0.sock")?;
//! match serve(stream, &mut TestDevice::new()) {
//!     Ok(stats) => log::info!("VM closed the region after {stats:?}"),
//!     Err(e) => log::error!("dropping the region connection: {e}"),
//! }
//! # Ok::<(), std::io::Error>(())
//! ```

use std::io::{BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use nkvm_wire::handshake::VersionRange;
use nkvm_wire::ioregion::state::STATE_VERSION;
use nkvm_wire::ioregion::{
    self, device_handshake, Handshake, IoFrame, LoadStatus, RegionInfo, Reply, Request, StateAssembly, StateChunk,
    StateLoad, StateLoaded,
};
use nkvm_wire::spin::SpinStream;
use nkvm_wire::WireError;

/// The device interface served; the same trait as [`crate::bus::IoDevice`],
/// so every model works in process and behind a socket alike.
pub use crate::bus::IoDevice;

/// Replies are written out once this many bytes are pending, even if more
/// requests are buffered.
const MAX_PENDING_REPLIES: usize = 64 * Reply::FRAME_LEN;

/// What one connection served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServeStats {
    /// Reads answered.
    pub reads: u64,
    /// Non-posted writes answered.
    pub writes: u64,
    /// Posted writes served (never answered).
    pub posted_writes: u64,
    /// Sync barriers answered.
    pub syncs: u64,
    /// State requests answered.
    pub states: u64,
    /// States given to the device (taken or not).
    pub loads: u64,
}

/// The device side of one I/O-region connection.
#[derive(Debug)]
pub struct Server<R: Read, W: Write> {
    reader: BufReader<R>,
    writer: W,
    /// Encoded replies not yet written.
    pending: Vec<u8>,
    handshake: Handshake,
    stats: ServeStats,
}

impl Server<UnixStream, UnixStream> {
    /// Handshake on a connected stream socket, speaking
    /// [`VersionRange::IO_REGION`].
    ///
    /// # Errors
    ///
    /// [`WireError::Io`] if the socket cannot be duplicated, and the errors
    /// of [`Server::handshake`].
    pub fn over(stream: UnixStream) -> Result<Self, WireError> {
        let writer = stream.try_clone()?;
        Server::handshake(stream, writer, VersionRange::IO_REGION)
    }

    /// Handshake on an inherited socket (e.g. one end of a socketpair the
    /// VMM passed to this process). Turning a raw descriptor number into an
    /// [`OwnedFd`] is the caller's (`unsafe`) business.
    ///
    /// # Errors
    ///
    /// As for [`Server::over`].
    pub fn from_fd(fd: OwnedFd) -> Result<Self, WireError> {
        Server::over(UnixStream::from(fd))
    }

    /// Connect to the socket at `path` and handshake.
    ///
    /// # Errors
    ///
    /// [`WireError::Io`] if the connection fails, and as for
    /// [`Server::over`].
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, WireError> {
        Server::over(UnixStream::connect(path)?)
    }

    /// Accept one connection on `listener` and handshake.
    ///
    /// # Errors
    ///
    /// [`WireError::Io`] if accepting fails, and as for [`Server::over`].
    pub fn accept(listener: &UnixListener) -> Result<Self, WireError> {
        let (stream, _) = listener.accept()?;
        Server::over(stream)
    }
}

impl Server<SpinStream, SpinStream> {
    /// Accept one connection and handshake; between requests, poll the
    /// socket for up to `spin` before blocking (see [`SpinStream`]): a busy
    /// guest is answered without a wake-up on each access.
    ///
    /// # Errors
    ///
    /// As for [`Server::accept`].
    pub fn accept_spinning(listener: &UnixListener, spin: std::time::Duration) -> Result<Self, WireError> {
        let (stream, _) = listener.accept()?;
        let (reader, writer) = SpinStream::pair(stream, spin)?;
        Server::handshake(reader, writer, VersionRange::IO_REGION)
    }
}

impl<R: Read, W: Write> Server<R, W> {
    /// Perform the device side of the handshake over `reader` and `writer`
    /// (usually the two halves of one socket), speaking `supported`.
    ///
    /// # Errors
    ///
    /// The errors of [`ioregion::device_handshake`]: a first frame that is
    /// not a hello, a bad region, no common version, I/O and decoding
    /// errors.
    pub fn handshake(reader: R, mut writer: W, supported: VersionRange) -> Result<Self, WireError> {
        let mut reader = BufReader::new(reader);
        let handshake = device_handshake(&mut reader, &mut writer, supported)?;
        Ok(Server {
            reader,
            writer,
            pending: Vec::with_capacity(MAX_PENDING_REPLIES),
            handshake,
            stats: ServeStats::default(),
        })
    }

    /// The region the VM side assigned to this socket.
    pub fn region(&self) -> &RegionInfo {
        &self.handshake.region
    }

    /// The protocol version agreed on.
    pub fn version(&self) -> u16 {
        self.handshake.version
    }

    /// What was served so far.
    pub fn stats(&self) -> ServeStats {
        self.stats
    }

    /// Serve requests on `device` until the VM side closes the connection
    /// (between two frames); returns what was served.
    ///
    /// # Errors
    ///
    /// The first malformed input ([`WireError`] names it: unknown op, bad
    /// access size, offset outside the region, a frame that is not a
    /// request, an oversized or truncated frame, ...) or I/O error. The
    /// replies of requests served before it are discarded: the connection
    /// is to be dropped.
    pub fn serve<D: IoDevice + ?Sized>(&mut self, device: &mut D) -> Result<ServeStats, WireError> {
        loop {
            // About to block on the socket, or enough replies queued: send
            // them, so the VM side never waits on a reply we are sitting on.
            if self.reader.buffer().len() < Request::FRAME_LEN || self.pending.len() >= MAX_PENDING_REPLIES {
                self.flush_replies()?;
            }
            let frame = match ioregion::read_frame(&mut self.reader) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => return Err(self.fail(e)),
            };
            let request = match frame {
                IoFrame::Request(request) => request,
                IoFrame::StateRequest(ask) if self.handshake.version >= STATE_VERSION => {
                    // Everything before it in the stream is served: the state
                    // holds every write the VM side sent.
                    let state = device.save_state();
                    for chunk in StateChunk::split(ask.tag, state.as_deref()) {
                        self.pending.extend_from_slice(&chunk.encode());
                    }
                    self.stats.states += 1;
                    continue;
                }
                IoFrame::StateLoad(load) if self.handshake.version >= STATE_VERSION => {
                    if let Err(e) = self.load_state(load, device) {
                        return Err(self.fail(e));
                    }
                    continue;
                }
                IoFrame::StateRequest(_) | IoFrame::StateLoad(_) => {
                    return Err(self.fail(WireError::StateNotInVersion { version: self.handshake.version }))
                }
                other => return Err(self.fail(WireError::UnexpectedFrame { expected: "request", found: other.name() })),
            };
            match self.serve_request(request, device) {
                Ok(Some(reply)) => self.pending.extend_from_slice(&reply.encode()),
                Ok(None) => {}
                Err(e) => return Err(self.fail(e)),
            }
        }
        if let Err(e) = self.flush_replies() {
            log::debug!(
                "region {:#x}: VM side closed before taking {} reply bytes: {e}",
                self.handshake.region.id,
                self.pending.len()
            );
        }
        Ok(self.stats)
    }

    /// Check one request against the region and run it on `device`; the
    /// reply to send, if any. Used by [`Server::serve`]; public for callers
    /// with their own loop.
    ///
    /// # Errors
    ///
    /// [`WireError::SpaceMismatch`], [`WireError::OutsideRegion`]; the
    /// device is not called then.
    pub fn serve_request<D: IoDevice + ?Sized>(
        &mut self,
        request: Request,
        device: &mut D,
    ) -> Result<Option<Reply>, WireError> {
        request.validate_in(&self.handshake.region)?;
        Ok(match request {
            Request::Read { tag, offset, size, .. } => {
                let mut bytes = [0u8; 8];
                device.read(offset, &mut bytes[..size.bytes()]);
                self.stats.reads += 1;
                Some(Reply::Read { tag, size, data: u64::from_le_bytes(bytes) })
            }
            Request::Write { tag, offset, size, data, posted, .. } => {
                device.write(offset, &data.to_le_bytes()[..size.bytes()]);
                if posted {
                    self.stats.posted_writes += 1;
                    None
                } else {
                    self.stats.writes += 1;
                    Some(Reply::Write { tag })
                }
            }
            Request::Sync { tag } => {
                self.stats.syncs += 1;
                Some(Reply::Sync { tag })
            }
        })
    }

    /// Reads the chunks of `load`, gives the state to `device` and queues
    /// its answer (with the model's reason, if it refused).
    fn load_state<D: IoDevice + ?Sized>(&mut self, load: StateLoad, device: &mut D) -> Result<(), WireError> {
        let mut assembly = StateAssembly::new(load.tag);
        let state = loop {
            match ioregion::read_frame(&mut self.reader)? {
                Some(IoFrame::StateChunk(chunk)) if chunk.total == load.total => {
                    if let Some(state) = assembly.push(&chunk)? {
                        break state;
                    }
                }
                Some(IoFrame::StateChunk(chunk)) => {
                    return Err(WireError::BadStateChunk {
                        offset: chunk.offset,
                        len: chunk.len,
                        total: chunk.total,
                        reason: "the total is not the state load's",
                    })
                }
                Some(other) => return Err(WireError::UnexpectedFrame { expected: "state chunk", found: other.name() }),
                None => return Err(WireError::ShortRead { got: 0, expected: StateChunk::FRAME_LEN }),
            }
        };
        let (status, reason) = match device.load_state(&state) {
            None => (LoadStatus::NoState, None),
            Some(Ok(())) => (LoadStatus::Taken, None),
            Some(Err(reason)) => (LoadStatus::Refused, Some(reason)),
        };
        self.pending.extend_from_slice(&StateLoaded { tag: load.tag, status }.encode());
        if let Some(reason) = reason {
            for chunk in StateChunk::split(load.tag, Some(reason.as_bytes())) {
                self.pending.extend_from_slice(&chunk.encode());
            }
        }
        self.stats.loads += 1;
        Ok(())
    }

    fn flush_replies(&mut self) -> Result<(), WireError> {
        if !self.pending.is_empty() {
            self.writer.write_all(&self.pending)?;
            self.pending.clear();
        }
        self.writer.flush()?;
        Ok(())
    }

    /// Drop the queued replies of a connection about to be dropped.
    fn fail(&mut self, error: WireError) -> WireError {
        self.pending.clear();
        error
    }
}

/// Handshake on `stream` and serve `device` until the VM side closes it.
///
/// # Errors
///
/// As for [`Server::over`] and [`Server::serve`].
pub fn serve<D: IoDevice + ?Sized>(stream: UnixStream, device: &mut D) -> Result<ServeStats, WireError> {
    Server::over(stream)?.serve(device)
}

#[cfg(test)]
mod tests;
