//! A virtio-pci device as one [`Snapshot`]: its configuration space and
//! MSI-X state (their own blobs, nested), the common configuration with
//! every queue's position, the ISR byte, and the device model's blob.
//!
//! Body (little-endian, `docs/migration.md` "Device state"):
//!
//! | field | bytes |
//! |---|---|
//! | configuration space blob (`pci-config-space`) | u32 length + blob |
//! | MSI-X blob (`pci-msix`) | u32 length + blob |
//! | common configuration (features, status, vectors, queues) | see `common/snapshot.rs` |
//! | ISR status | 1 |
//! | device model blob (`virtio-blk`, `virtio-console`) | u32 length + blob |
//!
//! A restore reads and checks everything before it changes anything; the
//! MSI-X state, taken last, tells the sink every route again (the VMM
//! installs the irqfd routes from it). What the state implies outside the
//! model (BAR regions, queue workers) is the VMM's to re-do.

use super::{VirtioPci, ISR_CONFIG, ISR_QUEUE};
use crate::snapshot::{Snapshot, SnapshotError, StateReader, StateWriter};
use crate::virtio::VirtioDevice;

/// Longest nested blob read (the MSI-X table of 1001 vectors is ~17 KiB).
const MAX_NESTED: usize = 1 << 20;

impl<D: VirtioDevice + Snapshot> Snapshot for VirtioPci<D> {
    fn snapshot_name(&self) -> &'static str {
        match u32::from(self.device.device_type()) {
            virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK => "virtio-pci-blk",
            virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE => "virtio-pci-console",
            _ => "virtio-pci",
        }
    }

    fn snapshot_version(&self) -> u16 {
        1
    }

    fn save_body(&self, out: &mut StateWriter) {
        out.blob(&self.config.snapshot());
        out.blob(&self.msix.snapshot());
        self.common.save(out);
        out.u8(self.isr);
        out.blob(&self.device.snapshot());
    }

    fn load_body(&mut self, input: &mut StateReader<'_>) -> Result<(), SnapshotError> {
        let config_blob = input.blob("configuration space", MAX_NESTED)?;
        let msix_blob = input.blob("MSI-X state", MAX_NESTED)?;
        let common = self.common.load(input)?;
        let at = input.offset();
        let isr = input.u8("ISR status")?;
        if isr & !(ISR_QUEUE | ISR_CONFIG) != 0 {
            return Err(input.invalid("ISR status", isr.into(), at, "bits 0 (queue) and 1 (config) only"));
        }
        let device_blob = input.blob("device state", MAX_NESTED)?;
        input.expect_end()?;
        let mut config = self.config.clone();
        config.restore(config_blob)?;
        let backup = self.device.snapshot();
        self.device.restore(device_blob)?;
        if let Err(e) = self.msix.restore(msix_blob) {
            // The model's own state, taken a moment ago: it goes back.
            if let Err(back) = self.device.restore(&backup) {
                log::error!("virtio: cannot put the device's state back after a refused blob: {back}");
            }
            return Err(e);
        }
        (self.config, self.common, self.isr) = (config, common, isr);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::pci::msix::tests::{RecordingSink, SinkEvent};
    use crate::pci::msix::MsiMessage;
    use crate::snapshot::check::refuses_damage;
    use crate::virtio::block::{Block, QUEUE_SIZE, SECTOR_SIZE};
    use crate::virtio::console::{Console, TRANSMIT_QUEUE};
    use crate::virtio::testing::{enable_msix, notify, ram, Driver, TempFile, RAM, WRITE};
    use crate::virtio::GuestRam;

    const HEADER: u64 = 0x40000;
    const DATA: u64 = 0x41000;
    const STATUS: u64 = 0x48000;
    const BAR: u64 = 0xc000_0000;
    const SECTORS: u64 = 16;
    const VIRTIO_BLK_T_IN: u32 = 0;
    const VIRTIO_BLK_T_OUT: u32 = 1;

    /// A virtio-blk transport over the image at `path`.
    fn block(image: &TempFile, mem: GuestRam, sink: &RecordingSink) -> VirtioPci<Block> {
        VirtioPci::new(Block::open(&image.0, false).unwrap(), mem, BAR, Box::new(sink.clone())).unwrap()
    }

    /// A request of `type_` on `sector` into or from DATA, made available
    /// on queue 0 (the driver notifies separately).
    fn make_available(driver: &mut Driver, type_: u32, sector: u64) {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&type_.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        driver.mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
        driver.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        let data_flags = if type_ == VIRTIO_BLK_T_IN { WRITE } else { 0 };
        driver.add_chain(0, &[(HEADER, 16, 0), (DATA, 1024, data_flags), (STATUS, 1, WRITE)]);
    }

    fn copy_of(mem: &GuestRam) -> GuestRam {
        let mut bytes = vec![0u8; RAM];
        mem.read_slice(&mut bytes, GuestAddress(0)).unwrap();
        let copy = ram();
        copy.write_slice(&bytes, GuestAddress(0)).unwrap();
        copy
    }

    /// What the driver can see after a request: status byte, data buffer,
    /// used ring.
    fn outcome(driver: &Driver) -> (u8, Vec<u8>, Vec<(u32, u32)>) {
        let mut data = vec![0u8; 1024];
        driver.mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        (driver.mem.read_obj(GuestAddress(STATUS)).unwrap(), data, driver.used(0))
    }

    /// A virtio-blk device with features negotiated, MSI-X on, queue 0
    /// enabled, one write (sector 3 := 0xab) served and a read of sector
    /// 3 made available but not yet notified.
    struct Running {
        dev: VirtioPci<Block>,
        driver: Driver,
        sink: RecordingSink,
        image: TempFile,
    }

    fn running() -> Running {
        let pattern: Vec<u8> = (0..SECTORS * SECTOR_SIZE).map(|i| (i / SECTOR_SIZE) as u8).collect();
        let image = TempFile::with(&pattern);
        let sink = RecordingSink::default();
        let mem = ram();
        let mut dev = block(&image, mem.clone(), &sink);
        enable_msix(&mut dev, 2);
        let features = dev.device().features();
        let mut driver = Driver::start(&mut dev, mem, features, QUEUE_SIZE);
        driver.mem.write_slice(&[0xab; 1024], GuestAddress(DATA)).unwrap();
        make_available(&mut driver, VIRTIO_BLK_T_OUT, 3);
        notify(&mut dev, 0);
        assert_eq!(outcome(&driver).0, 0, "the write succeeded");
        make_available(&mut driver, VIRTIO_BLK_T_IN, 3);
        sink.take();
        Running { dev, driver, sink, image }
    }

    #[test]
    fn a_running_block_device_round_trips_and_the_copy_serves_the_next_requests_as_the_original() {
        let mut orig = running();
        let blob = orig.dev.snapshot();
        // The second machine: a copy of guest RAM and of the disk.
        let image = TempFile::with(&orig.image.contents());
        let sink = RecordingSink::default();
        let mut driver = orig.driver.on(copy_of(&orig.driver.mem));
        let mut copy = block(&image, driver.mem.clone(), &sink);
        copy.restore(&blob).unwrap();
        assert_eq!(copy.snapshot(), blob);
        assert_eq!(copy.enabled_queues(), vec![0]);
        let route = MsiMessage { address: 0xfee0_0000, data: 0x31 };
        assert!(sink.take().contains(&SinkEvent::Route(1, Some(route))), "queue 0's vector is routed again");
        // The read made available before the save: the original serves it
        // when notified, the copy when it resumes; one interrupt each.
        notify(&mut orig.dev, 0);
        copy.resume();
        assert_eq!(orig.sink.take(), vec![SinkEvent::Signal(1)]);
        assert_eq!(sink.take(), vec![SinkEvent::Signal(1)]);
        assert_eq!(outcome(&orig.driver), outcome(&driver));
        let (status, data, used) = outcome(&driver);
        assert_eq!((status, data.iter().all(|&b| b == 0xab), used.len()), (0, true, 2));
        for (dev, driver) in [(&mut orig.dev, &mut orig.driver), (&mut copy, &mut driver)] {
            driver.mem.write_slice(&[0xcd; 1024], GuestAddress(DATA)).unwrap();
            make_available(driver, VIRTIO_BLK_T_OUT, 7);
            notify(dev, 0);
        }
        assert_eq!(outcome(&orig.driver), outcome(&driver));
        assert_eq!(orig.image.contents(), image.contents());
        assert_eq!(orig.dev.snapshot(), copy.snapshot(), "the two devices are in the same state");
    }

    #[test]
    fn drain_serves_what_is_available_and_resume_interrupts_each_enabled_queue_once() {
        let mut s = running();
        s.dev.drain();
        assert_eq!(s.driver.used(0).len(), 2, "the read made available was served");
        assert_eq!(s.sink.take(), vec![SinkEvent::Signal(1)]);
        s.dev.drain();
        assert!(s.sink.take().is_empty(), "nothing more to serve, no interrupt");
        s.dev.resume();
        assert_eq!(s.sink.take(), vec![SinkEvent::Signal(1)], "resume interrupts even with nothing new");
        assert_eq!(s.driver.used(0).len(), 2);
        // A device the driver has not started serves and signals nothing.
        let mut idle = block(&s.image, ram(), &s.sink);
        idle.drain();
        idle.resume();
        assert!(s.sink.take().is_empty());
    }

    #[test]
    fn a_damaged_transport_blob_is_refused_and_changes_nothing() {
        let orig = running();
        let blob = orig.dev.snapshot();
        refuses_damage(&blob, || block(&orig.image, ram(), &RecordingSink::default()));
        // Pseudo-random bytes behind a valid envelope (CRC fixed up).
        let mut dev = block(&orig.image, ram(), &RecordingSink::default());
        let before = dev.snapshot();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            let mut bad = blob.clone();
            for _ in 0..(x % 8) + 1 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = 17 + (x as usize) % (bad.len() - 21);
                bad[at] = (x >> 32) as u8;
            }
            let crc_at = bad.len() - 4;
            let crc = crate::snapshot::crc32(&bad[..crc_at]);
            bad[crc_at..].copy_from_slice(&crc.to_le_bytes());
            if dev.restore(&bad).is_ok() {
                dev.restore(&before).unwrap();
            }
        }
        assert_eq!(dev.snapshot(), before);
    }

    /// A transport blob with `body` (a valid envelope around any bytes).
    struct Raw(Vec<u8>);

    impl Snapshot for Raw {
        fn snapshot_name(&self) -> &'static str {
            "virtio-pci-blk"
        }
        fn snapshot_version(&self) -> u16 {
            1
        }
        fn save_body(&self, out: &mut StateWriter) {
            self.0.iter().for_each(|&b| out.u8(b));
        }
        fn load_body(&mut self, _input: &mut StateReader<'_>) -> Result<(), SnapshotError> {
            Ok(())
        }
    }

    #[test]
    fn a_bad_nested_state_is_refused_after_the_others_were_read_and_changes_nothing() {
        let orig = running();
        let body = |msix: &[u8], device: &[u8], trailing: &[u8]| {
            let mut out = StateWriter::default();
            out.blob(&orig.dev.config.snapshot());
            out.blob(msix);
            orig.dev.common.save(&mut out);
            out.u8(0);
            out.blob(device);
            trailing.iter().for_each(|&b| out.u8(b));
            Raw(out.into_bytes()).snapshot()
        };
        let (msix, device) = (orig.dev.msix.snapshot(), orig.dev.device.snapshot());
        assert_eq!(body(&msix, &device, &[]), orig.dev.snapshot(), "the layout the test builds is the model's");
        let mut dev = block(&orig.image, ram(), &RecordingSink::default());
        let before = dev.snapshot();
        let smaller = TempFile::with(&[0u8; 4 * 512]);
        let other_disk = Block::open(&smaller.0, false).unwrap().snapshot();
        let console = Console::new(Vec::new()).snapshot();
        for (bad, why) in [
            (body(&msix[..msix.len() - 1], &device, &[]), "pci-msix state"),
            (body(&msix, &other_disk, &[]), "capacity in 512-byte sectors is 4 in the saved state but 16"),
            (body(&msix, &console, &[]), "\"virtio-console\" state, it cannot be restored into a virtio-blk"),
            (body(&msix, &device, &[0]), "1 unread bytes"),
        ] {
            let err = dev.restore(&bad).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
            assert_eq!(dev.snapshot(), before, "refused ({err}), yet the device changed");
        }
    }

    #[test]
    fn features_a_driver_wrote_before_features_ok_do_not_make_its_state_unrestorable() {
        use crate::pci::PciDevice;
        let fresh =
            || VirtioPci::new(Console::new(Vec::new()), ram(), BAR, Box::new(RecordingSink::default())).unwrap();
        let mut dev = fresh();
        // ACKNOWLEDGE | DRIVER, then every feature bit of the low half,
        // offered or not; FEATURES_OK (which would refuse them) not yet set.
        dev.bar_write(0, 0x14, &[1 | 2]);
        dev.bar_write(0, 0x0c, &0xffff_ffffu32.to_le_bytes());
        let blob = dev.snapshot();
        let mut copy = fresh();
        copy.restore(&blob).unwrap();
        assert_eq!(copy.snapshot(), blob);
    }

    #[test]
    fn a_console_round_trips_and_a_block_blob_is_not_a_console() {
        let sink = RecordingSink::default();
        let mut dev = VirtioPci::new(Console::new(Vec::new()), ram(), BAR, Box::new(sink.clone())).unwrap();
        enable_msix(&mut dev, 3);
        let mem = dev.mem.clone();
        let mut driver = Driver::start(&mut dev, mem, 0, 16);
        driver.mem.write_slice(b"before", GuestAddress(0x40000)).unwrap();
        driver.add_chain(TRANSMIT_QUEUE as u16, &[(0x40000, 6, 0)]);
        notify(&mut dev, TRANSMIT_QUEUE as u16);
        let blob = dev.snapshot();
        let fresh =
            || VirtioPci::new(Console::new(Vec::new()), ram(), BAR, Box::new(RecordingSink::default())).unwrap();
        refuses_damage(&blob, fresh);
        let mut copy = fresh();
        copy.restore(&blob).unwrap();
        let mut driver = driver.on(copy_of(&driver.mem));
        copy.mem = driver.mem.clone();
        driver.mem.write_slice(b"after", GuestAddress(0x41000)).unwrap();
        driver.add_chain(TRANSMIT_QUEUE as u16, &[(0x41000, 5, 0)]);
        notify(&mut copy, TRANSMIT_QUEUE as u16);
        assert_eq!(copy.device().output(), b"after", "only what came after the restore");
        assert_eq!(driver.used(TRANSMIT_QUEUE as u16), vec![(0, 0), (1, 0)]);
        let err = copy.restore(&running().dev.snapshot()).unwrap_err().to_string();
        assert!(err.contains("\"virtio-pci-blk\" state, it cannot be restored into a virtio-pci-console"), "{err}");
    }
}
