//! PCI: bus 0 behind the type-1 configuration mechanism (ports
//! 0xcf8-0xcff), a host bridge, and the configuration space every function
//! carries (header, capabilities, BARs).
//!
//! | file | what |
//! |---|---|
//! | [`config`] | one function's 256-byte configuration space, BAR sizing, capability list |
//! | [`device`] | the [`PciDevice`] trait and the [`HostBridge`] |
//! | [`msix`] | the MSI-X capability, vector table and PBA; the [`MsiSink`] interrupts go to |
//! | [`bus`] | the [`PciBus`]: ports 0xcf8/0xcfc, slots, [`BarEvent`]s |
//!
//! ```
//! use nkvm_devices::pci::PciBus;
//! use nkvm_devices::IoDevice;
//!
//! let mut bus = PciBus::new();
//! bus.write(0, &0x8000_0000u32.to_le_bytes()); // 00:00.0, register 0
//! let mut id = [0u8; 4];
//! bus.read(4, &mut id);
//! assert_eq!(u32::from_le_bytes(id), 0x0d57_8086); // the host bridge
//! ```

pub mod bus;
pub mod config;
pub mod device;
pub mod msix;

pub use bus::{BarEvent, PciBus, PciBusError, PCI_CONFIG_PORT, PCI_CONFIG_PORTS};
pub use config::{BarMapping, ConfigError, ConfigSpace, MemoryBar, PciId};
pub use device::{HostBridge, PciDevice, SharedPciDevice};
pub use msix::{MsiMessage, MsiSink, Msix, MsixLayout};
