//! A test driver: guest memory over anonymous pages, and the steps a
//! virtio-pci driver takes (features, queues, MSI-X, notifications), done
//! through the transport's configuration space and BAR0.

use vm_memory::{Bytes, GuestAddress};

use super::pci::{NOTIFY_OFFSET, NOTIFY_OFF_MULTIPLIER};
use super::{GuestRam, VirtioDevice, VirtioPci};
use crate::pci::config::CAPABILITIES_POINTER;
use crate::pci::msix::CAP_ID_MSIX;
use crate::pci::PciDevice;

/// Guest RAM size in tests.
pub(crate) const RAM: usize = 1 << 20;
/// Descriptor flags.
pub(crate) const NEXT: u16 = 1;
pub(crate) const WRITE: u16 = 2;

pub(crate) fn ram() -> GuestRam {
    GuestRam::from_ranges(&[(GuestAddress(0), RAM)]).unwrap()
}

/// Where queue `q`'s rings are: 0x10000 per queue from 0x10000.
fn rings(q: u16) -> (u64, u64, u64) {
    let base = 0x10000 * (u64::from(q) + 1);
    (base, base + 0x4000, base + 0x8000)
}

/// The driver's view of one device.
pub(crate) struct Driver {
    pub(crate) mem: GuestRam,
    sizes: Vec<u16>,
    next_desc: Vec<u16>,
    avail_idx: Vec<u16>,
}

fn common_write<D: VirtioDevice>(dev: &mut VirtioPci<D>, offset: u64, data: &[u8]) {
    dev.bar_write(0, offset, data);
}

pub(crate) fn common_read32<D: VirtioDevice>(dev: &mut VirtioPci<D>, offset: u64) -> u32 {
    let mut d = [0; 4];
    dev.bar_read(0, offset, &mut d);
    u32::from_le_bytes(d)
}

pub(crate) fn status<D: VirtioDevice>(dev: &mut VirtioPci<D>) -> u8 {
    let mut d = [0; 1];
    dev.bar_read(0, 0x14, &mut d);
    d[0]
}

/// Offset of the capability with `id` in configuration space.
pub(crate) fn find_cap<D: VirtioDevice>(dev: &VirtioPci<D>, id: u8) -> Option<usize> {
    let c = dev.config();
    let mut at = usize::from(c.read_u16(CAPABILITIES_POINTER) as u8);
    while at != 0 {
        let head = c.read_u16(at);
        if head as u8 == id {
            return Some(at);
        }
        at = usize::from((head >> 8) as u8);
    }
    None
}

/// Enables MSI-X and points vector v at APIC vector 0x30 + v, unmasked.
pub(crate) fn enable_msix<D: VirtioDevice>(dev: &mut VirtioPci<D>, vectors: u16) {
    let cap = find_cap(dev, CAP_ID_MSIX).unwrap();
    dev.config_mut().write(cap + 2, &0x8000u16.to_le_bytes());
    dev.config_written(cap + 2, 2);
    for v in 0..u64::from(vectors) {
        let at = 0x4000 + 16 * v;
        dev.bar_write(0, at, &0xfee0_0000u32.to_le_bytes());
        dev.bar_write(0, at + 4, &0u32.to_le_bytes());
        dev.bar_write(0, at + 8, &(0x30 + v as u32).to_le_bytes());
        dev.bar_write(0, at + 12, &0u32.to_le_bytes());
    }
}

impl Driver {
    /// Negotiates `features` (VERSION_1 added), sets up every queue with
    /// `size` entries and vector q + 1, config vector 0, and sets DRIVER_OK.
    pub(crate) fn start<D: VirtioDevice>(dev: &mut VirtioPci<D>, mem: GuestRam, features: u64, size: u16) -> Self {
        let features = features | super::VIRTIO_F_VERSION_1;
        common_write(dev, 0x14, &[1]);
        common_write(dev, 0x14, &[1 | 2]);
        common_write(dev, 0x08, &0u32.to_le_bytes());
        common_write(dev, 0x0c, &(features as u32).to_le_bytes());
        common_write(dev, 0x08, &1u32.to_le_bytes());
        common_write(dev, 0x0c, &((features >> 32) as u32).to_le_bytes());
        common_write(dev, 0x14, &[1 | 2 | 8]);
        assert_eq!(status(dev) & 8, 8, "FEATURES_OK refused");
        common_write(dev, 0x10, &0u16.to_le_bytes());
        let n = common_read32(dev, 0x10) >> 16;
        for q in 0..n as u16 {
            let (desc, avail, used) = rings(q);
            common_write(dev, 0x16, &q.to_le_bytes());
            common_write(dev, 0x18, &size.to_le_bytes());
            common_write(dev, 0x1a, &(q + 1).to_le_bytes());
            common_write(dev, 0x20, &desc.to_le_bytes());
            common_write(dev, 0x28, &avail.to_le_bytes());
            common_write(dev, 0x30, &used.to_le_bytes());
            common_write(dev, 0x1c, &1u16.to_le_bytes());
        }
        common_write(dev, 0x14, &[1 | 2 | 8 | 4]);
        Self { mem, sizes: vec![size; n as usize], next_desc: vec![0; n as usize], avail_idx: vec![0; n as usize] }
    }

    /// The same driver (where its next descriptor and available entry go)
    /// over `mem`: a copy of its memory, for a restored device.
    pub(crate) fn on(&self, mem: GuestRam) -> Self {
        Self { mem, sizes: self.sizes.clone(), next_desc: self.next_desc.clone(), avail_idx: self.avail_idx.clone() }
    }

    /// Puts a chain of (address, length, flags) descriptors on queue `q`
    /// and makes it available; returns its head index.
    pub(crate) fn add_chain(&mut self, q: u16, descs: &[(u64, u32, u16)]) -> u16 {
        let qi = usize::from(q);
        let (table, avail, _) = rings(q);
        let head = self.next_desc[qi];
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let index = (head + i as u16) % self.sizes[qi];
            let next = (index + 1) % self.sizes[qi];
            let flags = if i + 1 < descs.len() { flags | NEXT } else { flags };
            let at = GuestAddress(table + 16 * u64::from(index));
            self.mem.write_obj(addr, at).unwrap();
            self.mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
            self.mem.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
        }
        self.next_desc[qi] = (head + descs.len() as u16) % self.sizes[qi];
        let slot = self.avail_idx[qi] % self.sizes[qi];
        self.mem.write_obj(head, GuestAddress(avail + 4 + 2 * u64::from(slot))).unwrap();
        self.avail_idx[qi] = self.avail_idx[qi].wrapping_add(1);
        self.mem.write_obj(self.avail_idx[qi], GuestAddress(avail + 2)).unwrap();
        head
    }

    /// Makes `idx` the available index of queue `q` without adding entries.
    pub(crate) fn set_avail_idx(&mut self, q: u16, idx: u16) {
        let (_, avail, _) = rings(q);
        self.mem.write_obj(idx, GuestAddress(avail + 2)).unwrap();
    }

    /// The used ring's entries of queue `q`: (id, len).
    pub(crate) fn used(&self, q: u16) -> Vec<(u32, u32)> {
        let (_, _, used) = rings(q);
        let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
        (0..idx)
            .map(|i| {
                let at = used + 4 + 8 * u64::from(i % self.sizes[usize::from(q)]);
                (self.mem.read_obj(GuestAddress(at)).unwrap(), self.mem.read_obj(GuestAddress(at + 4)).unwrap())
            })
            .collect()
    }
}

/// The driver writes queue `q`'s notification register.
pub(crate) fn notify<D: VirtioDevice>(dev: &mut VirtioPci<D>, q: u16) {
    dev.bar_write(0, NOTIFY_OFFSET + u64::from(q) * u64::from(NOTIFY_OFF_MULTIPLIER), &q.to_le_bytes());
}

/// A file in the temporary directory, removed when dropped.
pub(crate) struct TempFile(pub(crate) std::path::PathBuf);

impl TempFile {
    /// A new file holding `contents`.
    pub(crate) fn with(contents: &[u8]) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("nkvm-devices-test-{}-{n}.img", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        Self(path)
    }

    pub(crate) fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
