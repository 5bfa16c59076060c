//! `nkvm run --kernel` with a multiboot kernel, as kvm-unit-tests are
//! booted: a tiny ELF32 multiboot kernel assembled here checks the loader's
//! hand-over (magic, command line, module), asks fw_cfg for the CPU count
//! and ends the VM through the test-exit port; nkvm's exit status is the
//! suite's `(value << 1) | 1`.

mod common;

use std::path::{Path, PathBuf};

use common::{nkvm, text};
use iced_x86::code_asm::*;

const LOAD: u32 = 0x40_0000;
const COM1: u16 = 0x3f8;
/// Where the two messages sit, from [`LOAD`].
const MSG_OK: u32 = 0x400;
const MSG_BAD: u32 = MSG_OK + 16;
const DEVICES_OK: u32 = MSG_OK + 32;
const DEVICES_BAD: u32 = MSG_OK + 48;

/// The guest: prints "MAGIC OK" or "MAGIC BAD", the command line and the
/// module's bytes on COM1, then writes fw_cfg's CPU count to port 0xf4.
fn guest() -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    let mut puts = a.create_label();
    let mut bad = a.create_label();
    let mut ok = a.create_label();
    let mut after_magic = a.create_label();
    a.mov(esp, LOAD).unwrap(); // the stack grows down below the kernel
    a.cmp(eax, 0x2bad_b002u32 as i32).unwrap();
    a.jne(bad).unwrap();
    a.set_label(&mut ok).unwrap();
    a.mov(esi, LOAD + MSG_OK).unwrap();
    a.jmp(after_magic).unwrap();
    a.set_label(&mut bad).unwrap();
    a.mov(esi, LOAD + MSG_BAD).unwrap();
    a.set_label(&mut after_magic).unwrap();
    a.call(puts).unwrap();
    // Command line: info + 16.
    a.mov(esi, dword_ptr(ebx + 16)).unwrap();
    a.call(puts).unwrap();
    // The module: mods_addr (info + 24) -> start, end.
    let mut no_module = a.create_label();
    a.cmp(dword_ptr(ebx + 20), 1).unwrap();
    a.jne(no_module).unwrap();
    a.mov(edi, dword_ptr(ebx + 24)).unwrap();
    a.mov(esi, dword_ptr(edi)).unwrap();
    a.call(puts).unwrap();
    a.set_label(&mut no_module).unwrap();
    // The platform devices: CMOS register D says its RAM is valid, the PM
    // timer moves, the I/O RAM keeps what is written to it.
    let mut devices_bad = a.create_label();
    let mut devices_done = a.create_label();
    a.mov(al, 0x0d).unwrap();
    a.out(0x70, al).unwrap();
    a.in_(al, 0x71).unwrap();
    a.cmp(al, 0x80).unwrap();
    a.jne(devices_bad).unwrap();
    a.mov(dx, 0x608).unwrap();
    a.in_(eax, dx).unwrap();
    a.mov(ecx, eax).unwrap();
    let mut spin = a.create_label();
    a.set_label(&mut spin).unwrap();
    a.in_(eax, dx).unwrap();
    a.cmp(eax, ecx).unwrap();
    a.je(spin).unwrap();
    a.mov(dword_ptr(0xff00_0010u32), 0x1234_5678).unwrap();
    a.mov(eax, dword_ptr(0xff00_0010u32)).unwrap();
    a.cmp(eax, 0x1234_5678).unwrap();
    a.jne(devices_bad).unwrap();
    a.mov(esi, LOAD + DEVICES_OK).unwrap();
    a.jmp(devices_done).unwrap();
    a.set_label(&mut devices_bad).unwrap();
    a.mov(esi, LOAD + DEVICES_BAD).unwrap();
    a.set_label(&mut devices_done).unwrap();
    a.call(puts).unwrap();
    // fw_cfg: select NB_CPUS (16-bit out to 0x510), read its low byte.
    a.mov(dx, 0x510u32 as i32).unwrap();
    a.mov(ax, 5).unwrap();
    a.out(dx, ax).unwrap();
    a.mov(dx, 0x511u32 as i32).unwrap();
    a.in_(al, dx).unwrap();
    a.movzx(eax, al).unwrap();
    a.mov(dx, 0xf4u32 as i32).unwrap();
    a.out(dx, eax).unwrap();
    let mut forever = a.create_label();
    a.set_label(&mut forever).unwrap();
    a.hlt().unwrap();
    a.jmp(forever).unwrap();
    // puts: esi -> COM1 until NUL, then a newline.
    a.set_label(&mut puts).unwrap();
    let mut next = a.create_label();
    let mut done = a.create_label();
    a.mov(dx, i32::from(COM1)).unwrap();
    a.set_label(&mut next).unwrap();
    a.mov(al, byte_ptr(esi)).unwrap();
    a.test(al, al).unwrap();
    a.jz(done).unwrap();
    a.out(dx, al).unwrap();
    a.inc(esi).unwrap();
    a.jmp(next).unwrap();
    a.set_label(&mut done).unwrap();
    a.mov(al, b'\n' as i32).unwrap();
    a.out(dx, al).unwrap();
    a.ret().unwrap();
    let mut code = a.assemble(u64::from(LOAD)).unwrap();
    assert!(code.len() <= MSG_OK as usize);
    for (at, text) in
        [(MSG_OK, "MAGIC OK"), (MSG_BAD, "MAGIC BAD"), (DEVICES_OK, "DEVICES OK"), (DEVICES_BAD, "DEVICES BAD")]
    {
        code.resize(at as usize, 0);
        code.extend_from_slice(text.as_bytes());
        code.push(0);
    }
    code
}

/// An ELF32 i386 file with one segment holding `code` at [`LOAD`] (plus
/// `bss` zero bytes) and a multiboot header with `flags`.
fn elf32(code: &[u8], bss: u32, flags: u32) -> Vec<u8> {
    const CODE_AT: usize = 0x100;
    let mut img = vec![0u8; CODE_AT];
    let put16 = |img: &mut Vec<u8>, at: usize, v: u16| img[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put32 = |img: &mut Vec<u8>, at: usize, v: u32| img[at..at + 4].copy_from_slice(&v.to_le_bytes());
    img[..4].copy_from_slice(b"\x7fELF");
    img[4] = 1; // 32-bit
    img[5] = 1; // little endian
    img[6] = 1; // version
    put16(&mut img, 16, 2); // ET_EXEC
    put16(&mut img, 18, 3); // EM_386
    put32(&mut img, 24, LOAD); // entry
    put32(&mut img, 28, 52); // phoff
    put16(&mut img, 40, 52); // ehsize
    put16(&mut img, 42, 32); // phentsize
    put16(&mut img, 44, 1); // phnum
    put32(&mut img, 52, 1); // PT_LOAD
    put32(&mut img, 56, CODE_AT as u32);
    put32(&mut img, 60, LOAD);
    put32(&mut img, 64, LOAD);
    put32(&mut img, 68, code.len() as u32);
    put32(&mut img, 72, code.len() as u32 + bss);
    put32(&mut img, 76, 7); // RWX
    let magic = 0x1bad_b002u32;
    put32(&mut img, 0x80, magic);
    put32(&mut img, 0x84, flags);
    put32(&mut img, 0x88, 0u32.wrapping_sub(magic.wrapping_add(flags)));
    img.extend_from_slice(code);
    img
}

fn write_temp(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nkvm-multiboot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_multiboot_kernel_gets_the_magic_its_command_line_its_module_and_fw_cfg_and_sets_the_exit_status() {
    let kernel = write_temp("hello.flat", &elf32(&guest(), 0x1_0000, 0));
    let env = write_temp("env", b"NR_CPUS=3\0");
    let out = nkvm(&[
        "run",
        "--kernel",
        path_str(&kernel),
        "--cpus",
        "3",
        "--memory",
        "64M",
        "--cmdline",
        "first second",
        "--initrd",
        path_str(&env),
    ]);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(stdout.contains("MAGIC OK"), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains(&format!("{} first second", kernel.display())), "argv[0] is the path: {stdout}");
    assert!(stdout.contains("NR_CPUS=3"), "the module's bytes: {stdout}");
    assert_eq!(out.status.code(), Some((3 << 1) | 1), "fw_cfg said 3 CPUs; stderr:\n{stderr}");
}

#[test]
fn the_platform_devices_answer_in_process_and_in_device_processes() {
    let kernel = write_temp("devices.flat", &elf32(&guest(), 0, 0));
    for extra in [None, Some("--device-process")] {
        let mut args = vec!["run", "--kernel", path_str(&kernel), "--cpus", "1", "--memory", "32M"];
        args.extend(extra);
        let out = nkvm(&args);
        let stdout = text(&out.stdout);
        assert!(stdout.contains("DEVICES OK"), "{extra:?}: stdout:\n{stdout}\nstderr:\n{}", text(&out.stderr));
        assert_eq!(out.status.code(), Some(3), "{extra:?}");
    }
}

#[test]
fn without_cmdline_or_initrd_the_command_line_is_the_path_alone() {
    let kernel = write_temp("alone.flat", &elf32(&guest(), 0, 0));
    let out = nkvm(&["run", "--kernel", path_str(&kernel), "--cpus", "1", "--memory", "32M"]);
    let stdout = text(&out.stdout);
    let line = stdout.lines().nth(1).unwrap_or_default();
    assert_eq!(line, kernel.display().to_string(), "{stdout}");
    assert_eq!(out.status.code(), Some(3), "1 CPU: status (1 << 1) | 1");
}

#[test]
fn a_multiboot_kernel_larger_than_ram_is_refused_with_the_remedy() {
    let kernel = write_temp("huge.flat", &elf32(&guest(), 64 << 20, 0));
    let out = nkvm(&["run", "--kernel", path_str(&kernel), "--cpus", "1", "--memory", "16M"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("does not fit in the guest's RAM") && stderr.contains("--memory"), "{stderr}");
}

#[test]
fn a_multiboot_kernel_asking_for_the_aout_kludge_is_refused() {
    let kernel = write_temp("aout.flat", &elf32(&guest(), 0, 1 << 16));
    let out = nkvm(&["run", "--kernel", path_str(&kernel), "--cpus", "1"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not a loadable multiboot kernel") && stderr.contains("a.out"), "{stderr}");
}
