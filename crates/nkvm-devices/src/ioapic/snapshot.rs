//! The IOAPIC's [`Snapshot`]: ID, register select, the 24 redirection
//! entries (with their remote-IRR and delivery-status bits) and the input
//! line levels. The message sink stays the one the restored IOAPIC was
//! built with; nothing is sent on restore (a level-triggered entry with
//! remote IRR set waits for its EOI, as it did when saved).

use super::{Ioapic, RedirectionEntry, IOAPIC_PINS};
use crate::snapshot::{Snapshot, SnapshotError, StateReader, StateWriter};
use crate::ApicBusSink;

impl<S: ApicBusSink> Snapshot for Ioapic<S> {
    fn snapshot_name(&self) -> &'static str {
        "ioapic"
    }

    fn snapshot_version(&self) -> u16 {
        1
    }

    fn save_body(&self, out: &mut StateWriter) {
        out.u8(self.id);
        out.u8(self.ioregsel);
        out.u32(self.lines);
        out.u8(IOAPIC_PINS as u8);
        self.table.iter().for_each(|e| out.u64(e.0));
    }

    fn load_body(&mut self, input: &mut StateReader<'_>) -> Result<(), SnapshotError> {
        let at = input.offset();
        let id = input.u8("ID")?;
        if id > 0xf {
            return Err(input.invalid("ID", id.into(), at, "4 bits"));
        }
        let ioregsel = input.u8("IOREGSEL")?;
        let at = input.offset();
        let lines = input.u32("line levels")?;
        if lines >> IOAPIC_PINS != 0 {
            return Err(input.invalid("line levels", lines.into(), at, "one bit per pin, 24 pins"));
        }
        let at = input.offset();
        let pins = input.u8("pin count")?;
        if usize::from(pins) != IOAPIC_PINS {
            return Err(input.invalid("pin count", pins.into(), at, "24"));
        }
        let mut table = [RedirectionEntry(0); IOAPIC_PINS];
        for entry in &mut table {
            entry.0 = input.u64("redirection entry")?;
        }
        (self.id, self.ioregsel, self.lines, self.table) = (id, ioregsel, lines, table);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ioapic::{INDEX_REDIRECTION_TABLE, REG_IOREGSEL, REG_IOWIN};
    use crate::snapshot::check::refuses_damage;
    use crate::IoDevice;

    #[test]
    fn ioapic_round_trips_and_refuses_damage() {
        let mut io = Ioapic::new(Vec::new());
        io.write(REG_IOREGSEL, &u32::from(INDEX_REDIRECTION_TABLE + 8).to_le_bytes());
        io.write(REG_IOWIN, &0x0000_a031u32.to_le_bytes());
        io.set_irq(5, true);
        let blob = io.snapshot();
        let mut copy = Ioapic::new(Vec::new());
        copy.restore(&blob).unwrap();
        assert_eq!(copy.entry(4), io.entry(4));
        assert!(copy.sink().is_empty(), "a restore sends nothing");
        refuses_damage(&blob, || Ioapic::new(Vec::new()));
    }
}
