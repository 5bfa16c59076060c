//! The PCI side of a snapshot: the bus's address latch and each in-process
//! virtio-pci device as a [`SavedDevice`], one blob per PCI function.
//!
//! Saving takes the device's lock, the lock its queue worker holds while it
//! serves a request, so the state never shows a request half done; then
//! serves what the driver made available on each enabled queue (a kick the
//! worker took but had not served yet would otherwise be served after the
//! save, behind the copy's back) and takes the blob. A restore (on a
//! machine attached with the same [`PciConfig`](super::PciConfig), its
//! vCPUs' state restored, before they run) takes the blob, then re-does
//! what the state implies: the MSI-X routes (the model tells its irqfd sink
//! every unmasked vector again; masked ones stay unrouted), the BAR regions
//! and their queue ioeventfds where the restored configuration space
//! decodes them (none while memory decoding is off), and one kick of every
//! enabled queue, served at once, with one interrupt per enabled queue (a
//! spurious kick or interrupt finds nothing new).
//!
//! A device served by nkvm's own device process saves the same blob: the
//! VMM holds its transport, and saving stops the process's queues
//! (`GET_VRING_BASE`), waits until every request it took is completed and
//! takes the queue positions into the transport
//! ([`VirtioDevice::stop_for_save`]),
//! so the machine restores with the device in process; if it runs on
//! instead, [`SavedDevice::resume`] hands the process its queues back. A
//! foreign vhost-user backend keeps the disk's identity out of nkvm's reach
//! (a restore could not find the disk): the machine registers why instead,
//! and saving it fails with that reason.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use nkvm_devices::virtio::{VirtioDevice, VirtioPci};
use nkvm_devices::{Snapshot, SnapshotError};

use super::{Attached, ConfigPorts};
use crate::saved::{LoadError, SavedDevice, SavedDevices};

/// The name the bus's state is saved under.
pub(super) const BUS_NAME: &str = "pci-bus";

/// A virtio-pci device as a snapshot sees it, whatever its model.
pub(super) trait Saveable: Send {
    /// Serves what is available (a device served elsewhere: stops its
    /// queues), then the state as one blob.
    fn save(&mut self) -> Result<Vec<u8>, String>;
    /// The machine runs on after a save: restarts what `save` stopped.
    fn resume_after_save(&mut self);
    /// Takes a blob back, then serves and interrupts each enabled queue.
    fn load(&mut self, blob: &[u8]) -> Result<(), SnapshotError>;
    /// The model's name in its blob (`virtio-pci-blk`, ...).
    fn name(&self) -> &'static str;
}

impl<D: VirtioDevice + Snapshot> Saveable for VirtioPci<D> {
    fn save(&mut self) -> Result<Vec<u8>, String> {
        self.prepare_save().map_err(|e| crate::machine::intake::chain(&e))?;
        Ok(self.snapshot())
    }

    fn resume_after_save(&mut self) {
        VirtioPci::resume_after_save(self);
    }

    fn load(&mut self, blob: &[u8]) -> Result<(), SnapshotError> {
        self.restore(blob)?;
        self.resume();
        Ok(())
    }

    fn name(&self) -> &'static str {
        self.snapshot_name()
    }
}

/// A placed device, shared with the bus, its BAR region and its worker.
pub(super) type SharedSaveable = Arc<Mutex<dyn Saveable>>;

/// What [`Attached::register_saved`] registers.
#[derive(Default)]
pub(super) struct SavedParts {
    /// The configuration ports (bus, BAR regions, notifiers).
    pub(super) ports: Option<Arc<Mutex<ConfigPorts>>>,
    /// The devices whose state nkvm can take.
    pub(super) devices: Vec<SavedVirtio>,
    /// Why the other devices cannot be saved.
    pub(super) unsaveable: Vec<String>,
}

impl fmt::Debug for SavedParts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self.devices.iter().map(SavedVirtio::name).collect();
        f.debug_struct("SavedParts").field("devices", &names).field("unsaveable", &self.unsaveable).finish()
    }
}

impl Attached {
    /// Registers the PCI side with a machine's saved devices: the bus
    /// (`pci-bus`) and each in-process virtio-pci device (named after its
    /// model and slot: `virtio-pci-blk@00:01.0`), in that order, and each
    /// device in an nkvm device process under the same name; a device
    /// served by a foreign vhost-user backend registers why it cannot be
    /// saved instead.
    ///
    /// Order for the machine: save these (`save_all`, vCPUs paused) before
    /// it collects the last dirty pages or copies RAM, since saving serves
    /// what is available and writes guest memory; restore them after the
    /// vCPUs' state, since restoring interrupts the driver.
    pub fn register_saved(&self, saved: &mut SavedDevices) {
        if let Some(ports) = &self.saved.ports {
            saved.add(BUS_NAME, Arc::new(SavedBus(ports.clone())));
        }
        for device in &self.saved.devices {
            saved.add(&device.name(), Arc::new(device.clone()));
        }
        for why in &self.saved.unsaveable {
            saved.cannot_save(why.clone());
        }
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The bus's own state (the configuration address latch).
struct SavedBus(Arc<Mutex<ConfigPorts>>);

impl SavedDevice for SavedBus {
    fn save(&self) -> Result<Vec<u8>, String> {
        Ok(lock(&self.0).bus.snapshot())
    }

    fn restore(&self, name: &str, blob: &[u8]) -> Result<(), LoadError> {
        lock(&self.0).bus.restore(blob).map_err(|source| LoadError::Device { name: name.to_string(), source })
    }
}

/// One in-process virtio-pci device and the ports that map it.
#[derive(Clone)]
pub(super) struct SavedVirtio {
    pub(super) slot: u8,
    pub(super) device: SharedSaveable,
    pub(super) ports: Arc<Mutex<ConfigPorts>>,
}

impl SavedVirtio {
    fn name(&self) -> String {
        format!("{}@00:{:02x}.0", lock(&self.device).name(), self.slot)
    }
}

impl SavedDevice for SavedVirtio {
    fn save(&self) -> Result<Vec<u8>, String> {
        // The worker holds this lock while it serves a request.
        lock(&self.device).save()
    }

    fn resume(&self) {
        lock(&self.device).resume_after_save();
    }

    fn restore(&self, name: &str, blob: &[u8]) -> Result<(), LoadError> {
        lock(&self.device).load(blob).map_err(|source| LoadError::Device { name: name.to_string(), source })?;
        let mut ports = lock(&self.ports);
        ports.bus.rescan();
        ports.apply_bar_events();
        Ok(())
    }
}
