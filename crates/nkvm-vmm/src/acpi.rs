//! ACPI tables for a Linux guest, built with the `acpi_tables` crate and
//! placed in the BIOS area below 1 MiB.
//!
//! Debian's kernel has no MP-table parser, so this is where it learns the
//! machine: the MADT lists one local APIC per vCPU, the IOAPIC and the ISA
//! interrupt overrides; the FADT names the PM1a registers (power-off through
//! `\_S5`), the SCI and the reset register; the DSDT describes the PCI host
//! bridge with its windows and COM1.
//!
//! | address | what |
//! |---|---|
//! | [`ACPI_START`] (0xe0000) | RSDP (revision 2), found by a scan of 0xe0000-0xfffff or through `boot_params.acpi_rsdp_addr` |
//! | after it | DSDT, FACS, MADT, FADT, XSDT, each 16-byte aligned (FACS 64-byte) |
//!
//! The fixed hardware the tables announce: the PM1a event block (0x600) is
//! a small device model ([`Pm1Event`]); PM1a control (0x604), the reset
//! register (0xcf9) and the 8042's pulse-reset command (0x64, for
//! `reboot=k`) are ports the vCPU loop serves itself ([`port_write`],
//! [`port_read`]), since they stop the machine.

use acpi_tables::aml;
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use nkvm::{GuestAddress, Vm};
use nkvm_devices::power::{I8042_CMD_RESET, I8042_COMMAND_PORT, PM1_SCI_EN, PM1_SLP_EN, PM1_SLP_TYP_SHIFT};
use nkvm_devices::IoDevice;

use crate::builtin;

/// Where the tables start: the RSDP, 16-byte aligned inside the range Linux
/// scans for it.
pub const ACPI_START: u64 = 0x000e_0000;
/// End (exclusive) of the area reserved for the tables.
pub const ACPI_END: u64 = 0x000f_0000;
/// Start of the BIOS area the e820 map reports reserved (the tables and
/// what a BIOS would keep above them).
pub const BIOS_AREA_START: u64 = ACPI_START;
/// End (exclusive) of the BIOS area.
pub const BIOS_AREA_END: u64 = 0x0010_0000;
/// Start of the 32-bit PCI memory window the host bridge forwards (for
/// BARs).
pub const PCI_MMIO_START: u64 = 0xc000_0000;
/// End (exclusive) of the 32-bit PCI memory window: the IOAPIC follows.
pub const PCI_MMIO_END: u64 = 0xfec0_0000;
/// The IOAPIC's register window.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// The local APICs' register window.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// The SCI: ISA IRQ 9, level-triggered, active high.
pub const SCI_IRQ: u8 = 9;
/// COM1's ISA IRQ (and IOAPIC pin).
pub const COM1_IRQ: u8 = 4;
/// The PM1a event block (status, enable: 2 bytes each).
pub const PM1A_EVT: u16 = 0x600;
/// Length of the PM1a event block.
pub const PM1A_EVT_LEN: u8 = 4;
/// The reset register (the PIIX reset control port).
pub const RESET_PORT: u16 = 0xcf9;
/// The value the guest writes to [`RESET_PORT`] to reset.
pub const RESET_VALUE: u8 = 0x06;
/// The ACPI PM timer's port, where a machine has one.
pub const PM_TIMER_PORT: u16 = 0x608;
/// Length of the PM timer block.
pub const PM_TIMER_LEN: u8 = 4;
/// `SLP_TYP` of `\_S5` (soft-off), as the PM1a control port expects it.
pub const SLP_TYP_S5: u8 = 5;
/// `SLP_TYP` of `\_S3` (suspend to RAM) where the machine has it: 1, as in
/// QEMU's DSDT (kvm-unit-tests' s3.c writes 0x2400 without reading `\_S3`).
pub const SLP_TYP_S3: u8 = 1;
/// Offset in the FACS of the 32-bit firmware waking vector.
pub const FACS_WAKING_VECTOR: u64 = 12;
/// Offset in the FACS of the 64-bit firmware waking vector (used when not 0).
pub const FACS_X_WAKING_VECTOR: u64 = 24;

const OEM_ID: [u8; 6] = *b"NKVM  ";
const OEM_REVISION: u32 = 1;
/// MADT flag PCAT_COMPAT: a PC-compatible machine with ISA IRQs 0-15.
/// Linux then assumes a dual 8259 without probing for it; this machine has
/// none, so its writes to ports 0x20/0xa0 are ignored and reads see 0xff.
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT structure types.
const MADT_INTERRUPT_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
/// MPS INTI flags: polarity (bits 0-1), trigger mode (bits 2-3).
const INTI_ACTIVE_HIGH: u16 = 1;
const INTI_EDGE: u16 = 1 << 2;
const INTI_LEVEL: u16 = 3 << 2;
/// IAPC_BOOT_ARCH: the machine has an 8042 (its reset command is used).
const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;
/// The ACPI processor UID meaning "all processors" in a local APIC NMI entry.
const ALL_PROCESSORS: u8 = 0xff;

/// Errors building or placing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// MADT local APIC entries hold 8-bit APIC IDs, and the IOAPIC takes the
    /// ID after the last vCPU; zero vCPUs is no machine.
    #[error("the MADT cannot describe {vcpus} vCPUs (1 to 254: APIC IDs are 8-bit and the IOAPIC takes the next)")]
    TooManyVcpus {
        /// The vCPU count asked for.
        vcpus: u32,
    },
    /// The tables outgrew their area.
    #[error("the ACPI tables ({size} bytes) do not fit in {ACPI_START:#x}..{ACPI_END:#x}")]
    TooBig {
        /// Their size.
        size: usize,
    },
    /// Writing them to guest memory failed.
    #[error("cannot write the ACPI tables to guest memory")]
    Memory(#[source] nkvm::MemoryError),
}

/// The tables as one image to copy to [`ACPI_START`]; the RSDP is at its
/// start.
#[derive(Debug, Clone)]
pub struct AcpiTables {
    /// The bytes, starting with the RSDP.
    pub image: Vec<u8>,
    /// Where the FACS (with the waking vector) is in guest memory.
    pub facs: GuestAddress,
}

impl AcpiTables {
    /// Builds the tables for a machine with `vcpus` vCPUs (APIC IDs
    /// 0..vcpus, the IOAPIC taking ID `vcpus`); with `pm_timer`, the FADT
    /// names a 32-bit ACPI PM timer at that port.
    pub fn build(vcpus: u32, pm_timer: Option<u16>) -> Result<Self, AcpiError> {
        Self::build_with(vcpus, pm_timer, false)
    }

    /// Like [`build`](Self::build), and the DSDT names `\_S3` (sleep type
    /// [`SLP_TYP_S3`]): for a machine that implements suspend to RAM.
    pub fn with_s3(vcpus: u32, pm_timer: Option<u16>) -> Result<Self, AcpiError> {
        Self::build_with(vcpus, pm_timer, true)
    }

    fn build_with(vcpus: u32, pm_timer: Option<u16>, s3: bool) -> Result<Self, AcpiError> {
        let count = u8::try_from(vcpus).ok().filter(|&n| n > 0 && n < u8::MAX);
        let count = count.ok_or(AcpiError::TooManyVcpus { vcpus })?;
        let mut image = Image::default();
        image.place(&vec![0; Rsdp::len()], 16); // the RSDP, written last
        let dsdt = image.place(&to_bytes(&dsdt(s3)), 16);
        let facs = image.place(&to_bytes(&FACS::new()), 64);
        let madt = image.place(madt(count).as_slice(), 16);
        let fadt = image.place(&to_bytes(&fadt(dsdt, facs, pm_timer)), 16);
        let mut xsdt = XSDT::new(OEM_ID, *b"NKVMXSDT", OEM_REVISION);
        xsdt.add_entry(fadt);
        xsdt.add_entry(madt);
        let xsdt = image.place(&to_bytes(&xsdt), 16);
        let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt));
        image.bytes[..rsdp.len()].copy_from_slice(&rsdp);
        if ACPI_START + image.bytes.len() as u64 > ACPI_END {
            return Err(AcpiError::TooBig { size: image.bytes.len() });
        }
        Ok(Self { image: image.bytes, facs: GuestAddress(facs) })
    }

    /// Where the RSDP is in guest memory.
    pub fn rsdp(&self) -> GuestAddress {
        GuestAddress(ACPI_START)
    }
}

/// The PM1a event block: status (2 bytes at 0x600; write 1 to clear, and
/// no event ever sets a bit) and enable (2 bytes at 0x602; holds what the
/// guest writes, so ACPICA sees e.g. its global-lock enable stick).
#[derive(Debug, Default)]
pub struct Pm1Event {
    enable: u16,
}

impl Pm1Event {
    fn bytes(&self) -> [u8; PM1A_EVT_LEN as usize] {
        let [lo, hi] = self.enable.to_le_bytes();
        [0, 0, lo, hi]
    }
}

impl IoDevice for Pm1Event {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let block = self.bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *byte = at.and_then(|a| block.get(a)).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut block = self.bytes();
        for (i, &byte) in data.iter().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            if let Some(slot) = at.filter(|&a| a >= 2).and_then(|a| block.get_mut(a)) {
                *slot = byte;
            }
        }
        self.enable = u16::from_le_bytes([block[2], block[3]]);
    }
}

/// The enable register is the PM1a event block's only state.
impl nkvm_devices::Snapshot for Pm1Event {
    fn snapshot_name(&self) -> &'static str {
        "acpi-pm1-event"
    }

    fn snapshot_version(&self) -> u16 {
        1
    }

    fn save_body(&self, out: &mut nkvm_devices::snapshot::StateWriter) {
        out.u16(self.enable);
    }

    fn load_body(
        &mut self,
        input: &mut nkvm_devices::snapshot::StateReader<'_>,
    ) -> Result<(), nkvm_devices::SnapshotError> {
        self.enable = input.u16("PM1 enable")?;
        Ok(())
    }
}

/// What a guest write to one of the fixed ports asks of the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlatformRequest {
    /// Soft-off: `SLP_EN` with `SLP_TYP` = [`SLP_TYP_S5`] in PM1a control.
    PowerOff,
    /// Suspend to RAM: `SLP_EN` with `SLP_TYP` = [`SLP_TYP_S3`].
    Sleep,
    /// Reset: RST_CPU in the reset register, or the 8042's command 0xfe.
    Reset,
}

/// The reset register's RST_CPU bit: setting it resets (bit 1 only chooses
/// a hard or soft reset), so both 0x06 and Linux's 0x0e count.
const RESET_RST_CPU: u64 = 1 << 2;

/// What the guest's `out` of `data` (`size` bytes) to `port` asks of the
/// machine, if the port is one of the fixed ones and the value an action.
pub fn port_write(port: u16, size: u8, data: u64) -> Option<PlatformRequest> {
    let pm1a_cnt = builtin::PM1A_CNT;
    let control = match (port, size) {
        (p, 2 | 4) if p == pm1a_cnt => Some(data as u16),
        (p, 1) if p == pm1a_cnt + 1 => Some((data as u16) << 8),
        _ => None,
    };
    if let Some(value) = control {
        if value & PM1_SLP_EN == 0 {
            return None;
        }
        return match ((value >> PM1_SLP_TYP_SHIFT) & 7) as u8 {
            SLP_TYP_S5 => Some(PlatformRequest::PowerOff),
            SLP_TYP_S3 => Some(PlatformRequest::Sleep),
            _ => None,
        };
    }
    match (port, size) {
        (RESET_PORT, 1) if data & RESET_RST_CPU != 0 => Some(PlatformRequest::Reset),
        (p, 1) if u64::from(p) == I8042_COMMAND_PORT && data as u8 == I8042_CMD_RESET => Some(PlatformRequest::Reset),
        _ => None,
    }
}

/// What the guest's `in` of `size` bytes from `port` reads, if the port is
/// one of those [`port_write`] serves: PM1a control shows `SCI_EN` (always
/// in ACPI mode), the 8042's status reads 0 (nothing to read, ready for a
/// command), the reset register 0.
pub fn port_read(port: u16, size: u8) -> Option<u64> {
    let pm1a_cnt = builtin::PM1A_CNT;
    let value = match port {
        p if p == pm1a_cnt => u64::from(PM1_SCI_EN),
        p if p == pm1a_cnt + 1 => 0,
        RESET_PORT => 0,
        p if u64::from(p) == I8042_COMMAND_PORT => 0,
        _ => return None,
    };
    let bits = u32::from(size.min(8)) * 8;
    Some(if bits >= 64 { value } else { value & ((1 << bits) - 1) })
}

/// Builds the tables for `vcpus` vCPUs (and the PM timer at `pm_timer`),
/// writes them to `vm`'s RAM at [`ACPI_START`] and returns the RSDP's
/// address.
pub fn install(vm: &Vm, vcpus: u32, pm_timer: Option<u16>) -> Result<GuestAddress, AcpiError> {
    let tables = AcpiTables::build(vcpus, pm_timer)?;
    install_tables(vm, &tables)?;
    Ok(tables.rsdp())
}

/// Writes `tables` to `vm`'s RAM at [`ACPI_START`].
pub fn install_tables(vm: &Vm, tables: &AcpiTables) -> Result<(), AcpiError> {
    vm.write_memory(GuestAddress(ACPI_START), &tables.image).map_err(AcpiError::Memory)
}

/// The tables laid out one after another from [`ACPI_START`].
#[derive(Default)]
struct Image {
    bytes: Vec<u8>,
}

impl Image {
    /// Appends `table` at the next `align`-byte boundary; returns its guest
    /// address.
    fn place(&mut self, table: &[u8], align: usize) -> u64 {
        let at = self.bytes.len().next_multiple_of(align);
        self.bytes.resize(at, 0);
        self.bytes.extend_from_slice(table);
        ACPI_START + at as u64
    }
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// MADT (revision 5): local APICs 0..count, the IOAPIC (ID `count`, GSI
/// base 0), IRQ0 on GSI 2, the SCI level-triggered, LINT1 as NMI everywhere.
fn madt(count: u8) -> Sdt {
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, *b"NKVMAPIC", OEM_REVISION);
    madt.write_u32(36, LAPIC_ADDR);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    for id in 0..count {
        madt.append_slice(&to_bytes(&ProcessorLocalApic::new(id, id, EnabledStatus::Enabled)));
    }
    madt.append_slice(&to_bytes(&IoApic::new(count, IOAPIC_ADDR as u32, 0)));
    madt.append_slice(&interrupt_override(0, 2, INTI_ACTIVE_HIGH | INTI_EDGE));
    madt.append_slice(&interrupt_override(SCI_IRQ, u32::from(SCI_IRQ), INTI_ACTIVE_HIGH | INTI_LEVEL));
    let [f0, f1] = (INTI_ACTIVE_HIGH | INTI_EDGE).to_le_bytes();
    madt.append_slice(&[MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS, f0, f1, 1]);
    madt
}

/// An MADT interrupt source override of ISA `irq` (bus 0) to `gsi`.
fn interrupt_override(irq: u8, gsi: u32, flags: u16) -> Vec<u8> {
    let mut entry = vec![MADT_INTERRUPT_OVERRIDE, 10, 0, irq];
    entry.extend_from_slice(&gsi.to_le_bytes());
    entry.extend_from_slice(&flags.to_le_bytes());
    entry
}

/// FADT (revision 6.5, not hardware-reduced): SCI 9, PM1a event and
/// control blocks, the PM timer if there is one (32 bits wide), no GPEs,
/// reset through 0xcf9, an 8042.
fn fadt(dsdt: u64, facs: u64, pm_timer: Option<u16>) -> acpi_tables::fadt::FADT {
    let mut fadt = FADTBuilder::new(OEM_ID, *b"NKVMFACP", OEM_REVISION)
        .dsdt_64(dsdt)
        .firmware_ctrl_32(facs as u32)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        // No fixed-feature power or sleep button.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    fadt.sci_int = u16::from(SCI_IRQ).into();
    fadt.pm1a_evt_blk = u32::from(PM1A_EVT).into();
    fadt.pm1_evt_len = PM1A_EVT_LEN;
    fadt.pm1a_cnt_blk = u32::from(builtin::PM1A_CNT).into();
    fadt.pm1_cnt_len = 2;
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH_8042.into();
    fadt.reset_reg = GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, u64::from(RESET_PORT));
    fadt.reset_value = RESET_VALUE;
    if let Some(port) = pm_timer {
        fadt = fadt.flag(Flags::TmrValExt);
        fadt.pm_tmr_blk = u32::from(port).into();
        fadt.pm_tmr_len = PM_TIMER_LEN;
    }
    fadt.finalize()
}

/// DSDT: `\_S5` (and `\_S3` with `s3`), the PCI host bridge `\_SB.PCI0`
/// and COM1.
fn dsdt(s3: bool) -> Sdt {
    let mut body = Vec::new();
    if s3 {
        aml::Name::new("_S3_".into(), &aml::Package::new(vec![&SLP_TYP_S3, &SLP_TYP_S3, &aml::ZERO, &aml::ZERO]))
            .to_aml_bytes(&mut body);
    }
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&SLP_TYP_S5, &SLP_TYP_S5, &aml::ZERO, &aml::ZERO]))
        .to_aml_bytes(&mut body);
    let pci_mmio = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO_START as u32,
        (PCI_MMIO_END - 1) as u32,
        None,
    );
    aml::Device::new(
        "_SB_.PCI0".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A03")),
            &aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_SEG".into(), &aml::ZERO),
            &aml::Name::new("_BBN".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::AddressSpace::new_bus_number(0u16, 0u16),
                    &aml::IO::new(0xcf8, 0xcf8, 1, 8),
                    &aml::AddressSpace::new_io(0u16, 0xcf7u16, None),
                    &aml::AddressSpace::new_io(0xd00u16, 0xffffu16, None),
                    &pci_mmio,
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);
    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(builtin::COM1, builtin::COM1, 0, 8),
                    &aml::Interrupt::new(true, true, false, false, u32::from(COM1_IRQ)),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"NKVMDSDT", OEM_REVISION);
    dsdt.append_slice(&body);
    dsdt
}

#[cfg(test)]
mod tests;
