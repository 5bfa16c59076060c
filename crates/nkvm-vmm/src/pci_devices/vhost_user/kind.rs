//! What distinguishes one kind of vhost-user device from another on nkvm's
//! side: its virtio and PCI identity, the size of its configuration, the
//! features passed from the backend to the driver, its queues.

/// A kind of virtio device whose queues a vhost-user backend serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceKind {
    /// The name in messages (`virtio-blk`), and the `nkvm device --model`
    /// that serves it.
    pub name: &'static str,
    /// The virtio device type.
    pub device_type: u16,
    /// The PCI class code.
    pub pci_class: u32,
    /// Bytes of device configuration read with `GET_CONFIG`.
    pub config_size: u32,
    /// Feature bits passed from the backend to the driver.
    pub passed_features: u64,
    /// The size nkvm offers for each queue (the number of queues).
    pub queue_max_sizes: &'static [u16],
}

/// `VIRTIO_RING_F_INDIRECT_DESC` and `VIRTIO_RING_F_EVENT_IDX`: between the
/// driver and the backend, the transport is not involved.
const RING_FEATURES: u64 = 1 << 28 | 1 << 29;

/// virtio-blk. The queue size nkvm offers is 256 (qemu-storage-daemon
/// takes up to 1024; nkvm's own block model 256). The configuration is
/// `struct virtio_blk_config` up to and including the write-zeroes fields.
/// Passed: the device-specific features (0-23) and the ring features, but
/// not `VIRTIO_BLK_F_MQ` (one queue) nor `VIRTIO_BLK_F_CONFIG_WCE`
/// (configuration writes are not passed on).
pub const BLOCK: DeviceKind = DeviceKind {
    name: "virtio-blk",
    device_type: 2,
    pci_class: 0x01_80_00,
    config_size: 60,
    passed_features: (0x00ff_ffff | RING_FEATURES) & !(1 << 12 | 1 << 11),
    queue_max_sizes: &[256],
};

/// virtio-console with one port: receive and transmit queues of 64, the
/// 12-byte `struct virtio_console_config`, no `VIRTIO_CONSOLE_F_MULTIPORT`
/// (no control queues).
pub const CONSOLE: DeviceKind = DeviceKind {
    name: "virtio-console",
    device_type: 3,
    pci_class: 0x07_80_00,
    config_size: 12,
    passed_features: (0x00ff_ffff | RING_FEATURES) & !(1 << 1),
    queue_max_sizes: &[64, 64],
};
