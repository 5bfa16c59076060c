//! [`Vm`]: one virtual machine, its memory map and its vCPUs. The dirty
//! log kept in user memory is in `vm/dirty_log.rs`; the I/O regions in
//! `vm/io_regions.rs`; the MSR filter in `vm/msr_filter.rs`.

mod apply;
mod diff;
mod dirty_log;
mod harvest;
mod io_regions;
mod msr_filter;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};

use kvm_bindings::{
    kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_CAP_SPLIT_IRQCHIP,
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::VmFd;

use self::dirty_log::DirtyShared;
use crate::dirty::{DirtyLogMode, DirtyLogStart, PageBitmap};
use crate::io::IoRegions;
use crate::irq::VcpuConfig;
use crate::memory::{Backing, MemoryError, MemoryMap, Region, RegionKey};
use crate::pause::PauseGate;
use crate::sys::{anon::AnonWords, ring::DirtyRing};
use crate::vcpu::Vcpu;
use crate::{GuestAddress, Hypervisor, VcpuError};

/// Errors creating or configuring a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A VM needs at least one vCPU.
    #[error("a VM needs at least one vCPU")]
    NoVcpus,
    /// More vCPUs than this host's KVM allows.
    #[error("{requested} vCPUs requested but this host's KVM allows at most {max}")]
    TooManyVcpus {
        /// Requested count.
        requested: u32,
        /// `KVM_CAP_MAX_VCPUS`.
        max: u32,
    },
    /// A vCPU id outside `0..config.vcpus`.
    #[error("vCPU id {id} is outside this VM's {count} vCPUs")]
    BadVcpuId {
        /// The id asked for.
        id: u32,
        /// The VM's vCPU count.
        count: u32,
    },
    /// The RAM object given to [`Vm::with_ram`] is not `config.memory` long.
    #[error("the RAM object is {ram} bytes but the configuration says {memory}")]
    RamSize {
        /// The object's size.
        ram: u64,
        /// `config.memory`.
        memory: u64,
    },
    /// The config needs a capability the host lacks.
    #[error("this VM needs {0}, which this host's KVM does not offer")]
    MissingCapability(&'static str),
    /// The MSRs to deny spread over more filter ranges than KVM takes.
    #[error("the MSRs to deny need {ranges} filter ranges of 12288 MSRs, KVM takes at most {max}: deny fewer or closer MSRs")]
    TooManyMsrRanges {
        /// Ranges the list needs.
        ranges: usize,
        /// `KVM_MSR_FILTER_MAX_RANGES`.
        max: u32,
    },
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A KVM ioctl on the VM failed.
    #[error("{op} failed")]
    Kvm {
        /// Which operation.
        op: &'static str,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Creating a vCPU failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Harvesting or resetting the dirty rings failed.
    #[error("dirty ring harvest failed")]
    DirtyRing(#[source] std::io::Error),
    /// Re-arming dirty tracking failed.
    #[error("KVM_CLEAR_DIRTY_LOG on slot {slot} failed")]
    ClearDirtyLog {
        /// The slot.
        slot: u32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// How a VM is built.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Number of vCPUs (ids `0..vcpus`).
    pub vcpus: u32,
    /// Guest RAM in bytes (a multiple of 4 KiB), one memfd-backed object
    /// mapped from address 0 (above 3 GiB it continues at 4 GiB).
    pub memory: u64,
    /// Local APICs in the kernel, IOAPIC/PIC in user space (split irqchip).
    /// Without it, `hlt` exits to user space and there are no local APICs.
    pub split_irqchip: bool,
    /// Where dirty pages come from: KVM's dirty ring when the host has it
    /// (`Auto`), or `KVM_GET_DIRTY_LOG` bitmaps.
    pub dirty_log: DirtyLogMode,
    /// Whether a region's pages start clean or dirty when its logging
    /// starts (dirty: KVM write-protects nothing at the start, so it costs
    /// next to nothing at any guest size).
    pub dirty_log_start: DirtyLogStart,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            vcpus: 1,
            memory: 64 << 20,
            split_irqchip: false,
            dirty_log: DirtyLogMode::Auto,
            dirty_log_start: DirtyLogStart::Clean,
        }
    }
}

/// One virtual machine.
///
/// ```no_run
/// use nkvm::{Hypervisor, Vm, VmConfig};
/// let hv = Hypervisor::open()?;
/// let vm = Vm::new(&hv, &VmConfig { vcpus: 2, memory: 128 << 20, ..Default::default() })?;
/// let vcpu0 = vm.create_vcpu(0)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Vm {
    pub(crate) fd: Arc<VmFd>,
    pub(crate) irq: Arc<crate::irq::IrqShared>,
    /// Ends the APIC bus once this Vm and its vCPUs are all gone.
    bus_closer: Arc<crate::irq::BusCloser>,
    config: VmConfig,
    vcpu_mmap_size: usize,
    max_slots: u32,
    ram: Backing,
    map: RwLock<Arc<MemoryMap>>,
    shared: Arc<DirtyShared>,
    gate: Arc<PauseGate>,
    manual_protect: bool,
    /// A query that takes every logged page may read KVM's logs the classic
    /// way (`KVM_GET_DIRTY_LOG` clearing and re-protecting as it copies, one
    /// call per slot) instead of copy + `KVM_CLEAR_DIRTY_LOG`: manual
    /// protection without `INITIALLY_SET` (which KVM lets a VMM turn off and
    /// on again at any time).
    classic_reads: bool,
    /// nkvm marks every page of a region dirty when its logging starts
    /// ([`DirtyLogStart::AllDirty`] where KVM cannot do it).
    mark_all_at_start: bool,
    coalesced_mmio: bool,
    io: Arc<IoRegions>,
    /// The MSRs a vCPU's saved state holds (KVM_GET_MSR_INDEX_LIST).
    saveable_msrs: Arc<[u32]>,
    /// What this host's KVM offers a guest (the vCPUs' restore check).
    host_cpuid: Arc<crate::state::HostCpuid>,
}

/// Dirty-ring size nkvm asks for (per vCPU): 64Ki entries.
const RING_BYTES: u32 = 1 << 20;
/// The smallest ring worth using.
const MIN_RING_BYTES: u32 = 1 << 16;

/// What is installed in KVM, and the dirty bitmaps in user memory.
#[derive(Debug, Default)]
struct MapState {
    /// Installed regions with their slot numbers, sorted by address.
    installed: Vec<(Region, u32)>,
    /// The installed regions' keys, in the same order (what a new map is
    /// compared with).
    installed_keys: Vec<RegionKey>,
    /// Scratch for `set_memory_map`: the (remove, add) indices of a change
    /// (kept for their capacity: a change allocates nothing).
    changes: (Vec<usize>, Vec<usize>),
    /// Scratch for `set_memory_map`: (installed, new) index pairs of regions
    /// whose dirty logging alone changes.
    toggles: Vec<(usize, usize)>,
    /// Scratch for `set_memory_map`: the steps made so far, to undo them
    /// if KVM refuses one (kept for its capacity).
    steps: Vec<apply::Step>,
    free_slots: Vec<u32>,
    next_slot: u32,
    /// One bitmap per dirty-logged backing object, by backing id.
    bitmaps: HashMap<u64, PageBitmap>,
    /// Scratch for `collect_dirty_into`: the backing bitmap words taken,
    /// as (word index, bits) (kept for its capacity).
    taken: Vec<(usize, u64)>,
    /// Scratch for the ring harvest: (slot, page offset) entries.
    ring_entries: Vec<(u32, u64)>,
    /// Scratch for `rearm`: the bitmap handed to KVM_CLEAR_DIRTY_LOG.
    rearm_bits: Vec<u64>,
    /// Scratch for `harvest_slot`: the bitmap KVM_GET_DIRTY_LOG fills.
    harvest_bits: AnonWords,
    /// A sync was asked for and KVM's logs are not yet read into the
    /// bitmaps: the next query reads them, knowing how much it takes.
    unread: bool,
    /// KVM's `KVM_GET_DIRTY_LOG` currently clears and re-protects what it
    /// copies (manual protection switched off for a whole-log read).
    classic_get: bool,
    /// KVM refused to switch: whole-log queries read by copying too.
    classic_refused: bool,
}

impl fmt::Debug for Vm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vm").field("config", &self.config).finish()
    }
}

impl Vm {
    /// Creates a VM with `config.memory` bytes of RAM and room for `config.vcpus` vCPUs.
    pub fn new(hv: &Hypervisor, config: &VmConfig) -> Result<Self, VmError> {
        if config.vcpus == 0 {
            return Err(VmError::NoVcpus);
        }
        Self::with_ram(hv, config, Backing::new("nkvm-ram", config.memory)?)
    }

    /// Creates a VM whose RAM is `ram` (of `config.memory` bytes) instead of
    /// a new zero-filled object: for example a snapshot's memory file mapped
    /// with [`Backing::from_file_private`], so a restore copies nothing.
    pub fn with_ram(hv: &Hypervisor, config: &VmConfig, ram: Backing) -> Result<Self, VmError> {
        let caps = hv.capabilities();
        if config.vcpus == 0 {
            return Err(VmError::NoVcpus);
        }
        if ram.len() != config.memory {
            return Err(VmError::RamSize { ram: ram.len(), memory: config.memory });
        }
        if config.vcpus > caps.max_vcpus {
            return Err(VmError::TooManyVcpus { requested: config.vcpus, max: caps.max_vcpus });
        }
        if config.split_irqchip && !caps.split_irqchip {
            return Err(VmError::MissingCapability("a split irqchip (KVM_CAP_SPLIT_IRQCHIP)"));
        }
        let saveable_msrs =
            hv.saveable_msrs().map_err(|source| VmError::Kvm { op: "KVM_GET_MSR_INDEX_LIST", source })?.into();
        let fd = hv.kvm.create_vm().map_err(|source| VmError::Kvm { op: "KVM_CREATE_VM", source })?;
        if config.split_irqchip {
            let mut cap = kvm_enable_cap { cap: KVM_CAP_SPLIT_IRQCHIP, ..Default::default() };
            cap.args[0] = 24;
            fd.enable_cap(&cap).map_err(|source| VmError::Kvm { op: "KVM_ENABLE_CAP(SPLIT_IRQCHIP)", source })?;
        }
        let ring_bytes = match config.dirty_log {
            DirtyLogMode::Bitmap => 0,
            // Bitmaps with manual protection measured faster than the ring
            // on this nested host, and its ring can wrap before the ring-full
            // exit (docs/architecture.md): prefer them when available.
            DirtyLogMode::Auto if caps.manual_dirty_log_protect => 0,
            mode => {
                let usable = caps.dirty_ring_acq_rel && caps.dirty_ring_max_bytes >= MIN_RING_BYTES;
                if !usable && mode == DirtyLogMode::Ring {
                    return Err(VmError::MissingCapability("a dirty ring (KVM_CAP_DIRTY_LOG_RING_ACQ_REL)"));
                }
                if usable {
                    caps.dirty_ring_max_bytes.min(RING_BYTES)
                } else {
                    0
                }
            }
        };
        if ring_bytes > 0 {
            let mut cap = kvm_enable_cap { cap: KVM_CAP_DIRTY_LOG_RING_ACQ_REL, ..Default::default() };
            cap.args[0] = u64::from(ring_bytes);
            fd.enable_cap(&cap)
                .map_err(|source| VmError::Kvm { op: "KVM_ENABLE_CAP(DIRTY_LOG_RING_ACQ_REL)", source })?;
        }
        let vm_file = crate::sys::ring::dup_fd(std::os::fd::AsRawFd::as_raw_fd(&fd)).map_err(VmError::DirtyRing)?;
        // Manual protection lets collect_dirty re-arm exactly the pages it
        // returns; without it, sync_dirty_log re-arms everything it reads.
        // With INITIALLY_SET, KVM starts a slot's log all dirty and
        // write-protects nothing at the start (the re-arming does it).
        let all_dirty = config.dirty_log_start == DirtyLogStart::AllDirty;
        let manual = |flags: u32| {
            let mut cap = kvm_enable_cap { cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, ..Default::default() };
            cap.args[0] = u64::from(flags);
            fd.enable_cap(&cap).is_ok()
        };
        let (manual_protect, initially_set) = if ring_bytes > 0 || !caps.manual_dirty_log_protect {
            (false, false)
        } else if all_dirty && manual(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET) {
            (true, true)
        } else {
            (manual(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE), false)
        };
        let irq: Arc<crate::irq::IrqShared> = Arc::default();
        let vm = Self {
            fd: Arc::new(fd),
            irq: irq.clone(),
            bus_closer: Arc::new(crate::irq::BusCloser(irq)),
            config: config.clone(),
            vcpu_mmap_size: hv.vcpu_mmap_size,
            max_slots: caps.max_memory_slots,
            ram: ram.clone(),
            map: RwLock::new(Arc::new(MemoryMap::default())),
            shared: Arc::new(DirtyShared {
                state: Mutex::new(MapState::default()),
                ring_bytes,
                rings: Mutex::new(Vec::new()),
                vm_file,
                sources: Mutex::new(Vec::new()),
            }),
            gate: PauseGate::new(),
            manual_protect,
            classic_reads: manual_protect && !initially_set,
            mark_all_at_start: all_dirty && !initially_set,
            coalesced_mmio: caps.coalesced_mmio,
            io: Arc::new(IoRegions::default()),
            saveable_msrs,
            host_cpuid: hv.host_cpuid.clone(),
        };
        vm.set_memory_map(MemoryMap::ram(&ram)?)?;
        Ok(vm)
    }

    /// Whether dirty pages come from KVM's dirty ring (else from bitmaps).
    pub fn uses_dirty_ring(&self) -> bool {
        self.shared.ring_bytes > 0
    }

    /// The configuration the VM was built with.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The RAM object created from `config.memory`.
    pub fn ram(&self) -> &Backing {
        &self.ram
    }

    /// The memory map in force now.
    pub fn memory(&self) -> Arc<MemoryMap> {
        self.map.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Writes guest physical memory.
    pub fn write_memory(&self, gpa: GuestAddress, data: &[u8]) -> Result<(), MemoryError> {
        self.memory().write(gpa, data)
    }

    /// Reads guest physical memory.
    pub fn read_memory(&self, gpa: GuestAddress, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.memory().read(gpa, buf)
    }

    /// Replaces the whole guest physical memory map with `map`, atomically
    /// as far as any vCPU can tell.
    ///
    /// The new map is diffed against the installed one (a merge walk over
    /// both sorted lists): unchanged regions are not touched. When an
    /// existing mapping must go (removed, moved, split, flags changed), the
    /// vCPUs are paused — kicked out of `KVM_RUN` and held out — for exactly
    /// as long as the slot changes take, and the dirty bits of each slot are
    /// folded into its backing's bitmap before the slot is deleted, so no
    /// vCPU sees a half-applied map and no dirty bit is lost. A change that
    /// only adds regions does not pause anybody.
    ///
    /// A region that stays where it is and only starts or stops being
    /// [`dirty_logged`](Region::dirty_logged) keeps its slot: only the
    /// slot's flags change, so KVM keeps its mappings of it. Starting a log
    /// pauses nobody; with [`DirtyLogStart::AllDirty`] it also costs next to
    /// nothing at any region size (see [`VmConfig::dirty_log_start`]).
    /// Stopping one harvests its last dirty bits first and pauses nobody
    /// either (KVM's own work on a stop, a walk over the slot's pages, still
    /// follows the slot's size, but no vCPU waits for it).
    ///
    /// A change KVM refuses is taken back: the error comes with the map
    /// before it still installed, and no dirty bit lost. (Only if KVM then
    /// refuses to undo a step too does the change stay partly made; then
    /// [`memory`](Self::memory) shows what is installed.)
    ///
    /// # Example: a framebuffer BAR the guest moves
    ///
    /// ```no_run
    /// use nkvm::{Backing, GuestAddress, MemoryMap, Region};
    /// # fn f(vm: &nkvm::Vm) -> Result<(), Box<dyn std::error::Error>> {
    /// let ram = Region::new(GuestAddress(0), vm.ram(), 0, vm.ram().len());
    /// let vram = Backing::new("vram", 16 << 20)?;
    /// let with_bar_at = |bar: u64| -> Result<MemoryMap, nkvm::MemoryError> {
    ///     MemoryMap::new(vec![ram.clone(), Region::new(GuestAddress(bar), &vram, 0, 16 << 20).dirty_logged()])
    /// };
    /// vm.set_memory_map(with_bar_at(0xe000_0000)?)?;
    /// // The guest reprograms the BAR: one call; the pixels it drew at the
    /// // old address are still reported dirty afterwards.
    /// vm.set_memory_map(with_bar_at(0xd000_0000)?)?;
    /// vm.sync_dirty_log()?;
    /// let dirty = vm.collect_dirty(GuestAddress(0xd000_0000), 16 << 20, 4096)?;
    /// # let _ = dirty; Ok(()) }
    /// ```
    pub fn set_memory_map(&self, map: MemoryMap) -> Result<(), VmError> {
        if map.regions().len() > self.max_slots as usize {
            return Err(MemoryError::TooManyRegions { count: map.regions().len(), max: self.max_slots }.into());
        }
        // What devices and backends recorded by guest-physical address is
        // folded in through the map it was written under, before a region
        // moves or goes.
        self.drain_dirty_sources();
        let mut state = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        let (mut remove, mut add) = std::mem::take(&mut state.changes);
        let mut toggles = std::mem::take(&mut state.toggles);
        diff::diff(&state.installed_keys, map.keys(), &mut remove, &mut add);
        // Starting or stopping a region's log changes only its slot's
        // flags: KVM keeps the slot and its mappings (a delete would drop
        // every mapping of the VM and cost more with the slot's size).
        diff::split_toggles(&state.installed, map.regions(), &mut remove, &mut add, &mut toggles);
        let prepared = Vm::make_bitmaps(&mut state.bitmaps, map.regions(), &add, &toggles);
        let prepared = prepared.and_then(|()| {
            if self.shared.ring_bytes == 0 {
                Vm::size_harvest(&mut state, &remove, &toggles, map.regions())
            } else {
                Ok(())
            }
        });
        if let Err(e) = prepared {
            (state.changes, state.toggles) = ((remove, add), toggles);
            return Err(e.into());
        }
        // A deleted slot is harvested first and no vCPU may write in
        // between; regions added together appear together (a vCPU never
        // sees one of them and not another). A single add, or a toggle
        // (see `toggle_logging`), needs no pause.
        let paused = if remove.is_empty() && add.len() <= 1 { None } else { Some(self.gate.pause()) };
        let mut result = Ok(());
        if paused.is_some() && self.shared.ring_bytes > 0 {
            // Ring entries name slots by number: drain them before any slot goes.
            if let Err(source) = self.shared.harvest_rings(&mut state) {
                result = Err(VmError::DirtyRing(source));
            }
        }
        if let Err(e) = self.apply_changes(&mut state, &map, &remove, &add, &toggles) {
            let rolled_back = self.roll_back(&mut state);
            state.steps.clear();
            return Err(match rolled_back {
                Ok(()) => {
                    (state.changes, state.toggles) = ((remove, add), toggles);
                    log::warn!("memory map change refused by KVM ({e}); the map before it stays installed");
                    e
                }
                Err(undo) => {
                    log::error!("taking back the refused memory map change failed too ({undo})");
                    self.changed_partly(&mut state, (remove, add), toggles, e)
                }
            });
        }
        state.steps.clear();
        state.changes = (remove, add);
        state.toggles = toggles;
        // A backing no region maps any more keeps its bitmap only while a
        // page in it waits to be collected (it can be again once mapped).
        let MapState { installed, bitmaps, .. } = &mut *state;
        bitmaps.retain(|id, bitmap| !bitmap.is_clean() || installed.iter().any(|(r, _)| r.backing.id() == *id));
        *self.map.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(map);
        drop(paused);
        result
    }

    /// A map change KVM refused midway (after the checks, so rarely) and
    /// whose undoing KVM refused too: the slots changed so far stay,
    /// `memory()` is made to say what is installed, and the error says so.
    /// No dirty bit is lost: a removed region's bits were harvested into
    /// its backing's bitmap first.
    fn changed_partly(
        &self,
        state: &mut MapState,
        changes: (Vec<usize>, Vec<usize>),
        toggles: Vec<(usize, usize)>,
        error: VmError,
    ) -> VmError {
        (state.changes, state.toggles) = (changes, toggles);
        let regions: Vec<Region> = state.installed.iter().map(|(r, _)| r.clone()).collect();
        match MemoryMap::new(regions) {
            Ok(installed) => *self.map.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(installed),
            Err(e) => log::error!("the installed regions do not form a map ({e}); memory() is out of date"),
        }
        log::error!("memory map change refused midway by KVM ({error}); memory() shows the regions installed");
        error
    }

    /// Creates vCPU `id` (in `0..config.vcpus`) with a visible local APIC.
    pub fn create_vcpu(&self, id: u32) -> Result<Vcpu, VmError> {
        self.create_vcpu_with(id, VcpuConfig::default())
    }

    /// Creates vCPU `id` with `config` (e.g. a hidden local APIC).
    pub fn create_vcpu_with(&self, id: u32, config: VcpuConfig) -> Result<Vcpu, VmError> {
        if id >= self.config.vcpus {
            return Err(VmError::BadVcpuId { id, count: self.config.vcpus });
        }
        let fd = self.fd.create_vcpu(u64::from(id)).map_err(|source| VmError::Kvm { op: "KVM_CREATE_VCPU", source })?;
        if self.shared.ring_bytes > 0 {
            let ring = DirtyRing::map(std::os::fd::AsRawFd::as_raw_fd(&fd), self.shared.ring_bytes)
                .map_err(VmError::DirtyRing)?;
            self.shared.rings.lock().unwrap_or_else(|p| p.into_inner()).push((id, Arc::new(ring)));
        }
        // The vCPU keeps the slot table (and so every backing the guest can
        // reach) alive for as long as it can run, even if the Vm is dropped
        // first; it also harvests the rings when its own fills.
        let links = crate::vcpu::VcpuLinks {
            gate: self.gate.clone(),
            memory: self.shared.clone(),
            io: self.io.clone(),
            irq: self.irq.clone(),
            vm_fd: self.fd.clone(),
            _bus_closer: self.bus_closer.clone(),
            saveable_msrs: self.saveable_msrs.clone(),
            host_cpuid: self.host_cpuid.clone(),
            lapic_in_kernel: self.config.split_irqchip,
        };
        let vcpu = Vcpu::new(id, fd, self.vcpu_mmap_size, links, config)?;
        self.irq.register(id, vcpu.lint());
        Ok(vcpu)
    }
}
