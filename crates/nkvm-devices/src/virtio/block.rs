//! virtio-blk on a raw image file: reads, writes, flushes and the device ID
//! (virtio 1.2 section 5.2), one request queue.
//!
//! A request is a descriptor chain: a 16-byte header (type, reserved,
//! sector) the device reads, the data buffers, and a status byte the device
//! writes last. A request the device cannot carry out (past the end of the
//! disk, a short header, data outside guest memory, an I/O error, a write
//! to a read-only disk) completes with `VIRTIO_BLK_S_IOERR`; an unknown type
//! with `VIRTIO_BLK_S_UNSUPP`. Only a chain with no writable status byte
//! makes the device need a reset: there is no way to answer it.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::{Address, Bytes};

use super::{Activation, GuestRam, VirtioDevice, VirtioError, VIRTIO_RING_F_INDIRECT_DESC};
use crate::bad_access::BadAccessLog;

mod snapshot;

/// Bytes per sector, the unit of `capacity` and of request offsets.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Size of a request header.
const HEADER_SIZE: usize = 16;
/// Bytes moved between the file and guest memory at a time.
const CHUNK: usize = 64 * 1024;
/// PCI class: mass storage, other.
const CLASS_STORAGE_OTHER: u32 = 0x01_80_00;

/// Why a disk image could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// Opening the file failed.
    #[error("cannot open disk image {}", path.display())]
    Open {
        /// The image.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Why one request failed (it completes with an error status).
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("the descriptors are not in guest memory: {0}")]
    Memory(#[source] virtio_queue::Error),
    #[error("the header is shorter than {HEADER_SIZE} bytes")]
    ShortHeader,
    #[error("sectors {sector}+{len} bytes are past the end of the disk ({capacity} sectors)")]
    OutOfRange { sector: u64, len: u64, capacity: u64 },
    #[error("{0} bytes is not a whole number of sectors")]
    Unaligned(usize),
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("I/O error on the image")]
    Io(#[source] io::Error),
}

impl RequestError {
    fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A virtio-blk device backed by a raw image.
#[derive(Debug)]
pub struct Block {
    file: File,
    path: PathBuf,
    capacity: u64,
    read_only: bool,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    config: [u8; 24],
    /// Requests the guest got wrong: the first at warn level, then debug
    /// (a guest looping on bad requests cannot flood the host's log).
    guest_errors: BadAccessLog,
}

impl Block {
    /// Opens the raw image at `path` (read-only if asked). Its size,
    /// rounded down to whole sectors, is the disk's capacity.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let open_err = |source| BlockError::Open { path: path.to_path_buf(), source };
        let file = OpenOptions::new().read(true).write(!read_only).open(path).map_err(open_err)?;
        let len = file.metadata().map_err(open_err)?.len();
        Ok(Self::from_file(file, path, len / SECTOR_SIZE, read_only))
    }

    fn from_file(file: File, path: &Path, capacity: u64, read_only: bool) -> Self {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let text = format!("nkvm-{name}");
        let n = text.len().min(id.len());
        id[..n].copy_from_slice(&text.as_bytes()[..n]);
        // struct virtio_blk_config: capacity, size_max, seg_max, geometry, blk_size.
        let mut config = [0u8; 24];
        config[..8].copy_from_slice(&capacity.to_le_bytes());
        config[12..16].copy_from_slice(&(u32::from(QUEUE_SIZE) - 2).to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        Self { file, path: path.to_path_buf(), capacity, read_only, id, config, guest_errors: BadAccessLog::default() }
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves one chain; returns the number of bytes written into the
    /// chain's buffers (data and status).
    fn request(&mut self, queue: usize, mem: &GuestRam, chain: DescriptorChain<&GuestRam>) -> Result<u32, VirtioError> {
        let head = chain.head_index();
        let bad = |reason: &str| VirtioError::BadChain { queue, head, reason: reason.to_string() };
        let last: Option<Descriptor> = chain.clone().last();
        let status_at = match last {
            Some(d) if d.is_write_only() && d.len() > 0 => d.addr().checked_add(u64::from(d.len()) - 1),
            _ => None,
        }
        .ok_or_else(|| bad("no writable status byte at its end"))?;
        let (status, written) = match self.execute(mem, chain) {
            Ok(n) => (VIRTIO_BLK_S_OK as u8, n),
            Err(e) => {
                let device = format!("virtio-blk {}", self.path.display());
                match e {
                    // The host's: each one matters.
                    RequestError::Io(_) => log::warn!("{device}: request at head {head} failed: {e}"),
                    _ => self.guest_errors.log(&device, format_args!("request at head {head} failed: {e}")),
                }
                (e.status(), 0)
            }
        };
        mem.write_obj(status, status_at).map_err(|e| bad(&format!("status byte at {:#x}: {e}", status_at.0)))?;
        Ok(written.saturating_add(1))
    }

    /// Carries out a request; returns the data bytes written into guest memory.
    fn execute(&mut self, mem: &GuestRam, chain: DescriptorChain<&GuestRam>) -> Result<u32, RequestError> {
        let mut reader = Reader::new(mem, chain.clone()).map_err(RequestError::Memory)?;
        let mut writer = Writer::new(mem, chain).map_err(RequestError::Memory)?;
        let mut header = [0u8; HEADER_SIZE];
        reader.read_exact(&mut header).map_err(|_| RequestError::ShortHeader)?;
        let type_ = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes([
            header[8], header[9], header[10], header[11], header[12], header[13], header[14], header[15],
        ]);
        // The last writable byte is the status: the data is what precedes it.
        let data_len = writer.available_bytes().saturating_sub(1);
        match type_ {
            VIRTIO_BLK_T_IN => {
                let offset = self.check_range(sector, data_len)?;
                // What follows the data (the status byte) is written by `request`.
                writer.split_at(data_len).map_err(RequestError::Memory)?;
                let mut buf = vec![0u8; data_len.min(CHUNK)];
                let mut done = 0;
                while done < data_len {
                    let n = (data_len - done).min(CHUNK);
                    self.file.read_exact_at(&mut buf[..n], offset + done as u64).map_err(RequestError::Io)?;
                    writer.write_all(&buf[..n]).map_err(RequestError::Io)?;
                    done += n;
                }
                Ok(data_len as u32)
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return Err(RequestError::ReadOnly);
                }
                let len = reader.available_bytes();
                let offset = self.check_range(sector, len)?;
                let mut buf = vec![0u8; len.min(CHUNK)];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(CHUNK);
                    reader.read_exact(&mut buf[..n]).map_err(RequestError::Io)?;
                    self.file.write_all_at(&buf[..n], offset + done as u64).map_err(RequestError::Io)?;
                    done += n;
                }
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.read_only {
                    self.file.sync_data().map_err(RequestError::Io)?;
                }
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = data_len.min(self.id.len());
                writer.write_all(&self.id[..n]).map_err(RequestError::Io)?;
                Ok(n as u32)
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }

    /// The byte offset of `sector` if `len` bytes from there are on the disk.
    fn check_range(&self, sector: u64, len: usize) -> Result<u64, RequestError> {
        let out_of_range = RequestError::OutOfRange { sector, len: len as u64, capacity: self.capacity };
        if len as u64 % SECTOR_SIZE != 0 {
            return Err(RequestError::Unaligned(len));
        }
        let end = sector.checked_add(len as u64 / SECTOR_SIZE);
        match end {
            Some(end) if end <= self.capacity => Ok(sector * SECTOR_SIZE),
            _ => Err(out_of_range),
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u16 {
        VIRTIO_ID_BLOCK as u16
    }

    fn pci_class(&self) -> u32 {
        CLASS_STORAGE_OTHER
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = (1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_FLUSH) | VIRTIO_RING_F_INDIRECT_DESC;
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *b = at.and_then(|o| self.config.get(o)).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!("virtio-blk: ignored config write of {} bytes at {offset:#x}", data.len());
    }

    fn activate(&mut self, activation: &Activation<'_>) -> Result<(), VirtioError> {
        log::debug!("virtio-blk {}: driver ready, features {:#x}", self.path.display(), activation.features);
        Ok(())
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestRam) -> Result<bool, VirtioError> {
        let mut used = false;
        loop {
            let chain = queue.iter(mem).map_err(|source| VirtioError::Queue { queue: index, source })?.next();
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let len = self.request(index, mem, chain)?;
            queue.add_used(mem, head, len).map_err(|source| VirtioError::Queue { queue: index, source })?;
            used = true;
        }
        Ok(used)
    }

    fn reset(&mut self) {}
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;
    use crate::pci::msix::tests::{RecordingSink, SinkEvent};
    use crate::pci::PciDevice;
    use crate::virtio::common::STATUS_NEEDS_RESET;
    use crate::virtio::testing::{enable_msix, notify, ram, status, Driver, TempFile, RAM, WRITE};
    use crate::virtio::VirtioPci;

    const HEADER: u64 = 0x40000;
    const DATA: u64 = 0x41000;
    const STATUS: u64 = 0x48000;
    const SECTORS: u64 = 16;

    struct Setup {
        dev: VirtioPci<Block>,
        driver: Driver,
        sink: RecordingSink,
        image: TempFile,
    }

    fn setup(read_only: bool) -> Setup {
        let pattern: Vec<u8> = (0..SECTORS * SECTOR_SIZE).map(|i| (i / SECTOR_SIZE) as u8).collect();
        let image = TempFile::with(&pattern);
        let block = Block::open(&image.0, read_only).unwrap();
        let sink = RecordingSink::default();
        let mem = ram();
        let mut dev = VirtioPci::new(block, mem.clone(), 0, Box::new(sink.clone())).unwrap();
        enable_msix(&mut dev, 2);
        let features = dev.device().features();
        let driver = Driver::start(&mut dev, mem, features, QUEUE_SIZE);
        sink.take();
        Setup { dev, driver, sink, image }
    }

    fn header(s: &Setup, type_: u32, sector: u64) {
        s.driver.mem.write_obj(type_, GuestAddress(HEADER)).unwrap();
        s.driver.mem.write_obj(0u32, GuestAddress(HEADER + 4)).unwrap();
        s.driver.mem.write_obj(sector, GuestAddress(HEADER + 8)).unwrap();
        s.driver.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    }

    fn status_byte(s: &Setup) -> u8 {
        s.driver.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn submit(s: &mut Setup, descs: &[(u64, u32, u16)]) -> u16 {
        let head = s.driver.add_chain(0, descs);
        notify(&mut s.dev, 0);
        head
    }

    #[test]
    fn write_read_flush_and_get_id_round_trip_through_the_queue() {
        let mut s = setup(false);
        // OUT: sector 2 := 0xab...
        header(&s, VIRTIO_BLK_T_OUT, 2);
        s.driver.mem.write_slice(&[0xab; 1024], GuestAddress(DATA)).unwrap();
        let head = submit(&mut s, &[(HEADER, 16, 0), (DATA, 1024, 0), (STATUS, 1, WRITE)]);
        assert_eq!(status_byte(&s), VIRTIO_BLK_S_OK as u8);
        assert_eq!(s.driver.used(0), vec![(u32::from(head), 1)]);
        assert_eq!(s.sink.take(), vec![SinkEvent::Signal(1)], "queue 0 interrupts on vector 1");
        let file = s.image.contents();
        assert!(file[1024..2048].iter().all(|&b| b == 0xab));
        assert!(file[2048..2560].iter().all(|&b| b == 4), "sector 4 untouched");
        // IN: sectors 3-4 into two data buffers.
        header(&s, VIRTIO_BLK_T_IN, 3);
        let head =
            submit(&mut s, &[(HEADER, 16, 0), (DATA, 512, WRITE), (DATA + 0x1000, 512, WRITE), (STATUS, 1, WRITE)]);
        assert_eq!(status_byte(&s), VIRTIO_BLK_S_OK as u8);
        let mut got = [0u8; 512];
        s.driver.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert!(got.iter().all(|&b| b == 0xab));
        s.driver.mem.read_slice(&mut got, GuestAddress(DATA + 0x1000)).unwrap();
        assert!(got.iter().all(|&b| b == 4));
        assert_eq!(s.driver.used(0)[1], (u32::from(head), 1025));
        // FLUSH.
        header(&s, VIRTIO_BLK_T_FLUSH, 0);
        submit(&mut s, &[(HEADER, 16, 0), (STATUS, 1, WRITE)]);
        assert_eq!(status_byte(&s), VIRTIO_BLK_S_OK as u8);
        // GET_ID.
        header(&s, VIRTIO_BLK_T_GET_ID, 0);
        submit(&mut s, &[(HEADER, 16, 0), (DATA, 20, WRITE), (STATUS, 1, WRITE)]);
        assert_eq!(status_byte(&s), VIRTIO_BLK_S_OK as u8);
        let mut id = [0u8; 5];
        s.driver.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"nkvm-");
        assert_eq!(s.sink.take().len(), 3);
        assert_eq!(status(&mut s.dev) & STATUS_NEEDS_RESET, 0);
    }

    #[test]
    fn capacity_is_in_sectors_and_features_follow_read_only() {
        let s = setup(true);
        let mut cap = [0u8; 8];
        s.dev.device().read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), SECTORS);
        assert_ne!(s.dev.device().features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(setup(false).dev.device().features() & (1 << VIRTIO_BLK_F_RO), 0);
    }

    #[test]
    fn writes_to_a_read_only_disk_fail_with_ioerr() {
        let mut s = setup(true);
        header(&s, VIRTIO_BLK_T_OUT, 0);
        submit(&mut s, &[(HEADER, 16, 0), (DATA, 512, 0), (STATUS, 1, WRITE)]);
        assert_eq!(status_byte(&s), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(s.image.contents()[0], 0);
    }

    #[test]
    fn requests_past_the_end_fail_with_ioerr() {
        let mut s = setup(false);
        for sector in [SECTORS - 1, SECTORS, u64::MAX, u64::MAX / 512] {
            header(&s, VIRTIO_BLK_T_IN, sector);
            submit(&mut s, &[(HEADER, 16, 0), (DATA, 1024, WRITE), (STATUS, 1, WRITE)]);
            assert_eq!(status_byte(&s), VIRTIO_BLK_S_IOERR as u8, "sector {sector}");
            header(&s, VIRTIO_BLK_T_OUT, sector);
            submit(&mut s, &[(HEADER, 16, 0), (DATA, 1024, 0), (STATUS, 1, WRITE)]);
            assert_eq!(status_byte(&s), VIRTIO_BLK_S_IOERR as u8, "sector {sector}");
        }
        assert_eq!(s.image.contents().len() as u64, SECTORS * SECTOR_SIZE, "the image did not grow");
        assert_eq!(status(&mut s.dev) & STATUS_NEEDS_RESET, 0);
    }

    #[test]
    fn bad_requests_fail_with_an_error_status_not_a_panic() {
        let mut s = setup(false);
        // Data outside guest memory (straddling its end, far past it).
        for addr in [RAM as u64 - 256, 0xffff_ffff_ffff_f000] {
            header(&s, VIRTIO_BLK_T_IN, 0);
            submit(&mut s, &[(HEADER, 16, 0), (addr, 512, WRITE), (STATUS, 1, WRITE)]);
            assert_eq!(status_byte(&s), VIRTIO_BLK_S_IOERR as u8);
        }
        // A header too short, a partial sector, an unknown type.
        header(&s, VIRTIO_BLK_T_IN, 0);
        submit(&mut s, &[(HEADER, 8, 0), (DATA, 512, WRITE), (STATUS, 1, WRITE)]);
        assert_eq!(status_byte(&s), VIRTIO_BLK_S_IOERR as u8);
        header(&s, VIRTIO_BLK_T_IN, 0);
        submit(&mut s, &[(HEADER, 16, 0), (DATA, 100, WRITE), (STATUS, 1, WRITE)]);
        assert_eq!(status_byte(&s), VIRTIO_BLK_S_IOERR as u8);
        header(&s, 77, 0);
        submit(&mut s, &[(HEADER, 16, 0), (STATUS, 1, WRITE)]);
        assert_eq!(status_byte(&s), VIRTIO_BLK_S_UNSUPP as u8);
        assert_eq!(s.driver.used(0).len(), 5);
        assert_eq!(status(&mut s.dev) & STATUS_NEEDS_RESET, 0);
    }

    #[test]
    fn a_chain_without_a_status_byte_makes_the_device_need_a_reset() {
        let mut s = setup(false);
        header(&s, VIRTIO_BLK_T_IN, 0);
        submit(&mut s, &[(HEADER, 16, 0), (DATA, 512, 0)]);
        assert_eq!(status(&mut s.dev) & STATUS_NEEDS_RESET, STATUS_NEEDS_RESET);
        assert_eq!(s.sink.take(), vec![SinkEvent::Signal(0)], "config-change interrupt");
        assert!(s.driver.used(0).is_empty());
        // Further notifications are ignored until the driver resets the device.
        submit(&mut s, &[(HEADER, 16, 0), (STATUS, 1, WRITE)]);
        assert!(s.driver.used(0).is_empty());
        s.dev.bar_write(0, 0x14, &[0]);
        assert_eq!(status(&mut s.dev), 0);
    }

    #[test]
    fn a_status_byte_outside_memory_or_a_runaway_avail_index_needs_a_reset() {
        let mut s = setup(false);
        header(&s, VIRTIO_BLK_T_FLUSH, 0);
        submit(&mut s, &[(HEADER, 16, 0), (1 << 40, 1, WRITE)]);
        assert_eq!(status(&mut s.dev) & STATUS_NEEDS_RESET, STATUS_NEEDS_RESET);

        let mut s = setup(false);
        s.driver.set_avail_idx(0, 1000);
        notify(&mut s.dev, 0);
        assert_eq!(status(&mut s.dev) & STATUS_NEEDS_RESET, STATUS_NEEDS_RESET);
    }

    #[test]
    fn a_missing_image_is_an_error_naming_it() {
        let e = Block::open(Path::new("/nonexistent/disk.img"), false).unwrap_err();
        assert_eq!(e.to_string(), "cannot open disk image /nonexistent/disk.img");
    }
}
