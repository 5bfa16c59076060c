//! A virtio-blk device whose data path is a vhost-user backend
//! (`--disk vhost-user:SOCKET`), such as `qemu-storage-daemon`'s
//! vhost-user-blk export.
//!
//! The guest-visible transport stays nkvm's: configuration space, common
//! configuration, MSI-X table ([`VirtioPci`]). Only the queues go to the
//! backend, spoken to with rust-vmm's `vhost` crate (frontend side):
//!
//! - at start-up: `SET_OWNER`, `GET_FEATURES` (the backend must offer
//!   `VIRTIO_F_VERSION_1` and `VHOST_USER_F_PROTOCOL_FEATURES`),
//!   `GET/SET_PROTOCOL_FEATURES` (`CONFIG`, and `REPLY_ACK` if offered:
//!   then every set-up message waits for the backend's acknowledgement),
//!   and `GET_CONFIG` for the `virtio_blk_config` the guest reads
//!   (capacity, ...);
//! - when the driver sets `DRIVER_OK` ([`VirtioDevice::activate`]):
//!   `SET_FEATURES` (the driver's, plus protocol features), `SET_MEM_TABLE`
//!   (guest RAM's memfd, with the addresses of the VMM's own mapping of it),
//!   and per enabled queue `SET_VRING_NUM`, `SET_VRING_BASE` 0,
//!   `SET_VRING_ADDR` (ring addresses translated to that mapping),
//!   `SET_VRING_CALL` (the eventfd of the queue's MSI-X vector: an irqfd),
//!   `SET_VRING_KICK` (the eventfd KVM signals on the queue's notify
//!   register: an ioeventfd, moved with BAR0), `SET_VRING_ENABLE` — all
//!   carried out before the guest runs on (acknowledged, or followed by a
//!   request with a reply), so its first kick cannot overtake them;
//! - on a device reset: `GET_VRING_BASE` per started queue, which stops it.
//!
//! The backend's data path then never crosses the VMM: the guest's kick
//! reaches the backend through KVM, the backend's call reaches the guest
//! through KVM. The socket has a timeout, so a stuck backend cannot hang a
//! vCPU; a backend that goes away (its socket hangs up) is noticed by a
//! watcher thread, which logs it naming the socket and marks the device
//! `DEVICE_NEEDS_RESET`. The VM lives on. The watcher then tries the
//! socket every 200 ms; when a backend answers it redoes the start-up
//! handshake and says so, and the driver's next reset and set-up hand the
//! new backend the queues.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::thread;
use std::time::Duration;

use nkvm_devices::virtio::common::NO_VECTOR;
use nkvm_devices::virtio::{Activation, GuestRam, VirtioDevice, VirtioError, VirtioPci};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// `VIRTIO_ID_BLOCK`.
const VIRTIO_ID_BLOCK: u16 = 2;
/// PCI class: mass storage, other.
const CLASS_STORAGE_OTHER: u32 = 0x01_80_00;
/// The queue size nkvm offers the driver; qemu-storage-daemon takes up to 1024.
const QUEUE_MAX_SIZE: u16 = 256;
/// Bytes of `struct virtio_blk_config` read from the backend (up to and
/// including the write-zeroes fields).
const BLK_CONFIG_SIZE: u32 = 60;
/// How long one request on the socket may take before the backend counts
/// as stuck.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(5);
/// Connection attempts 100 ms apart while the socket refuses.
const CONNECT_RETRIES: u32 = 5;
/// `VIRTIO_F_VERSION_1`.
const VERSION_1: u64 = 1 << 32;
/// Feature bits passed from the backend to the driver: the device-specific
/// ones (0-23), `VIRTIO_RING_F_INDIRECT_DESC` and `VIRTIO_RING_F_EVENT_IDX`
/// — both between the driver and the backend, the transport is not
/// involved — but not `VIRTIO_BLK_F_MQ` (one queue) nor
/// `VIRTIO_BLK_F_CONFIG_WCE` (configuration writes are not passed on).
const PASSED_FEATURES: u64 = (0x00ff_ffff | 1 << 28 | 1 << 29) & !(1 << 12 | 1 << 11);

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
}

/// The eventfds a vhost-user device hands the backend.
#[derive(Debug)]
pub(super) struct Eventfds {
    /// Queue N's notify ioeventfd.
    pub kicks: Vec<EventFd>,
    /// MSI-X vector N's irqfd.
    pub vectors: Vec<EventFd>,
}

/// A connection to a backend after the start-up handshake.
struct Session {
    frontend: Frontend,
    backend_features: u64,
    config: Vec<u8>,
    /// Set-up messages are acknowledged.
    reply_ack: bool,
}

impl Session {
    /// Connects to `socket` and asks the backend what it offers: owner,
    /// features, protocol features (`CONFIG`), the block configuration.
    fn open(socket: &Path) -> Result<Self, VhostUserError> {
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
        let mut frontend = Frontend::from_stream(stream, 1);
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
        frontend.set_protocol_features(wanted).map_err(req("SET_PROTOCOL_FEATURES"))?;
        if reply_ack {
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let empty = vec![0u8; BLK_CONFIG_SIZE as usize];
        let (_, config) = frontend
            .get_config(0, BLK_CONFIG_SIZE, VhostUserConfigFlags::empty(), &empty)
            .map_err(req("GET_CONFIG"))?;
        Ok(Self { frontend, backend_features, config, reply_ack })
    }
}

/// virtio-blk served by a vhost-user backend.
pub struct VhostUserBlock {
    socket: PathBuf,
    frontend: Frontend,
    mem: GuestRam,
    /// What the backend offers (virtio features).
    backend_features: u64,
    /// `struct virtio_blk_config` as the backend gave it.
    config: Vec<u8>,
    /// The backend acknowledges each set-up message.
    reply_ack: bool,
    queue_max_sizes: [u16; 1],
    fds: Option<Eventfds>,
    /// Written when the device is dropped: stops the watcher.
    stop: EventFd,
    /// Queues handed to the backend since the last reset.
    started: Vec<usize>,
    /// The backend hung up or stopped answering.
    gone: bool,
}

impl std::fmt::Debug for VhostUserBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserBlock")
            .field("socket", &self.socket)
            .field("backend_features", &format_args!("{:#x}", self.backend_features))
            .field("started", &self.started)
            .field("gone", &self.gone)
            .finish_non_exhaustive()
    }
}

impl VhostUserBlock {
    /// Connects to the backend at `socket` and learns what it offers;
    /// `mem` is the VMM's mapping of guest RAM, whose memfd and addresses
    /// the backend is given.
    pub fn connect(socket: &Path, mem: GuestRam) -> Result<Self, VhostUserError> {
        let Session { frontend, backend_features, config, reply_ack } = Session::open(socket)?;
        let stop =
            EventFd::new(EFD_NONBLOCK).map_err(|source| VhostUserError::Connect { socket: socket.into(), source })?;
        Ok(Self {
            socket: socket.to_path_buf(),
            frontend,
            mem,
            backend_features,
            config,
            reply_ack,
            queue_max_sizes: [QUEUE_MAX_SIZE],
            fds: None,
            stop,
            started: Vec::new(),
            gone: false,
        })
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
        if session.backend_features & PASSED_FEATURES != self.backend_features & PASSED_FEATURES {
            log::warn!("vhost-user {}: the new backend offers other features", self.socket.display());
        }
        self.frontend = session.frontend;
        self.backend_features = session.backend_features;
        self.config = session.config;
        self.reply_ack = session.reply_ack;
        self.gone = false;
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
        let features = activation.features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.frontend.set_features(features).map_err(self.request_err("SET_FEATURES"))?;
        let regions = self
            .mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.request_err("SET_MEM_TABLE"))?;
        self.frontend.set_mem_table(&regions).map_err(self.request_err("SET_MEM_TABLE"))?;
        for (index, queue) in activation.queues.iter().enumerate() {
            if queue.ready() {
                let vector = activation.vectors.get(index).copied().unwrap_or(NO_VECTOR);
                self.start_queue(index, queue, vector)?;
                self.started.push(index);
            }
        }
        if !self.reply_ack {
            // A request with a reply: the backend has carried out every
            // message before it by the time it answers, so the guest's first
            // kick cannot overtake the set-up.
            self.frontend.get_features().map_err(self.request_err("GET_FEATURES"))?;
        }
        Ok(())
    }

    fn start_queue(&mut self, index: usize, queue: &Queue, vector: u16) -> Result<(), VhostUserError> {
        let ring = VringConfigData {
            queue_max_size: queue.max_size(),
            queue_size: queue.size(),
            flags: 0,
            desc_table_addr: self.host_address(index, queue.desc_table())?,
            used_ring_addr: self.host_address(index, queue.used_ring())?,
            avail_ring_addr: self.host_address(index, queue.avail_ring())?,
            log_addr: None,
        };
        self.frontend.set_vring_num(index, queue.size()).map_err(self.request_err("SET_VRING_NUM"))?;
        self.frontend.set_vring_base(index, 0).map_err(self.request_err("SET_VRING_BASE"))?;
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
            Some(fd) => fd,
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
            queue.size()
        );
        Ok(())
    }
}

impl VirtioDevice for VhostUserBlock {
    fn device_type(&self) -> u16 {
        VIRTIO_ID_BLOCK
    }

    fn pci_class(&self) -> u32 {
        CLASS_STORAGE_OTHER
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn features(&self) -> u64 {
        self.backend_features & PASSED_FEATURES
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
        log::debug!("vhost-user-blk: ignored config write of {} bytes at {offset:#x}", data.len());
    }

    fn activate(&mut self, activation: &Activation<'_>) -> Result<(), VirtioError> {
        self.start(activation).map_err(|e| {
            eprintln!("nkvm: virtio-blk: {e}; the device has failed");
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

    fn reset(&mut self) {
        for index in std::mem::take(&mut self.started) {
            if let Err(e) = self.frontend.get_vring_base(index) {
                log::warn!("vhost-user {}: stopping queue {index}: {e}", self.socket.display());
            }
        }
    }
}

impl Drop for VhostUserBlock {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
    }
}

/// The epoll token of the socket.
const SOCKET: u64 = 0;
/// The epoll token of the stop eventfd.
const STOP: u64 = 1;
/// How often the watcher tries the socket again once the backend is gone.
const RECONNECT_PERIOD: Duration = Duration::from_millis(200);

/// Starts a thread that notices the backend hanging up — it logs a line
/// naming the socket and marks the device failed (`DEVICE_NEEDS_RESET`) —
/// and then tries the socket until a backend answers again, which it
/// reports; the guest gets the new backend when it resets the device.
pub(super) fn watch(device: &Arc<Mutex<VirtioPci<VhostUserBlock>>>) -> io::Result<()> {
    let epoll = Epoll::new()?;
    let (stop, socket) = {
        let pci = device.lock().unwrap_or_else(|e| e.into_inner());
        (pci.device().stop.try_clone()?, pci.device().socket.clone())
    };
    epoll.ctl(ControlOperation::Add, stop.as_raw_fd(), EpollEvent::new(EventSet::IN, STOP))?;
    let watcher = Watcher { epoll, device: Arc::downgrade(device), socket };
    watcher.follow(&device.lock().unwrap_or_else(|e| e.into_inner()))?;
    thread::Builder::new().name("vhost-user-watch".into()).spawn(move || watcher.run())?;
    Ok(())
}

/// The watcher thread's state.
struct Watcher {
    epoll: Epoll,
    device: Weak<Mutex<VirtioPci<VhostUserBlock>>>,
    socket: PathBuf,
}

impl Watcher {
    /// Watches the device's current connection for a hang-up.
    fn follow(&self, pci: &VirtioPci<VhostUserBlock>) -> io::Result<()> {
        let hangup = EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR;
        let fd = pci.device().frontend.as_raw_fd();
        self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(hangup, SOCKET))
    }

    /// Waits up to `timeout_ms` (-1: for ever); `None` when told to stop.
    fn wait(&self, timeout_ms: i32) -> Option<bool> {
        let mut events = [EpollEvent::default(); 2];
        loop {
            return match self.epoll.wait(timeout_ms, &mut events) {
                Ok(n) if events[..n].iter().any(|e| e.data() == STOP) => None,
                Ok(n) => Some(n > 0),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("vhost-user {}: the watcher stops: {e}", self.socket.display());
                    None
                }
            };
        }
    }

    fn run(self) {
        loop {
            // Connected: wait for the hang-up.
            match self.wait(-1) {
                None => return,
                Some(false) => continue,
                Some(true) => {}
            }
            {
                let Some(device) = self.device.upgrade() else { return };
                let mut pci = device.lock().unwrap_or_else(|e| e.into_inner());
                let fd = pci.device().frontend.as_raw_fd();
                let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                let gone = VhostUserError::Gone { socket: self.socket.clone() };
                eprintln!("nkvm: virtio-blk: {gone}; the device has failed, the VM goes on");
                pci.device_mut().mark_gone();
                pci.fail(&VirtioError::Backend(Box::new(gone)));
            }
            // Gone: try the socket until a backend answers.
            loop {
                if self.wait(RECONNECT_PERIOD.as_millis() as i32).is_none() {
                    return;
                }
                let Ok(session) = Session::open(&self.socket) else { continue };
                let Some(device) = self.device.upgrade() else { return };
                let mut pci = device.lock().unwrap_or_else(|e| e.into_inner());
                pci.device_mut().reconnected(session);
                if let Err(e) = self.follow(&pci) {
                    log::error!("vhost-user {}: cannot watch the new connection: {e}", self.socket.display());
                }
                eprintln!(
                    "nkvm: virtio-blk: vhost-user backend at {} is back; the device works again once the guest resets it",
                    self.socket.display()
                );
                break;
            }
        }
    }
}
