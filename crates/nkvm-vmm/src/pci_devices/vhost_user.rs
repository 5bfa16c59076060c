//! A virtio-blk device whose data path is a vhost-user backend
//! (`--disk vhost-user:SOCKET`), such as `qemu-storage-daemon`'s
//! vhost-user-blk export.
//!
//! The guest-visible transport stays nkvm's: configuration space, common
//! configuration, MSI-X table ([`nkvm_devices::virtio::VirtioPci`]). Only the queues go to the
//! backend, spoken to with rust-vmm's `vhost` crate (frontend side):
//!
//! - at start-up: `SET_OWNER`, `GET_FEATURES` (the backend must offer
//!   `VIRTIO_F_VERSION_1` and `VHOST_USER_F_PROTOCOL_FEATURES`),
//!   `GET/SET_PROTOCOL_FEATURES` (`CONFIG`, and `REPLY_ACK` if offered:
//!   then every set-up message waits for the backend's acknowledgement;
//!   `LOG_SHMFD` if offered), and `GET_CONFIG` for the `virtio_blk_config`
//!   the guest reads (capacity, ...);
//! - when the driver sets `DRIVER_OK` ([`VirtioDevice::activate`]):
//!   `SET_FEATURES` (the driver's, plus protocol features, plus
//!   `VHOST_F_LOG_ALL` when the backend logs), `SET_MEM_TABLE` (guest RAM's
//!   memfd, with the addresses of the VMM's own mapping of it),
//!   `SET_LOG_BASE` (the dirty log's memfd, [`mod@shared_log`]) when the backend
//!   logs, and per enabled queue `SET_VRING_NUM`, `SET_VRING_BASE` 0,
//!   `SET_VRING_ADDR` (ring addresses translated to that mapping; with
//!   `VHOST_VRING_F_LOG` and the used ring's guest-physical address as
//!   `log_guest_addr` when the backend logs),
//!   `SET_VRING_CALL` (the eventfd of the queue's MSI-X vector: an irqfd),
//!   `SET_VRING_KICK` (the eventfd KVM signals on the queue's notify
//!   register: an ioeventfd, moved with BAR0), `SET_VRING_ENABLE` — all
//!   carried out before the guest runs on (acknowledged, or followed by a
//!   request with a reply), so its first kick cannot overtake them;
//! - on a device reset: `GET_VRING_BASE` per started queue, which stops it;
//! - on a save (vCPUs paused): `GET_VRING_BASE` per started queue, then a
//!   wait until the used ring shows every request the backend took; the
//!   positions go into the transport's state, and if the machine runs on
//!   the queues are handed back at the used ring's positions; on a restore
//!   (or a received migration) the queues are handed to the backend at
//!   their saved positions (`SET_VRING_BASE`).
//!
//! The backend's data path then never crosses the VMM: the guest's kick
//! reaches the backend through KVM, the backend's call reaches the guest
//! through KVM. Every run of requests has a deadline (10 s) after which
//! the socket is shut down ([`session::Deadline`]: the `vhost` crate
//! retries a read that times out, so the socket's own timeout would not
//! do), so a stuck backend cannot hang a vCPU; a backend that goes away (its socket hangs up) is noticed by a
//! watcher thread, which logs it naming the socket and marks the device
//! `DEVICE_NEEDS_RESET`. The VM lives on. The watcher then tries the
//! socket every 200 ms; when a backend answers it redoes the start-up
//! handshake and says so, and the driver's next reset and set-up hand the
//! new backend the queues. When the backend is nkvm's own device process
//! ([`super::device_process`]) the watcher instead restarts it at once and
//! hands the new process the queues where the guest's used rings are,
//! without the guest noticing ([`mod@watch`]).
//!
//! Dirty logging: a backend that offers `VHOST_USER_PROTOCOL_F_LOG_SHMFD`
//! and `VHOST_F_LOG_ALL` logs every page it writes from `DRIVER_OK` on, in a
//! log shared with nkvm ([`SharedLog`]) that the VM drains into its own on
//! every sync: always on, whether or not anyone collects the VM's log, at
//! the cost of one atomic bit set per page the backend writes. The log
//! outlives connections: a restarted device process or a backend that
//! reconnects is handed the same one (at every set-up, right after
//! `SET_MEM_TABLE`, whose new mapping a backend may attach the log to). A
//! backend that does not offer both is used all the same, with one warning
//! — the pages it writes are then missing from the VM's dirty log, and a
//! migration or snapshot taken while it runs may miss them
//! ([`VhostUserDevice::logs_writes`]).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nkvm_devices::virtio::common::NO_VECTOR;
use nkvm_devices::virtio::{Activation, GuestRam, QueueProgress, VirtioDevice, VirtioError};
use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use self::session::{Deadline, Session, SOCKET_TIMEOUT};
use self::shared_log::set_log_base;
use super::device_process::{ProcessLog, VirtioProcess};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// `VHOST_F_LOG_ALL`: the backend logs the pages it writes.
const LOG_ALL: u64 = 1 << 26;
/// `VIRTIO_BLK_F_RO`: the disk is read-only.
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// `VHOST_VRING_F_LOG` in `SET_VRING_ADDR`: log the used ring's writes.
const VRING_F_LOG: u32 = 1;

/// The eventfds a vhost-user device hands the backend.
#[derive(Debug)]
pub(super) struct Eventfds {
    /// Queue N's notify ioeventfd.
    pub kicks: Vec<EventFd>,
    /// MSI-X vector N's irqfd.
    pub vectors: Vec<EventFd>,
    /// Which vectors the backend was handed as a queue's call eventfd
    /// (the MSI-X sink raises those again on unmask, and only those).
    pub handed: std::sync::Arc<[std::sync::atomic::AtomicBool]>,
}

/// What the driver set up at `DRIVER_OK`, kept to hand a restarted device
/// process the same queues.
#[derive(Debug, Clone)]
struct Saved {
    features: u64,
    rings: Vec<Ring>,
}

/// One enabled queue as the driver set it up.
#[derive(Debug, Clone, Copy)]
struct Ring {
    index: usize,
    /// Where the transport's queue stands: 0 at `DRIVER_OK`, the saved
    /// position after a restore.
    next_avail: u16,
    size: u16,
    max_size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    vector: u16,
}

impl Ring {
    /// The enabled queues of `activation`.
    fn enabled(activation: &Activation<'_>) -> Vec<Ring> {
        let queues = activation.queues.iter().enumerate().filter(|(_, q)| q.ready());
        queues
            .map(|(index, q)| Ring {
                index,
                next_avail: q.next_avail(),
                size: q.size(),
                max_size: q.max_size(),
                desc: q.desc_table(),
                avail: q.avail_ring(),
                used: q.used_ring(),
                vector: activation.vectors.get(index).copied().unwrap_or(NO_VECTOR),
            })
            .collect()
    }
}

/// A virtio device (block, console) served by a vhost-user backend.
pub struct VhostUserDevice {
    kind: DeviceKind,
    socket: PathBuf,
    frontend: Frontend,
    /// A clone of the frontend's connection ([`Session::raw`]).
    raw: UnixStream,
    mem: GuestRam,
    /// What the backend offers (virtio features).
    backend_features: u64,
    /// The device's configuration (`struct virtio_blk_config`, ...) as the
    /// backend gave it.
    config: Vec<u8>,
    /// The backend acknowledges each set-up message.
    reply_ack: bool,
    /// The backend logs the pages it writes into `log`.
    logs_writes: bool,
    /// The dirty log shared with every backend this device connects to.
    log: Arc<SharedLog>,
    /// A backend that does not log has been warned about.
    warned: bool,
    fds: Option<Eventfds>,
    /// Written when the device is dropped: stops the watcher.
    stop: EventFd,
    /// Queues handed to the backend since the last reset.
    started: Vec<usize>,
    /// The backend hung up or stopped answering.
    gone: bool,
    /// The backend is nkvm's own device process, restarted when it dies.
    process: Option<VirtioProcess>,
    /// The driver's set-up since the last reset.
    saved: Option<Saved>,
    /// A save stopped the queues; the machine running on restarts them.
    stopped_for_save: bool,
}

impl std::fmt::Debug for VhostUserDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserDevice")
            .field("kind", &self.kind.name)
            .field("socket", &self.socket)
            .field("backend_features", &format_args!("{:#x}", self.backend_features))
            .field("started", &self.started)
            .field("gone", &self.gone)
            .field("logs_writes", &self.logs_writes)
            .finish_non_exhaustive()
    }
}

impl VhostUserDevice {
    /// Connects to the backend at `socket` and learns what it offers;
    /// `mem` is the VMM's mapping of guest RAM, whose memfd and addresses
    /// the backend is given.
    pub fn connect(socket: &Path, kind: DeviceKind, mem: GuestRam) -> Result<Self, VhostUserError> {
        let session = Session::open(socket, &kind)?;
        let logs_writes = session.logs_writes();
        let Session { frontend, raw, backend_features, config, reply_ack, .. } = session;
        let stop =
            EventFd::new(EFD_NONBLOCK).map_err(|source| VhostUserError::Connect { socket: socket.into(), source })?;
        let ram_end = mem.last_addr().0.saturating_add(1);
        let log = SharedLog::new(ram_end).map_err(|source| VhostUserError::Log { socket: socket.into(), source })?;
        let mut device = Self {
            kind,
            socket: socket.to_path_buf(),
            frontend,
            raw,
            mem,
            backend_features,
            config,
            reply_ack,
            logs_writes,
            log: Arc::new(log),
            warned: false,
            fds: None,
            stop,
            started: Vec::new(),
            gone: false,
            process: None,
            saved: None,
            stopped_for_save: false,
        };
        device.warn_if_unlogged();
        Ok(device)
    }

    /// Whether the backend logs the pages it writes into guest RAM (it
    /// offers `VHOST_USER_PROTOCOL_F_LOG_SHMFD` and `VHOST_F_LOG_ALL`), so
    /// they reach the VM's dirty log through [`dirty_log`](Self::dirty_log).
    /// When it does not, a snapshot or migration taken while the device
    /// runs may miss pages it wrote.
    pub fn logs_writes(&self) -> bool {
        self.logs_writes
    }

    /// The device's name in messages (`virtio-blk`, ...).
    pub fn kind_name(&self) -> &'static str {
        self.kind.name
    }

    /// The backend's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The log the backend marks the pages it writes in: a
    /// [`nkvm::DirtySource`] to add to the VM
    /// ([`nkvm::Vm::add_dirty_source`]).
    pub fn dirty_log(&self) -> Arc<SharedLog> {
        self.log.clone()
    }

    /// Warns, once per device, that the backend's writes are not logged.
    fn warn_if_unlogged(&mut self) {
        if !self.logs_writes && !self.warned {
            self.warned = true;
            log::warn!(
                "vhost-user {} ({}): the backend does not offer VHOST_USER_PROTOCOL_F_LOG_SHMFD and \
                 VHOST_F_LOG_ALL: pages it writes into guest RAM are not in the VM's dirty log, so a \
                 snapshot or migration taken while it runs may miss them",
                self.socket.display(),
                self.kind.name
            );
        }
    }

    /// Connects to nkvm's own device process `process` (a vhost-user
    /// backend serving `kind`), which this device restarts when it dies.
    pub fn connect_process(process: VirtioProcess, kind: DeviceKind, mem: GuestRam) -> Result<Self, VhostUserError> {
        let mut device = Self::connect(process.socket(), kind, mem)?;
        // The process is listening and connected: its socket file has done
        // its work (the sandbox does not let the process unlink it).
        let _ = std::fs::remove_file(process.socket());
        device.process = Some(process);
        Ok(device)
    }

    /// The device process's record (pid, deaths, restarts), if nkvm runs
    /// the backend.
    pub fn process_log(&self) -> Option<Arc<Mutex<ProcessLog>>> {
        self.process.as_ref().map(|p| p.log.clone())
    }

    /// Capacity in 512-byte sectors, as the backend reports it.
    pub fn capacity(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.config[..8]);
        u64::from_le_bytes(b)
    }

    /// Gives the device the eventfds the backend will use.
    pub(super) fn set_eventfds(&mut self, fds: Eventfds) {
        self.fds = Some(fds);
    }

    /// The backend hung up: nothing more is asked of it.
    fn mark_gone(&mut self) {
        self.gone = true;
        self.started.clear();
    }

    /// A backend answers on the socket again: the next activation (after
    /// the driver resets the device) hands it the queues.
    fn reconnected(&mut self, session: Session) {
        let passed = self.kind.passed_features;
        if session.backend_features & passed != self.backend_features & passed {
            log::warn!("vhost-user {}: the new backend offers other features", self.socket.display());
        }
        self.logs_writes = session.logs_writes();
        self.frontend = session.frontend;
        self.raw = session.raw;
        self.backend_features = session.backend_features;
        self.config = session.config;
        self.reply_ack = session.reply_ack;
        self.gone = false;
        self.warn_if_unlogged();
    }

    fn request_err(&self, request: &'static str) -> impl FnOnce(vhost::Error) -> VhostUserError {
        let socket = self.socket.clone();
        move |source| VhostUserError::Request { socket, request, source }
    }

    /// The address of guest-physical `gpa` in the VMM's mapping of RAM.
    fn host_address(&self, queue: usize, gpa: u64) -> Result<u64, VhostUserError> {
        let ptr =
            self.mem.get_host_address(GuestAddress(gpa)).map_err(|_| VhostUserError::RingAddress { queue, gpa })?;
        Ok(ptr as u64)
    }

    /// The vhost-user half of `activate`.
    fn start(&mut self, activation: &Activation<'_>) -> Result<(), VhostUserError> {
        if self.gone {
            return Err(VhostUserError::Gone { socket: self.socket.clone() });
        }
        let saved = Saved { features: activation.features, rings: Ring::enabled(activation) };
        self.hand_over(&saved, |ring| Ok(ring.next_avail))?;
        self.saved = Some(saved);
        Ok(())
    }

    /// A restarted device process takes the queues where the guest's used
    /// rings say they are: every request not yet completed is served again
    /// (the model completes requests in order, so the used index is where
    /// the first unfinished one sits in the available ring). Then each
    /// queue is kicked (the guest's kicks to the dead process may be lost)
    /// and each vector raised (so may a completion's interrupt).
    fn resume(&mut self) -> Result<(), VhostUserError> {
        let Some(saved) = self.saved.clone() else { return Ok(()) };
        let mem = self.mem.clone();
        self.hand_over(&saved, |ring| {
            mem.read_obj::<u16>(GuestAddress(ring.used + 2))
                .map_err(|_| VhostUserError::RingAddress { queue: ring.index, gpa: ring.used })
        })?;
        if let Some(fds) = &self.fds {
            for ring in &saved.rings {
                if let Some(kick) = fds.kicks.get(ring.index) {
                    let _ = kick.write(1);
                }
                if let Some(call) = fds.vectors.get(usize::from(ring.vector)) {
                    let _ = call.write(1);
                }
            }
        }
        Ok(())
    }

    /// Features, memory table and each enabled queue to the backend, the
    /// queue starting at the index `base` gives.
    fn hand_over(
        &mut self,
        saved: &Saved,
        base: impl Fn(&Ring) -> Result<u16, VhostUserError>,
    ) -> Result<(), VhostUserError> {
        let _deadline = self.deadline()?;
        let mut features = saved.features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.logs_writes {
            features |= LOG_ALL;
        }
        self.frontend.set_features(features).map_err(self.request_err("SET_FEATURES"))?;
        let regions = self
            .mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.request_err("SET_MEM_TABLE"))?;
        self.frontend.set_mem_table(&regions).map_err(self.request_err("SET_MEM_TABLE"))?;
        if self.logs_writes {
            // After the memory table: a backend may tie the log to the
            // regions it has mapped (vhost-user-backend does), so a new
            // table needs the log again.
            set_log_base(&self.raw, &self.log)
                .map_err(|source| VhostUserError::Log { socket: self.socket.clone(), source })?;
        }
        for ring in &saved.rings {
            self.start_queue(ring, base(ring)?)?;
            self.started.push(ring.index);
        }
        if !self.reply_ack {
            // A request with a reply: the backend has carried out every
            // message before it by the time it answers, so the guest's first
            // kick cannot overtake the set-up.
            self.frontend.get_features().map_err(self.request_err("GET_FEATURES"))?;
        }
        Ok(())
    }

    /// Bounds the requests that follow, until it is dropped ([`Deadline`]).
    fn deadline(&self) -> Result<Deadline, VhostUserError> {
        Deadline::arm(&self.raw, SOCKET_TIMEOUT * 2)
            .map_err(|source| VhostUserError::Connect { socket: self.socket.clone(), source })
    }

    fn start_queue(&mut self, queue: &Ring, base: u16) -> Result<(), VhostUserError> {
        let Ring { index, vector, .. } = *queue;
        let ring = VringConfigData {
            queue_max_size: queue.max_size,
            queue_size: queue.size,
            // The used ring's writes are logged at its guest-physical
            // address.
            flags: if self.logs_writes { VRING_F_LOG } else { 0 },
            desc_table_addr: self.host_address(index, queue.desc)?,
            used_ring_addr: self.host_address(index, queue.used)?,
            avail_ring_addr: self.host_address(index, queue.avail)?,
            log_addr: self.logs_writes.then_some(queue.used),
        };
        self.frontend.set_vring_num(index, queue.size).map_err(self.request_err("SET_VRING_NUM"))?;
        self.frontend.set_vring_base(index, base).map_err(self.request_err("SET_VRING_BASE"))?;
        self.frontend.set_vring_addr(index, &ring).map_err(self.request_err("SET_VRING_ADDR"))?;
        let Some(fds) = &self.fds else { return Ok(()) };
        // The call eventfd before the kick: a backend starts serving the
        // queue when it gets the kick (qemu-storage-daemon does, before
        // SET_VRING_ENABLE), and one that completes a request with no call
        // eventfd dies (qemu-storage-daemon: "vu_panic: Error writing
        // eventfd"). The kick eventfd may hold notifications the guest made
        // while no backend listened: harmless, the rings are set up by then.
        // A queue without a vector gets an eventfd nobody reads.
        let spare;
        let call = match fds.vectors.get(usize::from(vector)) {
            Some(fd) => {
                if let Some(handed) = fds.handed.get(usize::from(vector)) {
                    handed.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                fd
            }
            None => {
                spare = EventFd::new(EFD_NONBLOCK)
                    .map_err(|e| VhostUserError::Connect { socket: self.socket.clone(), source: e })?;
                &spare
            }
        };
        self.frontend.set_vring_call(index, call).map_err(self.request_err("SET_VRING_CALL"))?;
        if let Some(kick) = fds.kicks.get(index) {
            self.frontend.set_vring_kick(index, kick).map_err(self.request_err("SET_VRING_KICK"))?;
        }
        self.frontend.set_vring_enable(index, true).map_err(self.request_err("SET_VRING_ENABLE"))?;
        log::debug!(
            "vhost-user {}: queue {index} started, size {}, vector {vector}",
            self.socket.display(),
            queue.size
        );
        Ok(())
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u16 {
        self.kind.device_type
    }

    fn pci_class(&self) -> u32 {
        self.kind.pci_class
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.kind.queue_max_sizes
    }

    fn features(&self) -> u64 {
        self.backend_features & self.kind.passed_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!("vhost-user {}: ignored config write of {} bytes at {offset:#x}", self.kind.name, data.len());
    }

    fn activate(&mut self, activation: &Activation<'_>) -> Result<(), VirtioError> {
        self.start(activation).map_err(|e| {
            eprintln!(
                "nkvm: {}: {e}: {}; the device has failed",
                self.kind.name,
                std::error::Error::source(&e).map(ToString::to_string).unwrap_or_default()
            );
            VirtioError::Backend(Box::new(e))
        })
    }

    /// Reached only when the notify register is served by an exit (no
    /// ioeventfd there): pass the kick on to the backend.
    fn process_queue(&mut self, index: usize, _queue: &mut Queue, _mem: &GuestRam) -> Result<bool, VirtioError> {
        if let Some(kick) = self.fds.as_ref().and_then(|f| f.kicks.get(index)) {
            let _ = kick.write(1);
        }
        Ok(false)
    }

    /// A restored transport: the backend takes each queue at its saved
    /// position (`SET_VRING_BASE`), as at `DRIVER_OK`.
    fn restored(&mut self, activation: &Activation<'_>) -> Result<(), VirtioError> {
        self.activate(activation)
    }

    fn stop_for_save(&mut self, _mem: &GuestRam) -> Result<Vec<QueueProgress>, VirtioError> {
        self.stop_queues().map_err(|e| VirtioError::Backend(Box::new(e)))
    }

    fn resume_after_save(&mut self) {
        if !std::mem::take(&mut self.stopped_for_save) {
            return;
        }
        // Every request taken was completed, so the used rings hold the
        // positions the queues stopped at: the restart's own hand-over.
        if let Err(e) = self.resume() {
            log::error!("vhost-user {}: restarting the queues after a save: {e}", self.socket.display());
            self.mark_gone();
        }
    }

    fn reset(&mut self) {
        self.stopped_for_save = false;
        self.saved = None;
        let _deadline = self.deadline().inspect_err(|e| log::warn!("vhost-user: {e}")).ok();
        for index in std::mem::take(&mut self.started) {
            if let Err(e) = self.frontend.get_vring_base(index) {
                log::warn!("vhost-user {}: stopping queue {index}: {e}", self.socket.display());
            }
        }
    }
}

impl Drop for VhostUserDevice {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
    }
}

mod error;
mod kind;
mod saved;
mod session;
mod shared_log;
mod watch;

pub use self::error::VhostUserError;
pub use self::kind::{DeviceKind, BLOCK, CONSOLE};
pub use self::saved::SAVE_DRAIN_TIMEOUT;
pub use self::shared_log::SharedLog;

pub(super) use self::watch::watch;
#[cfg(test)]
pub(super) use self::watch::MAX_RESTARTS;
