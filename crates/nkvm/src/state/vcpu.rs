//! [`VcpuState`]: everything KVM holds for one vCPU, and
//! [`Vcpu::save_state`] / [`Vcpu::restore_state`].

use kvm_bindings::{kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_xcrs, kvm_xsave, KVM_MAX_XCRS};

use super::codec::{FormatError, Sections, StateKind, Writer};
use super::fields::*;
use super::StateError;
use crate::vcpu::{Fpu, Regs, Sregs, VcpuEvents};
use crate::{Cpuid, Exit, RunState, Vcpu};

/// 32-bit words in KVM's XSAVE image (`struct kvm_xsave`, 4 KiB).
pub const XSAVE_WORDS: usize = 1024;
/// Bytes of the local APIC's register page (`struct kvm_lapic_state`).
pub const LAPIC_BYTES: usize = 1024;
/// At most this many CPUID entries in a state.
const MAX_CPUID: u32 = 256;
/// At most this many MSRs in a state.
const MAX_MSRS: u32 = 4096;

/// An MSR's index and value.
pub type Msr = (u32, u64);

/// Everything KVM holds for one vCPU, as a plain value.
///
/// Read with [`Vcpu::save_state`], written back with
/// [`Vcpu::restore_state`], turned into bytes with [`encode`](Self::encode)
/// and back with [`decode`](Self::decode) (`docs/state-format.md`).
#[derive(Debug, Clone, PartialEq)]
pub struct VcpuState {
    /// The vCPU's id (its APIC id); restored only into the vCPU of the same id.
    pub id: u32,
    /// The CPUID the guest sees (`KVM_GET_CPUID2`), set first on restore:
    /// which MSRs and XCR0 bits KVM accepts depends on it.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: Regs,
    /// Segment, descriptor-table and control registers, EFER, APIC base.
    pub sregs: Sregs,
    /// x87/SSE state as `KVM_GET_FPU` reports it (the XSAVE image is authoritative).
    pub fpu: Fpu,
    /// The XSAVE image (`KVM_GET_XSAVE`): x87, SSE, AVX, ... with its header.
    pub xsave: Box<[u32; XSAVE_WORDS]>,
    /// Extended control registers as (index, value): XCR0.
    pub xcrs: Vec<(u32, u64)>,
    /// The saveable MSRs KVM could read, as (index, value), in KVM's order.
    pub msrs: Vec<Msr>,
    /// MSRs KVM lists as saveable whose read failed on this vCPU (not
    /// restored; kept so a tool can say what was left out).
    pub unreadable_msrs: Vec<u32>,
    /// The local APIC's register page (`KVM_GET_LAPIC`); zero without one.
    pub lapic: Box<[u8; LAPIC_BYTES]>,
    /// Pending and injected exceptions, interrupts, NMIs, SMIs.
    pub events: VcpuEvents,
    /// `KVM_MP_STATE_*`: runnable, halted, waiting for INIT/SIPI, ...
    pub mp_state: u32,
    /// DR0–DR3, DR6, DR7.
    pub debug_regs: kvm_debugregs,
    /// LINT0/LINT1 requests raised through [`Lint`](crate::irq::Lint) that
    /// the guest had not taken yet (an 8259's vector waits for IF=1): on
    /// restore they wait again, so an interrupt an 8259 already
    /// acknowledged is not lost with its in-service bit left set.
    pub pending_lint: PendingLint,
    /// The guest's TSC frequency in kHz (`KVM_GET_TSC_KHZ`; `None` where
    /// KVM cannot say). A restore on a host whose TSC runs at another rate
    /// sets it (`KVM_SET_TSC_KHZ`, which needs TSC scaling), so that the
    /// guest's clock keeps its rate after a migration.
    pub tsc_khz: Option<u32>,
}

/// LINT requests raised but not yet delivered, as saved in a [`VcpuState`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PendingLint {
    /// ExtINT vectors queued on LINT0, oldest first.
    pub extint: Vec<u8>,
    /// An NMI raised on LINT1.
    pub nmi: bool,
}

impl PendingLint {
    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.extint.is_empty() && !self.nmi
    }
}

impl Vcpu {
    /// Saves everything KVM holds for this vCPU.
    ///
    /// First completes the exit the vCPU last returned (the `out` just
    /// reported, the read completed in `run`, ...) with one `KVM_RUN` that
    /// returns before the guest executes anything: KVM finishes an I/O
    /// instruction only at the next entry, so a state read right after an
    /// I/O exit would replay the instruction when restored. A read the
    /// caller did not complete is an error.
    ///
    /// MSRs: every MSR in KVM's saveable list
    /// ([`Hypervisor::saveable_msrs`](crate::Hypervisor::saveable_msrs))
    /// that reads back; the others are listed in
    /// [`VcpuState::unreadable_msrs`].
    pub fn save_state(&mut self, run: &mut RunState) -> Result<VcpuState, StateError> {
        self.settle(run)?;
        if self.has_lapic() {
            if let Some(exit) = self.hand_out_held_eois()? {
                return Err(StateError::NotSettled { id: self.id(), exit });
            }
        }
        let kvm = |op, source| self.err(op, source);
        // MP state first: reading it makes KVM act on a pending INIT/SIPI
        // (reset the vCPU, jump to the SIPI vector), so every register read
        // must come after it, and the events after it see what KVM still
        // keeps latched. (QEMU reads it first for the same reason.)
        let mp_state = self.fd.get_mp_state().map_err(|e| kvm("KVM_GET_MP_STATE", e))?.mp_state;
        let events = self.events()?;
        let pending_lint = self.pending_lint();
        let xsave = self.fd.get_xsave().map_err(|e| kvm("KVM_GET_XSAVE", e))?;
        let xcrs = self.fd.get_xcrs().map_err(|e| kvm("KVM_GET_XCRS", e))?;
        let nr_xcrs = (xcrs.nr_xcrs as usize).min(xcrs.xcrs.len());
        let lapic = if self.has_lapic() {
            let l = self.fd.get_lapic().map_err(|e| kvm("KVM_GET_LAPIC", e))?;
            Box::new(l.regs.map(|b| b as u8))
        } else {
            Box::new([0; LAPIC_BYTES])
        };
        let (msrs, unreadable_msrs) = self.read_msrs()?;
        let tsc_khz = self.fd.get_tsc_khz().ok().filter(|&khz| khz != 0);
        Ok(VcpuState {
            id: self.id(),
            cpuid: self.cpuid()?.as_slice().to_vec(),
            regs: self.regs()?,
            sregs: self.sregs()?,
            fpu: self.fpu()?,
            xsave: Box::new(xsave.region),
            xcrs: xcrs.xcrs[..nr_xcrs].iter().map(|x| (x.xcr, x.value)).collect(),
            msrs,
            unreadable_msrs,
            lapic,
            events,
            mp_state,
            debug_regs: self.fd.get_debug_regs().map_err(|e| kvm("KVM_GET_DEBUGREGS", e))?,
            pending_lint,
            tsc_khz,
        })
    }

    /// Writes `state` into this vCPU (which has not run yet, or whose state
    /// is to be replaced); the guest continues where the saved vCPU stopped.
    /// An exit the vCPU left uncompleted (a read the caller never answered)
    /// is finished first, its value thrown away, so that KVM does not apply
    /// it over the restored state; the caller starts again with a new
    /// [`RunState`].
    ///
    /// A state whose CPUID gives the guest a feature this host's KVM cannot
    /// offer is refused before anything is written
    /// ([`check_cpu_features`](Self::check_cpu_features)).
    ///
    /// Order matters and is KVM's: CPUID (which MSRs and XCR0 bits are
    /// valid), special registers (paging mode, EFER, APIC base — which
    /// resets the local APIC), general registers, XCRs, FPU, then the XSAVE
    /// image (authoritative for FPU/SSE, so it comes after `KVM_SET_FPU`),
    /// debug registers, the local APIC (before the MSRs: KVM drops a TSC
    /// deadline written while the APIC timer is not in deadline mode), the
    /// MSRs, MP state, and last the vCPU events (which may carry a latched
    /// INIT that KVM checks against the MP state).
    pub fn restore_state(&mut self, state: &VcpuState) -> Result<(), StateError> {
        if state.id != self.id() {
            return Err(StateError::VcpuIdMismatch { state: state.id, vcpu: self.id() });
        }
        self.check_cpu_features(state)?;
        self.drop_pending_exit()?;
        let kvm = |op, source| self.err(op, source);
        let cpuid = Cpuid::from_entries(&state.cpuid)
            .map_err(|_| StateError::TooManyCpuidEntries { id: state.id, count: state.cpuid.len() })?;
        self.set_cpuid(&cpuid)?;
        self.set_sregs(&state.sregs)?;
        self.set_regs(&state.regs)?;
        if !state.xcrs.is_empty() {
            let mut xcrs =
                kvm_xcrs { nr_xcrs: state.xcrs.len().min(KVM_MAX_XCRS as usize) as u32, ..Default::default() };
            for (slot, &(xcr, value)) in xcrs.xcrs.iter_mut().zip(&state.xcrs) {
                slot.xcr = xcr;
                slot.value = value;
            }
            self.fd.set_xcrs(&xcrs).map_err(|e| kvm("KVM_SET_XCRS", e))?;
        }
        self.set_fpu(&state.fpu)?;
        let mut xsave = kvm_xsave::default();
        xsave.region = *state.xsave;
        crate::sys::xsave::set_xsave(&self.fd, &xsave).map_err(|e| kvm("KVM_SET_XSAVE", e))?;
        self.fd.set_debug_regs(&state.debug_regs).map_err(|e| kvm("KVM_SET_DEBUGREGS", e))?;
        if self.has_lapic() {
            let lapic = kvm_lapic_state { regs: state.lapic.map(|b| b as _) };
            self.fd.set_lapic(&lapic).map_err(|e| kvm("KVM_SET_LAPIC", e))?;
            self.expect_restored_eois(&state.lapic)?;
        }
        // Before the MSRs: the TSC value is written at the rate it will run.
        if let Some(khz) = state.tsc_khz {
            if self.fd.get_tsc_khz().ok() != Some(khz) {
                self.fd.set_tsc_khz(khz).map_err(|source| StateError::TscRate { id: state.id, khz, source })?;
            }
        }
        self.write_msrs(&state.msrs)?;
        let mp_state = kvm_mp_state { mp_state: state.mp_state };
        self.fd.set_mp_state(mp_state).map_err(|e| kvm("KVM_SET_MP_STATE", e))?;
        self.set_events(&state.events)?;
        self.requeue_lints(&state.pending_lint);
        Ok(())
    }

    /// Completes the pending exit without running the guest: a kick makes
    /// the next `KVM_RUN` return at once, after KVM finished the
    /// instruction that exited.
    fn settle(&mut self, run: &mut RunState) -> Result<(), StateError> {
        self.kicker().kick();
        match self.enter_guest(run)? {
            Exit::Kicked => Ok(()),
            // Completing the instruction needed user space again (a string
            // I/O instruction's next element): the caller handles it. The
            // kick stays pending, so the next entry returns at once.
            exit => Err(StateError::NotSettled { id: self.id(), exit }),
        }
    }

    /// Lets KVM finish the instruction of the last exit without running the
    /// guest (`KVM_RUN` with `immediate_exit`), whatever value it then
    /// takes: what it writes, the restore overwrites. A string I/O
    /// instruction may need user space again for each element: after a
    /// few, the caller is asked to finish it.
    fn drop_pending_exit(&mut self) -> Result<(), StateError> {
        use crate::sys::run::Completion;
        for _ in 0..16 {
            let _inside = self.links.gate.enter(&self.kick);
            let area = self.kick.run_area();
            area.request_immediate_exit();
            let result = area.run(&self.fd, Completion::None, None, false);
            area.take_immediate_exit();
            // A kick that came meanwhile (or before) still makes the next
            // entry return at once.
            if self.kick.pending() {
                area.request_immediate_exit();
            }
            match result {
                Ok(false) => return Ok(()),
                Ok(true) => continue,
                Err(e) => return Err(crate::VcpuError::Run { id: self.id(), source: e }.into()),
            }
        }
        let exit = self.kick.run_area().decode(&mut Vec::new());
        Err(StateError::NotSettled { id: self.id(), exit })
    }

    /// The LINT0/LINT1 requests raised through [`Lint`](crate::irq::Lint)
    /// that the guest has not taken yet (what [`save_state`](Self::save_state)
    /// saves as [`VcpuState::pending_lint`]). A VMM that resets the vCPU from
    /// an older state while an 8259 has already acknowledged a vector (an
    /// ACPI S3 wake) puts these into that state, or the vector is lost and
    /// its in-service bit never cleared.
    pub fn pending_lint(&self) -> PendingLint {
        PendingLint {
            extint: self.lint.extint.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect(),
            nmi: self.lint.nmi.load(std::sync::atomic::Ordering::SeqCst),
        }
    }

    /// Puts saved LINT requests back in the queue `enter_guest` delivers
    /// from (replacing what it held).
    fn requeue_lints(&self, pending: &PendingLint) {
        use std::sync::atomic::Ordering::SeqCst;
        let mut queue = self.lint.extint.lock().unwrap_or_else(|p| p.into_inner());
        queue.clear();
        queue.extend(pending.extint.iter().copied());
        // This vCPU's KVM holds nothing of the state's (it was just written).
        self.lint.held.store(false, SeqCst);
        self.lint.nmi.store(pending.nmi, SeqCst);
        if !pending.is_empty() {
            self.kick.set_lints_pending();
        }
    }

    /// Whether KVM holds a local APIC for this vCPU (split irqchip).
    fn has_lapic(&self) -> bool {
        self.links.lapic_in_kernel
    }

    /// Writes saved MSRs. KVM stops a batch at the first MSR it refuses;
    /// one that already holds the saved value is passed over (KVM refuses
    /// e.g. `MSR_KVM_ASYNC_PF_INT` without an in-kernel APIC, even its
    /// reset value 0); any other refusal is an error.
    fn write_msrs(&self, msrs: &[Msr]) -> Result<(), StateError> {
        let mut done = 0;
        while done < msrs.len() {
            done += self.set_msrs(&msrs[done..])?;
            let Some(&(index, value)) = msrs.get(done) else { break };
            if self.msrs(&[index])? != [(index, value)] {
                return Err(StateError::MsrRejected { id: self.id(), index, value, accepted: done, total: msrs.len() });
            }
            log::debug!("vCPU {}: MSR {index:#x} refused, but it holds the saved value {value:#x}", self.id());
            done += 1;
        }
        Ok(())
    }

    /// Reads every saveable MSR; returns (values, indices that failed).
    /// KVM stops a batch at the first MSR it cannot read, so the batch is
    /// resumed after it.
    fn read_msrs(&self) -> Result<(Vec<Msr>, Vec<u32>), StateError> {
        let list = self.links.saveable_msrs.clone();
        let (mut values, mut failed) = (Vec::with_capacity(list.len()), Vec::new());
        let mut rest: &[u32] = &list;
        while !rest.is_empty() {
            let got = self.msrs(rest)?;
            let n = got.len();
            values.extend(got);
            if let Some(&bad) = rest.get(n) {
                failed.push(bad);
                rest = &rest[n + 1..];
            } else {
                rest = &[];
            }
        }
        if !failed.is_empty() {
            log::debug!("vCPU {}: {} saveable MSRs do not read back: {failed:x?}", self.id(), failed.len());
        }
        Ok((values, failed))
    }
}

/// Section tags of a vCPU state (`docs/state-format.md`).
mod tag {
    pub(super) const ID: u16 = 1;
    pub(super) const CPUID: u16 = 2;
    pub(super) const REGS: u16 = 3;
    pub(super) const SREGS: u16 = 4;
    pub(super) const FPU: u16 = 5;
    pub(super) const XSAVE: u16 = 6;
    pub(super) const XCRS: u16 = 7;
    pub(super) const MSRS: u16 = 8;
    pub(super) const UNREADABLE_MSRS: u16 = 9;
    pub(super) const LAPIC: u16 = 10;
    pub(super) const EVENTS: u16 = 11;
    pub(super) const MP_STATE: u16 = 12;
    pub(super) const DEBUG_REGS: u16 = 13;
    pub(super) const PENDING_LINT: u16 = 14;
    pub(super) const TSC_KHZ: u16 = 15;
}

/// Sections written only when not empty.
const OPTIONAL: &[(u16, &str)] = &[(tag::PENDING_LINT, "pending_lint"), (tag::TSC_KHZ, "tsc_khz")];
/// At most this many queued ExtINT vectors in a state.
/// At most one of each of the 256 vectors waits.
const MAX_EXTINT: u32 = 256;

const SECTIONS: &[(u16, &str)] = &[
    (tag::ID, "id"),
    (tag::CPUID, "cpuid"),
    (tag::REGS, "regs"),
    (tag::SREGS, "sregs"),
    (tag::FPU, "fpu"),
    (tag::XSAVE, "xsave"),
    (tag::XCRS, "xcrs"),
    (tag::MSRS, "msrs"),
    (tag::UNREADABLE_MSRS, "unreadable_msrs"),
    (tag::LAPIC, "lapic"),
    (tag::EVENTS, "events"),
    (tag::MP_STATE, "mp_state"),
    (tag::DEBUG_REGS, "debug_regs"),
];

impl VcpuState {
    /// The state as bytes (`docs/state-format.md`, kind 1).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new(StateKind::Vcpu);
        w.section(tag::ID, |o| o.u32(self.id));
        w.section(tag::CPUID, |o| {
            o.u32(self.cpuid.len() as u32);
            for e in &self.cpuid {
                for v in [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] {
                    o.u32(v);
                }
            }
        });
        w.section(tag::REGS, |o| put_regs(o, &self.regs));
        w.section(tag::SREGS, |o| put_sregs(o, &self.sregs));
        w.section(tag::FPU, |o| put_fpu(o, &self.fpu));
        w.section(tag::XSAVE, |o| self.xsave.iter().for_each(|&v| o.u32(v)));
        w.section(tag::XCRS, |o| {
            o.u32(self.xcrs.len() as u32);
            for &(xcr, value) in &self.xcrs {
                o.u32(xcr);
                o.u64(value);
            }
        });
        w.section(tag::MSRS, |o| {
            o.u32(self.msrs.len() as u32);
            for &(index, value) in &self.msrs {
                o.u32(index);
                o.u64(value);
            }
        });
        w.section(tag::UNREADABLE_MSRS, |o| {
            o.u32(self.unreadable_msrs.len() as u32);
            self.unreadable_msrs.iter().for_each(|&i| o.u32(i));
        });
        w.section(tag::LAPIC, |o| o.bytes(&self.lapic[..]));
        w.section(tag::EVENTS, |o| put_events(o, &self.events));
        w.section(tag::MP_STATE, |o| o.u32(self.mp_state));
        w.section(tag::DEBUG_REGS, |o| put_debugregs(o, &self.debug_regs));
        if !self.pending_lint.is_empty() {
            w.section(tag::PENDING_LINT, |o| {
                o.u8(u8::from(self.pending_lint.nmi));
                o.u32(self.pending_lint.extint.len() as u32);
                o.bytes(&self.pending_lint.extint);
            });
        }
        if let Some(khz) = self.tsc_khz {
            w.section(tag::TSC_KHZ, |o| o.u32(khz));
        }
        w.finish()
    }

    /// Reads a state written by [`encode`](Self::encode), validating
    /// everything: a truncated, altered or foreign blob is an error naming
    /// the section and offset, never a panic.
    pub fn decode(blob: &[u8]) -> Result<Self, FormatError> {
        let s = Sections::open_with_optional(blob, StateKind::Vcpu, SECTIONS, OPTIONAL)?;

        let mut r = s.get(tag::ID);
        let id = r.u32()?;
        r.finish()?;

        let mut r = s.get(tag::CPUID);
        let n = r.count("count", MAX_CPUID, 7 * 4)?;
        let mut cpuid = Vec::with_capacity(n);
        for _ in 0..n {
            let mut v = [0u32; 7];
            for x in &mut v {
                *x = r.u32()?;
            }
            let [function, index, flags, eax, ebx, ecx, edx] = v;
            cpuid.push(kvm_cpuid_entry2 { function, index, flags, eax, ebx, ecx, edx, padding: [0; 3] });
        }

        let mut r = s.get(tag::REGS);
        let regs = get_regs(&mut r)?;
        r.finish()?;
        let mut r = s.get(tag::SREGS);
        let sregs = get_sregs(&mut r)?;
        r.finish()?;
        let mut r = s.get(tag::FPU);
        let fpu = get_fpu(&mut r)?;
        r.finish()?;

        let mut r = s.get(tag::XSAVE);
        let mut xsave = Box::new([0u32; XSAVE_WORDS]);
        for w in xsave.iter_mut() {
            *w = r.u32()?;
        }
        r.finish()?;

        let mut r = s.get(tag::XCRS);
        let n = r.count("count", KVM_MAX_XCRS, 12)?;
        let mut xcrs = Vec::with_capacity(n);
        for _ in 0..n {
            xcrs.push((r.u32()?, r.u64()?));
        }

        let mut r = s.get(tag::MSRS);
        let n = r.count("count", MAX_MSRS, 12)?;
        let mut msrs = Vec::with_capacity(n);
        for _ in 0..n {
            msrs.push((r.u32()?, r.u64()?));
        }

        let mut r = s.get(tag::UNREADABLE_MSRS);
        let n = r.count("count", MAX_MSRS, 4)?;
        let mut unreadable_msrs = Vec::with_capacity(n);
        for _ in 0..n {
            unreadable_msrs.push(r.u32()?);
        }

        let mut r = s.get(tag::LAPIC);
        let mut lapic = Box::new([0u8; LAPIC_BYTES]);
        lapic.copy_from_slice(r.bytes(LAPIC_BYTES)?);
        r.finish()?;

        let mut r = s.get(tag::EVENTS);
        let events = get_events(&mut r)?;
        r.finish()?;

        let mut r = s.get(tag::MP_STATE);
        let at = r.offset();
        let mp_state = r.u32()?;
        if mp_state > kvm_bindings::KVM_MP_STATE_SUSPENDED {
            return Err(r.invalid(at, "mp_state", u64::from(mp_state), "KVM_MP_STATE_* is 0..=10"));
        }
        r.finish()?;

        let mut r = s.get(tag::DEBUG_REGS);
        let debug_regs = get_debugregs(&mut r)?;
        r.finish()?;

        let mut pending_lint = PendingLint::default();
        if let Some(mut r) = s.get_optional(tag::PENDING_LINT) {
            let at = r.offset();
            pending_lint.nmi = match r.u8()? {
                0 => false,
                1 => true,
                v => return Err(r.invalid(at, "nmi", u64::from(v), "0 or 1")),
            };
            let n = r.count("count", MAX_EXTINT, 1)?;
            let at = r.offset();
            let vectors = r.bytes(n)?;
            let mut seen = [false; 256];
            for (i, &v) in vectors.iter().enumerate() {
                if std::mem::replace(&mut seen[usize::from(v)], true) {
                    return Err(r.invalid(at + i, "vector", u64::from(v), "each vector at most once"));
                }
            }
            pending_lint.extint = vectors.to_vec();
            r.finish()?;
        }
        let mut tsc_khz = None;
        if let Some(mut r) = s.get_optional(tag::TSC_KHZ) {
            let at = r.offset();
            let khz = r.u32()?;
            if khz == 0 {
                return Err(r.invalid(at, "tsc_khz", 0, "a frequency above 0"));
            }
            tsc_khz = Some(khz);
            r.finish()?;
        }

        Ok(Self {
            id,
            cpuid,
            regs,
            sregs,
            fpu,
            xsave,
            xcrs,
            msrs,
            unreadable_msrs,
            lapic,
            events,
            mp_state,
            debug_regs,
            pending_lint,
            tsc_khz,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests;
