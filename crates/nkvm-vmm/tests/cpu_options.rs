//! `nkvm run --cpu-vendor` and the MSR filter nkvm installs, seen from a
//! tiny multiboot guest (as kvm-unit-tests' `msr` sees them): the guest
//! reports what it finds through the test-exit port, so nkvm's exit status
//! is `(value << 1) | 1`.

mod common;

use std::path::PathBuf;
use std::process::Output;

use common::{elf32, nkvm, write_temp};
use iced_x86::code_asm::*;

const LOAD: u32 = 0x40_0000;
/// The test-exit port (isa-debug-exit).
const EXIT_PORT: i32 = 0xf4;

/// Vendor verdicts the guest reports.
const INTEL: u32 = 1;
const AMD: u32 = 2;
const MIXED: u32 = 3;
/// MSR verdicts.
const FLUSH_L1D_OFFERED: u32 = 6;
const FLUSH_CMD_WRITTEN: u32 = 5;

fn kernel(name: &str, body: impl FnOnce(&mut CodeAssembler)) -> PathBuf {
    let mut a = CodeAssembler::new(32).unwrap();
    body(&mut a);
    let code = a.assemble(u64::from(LOAD)).unwrap();
    write_temp(name, &elf32(&code, LOAD))
}

/// Writes `status` to the test-exit port (ends the VM).
fn exit_with(a: &mut CodeAssembler, status: u32) {
    a.mov(eax, status).unwrap();
    a.out(EXIT_PORT, eax).unwrap();
    a.hlt().unwrap();
}

/// A guest that compares the vendor strings of leaves 0 and 0x8000_0000
/// (EBX, EDX, ECX) with "GenuineIntel" and "AuthenticAMD".
fn vendor_guest() -> PathBuf {
    kernel("vendor.flat", |a| {
        let mut not_intel = a.create_label();
        let mut mixed = a.create_label();
        for (i, leaf) in [0u32, 0x8000_0000].into_iter().enumerate() {
            let word = |s: &[u8; 12], at: usize| u32::from_le_bytes([s[at], s[at + 1], s[at + 2], s[at + 3]]);
            a.mov(eax, leaf).unwrap();
            a.cpuid().unwrap();
            let intel = b"GenuineIntel";
            a.cmp(ebx, word(intel, 0) as i32).unwrap();
            a.jne(if i == 0 { not_intel } else { mixed }).unwrap();
            a.cmp(edx, word(intel, 4) as i32).unwrap();
            a.jne(mixed).unwrap();
            a.cmp(ecx, word(intel, 8) as i32).unwrap();
            a.jne(mixed).unwrap();
        }
        exit_with(a, INTEL);
        a.set_label(&mut not_intel).unwrap();
        let amd = b"AuthenticAMD";
        for leaf in [0u32, 0x8000_0000] {
            a.mov(eax, leaf).unwrap();
            a.cpuid().unwrap();
            for (reg, at) in [(ebx, 0), (edx, 4), (ecx, 8)] {
                a.cmp(reg, u32::from_le_bytes([amd[at], amd[at + 1], amd[at + 2], amd[at + 3]]) as i32).unwrap();
                a.jne(mixed).unwrap();
            }
        }
        exit_with(a, AMD);
        a.set_label(&mut mixed).unwrap();
        exit_with(a, MIXED);
    })
}

fn run(kernel: &std::path::Path, extra: &[&str]) -> Output {
    let mut args = vec!["run", "--kernel", kernel.to_str().unwrap(), "--cpus", "1", "--memory", "16M"];
    args.extend_from_slice(extra);
    nkvm(&args)
}

fn status(v: u32) -> Option<i32> {
    Some(((v << 1) | 1) as i32)
}

#[test]
fn cpu_vendor_rewrites_both_vendor_leaves() {
    let guest = vendor_guest();
    let out = run(&guest, &["--cpu-vendor", "intel"]);
    assert_eq!(out.status.code(), status(INTEL), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(&guest, &["--cpu-vendor", "amd"]);
    assert_eq!(out.status.code(), status(AMD), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn an_unknown_vendor_is_refused_with_the_choices() {
    let out = run(&vendor_guest(), &["--cpu-vendor", "hygon"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("intel") && stderr.contains("amd"), "{stderr}");
}

#[test]
fn writing_flush_cmd_without_flush_l1d_in_cpuid_faults() {
    // No IDT: a #GP here ends in a triple fault, which nkvm reports.
    let guest = kernel("flush.flat", |a| {
        let mut offered = a.create_label();
        a.mov(eax, 7u32).unwrap();
        a.xor(ecx, ecx).unwrap();
        a.cpuid().unwrap();
        a.bt(edx, 28).unwrap();
        a.jc(offered).unwrap();
        a.mov(ecx, 0x10bu32).unwrap(); // IA32_FLUSH_CMD
        a.xor(eax, eax).unwrap();
        a.xor(edx, edx).unwrap();
        a.wrmsr().unwrap();
        exit_with(a, FLUSH_CMD_WRITTEN);
        a.set_label(&mut offered).unwrap();
        exit_with(a, FLUSH_L1D_OFFERED);
    });
    let out = run(&guest, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == status(FLUSH_L1D_OFFERED) {
        eprintln!("this host offers FLUSH_L1D: the write is allowed, nothing to deny");
        return;
    }
    assert_eq!(out.status.code(), Some(4), "the write must fault; stderr:\n{stderr}");
    assert!(stderr.contains("triple-fault"), "{stderr}");
}
