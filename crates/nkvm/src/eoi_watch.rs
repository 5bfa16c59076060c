//! EOIs of level-triggered interrupts that KVM holds back on a halted vCPU.
//!
//! With a split irqchip, KVM reports the EOI of a level-triggered IOAPIC
//! vector as an exit to user space (`KVM_EXIT_IOAPIC_EOI`), from a request it
//! handles the next time it enters the guest. On a host that runs CPL-0 guest
//! code in KVM's instruction emulator (`kvm_pvm`), the emulator carries on
//! past the guest's EOI without entering anew, so the request waits for the
//! guest's next exit. If the guest's next act is `hlt`, the vCPU sleeps with
//! the EOI still held: the IOAPIC never learns it, never re-delivers a line
//! still asserted, and the guest halts for good (kvm-unit-tests' `ioapic`,
//! "retriggered level interrupts").
//!
//! nkvm therefore watches the level-triggered vectors it delivered: one
//! whose EOI has not come back within [`STALE`] gets every vCPU poked. A
//! poked vCPU that KVM reports halted, whose local APIC holds such a vector
//! neither requested (IRR) nor in service (ISR) — so its EOI was made and
//! is held — is made runnable and entered once
//! with its kick signal already pending: KVM handles the held requests (the
//! EOI exits to user space and goes to the IOAPIC model) and returns before
//! running a guest instruction; the vCPU is then put back to `HALTED`
//! unless KVM took an interrupt from the local APIC meanwhile, so the guest
//! sees its `hlt` end only by an interrupt. (When the signal cancels the
//! entry, this host re-queues the last interrupt it ever injected; that
//! stale event is dropped, recognised by the in-service register being
//! unchanged.) Nothing of this touches an entry that no one
//! poked: the cost is one lock per level-triggered delivery and per EOI.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_mp_state, KVM_MP_STATE_HALTED, KVM_MP_STATE_RUNNABLE};

use crate::irq::{IrqShared, MsiMessage};
use crate::sys::run::Completion;
use crate::{Exit, Vcpu, VcpuError};

/// How long a level-triggered vector may wait for its EOI before the vCPUs
/// are poked (and again after each poke while it still waits).
pub(crate) const STALE: Duration = Duration::from_millis(10);

/// Where a local APIC's in-service, trigger-mode and request registers
/// start: eight 32-bit words, 16 bytes apart.
const ISR: usize = 0x100;
const TMR: usize = 0x180;
const IRR: usize = 0x200;

/// The 256 bits of the local APIC register at `base` in `regs`
/// (`kvm_lapic_state`).
fn vector_bits(regs: &[u8; 1024], base: usize) -> [u32; 8] {
    std::array::from_fn(|i| u32::from_le_bytes(std::array::from_fn(|b| regs[base + 0x10 * i + b])))
}

/// Whether `vector`'s bit is set in a register [`vector_bits`] read.
fn has(regs: &[u32; 8], vector: u8) -> bool {
    regs[usize::from(vector / 32)] & (1 << (vector % 32)) != 0
}

/// How long the watching thread sleeps when nothing is outstanding before it
/// looks whether its VM is gone.
const IDLE: Duration = Duration::from_millis(200);

/// The level-triggered vectors delivered and not yet EOIed, and when each
/// was last delivered (or its vCPUs last poked).
#[derive(Debug, Default)]
pub(crate) struct EoiWatch {
    outstanding: Mutex<BTreeMap<u8, Instant>>,
    wake: Condvar,
    started: AtomicBool,
}

impl EoiWatch {
    /// A level-triggered `vector` was delivered; starts the watching thread
    /// on first use.
    pub(crate) fn sent(&self, irq: &Arc<IrqShared>, vector: u8) {
        self.outstanding.lock().unwrap_or_else(|p| p.into_inner()).insert(vector, Instant::now());
        if !self.started.swap(true, Ordering::SeqCst) {
            let irq = Arc::downgrade(irq);
            let spawned = std::thread::Builder::new().name("nkvm-eoi-watch".into()).spawn(move || watch(&irq));
            if let Err(e) = spawned {
                log::warn!("cannot start the EOI watch thread: {e}");
                self.started.store(false, Ordering::SeqCst);
            }
        }
        self.wake.notify_one();
    }

    /// The EOI of `vector` arrived.
    pub(crate) fn ended(&self, vector: u8) {
        self.outstanding.lock().unwrap_or_else(|p| p.into_inner()).remove(&vector);
    }

    /// The vectors waiting for their EOI.
    pub(crate) fn outstanding(&self) -> Vec<u8> {
        self.outstanding.lock().unwrap_or_else(|p| p.into_inner()).keys().copied().collect()
    }

    /// Whether `vector` waits for its EOI.
    pub(crate) fn waiting(&self, vector: u8) -> bool {
        self.outstanding.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&vector)
    }

    /// If a vector has waited [`STALE`], restarts every clock and returns
    /// `None` (poke now); otherwise how long until the oldest is stale, or
    /// [`IDLE`] after a wait when nothing is outstanding.
    fn due(&self) -> Option<Duration> {
        let mut outstanding = self.outstanding.lock().unwrap_or_else(|p| p.into_inner());
        let Some(oldest) = outstanding.values().min().copied() else {
            let _ = self.wake.wait_timeout(outstanding, IDLE);
            return Some(Duration::ZERO);
        };
        let waited = oldest.elapsed();
        if waited < STALE {
            return Some(STALE - waited);
        }
        let now = Instant::now();
        outstanding.values_mut().for_each(|t| *t = now);
        None
    }
}

/// The watching thread: lives as long as the VM's interrupt state.
fn watch(irq: &Weak<IrqShared>) {
    loop {
        let Some(shared) = irq.upgrade() else { return };
        match shared.eoi_watch.due() {
            None => shared.poke_all(),
            Some(wait) => {
                drop(shared);
                std::thread::sleep(wait);
            }
        }
    }
}

impl Vcpu {
    /// After a poke: if KVM has the vCPU halted, lets KVM handle its held
    /// requests without running the guest (see the module docs). Returns an
    /// exit other than the IOAPIC EOI, should the entry produce one.
    #[cold]
    pub(crate) fn unstick_halt(&mut self) -> Result<Option<Exit>, VcpuError> {
        let mp = self.fd.get_mp_state().map_err(|source| self.err("KVM_GET_MP_STATE", source))?;
        if mp.mp_state != KVM_MP_STATE_HALTED {
            return Ok(None);
        }
        let (irr, isr) = self.irr_isr()?;
        let held = self.links.irq.eoi_watch.outstanding().into_iter().any(|v| !has(&irr, v) && !has(&isr, v));
        if !held {
            // Every outstanding vector is still requested or in service:
            // its EOI is not held back, it has not happened yet.
            return Ok(None);
        }
        self.hand_out_held(true, (irr, isr))
    }

    /// Before a save: an EOI KVM holds (see the module docs) lives only in
    /// this KVM and would be lost with it, leaving the restored IOAPIC's
    /// remote IRR set for good. So if a level-triggered vector still waits
    /// for its EOI and an APIC bus takes EOIs, KVM gets one entry, running
    /// no guest instruction, to hand held EOIs out. Returns an exit other
    /// than the EOI, should the entry produce one.
    #[cold]
    pub(crate) fn hand_out_held_eois(&mut self) -> Result<Option<Exit>, VcpuError> {
        if self.links.irq.eoi_watch.outstanding().is_empty() || !self.links.irq.has_bus() {
            return Ok(None);
        }
        let mp = self.fd.get_mp_state().map_err(|source| self.err("KVM_GET_MP_STATE", source))?;
        let before = self.irr_isr()?;
        self.hand_out_held(mp.mp_state == KVM_MP_STATE_HALTED, before)
    }

    /// One entry with the kick signal already pending: KVM handles the
    /// requests it holds (an EOI exits to user space and goes to the IOAPIC
    /// model, or to the caller if no APIC bus takes it) and returns before
    /// running a guest instruction. A `halted` vCPU is made runnable for it
    /// (KVM handles no request of a halted one) and put back unless KVM
    /// took an interrupt from the local APIC. `before` is the local APIC's
    /// (IRR, ISR) before the entry.
    fn hand_out_held(&mut self, halted: bool, before: ([u32; 8], [u32; 8])) -> Result<Option<Exit>, VcpuError> {
        let events_before = self.events()?;
        if halted {
            self.set_mp(KVM_MP_STATE_RUNNABLE)?;
        }
        let inside = self.links.gate.enter(&self.kick);
        let result = crate::sys::kick::run_with_kick_pending(&self.fd, || {
            self.kick.run_area().run(&self.fd, Completion::None, None, false)
        });
        drop(inside);
        let exited = result.and_then(|r| r).map_err(|source| VcpuError::Run { id: self.id(), source })?;
        let other = match exited.then(|| self.kick.run_area().decode(&mut Vec::new())) {
            Some(Exit::IoapicEoi { vector }) if self.links.irq.eoi(vector) => None,
            Some(Exit::Unknown { reason: kvm_bindings::KVM_EXIT_DIRTY_RING_FULL }) => {
                self.links.memory.ring_full(self.id()).map_err(|source| VcpuError::Run { id: self.id(), source })?;
                None
            }
            other => other,
        };
        let mut events = self.events()?;
        if !exited && events.interrupt.injected != 0 && events_before.interrupt.injected == 0 {
            let (irr, isr) = self.irr_isr()?;
            let nr = events.interrupt.nr;
            // The entry was cancelled by the signal and an interrupt is now
            // queued that was not before. Taken from the local APIC, it left
            // the IRR (and went to the ISR where this host keeps it); this
            // host instead re-queues the last interrupt it ever injected,
            // long delivered: not requested before, or requested still.
            // Entering would deliver that one a second time.
            if isr == before.1 && (!has(&before.0, nr) || has(&irr, nr)) {
                events.interrupt.injected = 0;
                self.set_events(&events)?;
            }
        }
        if halted && events.interrupt.injected == 0 {
            self.set_mp(KVM_MP_STATE_HALTED)?;
        }
        Ok(other)
    }

    /// The local APIC's interrupt-request and in-service registers (eight
    /// 32-bit words each).
    fn irr_isr(&self) -> Result<([u32; 8], [u32; 8]), VcpuError> {
        let lapic = self.fd.get_lapic().map_err(|source| self.err("KVM_GET_LAPIC", source))?;
        let regs: [u8; 1024] = lapic.regs.map(|b| b as u8);
        Ok((vector_bits(&regs, IRR), vector_bits(&regs, ISR)))
    }

    /// After a local APIC state was loaded: a level-triggered vector it
    /// holds requested or in service was delivered by an IOAPIC before the
    /// save, maybe in another VM whose routes this one lacks. Its EOI needs
    /// a route again, or it would never reach the IOAPIC, whose remote IRR
    /// would then block that pin for good. Every vector whose last interrupt
    /// was level-triggered (TMR) gets one, not only those requested or in
    /// service: on hosts that run CPL-0 code in KVM's emulator (`kvm_pvm`),
    /// KVM's saved in-service register can be clear while the guest's
    /// handler runs. The vectors requested or in service are also watched.
    pub(crate) fn expect_restored_eois(&self, lapic: &[u8; 1024]) -> Result<(), crate::state::StateError> {
        let (irr, isr, tmr) = (vector_bits(lapic, IRR), vector_bits(lapic, ISR), vector_bits(lapic, TMR));
        for vector in (0..=255u8).filter(|&v| has(&tmr, v)) {
            // To every APIC (0xff), so that every vCPU restored with the
            // vector gets the same route.
            let msi = MsiMessage { address: 0xfee0_0000 | 0xff << 12, data: u32::from(vector) | 1 << 14 | 1 << 15 };
            let watch = has(&irr, vector) || has(&isr, vector);
            self.links
                .irq
                .route_level(&self.links.vm_fd, msi, watch)
                .map_err(|source| crate::state::StateError::EoiRoute { id: self.id(), vector, source })?;
        }
        Ok(())
    }

    fn set_mp(&self, mp_state: u32) -> Result<(), VcpuError> {
        self.fd.set_mp_state(kvm_mp_state { mp_state }).map_err(|source| self.err("KVM_SET_MP_STATE", source))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vector_waits_from_delivery_to_its_eoi() {
        let irq = Arc::new(IrqShared::default());
        irq.eoi_watch.sent(&irq, 0x9a);
        assert!(irq.eoi_watch.waiting(0x9a));
        assert!(!irq.eoi_watch.waiting(0x9b));
        irq.eoi_watch.ended(0x9a);
        assert!(!irq.eoi_watch.waiting(0x9a));
    }

    #[test]
    fn a_stale_vector_is_due_once_then_its_clock_restarts() {
        let watch = EoiWatch::default();
        watch.outstanding.lock().unwrap().insert(0x40, Instant::now() - STALE);
        assert_eq!(watch.due(), None, "waited STALE: poke now");
        let next = watch.due().expect("just poked: not due again at once");
        assert!(next > Duration::ZERO && next <= STALE);
    }

    /// A restored local APIC's level-triggered vectors get EOI routes (what
    /// the guest's handler EOIs in the new VM), and those requested or in
    /// service are watched; on hosts that end service at delivery no guest
    /// can produce this state, so it is written into the saved one.
    #[test]
    fn a_restored_level_vector_gets_its_eoi_route() {
        use crate::{Hypervisor, RunState, Vm, VmConfig};
        let hv = Hypervisor::open().unwrap();
        let vm = Vm::new(&hv, &VmConfig { memory: 4 << 20, split_irqchip: true, ..Default::default() }).unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let mut state = vcpu.save_state(&mut RunState::new()).unwrap();
        let set =
            |regs: &mut [u8; 1024], base: usize, v: usize| regs[base + 0x10 * (v / 32) + (v % 32) / 8] |= 1 << (v % 8);
        set(&mut state.lapic, TMR, 0x61);
        set(&mut state.lapic, ISR, 0x61);
        set(&mut state.lapic, TMR, 0x72); // its EOI came before the save
        set(&mut state.lapic, ISR, 0x83); // edge-triggered
        assert!(vm.irq.level_route_vectors().is_empty());
        vcpu.restore_state(&state).unwrap();
        assert_eq!(vm.irq.level_route_vectors(), [0x61, 0x72]);
        assert!(vm.irq.eoi_watch.waiting(0x61));
        assert!(!vm.irq.eoi_watch.waiting(0x72));
    }
}
