//! Field-by-field encodings of KVM's register structs, in the order of
//! `docs/state-format.md`. Padding and reserved fields are not written and
//! are zero when decoded.

use kvm_bindings::{kvm_debugregs, kvm_dtable, kvm_segment, kvm_vcpu_events};

use super::codec::{FormatError, Out, Reader};
use crate::vcpu::{Fpu, Regs, Sregs};

pub(crate) fn put_regs(o: &mut Out<'_>, r: &Regs) {
    for v in [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15,
        r.rip, r.rflags,
    ] {
        o.u64(v);
    }
}

pub(crate) fn get_regs(r: &mut Reader<'_>) -> Result<Regs, FormatError> {
    let mut v = [0u64; 18];
    for x in &mut v {
        *x = r.u64()?;
    }
    let [rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rip, rflags] = v;
    Ok(Regs { rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rip, rflags })
}

fn put_segment(o: &mut Out<'_>, s: &kvm_segment) {
    o.u64(s.base);
    o.u32(s.limit);
    o.u16(s.selector);
    for b in [s.type_, s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl, s.unusable, 0] {
        o.u8(b);
    }
}

fn get_segment(r: &mut Reader<'_>) -> Result<kvm_segment, FormatError> {
    let base = r.u64()?;
    let limit = r.u32()?;
    let selector = r.u16()?;
    let mut b = [0u8; 9];
    for x in &mut b {
        *x = r.u8()?;
    }
    let at = r.offset();
    let padding = r.u8()?;
    if padding != 0 {
        return Err(r.invalid(at, "segment padding", u64::from(padding), "must be 0"));
    }
    let [type_, present, dpl, db, s, l, g, avl, unusable] = b;
    Ok(kvm_segment { base, limit, selector, type_, present, dpl, db, s, l, g, avl, unusable, padding: 0 })
}

fn put_dtable(o: &mut Out<'_>, t: &kvm_dtable) {
    o.u64(t.base);
    o.u16(t.limit);
}

fn get_dtable(r: &mut Reader<'_>) -> Result<kvm_dtable, FormatError> {
    Ok(kvm_dtable { base: r.u64()?, limit: r.u16()?, padding: [0; 3] })
}

pub(crate) fn put_sregs(o: &mut Out<'_>, s: &Sregs) {
    for seg in [&s.cs, &s.ds, &s.es, &s.fs, &s.gs, &s.ss, &s.tr, &s.ldt] {
        put_segment(o, seg);
    }
    put_dtable(o, &s.gdt);
    put_dtable(o, &s.idt);
    for v in [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base] {
        o.u64(v);
    }
    for v in s.interrupt_bitmap {
        o.u64(v);
    }
}

pub(crate) fn get_sregs(r: &mut Reader<'_>) -> Result<Sregs, FormatError> {
    let mut s = Sregs {
        cs: get_segment(r)?,
        ds: get_segment(r)?,
        es: get_segment(r)?,
        fs: get_segment(r)?,
        gs: get_segment(r)?,
        ss: get_segment(r)?,
        tr: get_segment(r)?,
        ldt: get_segment(r)?,
        gdt: get_dtable(r)?,
        idt: get_dtable(r)?,
        ..Default::default()
    };
    for v in [&mut s.cr0, &mut s.cr2, &mut s.cr3, &mut s.cr4, &mut s.cr8, &mut s.efer, &mut s.apic_base] {
        *v = r.u64()?;
    }
    for v in &mut s.interrupt_bitmap {
        *v = r.u64()?;
    }
    Ok(s)
}

pub(crate) fn put_fpu(o: &mut Out<'_>, f: &Fpu) {
    for reg in &f.fpr {
        o.bytes(reg);
    }
    o.u16(f.fcw);
    o.u16(f.fsw);
    o.u8(f.ftwx);
    o.u16(f.last_opcode);
    o.u64(f.last_ip);
    o.u64(f.last_dp);
    for reg in &f.xmm {
        o.bytes(reg);
    }
    o.u32(f.mxcsr);
}

pub(crate) fn get_fpu(r: &mut Reader<'_>) -> Result<Fpu, FormatError> {
    let mut f = Fpu::default();
    for reg in &mut f.fpr {
        reg.copy_from_slice(r.bytes(16)?);
    }
    f.fcw = r.u16()?;
    f.fsw = r.u16()?;
    f.ftwx = r.u8()?;
    f.last_opcode = r.u16()?;
    f.last_ip = r.u64()?;
    f.last_dp = r.u64()?;
    for reg in &mut f.xmm {
        reg.copy_from_slice(r.bytes(16)?);
    }
    f.mxcsr = r.u32()?;
    Ok(f)
}

pub(crate) fn put_events(o: &mut Out<'_>, e: &kvm_vcpu_events) {
    let x = &e.exception;
    for b in [x.injected, x.nr, x.has_error_code, x.pending] {
        o.u8(b);
    }
    o.u32(x.error_code);
    let i = &e.interrupt;
    for b in [i.injected, i.nr, i.soft, i.shadow, e.nmi.injected, e.nmi.pending, e.nmi.masked] {
        o.u8(b);
    }
    o.u32(e.sipi_vector);
    o.u32(e.flags);
    let s = &e.smi;
    for b in [s.smm, s.pending, s.smm_inside_nmi, s.latched_init, e.triple_fault.pending, e.exception_has_payload] {
        o.u8(b);
    }
    o.u64(e.exception_payload);
}

pub(crate) fn get_events(r: &mut Reader<'_>) -> Result<kvm_vcpu_events, FormatError> {
    let mut e = kvm_vcpu_events::default();
    let x = &mut e.exception;
    for b in [&mut x.injected, &mut x.nr, &mut x.has_error_code, &mut x.pending] {
        *b = r.u8()?;
    }
    x.error_code = r.u32()?;
    let i = &mut e.interrupt;
    let n = &mut e.nmi;
    for b in [&mut i.injected, &mut i.nr, &mut i.soft, &mut i.shadow, &mut n.injected, &mut n.pending, &mut n.masked] {
        *b = r.u8()?;
    }
    e.sipi_vector = r.u32()?;
    e.flags = r.u32()?;
    let s = &mut e.smi;
    for b in [
        &mut s.smm,
        &mut s.pending,
        &mut s.smm_inside_nmi,
        &mut s.latched_init,
        &mut e.triple_fault.pending,
        &mut e.exception_has_payload,
    ] {
        *b = r.u8()?;
    }
    e.exception_payload = r.u64()?;
    Ok(e)
}

pub(crate) fn put_debugregs(o: &mut Out<'_>, d: &kvm_debugregs) {
    for v in d.db.iter().chain([&d.dr6, &d.dr7, &d.flags]) {
        o.u64(*v);
    }
}

pub(crate) fn get_debugregs(r: &mut Reader<'_>) -> Result<kvm_debugregs, FormatError> {
    let mut d = kvm_debugregs::default();
    for v in d.db.iter_mut().chain([&mut d.dr6, &mut d.dr7, &mut d.flags]) {
        *v = r.u64()?;
    }
    Ok(d)
}
