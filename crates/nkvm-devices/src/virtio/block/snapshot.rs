//! virtio-blk's state: what the driver may rely on from the device it
//! negotiated with. Requests complete before the lock on the device is
//! released, so none is ever pending; the disk's contents are not state
//! (the file is shared storage, reached at the same path). A restore onto
//! a disk of another size or another read-only setting is refused, naming
//! both values.

use super::Block;
use crate::snapshot::{Snapshot, SnapshotError, StateReader, StateWriter};

impl Snapshot for Block {
    fn snapshot_name(&self) -> &'static str {
        "virtio-blk"
    }

    fn snapshot_version(&self) -> u16 {
        1
    }

    fn save_body(&self, out: &mut StateWriter) {
        out.u64(self.capacity);
        out.bool(self.read_only);
    }

    fn load_body(&mut self, input: &mut StateReader<'_>) -> Result<(), SnapshotError> {
        let capacity = input.u64("capacity")?;
        if capacity != self.capacity {
            return Err(input.mismatch("the disk's capacity in 512-byte sectors", capacity, self.capacity));
        }
        let read_only = input.bool("read-only")?;
        if read_only != self.read_only {
            return Err(input.mismatch("read-only (1: yes)", read_only.into(), self.read_only.into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::check::refuses_damage;
    use crate::virtio::testing::TempFile;

    #[test]
    fn a_disk_of_another_size_or_mode_is_refused_naming_both() {
        let image = TempFile::with(&[0u8; 16 * 512]);
        let blob = Block::open(&image.0, false).unwrap().snapshot();
        refuses_damage(&blob, || Block::open(&image.0, false).unwrap());
        let smaller = TempFile::with(&[0u8; 8 * 512]);
        let err = Block::open(&smaller.0, false).unwrap().restore(&blob).unwrap_err().to_string();
        assert_eq!(
            err,
            "virtio-blk state: the disk's capacity in 512-byte sectors is 16 in the saved state but 8 on this machine"
        );
        let err = Block::open(&image.0, true).unwrap().restore(&blob).unwrap_err().to_string();
        assert!(err.contains("read-only (1: yes) is 0 in the saved state but 1"), "{err}");
    }
}
