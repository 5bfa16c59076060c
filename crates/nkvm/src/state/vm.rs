//! [`VmState`]: what KVM holds for a VM as a whole (its clock) and what it
//! takes to create the same VM again; [`Vm::save_state`] / [`Vm::restore_state`].

use kvm_bindings::kvm_clock_data;

use super::codec::{FormatError, Sections, StateKind, Writer};
use super::StateError;
use crate::{Vm, VmConfig, VmError, PAGE_SIZE};

/// A VM's own state, as a plain value. Guest memory is not in it: it stays
/// in the RAM [`Backing`](crate::Backing), saved or shared separately.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VmState {
    /// Number of vCPUs ([`VmConfig::vcpus`]).
    pub vcpus: u32,
    /// Guest RAM in bytes ([`VmConfig::memory`]).
    pub memory: u64,
    /// Local APICs in KVM, IOAPIC/PIC in user space ([`VmConfig::split_irqchip`]).
    pub split_irqchip: bool,
    /// The VM clock, kvmclock's base (`KVM_GET_CLOCK`): nanoseconds in
    /// `clock`; `flags`, `realtime` and `host_tsc` as KVM reported them.
    pub clock: kvm_clock_data,
}

impl VmState {
    /// The configuration that creates a VM this state can be restored into
    /// (the dirty-log mode is the host's business and left at its default).
    pub fn config(&self) -> VmConfig {
        VmConfig { vcpus: self.vcpus, memory: self.memory, split_irqchip: self.split_irqchip, ..Default::default() }
    }
}

impl Vm {
    /// Saves the VM's own state. Save it while the vCPUs are stopped, with
    /// their states, so the clock and the TSCs agree.
    pub fn save_state(&self) -> Result<VmState, StateError> {
        let clock = self.fd.get_clock().map_err(|source| VmError::Kvm { op: "KVM_GET_CLOCK", source })?;
        let config = self.config();
        Ok(VmState { vcpus: config.vcpus, memory: config.memory, split_irqchip: config.split_irqchip, clock })
    }

    /// Restores the VM's own state into this VM, which must have been
    /// created from [`VmState::config`]. The guest's clock continues from
    /// the saved value: time the VM spent saved does not pass for the guest.
    pub fn restore_state(&self, state: &VmState) -> Result<(), StateError> {
        let config = self.config();
        let checks = [
            ("vcpus", u64::from(state.vcpus), u64::from(config.vcpus)),
            ("memory", state.memory, config.memory),
            ("split_irqchip", u64::from(state.split_irqchip), u64::from(config.split_irqchip)),
        ];
        if let Some(&(what, state, vm)) = checks.iter().find(|(_, s, v)| s != v) {
            return Err(StateError::ConfigMismatch { what, state, vm });
        }
        let clock = kvm_clock_data { clock: state.clock.clock, ..Default::default() };
        self.fd.set_clock(&clock).map_err(|source| VmError::Kvm { op: "KVM_SET_CLOCK", source })?;
        Ok(())
    }
}

mod tag {
    pub(super) const CONFIG: u16 = 1;
    pub(super) const CLOCK: u16 = 2;
}

const SECTIONS: &[(u16, &str)] = &[(tag::CONFIG, "config"), (tag::CLOCK, "clock")];

impl VmState {
    /// The state as bytes (`docs/state-format.md`, kind 2).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new(StateKind::Vm);
        w.section(tag::CONFIG, |o| {
            o.u32(self.vcpus);
            o.u64(self.memory);
            o.u8(u8::from(self.split_irqchip));
        });
        w.section(tag::CLOCK, |o| {
            o.u64(self.clock.clock);
            o.u32(self.clock.flags);
            o.u64(self.clock.realtime);
            o.u64(self.clock.host_tsc);
        });
        w.finish()
    }

    /// Reads a state written by [`encode`](Self::encode), validating everything.
    pub fn decode(blob: &[u8]) -> Result<Self, FormatError> {
        let s = Sections::open(blob, StateKind::Vm, SECTIONS)?;
        let mut r = s.get(tag::CONFIG);
        let at = r.offset();
        let vcpus = r.u32()?;
        if vcpus == 0 {
            return Err(r.invalid(at, "vcpus", 0, "a VM has at least one vCPU"));
        }
        let at = r.offset();
        let memory = r.u64()?;
        if memory == 0 || memory % PAGE_SIZE != 0 {
            return Err(r.invalid(at, "memory", memory, "a non-zero multiple of 4096"));
        }
        let at = r.offset();
        let split_irqchip = match r.u8()? {
            0 => false,
            1 => true,
            v => return Err(r.invalid(at, "split_irqchip", u64::from(v), "0 or 1")),
        };
        r.finish()?;
        let mut r = s.get(tag::CLOCK);
        let clock = kvm_clock_data {
            clock: r.u64()?,
            flags: r.u32()?,
            realtime: r.u64()?,
            host_tsc: r.u64()?,
            ..Default::default()
        };
        r.finish()?;
        Ok(Self { vcpus, memory, split_irqchip, clock })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> VmState {
        let clock =
            kvm_clock_data { clock: 123_456_789, flags: 6, realtime: 1 << 60, host_tsc: 42, ..Default::default() };
        VmState { vcpus: 2, memory: 64 << 20, split_irqchip: true, clock }
    }

    #[test]
    fn vm_state_round_trips() {
        let state = sample();
        assert_eq!(VmState::decode(&state.encode()).unwrap(), state);
    }

    #[test]
    fn a_vcpu_blob_is_not_a_vm_state() {
        let blob = crate::state::vcpu::tests::sample().encode();
        let err = VmState::decode(&blob).unwrap_err();
        assert_eq!(err, FormatError::WrongKind { expected: "VM state", found: 1 });
    }
}
