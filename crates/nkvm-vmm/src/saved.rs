//! The machine's saved pieces: every device whose state travels in a
//! snapshot or a migration stream, registered by name ([`SavedDevices`]).
//!
//! A machine builder registers each model it attaches; a device whose
//! state nkvm cannot take (it lives in another process, say) registers the
//! reason instead, and saving such a machine fails with it: a snapshot is
//! whole or not written at all.
//!
//! ```ignore
//! let serial = Arc::new(Mutex::new(Serial::new(irq, io::stdout())));
//! let mut saved = SavedDevices::default();
//! saved.add_shared("serial", serial.clone());
//! saved.cannot_save("the disk is served by a vhost-user backend");
//! assert!(saved.save_all().is_err());
//! ```

use std::sync::{Arc, Mutex};

use nkvm_devices::Snapshot;

/// Why a machine's devices could not be saved.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// A device's state is out of nkvm's reach.
    #[error("this machine cannot be saved: {0}")]
    Unsaveable(String),
    /// A device failed to produce its state.
    #[error("device {name}: cannot save its state: {why}")]
    Device {
        /// The device.
        name: String,
        /// What went wrong.
        why: String,
    },
}

/// Why saved device state could not be brought back.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The saved machine's device set is not this machine's.
    #[error("the saved machine's devices are {found:?}; this machine has {expected:?}")]
    DeviceSet {
        /// Names in the saved state.
        found: Vec<String>,
        /// Names here.
        expected: Vec<String>,
    },
    /// A device process did not take its state.
    #[error("device {name}: its process did not take the state: {why}")]
    Process {
        /// The device's name.
        name: String,
        /// Why (the process's or the socket's reason).
        why: String,
    },
    /// A device refused its blob.
    #[error("device {name}: bad state")]
    Device {
        /// The device.
        name: String,
        /// What the model found.
        #[source]
        source: nkvm_devices::SnapshotError,
    },
}

/// One piece of a machine whose state is saved and restored. Saving is
/// called with every vCPU paused; restoring on a fresh machine before any
/// vCPU runs.
pub trait SavedDevice: Send + Sync {
    /// The state as one blob.
    fn save(&self) -> Result<Vec<u8>, String>;
    /// Takes `blob` back (and re-does whatever the state implies: BARs,
    /// routes, queue workers).
    fn restore(&self, name: &str, blob: &[u8]) -> Result<(), LoadError>;
    /// The vCPUs are about to pause for a save: hand them nothing from
    /// now on that their saved state could miss (the 8259 holds its INTA
    /// cycle). Most devices have nothing to do.
    fn pause(&self) {}
    /// The vCPUs run on here: undo [`pause`](Self::pause).
    fn resume(&self) {}
    /// Why the vCPUs cannot be paused now, if they cannot (a machine
    /// asleep in S3: they wait for its wake-up, not in the guest).
    fn unpausable(&self) -> Option<String> {
        None
    }
}

/// Any [`Snapshot`] model shared behind a mutex is a [`SavedDevice`].
impl<D: Snapshot + Send> SavedDevice for Mutex<D> {
    fn save(&self) -> Result<Vec<u8>, String> {
        Ok(self.lock().unwrap_or_else(|p| p.into_inner()).snapshot())
    }

    fn restore(&self, name: &str, blob: &[u8]) -> Result<(), LoadError> {
        let mut dev = self.lock().unwrap_or_else(|p| p.into_inner());
        dev.restore(blob).map_err(|source| LoadError::Device { name: name.to_string(), source })
    }
}

/// The devices of one machine whose state travels, by name.
#[derive(Default)]
pub struct SavedDevices {
    entries: Vec<(String, Arc<dyn SavedDevice>)>,
    unsaveable: Vec<String>,
}

impl std::fmt::Debug for SavedDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SavedDevices").field("names", &self.names()).field("unsaveable", &self.unsaveable).finish()
    }
}

impl SavedDevices {
    /// Registers `device` as `name` (names are unique within a machine).
    pub fn add(&mut self, name: &str, device: Arc<dyn SavedDevice>) {
        debug_assert!(self.entries.iter().all(|(n, _)| n != name), "device {name} registered twice");
        self.entries.push((name.to_string(), device));
    }

    /// Registers a shared [`Snapshot`] model as `name`.
    pub fn add_shared<D: Snapshot + Send + 'static>(&mut self, name: &str, device: Arc<Mutex<D>>) {
        self.add(name, device);
    }

    /// Records that part of the machine cannot be saved, and why: saving
    /// then fails with this reason.
    pub fn cannot_save(&mut self, why: impl Into<String>) {
        self.unsaveable.push(why.into());
    }

    /// The registered names, in registration order.
    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Tells every device the vCPUs are about to pause for a save.
    pub fn pause_all(&self) {
        self.entries.iter().for_each(|(_, d)| d.pause());
    }

    /// Tells every device the vCPUs run on.
    pub fn resume_all(&self) {
        self.entries.iter().for_each(|(_, d)| d.resume());
    }

    /// Whether the machine can be saved (no [`Self::cannot_save`] reason).
    pub fn saveable(&self) -> Result<(), SaveError> {
        match self.unsaveable.first() {
            Some(why) => Err(SaveError::Unsaveable(why.clone())),
            None => Ok(()),
        }
    }

    /// Why the vCPUs cannot be paused now, if a device says they cannot.
    pub fn unpausable(&self) -> Option<String> {
        self.entries.iter().find_map(|(_, dev)| dev.unpausable())
    }

    /// Every device's blob, by name. Call with the vCPUs paused.
    pub fn save_all(&self) -> Result<Vec<(String, Vec<u8>)>, SaveError> {
        self.saveable()?;
        self.entries
            .iter()
            .map(|(name, dev)| {
                dev.save().map(|b| (name.clone(), b)).map_err(|why| SaveError::Device { name: name.clone(), why })
            })
            .collect()
    }

    /// Restores every device from `blobs`, which must name exactly this
    /// machine's devices. Devices are restored in registration order (a
    /// bus before the devices on it).
    pub fn restore_all(&self, blobs: &[(String, Vec<u8>)]) -> Result<(), LoadError> {
        let mut found: Vec<String> = blobs.iter().map(|(n, _)| n.clone()).collect();
        let mut expected = self.names();
        found.sort();
        expected.sort();
        if found != expected {
            return Err(LoadError::DeviceSet { found, expected });
        }
        for (name, dev) in &self.entries {
            let blob = blobs.iter().find(|(n, _)| n == name).map(|(_, b)| b.as_slice()).unwrap_or_default();
            dev.restore(name, blob)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nkvm_devices::test_device::TestDevice;
    use nkvm_devices::IoDevice;

    fn with_scratch(v: u64) -> Arc<Mutex<TestDevice>> {
        let mut dev = TestDevice::new();
        dev.write(0x20, &v.to_le_bytes());
        Arc::new(Mutex::new(dev))
    }

    #[test]
    fn a_device_set_round_trips_and_a_foreign_set_is_named() {
        let mut saved = SavedDevices::default();
        saved.add_shared("test-device", with_scratch(7));
        let blobs = saved.save_all().unwrap();
        let fresh = Arc::new(Mutex::new(TestDevice::new()));
        let mut other = SavedDevices::default();
        other.add_shared("test-device", fresh.clone());
        other.restore_all(&blobs).unwrap();
        assert_eq!(fresh.lock().unwrap().scratch(0), Some(7));

        let err = other.restore_all(&[("serial".into(), blobs[0].1.clone())]).unwrap_err().to_string();
        assert!(err.contains("[\"serial\"]; this machine has [\"test-device\"]"), "{err}");
        let err = other.restore_all(&[("test-device".into(), vec![1, 2, 3])]).unwrap_err().to_string();
        assert!(err.contains("device test-device: bad state"), "{err}");
    }

    #[test]
    fn an_unsaveable_part_fails_the_whole_save() {
        let mut saved = SavedDevices::default();
        saved.add_shared("test-device", with_scratch(1));
        saved.cannot_save("the disk is served by a vhost-user backend");
        let err = saved.save_all().unwrap_err().to_string();
        assert_eq!(err, "this machine cannot be saved: the disk is served by a vhost-user backend");
    }
}
