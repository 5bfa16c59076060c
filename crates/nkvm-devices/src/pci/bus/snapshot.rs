//! The bus's own state: the configuration address register (the guest may
//! be paused between writing 0xcf8 and using 0xcfc). The devices on it are
//! saved each on its own; where their BARs decode follows from their
//! configuration spaces ([`PciBus::rescan`]).

use super::{PciBus, ADDRESS_MASK};
use crate::snapshot::{Snapshot, SnapshotError, StateReader, StateWriter};

impl Snapshot for PciBus {
    fn snapshot_name(&self) -> &'static str {
        "pci-bus"
    }

    fn snapshot_version(&self) -> u16 {
        1
    }

    fn save_body(&self, out: &mut StateWriter) {
        out.u32(self.address);
    }

    fn load_body(&mut self, input: &mut StateReader<'_>) -> Result<(), SnapshotError> {
        let at = input.offset();
        let address = input.u32("configuration address")?;
        if address & !ADDRESS_MASK != 0 {
            return Err(input.invalid("configuration address", address.into(), at, "bits 31, 23-2 only"));
        }
        self.address = address;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::check::refuses_damage;
    use crate::IoDevice;

    #[test]
    fn the_address_latch_round_trips_and_damage_is_refused() {
        let mut bus = PciBus::new();
        bus.write(0, &0x8000_0008u32.to_le_bytes());
        let blob = bus.snapshot();
        let mut copy = PciBus::new();
        copy.restore(&blob).unwrap();
        let mut class = [0u8; 4];
        copy.read(4, &mut class);
        assert_eq!(u32::from_le_bytes(class) >> 8, 0x06_00_00, "the host bridge's class, as 0xcf8 selected");
        refuses_damage(&blob, PciBus::new);
    }
}
