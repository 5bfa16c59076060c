//! [`Vm`]: one virtual machine, its memory map and its vCPUs.

use std::fmt;
use std::sync::{Arc, Mutex, RwLock};

use kvm_bindings::{
    kvm_enable_cap, kvm_userspace_memory_region, KVM_CAP_SPLIT_IRQCHIP, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
};
use kvm_ioctls::VmFd;

use crate::memory::{Backing, MemoryError, MemoryMap, Region};
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
    slots: Arc<Mutex<Vec<Option<Region>>>>,
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
        let vm = Self {
            fd,
            config: config.clone(),
            vcpu_mmap_size: hv.vcpu_mmap_size,
            max_slots: caps.max_memory_slots,
            ram: ram.clone(),
            map: RwLock::new(Arc::new(MemoryMap::default())),
            slots: Arc::new(Mutex::new(Vec::new())),
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

    /// Replaces the guest physical memory map with `map`: regions present in
    /// both maps are left untouched; removed regions are deleted, then new
    /// ones installed.
    pub fn set_memory_map(&self, map: MemoryMap) -> Result<(), VmError> {
        if map.regions().len() > self.max_slots as usize {
            return Err(MemoryError::TooManyRegions {
                count: map.regions().len(),
                max: self.max_slots,
            }
            .into());
        }
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        // Delete the slots whose mapping is not in the new map.
        for (slot, entry) in slots.iter_mut().enumerate() {
            let keep = entry
                .as_ref()
                .is_some_and(|old| map.regions().iter().any(|r| r.same_mapping(old)));
            if let (Some(old), false) = (entry.as_ref(), keep) {
                self.install_slot(slot as u32, old, true)?;
                *entry = None;
            }
        }
        // Install the regions that are new.
        for region in map.regions() {
            if slots.iter().flatten().any(|old| old.same_mapping(region)) {
                continue;
            }
            let slot = match slots.iter().position(Option::is_none) {
                Some(free) => free,
                None => {
                    slots.push(None);
                    slots.len() - 1
                }
            };
            self.install_slot(slot as u32, region, false)?;
            slots[slot] = Some(region.clone());
        }
        *self.map.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(map);
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
            Box::new(self.slots.clone()),
        )?)
    }
}
