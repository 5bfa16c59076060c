//! System Control Port A's [`Snapshot`]: the register byte (A20, the
//! reset bit and the bits kept for read-back). A restore reports no reset,
//! even with bit 0 set: that is not a rising edge of the bit. The event
//! channel stays the one the restored port was built with.
//!
//! Body, format version 1: u8 register.

use super::SystemControlA;
use crate::snapshot::{Snapshot, SnapshotError, StateReader, StateWriter};

impl Snapshot for SystemControlA {
    fn snapshot_name(&self) -> &'static str {
        "port92"
    }

    fn snapshot_version(&self) -> u16 {
        1
    }

    fn save_body(&self, out: &mut StateWriter) {
        out.u8(self.value);
    }

    fn load_body(&mut self, input: &mut StateReader<'_>) -> Result<(), SnapshotError> {
        self.value = input.u8("register")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::channel;

    use super::*;
    use crate::power::PowerEvent;
    use crate::IoDevice;

    #[test]
    fn a20_off_and_the_reset_bit_survive_without_a_reset() {
        let (tx, rx) = channel();
        let mut port = SystemControlA::new(tx);
        port.write(0, &[0x01]);
        assert_eq!(rx.try_recv(), Ok(PowerEvent::Reset));
        let blob = port.snapshot();
        let (tx, rx) = channel();
        let mut copy = SystemControlA::new(tx);
        copy.restore(&blob).unwrap();
        assert!(!copy.a20_enabled());
        assert!(rx.try_recv().is_err(), "a restore is not a reset");
        let mut byte = [0u8];
        copy.read(0, &mut byte);
        assert_eq!(byte, [0x01]);
        copy.write(0, &[0x01]);
        assert!(rx.try_recv().is_err(), "bit 0 was already set: no edge");
        crate::snapshot::check::refuses_damage(&blob, || SystemControlA::new(channel().0));
    }
}
