//! QEMU's `isa-debug-exit` device: a test program ends the VM, and the VMM
//! process, with an exit status of its choosing.
//!
//! kvm-unit-tests runs QEMU with `-device isa-debug-exit,iobase=0xf4,iosize=0x4`
//! and ends every test with `outl(code, 0xf4)` (`lib/x86/io.c`, `exit()`).
//!
//! # Registers
//!
//! | port | offset | access | meaning |
//! |---|---|---|---|
//! | 0xf4-0xf7 | 0-3 | W, 1-4 bytes | writing `value` ends the VM with status `(value << 1) \| 1` |
//! | 0xf4-0xf7 | 0-3 | R | 0 |
//!
//! Any write of 1 to 4 bytes at any of the four ports counts, as in QEMU
//! (whose handler ignores the address). The device sends
//! [`PowerEvent::TestExit`] on its channel for every such write; the VMM
//! stops the VM at the first and exits with its `status`.
//!
//! # The status, exactly
//!
//! QEMU calls `exit((value << 1) | 1)`, and the operating system keeps the
//! low 8 bits of an exit status, so the status the test harness sees is
//! `((value << 1) | 1) & 0xff`: `exit(0)` gives 1 (which
//! `scripts/arch-run.bash` turns into PASS), `exit(1)` gives 3, and only the
//! low seven bits of `value` matter (`0x80` gives 1, like 0). As every
//! access QEMU splits off first contains the lowest byte, a misaligned
//! write gives the same status in QEMU and here. [`exit_status`] computes it.
//!
//! Zero-byte accesses and accesses starting past the fourth port are
//! logged and ignored (reads of them fill `0xff`).

use std::sync::mpsc::Sender;

use crate::bad_access::BadAccessLog;
use crate::bus::{le_value, IoDevice};
use crate::power::{report, PowerEvent};

mod snapshot;

/// The port kvm-unit-tests writes its exit code to.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Size of the device's region in ports.
pub const DEBUG_EXIT_SIZE: u64 = 4;

const NAME: &str = "isa-debug-exit";

/// The process exit status QEMU's isa-debug-exit produces for a write of
/// `value`: `(value << 1) | 1`, truncated to 8 bits as the OS does.
pub fn exit_status(value: u64) -> u8 {
    ((value << 1) | 1) as u8
}

/// The isa-debug-exit device; see the [module documentation](self).
#[derive(Debug)]
pub struct DebugExit {
    events: Sender<PowerEvent>,
    bad: BadAccessLog,
}

impl DebugExit {
    /// A device reporting [`PowerEvent::TestExit`] on `events`.
    pub fn new(events: Sender<PowerEvent>) -> Self {
        Self { events, bad: BadAccessLog::default() }
    }
}

impl IoDevice for DebugExit {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.is_empty() || offset >= DEBUG_EXIT_SIZE {
            self.bad.read(NAME, offset, data.len());
            data.fill(0xff);
            return;
        }
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.is_empty() || offset >= DEBUG_EXIT_SIZE {
            self.bad.write(NAME, offset, data);
            return;
        }
        let status = exit_status(le_value(data));
        log::debug!("{NAME}: guest wrote {data:02x?}, exit status {status}");
        report(&self.events, PowerEvent::TestExit { status });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{channel, Receiver};

    use super::*;

    fn device() -> (DebugExit, Receiver<PowerEvent>) {
        let (tx, rx) = channel();
        (DebugExit::new(tx), rx)
    }

    fn status_of(dev: &mut DebugExit, rx: &Receiver<PowerEvent>, offset: u64, data: &[u8]) -> Option<u8> {
        dev.write(offset, data);
        match rx.try_recv() {
            Ok(PowerEvent::TestExit { status }) => Some(status),
            Ok(other) => panic!("unexpected event {other:?}"),
            Err(_) => None,
        }
    }

    #[test]
    fn outl_of_the_exit_code_gives_its_double_plus_one() {
        let (mut dev, rx) = device();
        assert_eq!(status_of(&mut dev, &rx, 0, &1u32.to_le_bytes()), Some(3));
        assert_eq!(status_of(&mut dev, &rx, 0, &0u32.to_le_bytes()), Some(1), "exit(0) is PASS");
        assert_eq!(status_of(&mut dev, &rx, 0, &0x3bu32.to_le_bytes()), Some(0x77));
        assert!(rx.try_recv().is_err(), "one event per write");
    }

    #[test]
    fn status_is_truncated_to_eight_bits_like_the_os_does() {
        assert_eq!(exit_status(0x80), 1);
        assert_eq!(exit_status(0x7f), 0xff);
        assert_eq!(exit_status(u64::MAX), 0xff);
        let (mut dev, rx) = device();
        assert_eq!(status_of(&mut dev, &rx, 0, &0x80u32.to_le_bytes()), Some(1));
        assert_eq!(status_of(&mut dev, &rx, 0, &0x1_0002u32.to_le_bytes()), Some(5));
    }

    #[test]
    fn every_port_and_size_counts() {
        let (mut dev, rx) = device();
        assert_eq!(status_of(&mut dev, &rx, 3, &[2]), Some(5));
        assert_eq!(status_of(&mut dev, &rx, 2, &[4, 0]), Some(9));
    }

    #[test]
    fn reads_return_zero() {
        let (mut dev, rx) = device();
        let mut dword = [0xaa; 4];
        dev.read(0, &mut dword);
        assert_eq!(dword, [0; 4]);
        let mut byte = [0xaa];
        dev.read(3, &mut byte);
        assert_eq!(byte, [0]);
        assert!(rx.try_recv().is_err(), "reading does not end the VM");
    }

    #[test]
    fn empty_and_out_of_range_accesses_do_nothing() {
        let (mut dev, rx) = device();
        assert_eq!(status_of(&mut dev, &rx, 0, &[]), None);
        assert_eq!(status_of(&mut dev, &rx, DEBUG_EXIT_SIZE, &[1]), None);
        assert_eq!(status_of(&mut dev, &rx, u64::MAX, &[1; 4]), None);
        let mut past = [0u8; 2];
        dev.read(DEBUG_EXIT_SIZE, &mut past);
        assert_eq!(past, [0xff; 2]);
        dev.read(0, &mut []);
    }

    #[test]
    fn a_gone_receiver_is_not_an_error() {
        let (mut dev, rx) = device();
        drop(rx);
        dev.write(0, &[1]);
    }
}
