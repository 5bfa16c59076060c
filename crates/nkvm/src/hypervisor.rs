//! [`Hypervisor`]: `/dev/kvm`, and what this host's KVM can do.

use std::fmt;
use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::path::{Path, PathBuf};

use kvm_bindings::{
    KVM_CAP_COALESCED_MMIO, KVM_CAP_COALESCED_PIO, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_CAP_IOEVENTFD, KVM_CAP_IRQFD, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_CAP_MAX_VCPUS, KVM_CAP_NR_MEMSLOTS,
    KVM_CAP_SPLIT_IRQCHIP, KVM_CAP_SYS_HYPERV_CPUID, KVM_CAP_X86_MSR_FILTER,
};
use kvm_ioctls::Kvm;

/// The KVM API version nkvm speaks (the only one Linux ever shipped).
pub const KVM_API_VERSION: i32 = 12;

/// Errors opening `/dev/kvm`.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// The device node does not exist.
    #[error(
        "{0} does not exist: load the kvm module (kvm_intel, kvm_amd) or run on a host with virtualization enabled"
    )]
    NotFound(PathBuf),
    /// The device node exists but cannot be opened.
    #[error("permission denied opening {0}: run as root or add your user to the group that owns it (often `kvm`)")]
    PermissionDenied(PathBuf),
    /// Any other open failure.
    #[error("cannot open {path}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The kernel speaks another KVM API version.
    #[error("{path} reports KVM API version {found}, nkvm needs {KVM_API_VERSION}")]
    ApiVersion {
        /// The path.
        path: PathBuf,
        /// What `KVM_GET_API_VERSION` returned.
        found: i32,
    },
    /// `KVM_GET_SUPPORTED_CPUID` failed.
    #[error("KVM_GET_SUPPORTED_CPUID failed")]
    Cpuid(#[source] kvm_ioctls::Error),
    /// This host's KVM does not report its Hyper-V leaves on `/dev/kvm`.
    #[error(
        "this host's KVM cannot list its Hyper-V enlightenments (no KVM_CAP_SYS_HYPERV_CPUID{0}): run without Hyper-V"
    )]
    NoHyperv(&'static str),
    /// `KVM_GET_SUPPORTED_HV_CPUID` failed.
    #[error("KVM_GET_SUPPORTED_HV_CPUID failed")]
    HvCpuid(#[source] kvm_ioctls::Error),
}

/// What this host's KVM supports, probed once at [`Hypervisor::open`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// `KVM_GET_API_VERSION` (always 12).
    pub api_version: i32,
    /// Recommended maximum vCPUs per VM (`KVM_CAP_NR_VCPUS`).
    pub recommended_vcpus: u32,
    /// Hard maximum vCPUs per VM (`KVM_CAP_MAX_VCPUS`).
    pub max_vcpus: u32,
    /// Maximum memory slots per VM (`KVM_CAP_NR_MEMSLOTS`).
    pub max_memory_slots: u32,
    /// In-kernel local APICs with the IOAPIC/PIC in user space.
    pub split_irqchip: bool,
    /// Maximum dirty-ring size in bytes (0 = no dirty ring).
    pub dirty_ring_max_bytes: u32,
    /// The dirty ring has acquire/release semantics (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL`).
    pub dirty_ring_acq_rel: bool,
    /// `KVM_CLEAR_DIRTY_LOG` with manual protection (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`).
    pub manual_dirty_log_protect: bool,
    /// Coalesced MMIO ring (page offset in the vCPU mmap; 0 = absent).
    pub coalesced_mmio: bool,
    /// Coalesced PIO.
    pub coalesced_pio: bool,
    /// `KVM_IOEVENTFD`.
    pub ioeventfd: bool,
    /// `KVM_IRQFD`.
    pub irqfd: bool,
    /// The MSR filter ([`Vm::deny_msrs`](crate::Vm::deny_msrs); `KVM_CAP_X86_MSR_FILTER`).
    pub msr_filter: bool,
    /// Hyper-V enlightenments listed on `/dev/kvm`
    /// ([`crate::hyperv`]; `KVM_CAP_SYS_HYPERV_CPUID`).
    pub hyperv: bool,
}

impl Capabilities {
    /// The probe as (name, value) rows, in a stable order, for tables and JSON.
    pub fn rows(&self) -> Vec<(&'static str, String)> {
        vec![
            ("api_version", self.api_version.to_string()),
            ("recommended_vcpus", self.recommended_vcpus.to_string()),
            ("max_vcpus", self.max_vcpus.to_string()),
            ("max_memory_slots", self.max_memory_slots.to_string()),
            ("split_irqchip", self.split_irqchip.to_string()),
            ("dirty_ring_max_bytes", self.dirty_ring_max_bytes.to_string()),
            ("dirty_ring_acq_rel", self.dirty_ring_acq_rel.to_string()),
            ("manual_dirty_log_protect", self.manual_dirty_log_protect.to_string()),
            ("coalesced_mmio", self.coalesced_mmio.to_string()),
            ("coalesced_pio", self.coalesced_pio.to_string()),
            ("ioeventfd", self.ioeventfd.to_string()),
            ("irqfd", self.irqfd.to_string()),
            ("msr_filter", self.msr_filter.to_string()),
            ("hyperv", self.hyperv.to_string()),
        ]
    }
}

/// An open `/dev/kvm`.
///
/// ```no_run
/// let hv = nkvm::Hypervisor::open()?;
/// println!("up to {} vCPUs", hv.capabilities().max_vcpus);
/// # Ok::<(), nkvm::HypervisorError>(())
/// ```
pub struct Hypervisor {
    pub(crate) kvm: std::sync::Arc<Kvm>,
    /// What KVM offers a guest, found at the first restore that asks.
    pub(crate) host_cpuid: std::sync::Arc<crate::state::HostCpuid>,
    caps: Capabilities,
    pub(crate) vcpu_mmap_size: usize,
}

impl fmt::Debug for Hypervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hypervisor").field("caps", &self.caps).finish()
    }
}

impl Hypervisor {
    /// Opens `/dev/kvm` and probes its capabilities.
    pub fn open() -> Result<Self, HypervisorError> {
        Self::open_path("/dev/kvm")
    }

    /// Opens a KVM device node at `path` (for hosts that put it elsewhere).
    pub fn open_path(path: impl AsRef<Path>) -> Result<Self, HypervisorError> {
        let path = path.as_ref();
        let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| HypervisorError::Open {
            path: path.into(),
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })?;
        let fd: RawFd = match Kvm::open_with_cloexec_at(cpath, true) {
            Ok(fd) => fd,
            Err(e) => {
                let io = io::Error::from_raw_os_error(e.errno());
                return Err(match io.kind() {
                    io::ErrorKind::NotFound => HypervisorError::NotFound(path.into()),
                    io::ErrorKind::PermissionDenied => HypervisorError::PermissionDenied(path.into()),
                    _ => HypervisorError::Open { path: path.into(), source: io },
                });
            }
        };
        // SAFETY: `fd` was just opened by us and is owned by nobody else.
        let kvm = unsafe { Kvm::from_raw_fd(fd) };
        let api_version = kvm.get_api_version();
        if api_version != KVM_API_VERSION {
            return Err(HypervisorError::ApiVersion { path: path.into(), found: api_version });
        }
        let vcpu_mmap_size = kvm.get_vcpu_mmap_size().map_err(|e| HypervisorError::Open {
            path: path.into(),
            source: io::Error::from_raw_os_error(e.errno()),
        })?;
        let cap = |c: u32| kvm.check_extension_raw(c.into());
        let ring_acq_rel = cap(KVM_CAP_DIRTY_LOG_RING_ACQ_REL);
        let ring = if ring_acq_rel > 0 { ring_acq_rel } else { cap(KVM_CAP_DIRTY_LOG_RING) };
        let caps = Capabilities {
            api_version,
            recommended_vcpus: kvm.get_nr_vcpus() as u32,
            max_vcpus: cap(KVM_CAP_MAX_VCPUS).max(kvm.get_nr_vcpus() as i32) as u32,
            max_memory_slots: cap(KVM_CAP_NR_MEMSLOTS).max(0) as u32,
            split_irqchip: cap(KVM_CAP_SPLIT_IRQCHIP) > 0,
            dirty_ring_max_bytes: ring.max(0) as u32,
            dirty_ring_acq_rel: ring_acq_rel > 0,
            manual_dirty_log_protect: cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) > 0,
            coalesced_mmio: cap(KVM_CAP_COALESCED_MMIO) > 0,
            coalesced_pio: cap(KVM_CAP_COALESCED_PIO) > 0,
            ioeventfd: cap(KVM_CAP_IOEVENTFD) > 0,
            irqfd: cap(KVM_CAP_IRQFD) > 0,
            msr_filter: cap(KVM_CAP_X86_MSR_FILTER) > 0,
            hyperv: cap(KVM_CAP_SYS_HYPERV_CPUID) > 0,
        };
        let kvm = std::sync::Arc::new(kvm);
        let host_cpuid = std::sync::Arc::new(crate::state::HostCpuid::new(kvm.clone()));
        Ok(Self { kvm, host_cpuid, caps, vcpu_mmap_size })
    }

    /// Starts reading, on a thread of its own, what this host's KVM offers
    /// a guest, which a restored vCPU state's CPU features are checked
    /// against ([`Vcpu::check_cpu_features`](crate::Vcpu::check_cpu_features)):
    /// the read takes a scratch VM (about 1 ms), which a restore or a
    /// migration destination then need not spend while the guest waits.
    /// The first check waits for the read if it has not finished; without
    /// this call it reads itself.
    pub fn prepare_restore(&self) {
        let host_cpuid = self.host_cpuid.clone();
        let spawned = std::thread::Builder::new().name("nkvm-cpuid".into()).spawn(move || {
            if let Err(e) = host_cpuid.offered() {
                log::debug!("cannot read the CPUID KVM offers ({e}): the first restore asks again");
            }
        });
        if let Err(e) = spawned {
            log::debug!("cannot start the thread that reads the CPUID KVM offers ({e}): the first restore reads it");
        }
    }

    /// The capabilities probed at open.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// The CPUID leaves KVM can give a guest on this host, KVM's
    /// paravirtual leaves (0x4000_0000.., kvmclock included) among them.
    pub fn supported_cpuid(&self) -> Result<crate::Cpuid, HypervisorError> {
        self.kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).map_err(HypervisorError::Cpuid)
    }
}
