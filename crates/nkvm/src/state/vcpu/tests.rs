use super::*;

/// A state with a distinct value in every field.
pub(crate) fn sample() -> VcpuState {
    let mut n = 0u64;
    let mut next = || {
        n += 0x0101_0101_0101_0101;
        n
    };
    let regs = Regs { rax: next(), rip: next(), rflags: 2, ..Default::default() };
    let mut sregs = Sregs::default();
    sregs.cs.base = next();
    sregs.cs.selector = 8;
    sregs.cs.l = 1;
    sregs.ldt.unusable = 1;
    sregs.idt.limit = 0xfff;
    sregs.cr3 = next();
    sregs.interrupt_bitmap[3] = next();
    let mut fpu = Fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    fpu.xmm[15][15] = 0xaa;
    let mut events = VcpuEvents::default();
    events.exception.nr = 14;
    events.exception.error_code = 0xdead;
    events.nmi.masked = 1;
    events.flags = 0x1d;
    events.exception_payload = next();
    let mut debug_regs = kvm_debugregs::default();
    debug_regs.db[2] = next();
    debug_regs.dr7 = 0x400;
    let mut xsave = Box::new([0u32; XSAVE_WORDS]);
    xsave.iter_mut().enumerate().for_each(|(i, w)| *w = i as u32 * 7);
    let mut lapic = Box::new([0u8; LAPIC_BYTES]);
    lapic.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
    VcpuState {
        id: 1,
        cpuid: vec![kvm_cpuid_entry2 { function: 0x4000_0001, eax: 0x7ff, ..Default::default() }],
        regs,
        sregs,
        fpu,
        xsave,
        xcrs: vec![(0, 7)],
        msrs: vec![(0x10, next()), (0x4b56_4d01, next())],
        unreadable_msrs: vec![0x3a],
        lapic,
        events,
        mp_state: 3,
        debug_regs,
        pending_lint: PendingLint::default(),
        tsc_khz: Some(2_445_000),
    }
}

#[test]
fn every_field_round_trips() {
    let state = sample();
    assert_eq!(VcpuState::decode(&state.encode()).unwrap(), state);
}

#[test]
fn pending_lints_travel_in_a_section_written_only_when_needed() {
    let plain = sample();
    let mut with = sample();
    with.pending_lint = PendingLint { extint: vec![0x30, 0x31], nmi: true };
    let blob = with.encode();
    // Section header (8), nmi (1), count (4), the vectors.
    assert_eq!(blob.len(), plain.encode().len() + 8 + 1 + 4 + 2);
    assert_eq!(VcpuState::decode(&blob).unwrap(), with);
    assert_eq!(VcpuState::decode(&plain.encode()).unwrap().pending_lint, PendingLint::default());
}

/// An 8259 acknowledged each waiting vector once: a blob that queues
/// one twice would deliver it twice, and is refused.
#[test]
fn a_vector_queued_twice_is_refused_by_offset() {
    let mut twice = sample();
    twice.pending_lint = PendingLint { extint: vec![0x30, 0x31, 0x30], nmi: false };
    let err = VcpuState::decode(&twice.encode()).unwrap_err().to_string();
    assert!(err.contains("vector") && err.contains("each vector at most once"), "{err}");
}
