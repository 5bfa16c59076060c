//! The test device's [`Snapshot`]: its counter, scratch registers and
//! access counts. The access log is a test's record, not device state: a
//! restored device starts with an empty log.

use super::{TestDevice, SCRATCH_COUNT};
use crate::snapshot::{Snapshot, SnapshotError, StateReader, StateWriter};

impl Snapshot for TestDevice {
    fn snapshot_name(&self) -> &'static str {
        "test-device"
    }

    fn snapshot_version(&self) -> u16 {
        1
    }

    fn save_body(&self, out: &mut StateWriter) {
        out.u64(self.counter);
        self.scratch.iter().for_each(|&s| out.u64(s));
        out.u64(self.writes);
        out.u64(self.reads);
    }

    fn load_body(&mut self, input: &mut StateReader<'_>) -> Result<(), SnapshotError> {
        let counter = input.u64("counter")?;
        let mut scratch = [0u64; SCRATCH_COUNT];
        for s in &mut scratch {
            *s = input.u64("scratch")?;
        }
        let writes = input.u64("write count")?;
        let reads = input.u64("read count")?;
        *self = TestDevice { counter, scratch, writes, reads, ..TestDevice::new() };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::check::refuses_damage;
    use crate::test_device::{REG_COUNTER, REG_SCRATCH0};
    use crate::IoDevice;

    #[test]
    fn test_device_round_trips_and_refuses_damage() {
        let mut dev = TestDevice::new();
        dev.write(REG_COUNTER, &41u64.to_le_bytes());
        dev.write(REG_SCRATCH0 + 24, &0xdead_beefu64.to_le_bytes());
        let mut v = [0u8; 8];
        dev.read(REG_COUNTER, &mut v);
        let blob = dev.snapshot();
        let mut copy = TestDevice::new();
        copy.restore(&blob).unwrap();
        assert_eq!(copy.scratch(3), Some(0xdead_beef));
        assert_eq!((copy.writes(), copy.reads()), (dev.writes(), dev.reads()));
        copy.read(REG_COUNTER, &mut v);
        assert_eq!(u64::from_le_bytes(v), 42);
        refuses_damage(&blob, TestDevice::new);
    }
}
