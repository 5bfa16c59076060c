//! What the tiny-kernel tests share: ELF32 (multiboot) and bzImage
//! wrappers for assembled code, temporary files, and running `nkvm` with a
//! bound.
#![allow(dead_code)] // each test binary uses a part

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `nkvm args...` to its end, with no input, and returns what it did.
pub fn nkvm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nkvm")).args(args).stdin(Stdio::null()).output().expect("run nkvm")
}

/// Bytes as text, invalid UTF-8 replaced.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// An ELF32 i386 multiboot file with one segment holding `code` at `load`.
pub fn elf32(code: &[u8], load: u32) -> Vec<u8> {
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
    put32(&mut img, 24, load); // entry
    put32(&mut img, 28, 52); // phoff
    put16(&mut img, 40, 52); // ehsize
    put16(&mut img, 42, 32); // phentsize
    put16(&mut img, 44, 1); // phnum
    put32(&mut img, 52, 1); // PT_LOAD
    put32(&mut img, 56, CODE_AT as u32);
    put32(&mut img, 60, load);
    put32(&mut img, 64, load);
    put32(&mut img, 68, code.len() as u32);
    put32(&mut img, 72, code.len() as u32);
    put32(&mut img, 76, 7); // RWX
    let magic = 0x1bad_b002u32;
    put32(&mut img, 0x80, magic);
    put32(&mut img, 0x88, 0u32.wrapping_sub(magic));
    img.extend_from_slice(code);
    img
}

/// A bzImage with no decompressor: one setup sector with the boot-protocol
/// header, then a protected-mode part whose 64-bit entry (offset 0x200)
/// runs `code`.
pub fn tiny_bzimage(code: &[u8]) -> Vec<u8> {
    let mut image = vec![0u8; 1024 + 0x200];
    image[0x1f1] = 1; // setup_sects
    image[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    image[0x202..0x206].copy_from_slice(b"HdrS");
    image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // version
    image[0x211] = 1; // loadflags: LOADED_HIGH
    image[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    image[0x236] = 1; // xloadflags: XLF_KERNEL_64, a 64-bit entry at +0x200
    image.extend_from_slice(code);
    image
}

/// Writes `bytes` to a file of this test process's temporary directory.
pub fn write_temp(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nkvm-firmware-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// How a bounded `nkvm run` ended.
#[derive(Debug)]
pub struct Run {
    /// The exit status, `None` when nkvm was killed at the bound.
    pub status: Option<i32>,
    /// What it wrote to stderr (with `NKVM_LOG=debug`).
    pub stderr: String,
}

/// Runs `nkvm run --kernel kernel --memory 32M extra...`; a guest still running after
/// `bound` is killed (the bound only keeps a broken guest from hanging the
/// test: the guests here end in well under a second when they work).
pub fn run_kernel(kernel: &std::path::Path, extra: &[&str], bound: Duration) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nkvm"))
        .args(["run", "--kernel", kernel.to_str().unwrap(), "--memory", "32M"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env("NKVM_LOG", "debug")
        .spawn()
        .expect("run nkvm");
    // Drained as it comes, so a chatty nkvm never blocks on a full pipe.
    let mut pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut stderr = String::new();
        let _ = pipe.read_to_string(&mut stderr);
        stderr
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if start.elapsed() > bound {
            child.kill().unwrap();
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run { status, stderr: reader.join().unwrap() }
}
