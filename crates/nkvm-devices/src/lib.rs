//! Device models for nkvm, usable in the VMM process or in their own.
//!
//! Every model is a plain state machine: it answers [`IoDevice`] reads and
//! writes at offsets in its region and signals interrupts through an
//! [`IrqLine`] or an [`ApicBusSink`]. No model owns a thread, a socket or a
//! KVM handle; the transport that carries accesses to it (an in-process
//! [`IoBus`] or a socket) is separate.
//!
//! | model | file | region |
//! |---|---|---|
//! | 16550 UART | [`serial`] | 8 ports (e.g. 0x3f8) |
//! | MC146818 RTC and CMOS RAM | [`cmos`] | ports 0x70-0x71 |
//! | IOAPIC | [`ioapic`] | 0x100 bytes MMIO (e.g. 0xfec0_0000) |
//! | dual 8259 PIC and its ELCR | [`pic`] | ports 0x20-0x21, 0xa0-0xa1, 0x4d0-0x4d1 |
//! | 8254 PIT, speaker port bits | [`pit`] | ports 0x40-0x43, 0x61 |
//! | System Control Port A (A20, fast reset) | [`port92`] | port 0x92 |
//! | ACPI PM1a control, i8042 reset | [`power`] | 2 ports, port 0x64 |
//! | ACPI PM timer, 32 bits | [`pm_timer`] | 4 ports (FADT `PM_TMR_BLK`, e.g. 0x608) |
//! | QEMU isa-debug-exit (test exit status) | [`debug_exit`] | ports 0xf4-0xf7 |
//! | QEMU fw_cfg, legacy I/O (CPU count, RAM size) | [`fw_cfg`] | ports 0x510-0x511 |
//! | QEMU pc-testdev: scratch, flush page, IRQ lines, I/O RAM | [`pc_testdev`] | ports 0xe0-0xeb, 0x2000-0x2017; MMIO 0xff00_0000 + 64 KiB |
//! | test device | [`test_device`] | 0x40 bytes |
//! | PCI bus 0, host bridge | [`pci`] | ports 0xcf8-0xcff |
//! | virtio-pci block, console | [`virtio`] | one memory BAR each, MSI-X |
//!
//! ```
//! use nkvm_devices::bus::IoBus;
//! use nkvm_devices::test_device::{TestDevice, TEST_DEVICE_ID, TEST_DEVICE_SIZE};
//!
//! let mut bus = IoBus::new();
//! bus.insert(0xd000_0000, TEST_DEVICE_SIZE, Box::new(TestDevice::new())).unwrap();
//! let mut id = [0u8; 8];
//! assert!(bus.read(0xd000_0000, &mut id));
//! assert_eq!(u64::from_le_bytes(id), TEST_DEVICE_ID);
//! ```
#![forbid(unsafe_code)]

mod bad_access;
pub mod bus;
pub mod cmos;
pub mod debug_exit;
pub mod fw_cfg;
pub mod ioapic;
pub mod pc_testdev;
pub mod pci;
pub mod pic;
pub mod pins;
pub mod pit;
pub mod pm_timer;
pub mod port92;
pub mod power;
pub mod serial;
pub mod serve;
pub mod snapshot;
pub mod test_device;
pub mod virtio;

pub use bus::{ApicBusSink, BusError, IoBus, IoDevice, IrqLine};
pub use snapshot::{Snapshot, SnapshotError};
