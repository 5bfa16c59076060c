//! [`VhostUserError`]: why a vhost-user backend could not be used.

use std::io;
use std::path::PathBuf;

use super::{shared_log, SAVE_DRAIN_TIMEOUT};

/// Why a vhost-user backend could not be used.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// The socket could not be connected to.
    #[error("cannot connect to the vhost-user backend at {} (is it running?)", socket.display())]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A request failed.
    #[error("vhost-user backend at {}: {request} failed", socket.display())]
    Request {
        /// The socket.
        socket: PathBuf,
        /// The request (`GET_FEATURES`, ...).
        request: &'static str,
        /// What the vhost crate reported.
        #[source]
        source: vhost::Error,
    },
    /// The backend lacks something nkvm needs.
    #[error("vhost-user backend at {} does not offer {what}", socket.display())]
    Missing {
        /// The socket.
        socket: PathBuf,
        /// The feature.
        what: &'static str,
    },
    /// The backend hung up.
    #[error("vhost-user backend at {} went away", socket.display())]
    Gone {
        /// The socket.
        socket: PathBuf,
    },
    /// A ring address is not in guest RAM.
    #[error("queue {queue}: ring address {gpa:#x} is not in guest RAM")]
    RingAddress {
        /// The queue.
        queue: usize,
        /// The guest physical address.
        gpa: u64,
    },
    /// A save waited for the backend to complete the requests the guest
    /// had made available, and it did not within [`SAVE_DRAIN_TIMEOUT`]
    /// (its queues were left running).
    #[error(
        "vhost-user backend at {}: queue {queue} still had {pending} request(s) in flight {:?} after a save \
         began waiting for them; the save is given up and the machine runs on",
        socket.display(), SAVE_DRAIN_TIMEOUT
    )]
    InFlight {
        /// The socket.
        socket: PathBuf,
        /// The queue.
        queue: usize,
        /// Requests taken but not completed.
        pending: u16,
    },
    /// The dirty log could not be made or handed to the backend.
    #[error("vhost-user backend at {}: dirty log", socket.display())]
    Log {
        /// The socket.
        socket: PathBuf,
        /// What went wrong.
        #[source]
        source: shared_log::LogError,
    },
}
