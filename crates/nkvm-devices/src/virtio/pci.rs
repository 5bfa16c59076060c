//! The modern virtio-pci transport (virtio 1.2 section 4.1): a PCI function
//! whose BAR0 holds the virtio structures and the MSI-X table.
//!
//! BAR0 (64-bit memory, [`BAR_SIZE`] bytes):
//!
//! | offset | what |
//! |---|---|
//! | 0x0000 | common configuration ([`super::common`]) |
//! | 0x1000 | ISR status (read to clear) |
//! | 0x2000 | device-specific configuration |
//! | 0x3000 | notifications: queue N at N * [`NOTIFY_OFF_MULTIPLIER`] |
//! | 0x4000 | MSI-X table (16 bytes per vector: config vector + one per queue) |
//! | 0x5000 | MSI-X pending-bit array |

use std::fmt;

use super::common::{CommonConfig, CommonEvent, COMMON_CFG_SIZE, NO_VECTOR};
use super::{GuestRam, VirtioDevice, VirtioError};
use crate::pci::config::{ConfigError, ConfigSpace, MemoryBar, PciId};
use crate::pci::msix::{MsiSink, Msix, MsixLayout};
use crate::pci::PciDevice;

mod snapshot;

/// Vendor ID of virtio devices.
pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
/// Device ID of a modern virtio device is this plus its type.
pub const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;
/// Size of BAR0.
pub const BAR_SIZE: u64 = 0x8000;
/// Offset of the common configuration in BAR0.
pub const COMMON_OFFSET: u64 = 0x0000;
/// Offset of the ISR status byte in BAR0.
pub const ISR_OFFSET: u64 = 0x1000;
/// Offset of the device-specific configuration in BAR0.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
/// Offset of the notification area in BAR0.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Offset of the MSI-X table in BAR0.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// Offset of the MSI-X PBA in BAR0.
pub const MSIX_PBA_OFFSET: u64 = 0x5000;
/// Length of each of the areas above.
const AREA: u64 = 0x1000;

/// Capability ID of a vendor-specific (virtio) capability.
const CAP_ID_VENDOR: u8 = 0x09;
/// `cfg_type` of the common configuration.
pub const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
/// `cfg_type` of the notification area.
pub const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
/// `cfg_type` of the ISR status.
pub const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
/// `cfg_type` of the device-specific configuration.
pub const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;

/// ISR bit: a queue has used buffers.
const ISR_QUEUE: u8 = 1;
/// ISR bit: the configuration changed.
const ISR_CONFIG: u8 = 2;

/// Why a virtio-pci function could not be built.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    /// The configuration space could not hold the BAR or a capability.
    #[error("cannot lay out the virtio-pci configuration space")]
    Config(#[from] ConfigError),
    /// The device has more queues than the MSI-X table and notify area allow.
    #[error("{0} queues is more than the virtio-pci transport supports (1-1000)")]
    Queues(usize),
}

/// A virtio device on PCI.
pub struct VirtioPci<D: VirtioDevice> {
    config: ConfigSpace,
    msix: Msix,
    common: CommonConfig,
    isr: u8,
    device: D,
    mem: GuestRam,
}

impl<D: VirtioDevice> fmt::Debug for VirtioPci<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtioPci")
            .field("type", &self.device.device_type())
            .field("common", &self.common)
            .field("isr", &self.isr)
            .field("msix", &self.msix)
            .finish_non_exhaustive()
    }
}

/// A virtio vendor capability: cap_vndr, cap_next, cap_len, cfg_type, bar,
/// id, padding, offset, length (and notify_off_multiplier for notify).
fn virtio_cap(cfg_type: u8, offset: u64, length: u64, multiplier: Option<u32>) -> Vec<u8> {
    let len = if multiplier.is_some() { 20 } else { 16 };
    let mut b = vec![CAP_ID_VENDOR, 0, len, cfg_type, 0, 0, 0, 0];
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(m) = multiplier {
        b.extend_from_slice(&m.to_le_bytes());
    }
    b
}

impl<D: VirtioDevice> VirtioPci<D> {
    /// Puts `device` on PCI: BAR0 at `bar_address` (0: unassigned), guest
    /// memory `mem` for its queues, MSI-X vectors to `sink` (vector 0
    /// conventionally for configuration changes, one per queue after it).
    pub fn new(device: D, mem: GuestRam, bar_address: u64, sink: Box<dyn MsiSink>) -> Result<Self, VirtioPciError> {
        let queues = device.queue_max_sizes().len();
        if queues == 0 || queues > 1000 {
            return Err(VirtioPciError::Queues(queues));
        }
        let vectors = queues as u16 + 1;
        let type_ = device.device_type();
        let id = PciId {
            vendor: VIRTIO_PCI_VENDOR,
            device: VIRTIO_PCI_DEVICE_BASE + type_,
            revision: 1,
            class: device.pci_class(),
            subsystem_vendor: VIRTIO_PCI_VENDOR,
            subsystem: 0x40 + type_,
        };
        let mut config = ConfigSpace::new(id);
        config.set_memory_bar(
            0,
            MemoryBar { size: BAR_SIZE, address: bar_address, is_64bit: true, prefetchable: false },
        )?;
        config.add_capability(&virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET, COMMON_CFG_SIZE, None), &[])?;
        config.add_capability(&virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, 1, None), &[])?;
        config.add_capability(&virtio_cap(VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_CFG_OFFSET, AREA, None), &[])?;
        let notify = virtio_cap(VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_OFFSET, AREA, Some(NOTIFY_OFF_MULTIPLIER));
        config.add_capability(&notify, &[])?;
        let layout = MsixLayout {
            vectors,
            table_bar: 0,
            table_offset: MSIX_TABLE_OFFSET as u32,
            pba_bar: 0,
            pba_offset: MSIX_PBA_OFFSET as u32,
        };
        let msix = Msix::new(&mut config, layout, sink)?;
        let common = CommonConfig::new(device.features(), device.queue_max_sizes(), vectors);
        Ok(Self { config, msix, common, isr: 0, device, mem })
    }

    /// The device model.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device model, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The device status byte (`DEVICE_NEEDS_RESET` set once broken).
    pub fn status(&self) -> u8 {
        self.common.status()
    }

    /// The queues the driver enabled, while the device runs (`DRIVER_OK`
    /// and not broken): those [`drain`](Self::drain) and
    /// [`resume`](Self::resume) serve.
    pub fn enabled_queues(&self) -> Vec<usize> {
        if !self.common.running() {
            return Vec::new();
        }
        let queues = self.common.queues().iter().enumerate();
        queues.filter(|(_, q)| virtio_queue::QueueT::ready(*q)).map(|(i, _)| i).collect()
    }

    /// Serves every buffer the driver made available on an enabled queue,
    /// as a notification of each would. Called before the state is saved
    /// (with the vCPUs paused and the device's lock held), so the state
    /// holds no request the driver made available that a worker would serve
    /// after the save (lost to the copy, or done twice).
    pub fn drain(&mut self) {
        for q in self.enabled_queues() {
            self.notify_queue(q);
        }
    }

    /// Readies the state for a save (vCPUs paused, the device's lock held):
    /// serves what is available ([`drain`](Self::drain)), then lets a device
    /// whose queues are served elsewhere stop them and takes its positions
    /// into the transport's queues ([`VirtioDevice::stop_for_save`]), so the
    /// saved state is the one an in-process model of the same device would
    /// have saved.
    ///
    /// # Errors
    ///
    /// The device's, if its queues cannot be stopped: nothing is saved and
    /// [`resume_after_save`](Self::resume_after_save) restarts them.
    pub fn prepare_save(&mut self) -> Result<(), VirtioError> {
        self.drain();
        for p in self.device.stop_for_save(&self.mem)? {
            if let Some(queue) = self.common.queue_mut(p.index) {
                virtio_queue::QueueT::set_next_avail(queue, p.next_avail);
                virtio_queue::QueueT::set_next_used(queue, p.next_used);
            }
        }
        Ok(())
    }

    /// The machine runs on after a save (or a failed one): the device
    /// restarts what [`prepare_save`](Self::prepare_save) stopped.
    pub fn resume_after_save(&mut self) {
        self.device.resume_after_save();
    }

    /// What a restored device does before the vCPUs run: lets a device
    /// served elsewhere take its queues back ([`VirtioDevice::restored`]),
    /// serves what is available on each enabled queue, then interrupts the driver once per
    /// enabled queue (the one serving raised, or one of its own). The old
    /// machine may have raised an interrupt that did not travel; a spurious
    /// one finds nothing new in the used ring, which virtio drivers take in
    /// their stride. Call it once the vCPUs' local APICs are restored: an
    /// interrupt delivered before would be overwritten.
    pub fn resume(&mut self) {
        if self.common.running() {
            let activation = self.common.activation();
            if let Err(e) = self.device.restored(&activation) {
                self.fail(&e);
                return;
            }
        }
        for q in self.enabled_queues() {
            if !self.serve(q) {
                self.interrupt(self.common.queue_vector(q), ISR_QUEUE);
            }
        }
    }

    /// The driver notified queue `index` (or a worker polls it): serve it
    /// and interrupt the driver if buffers were used.
    pub fn notify_queue(&mut self, index: usize) {
        self.serve(index);
    }

    /// Serves queue `index`; returns whether the driver was interrupted.
    fn serve(&mut self, index: usize) -> bool {
        if !self.common.running() {
            log::debug!("virtio: notify of queue {index} while the device is not running; ignored");
            return false;
        }
        let Some(queue) = self.common.queue_mut(index) else {
            log::debug!("virtio: notify of queue {index} which does not exist; ignored");
            return false;
        };
        if !virtio_queue::QueueT::ready(queue) {
            return false;
        }
        match self.device.process_queue(index, queue, &self.mem) {
            Ok(false) => false,
            Ok(true) => {
                let wanted = virtio_queue::QueueT::needs_notification(queue, &self.mem).unwrap_or(true);
                if wanted {
                    self.interrupt(self.common.queue_vector(index), ISR_QUEUE);
                }
                wanted
            }
            Err(e) => {
                self.fail(&e);
                true
            }
        }
    }

    /// The device cannot go on (`why`): it sets `DEVICE_NEEDS_RESET` and
    /// interrupts the driver with a configuration change.
    pub fn fail(&mut self, why: &VirtioError) {
        log::error!("virtio device type {}: {why}; the device needs a reset", self.device.device_type());
        self.common.set_needs_reset();
        self.interrupt(self.common.config_vector(), ISR_CONFIG);
    }

    fn interrupt(&mut self, vector: u16, isr: u8) {
        if vector != NO_VECTOR && self.msix.enabled() {
            self.msix.signal(vector);
        } else {
            // INTx is not wired; the driver can still poll the ISR.
            self.isr |= isr;
        }
    }

    fn read_bar0(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON_OFFSET + AREA => self.common.read(o - COMMON_OFFSET, data),
            o if o == ISR_OFFSET => {
                data.fill(0);
                if let Some(b) = data.first_mut() {
                    *b = std::mem::take(&mut self.isr);
                }
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + AREA).contains(&o) => {
                self.device.read_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if self.msix.in_table(0, o) => self.msix.table_read(o - MSIX_TABLE_OFFSET, data),
            o if self.msix.in_pba(0, o) => self.msix.pba_read(o - MSIX_PBA_OFFSET, data),
            _ => data.fill(0),
        }
    }

    fn write_bar0(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_OFFSET + AREA => match self.common.write(o - COMMON_OFFSET, data) {
                CommonEvent::None => {}
                CommonEvent::Reset => {
                    self.isr = 0;
                    self.device.reset();
                }
                CommonEvent::DriverOk => {
                    let activation = self.common.activation();
                    if let Err(e) = self.device.activate(&activation) {
                        self.fail(&e);
                    }
                }
            },
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + AREA).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + AREA).contains(&o) => {
                self.notify_queue(((o - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER)) as usize)
            }
            o if self.msix.in_table(0, o) => self.msix.table_write(o - MSIX_TABLE_OFFSET, data),
            _ => log::debug!("virtio: ignored BAR0 write of {} bytes at {offset:#x}", data.len()),
        }
    }
}

impl<D: VirtioDevice> PciDevice for VirtioPci<D> {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn config_written(&mut self, offset: usize, len: usize) {
        if self.msix.covers(offset, len) {
            self.msix.config_written(&self.config);
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar == 0 {
            self.read_bar0(offset, data);
        } else {
            data.fill(0xff);
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar == 0 {
            self.write_bar0(offset, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::pci::config::{BAR0, CAPABILITIES_POINTER, COMMAND, COMMAND_MEMORY};
    use crate::pci::msix::tests::{RecordingSink, SinkEvent};
    use crate::pci::PciBus;
    use crate::virtio::common::{STATUS_DRIVER_OK, STATUS_FEATURES_OK};
    use crate::virtio::console::{Console, TRANSMIT_QUEUE};
    use crate::virtio::testing::{common_read32, enable_msix, notify, ram, status, Driver};
    use crate::IoDevice;

    fn console() -> (VirtioPci<Console<Vec<u8>>>, RecordingSink) {
        let sink = RecordingSink::default();
        let dev = VirtioPci::new(Console::new(Vec::new()), ram(), 0xc000_0000, Box::new(sink.clone())).unwrap();
        (dev, sink)
    }

    /// (cfg_type, bar, offset, length, multiplier) of each virtio capability.
    fn virtio_caps(config: &ConfigSpace) -> Vec<(u8, u8, u32, u32, u32)> {
        let mut caps = Vec::new();
        let mut at = usize::from(config.read_u16(CAPABILITIES_POINTER) as u8);
        while at != 0 {
            let head = config.read_u32(at);
            if head as u8 == CAP_ID_VENDOR {
                let multiplier = if (head >> 16) as u8 == 20 { config.read_u32(at + 16) } else { 0 };
                let bar = config.read_u16(at + 4) as u8;
                caps.push(((head >> 24) as u8, bar, config.read_u32(at + 8), config.read_u32(at + 12), multiplier));
            }
            at = usize::from((head >> 8) as u8);
        }
        caps
    }

    #[test]
    fn header_identifies_a_modern_virtio_device_with_its_capabilities() {
        let (dev, _) = console();
        let c = dev.config();
        assert_eq!(c.read_u32(0), 0x1043_1af4, "virtio console, modern device ID");
        assert_eq!(c.read_u32(8), 0x0780_0001, "class 0x078000, revision 1");
        assert_eq!(c.read_u32(0x2c), 0x0043_1af4);
        assert_eq!(
            virtio_caps(c),
            vec![
                (VIRTIO_PCI_CAP_COMMON_CFG, 0, 0, 0x38, 0),
                (VIRTIO_PCI_CAP_ISR_CFG, 0, 0x1000, 1, 0),
                (VIRTIO_PCI_CAP_DEVICE_CFG, 0, 0x2000, 0x1000, 0),
                (VIRTIO_PCI_CAP_NOTIFY_CFG, 0, 0x3000, 0x1000, 4),
            ]
        );
        assert_eq!(c.bar_address(0), Some(0xc000_0000));
    }

    #[test]
    fn bar_sizing_and_mapping_through_the_bus() {
        let (dev, _) = console();
        let mut bus = PciBus::new();
        let slot = bus.add(std::sync::Arc::new(std::sync::Mutex::new(dev))).unwrap();
        let select = |bus: &mut PciBus, reg: usize| {
            bus.write(0, &(0x8000_0000u32 | u32::from(slot) << 11 | reg as u32).to_le_bytes())
        };
        select(&mut bus, BAR0);
        bus.write(4, &u32::MAX.to_le_bytes());
        let mut d = [0; 4];
        bus.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), (!(BAR_SIZE as u32 - 1)) | 0b100);
        bus.write(4, &0xc000_8000u32.to_le_bytes());
        select(&mut bus, COMMAND);
        bus.write(4, &[COMMAND_MEMORY as u8, 0]);
        let events = bus.take_bar_events();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].new.map(|m| (m.address, m.size)), Some((0xc000_8000, BAR_SIZE)));
    }

    #[test]
    fn reset_clears_the_negotiation_and_the_queues() {
        let (mut dev, _) = console();
        let mem = dev.mem.clone();
        Driver::start(&mut dev, mem, 0, 16);
        assert_eq!(status(&mut dev) & (STATUS_FEATURES_OK | STATUS_DRIVER_OK), STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        dev.bar_write(0, COMMON_OFFSET + 0x14, &[0]);
        assert_eq!(status(&mut dev), 0);
        dev.bar_write(0, COMMON_OFFSET + 0x16, &1u16.to_le_bytes());
        assert_eq!(common_read32(&mut dev, 0x1c) & 0xffff, 0, "queue 1 no longer enabled");
        assert_eq!(common_read32(&mut dev, 0x18) & 0xffff, u32::from(crate::virtio::console::QUEUE_SIZE));
    }

    #[test]
    fn console_output_reaches_the_writer_and_interrupts() {
        let (mut dev, sink) = console();
        enable_msix(&mut dev, 3);
        let mem = dev.mem.clone();
        let mut driver = Driver::start(&mut dev, mem, 0, 16);
        driver.mem.write_slice(b"hello, ", GuestAddress(0x40000)).unwrap();
        driver.mem.write_slice(b"world\n", GuestAddress(0x41000)).unwrap();
        driver.add_chain(TRANSMIT_QUEUE as u16, &[(0x40000, 7, 0), (0x41000, 6, 0)]);
        sink.take();
        notify(&mut dev, TRANSMIT_QUEUE as u16);
        assert_eq!(dev.device().output(), b"hello, world\n");
        assert_eq!(driver.used(TRANSMIT_QUEUE as u16), vec![(0, 0)]);
        assert_eq!(sink.take(), vec![SinkEvent::Signal(2)], "transmit queue on vector 2");
        // Receive buffers just wait.
        driver.add_chain(0, &[(0x42000, 64, crate::virtio::testing::WRITE)]);
        notify(&mut dev, 0);
        assert!(driver.used(0).is_empty());
    }

    #[test]
    fn without_msix_the_isr_says_why_and_clears_on_read() {
        let (mut dev, sink) = console();
        let mem = dev.mem.clone();
        let mut driver = Driver::start(&mut dev, mem, 0, 16);
        driver.add_chain(TRANSMIT_QUEUE as u16, &[(0x40000, 1, 0)]);
        notify(&mut dev, TRANSMIT_QUEUE as u16);
        assert!(sink.take().is_empty());
        let mut isr = [0u8];
        dev.bar_read(0, ISR_OFFSET, &mut isr);
        assert_eq!(isr[0], ISR_QUEUE);
        dev.bar_read(0, ISR_OFFSET, &mut isr);
        assert_eq!(isr[0], 0);
    }

    #[test]
    fn any_bar_access_is_harmless() {
        let (mut dev, _) = console();
        let mut d = [0u8; 8];
        for offset in [0, 0x37, 0x38, 0xfff, 0x1000, 0x1001, 0x2fff, 0x3ffc, 0x4000, 0x5000, 0x7fff, u64::MAX] {
            for len in [0, 1, 2, 4, 8] {
                dev.bar_read(0, offset, &mut d[..len]);
                dev.bar_write(0, offset, &d[..len]);
                dev.bar_read(3, offset, &mut d[..len]);
                dev.bar_write(3, offset, &d[..len]);
            }
        }
    }
}
