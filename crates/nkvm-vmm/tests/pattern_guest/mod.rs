//! A guest for the snapshot and migration tests, and how to read what it
//! leaves (`nkvm_process` runs `nkvm` around it).
//!
//! Each of two vCPUs owns half of the RAM above 2 MiB and sweeps it in
//! passes: pass G writes `G << 32 | id << 24 | page` into the first qword
//! of each of its pages, after checking that the page still holds what
//! pass G-1 wrote (0 before pass 1). A wrong value counts as an error. Its
//! progress is one qword, `G << 32 | pages done`, at `STATUS + 0x40 * id`,
//! stored after each page. After each of its passes vCPU 0 prints
//! `pass G0 G1 err E` (hex) on the 16550: G0 grows by exactly one per line,
//! so a lost or repeated console line shows, and E counts lost writes.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use iced_x86::code_asm::*;

use crate::nkvm_process::Vmm;

/// Guest RAM.
pub const MEMORY: u64 = 16 << 20;
/// First page swept.
pub const DATA: u64 = 2 << 20;
/// Pages each vCPU sweeps.
pub const HALF: u64 = (MEMORY - DATA) / 4096 / 2;
/// vCPU n's progress word is at `STATUS + 0x40 * n`; its error count 16
/// bytes further.
pub const STATUS: u64 = 0x9000;
const ENTRY: u64 = 0x10_0000;
const COM1: u16 = 0x3f8;

/// The guest, assembled for `nkvm run --image`.
pub fn assemble() -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut outer = a.create_label();
    let mut inner = a.create_label();
    let mut have_old = a.create_label();
    let mut same = a.create_label();
    let mut putc = a.create_label();
    let mut puthex = a.create_label();
    let mut puts = a.create_label();
    let mut msg_pass = a.create_label();
    let mut msg_err = a.create_label();
    let mut msg_nl = a.create_label();
    // rbx = status, r12 = first page, r13 = id << 24.
    a.mov(rbx, rdi).unwrap();
    a.shl(rbx, 6).unwrap();
    a.add(rbx, STATUS as i32).unwrap();
    a.mov(rax, rdi).unwrap();
    a.imul_3(rax, rax, (HALF * 4096) as i32).unwrap();
    a.mov(r12, DATA).unwrap();
    a.add(r12, rax).unwrap();
    a.mov(r13, rdi).unwrap();
    a.shl(r13, 24).unwrap();
    a.set_label(&mut outer).unwrap();
    // r14 = the last complete pass, r15 = this one.
    a.mov(r14, qword_ptr(rbx)).unwrap();
    a.shr(r14, 32).unwrap();
    a.lea(r15, ptr(r14 + 1)).unwrap();
    a.mov(rax, r15).unwrap();
    a.shl(rax, 32).unwrap();
    a.mov(qword_ptr(rbx), rax).unwrap();
    a.xor(ecx, ecx).unwrap();
    a.set_label(&mut inner).unwrap();
    a.mov(rsi, rcx).unwrap();
    a.shl(rsi, 12).unwrap();
    a.add(rsi, r12).unwrap();
    // What the last pass wrote here (0 before the first).
    a.xor(eax, eax).unwrap();
    a.test(r14, r14).unwrap();
    a.jz(have_old).unwrap();
    a.mov(rax, r14).unwrap();
    a.shl(rax, 32).unwrap();
    a.or(rax, r13).unwrap();
    a.or(rax, rcx).unwrap();
    a.set_label(&mut have_old).unwrap();
    a.cmp(qword_ptr(rsi), rax).unwrap();
    a.je(same).unwrap();
    a.inc(qword_ptr(rbx + 16)).unwrap();
    a.mov(qword_ptr(rbx + 24), rcx).unwrap();
    a.set_label(&mut same).unwrap();
    a.mov(rax, r15).unwrap();
    a.shl(rax, 32).unwrap();
    a.or(rax, r13).unwrap();
    a.or(rax, rcx).unwrap();
    a.mov(qword_ptr(rsi), rax).unwrap();
    a.inc(rcx).unwrap();
    a.mov(rax, r15).unwrap();
    a.shl(rax, 32).unwrap();
    a.or(rax, rcx).unwrap();
    a.mov(qword_ptr(rbx), rax).unwrap();
    a.cmp(rcx, HALF as i32).unwrap();
    a.jb(inner).unwrap();
    // vCPU 0 reports after each pass.
    a.test(rdi, rdi).unwrap();
    a.jnz(outer).unwrap();
    a.lea(rsi, ptr(msg_pass)).unwrap();
    a.call(puts).unwrap();
    a.mov(rax, qword_ptr(STATUS)).unwrap();
    a.shr(rax, 32).unwrap();
    a.call(puthex).unwrap();
    a.mov(al, b' ' as u32).unwrap();
    a.call(putc).unwrap();
    a.mov(rax, qword_ptr(STATUS + 0x40)).unwrap();
    a.shr(rax, 32).unwrap();
    a.call(puthex).unwrap();
    a.lea(rsi, ptr(msg_err)).unwrap();
    a.call(puts).unwrap();
    a.mov(rax, qword_ptr(STATUS + 16)).unwrap();
    a.add(rax, qword_ptr(STATUS + 0x40 + 16)).unwrap();
    a.call(puthex).unwrap();
    a.lea(rsi, ptr(msg_nl)).unwrap();
    a.call(puts).unwrap();
    a.jmp(outer).unwrap();

    // putc: al. Waits for THR empty, then writes.
    a.set_label(&mut putc).unwrap();
    a.mov(r8b, al).unwrap();
    a.mov(dx, (COM1 + 5) as u32).unwrap();
    let mut poll = a.create_label();
    a.set_label(&mut poll).unwrap();
    a.in_(al, dx).unwrap();
    a.test(al, 0x20).unwrap();
    a.jz(poll).unwrap();
    a.mov(dx, COM1 as u32).unwrap();
    a.mov(al, r8b).unwrap();
    a.out(dx, al).unwrap();
    a.ret().unwrap();

    // puthex: eax as 8 hex digits.
    a.set_label(&mut puthex).unwrap();
    a.mov(r9d, eax).unwrap();
    a.mov(r10d, 8u32).unwrap();
    let mut digit = a.create_label();
    let mut decimal = a.create_label();
    a.set_label(&mut digit).unwrap();
    a.rol(r9d, 4).unwrap();
    a.mov(eax, r9d).unwrap();
    a.and(eax, 0xf).unwrap();
    a.add(eax, b'0' as i32).unwrap();
    a.cmp(eax, b'9' as i32).unwrap();
    a.jbe(decimal).unwrap();
    a.add(eax, 7).unwrap();
    a.set_label(&mut decimal).unwrap();
    a.call(putc).unwrap();
    a.dec(r10d).unwrap();
    a.jnz(digit).unwrap();
    a.ret().unwrap();

    // puts: rsi, NUL-terminated.
    a.set_label(&mut puts).unwrap();
    let mut done = a.create_label();
    a.movzx(eax, byte_ptr(rsi)).unwrap();
    a.test(al, al).unwrap();
    a.jz(done).unwrap();
    a.call(putc).unwrap();
    a.inc(rsi).unwrap();
    a.jmp(puts).unwrap();
    a.set_label(&mut done).unwrap();
    a.ret().unwrap();

    a.set_label(&mut msg_pass).unwrap();
    a.db(b"pass \0").unwrap();
    a.set_label(&mut msg_err).unwrap();
    a.db(b" err \0").unwrap();
    a.set_label(&mut msg_nl).unwrap();
    a.db(b"\n\0").unwrap();
    a.assemble(ENTRY).unwrap()
}

/// Writes the guest image into `dir`, returns its path.
pub fn image(dir: &Path) -> PathBuf {
    let path = dir.join("pattern.bin");
    std::fs::write(&path, assemble()).unwrap();
    path
}

/// The passes seen on a console: (G0, G1, errors) per line.
pub fn passes(console: &str) -> Vec<(u64, u64, u64)> {
    console
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.strip_prefix("pass ")?.split(' ').collect();
            match f[..] {
                [g0, g1, "err", e] if e.len() == 8 => Some((
                    u64::from_str_radix(g0, 16).ok()?,
                    u64::from_str_radix(g1, 16).ok()?,
                    u64::from_str_radix(e, 16).ok()?,
                )),
                _ => None,
            }
        })
        .collect()
}

/// Checks a console (possibly two processes' output concatenated): every
/// pass line whole, G0 one more on each line, no error reported. A last
/// line without its newline is one the guest was still printing when its
/// VMM was paused or read: it is left out.
pub fn check_console(console: &str) -> Vec<(u64, u64, u64)> {
    let console = console.rfind('\n').map_or("", |end| &console[..=end]);
    let lines: Vec<&str> = console.lines().collect();
    let p = passes(console);
    assert_eq!(p.len(), lines.len(), "a console line is garbled or not a pass line:\n{console}");
    for w in p.windows(2) {
        assert_eq!(w[1].0, w[0].0 + 1, "a pass line is lost or repeated:\n{console}");
    }
    assert!(p.iter().all(|&(_, _, e)| e == 0), "the guest found lost writes:\n{console}");
    p
}

/// Checks guest memory (`ram` = all of it) against the progress words:
/// every page of a vCPU before its cursor holds this pass's value, every
/// page after it the last pass's (the page at the cursor either). Returns
/// each vCPU's pass number.
pub fn check_memory(ram: &[u8]) -> [u64; 2] {
    assert_eq!(ram.len() as u64, MEMORY);
    let qword = |at: u64| u64::from_le_bytes(ram[at as usize..at as usize + 8].try_into().unwrap());
    let mut gens = [0; 2];
    for id in 0..2u64 {
        let status = qword(STATUS + 0x40 * id);
        let (gen, cursor) = (status >> 32, status & 0xffff_ffff);
        assert_eq!(qword(STATUS + 0x40 * id + 16), 0, "vCPU {id} counted lost writes");
        assert!(gen >= 1 && cursor <= HALF, "vCPU {id}: status {status:#x}");
        let value = |g: u64, p: u64| if g == 0 { 0 } else { g << 32 | id << 24 | p };
        for p in 0..HALF {
            let found = qword(DATA + (id * HALF + p) * 4096);
            let ok = match p.cmp(&cursor) {
                std::cmp::Ordering::Less => found == value(gen, p),
                std::cmp::Ordering::Greater => found == value(gen - 1, p),
                std::cmp::Ordering::Equal => found == value(gen, p) || found == value(gen - 1, p),
            };
            assert!(ok, "vCPU {id} page {p}: {found:#x}, pass {gen} cursor {cursor}");
        }
        gens[id as usize] = gen;
    }
    gens
}

/// Waits on the pattern guest.
impl Vmm {
    /// Waits for `n` more pass lines than `after` on the console.
    pub fn wait_passes(&mut self, after: usize, n: usize) {
        self.wait_for(&format!("{n} passes"), |out, _| passes(out).len() >= after + n);
    }
}
