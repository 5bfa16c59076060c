//! System Control Port A (port 0x92, "port 92", the PS/2 fast A20 and
//! fast reset port), as QEMU's `port92` device has it.
//!
//! # Register
//!
//! | bit | access | meaning |
//! |---|---|---|
//! | 0 | RW | fast reset: a write that changes it from 0 to 1 resets the machine |
//! | 1 | RW | A20 gate enabled |
//! | 2-7 | RW | kept and read back, no effect |
//!
//! Reads return the last byte written, as QEMU's do. The reset is on the
//! rising edge, as in QEMU: writing 1 while bit 0 is already 1 does
//! nothing, so a guest must clear it first (kvm-unit-tests' `init.c` does,
//! `outb(inb(0x92) & ~1, 0x92)` then `| 1`). It is reported as
//! [`PowerEvent::Reset`]; the VMM then calls [`SystemControlA::reset`],
//! which clears bit 0 as a machine reset does (and a warm INIT does not,
//! which `init.c` uses to tell the two apart).
//!
//! The register starts at 0x02, A20 enabled, as firmware leaves it. The
//! A20 bit is only held ([`SystemControlA::a20_enabled`]): KVM has no A20
//! mask, so address bit 20 is never forced to 0.
//!
//! Bytes of an access past port 0x92 and empty accesses are logged and
//! ignored (reading `0xff`).

use std::sync::mpsc::Sender;

use crate::bad_access::BadAccessLog;
use crate::bus::IoDevice;
use crate::power::{report, PowerEvent};

mod snapshot;

/// The port.
pub const SYSTEM_CONTROL_A_PORT: u16 = 0x92;
/// Size of the device's region in ports.
pub const SYSTEM_CONTROL_A_SIZE: u64 = 1;
/// Bit 0: fast reset.
pub const SYSTEM_CONTROL_A_RESET: u8 = 1 << 0;
/// Bit 1: A20 gate enabled.
pub const SYSTEM_CONTROL_A_A20: u8 = 1 << 1;

const NAME: &str = "port 92";

/// System Control Port A; see the [module documentation](self).
#[derive(Debug)]
pub struct SystemControlA {
    value: u8,
    events: Sender<PowerEvent>,
    bad: BadAccessLog,
}

impl SystemControlA {
    /// The register with A20 enabled, reporting resets on `events`.
    pub fn new(events: Sender<PowerEvent>) -> Self {
        Self { value: SYSTEM_CONTROL_A_A20, events, bad: BadAccessLog::default() }
    }

    /// Whether the guest has the A20 gate enabled.
    pub fn a20_enabled(&self) -> bool {
        self.value & SYSTEM_CONTROL_A_A20 != 0
    }

    /// What a machine reset does to the register: clear the reset bit,
    /// keep the rest (QEMU's `port92_reset`).
    pub fn reset(&mut self) {
        self.value &= !SYSTEM_CONTROL_A_RESET;
    }

    fn write_value(&mut self, value: u8) {
        let rising = value & !self.value & SYSTEM_CONTROL_A_RESET != 0;
        self.value = value;
        if rising {
            report(&self.events, PowerEvent::Reset);
        }
    }
}

impl IoDevice for SystemControlA {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let len = data.len();
        data.fill(0xff);
        match (offset, data.first_mut()) {
            (0, Some(byte)) => *byte = self.value,
            _ => self.bad.read(NAME, offset, len),
        }
        if offset == 0 && len > 1 {
            self.bad.read(NAME, offset, len);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (0, [value]) => self.write_value(*value),
            (0, [value, ..]) => {
                self.write_value(*value);
                self.bad.write(NAME, offset, data);
            }
            _ => self.bad.write(NAME, offset, data),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{channel, Receiver};

    use super::*;

    fn port() -> (SystemControlA, Receiver<PowerEvent>) {
        let (tx, rx) = channel();
        (SystemControlA::new(tx), rx)
    }

    fn inb(port: &mut SystemControlA) -> u8 {
        let mut byte = [0u8];
        port.read(0, &mut byte);
        byte[0]
    }

    #[test]
    fn starts_with_a20_enabled() {
        let (mut port, rx) = port();
        assert_eq!(inb(&mut port), 0x02);
        assert!(port.a20_enabled());
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn init_test_sequence_resets_once() {
        // init.c: outb(inb(0x92) & ~1, 0x92); outb(inb(0x92) | 1, 0x92);
        let (mut port, rx) = port();
        let value = inb(&mut port) & !1;
        port.write(0, &[value]);
        assert!(rx.try_recv().is_err());
        let value = inb(&mut port) | 1;
        port.write(0, &[value]);
        assert_eq!(rx.try_recv(), Ok(PowerEvent::Reset));
        assert_eq!(inb(&mut port), 0x03, "bit 0 stays set until the machine resets");
        port.reset();
        assert_eq!(inb(&mut port), 0x02);
    }

    #[test]
    fn reset_is_on_the_rising_edge_only() {
        let (mut port, rx) = port();
        port.write(0, &[0x03]);
        port.write(0, &[0x03]);
        port.write(0, &[0x01]);
        assert_eq!(rx.try_iter().count(), 1);
        port.write(0, &[0x00]);
        port.write(0, &[0x01]);
        assert_eq!(rx.try_iter().count(), 1);
    }

    #[test]
    fn a20_and_other_bits_are_held() {
        let (mut port, rx) = port();
        port.write(0, &[0xf0]);
        assert!(!port.a20_enabled());
        assert_eq!(inb(&mut port), 0xf0);
        port.write(0, &[0x02]);
        assert!(port.a20_enabled());
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn bytes_past_the_port_are_ignored() {
        let (mut port, rx) = port();
        port.write(0, &[0x00, 0x01]); // the register gets 0, port 0x93 the 1
        port.write(1, &[0x01]);
        port.write(u64::MAX, &[0x01]);
        port.write(0, &[]);
        assert!(rx.try_recv().is_err());
        assert_eq!(inb(&mut port), 0x00);
        let mut word = [0u8; 2];
        port.read(0, &mut word);
        assert_eq!(word, [0x00, 0xff]);
        port.read(1, &mut word);
        assert_eq!(word, [0xff, 0xff]);
        port.read(0, &mut []);
    }

    #[test]
    fn a_gone_receiver_is_not_an_error() {
        let (mut port, rx) = port();
        drop(rx);
        port.write(0, &[0x01]);
        assert_eq!(inb(&mut port), 0x01);
    }
}
