//! A function's configuration space as a [`Snapshot`]: the 256 bytes the
//! guest sees (BAR addresses, command, capabilities' registers...). What
//! the device model declared (IDs, BAR sizes, capability layout, which
//! bits are writable) comes from building the same device: a restore
//! refuses bytes whose read-only bits differ, which is another device's
//! (or another configuration's) state.

use super::{ConfigSpace, CONFIG_SIZE};
use crate::snapshot::{Snapshot, SnapshotError, StateReader, StateWriter};

impl Snapshot for ConfigSpace {
    fn snapshot_name(&self) -> &'static str {
        "pci-config-space"
    }

    fn snapshot_version(&self) -> u16 {
        1
    }

    fn save_body(&self, out: &mut StateWriter) {
        out.blob(&self.bytes);
    }

    fn load_body(&mut self, input: &mut StateReader<'_>) -> Result<(), SnapshotError> {
        let at = input.offset() + 4;
        let bytes = input.blob("config bytes", CONFIG_SIZE)?;
        if bytes.len() != CONFIG_SIZE {
            return Err(input.invalid("config bytes", bytes.len() as u64, at - 4, "256 bytes"));
        }
        for (i, (&saved, &mine)) in bytes.iter().zip(&self.bytes).enumerate() {
            let fixed = !(self.writable[i] | self.write_one_clears[i]);
            if (saved ^ mine) & fixed != 0 {
                return Err(input.invalid(
                    "a read-only config byte",
                    u64::from(saved),
                    at + i,
                    "the value this device has: the state is another device's",
                ));
            }
        }
        self.bytes.copy_from_slice(bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::{MemoryBar, PciId, COMMAND, COMMAND_MEMORY};
    use crate::snapshot::check::refuses_damage;

    fn config(device: u16) -> ConfigSpace {
        let id = PciId { vendor: 0x1af4, device, revision: 1, class: 0x01_00_00, subsystem_vendor: 0, subsystem: 2 };
        let mut c = ConfigSpace::new(id);
        c.set_memory_bar(0, MemoryBar { address: 0xe000_0000, size: 0x4000, is_64bit: true, prefetchable: false })
            .unwrap();
        c
    }

    #[test]
    fn config_space_round_trips_bars_and_command_and_refuses_damage() {
        let mut c = config(0x1042);
        c.write(0x10, &0xd000_0000u32.to_le_bytes());
        c.write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        let blob = c.snapshot();
        let mut copy = config(0x1042);
        copy.restore(&blob).unwrap();
        assert_eq!(copy.bar_address(0), Some(0xd000_0000));
        assert_eq!(copy.bar_mappings(), c.bar_mappings());
        refuses_damage(&blob, || config(0x1042));
    }

    #[test]
    fn another_devices_config_is_refused() {
        let blob = config(0x1042).snapshot();
        let err = config(0x1043).restore(&blob).unwrap_err().to_string();
        assert!(err.contains("another device's"), "{err}");
    }
}
