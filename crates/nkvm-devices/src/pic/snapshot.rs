//! The dual 8259's [`Snapshot`]: both chips' registers, initialisation
//! step and modes, and the INTR output. The INTR line stays the one the
//! restored PIC was built with.

use super::{Chip, Pic};
use crate::snapshot::{Snapshot, SnapshotError, StateReader, StateWriter};

impl Snapshot for Pic {
    fn snapshot_name(&self) -> &'static str {
        "pic-8259-pair"
    }

    fn snapshot_version(&self) -> u16 {
        1
    }

    fn save_body(&self, out: &mut StateWriter) {
        self.master.save(out);
        self.slave.save(out);
        out.bool(self.intr);
    }

    fn load_body(&mut self, input: &mut StateReader<'_>) -> Result<(), SnapshotError> {
        let master = Chip::load(true, input)?;
        let slave = Chip::load(false, input)?;
        let intr = input.bool("INTR")?;
        self.master = master;
        self.slave = slave;
        self.intr = intr;
        // The line follows the restored output (no edge if it agrees).
        if let Some(line) = &self.intr_line {
            line.set_level(intr);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::check::refuses_damage;
    use crate::IoDevice;

    #[test]
    fn pic_round_trips_and_refuses_damage() {
        let shared = crate::pic::SharedPic::new(Pic::new());
        let mut master = shared.master_port();
        for (offset, value) in [(0, 0x11), (1, 0x20), (1, 0x04), (1, 0x01), (1, 0xfa)] {
            master.write(offset, &[value]);
        }
        shared.lock().set_irq(0, true);
        assert!(shared.lock().has_interrupt());
        let blob = shared.lock().snapshot();
        let mut copy = Pic::new();
        copy.restore(&blob).unwrap();
        assert!(copy.has_interrupt());
        assert_eq!(copy.acknowledge(), 0x20);
        refuses_damage(&blob, Pic::new);
    }

    #[test]
    fn a_bad_init_step_is_named() {
        let mut blob = Pic::new().snapshot();
        // Master's init step: body offset 7, after the 7 register bytes.
        let body = blob.len() - 4 - (2 * 17 + 1);
        blob[body + 7] = 9;
        let crc_at = blob.len() - 4;
        let crc = crate::snapshot::crc32(&blob[..crc_at]);
        blob[crc_at..].copy_from_slice(&crc.to_le_bytes());
        let err = Pic::new().restore(&blob).unwrap_err();
        assert!(err.to_string().contains("init step = 0x9"), "{err}");
    }
}
