//! The PCI side of a snapshot: the bus's address latch and each in-process
//! virtio-pci device as a [`SavedDevice`], one blob per PCI function.
//!
//! Saving takes the device's lock, the lock its queue worker holds while it
//! serves a request, so the state never shows a request half done. A
//! restore (on a machine attached with the same [`PciConfig`](super::PciConfig),
//! before its vCPUs run) takes the blob, then re-does what the state implies:
//! the MSI-X routes (the model tells its irqfd sink every unmasked vector
//! again), the BAR regions and their queue ioeventfds where the restored
//! configuration space decodes them (none while memory decoding is off),
//! and one kick of every enabled queue, so a request the guest made
//! available before the save is served (a spurious kick finds nothing).
//!
//! A device served elsewhere (a device process, a vhost-user backend) keeps
//! its queue state out of nkvm's reach: the machine registers why instead,
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
    /// The state as one blob.
    fn save(&self) -> Vec<u8>;
    /// Takes a blob back.
    fn load(&mut self, blob: &[u8]) -> Result<(), SnapshotError>;
    /// The model's name in its blob (`virtio-pci-blk`, ...).
    fn name(&self) -> &'static str;
    /// The queues the driver enabled on a running device.
    fn enabled_queues(&self) -> Vec<usize>;
}

impl<D: VirtioDevice + Snapshot> Saveable for VirtioPci<D> {
    fn save(&self) -> Vec<u8> {
        self.snapshot()
    }

    fn load(&mut self, blob: &[u8]) -> Result<(), SnapshotError> {
        self.restore(blob)
    }

    fn name(&self) -> &'static str {
        self.snapshot_name()
    }

    fn enabled_queues(&self) -> Vec<usize> {
        VirtioPci::enabled_queues(self)
    }
}

/// A placed device, shared with the bus, its BAR region and its worker.
pub(super) type SharedSaveable = Arc<Mutex<dyn Saveable>>;

/// What [`Attached::register_saved`] registers.
#[derive(Default)]
pub(super) struct SavedParts {
    /// The configuration ports (bus, BAR regions, notifiers).
    pub(super) ports: Option<Arc<Mutex<ConfigPorts>>>,
    /// The in-process devices.
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
    /// model and slot: `virtio-pci-blk@00:01.0`), in that order; a device
    /// served by a device process or a vhost-user backend registers why it
    /// cannot be saved instead.
    #[allow(dead_code)] // until machine.rs registers its PCI devices
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
        Ok(lock(&self.device).save())
    }

    fn restore(&self, name: &str, blob: &[u8]) -> Result<(), LoadError> {
        let queues = {
            let mut device = lock(&self.device);
            device.load(blob).map_err(|source| LoadError::Device { name: name.to_string(), source })?;
            device.enabled_queues()
        };
        let mut ports = lock(&self.ports);
        ports.bus.rescan();
        ports.apply_bar_events();
        if let Some(notifier) = ports.notifiers.get(&self.slot) {
            for q in queues {
                if let Some(Err(e)) = notifier.eventfds().get(q).map(|fd| fd.write(1)) {
                    log::warn!("pci: {name}: cannot kick queue {q} after the restore: {e}");
                }
            }
        }
        Ok(())
    }
}
