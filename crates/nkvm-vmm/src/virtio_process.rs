//! `nkvm device --model virtio-blk|virtio-console`: nkvm's virtio-blk or
//! virtio-console model ([`nkvm_devices::virtio::Block`],
//! [`nkvm_devices::virtio::Console`]) in its own sandboxed process,
//! serving the VMM's queues as a vhost-user backend (rust-vmm's
//! `vhost-user-backend`).
//!
//! The VMM keeps the guest-visible transport (PCI configuration space, the
//! common configuration, the MSI-X table) and hands this process, over
//! SCM_RIGHTS on the vhost-user socket, guest RAM's memfd, each queue's
//! notify ioeventfd (kick) and its MSI-X vector's irqfd (call), with the
//! rings' addresses and sizes when the driver sets `DRIVER_OK` — or, after
//! a restart, the ring indexes the guest's used ring holds. From then on
//! the guest's requests reach this process from KVM and its completions
//! reach the guest through KVM: the data path never crosses the VMM.
//!
//! Start-up: close every inherited descriptor, open the image (virtio-blk), bind the
//! socket, enter the sandbox ([`crate::sandbox`]); only then start the
//! threads and accept the VMM, so guest RAM is only ever mapped inside it.
//!
//! Dirty logging: the process offers `VHOST_USER_PROTOCOL_F_LOG_SHMFD` and
//! `VHOST_F_LOG_ALL`, and while the VMM has `VHOST_F_LOG_ALL` on it marks
//! every page a batch of requests wrote in the log the VMM shares
//! ([`mod@dirty`]) before it signals the guest. The batch runs under the
//! backend's lock, which `GET_VRING_BASE` also takes: once the VMM has
//! stopped a queue, every page written for it is in the log.

use std::io;
use std::os::unix::net::UnixListener;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use nkvm_devices::virtio::{Block, Console, GuestRam, VirtioDevice, VirtioError, VIRTIO_F_VERSION_1};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{
    FileOffset, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::epoll::EventSet;

use self::dirty::{mark_in, view_writes, BatchWrites};
use crate::cli::{DeviceArgs, DeviceModel};
use crate::sandbox;

mod dirty;

/// Set in a device process's environment, it makes a forbidden system call
/// (`socket`) when it first serves a queue: how the tests check that the
/// sandbox kills it and that nkvm names the call.
pub const FORBIDDEN_CALL_ENV: &str = "NKVM_DEVICE_TEST_FORBIDDEN_CALL";
/// Set in a device process's environment, it offers neither
/// `VHOST_USER_PROTOCOL_F_LOG_SHMFD` nor `VHOST_F_LOG_ALL`, as a backend
/// without dirty logging would: how the tests check the VMM's side of that.
pub const NO_DIRTY_LOG_ENV: &str = "NKVM_DEVICE_TEST_NO_DIRTY_LOG";

/// The exit status of a device process that stopped on a queue its guest
/// broke (a malformed descriptor chain, a runaway index): the error that
/// made it stop is on its stderr.
///
/// In the VMM's process a model that fails that way sets
/// `DEVICE_NEEDS_RESET`. vhost-user has no message for that, and an error
/// returned to vhost-user-backend would only end its queue thread: the
/// device would go silent, the VMM none the wiser. So the process ends;
/// the VMM sees it go, names the status, and restarts it like any process
/// that died (the restart meets the same ring and ends the same way until
/// the guest resets the device or the restarts are spent and the device
/// is failed). Any other error from a model ends it with [`FAILED_EXIT`].
pub const GUEST_QUEUE_ERROR_EXIT: i32 = 3;

/// The exit status of a device process that failed for a reason of its
/// own (not its guest's, not the VMM hanging up).
pub const FAILED_EXIT: i32 = 2;

/// Why a virtio device process stopped.
#[derive(Debug, thiserror::Error)]
pub enum VirtioProcessError {
    /// `--disk` is missing.
    #[error("--model virtio-blk needs --disk IMAGE")]
    NoDisk,
    /// The image could not be opened.
    #[error(transparent)]
    Disk(#[from] nkvm_devices::virtio::BlockError),
    /// The socket could not be bound.
    #[error("cannot listen on {path}")]
    Listen {
        /// The socket path.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The sandbox could not be entered.
    #[error(transparent)]
    Sandbox(#[from] sandbox::SandboxError),
    /// The vhost-user daemon failed.
    #[error("the vhost-user backend failed: {0}")]
    Daemon(String),
}

/// `VHOST_F_LOG_ALL`: log the pages written into guest memory.
const LOG_ALL: u64 = 1 << 26;

/// The guest RAM the VMM handed over, as vhost-user-backend keeps it: each
/// region's bitmap is the VMM's shared dirty log once `SET_LOG_BASE` came.
type Ram = GuestMemoryAtomic<GuestMemoryMmap<BitmapMmapRegion>>;

/// A second mapping of the regions in `mem`, as the device models take
/// guest memory (with a write bitmap [`view_writes`] reads).
fn model_view(mem: &GuestMemoryMmap<BitmapMmapRegion>) -> io::Result<GuestRam> {
    let ranges = mem
        .iter()
        .map(|r| {
            let file = r.file_offset().ok_or_else(|| io::Error::other("a guest memory region without a file"))?;
            let file = FileOffset::new(file.file().try_clone()?, file.start());
            Ok((r.start_addr(), r.len() as usize, Some(file)))
        })
        .collect::<io::Result<Vec<_>>>()?;
    GuestRam::from_ranges_with_files(ranges).map_err(io::Error::other)
}

/// A virtio model as a vhost-user backend.
struct ModelBackend<D> {
    model: D,
    /// The models' view of `Ram`, remapped on every memory update.
    mem: GuestRam,
    /// Guest RAM as vhost-user-backend keeps it, whose region bitmaps are
    /// the VMM's dirty log.
    ram: Option<Ram>,
    /// The VMM asked for the pages written to be logged (`VHOST_F_LOG_ALL`).
    log_all: bool,
    /// Make a forbidden call on the first request (tests only).
    forbidden_call: bool,
    /// Offer no dirty logging (tests only).
    no_dirty_log: bool,
}

impl<D: VirtioDevice + Sync> VhostUserBackendMut for ModelBackend<D> {
    type Bitmap = BitmapMmapRegion;
    type Vring = VringRwLock<Ram>;

    fn num_queues(&self) -> usize {
        self.model.queue_max_sizes().len()
    }

    fn max_queue_size(&self) -> usize {
        self.model.queue_max_sizes().iter().copied().max().map_or(0, usize::from)
    }

    fn features(&self) -> u64 {
        let log_all = if self.no_dirty_log { 0 } else { LOG_ALL };
        self.model.features() | VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() | log_all
    }

    fn acked_features(&mut self, features: u64) {
        self.log_all = features & LOG_ALL != 0;
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let features = VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK;
        if self.no_dirty_log {
            return features;
        }
        features | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn set_event_idx(&mut self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut bytes = vec![0u8; size as usize];
        self.model.read_config(u64::from(offset), &mut bytes);
        bytes
    }

    fn update_memory(&mut self, mem: Ram) -> io::Result<()> {
        // Pages written through the old view are logged before it goes.
        if let (true, Some(ram)) = (self.log_all, &self.ram) {
            let ram = ram.memory();
            view_writes(&self.mem, &mut |gpa, len| mark_in(&ram, gpa, len));
        }
        self.mem = model_view(&mem.memory())?;
        self.ram = Some(mem);
        Ok(())
    }

    fn handle_event(&mut self, event: u16, _set: EventSet, vrings: &[Self::Vring], _thread: usize) -> io::Result<()> {
        let index = usize::from(event);
        let Some(vring) = vrings.get(index) else { return Ok(()) };
        if self.forbidden_call {
            // A socket: nothing a block device or console needs. The sandbox kills the
            // process here.
            let _ = std::net::UdpSocket::bind("127.0.0.1:0");
        }
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        if !queue.ready() {
            // An event taken before the VMM stopped the queue
            // (`GET_VRING_BASE`, for a save), handled after: nothing to do,
            // the restart kicks the queue again. Processing it would fail,
            // and an error ends vhost-user-backend's queue thread for good.
            return Ok(());
        }
        let batch = self.log_all.then(|| BatchWrites::before(queue, &self.mem));
        let used = self.model.process_queue(index, queue, &self.mem);
        // Logged even when the batch failed part-way: what it wrote stays
        // written.
        if let (Some(batch), Some(ram)) = (batch, &self.ram) {
            let ram = ram.memory();
            batch.log(queue, &self.mem, &mut |gpa, len| mark_in(&ram, gpa, len));
        }
        match used {
            Ok(true) => state.signal_used_queue(),
            Ok(false) => Ok(()),
            Err(e) if matches!(e, VirtioError::Queue { .. } | VirtioError::BadChain { .. }) => {
                eprintln!("nkvm: virtio queue {index}: {e}; the device process ends (the guest must reset the device)");
                std::process::exit(GUEST_QUEUE_ERROR_EXIT)
            }
            Err(e) => {
                eprintln!("nkvm: virtio queue {index}: {e}; the device process ends");
                std::process::exit(FAILED_EXIT)
            }
        }
    }
}

/// Serves one VMM connection on `args.socket`, then exits.
pub fn run(args: &DeviceArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    sandbox::close_inherited_fds()?;
    if args.model == DeviceModel::VirtioConsole {
        return serve(args, Console::new(io::stdout()), &[sandbox::VHOST_USER_CALLS]);
    }
    let disk = args.disk.as_ref().ok_or(VirtioProcessError::NoDisk)?;
    let block = Block::open(disk, args.read_only).map_err(VirtioProcessError::Disk)?;
    serve(args, block, &[sandbox::VHOST_USER_CALLS, sandbox::IMAGE_CALLS])
}

/// Binds the socket, enters the sandbox allowing `calls`, and serves
/// `model` to the VMM.
fn serve<D: VirtioDevice + Sync + 'static>(
    args: &DeviceArgs,
    model: D,
    calls: &[&[(i64, &str)]],
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let forbidden_call = std::env::var_os(FORBIDDEN_CALL_ENV).is_some();
    let no_dirty_log = std::env::var_os(NO_DIRTY_LOG_ENV).is_some();
    let _ = std::fs::remove_file(&args.socket);
    let listener = UnixListener::bind(&args.socket)
        .map_err(|source| VirtioProcessError::Listen { path: args.socket.display().to_string(), source })?;
    // A Listener made from a std listener has no path to unlink on drop:
    // the sandbox does not allow unlink, the VMM removes the file.
    let mut listener = Listener::from(listener);
    sandbox::enter(calls).map_err(VirtioProcessError::Sandbox)?;
    let backend = Arc::new(Mutex::new(ModelBackend {
        model,
        mem: GuestRam::new(),
        ram: None,
        log_all: false,
        forbidden_call,
        no_dirty_log,
    }));
    let daemon_err = |e: vhost_user_backend::Error| VirtioProcessError::Daemon(e.to_string());
    let name = format!("{:?}", args.model).to_lowercase();
    let mut daemon = VhostUserDaemon::new(name, backend, Ram::new(GuestMemoryMmap::new())).map_err(daemon_err)?;
    daemon.start(&mut listener).map_err(daemon_err)?;
    // One connection is all it serves: the listening socket goes.
    drop(listener);
    let code = match daemon.wait() {
        // The VMM hung up: the VM is gone or replaced this process.
        Ok(()) | Err(vhost_user_backend::Error::HandleRequest(_)) => 0,
        Err(e) => {
            eprintln!("nkvm: {}", daemon_err(e));
            FAILED_EXIT
        }
    };
    // Exit here, without dropping the daemon: its queue thread waits for an
    // exit event this backend does not provide, and dropping the daemon
    // joins that thread, so the process would outlive its VMM.
    std::process::exit(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A queue event handled after the VMM stopped the queue (a save's
    /// `GET_VRING_BASE` between vhost-user-backend taking the event and
    /// handing it over) is ignored. It used to be an error, which ended the
    /// process's queue thread: the device then served nothing more (the
    /// snapshot test that resumes a device process after a save failed in 5
    /// of 60 runs, and in none of 100 with this).
    #[test]
    fn an_event_for_a_stopped_queue_is_ignored_not_fatal() {
        let mut backend = ModelBackend {
            model: Console::new(io::sink()),
            mem: GuestRam::new(),
            ram: None,
            log_all: false,
            forbidden_call: false,
            no_dirty_log: false,
        };
        let ram = Ram::new(GuestMemoryMmap::new());
        let vrings: Vec<VringRwLock<Ram>> = (0..2).map(|_| VringRwLock::new(ram.clone(), 64).unwrap()).collect();
        // The transmit queue, not ready: set up by no SET_VRING_*, or
        // stopped by GET_VRING_BASE.
        vrings[1].set_queue_ready(false);
        backend.handle_event(1, EventSet::IN, &vrings, 0).expect("an event for a stopped queue is not an error");
    }
}
