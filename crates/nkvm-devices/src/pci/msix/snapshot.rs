//! MSI-X as a [`Snapshot`]: the enable and function-mask bits, the table
//! and the pending bits. On restore the sink is told every route again
//! (it is a new sink, or a sink that knows nothing of the saved routes).

use super::{Entry, Msix, VECTOR_MASKED};
use crate::snapshot::{Snapshot, SnapshotError, StateReader, StateWriter};

impl Snapshot for Msix {
    fn snapshot_name(&self) -> &'static str {
        "pci-msix"
    }

    fn snapshot_version(&self) -> u16 {
        1
    }

    fn save_body(&self, out: &mut StateWriter) {
        out.bool(self.enabled);
        out.bool(self.function_masked);
        out.u16(self.table.len() as u16);
        for (e, &pending) in self.table.iter().zip(&self.pending) {
            out.u64(e.address);
            out.u32(e.data);
            out.u32(e.control);
            out.bool(pending);
        }
    }

    fn load_body(&mut self, input: &mut StateReader<'_>) -> Result<(), SnapshotError> {
        let enabled = input.bool("enable")?;
        let function_masked = input.bool("function mask")?;
        let at = input.offset();
        let n = input.u16("vector count")?;
        if usize::from(n) != self.table.len() {
            return Err(input.invalid("vector count", n.into(), at, "this device's vector count"));
        }
        let mut table = Vec::with_capacity(self.table.len());
        let mut pending = Vec::with_capacity(self.table.len());
        for _ in 0..n {
            let (address, data) = (input.u64("entry address")?, input.u32("entry data")?);
            let at = input.offset();
            let control = input.u32("entry control")?;
            if control & !VECTOR_MASKED != 0 {
                return Err(input.invalid("entry control", control.into(), at, "only the mask bit"));
            }
            table.push(Entry { address, data, control });
            pending.push(input.bool("pending")?);
        }
        (self.enabled, self.function_masked, self.table, self.pending) = (enabled, function_masked, table, pending);
        self.routed.iter_mut().for_each(|r| *r = None);
        self.update();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::{ConfigSpace, PciId};
    use crate::pci::msix::tests::{RecordingSink, SinkEvent};
    use crate::pci::msix::{MsiMessage, MsixLayout, CONTROL_ENABLE};

    use crate::snapshot::check::refuses_damage;

    fn msix(sink: &RecordingSink) -> (ConfigSpace, Msix) {
        let id = PciId { vendor: 1, device: 2, revision: 0, class: 0, subsystem_vendor: 0, subsystem: 0 };
        let mut config = ConfigSpace::new(id);
        let layout = MsixLayout { vectors: 3, table_bar: 0, table_offset: 0x4000, pba_bar: 0, pba_offset: 0x5000 };
        let msix = Msix::new(&mut config, layout, Box::new(sink.clone())).unwrap();
        (config, msix)
    }

    #[test]
    fn msix_round_trips_routes_and_pending_vectors_and_refuses_damage() {
        let sink = RecordingSink::default();
        let (mut config, mut m) = msix(&sink);
        let at = m.cap_offset + 2;
        config.write(at, &CONTROL_ENABLE.to_le_bytes());
        m.config_written(&config);
        m.table_write(0, &0xfee0_0000u64.to_le_bytes());
        m.table_write(8, &0x41u32.to_le_bytes());
        m.table_write(12, &0u32.to_le_bytes()); // vector 0 unmasked
        m.table_write(16 + 8, &0x42u32.to_le_bytes());
        m.signal(1); // vector 1 is masked: pending
        let blob = m.snapshot();
        let fresh = RecordingSink::default();
        let (_, mut copy) = msix(&fresh);
        copy.restore(&blob).unwrap();
        let route = MsiMessage { address: 0xfee0_0000, data: 0x41 };
        assert_eq!(fresh.take(), vec![SinkEvent::Route(0, Some(route))], "the new sink learns the route");
        let mut pba = [0u8];
        copy.pba_read(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        refuses_damage(&blob, || msix(&RecordingSink::default()).1);
    }
}
