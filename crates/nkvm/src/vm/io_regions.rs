//! The VM's I/O regions: ranges of guest MMIO or port space served by a
//! device model in another process (over a socket) or by a handler in this
//! one, inside `enter_guest` (see [`crate::io`]).

use std::os::unix::net::UnixStream;

use super::Vm;
use crate::io::{IoHandler, IoRange, IoRegionError, Ordering, RegionFailure, RegionId, SocketOptions};

impl Vm {
    /// Serves `range` with the device model at the other end of `socket`
    /// (see [`crate::io`]): handshake now, then every guest access to the
    /// range becomes a transaction, served inside `enter_guest`.
    pub fn attach_region(
        &self,
        range: IoRange,
        socket: UnixStream,
        ordering: Ordering,
    ) -> Result<RegionId, IoRegionError> {
        self.attach_region_with(range, socket, SocketOptions { ordering, ..Default::default() })
    }

    /// [`attach_region`](Self::attach_region) with a timeout and a name.
    pub fn attach_region_with(
        &self,
        range: IoRange,
        socket: UnixStream,
        options: SocketOptions,
    ) -> Result<RegionId, IoRegionError> {
        let posted_mmio = options.ordering == Ordering::Posted && range.space == crate::io::IoSpace::Mmio;
        let id = self.io.attach_socket(range, socket, options)?;
        // Posted MMIO writes need no exit at all: let KVM queue them in its
        // coalesced ring; vCPUs drain it (in order) at their next exit.
        if posted_mmio && self.coalesced_mmio && range.len <= u64::from(u32::MAX) {
            let zone = kvm_ioctls::IoEventAddress::Mmio(range.base);
            match self.fd.register_coalesced_mmio(zone, range.len as u32) {
                Ok(()) => self.io.set_coalesced(id, true),
                Err(e) => log::warn!("coalesced MMIO for {range} unavailable ({e}); posted writes will exit"),
            }
        }
        Ok(id)
    }

    /// Serves `range` with an in-process handler, synchronously.
    pub fn attach_handler(&self, range: IoRange, handler: Box<dyn IoHandler>) -> Result<RegionId, IoRegionError> {
        self.io.attach_handler(range, handler)
    }

    /// The saved state of the device model behind socket region `id` (for
    /// an nkvm device process, its model's `nkvm_devices::Snapshot` blob),
    /// asked for in the region's stream, so it holds every write the guest
    /// made to it before. Call it with the vCPUs paused: their exits have
    /// then forwarded every posted write KVM held in its coalesced ring.
    ///
    /// # Errors
    ///
    /// [`IoRegionError::NotAttached`], [`IoRegionError::NotASocket`] for a
    /// handler in this process, [`IoRegionError::Failed`] if the device
    /// failed before, [`IoRegionError::State`] if it has no state, speaks
    /// only version 1 of the protocol, or the exchange fails (then the
    /// region fails, as after a failed access).
    pub fn region_state(&self, id: RegionId) -> Result<Vec<u8>, IoRegionError> {
        self.io.state(id)
    }

    /// Gives the device model behind socket region `id` a saved state to
    /// take ([`region_state`](Self::region_state)'s), in the region's
    /// stream. Call it with the vCPUs paused, or before they run.
    ///
    /// # Errors
    ///
    /// As for [`region_state`](Self::region_state); a model that refuses
    /// the state ([`nkvm_wire::WireError::StateRefused`], with its reason)
    /// stays as it was and the region goes on.
    pub fn region_load_state(&self, id: RegionId, state: &[u8]) -> Result<(), IoRegionError> {
        self.io.load_state(id, state)
    }

    /// Detaches a range (while vCPUs run, if need be); its posted writes are
    /// delivered first. Later accesses come back as exits.
    pub fn detach_region(&self, id: RegionId) -> Result<(), IoRegionError> {
        if self.io.is_coalesced(id) {
            if let Some(range) = self.io.range(id) {
                let zone = kvm_ioctls::IoEventAddress::Mmio(range.base);
                if let Err(e) = self.fd.unregister_coalesced_mmio(zone, range.len as u32) {
                    log::warn!("unregistering coalesced MMIO for {range}: {e}");
                }
                // No new write enters the ring for it now; the ones already
                // there go out while the region is still attached: every
                // vCPU in the guest leaves once, draining the ring before
                // it leaves the gate (a vCPU outside has drained already).
                drop(self.gate.pause());
            }
            self.io.set_coalesced(id, false);
        }
        self.io.detach(id)
    }

    /// Every attached region whose device failed, with the reason.
    pub fn io_region_failures(&self) -> Vec<RegionFailure> {
        self.io.failures()
    }

    /// One access to an attached MMIO range at `gpa`, as a vCPU's exit
    /// would make it (for instructions completed in user space whose
    /// operand is device memory). `None` if no region claims it.
    pub(crate) fn mmio_access(&self, gpa: u64, size: u8, write: Option<u64>) -> Option<u64> {
        self.io.access(crate::io::IoSpace::Mmio, gpa, size, write).map(|served| served.value)
    }
}
