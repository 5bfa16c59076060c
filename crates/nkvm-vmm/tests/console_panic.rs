//! A guest kernel's panic on the serial console is a failure, whether the
//! 16550 runs in nkvm's process or in a device process of its own: a tiny
//! multiboot guest prints Linux's panic line and resets the machine, as a
//! kernel booted with `panic=-1` does, and nkvm must not report the reset
//! as a clean end.

mod common;

use std::time::Duration;

use common::{elf32, run_kernel, write_temp};
use iced_x86::code_asm::*;

const LOAD: u32 = 0x10_0000;

/// Prints `text` on COM1 a byte at a time, then resets through the 8042.
fn panicking_guest(text: &str) -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    a.mov(dx, 0x3f8u32).unwrap();
    for &b in text.as_bytes() {
        a.mov(al, u32::from(b)).unwrap();
        a.out(dx, al).unwrap();
    }
    a.mov(al, 0xfeu32).unwrap();
    a.out(0x64, al).unwrap();
    a.hlt().unwrap();
    elf32(&a.assemble(u64::from(LOAD)).unwrap(), LOAD)
}

#[test]
fn a_panic_line_then_a_reset_is_a_failure_in_process_and_with_the_serial_port_in_a_device_process() {
    let kernel = write_temp("panic.elf", &panicking_guest("[ 1.0] Kernel panic - not syncing: test panic\r\n"));
    for extra in [&[][..], &["--device-process"][..]] {
        let run = run_kernel(&kernel, extra, Duration::from_secs(60));
        assert_eq!(run.status, Some(4), "{extra:?}: a panicked guest must exit 4\n{}", run.stderr);
        assert!(
            run.stderr.contains("the guest kernel panicked: test panic"),
            "{extra:?}: the panic is named\n{}",
            run.stderr
        );
    }
}

#[test]
fn a_reset_without_a_panic_line_is_a_clean_end_both_ways() {
    let kernel = write_temp("reset.elf", &panicking_guest("rebooting\r\n"));
    for extra in [&[][..], &["--device-process"][..]] {
        let run = run_kernel(&kernel, extra, Duration::from_secs(60));
        assert_eq!(run.status, Some(0), "{extra:?}\n{}", run.stderr);
    }
}
