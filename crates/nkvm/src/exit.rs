//! Why the guest stopped: the [`Exit`] returned by
//! [`Vcpu::enter_guest`](crate::Vcpu::enter_guest).
//!
//! Exits are plain data: match them, print them, trace them. A read (`IoIn`,
//! `MmioRead`) is completed by writing its value into the
//! [`RunState`](crate::RunState) before the next `enter_guest`.

use std::fmt;

use crate::GuestAddress;

/// One exit from the guest to the VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// `out` of `size` bytes (1, 2 or 4) to `port`; `data` holds the value.
    IoOut {
        /// I/O port.
        port: u16,
        /// Access size in bytes.
        size: u8,
        /// The value written (little-endian, zero-extended).
        data: u64,
    },
    /// `in` of `size` bytes from `port`: complete it with
    /// [`RunState::complete_io_in`](crate::RunState::complete_io_in).
    IoIn {
        /// I/O port.
        port: u16,
        /// Access size in bytes.
        size: u8,
    },
    /// `rep outs`: `count` elements of `size` bytes; the bytes are in
    /// [`RunState::string_data`](crate::RunState::string_data).
    IoOutString {
        /// I/O port.
        port: u16,
        /// Element size in bytes.
        size: u8,
        /// Number of elements.
        count: u32,
    },
    /// `rep ins`: fill [`RunState::string_data_mut`](crate::RunState::string_data_mut)
    /// (already sized to `size * count`).
    IoInString {
        /// I/O port.
        port: u16,
        /// Element size in bytes.
        size: u8,
        /// Number of elements.
        count: u32,
    },
    /// A guest write to an address no memory region covers.
    MmioWrite {
        /// Guest physical address.
        addr: GuestAddress,
        /// Access size in bytes (1..=8).
        size: u8,
        /// The value written (little-endian, zero-extended).
        data: u64,
    },
    /// A guest read from an address no memory region covers: complete it with
    /// [`RunState::complete_mmio_read`](crate::RunState::complete_mmio_read).
    MmioRead {
        /// Guest physical address.
        addr: GuestAddress,
        /// Access size in bytes (1..=8).
        size: u8,
    },
    /// The guest executed `hlt` (only without an in-kernel local APIC).
    Hlt,
    /// The guest triple-faulted (or the CPU otherwise shut down).
    Shutdown,
    /// A system event (power off, reset, crash) reported by KVM.
    SystemEvent(SystemEvent),
    /// A local APIC acknowledged a level-triggered vector (split irqchip).
    IoapicEoi {
        /// The vector.
        vector: u8,
    },
    /// The guest can take an interrupt now (after
    /// [`RunState::request_interrupt_window`](crate::RunState::request_interrupt_window)).
    InterruptWindow,
    /// KVM could not continue; for emulation failures it carries the
    /// instruction bytes.
    InternalError(Box<InternalError>),
    /// The hardware refused to enter the guest.
    FailEntry {
        /// The hardware's entry-failure reason code.
        hardware_reason: u64,
        /// The host CPU that failed the entry.
        cpu: u32,
    },
    /// The device behind an attached I/O region failed while serving this
    /// vCPU, or while a flush of posted writes, the coalesced ring or a
    /// detach waited for it (then returned by the next entry of any vCPU,
    /// without entering the guest). Reported once; its reads now return
    /// all ones. See [`Vm::io_region_failures`](crate::Vm::io_region_failures).
    IoRegionFailed {
        /// The region.
        id: crate::io::RegionId,
    },
    /// Another thread kicked the vCPU out (see [`Kicker`](crate::Kicker)).
    Kicked,
    /// An exit reason nkvm does not decode.
    Unknown {
        /// `kvm_run.exit_reason`.
        reason: u32,
    },
}

impl Exit {
    /// A short, stable name for the exit reason (used by the tracer and the
    /// statistics table).
    pub fn reason(&self) -> &'static str {
        match self {
            Exit::IoOut { .. } => "io-out",
            Exit::IoIn { .. } => "io-in",
            Exit::IoOutString { .. } => "io-out-string",
            Exit::IoInString { .. } => "io-in-string",
            Exit::MmioWrite { .. } => "mmio-write",
            Exit::MmioRead { .. } => "mmio-read",
            Exit::Hlt => "hlt",
            Exit::Shutdown => "shutdown",
            Exit::SystemEvent(_) => "system-event",
            Exit::IoapicEoi { .. } => "ioapic-eoi",
            Exit::InterruptWindow => "interrupt-window",
            Exit::InternalError(_) => "internal-error",
            Exit::FailEntry { .. } => "fail-entry",
            Exit::IoRegionFailed { .. } => "io-region-failed",
            Exit::Kicked => "kicked",
            Exit::Unknown { .. } => "unknown",
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Exit::IoOut { port, size, data } => {
                write!(f, "io-out port={port:#06x} size={size} data={data:#x}")
            }
            Exit::IoIn { port, size } => write!(f, "io-in port={port:#06x} size={size}"),
            Exit::IoOutString { port, size, count } => {
                write!(f, "io-out-string port={port:#06x} size={size} count={count}")
            }
            Exit::IoInString { port, size, count } => {
                write!(f, "io-in-string port={port:#06x} size={size} count={count}")
            }
            Exit::MmioWrite { addr, size, data } => {
                write!(f, "mmio-write addr={addr} size={size} data={data:#x}")
            }
            Exit::MmioRead { addr, size } => write!(f, "mmio-read addr={addr} size={size}"),
            Exit::SystemEvent(ev) => write!(f, "system-event {ev:?}"),
            Exit::IoapicEoi { vector } => write!(f, "ioapic-eoi vector={vector:#x}"),
            Exit::InternalError(ref e) => write!(f, "internal-error {e}"),
            Exit::FailEntry { hardware_reason, cpu } => {
                write!(f, "fail-entry hardware_reason={hardware_reason:#x} cpu={cpu}")
            }
            Exit::Unknown { reason } => write!(f, "unknown reason={reason}"),
            Exit::IoRegionFailed { id } => write!(f, "io-region-failed {id}"),
            ref other => f.write_str(other.reason()),
        }
    }
}

/// A `KVM_EXIT_SYSTEM_EVENT` type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemEvent {
    /// The guest asked to power off.
    Shutdown,
    /// The guest asked to reset.
    Reset,
    /// The guest crashed.
    Crash,
    /// Another event type (`KVM_SYSTEM_EVENT_*`).
    Other(u32),
}

impl SystemEvent {
    pub(crate) fn from_raw(raw: u32) -> Self {
        match raw {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => SystemEvent::Shutdown,
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => SystemEvent::Reset,
            kvm_bindings::KVM_SYSTEM_EVENT_CRASH => SystemEvent::Crash,
            other => SystemEvent::Other(other),
        }
    }
}

/// A `KVM_EXIT_INTERNAL_ERROR`, with the instruction bytes for emulation
/// failures (suberror 1) when KVM reports them.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct InternalError {
    /// `KVM_INTERNAL_ERROR_*` suberror (1 = emulation failure).
    pub suberror: u32,
    /// Extra data words KVM reported (hardware reason codes), `ndata` of them.
    pub data: [u64; 16],
    /// How many of `data` are valid.
    pub ndata: u8,
    /// The instruction bytes KVM could not emulate (`insn_len` of them).
    pub insn_bytes: [u8; 15],
    /// How many of `insn_bytes` are valid (0 if KVM did not report them).
    pub insn_len: u8,
}

impl InternalError {
    /// True for suberror 1, `KVM_INTERNAL_ERROR_EMULATION`.
    pub fn is_emulation_failure(&self) -> bool {
        self.suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION
    }

    /// The instruction bytes KVM reported (empty if none).
    pub fn instruction(&self) -> &[u8] {
        &self.insn_bytes[..usize::from(self.insn_len.min(15))]
    }

    /// The valid data words.
    pub fn data(&self) -> &[u64] {
        &self.data[..usize::from(self.ndata.min(16))]
    }
}

impl fmt::Debug for InternalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InternalError")
            .field("suberror", &self.suberror)
            .field("data", &self.data())
            .field("instruction", &self.instruction())
            .finish()
    }
}

impl fmt::Display for InternalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.suberror {
            1 => "emulation failure",
            2 => "simultaneous exception",
            3 => "delivery event",
            4 => "unexpected exit reason",
            _ => "internal error",
        };
        write!(f, "suberror={} ({what})", self.suberror)?;
        if !self.instruction().is_empty() {
            f.write_str(" insn=")?;
            for b in self.instruction() {
                write!(f, "{b:02x}")?;
            }
        }
        for (i, d) in self.data().iter().enumerate() {
            write!(f, " data[{i}]={d:#x}")?;
        }
        Ok(())
    }
}
