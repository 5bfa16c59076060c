//! I/O dispatch: MMIO and PIO ranges served by in-process handlers or by
//! device models behind a socket (the RFC's "assign an mmio region to a
//! socketpair carrying transactions").
//!
//! An attached range is served inside [`Vcpu::enter_guest`](crate::Vcpu::enter_guest):
//! the guest's access becomes a transaction on the region's socket (wire
//! format: `docs/wire-format.md`, crate `nkvm-wire`) or a call to its
//! handler, a read is completed with the answer, and the vCPU re-enters
//! without the caller seeing an exit (the tracer still does). Accesses
//! outside every attached range come back as exits, as before.
//!
//! **Ordering.** A [`Ordering::Posted`] region does not wait for its writes:
//! they are batched on its socket. Before any non-posted access — a read, a
//! write to a `Sync` region or handler, or an MMIO/PIO exit returned to the
//! caller — every region with posted writes outstanding is synchronized (a
//! `Sync` transaction, answered only once the device has served everything
//! before it), so no access overtakes an earlier posted write.
//!
//! **Failure.** A device that closes its socket, sends garbage, or does not
//! answer within the region's timeout is marked failed: its reads return all
//! ones (as a PCI master abort does), its writes are dropped, the VM keeps
//! running, and the vCPU whose access found it returns
//! [`Exit::IoRegionFailed`](crate::Exit::IoRegionFailed) once (a failure
//! found by a flush of posted writes, the coalesced ring or a detach is
//! returned by the next `enter_guest` of any vCPU, before it enters the
//! guest); the reason is kept in
//! [`Vm::io_region_failures`](crate::Vm::io_region_failures).
//!
//! ```no_run
//! use std::os::unix::net::UnixStream;
//! use nkvm::io::{IoRange, Ordering};
//! # fn f(vm: &nkvm::Vm) -> Result<(), nkvm::io::IoRegionError> {
//! let (vm_end, device_end) = UnixStream::pair().expect("socketpair");
//! // ... hand `device_end` to a device process (nkvm_devices::serve) ...
//! let id = vm.attach_region(IoRange::mmio(0xd000_0000, 0x1000), vm_end, Ordering::Posted)?;
//! // ... run vCPUs ...
//! vm.detach_region(id)?;
//! # Ok(()) }
//! ```

use std::fmt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use nkvm_wire::ioregion::{Client, RegionInfo, Space};
use nkvm_wire::spin::SpinStream;
use nkvm_wire::WireError;

mod posted;
mod split;

use split::socket_access;

/// Which address space a range is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoSpace {
    /// Guest physical memory not backed by RAM.
    Mmio,
    /// x86 I/O ports.
    Pio,
}

/// A range of MMIO addresses or I/O ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IoRange {
    /// Address space.
    pub space: IoSpace,
    /// First address (or port).
    pub base: u64,
    /// Length in bytes (or ports).
    pub len: u64,
}

impl IoRange {
    /// An MMIO range.
    pub const fn mmio(base: u64, len: u64) -> Self {
        Self { space: IoSpace::Mmio, base, len }
    }

    /// A port range.
    pub const fn pio(base: u16, len: u16) -> Self {
        Self { space: IoSpace::Pio, base: base as u64, len: len as u64 }
    }

    fn contains(&self, space: IoSpace, addr: u64, size: u64) -> bool {
        self.space == space && addr >= self.base && addr.saturating_add(size) <= self.base.saturating_add(self.len)
    }

    fn overlaps(&self, other: &IoRange) -> bool {
        self.space == other.space
            && self.base < other.base.saturating_add(other.len)
            && other.base < self.base.saturating_add(self.len)
    }
}

impl fmt::Display for IoRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let space = match self.space {
            IoSpace::Mmio => "mmio",
            IoSpace::Pio => "pio",
        };
        write!(f, "{space} {:#x}+{:#x}", self.base, self.len)
    }
}

/// Whether writes to a socket region wait for the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ordering {
    /// Every access completes at the device before the vCPU resumes.
    #[default]
    Sync,
    /// Writes are posted (queued, not awaited); reads stay synchronous.
    Posted,
}

/// The identity of an attached range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionId(pub u64);

impl fmt::Display for RegionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "io-region#{}", self.0)
    }
}

/// An in-process device: serves accesses at offsets within its range.
pub trait IoHandler: Send {
    /// A read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// How a socket region is attached.
#[derive(Debug, Clone)]
pub struct SocketOptions {
    /// Sync or posted writes.
    pub ordering: Ordering,
    /// How long to wait for the device's answer before declaring it failed.
    pub timeout: Duration,
    /// A name for messages (defaults to the range).
    pub name: Option<String>,
    /// How long to poll for the device's answer before blocking: a wake-up
    /// costs ~40 µs on a nested host, a busy device answers in a few.
    pub spin: Duration,
}

impl Default for SocketOptions {
    fn default() -> Self {
        Self { ordering: Ordering::Sync, timeout: Duration::from_secs(5), name: None, spin: Duration::from_micros(100) }
    }
}

/// Errors attaching or detaching I/O regions.
#[derive(Debug, thiserror::Error)]
pub enum IoRegionError {
    /// The range is empty or does not fit its address space.
    #[error("{0} is empty or does not fit its address space")]
    BadRange(IoRange),
    /// The range overlaps one already attached.
    #[error("{new} overlaps {existing} ({id})")]
    Overlap {
        /// The range asked for.
        new: IoRange,
        /// The range in the way.
        existing: IoRange,
        /// Its id.
        id: RegionId,
    },
    /// The device side did not complete the handshake.
    #[error("device for {range} failed the handshake")]
    Handshake {
        /// The range.
        range: IoRange,
        /// Why.
        #[source]
        source: WireError,
    },
    /// Setting the socket's timeout failed.
    #[error("cannot configure the socket for {range}")]
    Socket {
        /// The range.
        range: IoRange,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// No region with that id.
    #[error("no attached I/O region {0}")]
    NotAttached(RegionId),
    /// The region is served in this process, not behind a socket.
    #[error("I/O region {0} is served by a handler in this process, which has no state to ask for")]
    NotASocket(RegionId),
    /// The region's device failed earlier; nothing is asked of it.
    #[error("the device of I/O region {name} failed earlier ({reason})")]
    Failed {
        /// The region's name.
        name: String,
        /// Why it failed.
        reason: String,
    },
    /// Asking the device for its state, or giving it one, failed.
    #[error("state transfer with the device of I/O region {name} failed")]
    State {
        /// The region's name.
        name: String,
        /// Why.
        #[source]
        source: WireError,
    },
}

/// A region whose device failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionFailure {
    /// Its id.
    pub id: RegionId,
    /// Its name.
    pub name: String,
    /// What went wrong.
    pub reason: String,
}

// One per region, inside its `Arc<Attached>`: the socket variant's size
// costs nothing, and boxing it would add a pointer chase to every access.
#[allow(clippy::large_enum_variant)]
enum Backend {
    Socket(Mutex<Option<Client<SpinStream, SpinStream>>>),
    Handler(Mutex<Box<dyn IoHandler>>),
}

struct Attached {
    id: RegionId,
    range: IoRange,
    name: String,
    ordering: Ordering,
    backend: Backend,
    /// Posted writes sent since the device last confirmed it served them.
    posted_pending: AtomicBool,
    /// Being detached: accesses are no longer its (set under the client's
    /// lock, after its last posted writes were served).
    detached: AtomicBool,
    failure: Mutex<Option<String>>,
}

impl fmt::Debug for Attached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attached").field("id", &self.id).field("range", &self.range).field("name", &self.name).finish()
    }
}

/// The result of serving one access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Served {
    /// The value of a read (all ones when the device failed).
    pub(crate) value: u64,
    /// The device failed during this access (report it once).
    pub(crate) failed: Option<RegionId>,
}

/// All attached ranges of a VM; shared with its vCPUs.
#[derive(Debug, Default)]
pub(crate) struct IoRegions {
    regions: RwLock<Vec<Arc<Attached>>>,
    /// Whether `regions` has any entry: read on every I/O exit without
    /// taking the lock (updated under its write side).
    attached: AtomicBool,
    next_id: AtomicU64,
    /// How many regions have posted writes the device has not confirmed
    /// (`posted_pending` set): the exit path's cheap check. Changed only
    /// with a region's flag, under its client's lock, so it is never zero
    /// while a write waits (a flusher does not clear it before it is done,
    /// so another vCPU's flush never skips what it still has to send).
    posted_regions: AtomicUsize,
    failures: Mutex<Vec<RegionFailure>>,
    /// Failures found where no access could report them (a flush of posted
    /// writes, the coalesced ring, a detach): the next `enter_guest` of any
    /// vCPU returns `Exit::IoRegionFailed` for each, before it enters.
    unreported: Mutex<Vec<RegionId>>,
    /// Whether `unreported` has any: the entry path's cheap check.
    any_unreported: AtomicBool,
    /// Posted MMIO regions registered as KVM coalesced-MMIO zones: their
    /// writes go to the VM's coalesced ring without an exit.
    coalesced: Mutex<Vec<RegionId>>,
    any_coalesced: AtomicBool,
    /// Serializes draining the (VM-wide) coalesced ring.
    ring_lock: Mutex<()>,
}

impl IoRegions {
    /// The range of an attached region.
    pub(crate) fn range(&self, id: RegionId) -> Option<IoRange> {
        self.regions.read().unwrap_or_else(|p| p.into_inner()).iter().find(|r| r.id == id).map(|r| r.range)
    }
    fn reserve_id(&self) -> RegionId {
        RegionId(self.next_id.fetch_add(1, AtomicOrdering::Relaxed) + 1)
    }

    fn insert(
        &self,
        id: RegionId,
        range: IoRange,
        name: Option<String>,
        ordering: Ordering,
        backend: Backend,
    ) -> Result<RegionId, IoRegionError> {
        let mut regions = self.regions.write().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = regions.iter().find(|r| r.range.overlaps(&range)) {
            return Err(IoRegionError::Overlap { new: range, existing: existing.range, id: existing.id });
        }
        let name = name.unwrap_or_else(|| range.to_string());
        let at = regions.partition_point(|r| (r.range.space as u8, r.range.base) < (range.space as u8, range.base));
        self.attached.store(true, AtomicOrdering::SeqCst);
        regions.insert(
            at,
            Arc::new(Attached {
                id,
                range,
                name,
                ordering,
                backend,
                posted_pending: AtomicBool::new(false),
                detached: AtomicBool::new(false),
                failure: Mutex::new(None),
            }),
        );
        Ok(id)
    }

    pub(crate) fn attach_socket(
        &self,
        range: IoRange,
        socket: UnixStream,
        options: SocketOptions,
    ) -> Result<RegionId, IoRegionError> {
        check_range(range)?;
        socket
            .set_read_timeout(Some(options.timeout))
            .and_then(|_| socket.set_write_timeout(Some(options.timeout)))
            .map_err(|source| IoRegionError::Socket { range, source })?;
        // Reserved before the hello that names it: two attaches at once
        // tell their devices different ids, each the one the caller gets.
        let id = self.reserve_id();
        let info = RegionInfo {
            id: id.0,
            space: match range.space {
                IoSpace::Mmio => Space::Mmio,
                IoSpace::Pio => Space::Pio,
            },
            base: range.base,
            len: range.len,
        };
        let client = Client::over_spinning(socket, info, options.spin)
            .map_err(|source| IoRegionError::Handshake { range, source })?;
        self.insert(id, range, options.name, options.ordering, Backend::Socket(Mutex::new(Some(client))))
    }

    pub(crate) fn attach_handler(
        &self,
        range: IoRange,
        handler: Box<dyn IoHandler>,
    ) -> Result<RegionId, IoRegionError> {
        check_range(range)?;
        self.insert(self.reserve_id(), range, None, Ordering::Sync, Backend::Handler(Mutex::new(handler)))
    }

    pub(crate) fn detach(&self, id: RegionId) -> Result<(), IoRegionError> {
        let region = {
            let regions = self.regions.read().unwrap_or_else(|p| p.into_inner());
            regions.iter().find(|r| r.id == id).cloned().ok_or(IoRegionError::NotAttached(id))?
        };
        // Writes the guest posted before the detach still reach the device,
        // while the region is still listed (so another vCPU's flush waits
        // for them), and from then on it takes no more: an access that
        // found it comes back as an exit.
        if let Backend::Socket(client) = &region.backend {
            let mut client = client.lock().unwrap_or_else(|p| p.into_inner());
            if region.posted_pending.load(AtomicOrdering::SeqCst) {
                if let Some(c) = client.as_mut() {
                    if let Err(e) = c.sync() {
                        self.fail(&region, &mut client, &e);
                        self.unreported(region.id);
                    }
                }
                self.clear_posted(&region);
            }
            region.detached.store(true, AtomicOrdering::SeqCst);
        }
        let mut regions = self.regions.write().unwrap_or_else(|p| p.into_inner());
        let at = regions.iter().position(|r| r.id == id).ok_or(IoRegionError::NotAttached(id))?;
        regions.remove(at);
        self.attached.store(!regions.is_empty(), AtomicOrdering::SeqCst);
        Ok(())
    }

    /// The saved state of the device behind socket region `id`, asked for
    /// in its stream (after every write sent to it). An error of the
    /// exchange itself leaves the stream out of step: the region fails, as
    /// after a failed access. A device that has no state, or speaks only
    /// version 1, is refused without harm.
    pub(crate) fn state(&self, id: RegionId) -> Result<Vec<u8>, IoRegionError> {
        // A state too large is found at its first chunk, with the rest still
        // in the stream: the connection is out of step and is dropped.
        self.with_client(id, Client::save_state, |e| {
            matches!(e, WireError::NoDeviceState | WireError::StateNotInVersion { .. })
        })
    }

    /// Gives the device behind socket region `id` a state to take, in its
    /// stream (after every write sent to it). As for [`Self::state`]; a
    /// model's refusal is refused without harm too.
    pub(crate) fn load_state(&self, id: RegionId, state: &[u8]) -> Result<(), IoRegionError> {
        // Too large and not in the version are refused before anything is
        // sent; a refusal or "no state" is the model's whole answer. (A
        // refusal whose reason is too large is not: its chunks are still in
        // the stream.)
        let ours_too_large = state.len() > nkvm_wire::ioregion::state::MAX_STATE_LEN as usize;
        self.with_client(
            id,
            |c| c.load_state(state),
            |e| {
                matches!(
                    e,
                    WireError::NoDeviceState | WireError::StateNotInVersion { .. } | WireError::StateRefused { .. }
                ) || (ours_too_large && matches!(e, WireError::StateTooLarge { .. }))
            },
        )
    }

    /// Runs a state exchange on socket region `id`'s client.
    fn with_client<T>(
        &self,
        id: RegionId,
        exchange: impl FnOnce(&mut Client<SpinStream, SpinStream>) -> Result<T, WireError>,
        harmless: impl FnOnce(&WireError) -> bool,
    ) -> Result<T, IoRegionError> {
        let region = {
            let regions = self.regions.read().unwrap_or_else(|p| p.into_inner());
            regions.iter().find(|r| r.id == id).cloned().ok_or(IoRegionError::NotAttached(id))?
        };
        let Backend::Socket(client) = &region.backend else { return Err(IoRegionError::NotASocket(id)) };
        let mut guard = client.lock().unwrap_or_else(|p| p.into_inner());
        let Some(c) = guard.as_mut() else {
            let reason = region.failure.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_default();
            return Err(IoRegionError::Failed { name: region.name.clone(), reason });
        };
        match exchange(c) {
            Ok(value) => {
                self.clear_posted(&region);
                Ok(value)
            }
            Err(source) => {
                if !harmless(&source) {
                    self.fail(&region, &mut guard, &source);
                }
                Err(IoRegionError::State { name: region.name.clone(), source })
            }
        }
    }

    /// A failure no access reported, for the next entry to.
    pub(super) fn unreported(&self, id: RegionId) {
        self.unreported.lock().unwrap_or_else(|p| p.into_inner()).push(id);
        self.any_unreported.store(true, AtomicOrdering::SeqCst);
    }

    /// The oldest failure no exit has reported yet, taken.
    #[inline]
    pub(crate) fn take_unreported(&self) -> Option<RegionId> {
        if !self.any_unreported.load(AtomicOrdering::Relaxed) {
            return None;
        }
        self.take_unreported_slow()
    }

    #[cold]
    fn take_unreported_slow(&self) -> Option<RegionId> {
        let mut unreported = self.unreported.lock().unwrap_or_else(|p| p.into_inner());
        let id = (!unreported.is_empty()).then(|| unreported.remove(0));
        self.any_unreported.store(!unreported.is_empty(), AtomicOrdering::SeqCst);
        id
    }

    pub(crate) fn failures(&self) -> Vec<RegionFailure> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether nothing is attached (the common fast path).
    pub(crate) fn is_empty(&self) -> bool {
        !self.attached.load(AtomicOrdering::SeqCst)
    }

    fn find(&self, space: IoSpace, addr: u64, size: u64) -> Option<Arc<Attached>> {
        let regions = self.regions.read().unwrap_or_else(|p| p.into_inner());
        let idx = regions.partition_point(|r| {
            (r.range.space as u8, r.range.base.saturating_add(r.range.len)) <= (space as u8, addr)
        });
        regions.get(idx).filter(|r| r.range.contains(space, addr, size)).cloned()
    }

    /// Serves an access if an attached range covers it; `None` otherwise.
    pub(crate) fn access(&self, space: IoSpace, addr: u64, size: u8, write: Option<u64>) -> Option<Served> {
        let region = self.find(space, addr, u64::from(size))?;
        let posted = write.is_some() && region.ordering == Ordering::Posted;
        if !posted {
            self.flush_posted(Some(region.id));
        }
        self.serve(&region, addr - region.range.base, size, write, posted)
    }

    /// `None` when the region was detached since the access found it.
    fn serve(&self, r: &Attached, offset: u64, size: u8, write: Option<u64>, posted: bool) -> Option<Served> {
        let all_ones = if size >= 8 { u64::MAX } else { (1u64 << (size * 8)) - 1 };
        match &r.backend {
            Backend::Handler(h) => {
                let mut h = h.lock().unwrap_or_else(|p| p.into_inner());
                let n = usize::from(size.min(8));
                match write {
                    Some(data) => {
                        h.write(offset, &data.to_le_bytes()[..n]);
                        Some(Served { value: 0, failed: None })
                    }
                    None => {
                        let mut bytes = [0u8; 8];
                        h.read(offset, &mut bytes[..n]);
                        Some(Served { value: u64::from_le_bytes(bytes), failed: None })
                    }
                }
            }
            Backend::Socket(client) => {
                let mut guard = client.lock().unwrap_or_else(|p| p.into_inner());
                if r.detached.load(AtomicOrdering::SeqCst) {
                    return None;
                }
                let Some(c) = guard.as_mut() else {
                    return Some(Served { value: all_ones, failed: None });
                };
                let result = socket_access(c, offset, size, write, posted);
                match result {
                    Ok(value) => {
                        if posted {
                            self.mark_posted(r);
                        }
                        Some(Served { value, failed: None })
                    }
                    Err(e) => {
                        self.fail(r, &mut guard, &e);
                        Some(Served { value: all_ones, failed: Some(r.id) })
                    }
                }
            }
        }
    }

    fn fail(&self, r: &Attached, client: &mut Option<Client<SpinStream, SpinStream>>, e: &WireError) {
        // Without flushing what is queued: a device that stopped reading
        // would hold this vCPU for another timeout.
        if let Some(c) = client.take() {
            c.abandon();
        }
        let reason = match e {
            WireError::Io(io) if matches!(io.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                "the device did not answer in time".to_string()
            }
            _ => e.to_string(),
        };
        log::error!("I/O region {} ({}) failed: {reason}; reads now return all ones", r.name, r.range);
        *r.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.clone());
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).push(RegionFailure {
            id: r.id,
            name: r.name.clone(),
            reason,
        });
    }
}

fn check_range(range: IoRange) -> Result<(), IoRegionError> {
    let end = range.base.checked_add(range.len);
    let fits = match (end, range.space) {
        (None, _) => false,
        (Some(_), _) if range.len == 0 => false,
        (Some(end), IoSpace::Pio) => end <= 0x1_0000,
        (Some(_), IoSpace::Mmio) => true,
    };
    if fits {
        Ok(())
    } else {
        Err(IoRegionError::BadRange(range))
    }
}
