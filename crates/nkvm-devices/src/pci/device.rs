//! What a PCI function offers the bus: its configuration space and its
//! BAR regions.

use std::sync::{Arc, Mutex};

use super::config::{ConfigSpace, PciId};

/// A PCI function on the bus.
///
/// The bus applies configuration writes to [`config_mut`](Self::config_mut)
/// (write masks and all) and then tells the device with
/// [`config_written`](Self::config_written), so capabilities with side
/// effects (MSI-X enable and mask) can react. BAR accesses come from the
/// MMIO regions the VMM maps where the BARs point; `offset` is relative to
/// the BAR's start.
pub trait PciDevice: Send {
    /// The configuration space.
    fn config(&self) -> &ConfigSpace;
    /// The configuration space, to apply a guest write.
    fn config_mut(&mut self) -> &mut ConfigSpace;
    /// Called after the guest wrote `len` bytes at `offset` of the configuration space.
    fn config_written(&mut self, offset: usize, len: usize);
    /// The guest reads `data.len()` bytes at `offset` in BAR `bar`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset` in BAR `bar`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
}

/// A PCI function shared by the bus (configuration accesses) and the MMIO
/// regions of its BARs.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// The host bridge at 00:00.0: a header and nothing else, so that the
/// guest's PCI probing (Linux's `pci_sanity_check`) finds a host bridge.
#[derive(Debug, Clone)]
pub struct HostBridge {
    config: ConfigSpace,
}

/// Intel's vendor ID.
pub const HOST_BRIDGE_VENDOR: u16 = 0x8086;
/// The host bridge's device ID (the one cloud-hypervisor also uses).
pub const HOST_BRIDGE_DEVICE: u16 = 0x0d57;
/// Class code of a host bridge.
pub const CLASS_HOST_BRIDGE: u32 = 0x06_00_00;

impl HostBridge {
    /// A host bridge with the IDs above.
    pub fn new() -> Self {
        let id = PciId {
            vendor: HOST_BRIDGE_VENDOR,
            device: HOST_BRIDGE_DEVICE,
            revision: 0,
            class: CLASS_HOST_BRIDGE,
            subsystem_vendor: 0,
            subsystem: 0,
        };
        Self { config: ConfigSpace::new(id) }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn config_written(&mut self, _offset: usize, _len: usize) {}

    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}
