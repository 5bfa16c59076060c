//! The decoders against hostile input: every truncation, flipped bytes
//! (with and without a recomputed checksum), foreign headers.

use proptest::prelude::*;

use super::codec::{crc32, HEADER_LEN};
use super::vcpu::tests::sample;
use super::*;

/// Recomputes the CRC trailer, so that corruption reaches the sections.
fn reseal(blob: &mut [u8]) {
    let at = blob.len() - 4;
    let crc = crc32(&blob[..at]);
    blob[at..].copy_from_slice(&crc.to_le_bytes());
}

fn vm_sample() -> VmState {
    VmState {
        vcpus: 2,
        memory: 16 << 20,
        split_irqchip: true,
        clock: kvm_bindings::kvm_clock_data { clock: 5, ..Default::default() },
    }
}

#[test]
fn every_truncation_of_a_valid_blob_is_refused() {
    let blob = sample().encode();
    for len in 0..blob.len() {
        let err = VcpuState::decode(&blob[..len]).expect_err("a truncated blob decoded");
        assert!(
            matches!(err, FormatError::Truncated { .. } | FormatError::LengthMismatch { .. }),
            "length {len}: {err}"
        );
    }
    let blob = vm_sample().encode();
    for len in 0..blob.len() {
        assert!(VmState::decode(&blob[..len]).is_err(), "length {len}");
    }
}

#[test]
fn truncated_sections_behind_a_fixed_header_name_the_section() {
    // Cut the blob inside the `regs` section but fix up the header and the
    // checksum, as a buggy writer would: the error names the section.
    let blob = sample().encode();
    let regs_at = find_section(&blob, 3);
    let mut cut = blob[..regs_at + 8 + 10].to_vec();
    let body = (cut.len() + 4 - HEADER_LEN - 4) as u32;
    cut[8..12].copy_from_slice(&body.to_le_bytes());
    cut.extend_from_slice(&[0; 4]);
    reseal(&mut cut);
    let err = VcpuState::decode(&cut).unwrap_err();
    assert!(matches!(err, FormatError::Truncated { section: "regs", .. }), "{err}");
    assert!(err.to_string().contains("regs"), "{err}");
}

/// Offset of the section header with `tag`.
fn find_section(blob: &[u8], tag: u16) -> usize {
    let mut at = HEADER_LEN;
    loop {
        let t = u16::from_le_bytes([blob[at], blob[at + 1]]);
        if t == tag {
            return at;
        }
        at += 8 + u32::from_le_bytes(blob[at + 4..at + 8].try_into().unwrap()) as usize;
    }
}

#[test]
fn header_errors_name_what_is_wrong() {
    let good = sample().encode();
    let mut b = good.clone();
    b[0] = b'X';
    assert_eq!(VcpuState::decode(&b).unwrap_err(), FormatError::BadMagic { found: *b"XKVS" });
    let mut b = good.clone();
    b[4] = 2;
    assert_eq!(VcpuState::decode(&b).unwrap_err(), FormatError::UnsupportedVersion { found: 2, supported: 1 });
    let mut b = good.clone();
    b[100] ^= 1;
    assert!(matches!(VcpuState::decode(&b).unwrap_err(), FormatError::Checksum { .. }));
    let mut b = good.clone();
    b.push(0);
    assert!(matches!(VcpuState::decode(&b).unwrap_err(), FormatError::LengthMismatch { .. }));
    assert!(matches!(VmState::decode(&good).unwrap_err(), FormatError::WrongKind { found: 1, .. }));
}

#[test]
fn unknown_repeated_and_missing_sections_are_refused() {
    let good = sample().encode();
    let at = find_section(&good, 5);
    let mut b = good.clone();
    b[at] = 99;
    reseal(&mut b);
    assert_eq!(VcpuState::decode(&b).unwrap_err(), FormatError::UnknownSection { tag: 99, offset: at });
    let mut b = good.clone();
    b[at] = 4; // the fpu section relabelled as a second sregs
    reseal(&mut b);
    let err = VcpuState::decode(&b).unwrap_err();
    assert_eq!(err, FormatError::SectionOrder { section: "sregs", tag: 4, offset: at });
    // Drop the last section (debug_regs): missing.
    let last = find_section(&good, 13);
    let mut b = good[..last].to_vec();
    b.extend_from_slice(&[0; 4]);
    let body = (b.len() - HEADER_LEN - 4) as u32;
    b[8..12].copy_from_slice(&body.to_le_bytes());
    reseal(&mut b);
    assert_eq!(VcpuState::decode(&b).unwrap_err(), FormatError::MissingSection { section: "debug_regs", tag: 13 });
}

#[test]
fn a_list_count_that_disagrees_with_the_section_length_is_refused() {
    let mut b = sample().encode();
    let at = find_section(&b, 8) + 8; // msrs payload: count first
    b[at] = 3; // two entries present
    reseal(&mut b);
    let err = VcpuState::decode(&b).unwrap_err();
    assert!(matches!(err, FormatError::SectionLength { section: "msrs", .. }), "{err}");
    let mut b = sample().encode();
    let at = find_section(&b, 7) + 8; // xcrs: at most 16
    b[at..at + 4].copy_from_slice(&1000u32.to_le_bytes());
    reseal(&mut b);
    let err = VcpuState::decode(&b).unwrap_err();
    assert!(matches!(err, FormatError::InvalidValue { section: "xcrs", field: "count", .. }), "{err}");
}

#[test]
fn a_bad_pending_lint_section_is_named() {
    let mut state = sample();
    state.pending_lint = crate::state::PendingLint { extint: vec![0x30], nmi: false };
    let mut blob = state.encode();
    let at = find_section(&blob, 14);
    blob[at + 8] = 2;
    reseal(&mut blob);
    let err = VcpuState::decode(&blob).unwrap_err().to_string();
    assert!(err.contains("nmi"), "{err}");
    let mut blob = state.encode();
    blob[at + 9..at + 13].copy_from_slice(&5u32.to_le_bytes());
    reseal(&mut blob);
    assert!(VcpuState::decode(&blob).is_err(), "a count past the section's end");
}

#[test]
fn sections_have_the_documented_sizes() {
    // docs/state-format.md, the vCPU sections' payload lengths.
    let state = sample();
    let blob = state.encode();
    let sizes: [(u16, usize); 14] = [
        (1, 4),
        (2, 4 + 28 * state.cpuid.len()),
        (3, 144),
        (4, 8 * 24 + 2 * 10 + 7 * 8 + 4 * 8),
        (5, 411),
        (6, 4096),
        (7, 4 + 12 * state.xcrs.len()),
        (8, 4 + 12 * state.msrs.len()),
        (9, 4 + 4 * state.unreadable_msrs.len()),
        (10, 1024),
        (11, 37),
        (12, 4),
        (13, 56),
        (15, 4),
    ];
    let mut end = HEADER_LEN;
    for (tag, size) in sizes {
        let at = find_section(&blob, tag);
        assert_eq!(at, end, "section {tag} follows the previous one");
        let len = u32::from_le_bytes(blob[at + 4..at + 8].try_into().unwrap()) as usize;
        assert_eq!(len, size, "section {tag}");
        end = at + 8 + len;
    }
    assert_eq!(end + 4, blob.len());
    assert_eq!(vm_sample().encode().len(), HEADER_LEN + (8 + 13) + (8 + 28) + 4);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_changed_byte_is_refused(at in any::<prop::sample::Index>(), x in 1u8..) {
        // CRC-32 catches every error burst of up to 32 bits.
        let mut b = sample().encode();
        let i = at.index(b.len());
        b[i] ^= x;
        prop_assert!(VcpuState::decode(&b).is_err());
    }

    #[test]
    fn flipped_bytes_behind_a_valid_checksum_never_panic(
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        vm in any::<bool>(),
    ) {
        let mut b = if vm { vm_sample().encode() } else { sample().encode() };
        let len = b.len() - 4;
        for (at, x) in flips {
            b[at % len] ^= x;
        }
        reseal(&mut b);
        // Any outcome but a panic; a value that decodes re-encodes to the same bytes.
        if vm {
            if let Ok(s) = VmState::decode(&b) {
                prop_assert_eq!(s.encode(), b);
            }
        } else if let Ok(s) = VcpuState::decode(&b) {
            prop_assert_eq!(s.encode(), b);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = VcpuState::decode(&b);
        let _ = VmState::decode(&b);
    }
}
