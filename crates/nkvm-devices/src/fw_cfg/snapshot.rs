//! fw_cfg's [`Snapshot`]: the selected item and the read position in it.
//!
//! The items are not restored: the machine builder makes them from its
//! configuration. They are saved all the same, so that a blob from a
//! machine with another CPU count or RAM size is refused (naming the
//! item) instead of the guest reading a configuration that changed under it.
//!
//! Body, format version 1 (little-endian): u16 selected key (0xffff: none),
//! u32 read position, u8 item count, then per item u16 key, u32 length and
//! the bytes.

use super::{FwCfg, FW_CFG_ID, FW_CFG_MAX_CPUS, FW_CFG_MAX_RAM, FW_CFG_NB_CPUS, FW_CFG_RAM_SIZE, FW_CFG_SIGNATURE};
use crate::snapshot::{Snapshot, SnapshotError, StateReader, StateWriter};

/// Longest item the blob holds (the items here are at most 8 bytes).
const MAX_ITEM_LEN: usize = 64;
/// Most items the blob holds.
const MAX_ITEMS: usize = 64;
/// The selector's value in the blob when no item is selected.
const NO_ITEM: u16 = 0xffff;

/// The field name an item's mismatch is reported under.
fn item_field(key: u16) -> &'static str {
    match key {
        FW_CFG_SIGNATURE => "item SIGNATURE",
        FW_CFG_ID => "item ID",
        FW_CFG_RAM_SIZE => "item RAM_SIZE (the RAM size)",
        FW_CFG_NB_CPUS => "item NB_CPUS (the CPU count)",
        FW_CFG_MAX_CPUS => "item MAX_CPUS (the CPU count)",
        FW_CFG_MAX_RAM => "item MAX_RAM (the memory limit)",
        _ => "item",
    }
}

/// Up to 8 bytes as a little-endian number, for error messages.
fn le_u64(bytes: &[u8]) -> u64 {
    bytes.iter().take(8).rev().fold(0, |v, &b| (v << 8) | u64::from(b))
}

impl Snapshot for FwCfg {
    fn snapshot_name(&self) -> &'static str {
        "fw-cfg"
    }

    fn snapshot_version(&self) -> u16 {
        1
    }

    fn save_body(&self, out: &mut StateWriter) {
        out.u16(self.selected.map_or(NO_ITEM, |i| self.items[i].0));
        out.u32(self.position as u32);
        out.u8(self.items.len() as u8);
        for (key, value) in &self.items {
            out.u16(*key);
            out.blob(value);
        }
    }

    fn load_body(&mut self, input: &mut StateReader<'_>) -> Result<(), SnapshotError> {
        let at = input.offset();
        let key = input.u16("selected key")?;
        let selected = match key {
            NO_ITEM => None,
            key => match self.items.iter().position(|(k, _)| *k == key) {
                Some(i) => Some(i),
                None => {
                    return Err(input.invalid("selected key", key.into(), at, "a key this fw_cfg serves, or 0xffff"))
                }
            },
        };
        let at = input.offset();
        let position = input.u32("position")? as usize;
        let len = selected.map_or(0, |i| self.items[i].1.len());
        if position > len {
            return Err(input.invalid("position", position as u64, at, "within the selected item"));
        }
        let at = input.offset();
        let count = usize::from(input.u8("item count")?);
        if count != self.items.len() || count > MAX_ITEMS {
            return Err(input.invalid("item count", count as u64, at, "the items this machine serves"));
        }
        for (own_key, own_value) in &self.items {
            let at = input.offset();
            let key = input.u16("item key")?;
            if key != *own_key {
                return Err(input.invalid("item key", key.into(), at, "the keys this machine serves, in order"));
            }
            let at = input.offset();
            let value = input.blob(item_field(key), MAX_ITEM_LEN)?;
            if value != own_value.as_slice() {
                return Err(input.invalid(
                    item_field(key),
                    le_u64(value),
                    at,
                    "the value this machine serves: the saved machine was configured differently",
                ));
            }
        }
        (self.selected, self.position) = (selected, position);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fw_cfg::FwCfgConfig;
    use crate::snapshot::check::refuses_damage;
    use crate::IoDevice;

    const CONFIG: FwCfgConfig = FwCfgConfig { cpus: 2, ram_size: 64 << 20, max_ram: 0 };

    fn read_byte(dev: &mut FwCfg) -> u8 {
        let mut byte = [0u8];
        dev.read(1, &mut byte);
        byte[0]
    }

    #[test]
    fn a_half_read_item_reads_on_after_restore() {
        let mut dev = FwCfg::new(CONFIG);
        dev.write(0, &FW_CFG_RAM_SIZE.to_le_bytes());
        let first: Vec<u8> = (0..3).map(|_| read_byte(&mut dev)).collect();
        let blob = dev.snapshot();
        let mut copy = FwCfg::new(CONFIG);
        copy.restore(&blob).unwrap();
        let rest: Vec<u8> = (0..5).map(|_| read_byte(&mut copy)).collect();
        assert_eq!([first, rest].concat(), (64u64 << 20).to_le_bytes());
        refuses_damage(&blob, || FwCfg::new(CONFIG));
    }

    #[test]
    fn an_unknown_key_selection_round_trips() {
        let mut dev = FwCfg::new(CONFIG);
        dev.write(0, &0x8005u16.to_le_bytes());
        let blob = dev.snapshot();
        let mut copy = FwCfg::new(CONFIG);
        copy.restore(&blob).unwrap();
        assert_eq!(read_byte(&mut copy), 0, "still the empty item");
        refuses_damage(&blob, || FwCfg::new(CONFIG));
    }

    #[test]
    fn another_cpu_count_is_refused_by_name() {
        let blob = FwCfg::new(CONFIG).snapshot();
        let mut other = FwCfg::new(FwCfgConfig { cpus: 4, ..CONFIG });
        let before = other.snapshot();
        let err = other.restore(&blob).unwrap_err();
        assert!(err.to_string().contains("item NB_CPUS (the CPU count) = 0x2"), "{err}");
        assert_eq!(other.snapshot(), before, "the refused blob changed nothing");
        let err = FwCfg::new(FwCfgConfig { ram_size: 32 << 20, ..CONFIG }).restore(&blob).unwrap_err();
        assert!(err.to_string().contains("RAM_SIZE"), "{err}");
    }

    #[test]
    fn a_position_past_the_item_is_refused() {
        let mut w = StateWriter::default();
        w.u16(FW_CFG_NB_CPUS);
        w.u32(3);
        let mut body = StateReader::for_test(w.into_bytes(), "fw-cfg");
        let err = FwCfg::new(CONFIG).load_body(&mut body).unwrap_err();
        assert!(err.to_string().contains("position = 0x3"), "{err}");
    }
}
