//! [`Vcpu`]: one virtual CPU, and [`Vcpu::enter_guest`].

use std::fmt;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, Msrs};
use kvm_ioctls::VcpuFd;

use crate::io::{IoRegions, IoSpace};
use crate::irq::{IrqShared, Lapic, LintState, VcpuConfig};
use crate::kick::{KickShared, Kicker};
use crate::pause::PauseGate;
use crate::run_state::{Pending, RunState};
use crate::sys::run::Completion;
use crate::sys::run::RunArea;
use crate::trace::{ExitRecord, Tracer};
use crate::{Cpuid, Exit};

/// Errors from a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// Mapping the vCPU's run area failed.
    #[error("cannot map the kvm_run area of vCPU {id}")]
    MapRun {
        /// vCPU id.
        id: u32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] std::io::Error),
    /// The guest is waiting for a read the caller did not complete.
    #[error("vCPU {id}: the guest is waiting for {what}; complete it in the RunState before entering again")]
    ReadNotCompleted {
        /// vCPU id.
        id: u32,
        /// The pending read.
        what: String,
    },
    /// `KVM_RUN` failed.
    #[error("vCPU {id}: KVM_RUN failed")]
    Run {
        /// vCPU id.
        id: u32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another vCPU ioctl failed.
    #[error("vCPU {id}: {op} failed")]
    Kvm {
        /// vCPU id.
        id: u32,
        /// Which operation.
        op: &'static str,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// General-purpose registers (`struct kvm_regs`).
pub type Regs = kvm_regs;
/// Segment and control registers (`struct kvm_sregs`).
pub type Sregs = kvm_sregs;
/// FPU state (`struct kvm_fpu`).
pub type Fpu = kvm_fpu;

/// MXCSR's index in the XSAVE legacy area, in 32-bit words (byte 24).
const MXCSR_WORD: usize = 6;
/// The low half of XSTATE_BV in the XSAVE header, in 32-bit words (byte 512).
const XSTATE_BV_WORD: usize = 128;
/// Pending exceptions, interrupts and NMIs (`struct kvm_vcpu_events`).
pub type VcpuEvents = kvm_vcpu_events;

/// One virtual CPU. Owned by the thread that runs it; other threads reach it
/// through a [`Kicker`].
pub struct Vcpu {
    id: u32,
    pub(crate) fd: VcpuFd,
    pub(crate) kick: Arc<KickShared>,
    tracers: Vec<Box<dyn Tracer>>,
    trace: TraceState,
    pub(crate) links: VcpuLinks,
    /// The coalesced-MMIO ring page is mapped.
    coalesced: bool,
    /// LINT0/LINT1 requests from other threads.
    pub(crate) lint: Arc<LintState>,
    /// The guest must not see a local APIC.
    pub(crate) hidden_lapic: bool,
}

/// What a vCPU shares with its VM.
#[derive(Debug)]
pub(crate) struct VcpuLinks {
    /// Held around KVM_RUN; a memory-map change takes it exclusively.
    pub(crate) gate: Arc<PauseGate>,
    /// The memory state (kept alive) and the dirty-ring harvest.
    pub(crate) memory: Arc<dyn RingFull>,
    /// Attached I/O regions.
    pub(crate) io: Arc<IoRegions>,
    /// Interrupt routing and the APIC bus.
    pub(crate) irq: Arc<IrqShared>,
    /// The VM's file (the routes `restore_state` gives restored vectors).
    pub(crate) vm_fd: Arc<kvm_ioctls::VmFd>,
    /// Keeps the APIC bus up while this vCPU may run.
    pub(crate) _bus_closer: Arc<crate::irq::BusCloser>,
    /// The MSRs `save_state` reads (KVM_GET_MSR_INDEX_LIST).
    pub(crate) saveable_msrs: Arc<[u32]>,
    /// What this host's KVM offers a guest, which `restore_state` checks a
    /// saved CPUID against.
    pub(crate) host_cpuid: Arc<crate::state::HostCpuid>,
    /// KVM holds a local APIC for the vCPU (split irqchip).
    pub(crate) lapic_in_kernel: bool,
}

/// Harvests the VM's dirty rings when a vCPU's ring is full (implemented by
/// the VM's memory state, which the vCPU also keeps alive).
pub(crate) trait RingFull: Send + Sync + fmt::Debug {
    fn ring_full(&self, vcpu: u32) -> std::io::Result<()>;
}

#[derive(Debug, Default)]
struct TraceState {
    seq: u64,
    last: Option<(Exit, Duration, Instant)>,
}

impl fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vcpu").field("id", &self.id).field("tracers", &self.tracers.len()).finish()
    }
}

impl Vcpu {
    pub(crate) fn new(
        id: u32,
        fd: VcpuFd,
        mmap_size: usize,
        links: VcpuLinks,
        config: VcpuConfig,
    ) -> Result<Self, VcpuError> {
        crate::sys::kick::install_handler().map_err(VcpuError::Signal)?;
        let run = RunArea::map(fd.as_raw_fd(), mmap_size).map_err(|source| VcpuError::MapRun { id, source })?;
        let kick = KickShared::new(run);
        links.gate.register(&kick);
        let mut fd = fd;
        // Without the ring page, posted MMIO writes simply exit.
        let coalesced = fd.map_coalesced_mmio_ring().is_ok();
        let vcpu = Self {
            id,
            fd,
            kick,
            tracers: Vec::new(),
            trace: TraceState::default(),
            links,
            coalesced,
            lint: Arc::default(),
            hidden_lapic: config.lapic == Lapic::Hidden,
        };
        if vcpu.hidden_lapic {
            vcpu.hide_lapic()?;
        }
        Ok(vcpu)
    }

    /// The vCPU's id (its APIC id).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// A handle other threads use to force this vCPU out of the guest.
    pub fn kicker(&self) -> Kicker {
        Kicker::new(self.kick.clone())
    }

    /// Attaches a tracer that sees every exit from now on.
    pub fn add_tracer(&mut self, tracer: Box<dyn Tracer>) {
        self.tracers.push(tracer);
    }

    /// Runs the guest until it exits, and says why.
    ///
    /// Before entering, the read left pending by the previous exit (if any)
    /// is completed from `run` — it is an error not to have completed it.
    /// After the exit, `run` holds the interrupt flags KVM reported.
    ///
    /// Returns [`Exit::Kicked`] when another thread used this vCPU's
    /// [`Kicker`].
    pub fn enter_guest(&mut self, run: &mut RunState) -> Result<Exit, VcpuError> {
        // A device failure a flush found, reported without entering: the
        // read the caller completed stays in `run` for the next entry.
        if let Some(id) = self.links.io.take_unreported() {
            let exit = Exit::IoRegionFailed { id };
            if !self.tracers.is_empty() {
                // Traced as an exit after no time in the guest.
                let now = self.emit_pending(true);
                self.trace.last = Some((exit.clone(), Duration::ZERO, now));
            }
            return Ok(exit);
        }
        let (mut completion, mut string_in) = run.take_completion().map_err(|p| self.read_not_completed(p))?;
        let tracing = !self.tracers.is_empty();
        // When tracing: when this trip into the guest started.
        let mut entered = if tracing { Some(self.emit_pending(true)) } else { None };
        // A read answered with all ones by a failed device, carried to the
        // next entry when the failure is reported.
        let mut carry = None;
        let exit = loop {
            // Held while inside KVM_RUN: a memory-map change takes it
            // exclusively, after kicking every vCPU out.
            // Also marks the thread inside for kickers; no lock on this path.
            let inside = self.links.gate.enter(&self.kick);
            let data = if string_in { Some(run.string_data.as_slice()) } else { None };
            let want_window = self.deliver_lints(run)?;
            let window = run.interrupt_window_requested() || want_window;
            let result = self.kick.run_area().run(&self.fd, completion, data, window);
            run.flags = self.kick.run_area().flags();
            // Drained before leaving the gate: a pause (`detach_region`'s)
            // then knows that every vCPU it made leave has forwarded what
            // KVM held in the ring. Only socket regions are coalesced, so
            // no model's code runs here.
            if self.coalesced && self.links.io.coalescing() {
                Self::drain_coalesced(&mut self.fd, &self.links.io);
            }
            drop(inside);
            // A completion is consumed by the first KVM_RUN, kicked or not.
            completion = Completion::None;
            string_in = false;
            let exit = match result {
                Ok(true) => self.kick.run_area().decode(&mut run.string_data),
                Ok(false) => {
                    let user = self.kick.take();
                    // The EOI watch's poke (rare: an EOI overdue).
                    if self.kick.take_poke() {
                        if let Some(exit) = self.unstick_halt()? {
                            break exit;
                        }
                    }
                    if user {
                        break Exit::Kicked;
                    }
                    // Paused for a memory-map change: enter again once it is done.
                    continue;
                }
                Err(source) => return Err(VcpuError::Run { id: self.id, source }),
            };
            match exit {
                // Opened for a LINT0 interrupt nkvm is holding, not for the caller.
                Exit::InterruptWindow if !run.interrupt_window_requested() => {
                    run.flags = self.kick.run_area().flags();
                    continue;
                }
                Exit::IoapicEoi { vector } if self.ioapic_eoi(vector) => continue,
                _ => {}
            }
            let Some((space, addr, size, write)) = io_access(&exit) else {
                if let Exit::Unknown { reason: kvm_bindings::KVM_EXIT_DIRTY_RING_FULL } = exit {
                    // The dirty ring is full: move it to the bitmaps, go on.
                    self.links.memory.ring_full(self.id).map_err(|source| VcpuError::Run { id: self.id, source })?;
                    continue;
                }
                // `rep ins`/`rep outs` on an attached port: element by element.
                if let Some(input) = self.serve_string(&exit, &mut run.string_data) {
                    string_in = input;
                    continue;
                }
                break exit;
            };
            if self.links.io.is_empty() {
                break exit;
            }
            let exited = entered.map(|_| Instant::now());
            let Some(served) = self.links.io.access(space, addr, size, write) else {
                // Not ours: the caller handles it, after every posted write.
                self.links.io.flush_posted(None);
                break exit;
            };
            if write.is_none() {
                completion = match space {
                    IoSpace::Mmio => Completion::MmioRead { size, value: served.value },
                    IoSpace::Pio => Completion::IoIn { size, value: served.value },
                };
            }
            if let (Some(start), Some(exited)) = (entered, exited) {
                let now = Instant::now();
                self.emit(exit, exited - start, Some(now - exited));
                entered = Some(now);
            }
            if let Some(id) = served.failed {
                carry = Some(completion);
                break Exit::IoRegionFailed { id };
            }
        };
        // Every exit to the caller comes after the guest's posted writes
        // (the guest may wait for their effect in whatever it exited for).
        self.links.io.flush_posted(None);
        // `run.flags` was copied out after the last KVM_RUN, in the loop.
        run.expect(&exit);
        if let Some(completion) = carry {
            run.carry(completion);
        }
        if let Some(entered) = entered {
            let now = Instant::now();
            self.trace.last = Some((exit.clone(), now - entered, now));
        }
        Ok(exit)
    }

    /// Serves a string I/O exit to a port an attached region claims, one
    /// element at a time through `data` (the exit's bytes). Returns whether
    /// the exit was an input (whose bytes KVM must take at the next entry),
    /// or `None` if no region claims the port.
    #[inline(never)]
    fn serve_string(&self, exit: &Exit, data: &mut [u8]) -> Option<bool> {
        let (port, size, input) = match *exit {
            Exit::IoInString { port, size, .. } => (port, size, true),
            Exit::IoOutString { port, size, .. } => (port, size, false),
            _ => return None,
        };
        let n = usize::from(size.clamp(1, 8));
        let mut served_any = false;
        for element in data.chunks_mut(n) {
            let write = (!input).then(|| {
                let mut bytes = [0u8; 8];
                bytes[..element.len()].copy_from_slice(element);
                u64::from_le_bytes(bytes)
            });
            let served = self.links.io.access(IoSpace::Pio, u64::from(port), size, write)?;
            if input {
                element.copy_from_slice(&served.value.to_le_bytes()[..element.len()]);
            }
            served_any = true;
        }
        served_any.then_some(input)
    }

    /// The error for an entry whose pending read was not completed.
    #[cold]
    fn read_not_completed(&self, p: Pending) -> VcpuError {
        VcpuError::ReadNotCompleted { id: self.id, what: describe(p) }
    }

    /// Passes an EOI KVM reports to the IOAPIC; whether it was nkvm's to
    /// handle (the caller does not see it).
    #[cold]
    fn ioapic_eoi(&self, vector: u8) -> bool {
        log::trace!("vcpu {}: KVM reports the EOI of {vector:#x}", self.id);
        self.links.irq.eoi(vector)
    }

    /// Delivers the posted MMIO writes KVM queued in the coalesced ring.
    #[inline(never)]
    fn drain_coalesced(fd: &mut VcpuFd, io: &IoRegions) {
        io.drain_coalesced(|| {
            let e = fd.coalesced_mmio_read().ok().flatten()?;
            Some((e.phys_addr, e.len.min(8) as u8, u64::from_le_bytes(e.data)))
        });
    }

    /// Reports one exit to every tracer.
    #[cold]
    fn emit(&mut self, exit: Exit, guest_time: Duration, handler_time: Option<Duration>) {
        let record = ExitRecord { vcpu: self.id, seq: self.trace.seq, exit, guest_time, handler_time };
        self.trace.seq += 1;
        for t in &mut self.tracers {
            t.on_exit(&record);
        }
    }

    /// Emits the record of the previous exit (its handler time ends now).
    #[cold]
    fn emit_pending(&mut self, entering: bool) -> Instant {
        let now = Instant::now();
        if let Some((exit, guest_time, exited)) = self.trace.last.take() {
            self.emit(exit, guest_time, entering.then(|| now - exited));
        }
        now
    }

    /// Reads the general-purpose registers.
    pub fn regs(&self) -> Result<Regs, VcpuError> {
        self.fd.get_regs().map_err(|source| self.err("KVM_GET_REGS", source))
    }

    /// Writes the general-purpose registers.
    pub fn set_regs(&self, regs: &Regs) -> Result<(), VcpuError> {
        self.fd.set_regs(regs).map_err(|source| self.err("KVM_SET_REGS", source))
    }

    /// Reads the segment and control registers.
    pub fn sregs(&self) -> Result<Sregs, VcpuError> {
        self.fd.get_sregs().map_err(|source| self.err("KVM_GET_SREGS", source))
    }

    /// Writes the segment and control registers.
    pub fn set_sregs(&self, sregs: &Sregs) -> Result<(), VcpuError> {
        self.fd.set_sregs(sregs).map_err(|source| self.err("KVM_SET_SREGS", source))
    }

    /// Reads the FPU state.
    pub fn fpu(&self) -> Result<Fpu, VcpuError> {
        self.fd.get_fpu().map_err(|source| self.err("KVM_GET_FPU", source))
    }

    /// Writes the FPU state.
    pub fn set_fpu(&self, fpu: &Fpu) -> Result<(), VcpuError> {
        self.fd.set_fpu(fpu).map_err(|source| self.err("KVM_SET_FPU", source))
    }

    /// Reads MXCSR, the SSE control and status register (from the XSAVE
    /// image: `KVM_GET_FPU` does not carry it on every host).
    pub fn mxcsr(&self) -> Result<u32, VcpuError> {
        let xsave = self.fd.get_xsave().map_err(|source| self.err("KVM_GET_XSAVE", source))?;
        Ok(xsave.region[MXCSR_WORD])
    }

    /// Writes MXCSR (through the XSAVE image).
    pub fn set_mxcsr(&self, mxcsr: u32) -> Result<(), VcpuError> {
        let mut xsave = self.fd.get_xsave().map_err(|source| self.err("KVM_GET_XSAVE", source))?;
        xsave.region[MXCSR_WORD] = mxcsr;
        // The kernel takes MXCSR from the image only when the header says
        // the SSE state is present (XSTATE_BV bit 1, byte 512); the XMM
        // registers in the image are the ones just read.
        xsave.region[XSTATE_BV_WORD] |= 1 << 1;
        crate::sys::xsave::set_xsave(&self.fd, &xsave).map_err(|source| self.err("KVM_SET_XSAVE", source))
    }

    /// The XSAVE area (`KVM_GET_XSAVE`): 4096 bytes in the standard
    /// (non-compacted) format, XSTATE_BV at byte 512.
    pub fn xsave(&self) -> Result<Vec<u8>, VcpuError> {
        let xsave = self.fd.get_xsave().map_err(|source| self.err("KVM_GET_XSAVE", source))?;
        Ok(xsave.region.iter().flat_map(|w| w.to_le_bytes()).collect())
    }

    /// Writes the XSAVE area (`KVM_SET_XSAVE`), an image such as
    /// [`xsave`](Self::xsave) returns; bytes past 4096 are an error
    /// (EINVAL).
    pub fn set_xsave(&self, image: &[u8]) -> Result<(), VcpuError> {
        let mut xsave = kvm_bindings::kvm_xsave::default();
        if image.len() > 4 * xsave.region.len() {
            return Err(self.err("KVM_SET_XSAVE", kvm_ioctls::Error::new(libc::EINVAL)));
        }
        for (word, bytes) in xsave.region.iter_mut().zip(image.chunks(4)) {
            let mut b = [0u8; 4];
            b[..bytes.len()].copy_from_slice(bytes);
            *word = u32::from_le_bytes(b);
        }
        crate::sys::xsave::set_xsave(&self.fd, &xsave).map_err(|source| self.err("KVM_SET_XSAVE", source))
    }

    /// Extended control register XCR0 (`KVM_GET_XCRS`).
    pub fn xcr0(&self) -> Result<u64, VcpuError> {
        let xcrs = self.fd.get_xcrs().map_err(|source| self.err("KVM_GET_XCRS", source))?;
        Ok(xcrs.xcrs[..xcrs.nr_xcrs as usize].iter().find(|x| x.xcr == 0).map_or(1, |x| x.value))
    }

    /// Sets the CPUID the guest sees (start from
    /// [`Hypervisor::supported_cpuid`](crate::Hypervisor::supported_cpuid)).
    /// With a hidden local APIC, the APIC and x2APIC bits are cleared.
    pub fn set_cpuid(&self, cpuid: &Cpuid) -> Result<(), VcpuError> {
        let mut cpuid = cpuid.clone();
        if self.hidden_lapic {
            crate::irq::mask_apic(&mut cpuid);
        }
        self.fd.set_cpuid2(&cpuid).map_err(|source| self.err("KVM_SET_CPUID2", source))
    }

    /// The CPUID set on this vCPU.
    pub fn cpuid(&self) -> Result<Cpuid, VcpuError> {
        self.fd.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES).map_err(|source| self.err("KVM_GET_CPUID2", source))
    }

    /// Reads the MSRs `indices`, returning `(index, value)` pairs for those
    /// KVM could read (it stops at the first it cannot).
    pub fn msrs(&self, indices: &[u32]) -> Result<Vec<(u32, u64)>, VcpuError> {
        let entries: Vec<kvm_msr_entry> =
            indices.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| self.err("KVM_GET_MSRS", kvm_ioctls::Error::new(libc::E2BIG)))?;
        let n = self.fd.get_msrs(&mut msrs).map_err(|source| self.err("KVM_GET_MSRS", source))?;
        Ok(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)).collect())
    }

    /// Writes MSRs; returns how many KVM accepted (it stops at the first it rejects).
    pub fn set_msrs(&self, values: &[(u32, u64)]) -> Result<usize, VcpuError> {
        let entries: Vec<kvm_msr_entry> =
            values.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
        let msrs =
            Msrs::from_entries(&entries).map_err(|_| self.err("KVM_SET_MSRS", kvm_ioctls::Error::new(libc::E2BIG)))?;
        self.fd.set_msrs(&msrs).map_err(|source| self.err("KVM_SET_MSRS", source))
    }

    /// Sets extended control register XCR0 (the XSAVE feature mask the guest
    /// has enabled; x87|SSE = 0x3).
    pub fn set_xcr0(&self, value: u64) -> Result<(), VcpuError> {
        let mut xcrs = kvm_bindings::kvm_xcrs { nr_xcrs: 1, ..Default::default() };
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = value;
        self.fd.set_xcrs(&xcrs).map_err(|source| self.err("KVM_SET_XCRS", source))
    }

    /// Makes the vCPU runnable now. With in-kernel local APICs, KVM keeps
    /// application processors waiting for INIT/SIPI; a VMM that places a
    /// vCPU at an entry point itself wants it to run.
    pub fn make_runnable(&self) -> Result<(), VcpuError> {
        let state = kvm_bindings::kvm_mp_state { mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE };
        self.fd.set_mp_state(state).map_err(|source| self.err("KVM_SET_MP_STATE", source))
    }

    /// Reads pending exception/interrupt/NMI state.
    pub fn events(&self) -> Result<VcpuEvents, VcpuError> {
        self.fd.get_vcpu_events().map_err(|source| self.err("KVM_GET_VCPU_EVENTS", source))
    }

    /// Writes pending exception/interrupt/NMI state (e.g. to inject an exception).
    pub fn set_events(&self, events: &VcpuEvents) -> Result<(), VcpuError> {
        self.fd.set_vcpu_events(events).map_err(|source| self.err("KVM_SET_VCPU_EVENTS", source))
    }

    /// Translates a guest virtual address with the vCPU's current page tables
    /// (`KVM_TRANSLATE`); `None` if it is not mapped.
    pub fn translate(&self, gva: u64) -> Result<Option<u64>, VcpuError> {
        let t = self.fd.translate_gva(gva).map_err(|source| self.err("KVM_TRANSLATE", source))?;
        Ok((t.valid != 0).then_some(t.physical_address))
    }

    pub(crate) fn err(&self, op: &'static str, source: kvm_ioctls::Error) -> VcpuError {
        VcpuError::Kvm { id: self.id, op, source }
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        if !self.tracers.is_empty() {
            self.emit_pending(false);
        }
    }
}

/// The I/O access an exit describes: (space, address, size, written value).
fn io_access(exit: &Exit) -> Option<(IoSpace, u64, u8, Option<u64>)> {
    match *exit {
        Exit::MmioRead { addr, size } => Some((IoSpace::Mmio, addr.0, size, None)),
        Exit::MmioWrite { addr, size, data } => Some((IoSpace::Mmio, addr.0, size, Some(data))),
        Exit::IoIn { port, size } => Some((IoSpace::Pio, u64::from(port), size, None)),
        Exit::IoOut { port, size, data } => Some((IoSpace::Pio, u64::from(port), size, Some(data))),
        _ => None,
    }
}

fn describe(p: Pending) -> String {
    match p {
        Pending::IoIn { port, size, .. } => format!("a {size}-byte `in` from port {port:#x}"),
        Pending::MmioRead { addr, size, .. } => format!("a {size}-byte MMIO read at {addr:#x}"),
        Pending::IoInString { port } => format!("a `rep ins` from port {port:#x}"),
        Pending::None => "nothing".to_string(),
    }
}
