//! [`Snapshot`] for the power devices: the PM1a control register's value
//! (the i8042 reset port holds no state).

use super::{I8042, PM1_SLP_EN};
use crate::power::Pm1Control;
use crate::snapshot::{stateless_snapshot, Snapshot, SnapshotError, StateReader, StateWriter};

impl Snapshot for Pm1Control {
    fn snapshot_name(&self) -> &'static str {
        "acpi-pm1-control"
    }

    fn snapshot_version(&self) -> u16 {
        1
    }

    fn save_body(&self, out: &mut StateWriter) {
        out.u16(self.value);
    }

    fn load_body(&mut self, input: &mut StateReader<'_>) -> Result<(), SnapshotError> {
        let at = input.offset();
        let value = input.u16("PM1 control")?;
        if value & PM1_SLP_EN != 0 {
            return Err(input.invalid("PM1 control", value.into(), at, "SLP_EN clear: it is a command, never held"));
        }
        self.value = value;
        Ok(())
    }
}

stateless_snapshot!(I8042, "i8042-reset");

#[cfg(test)]
mod tests {
    use std::sync::mpsc::channel;

    use super::*;
    use crate::snapshot::check::refuses_damage;
    use crate::IoDevice;

    #[test]
    fn pm1_control_round_trips_and_refuses_damage() {
        let (tx, _rx) = channel();
        let mut dev = Pm1Control::new(tx.clone());
        dev.write(0, &0x0401u16.to_le_bytes());
        let blob = dev.snapshot();
        let mut copy = Pm1Control::new(tx.clone());
        copy.restore(&blob).unwrap();
        let mut word = [0u8; 2];
        copy.read(0, &mut word);
        assert_eq!(u16::from_le_bytes(word), 0x0401);
        refuses_damage(&blob, || Pm1Control::new(tx.clone()));
    }

    #[test]
    fn i8042_round_trips_and_refuses_damage() {
        let (tx, _rx) = channel();
        let blob = I8042::new(tx.clone()).snapshot();
        refuses_damage(&blob, || I8042::new(tx.clone()));
    }
}
