//! The guest built into nkvm, assembled at run time from the readable
//! assembly below (no prebuilt blob).
//!
//! Every vCPU starts in long mode at [`ENTRY`] with its id in `rdi` and the
//! vCPU count in `rbp`. They take turns (a counter in guest memory) to print
//! `Hello from the nkvm built-in guest on vCPU n` over the 16550 at 0x3f8;
//! then vCPU 0 writes a pattern to the test device's scratch register over
//! MMIO, reads it back, reads the device's ID, prints the result and powers
//! off through the ACPI PM1a control port. The other vCPUs halt.

use iced_x86::code_asm::*;
use iced_x86::IcedError;

/// Where the code is loaded and every vCPU starts.
pub const ENTRY: u64 = 0x10_0000;
/// Where the long-mode GDT and page tables go.
pub const TABLES: u64 = 0x2_0000;
/// The turn counter shared by the vCPUs.
pub const TURN: u64 = 0x8000;
/// Top of vCPU 0's stack; vCPU n's is 16 KiB × n lower.
pub const STACK_TOP: u64 = 0xf_0000;
/// The most vCPUs the guest runs on: the lowest stack stays clear of the
/// page tables at [`TABLES`].
pub const MAX_CPUS: u32 = 48;
/// Where the test device sits.
pub const TEST_DEVICE: u64 = 0xd000_0000;
/// 16550 base port.
pub const COM1: u16 = 0x3f8;
/// The ACPI PM1a control port; writing [`PM1_POWER_OFF`] powers off.
pub const PM1A_CNT: u16 = 0x604;
/// SLP_TYP = 5 (S5) | SLP_EN.
pub const PM1_POWER_OFF: u16 = (5 << 10) | (1 << 13);

const SCRATCH_PATTERN: u32 = 0x6e6b_766d; // "mvkn"

/// Assembles the built-in guest for loading at [`ENTRY`].
pub fn assemble() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut putc = a.create_label();
    let mut puts = a.create_label();
    let mut hello = a.create_label();
    let mut newline = a.create_label();
    let mut mmio_ok = a.create_label();
    let mut mmio_bad = a.create_label();
    let mut mmio_bad_msg = a.create_label();
    let mut ap_done = a.create_label();

    // Wait for our turn.
    let mut wait = a.create_label();
    a.set_label(&mut wait)?;
    a.pause()?;
    a.mov(rbx, TURN)?;
    a.mov(eax, dword_ptr(rbx))?;
    a.cmp(eax, edi)?;
    a.jne(wait)?;
    // Greet.
    a.lea(rsi, ptr(hello))?;
    a.call(puts)?;
    a.mov(eax, edi)?;
    a.add(al, b'0' as i32)?;
    a.call(putc)?;
    a.lea(rsi, ptr(newline))?;
    a.call(puts)?;
    // Pass the turn on.
    a.mov(rbx, TURN)?;
    a.lock().inc(dword_ptr(rbx))?;
    a.test(edi, edi)?;
    a.jnz(ap_done)?;
    // vCPU 0: wait for everybody, then MMIO.
    let mut all = a.create_label();
    a.set_label(&mut all)?;
    a.pause()?;
    a.mov(eax, dword_ptr(rbx))?;
    a.cmp(eax, ebp)?;
    a.jne(all)?;
    a.mov(rbx, TEST_DEVICE)?;
    a.mov(dword_ptr(rbx + 0x20), SCRATCH_PATTERN)?;
    a.mov(eax, dword_ptr(rbx + 0x20))?;
    a.cmp(eax, SCRATCH_PATTERN)?;
    a.jne(mmio_bad)?;
    a.mov(rax, qword_ptr(rbx))?; // ID register: "nkvmtest"
    a.mov(rcx, u64::from_le_bytes(*b"nkvmtest"))?;
    a.cmp(rax, rcx)?;
    a.jne(mmio_bad)?;
    a.lea(rsi, ptr(mmio_ok))?;
    a.call(puts)?;
    let mut off = a.create_label();
    a.jmp(off)?;
    a.set_label(&mut mmio_bad)?;
    a.lea(rsi, ptr(mmio_bad_msg))?;
    a.call(puts)?;
    a.set_label(&mut off)?;
    a.mov(dx, PM1A_CNT as u32)?;
    a.mov(ax, PM1_POWER_OFF as u32)?;
    a.out(dx, ax)?;
    a.set_label(&mut ap_done)?;
    a.hlt()?;
    a.jmp(ap_done)?;

    // putc: al = byte. Waits for THR empty (LSR bit 5), then writes it.
    a.set_label(&mut putc)?;
    a.mov(cl, al)?;
    a.mov(dx, (COM1 + 5) as u32)?;
    let mut poll = a.create_label();
    a.set_label(&mut poll)?;
    a.in_(al, dx)?;
    a.test(al, 0x20)?;
    a.jz(poll)?;
    a.mov(dx, COM1 as u32)?;
    a.mov(al, cl)?;
    a.out(dx, al)?;
    a.ret()?;

    // puts: rsi = NUL-terminated string.
    a.set_label(&mut puts)?;
    let mut done = a.create_label();
    a.movzx(eax, byte_ptr(rsi))?;
    a.test(al, al)?;
    a.jz(done)?;
    a.call(putc)?;
    a.inc(rsi)?;
    a.jmp(puts)?;
    a.set_label(&mut done)?;
    a.ret()?;

    a.set_label(&mut hello)?;
    a.db(b"Hello from the nkvm built-in guest on vCPU \0")?;
    a.set_label(&mut newline)?;
    a.db(b"\r\n\0")?;
    a.set_label(&mut mmio_ok)?;
    a.db(b"MMIO test device: scratch register and ID read back OK\r\n\0")?;
    a.set_label(&mut mmio_bad_msg)?;
    a.db(b"MMIO test device: read back the WRONG value\r\n\0")?;
    a.assemble(ENTRY)
}

#[cfg(test)]
mod tests {
    #[test]
    fn assembles() {
        let code = super::assemble().unwrap();
        assert!(code.len() > 100 && code.len() < 4096, "{}", code.len());
    }
}
