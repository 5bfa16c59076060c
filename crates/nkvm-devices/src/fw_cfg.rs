//! QEMU's firmware configuration device (fw_cfg), legacy I/O interface
//! only: the few items kvm-unit-tests reads (`lib/x86/fwcfg.c`).
//!
//! # Registers
//!
//! | port | offset | access | meaning |
//! |---|---|---|---|
//! | 0x510 | 0 | W, 16 bits | selector: choose an item by key, rewind to its first byte |
//! | 0x511 | 1 | R, 8 bits | data: the next byte of the selected item, 0 past its end |
//!
//! As in QEMU's combined I/O region, a byte read at 0x510 reads data too,
//! and a byte write at either port is accepted and ignored (QEMU dropped
//! data writes in 2.4). A 32-bit write at 0x510 selects with its low 16
//! bits (QEMU cuts the access at the end of its 2-port region). Reads wider
//! than a byte return zeroes without advancing, as QEMU rejects them;
//! other writes, empty accesses and bytes past the second port are logged
//! and ignored (reading `0xff` past the region). After reset the signature
//! item is selected.
//!
//! # Items
//!
//! | key | name | value |
//! |---|---|---|
//! | 0x00 | `SIGNATURE` | `"QEMU"` |
//! | 0x01 | `ID` | u32 1: the traditional interface only, no DMA |
//! | 0x03 | `RAM_SIZE` | u64, [`FwCfgConfig::ram_size`] |
//! | 0x05 | `NB_CPUS` | u16, [`FwCfgConfig::cpus`] (`smp.c` waits for that many CPUs) |
//! | 0x0f | `MAX_CPUS` | u16, [`FwCfgConfig::cpus`] as well |
//! | 0x11 | `MAX_RAM` | u64, [`FwCfgConfig::max_ram`]; 0 means no limit |
//!
//! Numbers are little-endian. Any other key selects an empty item, which
//! reads as zeroes. Bit 14 of a key (QEMU's write channel) is ignored; keys
//! with bit 15 set (architecture-local items) are all empty here.
//!
//! `MAX_RAM` is a kvm-unit-tests convention (`fwcfg.h` calls it a dummy
//! entry for bare metal): in QEMU key 0x11 is `KERNEL_DATA`. The suite's
//! `setup.c` treats 0 as "no limit", so the default configuration is
//! `max_ram: 0`.

use std::fmt;

use crate::bad_access::BadAccessLog;
use crate::bus::{le_value, IoDevice};

mod snapshot;

/// The selector port; the data port is the next one.
pub const FW_CFG_PORT: u16 = 0x510;
/// Size of the device's region in ports (selector and data).
pub const FW_CFG_SIZE: u64 = 2;
/// Key of the signature item, `"QEMU"`.
pub const FW_CFG_SIGNATURE: u16 = 0x00;
/// Key of the interface ID item.
pub const FW_CFG_ID: u16 = 0x01;
/// Key of the RAM size item (u64, bytes).
pub const FW_CFG_RAM_SIZE: u16 = 0x03;
/// Key of the boot CPU count item (u16).
pub const FW_CFG_NB_CPUS: u16 = 0x05;
/// Key of the maximum CPU count item (u16).
pub const FW_CFG_MAX_CPUS: u16 = 0x0f;
/// Key of kvm-unit-tests' memory limit item (u64, bytes; 0 = none).
pub const FW_CFG_MAX_RAM: u16 = 0x11;
/// The `ID` item's value: bit 0, the traditional I/O interface (no DMA).
pub const FW_CFG_ID_TRADITIONAL: u32 = 1;

/// Key bit 14: QEMU's (removed) write channel; ignored.
const KEY_WRITE_CHANNEL: u16 = 0x4000;
/// Key bit 15: architecture-local items.
const KEY_ARCH_LOCAL: u16 = 0x8000;
const OFFSET_SELECTOR: u64 = 0;
const OFFSET_DATA: u64 = 1;
const NAME: &str = "fw_cfg";

/// What the machine tells the guest through fw_cfg.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FwCfgConfig {
    /// Number of CPUs (`NB_CPUS` and `MAX_CPUS`).
    pub cpus: u16,
    /// Guest RAM in bytes (`RAM_SIZE`).
    pub ram_size: u64,
    /// Highest guest-physical address the test may allocate, in bytes
    /// (`MAX_RAM`); 0 for no limit.
    pub max_ram: u64,
}

/// The fw_cfg device; see the [module documentation](self).
#[derive(Clone)]
pub struct FwCfg {
    /// Items by key, in key order; few enough to search linearly.
    items: Vec<(u16, Vec<u8>)>,
    /// Index in `items` of the selected item; `None` selects an empty item.
    selected: Option<usize>,
    /// Next byte of the selected item to read.
    position: usize,
    bad: BadAccessLog,
}

impl fmt::Debug for FwCfg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: Vec<_> = self.items.iter().map(|(key, _)| format!("{key:#x}")).collect();
        f.debug_struct("FwCfg")
            .field("keys", &keys)
            .field("selected", &self.selected.map(|i| self.items[i].0))
            .field("position", &self.position)
            .finish_non_exhaustive()
    }
}

impl FwCfg {
    /// A device serving `config`, with the signature selected.
    pub fn new(config: FwCfgConfig) -> Self {
        let items = vec![
            (FW_CFG_SIGNATURE, b"QEMU".to_vec()),
            (FW_CFG_ID, FW_CFG_ID_TRADITIONAL.to_le_bytes().to_vec()),
            (FW_CFG_RAM_SIZE, config.ram_size.to_le_bytes().to_vec()),
            (FW_CFG_NB_CPUS, config.cpus.to_le_bytes().to_vec()),
            (FW_CFG_MAX_CPUS, config.cpus.to_le_bytes().to_vec()),
            (FW_CFG_MAX_RAM, config.max_ram.to_le_bytes().to_vec()),
        ];
        let mut device = Self { items, selected: None, position: 0, bad: BadAccessLog::default() };
        device.select(FW_CFG_SIGNATURE);
        device
    }

    /// Select the item with `key` and rewind to its first byte, as a
    /// 16-bit write to the selector does.
    pub fn select(&mut self, key: u16) {
        let key = key & !KEY_WRITE_CHANNEL;
        self.selected = if key & KEY_ARCH_LOCAL != 0 { None } else { self.items.iter().position(|(k, _)| *k == key) };
        self.position = 0;
    }

    /// The next byte of the selected item (0 past its end, without moving).
    fn next_byte(&mut self) -> u8 {
        let item = self.selected.map_or(&[][..], |i| &self.items[i].1);
        match item.get(self.position) {
            Some(&byte) => {
                self.position += 1;
                byte
            }
            None => 0,
        }
    }
}

impl IoDevice for FwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data) {
            (OFFSET_SELECTOR | OFFSET_DATA, [byte]) => *byte = self.next_byte(),
            (OFFSET_SELECTOR | OFFSET_DATA, data) if !data.is_empty() => {
                self.bad.read(NAME, offset, data.len());
                for (i, byte) in data.iter_mut().enumerate() {
                    *byte = if offset + (i as u64) < FW_CFG_SIZE { 0 } else { 0xff };
                }
            }
            (_, data) => {
                self.bad.read(NAME, offset, data.len());
                data.fill(0xff);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (OFFSET_SELECTOR, 2 | 4) => self.select(le_value(data) as u16),
            (OFFSET_SELECTOR | OFFSET_DATA, 1) => log::debug!("{NAME}: data write {data:02x?} ignored"),
            _ => self.bad.write(NAME, offset, data),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: FwCfgConfig = FwCfgConfig { cpus: 3, ram_size: 128 << 20, max_ram: 0 };

    /// What `fwcfg_get_u()` in kvm-unit-tests does: a 16-bit `out` of the
    /// key to 0x510, then `bytes` byte reads of 0x511, little-endian.
    fn fwcfg_get(dev: &mut FwCfg, key: u16, bytes: usize) -> u64 {
        dev.write(0, &key.to_le_bytes());
        let mut value = 0u64;
        for i in 0..bytes {
            let mut byte = [0u8];
            dev.read(1, &mut byte);
            value |= u64::from(byte[0]) << (i * 8);
        }
        value
    }

    #[test]
    fn suite_reads_cpus_ram_and_memory_limit() {
        let mut dev = FwCfg::new(FwCfgConfig { max_ram: 3 << 30, ..CONFIG });
        assert_eq!(fwcfg_get(&mut dev, FW_CFG_NB_CPUS, 2), 3);
        assert_eq!(fwcfg_get(&mut dev, FW_CFG_RAM_SIZE, 8), 128 << 20);
        assert_eq!(fwcfg_get(&mut dev, FW_CFG_MAX_RAM, 8), 3 << 30);
        assert_eq!(fwcfg_get(&mut dev, FW_CFG_MAX_CPUS, 2), 3);
        assert_eq!(fwcfg_get(&mut dev, FW_CFG_ID, 4), u64::from(FW_CFG_ID_TRADITIONAL));
    }

    #[test]
    fn no_memory_limit_reads_as_zero() {
        let mut dev = FwCfg::new(CONFIG);
        assert_eq!(fwcfg_get(&mut dev, FW_CFG_MAX_RAM, 8), 0);
    }

    #[test]
    fn signature_is_selected_after_reset() {
        let mut dev = FwCfg::new(CONFIG);
        let mut sig = [0u8; 4];
        for byte in &mut sig {
            dev.read(1, std::slice::from_mut(byte));
        }
        assert_eq!(&sig, b"QEMU");
        assert_eq!(fwcfg_get(&mut dev, FW_CFG_SIGNATURE, 4).to_le_bytes()[..4], *b"QEMU");
    }

    #[test]
    fn reads_past_the_end_return_zero_and_reselecting_rewinds() {
        let mut dev = FwCfg::new(CONFIG);
        // NB_CPUS is 2 bytes: the next 6 are zero.
        assert_eq!(fwcfg_get(&mut dev, FW_CFG_NB_CPUS, 8), 3);
        let mut byte = [0xaa];
        dev.read(1, &mut byte);
        assert_eq!(byte, [0]);
        dev.select(FW_CFG_NB_CPUS);
        dev.read(1, &mut byte);
        assert_eq!(byte, [3]);
    }

    #[test]
    fn unknown_and_arch_local_keys_read_as_empty() {
        let mut dev = FwCfg::new(CONFIG);
        assert_eq!(fwcfg_get(&mut dev, 0x02, 8), 0); // UUID: not served
        assert_eq!(fwcfg_get(&mut dev, 0x3fff, 8), 0);
        assert_eq!(fwcfg_get(&mut dev, 0x8000 | FW_CFG_NB_CPUS, 2), 0);
        assert_eq!(fwcfg_get(&mut dev, 0xffff, 2), 0);
        // The write-channel bit does not change the item.
        assert_eq!(fwcfg_get(&mut dev, 0x4000 | FW_CFG_NB_CPUS, 2), 3);
    }

    #[test]
    fn a_byte_read_of_the_selector_port_reads_data() {
        let mut dev = FwCfg::new(CONFIG);
        dev.write(0, &FW_CFG_NB_CPUS.to_le_bytes());
        let mut byte = [0u8];
        dev.read(0, &mut byte);
        assert_eq!(byte, [3]);
    }

    #[test]
    fn a_dword_selector_write_uses_the_low_16_bits() {
        let mut dev = FwCfg::new(CONFIG);
        dev.write(0, &0xabcd_0005u32.to_le_bytes());
        assert_eq!(fwcfg_get(&mut dev, FW_CFG_NB_CPUS, 2), 3);
    }

    #[test]
    fn wide_reads_return_zero_and_do_not_advance() {
        let mut dev = FwCfg::new(CONFIG);
        dev.write(0, &FW_CFG_NB_CPUS.to_le_bytes());
        let mut word = [0xaa; 2];
        dev.read(0, &mut word);
        assert_eq!(word, [0, 0]);
        let mut dword = [0xaa; 4];
        dev.read(1, &mut dword);
        assert_eq!(dword, [0, 0xff, 0xff, 0xff], "one byte in the region, three past it");
        let mut byte = [0u8];
        dev.read(1, &mut byte);
        assert_eq!(byte, [3], "still at the first byte");
    }

    #[test]
    fn bad_writes_change_nothing() {
        let mut dev = FwCfg::new(CONFIG);
        dev.write(0, &FW_CFG_NB_CPUS.to_le_bytes());
        dev.write(1, &FW_CFG_RAM_SIZE.to_le_bytes()); // word at the data port
        dev.write(0, &[FW_CFG_RAM_SIZE as u8]); // byte: a data write
        dev.write(1, &[0x55]); // data write, ignored
        dev.write(0, &[]);
        dev.write(2, &FW_CFG_RAM_SIZE.to_le_bytes());
        dev.write(u64::MAX, &[0; 2]);
        dev.write(0, &[0; 8]);
        let mut byte = [0u8];
        dev.read(1, &mut byte);
        assert_eq!(byte, [3], "NB_CPUS still selected, nothing consumed");
    }

    #[test]
    fn empty_and_out_of_range_reads_are_harmless() {
        let mut dev = FwCfg::new(CONFIG);
        dev.read(0, &mut []);
        let mut past = [0u8; 2];
        dev.read(FW_CFG_SIZE, &mut past);
        assert_eq!(past, [0xff; 2]);
        dev.read(u64::MAX, &mut past);
        let mut byte = [0u8];
        dev.read(1, &mut byte);
        assert_eq!(byte, [b'Q'], "no read consumed a byte");
    }
}
