//! [`RunState`]: the caller-owned state passed to
//! [`Vcpu::enter_guest`](crate::Vcpu::enter_guest).
//!
//! The RFC replaces the mmap'd `kvm_run` page with "a more orthodox pointer
//! parameter to `sys_kvm_enter_guest()`". `RunState` is that parameter: the
//! caller owns it, fills in what the guest should see on entry (the value of
//! a read, an interrupt-window request) and reads what came back.

use crate::sys::run::{Completion, RunFlags};
use crate::Exit;

/// State carried into and out of [`Vcpu::enter_guest`](crate::Vcpu::enter_guest).
///
/// # Example: completing a read
///
/// ```no_run
/// # use nkvm::{Exit, RunState, Vcpu};
/// # fn f(vcpu: &mut Vcpu) -> Result<(), nkvm::VcpuError> {
/// let mut run = RunState::new();
/// loop {
///     match vcpu.enter_guest(&mut run)? {
///         Exit::IoIn { port: 0x3fd, .. } => run.complete_io_in(0x60), // LSR: THR empty
///         Exit::MmioRead { .. } => run.complete_mmio_read(0xffff_ffff),
///         Exit::Hlt => break,
///         _ => {}
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Default)]
pub struct RunState {
    pub(crate) pending: Pending,
    pub(crate) string_data: Vec<u8>,
    pub(crate) string_in_ready: bool,
    request_interrupt_window: bool,
    pub(crate) flags: RunFlags,
}

/// The read the guest is waiting for, if any.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Pending {
    #[default]
    None,
    IoIn {
        port: u16,
        size: u8,
        value: Option<u64>,
    },
    MmioRead {
        addr: u64,
        size: u8,
        value: Option<u64>,
    },
    IoInString {
        port: u16,
    },
}

impl RunState {
    /// An empty state: nothing to complete, no interrupt window requested.
    pub fn new() -> Self {
        Self::default()
    }

    /// Completes the last [`Exit::IoIn`] with `value` (its low `size` bytes).
    pub fn complete_io_in(&mut self, value: u64) {
        if let Pending::IoIn { value: v, .. } = &mut self.pending {
            *v = Some(value);
        }
    }

    /// Completes the last [`Exit::MmioRead`] with `value` (its low `size` bytes).
    pub fn complete_mmio_read(&mut self, value: u64) {
        if let Pending::MmioRead { value: v, .. } = &mut self.pending {
            *v = Some(value);
        }
    }

    /// Completes whichever read is pending (I/O port or MMIO) with `value`.
    pub fn complete_read(&mut self, value: u64) {
        match &mut self.pending {
            Pending::IoIn { value: v, .. } | Pending::MmioRead { value: v, .. } => *v = Some(value),
            Pending::IoInString { .. } => self.string_in_ready = true,
            Pending::None => {}
        }
    }

    /// The bytes of the last [`Exit::IoOutString`].
    pub fn string_data(&self) -> &[u8] {
        &self.string_data
    }

    /// The buffer to fill for the last [`Exit::IoInString`]; writing it
    /// counts as completing the read.
    pub fn string_data_mut(&mut self) -> &mut [u8] {
        self.string_in_ready = true;
        &mut self.string_data
    }

    /// Asks KVM to exit with [`Exit::InterruptWindow`] as soon as the guest
    /// can take an interrupt (stays set until cleared).
    pub fn request_interrupt_window(&mut self, on: bool) {
        self.request_interrupt_window = on;
    }

    /// Whether an interrupt window is requested.
    pub fn interrupt_window_requested(&self) -> bool {
        self.request_interrupt_window
    }

    /// After an exit: whether the vCPU can take an injected interrupt now.
    pub fn ready_for_interrupt_injection(&self) -> bool {
        self.flags.ready_for_interrupt_injection
    }

    /// After an exit: the guest's RFLAGS.IF.
    pub fn interrupts_enabled(&self) -> bool {
        self.flags.if_flag
    }

    /// After an exit: the guest's CR8 (task priority).
    pub fn cr8(&self) -> u64 {
        self.flags.cr8
    }

    /// After an exit: the guest's APIC base MSR.
    pub fn apic_base(&self) -> u64 {
        self.flags.apic_base
    }

    /// Whether the guest is waiting for a read this state has not completed.
    pub fn read_pending(&self) -> bool {
        match self.pending {
            Pending::None => false,
            Pending::IoIn { value, .. } | Pending::MmioRead { value, .. } => value.is_none(),
            Pending::IoInString { .. } => !self.string_in_ready,
        }
    }

    /// Carries a read nkvm already answered (a failed device's all ones)
    /// to the next entry.
    #[cold]
    #[inline(never)]
    pub(crate) fn carry(&mut self, completion: Completion) {
        self.pending = match completion {
            Completion::None => Pending::None,
            Completion::IoIn { size, value } => Pending::IoIn { port: 0, size, value: Some(value) },
            Completion::MmioRead { size, value } => Pending::MmioRead { addr: 0, size, value: Some(value) },
        };
    }

    /// Records the read an exit leaves pending.
    pub(crate) fn expect(&mut self, exit: &Exit) {
        self.pending = match *exit {
            Exit::IoIn { port, size } => Pending::IoIn { port, size, value: None },
            Exit::MmioRead { addr, size } => Pending::MmioRead { addr: addr.0, size, value: None },
            Exit::IoInString { port, .. } => {
                self.string_in_ready = false;
                Pending::IoInString { port }
            }
            _ => Pending::None,
        };
    }

    /// The completion to copy into `kvm_run`, or the pending read's
    /// description when it was not completed.
    #[inline]
    pub(crate) fn take_completion(&mut self) -> Result<(Completion, bool), Pending> {
        // Most entries complete nothing: one compare, where the match
        // below is a jump table (the exit path's user-space time tracks
        // its instruction count: docs/benchmarks.md).
        if let Pending::None = self.pending {
            return Ok((Completion::None, false));
        }
        let pending = self.pending;
        let result = match pending {
            Pending::None => Ok((Completion::None, false)),
            Pending::IoIn { size, value: Some(value), .. } => Ok((Completion::IoIn { size, value }, false)),
            Pending::MmioRead { size, value: Some(value), .. } => Ok((Completion::MmioRead { size, value }, false)),
            Pending::IoInString { .. } if self.string_in_ready => Ok((Completion::None, true)),
            _ => Err(pending),
        };
        if result.is_ok() {
            self.pending = Pending::None;
        }
        result
    }
}
