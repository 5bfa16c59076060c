//! Interrupts: MSIs and their routes, irqfd and ioeventfd, LINT0/LINT1 of a
//! vCPU, and the APIC bus that carries interrupt messages from an IOAPIC or
//! PIC model (in this process or another) to the in-kernel local APICs.
//!
//! Local APICs always live in KVM (split irqchip: set
//! [`VmConfig::split_irqchip`](crate::VmConfig::split_irqchip)); the IOAPIC
//! and PIC are device models. A vCPU can hide its local APIC
//! ([`Lapic::Hidden`]): it is then an APIC-less core, driven through
//! [`Lint::raise_lint0`] (an ExtINT vector, delivered when the guest can
//! take it) and [`Lint::nmi`] (LINT1).

use std::collections::{BTreeMap, VecDeque};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_irq_routing_entry, kvm_irq_routing_msi, kvm_msi, KVM_IRQ_ROUTING_MSI};
use nkvm_wire::apic::{DeliveryMode, DestinationMode, EoiMessage, InterruptMessage, TriggerMode};

use crate::kick::KickShared;

mod fast_path;

pub use fast_path::FAST_PATH_GSIS;

/// The first GSI free for the caller's MSI routes; GSIs below it are kept
/// for level-triggered IOAPIC routes, which KVM needs to report EOIs.
pub const FIRST_USER_GSI: u32 = 24;

/// An x86 MSI: the address/data pair a device writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MsiMessage {
    /// Address (0xfee0_0000 | destination << 12 | flags).
    pub address: u64,
    /// Data (vector, delivery mode, trigger).
    pub data: u32,
}

impl MsiMessage {
    /// A fixed, edge-triggered MSI of `vector` to the APIC with id `dest`.
    pub fn fixed(dest: u8, vector: u8) -> Self {
        Self { address: 0xfee0_0000 | (u64::from(dest) << 12), data: u32::from(vector) }
    }

    /// The MSI that carries an APIC-bus interrupt message.
    pub fn from_interrupt(m: &InterruptMessage) -> Self {
        let mut address = 0xfee0_0000 | (u64::from(m.destination & 0xff) << 12);
        if m.destination_mode == DestinationMode::Logical {
            address |= 1 << 2;
        }
        if m.delivery_mode == DeliveryMode::LowestPriority {
            address |= 1 << 3;
        }
        let mode: u32 = match m.delivery_mode {
            DeliveryMode::Fixed => 0,
            DeliveryMode::LowestPriority => 1,
            DeliveryMode::Smi => 2,
            DeliveryMode::Nmi => 4,
            DeliveryMode::Init => 5,
            DeliveryMode::ExtInt => 7,
        };
        let mut data = u32::from(m.vector) | (mode << 8);
        if m.trigger_mode == TriggerMode::Level {
            data |= 1 << 15;
            if m.level {
                data |= 1 << 14;
            }
        } else {
            data |= 1 << 14;
        }
        Self { address, data }
    }

    pub(crate) fn to_kvm(self) -> kvm_msi {
        kvm_msi {
            address_lo: self.address as u32,
            address_hi: (self.address >> 32) as u32,
            data: self.data,
            ..Default::default()
        }
    }

    fn vector(&self) -> u8 {
        self.data as u8
    }
}

/// Whether a vCPU's local APIC is visible to the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Lapic {
    /// CPUID reports an APIC and it is enabled.
    #[default]
    Visible,
    /// CPUID reports no APIC and the APIC is disabled: an APIC-less core,
    /// whose LINT0 (ExtINT) and LINT1 (NMI) the VMM drives.
    Hidden,
}

/// Per-vCPU configuration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VcpuConfig {
    /// Visible or hidden local APIC.
    pub lapic: Lapic,
}

/// Errors from the interrupt APIs.
#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    /// The VM has no in-kernel local APICs.
    #[error("{0} needs the split irqchip (VmConfig::split_irqchip = true)")]
    NeedsIrqchip(&'static str),
    /// A GSI reserved for IOAPIC routes or the APIC bus's fast paths.
    #[error(
        "GSI {0} is reserved (IOAPIC routes below {FIRST_USER_GSI}, the APIC bus's fast paths from {fast}); \
         use {FIRST_USER_GSI} to {last}",
        fast = FAST_PATH_GSIS.start,
        last = FAST_PATH_GSIS.start - 1
    )]
    ReservedGsi(u32),
    /// A KVM ioctl failed.
    #[error("{op} failed")]
    Kvm {
        /// Which.
        op: &'static str,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The APIC-bus handshake failed.
    #[error("the APIC-bus peer failed the handshake")]
    Handshake(#[source] nkvm_wire::WireError),
    /// An APIC bus is already attached.
    #[error("an APIC bus is already attached to this VM")]
    BusAttached,
    /// Socket setup failed.
    #[error("cannot set up the APIC-bus socket")]
    Socket(#[source] std::io::Error),
}

/// The GSI routing table: the caller's MSI routes and the level-triggered
/// IOAPIC routes the APIC bus installs so that KVM reports their EOIs.
#[derive(Debug, Default)]
pub(crate) struct Routes {
    table: BTreeMap<u32, MsiMessage>,
}

impl Routes {
    pub(crate) fn set(&mut self, gsi: u32, msi: Option<MsiMessage>) {
        match msi {
            Some(m) => self.table.insert(gsi, m),
            None => self.table.remove(&gsi),
        };
    }

    /// A GSI below [`FIRST_USER_GSI`] routing `msi`, allocating one if needed.
    pub(crate) fn level_slot(&mut self, msi: MsiMessage) -> Option<(u32, bool)> {
        if let Some((&gsi, _)) = self.table.range(..FIRST_USER_GSI).find(|(_, m)| m.vector() == msi.vector()) {
            let changed = self.table[&gsi] != msi;
            self.table.insert(gsi, msi);
            return Some((gsi, changed));
        }
        let free = (0..FIRST_USER_GSI).find(|g| !self.table.contains_key(g))?;
        self.table.insert(free, msi);
        Some((free, true))
    }

    pub(crate) fn to_kvm(&self) -> Result<kvm_bindings::KvmIrqRouting, IrqError> {
        let entries: Vec<kvm_irq_routing_entry> = self
            .table
            .iter()
            .map(|(&gsi, m)| {
                let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_MSI, ..Default::default() };
                e.u.msi = kvm_irq_routing_msi {
                    address_lo: m.address as u32,
                    address_hi: (m.address >> 32) as u32,
                    data: m.data,
                    ..Default::default()
                };
                e
            })
            .collect();
        kvm_bindings::KvmIrqRouting::from_entries(&entries)
            .map_err(|_| IrqError::Kvm { op: "KVM_SET_GSI_ROUTING", source: kvm_ioctls::Error::new(libc::E2BIG) })
    }
}

/// LINT0/LINT1 requests for one vCPU, taken by `enter_guest`.
#[derive(Debug, Default)]
pub(crate) struct LintState {
    pub(crate) extint: Mutex<VecDeque<u8>>,
    pub(crate) nmi: AtomicBool,
    pub(crate) any: AtomicBool,
}

/// Drives a vCPU's LINT0 and LINT1 from any thread.
#[derive(Debug, Clone)]
pub struct Lint {
    pub(crate) state: Arc<LintState>,
    pub(crate) kick: Arc<KickShared>,
}

impl Lint {
    /// Raises LINT0 with an ExtINT `vector` (what an 8259 would supply):
    /// delivered as soon as the guest can take an interrupt.
    pub fn raise_lint0(&self, vector: u8) {
        self.state.extint.lock().unwrap_or_else(|p| p.into_inner()).push_back(vector);
        self.state.any.store(true, Ordering::SeqCst);
        self.kick.kick();
    }

    /// Raises LINT1: a non-maskable interrupt.
    pub fn nmi(&self) {
        self.state.nmi.store(true, Ordering::SeqCst);
        self.state.any.store(true, Ordering::SeqCst);
        self.kick.kick();
    }
}

/// Receives the local APICs' EOIs of level-triggered vectors on an APIC bus
/// whose IOAPIC or PIC model lives in this process (see
/// [`Vm::attach_apic_bus_in_process`](crate::Vm::attach_apic_bus_in_process)).
pub trait EoiHandler: Send {
    /// A local APIC ended the interrupt with `vector`. Called on the vCPU
    /// thread that saw the EOI, before that vCPU re-enters the guest; it may
    /// send on the [`ApicBus`] (a level line still asserted fires again).
    fn end_of_interrupt(&mut self, vector: u8);
}

impl<F: FnMut(u8) + Send> EoiHandler for F {
    fn end_of_interrupt(&mut self, vector: u8) {
        self(vector)
    }
}

/// The VM end of an APIC bus whose IOAPIC or PIC model lives in this
/// process: the direct path. [`send`](Self::send) delivers an interrupt
/// message to the local APICs at once, on the calling thread — no socket, no
/// thread hop — exactly as the socket path delivers a message read from its
/// peer (`docs/wire-format.md`); EOIs reach the model's [`EoiHandler`].
#[derive(Debug, Clone)]
pub struct ApicBus {
    fd: Arc<kvm_ioctls::VmFd>,
    irq: Arc<IrqShared>,
}

impl ApicBus {
    /// Delivers one interrupt message (what an IOAPIC or PIC puts on the
    /// bus): fixed, lowest-priority, NMI, INIT or SMI through
    /// `KVM_SIGNAL_MSI`, ExtINT through the destination's LINT0. Messages
    /// are delivered in the order they are sent.
    pub fn send(&self, message: &InterruptMessage) -> Result<(), IrqError> {
        deliver(&self.fd, &self.irq, message)
    }
}

/// Where the VM end of an APIC bus sends EOIs.
enum EoiPath {
    /// To the peer, on the bus socket.
    Socket(Mutex<nkvm_wire::spin::SpinStream>),
    /// To a model in this process, by a call.
    Direct(Mutex<Box<dyn EoiHandler>>),
}

impl std::fmt::Debug for EoiPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EoiPath::Socket(_) => "Socket",
            EoiPath::Direct(_) => "Direct",
        })
    }
}

/// The VM end of an APIC bus: where local APICs send EOIs.
#[derive(Debug)]
pub(crate) struct ApicBusEnd {
    eoi: EoiPath,
    pub(crate) failure: Mutex<Option<String>>,
    pub(crate) alive: AtomicBool,
    /// Interrupt frames received on the socket.
    messages: AtomicU64,
    /// Fast paths the peer holds.
    fast_paths: AtomicUsize,
}

/// How [`Vm::attach_apic_bus_with`](crate::Vm::attach_apic_bus_with) sets a
/// bus up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApicBusOptions {
    /// Offer the peer fast paths (protocol version 2, [`FAST_PATH_GSIS`]);
    /// on by default.
    pub fast_paths: bool,
}

impl Default for ApicBusOptions {
    fn default() -> Self {
        Self { fast_paths: true }
    }
}

/// What an APIC bus attached with [`Vm::attach_apic_bus`](crate::Vm::attach_apic_bus)
/// has carried so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ApicBusStats {
    /// Interrupt messages that came over the socket (each woke the bus
    /// thread).
    pub messages: u64,
    /// Messages the peer can deliver through an eventfd instead
    /// (APIC-bus protocol version 2; none with a version-1 peer).
    pub fast_paths: usize,
}

impl ApicBusEnd {
    fn new(eoi: EoiPath) -> Self {
        Self {
            eoi,
            failure: Mutex::new(None),
            alive: AtomicBool::new(true),
            messages: AtomicU64::new(0),
            fast_paths: AtomicUsize::new(0),
        }
    }

    /// Sends `frame` with `fd` attached, between whole EOI frames.
    fn send_with_fd(&self, frame: &[u8], fd: std::os::fd::RawFd) -> std::io::Result<()> {
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let EoiPath::Socket(writer) = &self.eoi else {
            return Err(std::io::ErrorKind::Unsupported.into());
        };
        let w = writer.lock().unwrap_or_else(|p| p.into_inner());
        let sent = w.get_ref().send_with_fd(frame, fd).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        if sent != frame.len() {
            // Part of a frame is on the wire: the stream is broken.
            self.fail(format!("a fast-path offer went out cut short ({sent} of {} bytes)", frame.len()));
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        Ok(())
    }

    /// Broadcasts an EOI for `vector` to the IOAPIC side.
    pub(crate) fn eoi(&self, vector: u8) {
        if !self.alive.load(Ordering::SeqCst) {
            return;
        }
        match &self.eoi {
            EoiPath::Socket(writer) => {
                let frame = EoiMessage { vector }.encode();
                let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = std::io::Write::write_all(&mut *w, &frame) {
                    self.fail(format!("sending an EOI failed: {e}"));
                }
            }
            EoiPath::Direct(handler) => handler.lock().unwrap_or_else(|p| p.into_inner()).end_of_interrupt(vector),
        }
    }

    pub(crate) fn fail(&self, reason: String) {
        log::error!("APIC bus: {reason}");
        self.alive.store(false, Ordering::SeqCst);
        *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
    }
}

/// Interrupt state a VM shares with its vCPUs and its APIC-bus thread.
#[derive(Debug, Default)]
pub(crate) struct IrqShared {
    routes: Mutex<Routes>,
    bus: std::sync::RwLock<Option<Arc<ApicBusEnd>>>,
    lints: Mutex<Vec<(u32, Lint)>>,
    /// Level-triggered vectors waiting for their EOI.
    pub(crate) eoi_watch: crate::eoi_watch::EoiWatch,
}

impl IrqShared {
    pub(crate) fn register(&self, id: u32, lint: Lint) {
        self.lints.lock().unwrap_or_else(|p| p.into_inner()).push((id, lint));
    }

    fn lint(&self, id: u32) -> Option<Lint> {
        self.lints.lock().unwrap_or_else(|p| p.into_inner()).iter().find(|(i, _)| *i == id).map(|(_, l)| l.clone())
    }

    /// Kicks every halted vCPU to look whether KVM holds an EOI back from
    /// it (see `eoi_watch`).
    pub(crate) fn poke_all(&self) {
        for (_, lint) in self.lints.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            lint.kick.poke_if_halted();
        }
    }

    /// Sends an EOI to the APIC bus; false if no bus is attached.
    pub(crate) fn eoi(&self, vector: u8) -> bool {
        self.eoi_watch.ended(vector);
        match &*self.bus.read().unwrap_or_else(|p| p.into_inner()) {
            Some(bus) => {
                bus.eoi(vector);
                true
            }
            None => false,
        }
    }
}

/// Clears the APIC (leaf 1 EDX bit 9) and x2APIC (leaf 1 ECX bit 21) bits.
pub(crate) fn mask_apic(cpuid: &mut crate::Cpuid) {
    for e in cpuid.as_mut_slice().iter_mut().filter(|e| e.function == 1) {
        e.edx &= !(1 << 9);
        e.ecx &= !(1 << 21);
    }
}

const MSR_IA32_APICBASE: u32 = 0x1b;

impl crate::Vcpu {
    /// A handle that raises this vCPU's LINT0 (ExtINT) and LINT1 (NMI) from
    /// any thread.
    pub fn lint(&self) -> Lint {
        Lint { state: self.lint.clone(), kick: self.kick.clone() }
    }

    /// Disables the local APIC (APIC base MSR without its enable bit).
    pub(crate) fn hide_lapic(&self) -> Result<(), crate::VcpuError> {
        let base = 0xfee0_0000u64 | if self.id() == 0 { 1 << 8 } else { 0 };
        self.set_msrs(&[(MSR_IA32_APICBASE, base)])?;
        Ok(())
    }

    /// Injects pending LINT1/LINT0 requests; returns whether an interrupt
    /// window is needed for a held ExtINT.
    pub(crate) fn deliver_lints(&self, run: &crate::RunState) -> Result<bool, crate::VcpuError> {
        if !self.lint.any.load(Ordering::SeqCst) {
            return Ok(false);
        }
        if self.lint.nmi.swap(false, Ordering::SeqCst) {
            self.fd.nmi().map_err(|source| self.err("KVM_NMI", source))?;
        }
        let mut queue = self.lint.extint.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&vector) = queue.front() {
            if run.ready_for_interrupt_injection() {
                crate::sys::irq::interrupt(&self.fd, vector)
                    .map_err(|source| crate::VcpuError::Run { id: self.id(), source })?;
                queue.pop_front();
            }
        }
        let want = !queue.is_empty();
        self.lint.any.store(want, Ordering::SeqCst);
        Ok(want)
    }
}

impl crate::Vm {
    fn need_irqchip(&self, what: &'static str) -> Result<(), IrqError> {
        if self.config().split_irqchip {
            Ok(())
        } else {
            Err(IrqError::NeedsIrqchip(what))
        }
    }

    /// Delivers an MSI to the local APICs now (`KVM_SIGNAL_MSI`).
    pub fn signal_msi(&self, msi: MsiMessage) -> Result<(), IrqError> {
        self.need_irqchip("an MSI")?;
        self.fd.signal_msi(msi.to_kvm()).map_err(|source| IrqError::Kvm { op: "KVM_SIGNAL_MSI", source })?;
        Ok(())
    }

    /// Routes `gsi` (>= [`FIRST_USER_GSI`]) to `msi`, or removes the route.
    pub fn set_msi_route(&self, gsi: u32, msi: Option<MsiMessage>) -> Result<(), IrqError> {
        self.need_irqchip("an MSI route")?;
        if gsi < FIRST_USER_GSI || FAST_PATH_GSIS.contains(&gsi) {
            return Err(IrqError::ReservedGsi(gsi));
        }
        let mut routes = self.irq.routes.lock().unwrap_or_else(|p| p.into_inner());
        routes.set(gsi, msi);
        self.fd.set_gsi_routing(&routes.to_kvm()?).map_err(|source| IrqError::Kvm { op: "KVM_SET_GSI_ROUTING", source })
    }

    /// A write to `eventfd` raises `gsi` with no exit to user space (irqfd).
    pub fn irqfd(&self, gsi: u32, eventfd: &vmm_sys_util::eventfd::EventFd) -> Result<(), IrqError> {
        self.need_irqchip("irqfd")?;
        self.fd.register_irqfd(eventfd, gsi).map_err(|source| IrqError::Kvm { op: "KVM_IRQFD", source })
    }

    /// Removes an irqfd.
    pub fn remove_irqfd(&self, gsi: u32, eventfd: &vmm_sys_util::eventfd::EventFd) -> Result<(), IrqError> {
        self.fd.unregister_irqfd(eventfd, gsi).map_err(|source| IrqError::Kvm { op: "KVM_IRQFD(deassign)", source })
    }

    /// A guest write to `addr` (any size, any value) signals `eventfd` in the
    /// kernel, with no exit to user space (ioeventfd).
    pub fn ioeventfd(
        &self,
        space: crate::IoSpace,
        addr: u64,
        datamatch: Option<u32>,
        eventfd: &vmm_sys_util::eventfd::EventFd,
    ) -> Result<(), IrqError> {
        self.ioevent(true, space, addr, datamatch, eventfd)
    }

    /// Undoes [`ioeventfd`](Self::ioeventfd) with the same arguments:
    /// writes to `addr` exit to user space again (or reach whatever is
    /// attached there). For a register that moves, as a PCI BAR does.
    pub fn remove_ioeventfd(
        &self,
        space: crate::IoSpace,
        addr: u64,
        datamatch: Option<u32>,
        eventfd: &vmm_sys_util::eventfd::EventFd,
    ) -> Result<(), IrqError> {
        self.ioevent(false, space, addr, datamatch, eventfd)
    }

    /// `KVM_IOEVENTFD`, assigning or deassigning.
    fn ioevent(
        &self,
        assign: bool,
        space: crate::IoSpace,
        addr: u64,
        datamatch: Option<u32>,
        eventfd: &vmm_sys_util::eventfd::EventFd,
    ) -> Result<(), IrqError> {
        let addr = match space {
            crate::IoSpace::Mmio => kvm_ioctls::IoEventAddress::Mmio(addr),
            crate::IoSpace::Pio => kvm_ioctls::IoEventAddress::Pio(addr),
        };
        let fd = &self.fd;
        let r = match (assign, datamatch) {
            (true, Some(value)) => fd.register_ioevent(eventfd, &addr, value),
            (true, None) => fd.register_ioevent(eventfd, &addr, kvm_ioctls::NoDatamatch),
            (false, Some(value)) => fd.unregister_ioevent(eventfd, &addr, value),
            (false, None) => fd.unregister_ioevent(eventfd, &addr, kvm_ioctls::NoDatamatch),
        };
        let op = if assign { "KVM_IOEVENTFD" } else { "KVM_IOEVENTFD(deassign)" };
        r.map_err(|source| IrqError::Kvm { op, source })
    }

    /// Connects the local APICs to an IOAPIC/PIC model at the other end of
    /// `socket` (APIC-bus protocol, `docs/wire-format.md`): interrupt
    /// messages from it are delivered to the vCPUs, EOIs of level-triggered
    /// vectors are sent back. A thread serves the socket; if the peer dies or
    /// sends garbage, the bus is dropped and [`apic_bus_failure`](Self::apic_bus_failure)
    /// says why. A peer that speaks version 2 gets a fast path for each
    /// asserted edge-triggered fixed or lowest-priority message it sends
    /// (an eventfd that delivers that message with no thread of this
    /// process in between; [`FAST_PATH_GSIS`], [`apic_bus_stats`](Self::apic_bus_stats)),
    /// taken down when the bus ends.
    pub fn attach_apic_bus(&self, socket: UnixStream) -> Result<(), IrqError> {
        self.attach_apic_bus_with(socket, ApicBusOptions::default())
    }

    /// [`attach_apic_bus`](Self::attach_apic_bus) with `options`: without
    /// fast paths the bus speaks version 1 only, and every message comes
    /// over the socket in the order it was sent (a fast path's message can
    /// overtake messages still in the socket).
    pub fn attach_apic_bus_with(&self, socket: UnixStream, options: ApicBusOptions) -> Result<(), IrqError> {
        use nkvm_wire::handshake::VersionRange;
        self.need_irqchip("an APIC bus")?;
        let mut bus = self.irq.bus.write().unwrap_or_else(|p| p.into_inner());
        if bus.as_ref().is_some_and(|b| b.alive.load(Ordering::SeqCst)) {
            return Err(IrqError::BusAttached);
        }
        let mut reader = socket.try_clone().map_err(IrqError::Socket)?;
        let mut writer = socket;
        let versions = if options.fast_paths { VersionRange::APIC_BUS } else { VersionRange::CURRENT };
        let handshake =
            nkvm_wire::apic::vm_handshake(&mut reader, &mut writer, 1, versions).map_err(IrqError::Handshake)?;
        drop(writer);
        // After each message, poll briefly before blocking: interrupts come
        // in bursts, and a wake-up costs ~40 us on a nested host.
        let (mut reader, writer) = nkvm_wire::spin::SpinStream::pair(reader, std::time::Duration::from_micros(50))
            .map_err(IrqError::Socket)?;
        let end = Arc::new(ApicBusEnd::new(EoiPath::Socket(Mutex::new(writer))));
        *bus = Some(end.clone());
        let (fd, irq) = (self.fd.clone(), self.irq.clone());
        std::thread::Builder::new()
            .name("nkvm-apic-bus".into())
            .spawn(move || serve_bus(&mut reader, &fd, &irq, &end, handshake.version))
            .map_err(IrqError::Socket)?;
        Ok(())
    }

    /// Connects the local APICs to an IOAPIC or PIC model in this process,
    /// with no socket and no thread between them (the direct path of the
    /// APIC bus): the model sends its interrupt messages through the
    /// returned [`ApicBus`], and `eoi` receives the EOIs of level-triggered
    /// vectors on the vCPU thread that saw them. The bus stays for the
    /// VM's lifetime.
    ///
    /// ```no_run
    /// # fn f(vm: &nkvm::Vm) -> Result<(), nkvm::irq::IrqError> {
    /// use nkvm_wire::apic::{DeliveryMode, DestinationMode, InterruptMessage, TriggerMode};
    /// let bus = vm.attach_apic_bus_in_process(Box::new(|vector: u8| println!("EOI {vector:#x}")))?;
    /// bus.send(&InterruptMessage {
    ///     destination: 0,
    ///     destination_mode: DestinationMode::Physical,
    ///     delivery_mode: DeliveryMode::Fixed,
    ///     vector: 0x40,
    ///     trigger_mode: TriggerMode::Edge,
    ///     level: true,
    /// })?;
    /// # Ok(()) }
    /// ```
    pub fn attach_apic_bus_in_process(&self, eoi: Box<dyn EoiHandler>) -> Result<ApicBus, IrqError> {
        self.need_irqchip("an APIC bus")?;
        let mut bus = self.irq.bus.write().unwrap_or_else(|p| p.into_inner());
        if bus.as_ref().is_some_and(|b| b.alive.load(Ordering::SeqCst)) {
            return Err(IrqError::BusAttached);
        }
        *bus = Some(Arc::new(ApicBusEnd::new(EoiPath::Direct(Mutex::new(eoi)))));
        Ok(ApicBus { fd: self.fd.clone(), irq: self.irq.clone() })
    }

    /// What the APIC bus attached with [`attach_apic_bus`](Self::attach_apic_bus)
    /// has carried (`None` without one, or with one in this process).
    pub fn apic_bus_stats(&self) -> Option<ApicBusStats> {
        let bus = self.irq.bus.read().unwrap_or_else(|p| p.into_inner());
        let end = bus.as_ref().filter(|b| matches!(b.eoi, EoiPath::Socket(_)))?;
        Some(ApicBusStats {
            messages: end.messages.load(Ordering::Relaxed),
            fast_paths: end.fast_paths.load(Ordering::Relaxed),
        })
    }

    /// Why the APIC bus was dropped, if it was.
    pub fn apic_bus_failure(&self) -> Option<String> {
        let bus = self.irq.bus.read().unwrap_or_else(|p| p.into_inner());
        bus.as_ref().and_then(|b| b.failure.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// The APIC-bus thread: interrupt messages in, delivered to the vCPUs; with
/// a version-2 peer, each deliverable edge message is also offered a fast
/// path. When the bus ends, its fast paths go with it.
fn serve_bus(
    reader: &mut nkvm_wire::spin::SpinStream,
    fd: &kvm_ioctls::VmFd,
    irq: &Arc<IrqShared>,
    end: &ApicBusEnd,
    version: u16,
) {
    use nkvm_wire::apic::{read_frame, ApicFrame};
    let mut fast = fast_path::FastPaths::default();
    loop {
        let message = match read_frame(reader) {
            Ok(Some(ApicFrame::Interrupt(m))) => m,
            Ok(Some(other)) => {
                end.fail(format!("unexpected {other:?} from the APIC-bus peer"));
                break;
            }
            Ok(None) => {
                end.fail("the APIC-bus peer closed the connection".into());
                break;
            }
            // A peer that closes with EOIs unread resets the connection.
            Err(nkvm_wire::WireError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                end.fail("the APIC-bus peer closed the connection (reset)".into());
                break;
            }
            Err(e) => {
                end.fail(format!("malformed APIC-bus message: {e}"));
                break;
            }
        };
        end.messages.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = deliver(fd, irq, &message) {
            log::warn!("APIC bus: cannot deliver {message:?}: {e}");
        }
        if version >= 2 && fast.offer(&message, fd, irq, end) {
            end.fast_paths.fetch_add(1, Ordering::Relaxed);
        }
    }
    fast.close(fd, irq);
}

fn deliver(fd: &kvm_ioctls::VmFd, irq: &Arc<IrqShared>, m: &InterruptMessage) -> Result<(), IrqError> {
    match m.delivery_mode {
        DeliveryMode::ExtInt => {
            if let Some(lint) = irq.lint(m.destination) {
                lint.raise_lint0(m.vector);
            }
            return Ok(());
        }
        DeliveryMode::Nmi if m.destination_mode == DestinationMode::Physical => {
            if let Some(lint) = irq.lint(m.destination) {
                lint.nmi();
                return Ok(());
            }
        }
        _ => {}
    }
    if m.trigger_mode == TriggerMode::Level && !m.level {
        return Ok(()); // a deassert: nothing travels on a real APIC bus
    }
    let msi = MsiMessage::from_interrupt(m);
    if m.trigger_mode == TriggerMode::Level {
        // KVM reports EOIs only for vectors an IOAPIC-range route carries.
        let mut routes = irq.routes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, true)) = routes.level_slot(msi) {
            fd.set_gsi_routing(&routes.to_kvm()?)
                .map_err(|source| IrqError::Kvm { op: "KVM_SET_GSI_ROUTING", source })?;
        }
        drop(routes);
        irq.eoi_watch.sent(irq, m.vector);
    }
    fd.signal_msi(msi.to_kvm()).map_err(|source| IrqError::Kvm { op: "KVM_SIGNAL_MSI", source })?;
    Ok(())
}
