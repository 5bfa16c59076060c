//! The virtio-pci common configuration structure (`struct
//! virtio_pci_common_cfg`, virtio 1.2 section 4.1.4.3): feature
//! negotiation, the device status, and the selected queue's registers.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::{Queue, QueueT};

use super::{Activation, VIRTIO_F_VERSION_1};
use crate::bad_access::BadAccessLog;

mod snapshot;

/// Size of the structure (virtio 1.0 layout).
pub const COMMON_CFG_SIZE: u64 = 0x38;
/// "No MSI-X vector" for `msix_config` and `queue_msix_vector`.
pub const NO_VECTOR: u16 = 0xffff;

/// Status bit: the driver accepted the features.
pub const STATUS_FEATURES_OK: u8 = VIRTIO_CONFIG_S_FEATURES_OK as u8;
/// Status bit: the driver is ready.
pub const STATUS_DRIVER_OK: u8 = VIRTIO_CONFIG_S_DRIVER_OK as u8;
/// Status bit: the device hit an error it cannot recover from.
pub const STATUS_NEEDS_RESET: u8 = VIRTIO_CONFIG_S_NEEDS_RESET as u8;
/// Status bit: the driver gave up.
pub const STATUS_FAILED: u8 = VIRTIO_CONFIG_S_FAILED as u8;

const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const MSIX_CONFIG: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

/// What a write to the common configuration asks of the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommonEvent {
    /// Nothing beyond the register change.
    None,
    /// The driver wrote 0 to the status: reset the device.
    Reset,
    /// The driver set `DRIVER_OK`: the device may start.
    DriverOk,
}

/// The common configuration of one device.
#[derive(Debug)]
pub struct CommonConfig {
    device_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    config_vector: u16,
    queues: Vec<Queue>,
    queue_vectors: Vec<u16>,
    msix_vectors: u16,
    /// What the driver got wrong: the first at warn level, then debug.
    driver_errors: BadAccessLog,
}

impl CommonConfig {
    /// State after reset for a device offering `device_features` (plus
    /// `VIRTIO_F_VERSION_1`) with queues of `queue_max_sizes` and
    /// `msix_vectors` MSI-X vectors. Invalid maximum sizes (not a power of
    /// two, over 32768) fall back to 256.
    pub fn new(device_features: u64, queue_max_sizes: &[u16], msix_vectors: u16) -> Self {
        let queues = queue_max_sizes
            .iter()
            .map(|&max| Queue::new(max).or_else(|_| Queue::new(256)))
            .collect::<Result<Vec<_>, _>>()
            .unwrap_or_default();
        Self {
            device_features: device_features | VIRTIO_F_VERSION_1,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            config_vector: NO_VECTOR,
            queue_vectors: vec![NO_VECTOR; queues.len()],
            queues,
            msix_vectors,
            driver_errors: BadAccessLog::default(),
        }
    }

    /// Back to the state after `new` (the queues too).
    pub fn reset(&mut self) {
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.queue_select = 0;
        self.config_vector = NO_VECTOR;
        self.queue_vectors.fill(NO_VECTOR);
        self.queues.iter_mut().for_each(QueueT::reset);
    }

    /// The device status byte.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// Whether the driver is running the device (`DRIVER_OK` after
    /// `FEATURES_OK`, no `NEEDS_RESET`).
    pub fn running(&self) -> bool {
        let ok = STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        self.status & ok == ok && self.status & (STATUS_NEEDS_RESET | STATUS_FAILED) == 0
    }

    /// Marks the device broken until the driver resets it; bumps the
    /// configuration generation.
    pub fn set_needs_reset(&mut self) {
        self.status |= STATUS_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
    }

    /// The features the driver accepted.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// The MSI-X vector for configuration changes.
    pub fn config_vector(&self) -> u16 {
        self.config_vector
    }

    /// The MSI-X vector of queue `index`.
    pub fn queue_vector(&self, index: usize) -> u16 {
        self.queue_vectors.get(index).copied().unwrap_or(NO_VECTOR)
    }

    /// Queue `index`, if it exists.
    pub fn queue_mut(&mut self, index: usize) -> Option<&mut Queue> {
        self.queues.get_mut(index)
    }

    /// The queues as the driver set them up.
    pub fn queues(&self) -> &[Queue] {
        &self.queues
    }

    /// The MSI-X vector of each queue.
    pub fn queue_vectors(&self) -> &[u16] {
        &self.queue_vectors
    }

    /// What the driver has set up: its features, the queues, their vectors.
    pub fn activation(&self) -> Activation<'_> {
        Activation { features: self.driver_features(), queues: self.queues(), vectors: self.queue_vectors() }
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    fn selected(&self) -> Option<&Queue> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// The structure's bytes as the driver reads them now.
    fn image(&self) -> [u8; COMMON_CFG_SIZE as usize] {
        let mut b = [0u8; COMMON_CFG_SIZE as usize];
        let mut put = |at: u64, bytes: &[u8]| b[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
        let half = |value: u64, select: u32| match select {
            0 => value as u32,
            1 => (value >> 32) as u32,
            _ => 0,
        };
        put(DEVICE_FEATURE_SELECT, &self.device_feature_select.to_le_bytes());
        put(DEVICE_FEATURE, &half(self.device_features, self.device_feature_select).to_le_bytes());
        put(DRIVER_FEATURE_SELECT, &self.driver_feature_select.to_le_bytes());
        put(DRIVER_FEATURE, &half(self.driver_features, self.driver_feature_select).to_le_bytes());
        put(MSIX_CONFIG, &self.config_vector.to_le_bytes());
        put(NUM_QUEUES, &(self.queues.len() as u16).to_le_bytes());
        put(DEVICE_STATUS, &[self.status]);
        put(CONFIG_GENERATION, &[self.config_generation]);
        put(QUEUE_SELECT, &self.queue_select.to_le_bytes());
        if let Some(q) = self.selected() {
            put(QUEUE_SIZE, &q.size().to_le_bytes());
            put(QUEUE_MSIX_VECTOR, &self.queue_vector(usize::from(self.queue_select)).to_le_bytes());
            put(QUEUE_ENABLE, &u16::from(q.ready()).to_le_bytes());
            put(QUEUE_NOTIFY_OFF, &self.queue_select.to_le_bytes());
            put(QUEUE_DESC, &q.desc_table().to_le_bytes());
            put(QUEUE_DRIVER, &q.avail_ring().to_le_bytes());
            put(QUEUE_DEVICE, &q.used_ring().to_le_bytes());
        }
        b
    }

    /// The driver reads `data.len()` bytes at `offset`; past the structure reads 0.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let image = self.image();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| image.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// The driver writes `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> CommonEvent {
        let mut raw = [0u8; 8];
        let len = data.len().min(8);
        raw[..len].copy_from_slice(&data[..len]);
        let value = u64::from_le_bytes(raw);
        let select = usize::from(self.queue_select);
        match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => self.device_feature_select = value as u32,
            (DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select = value as u32,
            (DRIVER_FEATURE, 4) => self.write_driver_features(value as u32),
            (MSIX_CONFIG, 2) => self.config_vector = self.checked_vector(value as u16),
            (DEVICE_STATUS, 1) => return self.write_status(value as u8),
            (QUEUE_SELECT, 2) => self.queue_select = value as u16,
            (QUEUE_MSIX_VECTOR, 2) => {
                let vector = self.checked_vector(value as u16);
                if let Some(v) = self.queue_vectors.get_mut(select) {
                    *v = vector;
                }
            }
            (QUEUE_SIZE | QUEUE_ENABLE | QUEUE_DESC..=0x37, _) => self.write_queue(offset, data.len(), value),
            _ => log::debug!("virtio: ignored common-config write of {} bytes at {offset:#x}", data.len()),
        }
        CommonEvent::None
    }

    /// A vector the MSI-X table has, or `NO_VECTOR` (what the driver reads back).
    fn checked_vector(&self, vector: u16) -> u16 {
        if vector < self.msix_vectors {
            vector
        } else {
            NO_VECTOR
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & STATUS_FEATURES_OK != 0 {
            log::debug!("virtio: driver features written after FEATURES_OK; ignored");
            return;
        }
        match self.driver_feature_select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32),
            _ => {}
        }
    }

    fn write_status(&mut self, value: u8) -> CommonEvent {
        if value == 0 {
            self.reset();
            return CommonEvent::Reset;
        }
        // Only a reset clears bits (virtio 1.2, 2.1.2: the driver MUST NOT
        // clear a status bit). Taken as written, a cleared and re-set
        // DRIVER_OK would activate the device a second time, handing a
        // vhost-user backend its queues again from a stale index.
        if value & self.status != self.status {
            log::debug!("virtio: status {value:#x} would clear bits of {:#x} without a reset; kept", self.status);
        }
        let mut value = value | self.status;
        let newly = value & !self.status;
        if newly & STATUS_FEATURES_OK != 0 {
            let unknown = self.driver_features & !self.device_features;
            if unknown != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                self.driver_errors.log(
                    "virtio",
                    format_args!(
                        "driver features {:#x} refused (offered {:#x}, VERSION_1 required)",
                        self.driver_features, self.device_features
                    ),
                );
                value &= !STATUS_FEATURES_OK;
            }
        }
        if newly & STATUS_DRIVER_OK != 0 && value & STATUS_FEATURES_OK == 0 {
            // No features agreed, nothing to run: refused, as FEATURES_OK is.
            log::debug!("virtio: DRIVER_OK without FEATURES_OK; refused");
            value &= !STATUS_DRIVER_OK;
        }
        self.status = value;
        if value & newly & STATUS_DRIVER_OK != 0 {
            CommonEvent::DriverOk
        } else {
            CommonEvent::None
        }
    }

    fn write_queue(&mut self, offset: u64, len: usize, value: u64) {
        let Some(q) = self.queues.get_mut(usize::from(self.queue_select)) else {
            log::debug!("virtio: write to queue {} which does not exist; ignored", self.queue_select);
            return;
        };
        if q.ready() && offset != QUEUE_ENABLE {
            log::debug!("virtio: queue {} reconfigured while enabled; ignored", self.queue_select);
            return;
        }
        let low = Some(value as u32);
        let high = Some((value >> 32) as u32);
        match (offset, len) {
            // Checked here: virtio-queue logs every bad size at error level.
            (QUEUE_SIZE, 2) if (value as u16).is_power_of_two() && value as u16 <= q.max_size() => {
                q.set_size(value as u16)
            }
            (QUEUE_SIZE, 2) => self.driver_errors.log(
                "virtio",
                format_args!(
                    "queue {} size {value} refused (a power of two up to {})",
                    self.queue_select,
                    q.max_size()
                ),
            ),
            // virtio-queue takes a driver ring at guest address 0 for "not
            // set up" and refuses to serve it: refused here, by its name,
            // rather than failing the device later with "not ready".
            (QUEUE_ENABLE, 2) if value as u16 == 1 && q.avail_ring() == 0 => self.driver_errors.log(
                "virtio",
                format_args!(
                    "queue {}: a driver ring at guest address 0 cannot be served; not enabled",
                    self.queue_select
                ),
            ),
            (QUEUE_ENABLE, 2) => q.set_ready(value as u16 == 1),
            (QUEUE_DESC, 8) => q.set_desc_table_address(low, high),
            (QUEUE_DESC, 4) => q.set_desc_table_address(low, None),
            (0x24, 4) => q.set_desc_table_address(None, low),
            (QUEUE_DRIVER, 8) => q.set_avail_ring_address(low, high),
            (QUEUE_DRIVER, 4) => q.set_avail_ring_address(low, None),
            (0x2c, 4) => q.set_avail_ring_address(None, low),
            (QUEUE_DEVICE, 8) => q.set_used_ring_address(low, high),
            (QUEUE_DEVICE, 4) => q.set_used_ring_address(low, None),
            (0x34, 4) => q.set_used_ring_address(None, low),
            _ => log::debug!("virtio: ignored queue write of {len} bytes at {offset:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write32(c: &mut CommonConfig, offset: u64, v: u32) -> CommonEvent {
        c.write(offset, &v.to_le_bytes())
    }

    fn read32(c: &CommonConfig, offset: u64) -> u32 {
        let mut d = [0; 4];
        c.read(offset, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn features_are_offered_in_two_halves_and_version_1_is_required() {
        let mut c = CommonConfig::new(1 << 9, &[128], 2);
        assert_eq!(read32(&c, DEVICE_FEATURE), 1 << 9);
        write32(&mut c, DEVICE_FEATURE_SELECT, 1);
        assert_eq!(read32(&c, DEVICE_FEATURE), 1, "VERSION_1 is bit 32");
        // A driver without VERSION_1 does not get FEATURES_OK.
        write32(&mut c, DRIVER_FEATURE, 1 << 9);
        c.write(DEVICE_STATUS, &[1 | 2 | STATUS_FEATURES_OK]);
        assert_eq!(c.status() & STATUS_FEATURES_OK, 0);
        // Nor one asking for features not offered.
        write32(&mut c, DRIVER_FEATURE_SELECT, 1);
        write32(&mut c, DRIVER_FEATURE, 1 | 2);
        c.write(DEVICE_STATUS, &[1 | 2 | STATUS_FEATURES_OK]);
        assert_eq!(c.status() & STATUS_FEATURES_OK, 0);
        write32(&mut c, DRIVER_FEATURE, 1);
        c.write(DEVICE_STATUS, &[1 | 2 | STATUS_FEATURES_OK]);
        assert_eq!(c.status() & STATUS_FEATURES_OK, STATUS_FEATURES_OK);
        assert_eq!(c.driver_features(), VIRTIO_F_VERSION_1 | 1 << 9);
        // Frozen after FEATURES_OK.
        write32(&mut c, DRIVER_FEATURE, 0);
        assert_eq!(c.driver_features(), VIRTIO_F_VERSION_1 | 1 << 9);
        assert_eq!(c.write(DEVICE_STATUS, &[1 | 2 | STATUS_FEATURES_OK | STATUS_DRIVER_OK]), CommonEvent::DriverOk);
        assert!(c.running());
        assert_eq!(c.write(DEVICE_STATUS, &[0]), CommonEvent::Reset);
        assert_eq!(c.status(), 0);
        assert_eq!(c.driver_features(), 0);
    }

    /// A CommonConfig the driver has taken to FEATURES_OK.
    fn negotiated() -> CommonConfig {
        let mut c = CommonConfig::new(0, &[128], 2);
        write32(&mut c, DRIVER_FEATURE_SELECT, 1);
        write32(&mut c, DRIVER_FEATURE, 1);
        c.write(DEVICE_STATUS, &[1 | 2 | STATUS_FEATURES_OK]);
        assert_eq!(c.status(), 1 | 2 | STATUS_FEATURES_OK);
        c
    }

    #[test]
    fn a_status_write_that_clears_driver_ok_does_not_activate_the_device_twice() {
        let mut c = negotiated();
        let all = 1 | 2 | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        assert_eq!(c.write(DEVICE_STATUS, &[all]), CommonEvent::DriverOk);
        // Clearing bits without a reset is ignored: still running, and DRIVER_OK
        // written again is not a new activation.
        assert_eq!(c.write(DEVICE_STATUS, &[all & !STATUS_DRIVER_OK]), CommonEvent::None);
        assert_eq!(c.status(), all);
        assert!(c.running());
        assert_eq!(c.write(DEVICE_STATUS, &[all]), CommonEvent::None);
        // After a reset, the whole dance activates it again.
        assert_eq!(c.write(DEVICE_STATUS, &[0]), CommonEvent::Reset);
        let mut c = negotiated();
        assert_eq!(c.write(DEVICE_STATUS, &[all]), CommonEvent::DriverOk);
    }

    #[test]
    fn a_queue_whose_driver_ring_is_at_address_0_is_not_enabled() {
        let mut c = negotiated();
        c.write(QUEUE_DESC, &0x1000u64.to_le_bytes());
        c.write(QUEUE_DEVICE, &0x3000u64.to_le_bytes());
        c.write(QUEUE_ENABLE, &1u16.to_le_bytes());
        let mut d = [0; 2];
        c.read(QUEUE_ENABLE, &mut d);
        assert_eq!(u16::from_le_bytes(d), 0, "refused: the driver reads back 0");
        c.write(QUEUE_DRIVER, &0x2000u64.to_le_bytes());
        c.write(QUEUE_ENABLE, &1u16.to_le_bytes());
        c.read(QUEUE_ENABLE, &mut d);
        assert_eq!(u16::from_le_bytes(d), 1);
    }

    #[test]
    fn driver_ok_without_features_ok_is_refused_and_nothing_runs() {
        let mut c = CommonConfig::new(0, &[128], 2);
        assert_eq!(c.write(DEVICE_STATUS, &[1 | 2 | STATUS_DRIVER_OK]), CommonEvent::None);
        assert_eq!(c.status(), 1 | 2, "the driver reads back that DRIVER_OK did not take");
        assert!(!c.running());
        // Nor with FEATURES_OK refused in the same write (no VERSION_1).
        assert_eq!(c.write(DEVICE_STATUS, &[1 | 2 | STATUS_FEATURES_OK | STATUS_DRIVER_OK]), CommonEvent::None);
        assert!(!c.running());
    }

    #[test]
    fn queue_registers_and_vectors() {
        let mut c = CommonConfig::new(0, &[128, 64], 2);
        let mut d = [0; 2];
        c.read(NUM_QUEUES, &mut d);
        assert_eq!(u16::from_le_bytes(d), 2);
        c.write(QUEUE_SELECT, &1u16.to_le_bytes());
        c.read(QUEUE_SIZE, &mut d);
        assert_eq!(u16::from_le_bytes(d), 64);
        c.write(QUEUE_SIZE, &32u16.to_le_bytes());
        write32(&mut c, QUEUE_DESC, 0x1000);
        write32(&mut c, QUEUE_DESC + 4, 1);
        c.write(QUEUE_DRIVER, &0x2000u64.to_le_bytes());
        c.write(QUEUE_MSIX_VECTOR, &1u16.to_le_bytes());
        c.write(MSIX_CONFIG, &5u16.to_le_bytes());
        c.write(QUEUE_ENABLE, &1u16.to_le_bytes());
        let mut q = [0; 8];
        c.read(QUEUE_DESC, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x1_0000_1000);
        c.read(QUEUE_DRIVER, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x2000);
        assert_eq!(c.queue_vector(1), 1);
        assert_eq!(c.config_vector(), NO_VECTOR, "vector 5 does not exist");
        c.read(QUEUE_NOTIFY_OFF, &mut d);
        assert_eq!(u16::from_le_bytes(d), 1);
        // Enabled queues keep their configuration.
        c.write(QUEUE_SIZE, &16u16.to_le_bytes());
        c.read(QUEUE_SIZE, &mut d);
        assert_eq!(u16::from_le_bytes(d), 32);
        // A queue that does not exist reads 0 and ignores writes.
        c.write(QUEUE_SELECT, &9u16.to_le_bytes());
        c.write(QUEUE_SIZE, &16u16.to_le_bytes());
        c.read(QUEUE_SIZE, &mut d);
        assert_eq!(d, [0, 0]);
    }

    #[test]
    fn needs_reset_sticks_until_reset() {
        let mut c = CommonConfig::new(0, &[8], 1);
        write32(&mut c, DRIVER_FEATURE_SELECT, 1);
        write32(&mut c, DRIVER_FEATURE, 1);
        c.write(DEVICE_STATUS, &[1 | 2 | STATUS_FEATURES_OK | STATUS_DRIVER_OK]);
        c.set_needs_reset();
        assert!(!c.running());
        c.write(DEVICE_STATUS, &[1 | 2 | STATUS_FEATURES_OK | STATUS_DRIVER_OK]);
        assert_eq!(c.status() & STATUS_NEEDS_RESET, STATUS_NEEDS_RESET);
        let mut g = [0];
        c.read(CONFIG_GENERATION, &mut g);
        assert_eq!(g[0], 1);
        c.write(DEVICE_STATUS, &[0]);
        assert!(!c.running());
        assert_eq!(c.status(), 0);
    }

    #[test]
    fn odd_accesses_are_harmless() {
        let mut c = CommonConfig::new(0, &[8], 1);
        let mut d = [0xaa; 8];
        c.read(0x36, &mut d);
        c.read(u64::MAX, &mut d);
        assert_eq!(d, [0; 8]);
        c.write(0x35, &[1, 2, 3]);
        c.write(u64::MAX, &[1]);
        c.write(DEVICE_STATUS, &[]);
    }
}
