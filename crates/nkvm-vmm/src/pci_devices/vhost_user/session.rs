//! The start-up handshake with a vhost-user backend: connecting (with a
//! few retries while the socket refuses), `SET_OWNER`, the features and
//! protocol features nkvm needs or takes, and the device configuration.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;

use super::{DeviceKind, VhostUserError, LOG_ALL};

/// How long one request on the socket may take before the backend counts
/// as stuck.
pub(super) const SOCKET_TIMEOUT: Duration = Duration::from_secs(5);
/// Connection attempts 100 ms apart while the socket refuses.
const CONNECT_RETRIES: u32 = 5;
/// `VIRTIO_F_VERSION_1`.
const VERSION_1: u64 = 1 << 32;

/// Bounds a sequence of requests on a backend's socket: unless dropped
/// within the limit, it shuts the socket down, so the request waiting on it
/// fails. The socket's own timeout is not enough: the `vhost` crate retries
/// a read that times out (`EAGAIN`) for ever, so a backend that never
/// answers would hang the thread (a vCPU's, at `DRIVER_OK`) with it.
pub(super) struct Deadline {
    done: Arc<(Mutex<bool>, Condvar)>,
    watcher: Option<thread::JoinHandle<()>>,
}

impl Deadline {
    /// Arms the deadline on `socket` (a clone of the frontend's connection).
    pub(super) fn arm(socket: &UnixStream, limit: Duration) -> io::Result<Self> {
        let socket = socket.try_clone()?;
        let done = Arc::new((Mutex::new(false), Condvar::new()));
        let seen = done.clone();
        let watcher = thread::Builder::new().name("vhost-user-deadline".into()).spawn(move || {
            let (lock, wake) = &*seen;
            let finished = lock.lock().unwrap_or_else(|p| p.into_inner());
            let (finished, _) = wake.wait_timeout_while(finished, limit, |f| !*f).unwrap_or_else(|p| p.into_inner());
            if !*finished {
                log::error!("vhost-user: the backend did not answer within {limit:?}; dropping the connection");
                let _ = socket.shutdown(std::net::Shutdown::Both);
            }
        })?;
        Ok(Self { done, watcher: Some(watcher) })
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        let (lock, wake) = &*self.done;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        wake.notify_all();
        if let Some(watcher) = self.watcher.take() {
            let _ = watcher.join();
        }
    }
}

/// A connection to a backend after the start-up handshake.
pub(super) struct Session {
    pub(super) frontend: Frontend,
    /// A clone of the frontend's connection, for the messages sent without
    /// the `vhost` crate (`SET_LOG_BASE`).
    pub(super) raw: UnixStream,
    /// What the backend offers (virtio features).
    pub(super) backend_features: u64,
    /// The device configuration, as `GET_CONFIG` returned it.
    pub(super) config: Vec<u8>,
    /// Set-up messages are acknowledged.
    pub(super) reply_ack: bool,
    /// `VHOST_USER_PROTOCOL_F_LOG_SHMFD` was negotiated.
    pub(super) log_shmfd: bool,
}

impl Session {
    /// Connects to `socket` and asks the backend what it offers: owner,
    /// features, protocol features (`CONFIG`; `REPLY_ACK` and `LOG_SHMFD`
    /// taken when offered), the device configuration.
    pub(super) fn open(socket: &Path, kind: &DeviceKind) -> Result<Self, VhostUserError> {
        let path = socket.to_path_buf();
        let connect_err = |source| VhostUserError::Connect { socket: path.clone(), source };
        // A backend that has bound its socket but not yet listened refuses
        // for a moment (the vhost crate's own connect retries too).
        let mut tries = 0;
        let stream = loop {
            match UnixStream::connect(socket) {
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused && tries < CONNECT_RETRIES => {
                    tries += 1;
                    thread::sleep(Duration::from_millis(100));
                }
                other => break other.map_err(connect_err)?,
            }
        };
        stream.set_read_timeout(Some(SOCKET_TIMEOUT)).map_err(connect_err)?;
        stream.set_write_timeout(Some(SOCKET_TIMEOUT)).map_err(connect_err)?;
        let raw = stream.try_clone().map_err(connect_err)?;
        let _deadline = Deadline::arm(&raw, SOCKET_TIMEOUT * 2).map_err(connect_err)?;
        // The frontend refuses queue indexes past the number it is given.
        let mut frontend = Frontend::from_stream(stream, kind.queue_max_sizes.len() as u64);
        let req = |request: &'static str| {
            let socket = path.clone();
            move |source| VhostUserError::Request { socket, request, source }
        };
        let missing = |what: &'static str| VhostUserError::Missing { socket: path.clone(), what };
        frontend.set_owner().map_err(req("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(req("GET_FEATURES"))?;
        if backend_features & VERSION_1 == 0 {
            return Err(missing("VIRTIO_F_VERSION_1"));
        }
        if backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(missing("VHOST_USER_F_PROTOCOL_FEATURES"));
        }
        let protocol = frontend.get_protocol_features().map_err(req("GET_PROTOCOL_FEATURES"))?;
        if !protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(missing("VHOST_USER_PROTOCOL_F_CONFIG"));
        }
        // REPLY_ACK, where offered, makes every set-up message wait for the
        // backend to have carried it out (and report a failure).
        let reply_ack = protocol.contains(VhostUserProtocolFeatures::REPLY_ACK);
        let mut wanted = VhostUserProtocolFeatures::CONFIG;
        if reply_ack {
            wanted |= VhostUserProtocolFeatures::REPLY_ACK;
        }
        // The dirty log, shared through a memfd.
        let log_shmfd = protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD);
        if log_shmfd {
            wanted |= VhostUserProtocolFeatures::LOG_SHMFD;
        }
        frontend.set_protocol_features(wanted).map_err(req("SET_PROTOCOL_FEATURES"))?;
        if reply_ack {
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let empty = vec![0u8; kind.config_size as usize];
        let (_, config) = frontend
            .get_config(0, kind.config_size, VhostUserConfigFlags::empty(), &empty)
            .map_err(req("GET_CONFIG"))?;
        Ok(Self { frontend, raw, backend_features, config, reply_ack, log_shmfd })
    }

    /// The backend can log the pages it writes into a shared log.
    pub(super) fn logs_writes(&self) -> bool {
        self.log_shmfd && self.backend_features & LOG_ALL != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::time::Instant;

    /// A backend that accepts the connection but never answers (busy with
    /// another frontend, or hung) fails the start-up after the socket
    /// timeout, naming the request; it does not hang the VMM.
    #[test]
    fn a_backend_that_never_answers_times_out_naming_the_request() {
        let path = std::env::temp_dir().join(format!("nkvm-silent-backend-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let held = thread::spawn(move || listener.accept().map(|(s, _)| s));
        let start = Instant::now();
        let err = Session::open(&path, &super::super::BLOCK).err().expect("a silent backend fails the start-up");
        let took = start.elapsed();
        drop(held);
        let _ = std::fs::remove_file(&path);
        assert!(took < SOCKET_TIMEOUT * 3, "took {took:?}");
        assert!(err.to_string().ends_with("GET_FEATURES failed"), "{err}");
    }
}
