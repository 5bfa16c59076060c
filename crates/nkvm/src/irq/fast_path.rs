//! The APIC bus's fast paths (APIC-bus protocol version 2,
//! `docs/wire-format.md`).
//!
//! An interrupt message on the bus socket wakes the VMM's bus thread, which
//! then calls `KVM_SIGNAL_MSI`: on a nested host that wake-up costs more
//! than the delivery itself. So the first time a peer sends an
//! edge-triggered fixed or lowest-priority message, the bus thread gives it
//! an eventfd that KVM turns into exactly that message (an MSI route on a
//! GSI of [`FAST_PATH_GSIS`] and an irqfd), and sends it to the peer with a
//! fast-path frame. The peer then delivers that message by writing the
//! eventfd: no thread of the VMM runs.
//!
//! A route is keyed by the whole message, so it never goes stale: a
//! redirection entry that changes makes a different message, which comes
//! over the socket and gets its own fast path. Level-triggered messages
//! keep the socket (their EOIs need the bus), as do ExtINT, NMI, SMI and
//! INIT. When the bus ends, every irqfd is taken down, so a dead or
//! misbehaving peer injects nothing more.

use std::collections::HashMap;
use std::os::fd::AsRawFd;

use nkvm_wire::apic::{DeliveryMode, InterruptMessage, TriggerMode};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ApicBusEnd, IrqShared, MsiMessage};

/// The GSIs the APIC bus keeps for its fast paths (the last 32 of KVM's
/// 4096 routes): at most 32 distinct messages get one, the rest keep the
/// socket. [`Vm::set_msi_route`](crate::Vm::set_msi_route) refuses them.
pub const FAST_PATH_GSIS: std::ops::Range<u32> = 4064..4096;

/// The fast paths a bus has handed out: message, its GSI and eventfd.
#[derive(Default)]
pub(super) struct FastPaths {
    offers: HashMap<InterruptMessage, (u32, EventFd)>,
}

/// Whether `m` may have a fast path: an asserted edge, fixed or lowest
/// priority (what an MSI route can carry with no EOI to watch).
fn eligible(m: &InterruptMessage) -> bool {
    m.trigger_mode == TriggerMode::Edge
        && m.level
        && matches!(m.delivery_mode, DeliveryMode::Fixed | DeliveryMode::LowestPriority)
}

impl FastPaths {
    /// Gives `m` a fast path if it may have one, has none yet and a GSI is
    /// free: its route, an irqfd on a new eventfd, and the offer with the
    /// eventfd on the bus socket. Returns whether it did. A failure is
    /// logged and undone; `m` keeps the socket path.
    pub(super) fn offer(
        &mut self,
        m: &InterruptMessage,
        fd: &kvm_ioctls::VmFd,
        irq: &IrqShared,
        end: &ApicBusEnd,
    ) -> bool {
        if !eligible(m) || self.offers.contains_key(m) {
            return false;
        }
        // Chosen VM-wide, not among this bus's own offers: a bus that
        // replaces a failed one must not take a GSI whose route the old
        // bus's thread, still ending, will remove.
        let gsi = {
            let mut routes = irq.routes.lock().unwrap_or_else(|p| p.into_inner());
            match routes.claim_fast_path(MsiMessage::from_interrupt(m)) {
                Some(gsi) => gsi,
                None => return false,
            }
        };
        match self.open(m, gsi, fd, irq, end) {
            Ok(evt) => {
                self.offers.insert(*m, (gsi, evt));
                true
            }
            Err(why) => {
                log::warn!("APIC bus: no fast path for {m:?}: {why}");
                false
            }
        }
    }

    fn open(
        &self,
        m: &InterruptMessage,
        gsi: u32,
        fd: &kvm_ioctls::VmFd,
        irq: &IrqShared,
        end: &ApicBusEnd,
    ) -> Result<EventFd, String> {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| {
            let _ = set_route(fd, irq, gsi, None);
            format!("eventfd: {e}")
        })?;
        // The route is in the table (claimed): KVM gets it now.
        if let Err(e) = set_route(fd, irq, gsi, Some(MsiMessage::from_interrupt(m))) {
            let _ = set_route(fd, irq, gsi, None);
            return Err(e);
        }
        if let Err(e) = fd.register_irqfd(&evt, gsi) {
            let _ = set_route(fd, irq, gsi, None);
            return Err(format!("KVM_IRQFD: {e}"));
        }
        if let Err(e) = end.send_with_fd(&m.encode_fast_path(), evt.as_raw_fd()) {
            let _ = fd.unregister_irqfd(&evt, gsi);
            let _ = set_route(fd, irq, gsi, None);
            return Err(format!("sending the offer: {e}"));
        }
        Ok(evt)
    }

    /// Takes every fast path down: irqfds unregistered, routes removed.
    pub(super) fn close(&mut self, fd: &kvm_ioctls::VmFd, irq: &IrqShared) {
        for (m, (gsi, evt)) in self.offers.drain() {
            if let Err(e) = fd.unregister_irqfd(&evt, gsi) {
                log::warn!("APIC bus: cannot take the fast path of {m:?} down: {e}");
            }
            let _ = set_route(fd, irq, gsi, None);
        }
    }
}

/// Sets or removes the route of `gsi` in the VM's routing table.
fn set_route(fd: &kvm_ioctls::VmFd, irq: &IrqShared, gsi: u32, msi: Option<MsiMessage>) -> Result<(), String> {
    let mut routes = irq.routes.lock().unwrap_or_else(|p| p.into_inner());
    routes.set(gsi, msi);
    let table = routes.to_kvm().map_err(|e| e.to_string())?;
    fd.set_gsi_routing(&table).map_err(|e| format!("KVM_SET_GSI_ROUTING: {e}"))
}
