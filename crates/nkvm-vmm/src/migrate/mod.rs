//! Live migration: pre-copy rounds over the dirty log while the guest
//! runs, then a short pause to send the rest and every state; the
//! destination (`nkvm run --incoming`) resumes the guest and says so.
//! The byte format is in [`stream`] and `docs/migration.md`.

pub mod receive;
pub mod send;
pub mod stream;

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use serde_json::{json, Value};

/// Why a migration failed (on either side).
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The address is not `tcp:HOST:PORT` or `unix:PATH`.
    #[error("bad migration address {0:?}: use tcp:HOST:PORT or unix:PATH")]
    BadAddress(String),
    /// Connecting, listening or accepting failed.
    #[error("cannot {op} {addr}")]
    Connect {
        /// What was tried.
        op: &'static str,
        /// The address.
        addr: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The link broke (the peer died, the connection dropped, a timeout).
    #[error("the migration link failed while {doing}")]
    Link {
        /// What was being done.
        doing: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The peer sent something this nkvm does not accept.
    #[error("bad migration stream at offset {offset}: {why}")]
    Stream {
        /// Offset in the stream.
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// The destination refused the guest.
    #[error("the destination refused the guest: {0}")]
    Refused(String),
    /// The operator cancelled the migration (`nkvm ctl cancel`) before
    /// switch-over.
    #[error("cancelled by the operator before switch-over")]
    Cancelled,
    /// The destination was told to run the guest and did not confirm it:
    /// it may be running it. The source keeps the guest paused.
    #[error(
        "the destination was told to run the guest but did not confirm it ({0}); the guest stays paused here \
         so that it never runs in two places: if the destination is not running it, `nkvm ctl resume` runs it here"
    )]
    InDoubt(String),
    /// The machine could not be paused or its state saved.
    #[error(transparent)]
    Running(#[from] crate::running::RunningError),
    /// The dirty log failed.
    #[error("dirty log")]
    DirtyLog(#[source] nkvm::VmError),
    /// Guest memory could not be read or written.
    #[error("guest memory")]
    Memory(#[source] nkvm::MemoryError),
    /// The received machine could not be created.
    #[error("cannot create the received machine")]
    Vm(#[source] nkvm::VmError),
    /// The stream's machine has more RAM than this host has memory.
    #[error(
        "the stream's machine has {claimed} MiB of RAM, more than this host's {host} MiB of memory and swap: \
         its guest could not be given it here"
    )]
    TooBig {
        /// The machine's RAM, MiB.
        claimed: u64,
        /// This host's RAM and swap, MiB.
        host: u64,
    },
    /// The received state was refused.
    #[error(transparent)]
    State(#[from] crate::snapshot::SnapshotError),
}

impl MigrateError {
    pub(crate) fn link(doing: &'static str, source: io::Error) -> Self {
        // SO_SNDTIMEO/SO_RCVTIMEO expiring reads as EAGAIN: say what it means.
        let source = match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
                io::ErrorKind::TimedOut,
                format!("timed out: the peer stopped taking or sending data ({source})"),
            ),
            _ => source,
        };
        Self::Link { doing, source }
    }
}

/// How long one blocked send may wait before the link counts as failed, so
/// a destination that stops reading cannot hold the source, or its API,
/// for good. The kernel bounds each call: a call that sent part of its
/// data returns it, so a stalled link fails within two or three of these.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a migration goes: `tcp:HOST:PORT` or `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP address (`HOST:PORT`).
    Tcp(String),
    /// A Unix socket path.
    Unix(String),
}

impl std::str::FromStr for Endpoint {
    type Err = MigrateError;

    fn from_str(s: &str) -> Result<Self, MigrateError> {
        match s.split_once(':') {
            Some(("tcp", addr)) if addr.contains(':') => Ok(Self::Tcp(addr.to_string())),
            Some(("unix", path)) if !path.is_empty() => Ok(Self::Unix(path.to_string())),
            _ => Err(MigrateError::BadAddress(s.to_string())),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "tcp:{a}"),
            Self::Unix(p) => write!(f, "unix:{p}"),
        }
    }
}

/// How long a connection to a destination may take to be accepted: a host
/// that drops the connection requests would otherwise hold the migration
/// (and an operator's `cancel`) for the kernel's two minutes of retries.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to `addr` (`HOST:PORT`), its addresses in turn, all within
/// [`CONNECT_TIMEOUT`] (the name's lookup before them is the resolver's).
fn connect_tcp(addr: &str) -> io::Result<TcpStream> {
    let deadline = std::time::Instant::now() + CONNECT_TIMEOUT;
    let mut last = None;
    for a in addr.to_socket_addrs()? {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        match TcpStream::connect_timeout(&a, left) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the host name has no address")))
}

/// One migration connection.
#[derive(Debug)]
pub enum Conn {
    /// Over TCP (Nagle off).
    Tcp(TcpStream),
    /// Over a Unix socket.
    Unix(UnixStream),
}

impl Endpoint {
    /// Connects to a listening destination.
    pub fn connect(&self) -> Result<Conn, MigrateError> {
        let err = |source| MigrateError::Connect { op: "connect to", addr: self.to_string(), source };
        Ok(match self {
            Self::Tcp(a) => {
                let s = connect_tcp(a).map_err(err)?;
                s.set_nodelay(true).map_err(err)?;
                Conn::Tcp(s)
            }
            Self::Unix(p) => Conn::Unix(UnixStream::connect(p).map_err(err)?),
        })
    }

    /// Listens: a source can connect once this returns (so a message
    /// saying so is only printed after it).
    pub fn listen(&self) -> Result<Listener, MigrateError> {
        let err = |source| MigrateError::Connect { op: "listen on", addr: self.to_string(), source };
        Ok(match self {
            Self::Tcp(a) => Listener::Tcp(TcpListener::bind(a).map_err(err)?, self.clone()),
            Self::Unix(p) => {
                // A stale socket is replaced; a file is never removed.
                crate::api::clear_stale_socket(std::path::Path::new(p)).map_err(err)?;
                Listener::Unix(UnixListener::bind(p).map_err(err)?, self.clone())
            }
        })
    }
}

/// A listening [`Endpoint`], waiting for its source. A Unix socket's path
/// is removed when the listener goes (if it still holds a socket).
#[derive(Debug)]
pub enum Listener {
    /// On a TCP address.
    Tcp(TcpListener, Endpoint),
    /// On a Unix socket path.
    Unix(UnixListener, Endpoint),
}

impl Listener {
    /// Accepts the next connection.
    pub fn accept(&self) -> Result<Conn, MigrateError> {
        let err = |op, at: &Endpoint| {
            let addr = at.to_string();
            move |source| MigrateError::Connect { op, addr, source }
        };
        Ok(match self {
            Self::Tcp(listener, at) => {
                let (s, _) = listener.accept().map_err(err("accept on", at))?;
                s.set_nodelay(true).map_err(err("configure", at))?;
                Conn::Tcp(s)
            }
            Self::Unix(listener, at) => Conn::Unix(listener.accept().map_err(err("accept on", at))?.0),
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Self::Unix(_, Endpoint::Unix(p)) = self {
            // Only if it is still a socket (a file put there since stays).
            crate::api::remove(std::path::Path::new(p));
        }
    }
}

/// Reads from a connection until a deadline: each read waits at most for
/// what is left of the time, so a peer that trickles bytes cannot stretch
/// a wait past it (a socket's read timeout bounds each read alone).
pub(crate) struct Until<'a> {
    conn: &'a mut Conn,
    until: std::time::Instant,
    limit: std::time::Duration,
    what: &'static str,
}

impl<'a> Until<'a> {
    /// Reads `what` from `conn` within `limit` from now.
    pub(crate) fn new(conn: &'a mut Conn, limit: std::time::Duration, what: &'static str) -> Self {
        Self { conn, until: std::time::Instant::now() + limit, limit, what }
    }
}

impl io::Read for Until<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let late = || {
            let why = format!("{} took longer than {:?}", self.what, self.limit);
            io::Error::new(io::ErrorKind::TimedOut, why)
        };
        let left = self.until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(late());
        }
        self.conn.set_read_timeout(Some(left))?;
        match self.conn.read(buf) {
            // SO_RCVTIMEO, set to the time left, expired.
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => Err(late()),
            other => other,
        }
    }
}

impl Conn {
    /// Another handle on the same connection.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Self::Tcp(s) => Self::Tcp(s.try_clone()?),
            Self::Unix(s) => Self::Unix(s.try_clone()?),
        })
    }

    /// Shuts the connection down both ways: a send or read blocked on it
    /// returns at once.
    pub fn shutdown(&self) {
        let _ = match self {
            Self::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Self::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }

    /// Bounds how long a send may block.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_write_timeout(t),
            Self::Unix(s) => s.set_write_timeout(t),
        }
    }

    /// Bounds the wait for the peer's answer.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_read_timeout(t),
            Self::Unix(s) => s.set_read_timeout(t),
        }
    }
}

impl std::os::fd::AsFd for Conn {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Self::Tcp(s) => s.as_fd(),
            Self::Unix(s) => s.as_fd(),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.flush(),
            Self::Unix(s) => s.flush(),
        }
    }
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Phase {
    /// None started.
    #[default]
    None,
    /// Connecting to the destination.
    Connecting,
    /// Sending memory while the guest runs.
    PreCopy,
    /// The guest is paused; the rest and the state are being sent.
    SwitchOver,
    /// The destination runs the guest.
    Done,
    /// Failed; the guest runs on here.
    Failed,
    /// The destination was told to run the guest and did not confirm it;
    /// the guest stays paused here until an operator resumes it.
    InDoubt,
}

/// A migration's progress, as `info` shows it.
#[derive(Debug, Clone, Default)]
pub struct MigrationStatus {
    /// Where it is.
    pub phase: Phase,
    /// The destination.
    pub to: String,
    /// Completed pre-copy rounds (round 0 is the full copy).
    pub rounds: u32,
    /// Pages sent so far (zero pages included).
    pub pages: u64,
    /// Bytes on the link so far.
    pub bytes: u64,
    /// Link throughput so far, MB/s.
    pub mb_per_s: f64,
    /// Pages found dirty in the last round.
    pub last_round_pages: u64,
    /// What the pause would cost now, by the last round's size and the throughput, ms.
    pub expected_downtime_ms: f64,
    /// The downtime target, ms.
    pub downtime_target_ms: u64,
    /// Total time, ms (when done or failed).
    pub total_ms: f64,
    /// Time the guest was paused, ms (when done or failed): from asking the
    /// vCPUs to park to the destination's answer.
    pub downtime_ms: f64,
    /// Of the downtime: parking the vCPUs (each saves its state), ms.
    pub park_ms: f64,
    /// Of the downtime: pages sent while paused.
    pub switchover_pages: u64,
    /// Of the downtime: from `END` sent to the answer (the destination
    /// restoring), ms.
    pub answer_ms: f64,
    /// Starting the dirty log (one memory-map change of the slots' flags), ms.
    pub log_start_ms: f64,
    /// Draining what the started log held, which arms KVM's write
    /// protection in budgets while the guest runs, ms.
    pub log_arm_ms: f64,
    /// Why it failed.
    pub error: Option<String>,
}

impl MigrationStatus {
    /// Whether it is between start and end.
    pub fn active(&self) -> bool {
        matches!(self.phase, Phase::Connecting | Phase::PreCopy | Phase::SwitchOver)
    }

    /// The status as `info` shows it.
    pub fn to_json(&self) -> Value {
        let phase = match self.phase {
            Phase::None => "none",
            Phase::Connecting => "connecting",
            Phase::PreCopy => "precopy",
            Phase::SwitchOver => "switchover",
            Phase::Done => "done",
            Phase::Failed => "failed",
            Phase::InDoubt => "in-doubt",
        };
        json!({
            "phase": phase,
            "to": self.to,
            "rounds": self.rounds,
            "pages": self.pages,
            "bytes": self.bytes,
            "mb_per_s": self.mb_per_s,
            "last_round_pages": self.last_round_pages,
            "expected_downtime_ms": self.expected_downtime_ms,
            "downtime_target_ms": self.downtime_target_ms,
            "total_ms": self.total_ms,
            "downtime_ms": self.downtime_ms,
            "park_ms": self.park_ms,
            "switchover_pages": self.switchover_pages,
            "answer_ms": self.answer_ms,
            "log_start_ms": self.log_start_ms,
            "log_arm_ms": self.log_arm_ms,
            "error": self.error,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_or_are_refused() {
        assert_eq!("tcp:127.0.0.1:4444".parse::<Endpoint>().unwrap(), Endpoint::Tcp("127.0.0.1:4444".into()));
        assert_eq!("unix:/tmp/m.sock".parse::<Endpoint>().unwrap(), Endpoint::Unix("/tmp/m.sock".into()));
        for bad in ["tcp:4444", "udp:1.2.3.4:5", "unix:", "/tmp/x"] {
            let err = bad.parse::<Endpoint>().unwrap_err().to_string();
            assert!(err.contains("tcp:HOST:PORT or unix:PATH"), "{err}");
        }
    }

    /// `--incoming unix:PATH` replaces a socket left at PATH, but a file
    /// there is refused and left as it is, when listening and after.
    #[test]
    fn a_unix_listener_never_removes_a_file_that_is_not_a_socket() {
        let dir = std::env::temp_dir().join(format!("nkvm-listen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("incoming");
        std::fs::write(&path, b"precious").unwrap();
        let endpoint = Endpoint::Unix(path.to_str().unwrap().to_string());
        let err = crate::machine::intake::chain(&endpoint.listen().unwrap_err());
        assert!(err.contains("is not a socket"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        std::fs::remove_file(&path).unwrap();
        // A stale socket is replaced; the listener's own goes with it.
        drop(UnixListener::bind(&path).unwrap());
        let listener = endpoint.listen().expect("a stale socket is replaced");
        drop(listener);
        assert!(!path.exists(), "the listener's socket goes with it");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A peer that sends a byte now and then, each within any one read's
    /// timeout, cannot stretch a record past the deadline (a paused source
    /// waits at most that long for its answer).
    #[test]
    fn a_trickled_record_ends_at_the_deadline() {
        let (near, mut far) = UnixStream::pair().unwrap();
        let trickle = std::thread::spawn(move || {
            // A record of 16 bytes, a byte every 50 ms: 1 s in all.
            for byte in [1u8, 16, 0, 0, 0].into_iter().chain([b'x'; 16]) {
                if far.write_all(&[byte]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let mut conn = Conn::Unix(near);
        let started = std::time::Instant::now();
        let mut timed = Until::new(&mut conn, Duration::from_millis(300), "the destination's answer");
        let err = stream::RecordReader::new(&mut timed).next().map(|_| ()).unwrap_err();
        let msg = crate::machine::intake::chain(&err);
        assert!(msg.contains("the destination's answer took longer than 300ms"), "{msg}");
        assert!(started.elapsed() < Duration::from_millis(700), "ended after {:?}", started.elapsed());
        drop(conn);
        trickle.join().unwrap();
    }
}
