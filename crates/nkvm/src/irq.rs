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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_irq_routing_entry, kvm_irq_routing_msi, kvm_msi, KVM_IRQ_ROUTING_MSI};
use nkvm_wire::apic::{DeliveryMode, DestinationMode, InterruptMessage, TriggerMode};

use crate::kick::KickShared;

mod bus;
mod fast_path;

pub(crate) use bus::ApicBusEnd;
pub use bus::{ApicBus, ApicBusOptions, ApicBusStats, EoiHandler};
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

    /// A GSI below [`FIRST_USER_GSI`] routing `msi`, allocating one if
    /// needed; when all are taken, the slot of a vector that waits for no
    /// EOI (`waiting` says which do) is reused, so a guest that moves its
    /// level-triggered interrupts between vectors over its uptime keeps
    /// getting their EOIs. `None` only while every slot's vector waits.
    pub(crate) fn level_slot(&mut self, msi: MsiMessage, waiting: impl Fn(u8) -> bool) -> Option<(u32, bool)> {
        if let Some((&gsi, _)) = self.table.range(..FIRST_USER_GSI).find(|(_, m)| m.vector() == msi.vector()) {
            let changed = self.table[&gsi] != msi;
            self.table.insert(gsi, msi);
            return Some((gsi, changed));
        }
        let free = (0..FIRST_USER_GSI)
            .find(|g| !self.table.contains_key(g))
            .or_else(|| self.table.range(..FIRST_USER_GSI).find(|(_, m)| !waiting(m.vector())).map(|(&g, _)| g))?;
        self.table.insert(free, msi);
        Some((free, true))
    }

    /// A fast-path GSI no bus holds (a route in the table means one does,
    /// the bus being replaced included, until its thread takes its fast
    /// paths down), now routing `msi`.
    pub(crate) fn claim_fast_path(&mut self, msi: MsiMessage) -> Option<u32> {
        let gsi = FAST_PATH_GSIS.clone().find(|g| !self.table.contains_key(g))?;
        self.table.insert(gsi, msi);
        Some(gsi)
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
    /// The front ExtINT vector was given to KVM (`KVM_INTERRUPT`) for an
    /// entry a kick then cut short: KVM holds it (where no saved state
    /// shows it), so it stays queued, for a save to see, until an entry
    /// that is not cut short takes it. Changed under `extint`'s lock.
    pub(crate) held: AtomicBool,
}

/// Drives a vCPU's LINT0 and LINT1 from any thread.
#[derive(Debug, Clone)]
pub struct Lint {
    pub(crate) state: Arc<LintState>,
    pub(crate) kick: Arc<KickShared>,
}

impl Lint {
    /// Raises LINT0 with an ExtINT `vector` (what an 8259 would supply):
    /// delivered as soon as the guest can take an interrupt. A vector
    /// already waiting is not queued again, as an 8259 holds one request
    /// bit per line: however often a peer raises while the guest keeps
    /// interrupts off, at most 256 wait (and a saved state stays loadable).
    pub fn raise_lint0(&self, vector: u8) {
        let mut waiting = self.state.extint.lock().unwrap_or_else(|p| p.into_inner());
        if !waiting.contains(&vector) {
            waiting.push_back(vector);
        }
        drop(waiting);
        self.kick.set_lints_pending();
        self.kick.kick();
    }

    /// Raises LINT1: a non-maskable interrupt.
    pub fn nmi(&self) {
        self.state.nmi.store(true, Ordering::SeqCst);
        self.kick.set_lints_pending();
        self.kick.kick();
    }
}

/// Held by a VM and each of its vCPUs, not by the APIC-bus thread: when
/// the last of them goes, the bus ends with it (its thread holds the VM's
/// file, and would keep it, with the KVM VM, for as long as a peer kept its
/// socket open).
#[derive(Debug)]
pub(crate) struct BusCloser(pub(crate) Arc<IrqShared>);

impl Drop for BusCloser {
    fn drop(&mut self) {
        self.0.close_bus();
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

    /// Ends the APIC bus, if any (the VM is going).
    fn close_bus(&self) {
        if let Some(end) = self.bus.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            end.close();
        }
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

    /// A level-triggered `msi` is (or was) delivered: gives its vector an
    /// IOAPIC-range route, so that KVM reports its EOI (KVM reports EOIs only
    /// for vectors such a route carries), and, if `watch`, watches for that
    /// EOI.
    pub(crate) fn route_level(
        self: &Arc<Self>,
        fd: &kvm_ioctls::VmFd,
        msi: MsiMessage,
        watch: bool,
    ) -> Result<(), IrqError> {
        // Asked only when every route is taken (the EOI watch's lock is
        // never held while it takes the routes').
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        match routes.level_slot(msi, |v| self.eoi_watch.waiting(v)) {
            Some((_, true)) => fd
                .set_gsi_routing(&routes.to_kvm()?)
                .map_err(|source| IrqError::Kvm { op: "KVM_SET_GSI_ROUTING", source })?,
            Some((_, false)) => {}
            None => log::warn!(
                "level-triggered vector {:#x} delivered with no EOI route: all {FIRST_USER_GSI} are taken by vectors \
                 waiting for their EOI, so its EOI will not be reported",
                msi.vector()
            ),
        }
        drop(routes);
        if watch {
            self.eoi_watch.sent(self, msi.vector());
        }
        Ok(())
    }

    /// The vectors of the level-triggered IOAPIC-range routes.
    #[cfg(test)]
    pub(crate) fn level_route_vectors(&self) -> Vec<u8> {
        let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        routes.table.range(..FIRST_USER_GSI).filter(|(_, m)| m.data & 1 << 15 != 0).map(|(_, m)| m.vector()).collect()
    }

    /// Whether an APIC bus is attached (it takes the EOIs KVM reports).
    pub(crate) fn has_bus(&self) -> bool {
        self.bus.read().unwrap_or_else(|p| p.into_inner()).is_some()
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
    #[inline(always)]
    pub(crate) fn deliver_lints(&self, run: &crate::RunState) -> Result<bool, crate::VcpuError> {
        if !self.kick.lints_pending() {
            return Ok(false);
        }
        self.deliver_pending_lints(run)
    }

    #[cold]
    fn deliver_pending_lints(&self, run: &crate::RunState) -> Result<bool, crate::VcpuError> {
        // Cleared first: a LINT raised after this sets it again (it stores
        // the flag after its request), one raised before is seen below.
        self.kick.clear_lints_pending();
        if self.lint.nmi.swap(false, Ordering::SeqCst) {
            self.fd.nmi().map_err(|source| self.err("KVM_NMI", source))?;
        }
        let mut queue = self.lint.extint.lock().unwrap_or_else(|p| p.into_inner());
        // An entry a kick will cut short injects nothing: KVM would hold the
        // vector where a save of this vCPU cannot see it.
        let cut_short = || self.kick.run_area().immediate_exit_requested();
        let held = self.lint.held.load(Ordering::SeqCst);
        if held {
            // KVM has it from a cut-short entry; this entry delivers it.
            if !cut_short() {
                queue.pop_front();
                self.lint.held.store(false, Ordering::SeqCst);
            }
        } else if let Some(&vector) = queue.front() {
            if run.ready_for_interrupt_injection() && !cut_short() {
                crate::sys::irq::interrupt(&self.fd, vector)
                    .map_err(|source| crate::VcpuError::Run { id: self.id(), source })?;
                if cut_short() {
                    // A kick came in between: KVM holds it now.
                    self.lint.held.store(true, Ordering::SeqCst);
                } else {
                    queue.pop_front();
                }
            }
        }
        let still_held = self.lint.held.load(Ordering::SeqCst);
        let want = queue.len() > usize::from(still_held);
        if want || still_held {
            self.kick.set_lints_pending();
        }
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn level(vector: u8) -> MsiMessage {
        MsiMessage { address: 0xfee0_0000, data: u32::from(vector) | 1 << 15 }
    }

    #[test]
    fn level_slots_are_reused_from_vectors_that_wait_for_no_eoi() {
        let mut routes = Routes::default();
        for (gsi, vector) in (0..FIRST_USER_GSI).zip(0x30u8..) {
            assert_eq!(routes.level_slot(level(vector), |_| true), Some((gsi, true)));
        }
        // Every slot's vector waits for its EOI: no route for a 25th.
        assert_eq!(routes.level_slot(level(0x60), |_| true), None);
        // Once 0x35's EOI has come, its slot carries the new vector.
        assert_eq!(routes.level_slot(level(0x60), |v| v != 0x35), Some((5, true)));
        assert!(routes.table.values().all(|m| m.vector() != 0x35));
        // A vector with a slot keeps it, changed only if its message is.
        assert_eq!(routes.level_slot(level(0x31), |_| true), Some((1, false)));
        let elsewhere = MsiMessage { address: 0xfee0_1000, ..level(0x31) };
        assert_eq!(routes.level_slot(elsewhere, |_| true), Some((1, true)));
    }
}
