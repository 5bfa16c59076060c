//! [`Vm`]: one virtual machine, its memory map and its vCPUs.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};

use kvm_bindings::{
    kvm_enable_cap, kvm_userspace_memory_region, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_CAP_SPLIT_IRQCHIP, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY,
};
use kvm_ioctls::VmFd;

use crate::dirty::{DirtyPages, PageBitmap};
use crate::memory::{Backing, MemoryError, MemoryMap, Region, PAGE_SIZE};
use crate::pause::PauseGate;
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
    /// The config needs a capability the host lacks.
    #[error("this VM needs {0}, which this host's KVM does not offer")]
    MissingCapability(&'static str),
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
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            vcpus: 1,
            memory: 64 << 20,
            split_irqchip: false,
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
    pub(crate) fd: VmFd,
    config: VmConfig,
    vcpu_mmap_size: usize,
    max_slots: u32,
    ram: Backing,
    map: RwLock<Arc<MemoryMap>>,
    state: Arc<Mutex<MapState>>,
    gate: Arc<PauseGate>,
    manual_protect: bool,
}

/// What is installed in KVM, and the dirty bitmaps in user memory.
#[derive(Debug, Default)]
struct MapState {
    /// Installed regions with their slot numbers, sorted by address.
    installed: Vec<(Region, u32)>,
    free_slots: Vec<u32>,
    next_slot: u32,
    /// One bitmap per dirty-logged backing object, by backing id.
    bitmaps: HashMap<u64, PageBitmap>,
}

impl fmt::Debug for Vm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vm").field("config", &self.config).finish()
    }
}

impl Vm {
    /// Creates a VM with `config.memory` bytes of RAM and room for `config.vcpus` vCPUs.
    pub fn new(hv: &Hypervisor, config: &VmConfig) -> Result<Self, VmError> {
        let caps = hv.capabilities();
        if config.vcpus == 0 {
            return Err(VmError::NoVcpus);
        }
        if config.vcpus > caps.max_vcpus {
            return Err(VmError::TooManyVcpus {
                requested: config.vcpus,
                max: caps.max_vcpus,
            });
        }
        if config.split_irqchip && !caps.split_irqchip {
            return Err(VmError::MissingCapability(
                "a split irqchip (KVM_CAP_SPLIT_IRQCHIP)",
            ));
        }
        let ram = Backing::new("nkvm-ram", config.memory)?;
        let fd = hv.kvm.create_vm().map_err(|source| VmError::Kvm {
            op: "KVM_CREATE_VM",
            source,
        })?;
        if config.split_irqchip {
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_SPLIT_IRQCHIP,
                ..Default::default()
            };
            cap.args[0] = 24;
            fd.enable_cap(&cap).map_err(|source| VmError::Kvm {
                op: "KVM_ENABLE_CAP(SPLIT_IRQCHIP)",
                source,
            })?;
        }
        // Manual protection lets collect_dirty re-arm exactly the pages it
        // returns; without it, sync_dirty_log re-arms everything it reads.
        let manual_protect = caps.manual_dirty_log_protect && {
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                ..Default::default()
            };
            cap.args[0] = 1; // KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
            fd.enable_cap(&cap).is_ok()
        };
        let vm = Self {
            fd,
            config: config.clone(),
            vcpu_mmap_size: hv.vcpu_mmap_size,
            max_slots: caps.max_memory_slots,
            ram: ram.clone(),
            map: RwLock::new(Arc::new(MemoryMap::default())),
            state: Arc::new(Mutex::new(MapState::default())),
            gate: PauseGate::new(),
            manual_protect,
        };
        vm.set_memory_map(MemoryMap::ram(&ram)?)?;
        Ok(vm)
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
    pub fn set_memory_map(&self, map: MemoryMap) -> Result<(), VmError> {
        if map.regions().len() > self.max_slots as usize {
            return Err(MemoryError::TooManyRegions {
                count: map.regions().len(),
                max: self.max_slots,
            }
            .into());
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (remove, add) = diff(&state.installed, map.regions());
        let paused = if remove.is_empty() {
            None
        } else {
            Some(self.gate.pause())
        };
        let mut result = Ok(());
        for &i in remove.iter().rev() {
            let (region, slot) = state.installed.remove(i);
            if region.dirty_log {
                if let Err(e) = self.harvest(&mut state.bitmaps, &region, slot) {
                    result = Err(e);
                }
            }
            self.install_slot(slot, &region, true)?;
            state.free_slots.push(slot);
        }
        for &j in &add {
            let region = &map.regions()[j];
            let slot = match state.free_slots.pop() {
                Some(slot) => slot,
                None => {
                    state.next_slot += 1;
                    state.next_slot - 1
                }
            };
            self.install_slot(slot, region, false)?;
            if region.dirty_log {
                let pages = region.backing.len() / PAGE_SIZE;
                state
                    .bitmaps
                    .entry(region.backing.id())
                    .or_insert_with(|| PageBitmap::new(pages));
            }
            let at = state.installed.partition_point(|(r, _)| r.gpa < region.gpa);
            state.installed.insert(at, (region.clone(), slot));
        }
        *self.map.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(map);
        drop(paused);
        result
    }

    /// Folds KVM's dirty log of every dirty-logged slot into the bitmaps
    /// kept in user memory (one per backing object). Call it before
    /// [`collect_dirty`](Self::collect_dirty) to see the latest writes.
    pub fn sync_dirty_log(&self) -> Result<(), VmError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let MapState {
            installed, bitmaps, ..
        } = &mut *state;
        for (region, slot) in installed.iter().filter(|(r, _)| r.dirty_log) {
            self.harvest(bitmaps, region, *slot)?;
        }
        Ok(())
    }

    /// Returns (and clears) at most `max_pages` dirty pages in the guest
    /// physical range `start..start+len`, in address order, with the address
    /// to continue from if the budget ran out. Write tracking is re-armed for
    /// exactly the pages returned, before this returns: a page written after
    /// it was collected is reported again. Aliased pages are reported once,
    /// at the first address in the range that maps them.
    pub fn collect_dirty(
        &self,
        start: GuestAddress,
        len: u64,
        max_pages: usize,
    ) -> Result<DirtyPages, VmError> {
        let end = start.0.saturating_add(len);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let MapState {
            installed, bitmaps, ..
        } = &mut *state;
        let first = installed.partition_point(|(r, _)| r.end() <= start.0);
        let mut out = DirtyPages::default();
        let mut taken = Vec::new();
        let mut rearm: Vec<(u64, Vec<u64>)> = Vec::new();
        for (region, _) in installed[first..].iter().take_while(|(r, _)| r.gpa.0 < end) {
            let Some(bitmap) = bitmaps
                .get_mut(&region.backing.id())
                .filter(|_| region.dirty_log)
            else {
                continue;
            };
            let lo = start.0.max(region.gpa.0);
            let hi = end.min(region.end());
            let to_page = |gpa: u64| (gpa - region.gpa.0 + region.offset) / PAGE_SIZE;
            let budget = max_pages - out.pages.len();
            taken.clear();
            let resume = bitmap.take(to_page(lo), to_page(hi + PAGE_SIZE - 1), budget, &mut taken);
            let to_gpa = |page: u64| GuestAddress(region.gpa.0 + page * PAGE_SIZE - region.offset);
            out.pages.extend(taken.iter().map(|&p| to_gpa(p)));
            rearm.push((region.backing.id(), taken.clone()));
            if let Some(p) = resume {
                out.next = Some(to_gpa(p));
                break;
            }
            if out.pages.len() >= max_pages {
                out.next = (hi < end).then_some(GuestAddress(hi));
                break;
            }
        }
        if self.manual_protect {
            for (backing, pages) in rearm.iter().filter(|(_, p)| !p.is_empty()) {
                self.rearm(installed, *backing, pages)?;
            }
        }
        Ok(out)
    }

    /// Re-arms write tracking for backing pages `pages` in every slot that
    /// maps them (aliases included).
    fn rearm(
        &self,
        installed: &[(Region, u32)],
        backing: u64,
        pages: &[u64],
    ) -> Result<(), VmError> {
        for (region, slot) in installed
            .iter()
            .filter(|(r, _)| r.dirty_log && r.backing.id() == backing)
        {
            let first = region.offset / PAGE_SIZE;
            let count = region.len / PAGE_SIZE;
            let mut window: Option<(u64, [u64; 1])> = None;
            let flush = |w: Option<(u64, [u64; 1])>| -> Result<(), VmError> {
                if let Some((base, bits)) = w {
                    let num = (count - base).min(64) as u32;
                    crate::sys::dirty::clear_dirty_log(&self.fd, *slot, base, num, &bits).map_err(
                        |source| VmError::ClearDirtyLog {
                            slot: *slot,
                            source,
                        },
                    )?;
                }
                Ok(())
            };
            for &p in pages.iter().filter(|&&p| p >= first && p < first + count) {
                let rel = p - first;
                let base = rel & !63;
                match &mut window {
                    Some((b, bits)) if *b == base => bits[0] |= 1 << (rel - base),
                    _ => {
                        flush(window.take())?;
                        window = Some((base, [1 << (rel - base)]));
                    }
                }
            }
            flush(window)?;
        }
        Ok(())
    }

    /// Reads KVM's dirty log of `slot` into the bitmap of `region`'s backing.
    fn harvest(
        &self,
        bitmaps: &mut HashMap<u64, PageBitmap>,
        region: &Region,
        slot: u32,
    ) -> Result<(), VmError> {
        let bits = self
            .fd
            .get_dirty_log(slot, region.len as usize)
            .map_err(|source| VmError::Kvm {
                op: "KVM_GET_DIRTY_LOG",
                source,
            })?;
        if let Some(bitmap) = bitmaps.get_mut(&region.backing.id()) {
            bitmap.or_bits(region.offset / PAGE_SIZE, &bits);
        }
        Ok(())
    }

    fn install_slot(&self, slot: u32, region: &Region, delete: bool) -> Result<(), VmError> {
        let mut flags = 0;
        if region.read_only {
            flags |= KVM_MEM_READONLY;
        }
        if region.dirty_log {
            flags |= KVM_MEM_LOG_DIRTY_PAGES;
        }
        let raw = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: region.gpa.0,
            memory_size: if delete { 0 } else { region.len },
            userspace_addr: region.backing.host_addr() + region.offset,
        };
        // SAFETY: the host range lies inside `region.backing`'s mapping
        // (validated by MemoryMap), and the slot table keeps a clone of the
        // region, hence of the backing, until the slot is deleted.
        unsafe { crate::sys::slot::set_user_memory_region(&self.fd, raw) }.map_err(|source| {
            VmError::Kvm {
                op: "KVM_SET_USER_MEMORY_REGION",
                source,
            }
        })
    }

    /// Creates vCPU `id` (in `0..config.vcpus`).
    pub fn create_vcpu(&self, id: u32) -> Result<Vcpu, VmError> {
        if id >= self.config.vcpus {
            return Err(VmError::BadVcpuId {
                id,
                count: self.config.vcpus,
            });
        }
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|source| VmError::Kvm {
                op: "KVM_CREATE_VCPU",
                source,
            })?;
        // The vCPU keeps the slot table (and so every backing the guest can
        // reach) alive for as long as it can run, even if the Vm is dropped first.
        Ok(Vcpu::new(
            id,
            fd,
            self.vcpu_mmap_size,
            self.gate.clone(),
            Box::new(self.state.clone()),
        )?)
    }
}

/// Indices of installed regions to remove and of new regions to add, by a
/// merge walk over both address-sorted lists: O(old + new), with only cheap
/// comparisons for the regions that stay.
fn diff(installed: &[(Region, u32)], new: &[Region]) -> (Vec<usize>, Vec<usize>) {
    let (mut remove, mut add) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < installed.len() || j < new.len() {
        match (installed.get(i), new.get(j)) {
            (Some((old, _)), Some(n)) if old.same_mapping(n) => {
                i += 1;
                j += 1;
            }
            (Some((old, _)), Some(n)) if old.gpa < n.gpa => {
                remove.push(i);
                i += 1;
            }
            (Some((old, _)), Some(n)) if n.gpa < old.gpa => {
                add.push(j);
                j += 1;
            }
            (Some(_), Some(_)) => {
                remove.push(i);
                add.push(j);
                i += 1;
                j += 1;
            }
            (Some(_), None) => {
                remove.push(i);
                i += 1;
            }
            (None, Some(_)) => {
                add.push(j);
                j += 1;
            }
            (None, None) => break,
        }
    }
    (remove, add)
}
