//! The PCI side of a Linux VM: bus 0 behind ports 0xcf8-0xcff, a host
//! bridge, and virtio-pci devices (a block device on `--disk`, a console on
//! stdout), each with MSI-X through irqfd routes.
//!
//! The models are nkvm-devices state machines; this module only places
//! them: the configuration ports as one in-process I/O handler, each BAR as
//! an MMIO handler at the address the guest programs (moved when the guest
//! reprograms it, dropped while memory decoding is off), each MSI-X vector
//! as a GSI with an irqfd whose route follows the vector's table entry. A
//! device raises a vector by writing its eventfd, so the same signalling
//! works from another process.
//!
//! Queue notifications reach a worker thread per device through
//! ioeventfds ([`notify`]), without an exit; writes the ioeventfds do not
//! cover are served inline, in the vCPU thread. A vhost-user disk
//! ([`vhost_user`]) has no worker: its ioeventfds and its vectors' irqfds
//! are handed to the backend. With `--device-process` an image disk is
//! served the same way by nkvm's own sandboxed backend, `nkvm device
//! --model virtio-blk` ([`device_process`]), which nkvm restarts when it
//! dies.
//!
//! [`Attached::register_saved`] hands the bus and the in-process devices to
//! a machine's snapshot ([`saved`]): one blob per PCI function, and on
//! restore the BAR regions, MSI-X routes and queue workers the state
//! implies. Devices in nkvm's device processes are saved through their
//! transport (the machine restores them in process); a foreign vhost-user
//! backend makes the machine unsaveable, with the reason.

pub mod device_process;
mod dirty;
mod notify;
mod saved;
pub mod vhost_user;

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use nkvm::io::{IoHandler, IoRange};
use nkvm::irq::FIRST_USER_GSI;
use nkvm::ram_view::{RamKeeper, RamView};
use nkvm::{RegionId, Vm};
use nkvm_devices::pci::{BarEvent, MsiMessage, MsiSink, PciBus, SharedPciDevice, PCI_CONFIG_PORT, PCI_CONFIG_PORTS};
use nkvm_devices::virtio::pci::BAR_SIZE;
use nkvm_devices::virtio::{Block, Console, GuestRam, VirtioDevice, VirtioPci};
use nkvm_devices::{IoDevice, Snapshot};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::notify::QueueNotifier;
use self::saved::{SavedParts, SavedVirtio};
use self::vhost_user::VhostUserDevice;

/// Start of the MMIO window the DSDT gives the PCI host bridge; BARs are
/// assigned from here up.
pub const PCI_MMIO_BASE: u64 = 0xc000_0000;
/// End (exclusive) of that window: the IOAPIC is at 0xfec0_0000.
pub const PCI_MMIO_END: u64 = 0xfec0_0000;

/// Called when the guest writes the reset control register at 0xcf9 (the
/// ACPI reset register, shared with the PCI configuration ports).
#[derive(Clone)]
pub struct ResetHook(pub Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for ResetHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResetHook")
    }
}

/// Where a virtio-blk disk's data lives (`--disk`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disk {
    /// A raw image file, served in process: `--disk PATH`.
    Image(PathBuf),
    /// A vhost-user-blk backend listening on a Unix socket:
    /// `--disk vhost-user:SOCKET`.
    VhostUser(PathBuf),
}

impl std::str::FromStr for Disk {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("vhost-user:") {
            Some("") => Err("vhost-user: needs a socket path (vhost-user:/path/to/socket)".into()),
            Some(socket) => Ok(Disk::VhostUser(socket.into())),
            None => Ok(Disk::Image(s.into())),
        }
    }
}

/// What to put on the bus.
#[derive(Debug, Clone, Default)]
pub struct PciConfig {
    /// What a guest write of a reset (bit 2) to port 0xcf9 calls.
    pub reset: Option<ResetHook>,
    /// The disk for virtio-blk.
    pub disk: Option<Disk>,
    /// Present the disk read-only.
    pub disk_read_only: bool,
    /// Serve an image disk in a device process started from this
    /// executable (nkvm: `nkvm device --model virtio-blk`), not in the VMM.
    pub device_process: Option<PathBuf>,
    /// Environment added to the device process's (tests use it to make the
    /// model misbehave: [`crate::virtio_process::FORBIDDEN_CALL_ENV`]).
    pub device_process_env: Vec<(String, String)>,
    /// Where the device processes' stdout goes (the console's output), if
    /// not to the VMM's.
    pub device_process_stdout: Option<PathBuf>,
}

/// What [`attach`] started that a caller may watch.
#[derive(Debug, Default)]
pub struct Attached {
    /// The virtio-blk device process's record, if the disk is served by one.
    pub block_process: Option<Arc<Mutex<device_process::ProcessLog>>>,
    /// The virtio-console device process's record, if there is one.
    pub console_process: Option<Arc<Mutex<device_process::ProcessLog>>>,
    /// The bus and the in-process devices whose state a snapshot takes,
    /// and why the others cannot be saved ([`Attached::register_saved`]).
    saved: SavedParts,
}

impl PciConfig {
    /// How to start the device process serving `model`.
    fn process_spec(&self, model: &'static str, disk: Option<PathBuf>) -> device_process::ProcessSpec {
        device_process::ProcessSpec {
            exe: self.device_process.clone().unwrap_or_default(),
            model,
            read_only: disk.is_some() && self.disk_read_only,
            disk,
            socket: unique_socket(model),
            env: self.device_process_env.clone(),
            stdout: self.device_process_stdout.clone(),
        }
    }
}

/// Why the PCI devices could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PciSetupError {
    /// The disk image could not be opened.
    #[error(transparent)]
    Disk(#[from] nkvm_devices::virtio::BlockError),
    /// nkvm's own executable, which the device process runs, is not found.
    #[error("cannot find nkvm's own executable to start the disk's device process")]
    Exe(#[source] io::Error),
    /// The disk's device process could not be started.
    #[error(transparent)]
    DeviceProcess(#[from] device_process::DeviceProcessError),
    /// The vhost-user backend could not be used.
    #[error(transparent)]
    VhostUser(#[from] vhost_user::VhostUserError),
    /// Guest RAM could not be mapped for the devices.
    #[error("cannot map guest memory for the PCI devices: {0}")]
    Memory(String),
    /// A device could not be laid out.
    #[error(transparent)]
    Virtio(#[from] nkvm_devices::virtio::VirtioPciError),
    /// The bus is full.
    #[error(transparent)]
    Bus(#[from] nkvm_devices::pci::PciBusError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd for MSI-X vector {vector}")]
    EventFd {
        /// The vector.
        vector: u16,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// KVM refused an irqfd.
    #[error(transparent)]
    Irq(#[from] nkvm::irq::IrqError),
    /// Attaching the configuration ports failed.
    #[error(transparent)]
    Attach(#[from] nkvm::IoRegionError),
    /// The queue-notification worker could not be started.
    #[error("cannot start a virtio queue worker")]
    Worker(#[source] io::Error),
    /// Read-only was asked of a disk nkvm does not serve.
    #[error("--disk-readonly does not apply to a vhost-user disk: export it without writable=on instead")]
    ReadOnlyVhostUser,
    /// The eventfds handed to a vhost-user backend could not be made.
    #[error("cannot create the queue and vector eventfds for a vhost-user backend")]
    Eventfds(#[source] io::Error),
    /// The MMIO window is exhausted.
    #[error("no room for a {size:#x}-byte BAR in the PCI window {PCI_MMIO_BASE:#x}-{PCI_MMIO_END:#x}")]
    WindowFull {
        /// The BAR's size.
        size: u64,
    },
}

/// Builds the bus and its devices and attaches them to `vm`.
pub fn attach(vm: &Arc<Vm>, config: &PciConfig) -> Result<Attached, PciSetupError> {
    // SAFETY: `keeper` goes beside every clone of `mem`: in the builder,
    // in `RamWrites`, and in each device's sink (see `guest_ram`).
    let (mem, keeper) = unsafe { guest_ram(vm)? };
    if config.device_process.is_some() || matches!(config.disk, Some(Disk::VhostUser(_))) {
        if let Some(r) = vm.memory().regions().iter().find(|r| r.backing.is_copy_on_write()) {
            return Err(PciSetupError::Memory(format!(
                "guest memory {} is a copy-on-write mapping of a file (a restored snapshot), which a device \
                 process or vhost-user backend cannot map; serve the devices in process",
                r.name()
            )));
        }
    }
    let mut builder = Builder {
        vm: vm.clone(),
        mem,
        keeper,
        bus: PciBus::new(),
        next_gsi: FIRST_USER_GSI,
        window: Window { next: PCI_MMIO_BASE },
        notifiers: HashMap::new(),
        saved: Vec::new(),
        unlogged: Vec::new(),
    };
    vm.add_dirty_source(Arc::new(dirty::RamWrites::new(builder.mem.clone(), builder.keeper.clone())));
    let mut attached = Attached::default();
    match &config.disk {
        Some(Disk::Image(path)) if config.device_process.is_some() => {
            let spec = config.process_spec(vhost_user::BLOCK.name, Some(path.clone()));
            let process = device_process::VirtioProcess::spawn(spec)?;
            let block = VhostUserDevice::connect_process(process, vhost_user::BLOCK, builder.mem.clone())?;
            log::info!("virtio-blk: {} in a device process ({} sectors)", path.display(), block.capacity());
            attached.block_process = block.process_log();
            builder.add_vhost_user(block)?;
        }
        Some(Disk::Image(path)) => {
            let block = Block::open(path, config.disk_read_only)?;
            log::info!("virtio-blk: {} ({} sectors)", path.display(), block.capacity());
            builder.add(block)?;
        }
        Some(Disk::VhostUser(socket)) => {
            if config.disk_read_only {
                return Err(PciSetupError::ReadOnlyVhostUser);
            }
            let block = VhostUserDevice::connect(socket, vhost_user::BLOCK, builder.mem.clone())?;
            log::info!("virtio-blk: vhost-user backend at {} ({} sectors)", socket.display(), block.capacity());
            builder.add_vhost_user(block)?;
        }
        None => {}
    }
    if config.device_process.is_some() {
        let process = device_process::VirtioProcess::spawn(config.process_spec(vhost_user::CONSOLE.name, None))?;
        let console = VhostUserDevice::connect_process(process, vhost_user::CONSOLE, builder.mem.clone())?;
        attached.console_process = console.process_log();
        builder.add_vhost_user(console)?;
    } else {
        builder.add(Console::new(io::stdout()))?;
    }
    let Builder { bus, notifiers, saved, unlogged, .. } = builder;
    attached.saved.unsaveable.extend(unlogged);
    let mut ports =
        ConfigPorts { bus, vm: Arc::downgrade(vm), regions: HashMap::new(), notifiers, reset: config.reset.clone() };
    ports.apply_bar_events();
    let ports = Arc::new(Mutex::new(ports));
    vm.attach_handler(IoRange::pio(PCI_CONFIG_PORT, PCI_CONFIG_PORTS), Box::new(SharedPorts(ports.clone())))?;
    attached.saved.devices =
        saved.into_iter().map(|(slot, device)| SavedVirtio { slot, device, ports: ports.clone() }).collect();
    attached.saved.ports = Some(ports);
    Ok(attached)
}

/// A socket path no other VM of this process uses.
fn unique_socket(model: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("nkvm-{}-{model}-{n}.sock", std::process::id()))
}

/// The in-process devices' view of the VM's RAM: the VM's own mapping
/// ([`RamView`]), so a device reads and writes exactly the guest's bytes
/// whether the RAM is a memfd or a copy-on-write mapping of a restored
/// snapshot (whose file a second mapping would see instead, and write).
/// A memfd region carries its file, for the vhost-user backends.
///
/// The memory stays mapped only while the returned [`RamKeeper`] (or the
/// VM's map) holds the backings. In [`attach`], every holder of the memory
/// holds a keeper beside it: the [`Builder`], [`dirty::RamWrites`], and
/// each device, through its [`IrqfdSink`] (which `VirtioPci` owns for its
/// whole life, beside the memory; a vhost-user device's own copy lives
/// inside the same `VirtioPci`). A worker thread reaches a device only
/// through the device's `Arc`, so it holds the keeper too.
///
/// # Safety
///
/// The memory, and every clone of it, may be used only while the keeper
/// (or a clone) is alive: keep one in every owner of a clone.
unsafe fn guest_ram(vm: &Vm) -> Result<(GuestRam, RamKeeper), PciSetupError> {
    let view = RamView::new(&vm.memory()).map_err(|e| PciSetupError::Memory(e.to_string()))?;
    let keeper = view.keeper();
    // SAFETY: this function's contract passes `RamView::memory`'s to the
    // caller, with the keeper.
    let mem = unsafe { view.memory() };
    Ok((mem, keeper))
}

/// BAR addresses in the host bridge's window.
struct Window {
    next: u64,
}

impl Window {
    fn take(&mut self, size: u64) -> Result<u64, PciSetupError> {
        let at = self.next.next_multiple_of(size);
        let end = at.checked_add(size).filter(|&e| e <= PCI_MMIO_END).ok_or(PciSetupError::WindowFull { size })?;
        self.next = end;
        Ok(at)
    }
}

/// A device placed on the bus, as its own type (the bus holds it as a
/// `SharedPciDevice`).
type Placed<D> = Arc<Mutex<VirtioPci<D>>>;

/// The bus being populated, and what each device takes from the machine.
struct Builder {
    vm: Arc<Vm>,
    mem: GuestRam,
    /// Keeps `mem` mapped ([`guest_ram`]); each device's sink gets a clone.
    keeper: RamKeeper,
    bus: PciBus,
    /// Next GSI for an MSI route (those below are kept for the IOAPIC).
    next_gsi: u32,
    window: Window,
    notifiers: HashMap<u8, QueueNotifier>,
    /// The devices, by slot, as a snapshot sees them.
    saved: Vec<(u8, saved::SharedSaveable)>,
    /// Why a backend's device cannot be saved (it does not log its writes).
    unlogged: Vec<String>,
}

impl Builder {
    /// Puts `device` on the bus behind virtio-pci, with one irqfd per
    /// vector and a notification worker.
    fn add<D: VirtioDevice + Snapshot + 'static>(&mut self, device: D) -> Result<(), PciSetupError> {
        let queues = device.queue_max_sizes().len();
        let sink = IrqfdSink::new(&self.vm, queues as u16 + 1, &mut self.next_gsi, self.keeper.clone())?;
        let (virtio, slot) = self.place(device, sink)?;
        self.saved.push((slot, virtio.clone()));
        let shared: SharedPciDevice = virtio;
        let notifier = QueueNotifier::start(Arc::downgrade(&shared), queues).map_err(PciSetupError::Worker)?;
        self.notifiers.insert(slot, notifier);
        Ok(())
    }

    /// Puts a vhost-user device on the bus: its queues' ioeventfds and its
    /// vectors' irqfds go to the backend, and no worker serves them here.
    fn add_vhost_user(&mut self, mut device: VhostUserDevice) -> Result<(), PciSetupError> {
        let queues = device.queue_max_sizes().len();
        let handed: Arc<[AtomicBool]> = (0..=queues).map(|_| AtomicBool::new(false)).collect();
        let sink =
            IrqfdSink::external(&self.vm, queues as u16 + 1, &mut self.next_gsi, self.keeper.clone(), handed.clone())?;
        let notifier = QueueNotifier::without_worker(queues).map_err(PciSetupError::Eventfds)?;
        let kicks = notifier.eventfds().iter().map(EventFd::try_clone).collect::<io::Result<Vec<_>>>();
        let vectors = sink.vectors.iter().map(|(_, fd)| fd.try_clone()).collect::<io::Result<Vec<_>>>();
        let fds = vhost_user::Eventfds {
            kicks: kicks.map_err(PciSetupError::Eventfds)?,
            vectors: vectors.map_err(PciSetupError::Eventfds)?,
            handed,
        };
        device.set_eventfds(fds);
        // The pages the backend writes, into the VM's dirty log.
        self.vm.add_dirty_source(device.dirty_log());
        // Saved through the transport (its queues stopped, positions read);
        // unless the backend's writes are missing from the dirty log, where
        // a copy could miss them.
        if !device.logs_writes() {
            self.unlogged.push(format!(
                "the {} backend at {} does not log the pages it writes (it offers neither \
                 VHOST_USER_PROTOCOL_F_LOG_SHMFD nor VHOST_F_LOG_ALL), so a copy of the guest could miss them",
                device.kind_name(),
                device.socket().display()
            ));
        }
        let (virtio, slot) = self.place(device, sink)?;
        self.saved.push((slot, virtio.clone()));
        vhost_user::watch(&virtio).map_err(PciSetupError::Worker)?;
        self.notifiers.insert(slot, notifier);
        Ok(())
    }

    /// `device` behind virtio-pci on the next slot, BAR0 in the window.
    fn place<D: VirtioDevice + 'static>(
        &mut self,
        device: D,
        sink: IrqfdSink,
    ) -> Result<(Placed<D>, u8), PciSetupError> {
        let bar = self.window.take(BAR_SIZE)?;
        let virtio = Arc::new(Mutex::new(VirtioPci::new(device, self.mem.clone(), bar, Box::new(sink))?));
        let slot = self.bus.add(virtio.clone())?;
        log::info!("pci: 00:{slot:02x}.0 virtio, BAR0 at {bar:#x}");
        Ok((virtio, slot))
    }
}

/// MSI-X vectors as irqfds: vector N raises GSI `base + N`, whose MSI route
/// follows the guest's table entry.
///
/// A vector's irqfd raises nothing while the vector is masked (its route is
/// gone). An in-process device signals through [`Msix`](nkvm_devices::pci::msix),
/// which keeps the pending bit; a vhost-user backend (a device process or a
/// foreign one) writes the irqfd itself, so nobody can tell whether it
/// signalled while masked. For those the sink raises a vector once when it
/// is unmasked, if the backend was handed it as a queue's call eventfd
/// (`handed`): at worst one spurious interrupt, which virtio drivers take
/// as "nothing new in the used ring", never a lost one. A vector only the
/// VMM raises (the configuration vector) goes through `Msix`'s pending bit
/// and is not raised again: that would be a spurious configuration change.
struct IrqfdSink {
    vm: Weak<Vm>,
    vectors: Vec<(u32, EventFd)>,
    /// Whether each vector has a route now.
    routed: Vec<bool>,
    /// A backend writes the irqfds directly: which vectors it was handed.
    handed: Option<Arc<[AtomicBool]>>,
    /// Keeps the device's view of guest RAM mapped ([`guest_ram`]): the
    /// sink is the part of a `VirtioPci` the VMM supplies, owned by it, as
    /// its memory is, for its whole life, so the two cannot part.
    _ram: RamKeeper,
}

impl IrqfdSink {
    fn new(vm: &Arc<Vm>, count: u16, next_gsi: &mut u32, ram: RamKeeper) -> Result<Self, PciSetupError> {
        let mut vectors = Vec::new();
        for vector in 0..count {
            let fd = EventFd::new(EFD_NONBLOCK).map_err(|source| PciSetupError::EventFd { vector, source })?;
            let gsi = *next_gsi;
            *next_gsi += 1;
            vm.irqfd(gsi, &fd)?;
            vectors.push((gsi, fd));
        }
        let routed = vec![false; vectors.len()];
        Ok(Self { vm: Arc::downgrade(vm), vectors, routed, handed: None, _ram: ram })
    }

    /// The same, for vectors a vhost-user backend raises directly (those
    /// it is handed, marked in `handed`).
    fn external(
        vm: &Arc<Vm>,
        count: u16,
        next_gsi: &mut u32,
        ram: RamKeeper,
        handed: Arc<[AtomicBool]>,
    ) -> Result<Self, PciSetupError> {
        Ok(Self { handed: Some(handed), ..Self::new(vm, count, next_gsi, ram)? })
    }
}

impl MsiSink for IrqfdSink {
    fn signal(&mut self, vector: u16) {
        match self.vectors.get(usize::from(vector)) {
            Some((gsi, fd)) => {
                if let Err(e) = fd.write(1) {
                    log::warn!("pci: MSI-X vector {vector} (GSI {gsi}) lost: {e}");
                }
            }
            None => log::debug!("pci: MSI-X vector {vector} has no GSI"),
        }
    }

    fn route(&mut self, vector: u16, message: Option<MsiMessage>) {
        let (Some(vm), Some((gsi, _))) = (self.vm.upgrade(), self.vectors.get(usize::from(vector))) else { return };
        let msi = message.map(|m| nkvm::MsiMessage { address: m.address, data: m.data });
        if let Err(e) = vm.set_msi_route(*gsi, msi) {
            log::error!("pci: cannot route MSI-X vector {vector} (GSI {gsi}) to {msi:?}: {e}");
            return;
        }
        let was = std::mem::replace(&mut self.routed[usize::from(vector)], msi.is_some());
        let backend_raises =
            self.handed.as_ref().and_then(|h| h.get(usize::from(vector))).is_some_and(|h| h.load(Ordering::SeqCst));
        if backend_raises && msi.is_some() && !was {
            // The backend may have signalled while the vector had no route.
            self.signal(vector);
        }
    }
}

/// Ports 0xcf8-0xcff: the bus, and the BAR regions it maps.
struct ConfigPorts {
    bus: PciBus,
    reset: Option<ResetHook>,
    vm: Weak<Vm>,
    regions: HashMap<(u8, usize), RegionId>,
    notifiers: HashMap<u8, QueueNotifier>,
}

impl ConfigPorts {
    /// Moves BAR regions where the guest's configuration writes put them.
    fn apply_bar_events(&mut self) {
        let events = self.bus.take_bar_events();
        let Some(vm) = self.vm.upgrade() else { return };
        for event in events {
            self.apply(&vm, event);
        }
    }

    fn apply(&mut self, vm: &Vm, event: BarEvent) {
        let BarEvent { slot, bar, new, .. } = event;
        if let Some(id) = self.regions.remove(&(slot, bar)) {
            if let Err(e) = vm.detach_region(id) {
                log::warn!("pci: 00:{slot:02x}.0 BAR{bar}: cannot unmap: {e}");
            }
        }
        if let (0, Some(notifier)) = (bar, self.notifiers.get_mut(&slot)) {
            notifier.follow_bar(vm, new.map(|n| n.address));
        }
        let (Some(new), Some(device)) = (new, self.bus.device(slot)) else { return };
        let range = IoRange::mmio(new.address, new.size);
        match vm.attach_handler(range, Box::new(BarRegion { device, bar })) {
            Ok(id) => {
                log::debug!("pci: 00:{slot:02x}.0 BAR{bar} at {range}");
                self.regions.insert((slot, bar), id);
            }
            // The guest put it on top of something: it decodes nowhere.
            Err(e) => {
                log::warn!("pci: 00:{slot:02x}.0 BAR{bar}: cannot map at {range}: {e}");
                if let (0, Some(notifier)) = (bar, self.notifiers.get_mut(&slot)) {
                    notifier.follow_bar(vm, None);
                }
            }
        }
    }
}

impl IoHandler for ConfigPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.bus.read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // A byte at 0xcf9 is the reset control register, not configuration.
        if offset == RESET_CONTROL_OFFSET && data.len() == 1 {
            if data[0] & RESET_CPU != 0 {
                if let Some(reset) = &self.reset {
                    (reset.0)();
                }
            }
            return;
        }
        self.bus.write(offset, data);
        self.apply_bar_events();
    }
}

/// The configuration ports as the VM's handler; a snapshot restore reaches
/// the same [`ConfigPorts`] to move the BAR regions.
struct SharedPorts(Arc<Mutex<ConfigPorts>>);

impl IoHandler for SharedPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).write(offset, data);
    }
}

/// 0xcf9 within the 0xcf8 ports.
const RESET_CONTROL_OFFSET: u64 = 1;
/// Reset control: "reset CPU" (0x06 and 0x0e both set it).
const RESET_CPU: u8 = 1 << 2;

/// One BAR of one device, as an MMIO region.
struct BarRegion {
    device: SharedPciDevice,
    bar: usize,
}

impl IoHandler for BarRegion {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.device.lock().unwrap_or_else(|e| e.into_inner()).bar_read(self.bar, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.device.lock().unwrap_or_else(|e| e.into_inner()).bar_write(self.bar, offset, data);
    }
}

#[cfg(test)]
mod tests;
