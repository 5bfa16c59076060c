//! Unit tests of the ACPI tables and the fixed ports.

use super::*;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
}

/// The table at guest address `addr`, with its length from its header
/// (the FACS has the same length field at offset 4).
fn table(t: &AcpiTables, addr: u64) -> &[u8] {
    let at = usize::try_from(addr - ACPI_START).unwrap();
    let len = u32_at(&t.image, at + 4) as usize;
    &t.image[at..at + len]
}

fn xsdt_entries(t: &AcpiTables) -> Vec<u64> {
    let xsdt = table(t, u64_at(&t.image, 24));
    (36..xsdt.len()).step_by(8).map(|at| u64_at(xsdt, at)).collect()
}

fn find<'a>(t: &'a AcpiTables, signature: &[u8; 4]) -> &'a [u8] {
    let addr = xsdt_entries(t).into_iter().find(|&a| &table(t, a)[..4] == signature);
    table(t, addr.unwrap_or_else(|| panic!("no {} in the XSDT", String::from_utf8_lossy(signature))))
}

/// (type, bytes) of each MADT structure.
fn madt_entries(madt: &[u8]) -> Vec<(u8, &[u8])> {
    let mut entries = Vec::new();
    let mut at = 44;
    while at < madt.len() {
        let len = madt[at + 1] as usize;
        entries.push((madt[at], &madt[at..at + len]));
        at += len;
    }
    entries
}

#[test]
fn rsdp_v2_at_the_start_points_at_the_xsdt_and_both_checksums_hold() {
    let t = AcpiTables::build(2, None).unwrap();
    let rsdp = &t.image[..36];
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(rsdp[15], 2, "revision");
    assert_eq!(u32_at(rsdp, 20), 36, "length");
    assert_eq!(sum(&rsdp[..20]), 0);
    assert_eq!(sum(rsdp), 0);
    assert_eq!(t.rsdp(), GuestAddress(ACPI_START));
    assert_eq!(&table(&t, u64_at(rsdp, 24))[..4], b"XSDT");
}

#[test]
fn every_table_has_a_zero_checksum_and_fits_its_area() {
    for vcpus in [1, 2, 8, 254] {
        let t = AcpiTables::build(vcpus, None).unwrap();
        assert!(ACPI_START + t.image.len() as u64 <= ACPI_END);
        let xsdt = table(&t, u64_at(&t.image, 24));
        assert_eq!(sum(xsdt), 0, "XSDT");
        let fadt = find(&t, b"FACP");
        let dsdt = table(&t, u64_at(fadt, 140));
        for tab in [find(&t, b"APIC"), fadt, dsdt] {
            assert_eq!(sum(tab), 0, "{}", String::from_utf8_lossy(&tab[..4]));
        }
        assert_eq!(&dsdt[..4], b"DSDT");
    }
}

#[test]
fn xsdt_lists_the_fadt_and_the_madt() {
    let t = AcpiTables::build(2, None).unwrap();
    let signatures: Vec<_> = xsdt_entries(&t).into_iter().map(|a| table(&t, a)[..4].to_vec()).collect();
    assert_eq!(signatures, [b"FACP".to_vec(), b"APIC".to_vec()]);
}

#[test]
fn madt_has_one_enabled_local_apic_per_vcpu_then_the_ioapic_overrides_and_nmi() {
    for vcpus in [1u8, 2, 5] {
        let t = AcpiTables::build(u32::from(vcpus), None).unwrap();
        let madt = find(&t, b"APIC");
        assert_eq!(u32_at(madt, 36), 0xfee0_0000);
        assert_eq!(u32_at(madt, 40), 1, "PCAT_COMPAT");
        let entries = madt_entries(madt);
        let lapics: Vec<_> = entries.iter().filter(|(ty, _)| *ty == 0).collect();
        assert_eq!(lapics.len(), usize::from(vcpus));
        for (i, (_, e)) in lapics.iter().enumerate() {
            assert_eq!((e[2], e[3]), (i as u8, i as u8), "processor UID, APIC ID");
            assert_eq!(u32_at(e, 4), 1, "enabled");
        }
        let ioapics: Vec<_> = entries.iter().filter(|(ty, _)| *ty == 1).collect();
        assert_eq!(ioapics.len(), 1);
        let io = ioapics[0].1;
        assert_eq!((io[2], u32_at(io, 4), u32_at(io, 8)), (vcpus, 0xfec0_0000, 0));
        let overrides: Vec<_> =
            entries.iter().filter(|(ty, _)| *ty == 2).map(|(_, e)| (e[3], u32_at(e, 4), u16_at(e, 8))).collect();
        assert_eq!(overrides, [(0, 2, 0x5), (9, 9, 0xd)], "IRQ0 -> GSI2 edge; SCI level, active high");
        let nmis: Vec<_> = entries.iter().filter(|(ty, _)| *ty == 4).collect();
        assert_eq!(nmis.len(), 1);
        assert_eq!((nmis[0].1[2], nmis[0].1[5]), (0xff, 1), "all processors, LINT1");
    }
}

#[test]
fn fadt_holds_the_sci_pm1a_reset_and_dsdt_fields() {
    let t = AcpiTables::build(2, None).unwrap();
    let fadt = find(&t, b"FACP");
    assert_eq!((fadt[8], fadt[131]), (6, 5), "revision 6.5");
    assert_eq!(u16_at(fadt, 46), 9, "SCI_INT");
    assert_eq!(u32_at(fadt, 48), 0, "no SMI_CMD: always in ACPI mode");
    assert_eq!(u32_at(fadt, 56), 0x600, "PM1a_EVT_BLK");
    assert_eq!(u32_at(fadt, 64), 0x604, "PM1a_CNT_BLK");
    assert_eq!(u32_at(fadt, 76), 0, "no PM timer");
    assert_eq!((fadt[88], fadt[89]), (4, 2), "PM1_EVT_LEN, PM1_CNT_LEN");
    assert_eq!(u16_at(fadt, 109) & 2, 2, "IAPC_BOOT_ARCH: 8042");
    let flags = u32_at(fadt, 112);
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    assert_eq!(flags & (1 << 20), 0, "not HW_REDUCED");
    // RESET_REG: system I/O, 8 bits, byte access, port 0xcf9.
    assert_eq!(&fadt[116..120], &[1, 8, 0, 1]);
    assert_eq!(u64_at(fadt, 120), 0xcf9);
    assert_eq!(fadt[128], 0x06, "RESET_VALUE");
    // FIRMWARE_CTRL (32-bit: kvm-unit-tests read only that one), no X_FIRMWARE_CTRL.
    let facs = table(&t, u32_at(fadt, 36).into());
    assert_eq!(u64_at(fadt, 132), 0);
    assert_eq!(&facs[..4], b"FACS");
    assert_eq!(u32_at(fadt, 36) % 64, 0, "FACS alignment");
    assert_eq!(&table(&t, u64_at(fadt, 140))[..4], b"DSDT");
    assert_eq!(builtin::PM1_POWER_OFF, (u16::from(SLP_TYP_S5) << 10) | (1 << 13));
}

#[test]
fn fadt_names_a_32_bit_pm_timer_when_the_machine_has_one() {
    let t = AcpiTables::build(1, Some(PM_TIMER_PORT)).unwrap();
    let fadt = find(&t, b"FACP");
    assert_eq!(u32_at(fadt, 76), 0x608, "PM_TMR_BLK");
    assert_eq!(fadt[91], 4, "PM_TMR_LEN");
    assert_ne!(u32_at(fadt, 112) & (1 << 8), 0, "TMR_VAL_EXT");
    assert_eq!(sum(fadt), 0);
}

#[test]
fn dsdt_names_s5_the_pci_host_bridge_and_com1() {
    let t = AcpiTables::build(1, None).unwrap();
    let fadt = find(&t, b"FACP");
    let dsdt = table(&t, u64_at(fadt, 140));
    let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
    // Name(_S5_, Package(4) { 5, 5, 0, 0 })
    assert!(has(&[0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, 0x05, 0x0a, 0x05, 0x00, 0x00]));
    assert!(has(b"PCI0") && has(b"COM1"));
    // EISA IDs: PNP0A03 and PNP0501 as compressed dwords.
    assert!(has(&[0x0c, 0x41, 0xd0, 0x0a, 0x03]));
    assert!(has(&[0x0c, 0x41, 0xd0, 0x05, 0x01]));
    // The 32-bit memory window: min, max.
    let mut window = 0xc000_0000u32.to_le_bytes().to_vec();
    window.extend_from_slice(&0xfebf_ffffu32.to_le_bytes());
    assert!(has(&window));
    // PCI config ports: IO(Decode16, 0xcf8, 0xcf8, 1, 8).
    assert!(has(&[0x47, 0x01, 0xf8, 0x0c, 0xf8, 0x0c, 0x01, 0x08]));
}

#[test]
fn s5_through_pm1a_control_powers_off_with_or_without_sci_en() {
    // Linux reads SCI_EN back and keeps it in what it writes.
    assert_eq!(port_read(0x604, 2), Some(1));
    for value in [0x3400u64, 0x3401] {
        assert_eq!(port_write(0x604, 2, value), Some(PlatformRequest::PowerOff), "{value:#x}");
    }
    assert_eq!(port_write(0x605, 1, 0x34), Some(PlatformRequest::PowerOff));
    assert_eq!(port_write(0x604, 2, 0x1401), None, "SLP_TYP without SLP_EN");
    assert_eq!(port_write(0x604, 2, 0x2c01), None, "sleep type 3 is no state of this machine");
    assert_eq!(port_write(0x604, 2, 0x0401), None, "S3's type without SLP_EN");
    assert_eq!(port_write(0x600, 2, 0x8000), None, "clearing WAK_STS");
}

#[test]
fn reset_register_and_8042_pulse_reset() {
    for value in [0x06, 0x0e] {
        assert_eq!(port_write(0xcf9, 1, value), Some(PlatformRequest::Reset));
    }
    assert_eq!(port_write(0xcf9, 1, 0x02), None, "SYS_RST alone only selects the kind");
    assert_eq!(port_write(0x64, 1, 0xfe), Some(PlatformRequest::Reset));
    assert_eq!(port_write(0x64, 1, 0xaa), None);
    assert_eq!(port_write(0x3f8, 1, 0xfe), None);
    assert_eq!(port_read(0x64, 1), Some(0), "8042 input buffer empty");
    assert_eq!(port_read(0xcf9, 1), Some(0));
}

#[test]
fn pm1a_event_status_reads_zero_and_enable_holds_what_is_written() {
    let mut evt = Pm1Event::default();
    let mut dword = [0xaa; 4];
    evt.read(0, &mut dword);
    assert_eq!(dword, [0; 4]);
    evt.write(2, &0x0020u16.to_le_bytes()); // GBL_EN
    evt.write(0, &0xffffu16.to_le_bytes()); // clearing status: no effect
    let mut word = [0; 2];
    evt.read(2, &mut word);
    assert_eq!(u16::from_le_bytes(word), 0x0020);
    evt.read(0, &mut dword);
    assert_eq!(u32::from_le_bytes(dword), 0x0020_0000);
    evt.write(3, &[0x01]);
    evt.read(2, &mut word);
    assert_eq!(u16::from_le_bytes(word), 0x0120);
    evt.write(u64::MAX, &[1, 2]); // out of range: ignored
    evt.read(u64::MAX, &mut word);
    assert_eq!(word, [0, 0]);
}

#[test]
fn other_ports_are_not_ours() {
    assert_eq!(port_read(0x605, 1), Some(0));
    assert_eq!(port_read(0x600, 2), None, "the PM1a event block is a device");
    assert_eq!(port_read(0x3f8, 1), None);
    assert_eq!(port_read(0x606, 2), None);
}

#[test]
fn vcpu_counts_the_madt_cannot_express_are_refused() {
    for vcpus in [0, 255, 1000] {
        assert!(matches!(AcpiTables::build(vcpus, None), Err(AcpiError::TooManyVcpus { .. })), "{vcpus}");
    }
}

#[test]
fn s3_through_pm1a_control_is_a_sleep_request() {
    // What kvm-unit-tests' s3.c writes, and the same with SCI_EN kept.
    for value in [0x2400u64, 0x2401] {
        assert_eq!(port_write(0x604, 2, value), Some(PlatformRequest::Sleep), "{value:#x}");
    }
    assert_eq!(port_write(0x605, 1, 0x24), Some(PlatformRequest::Sleep));
}

#[test]
fn only_a_machine_with_s3_names_it_and_the_facs_has_the_waking_vector() {
    // Name(_S3_, Package(4) { One, One, Zero, Zero })
    let name_s3 = [0x08, b'_', b'S', b'3', b'_', 0x12, 0x06, 0x04, 0x01, 0x01, 0x00, 0x00];
    for (tables, named) in [(AcpiTables::with_s3(1, None).unwrap(), true), (AcpiTables::build(1, None).unwrap(), false)]
    {
        let fadt = find(&tables, b"FACP");
        let dsdt = table(&tables, u64_at(fadt, 140));
        assert_eq!(dsdt.windows(name_s3.len()).any(|w| w == name_s3), named);
        assert_eq!(u64::from(u32_at(fadt, 36)), tables.facs.0, "the FADT's FIRMWARE_CTRL");
        let facs = table(&tables, tables.facs.0);
        assert_eq!(&facs[..4], b"FACS");
        assert_eq!(u32_at(facs, FACS_WAKING_VECTOR as usize), 0);
        assert_eq!(u64_at(facs, FACS_X_WAKING_VECTOR as usize), 0);
    }
}

#[test]
fn the_pm1_event_enable_register_round_trips_and_a_damaged_blob_is_refused() {
    use nkvm_devices::Snapshot;
    let mut evt = Pm1Event::default();
    evt.write(2, &0x0120u16.to_le_bytes());
    let blob = evt.snapshot();
    let mut back = Pm1Event::default();
    back.restore(&blob).unwrap();
    let mut read = [0u8; 4];
    back.read(0, &mut read);
    assert_eq!(read, [0, 0, 0x20, 0x01]);
    for cut in 0..blob.len() {
        assert!(Pm1Event::default().restore(&blob[..cut]).is_err(), "cut at {cut}");
    }
    let mut flipped = blob.clone();
    let body = flipped.len() - 5;
    flipped[body] ^= 1;
    let err = back.restore(&flipped).unwrap_err().to_string();
    assert!(err.contains("checksum") || err.contains("CRC"), "{err}");
}
