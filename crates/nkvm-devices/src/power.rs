//! Power-off and reset: an ACPI PM1a control register and the i8042
//! keyboard controller's reset command.
//!
//! Both devices (and [`crate::debug_exit`] and [`crate::port92`]) report
//! what the guest asked for as a [`PowerEvent`] on an `mpsc` channel; the
//! VMM keeps the receiver and polls it (for instance with `try_recv` after
//! each I/O exit) to stop or restart the VM.
//!
//! # PM1a control (`Pm1Control`, 2 ports)
//!
//! A 16-bit register (ACPI 6.5, 4.8.3.2.1): bit 0 `SCI_EN` (reads as 1: the
//! machine is always in ACPI mode), bits 10-12 `SLP_TYP`, bit 13 `SLP_EN`
//! (write-only, reads as 0). Writing `SLP_EN` with `SLP_TYP` = 5, i.e. the
//! value [`PM1_POWER_OFF`] = 0x3400, powers off; the VMM's DSDT must give
//! `\_S5` the `SLP_TYP` value 5. Other sleep types are ignored. Byte and
//! word accesses inside the register work; others read 0 and are ignored.
//!
//! # i8042 (`I8042`, port 0x64 only)
//!
//! Writing [`I8042_CMD_RESET`] (0xfe) resets the machine. Other commands
//! are ignored and the status register reads 0 (no data, ready), so a guest
//! probing for a keyboard finds nothing to talk to.

use std::sync::mpsc::Sender;

use crate::bus::{le_value, put_le_value, IoDevice};

/// Size of the PM1a control register block in bytes.
pub const PM1_CONTROL_SIZE: u64 = 2;
/// `SCI_EN`: SCI interrupts enabled (ACPI mode).
pub const PM1_SCI_EN: u16 = 1 << 0;
/// Shift of the 3-bit `SLP_TYP` field.
pub const PM1_SLP_TYP_SHIFT: u32 = 10;
/// `SLP_EN`: enter the sleep state in `SLP_TYP` (write-only).
pub const PM1_SLP_EN: u16 = 1 << 13;
/// The `SLP_TYP` value meaning soft-off (S5) on this machine.
pub const SLP_TYP_S5: u16 = 5;
/// The value a guest writes to power off: `SLP_TYP` = 5 with `SLP_EN`.
pub const PM1_POWER_OFF: u16 = (SLP_TYP_S5 << PM1_SLP_TYP_SHIFT) | PM1_SLP_EN;
/// The i8042 command/status port.
pub const I8042_COMMAND_PORT: u64 = 0x64;
/// Size of the i8042 device's region (the command port alone).
pub const I8042_SIZE: u64 = 1;
/// The i8042 command that pulses the CPU reset line.
pub const I8042_CMD_RESET: u8 = 0xfe;

/// What the guest asked the machine to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PowerEvent {
    /// Enter soft-off (S5): stop the VM.
    PowerOff,
    /// Reset the machine.
    Reset,
    /// A test program asked to end the VM with a process exit status
    /// (QEMU's isa-debug-exit, see [`crate::debug_exit`]): stop the VM and
    /// exit the VMM process with `status`.
    TestExit {
        /// The exit status, `(value << 1) | 1` truncated to 8 bits.
        status: u8,
    },
}

mod snapshot;

/// Send `event` to the VMM; a receiver that is gone is not an error (the
/// VMM is already shutting down).
pub(crate) fn report(events: &Sender<PowerEvent>, event: PowerEvent) {
    if events.send(event).is_err() {
        log::debug!("power: nobody listens for {event:?}");
    }
}

/// The ACPI PM1a control register; see the [module documentation](self).
#[derive(Debug)]
pub struct Pm1Control {
    value: u16,
    events: Sender<PowerEvent>,
}

impl Pm1Control {
    /// A control register reporting power-off on `events`.
    pub fn new(events: Sender<PowerEvent>) -> Self {
        Self { value: 0, events }
    }

    fn register(&self) -> u16 {
        (self.value | PM1_SCI_EN) & !PM1_SLP_EN
    }
}

/// The byte shift and width mask of a 1- or 2-byte access inside a 2-byte
/// register, if it fits.
fn within_u16(offset: u64, size: usize) -> Option<(u32, u16)> {
    match (offset, size) {
        (0, 2) => Some((0, 0xffff)),
        (0 | 1, 1) => Some((offset as u32 * 8, 0xff)),
        _ => None,
    }
}

impl IoDevice for Pm1Control {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match within_u16(offset, data.len()) {
            Some((shift, mask)) => (self.register() >> shift) & mask,
            None => {
                log::debug!("pm1: ignored read of {} bytes at {offset:#x}", data.len());
                0
            }
        };
        put_le_value(data, u64::from(value));
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some((shift, mask)) = within_u16(offset, data.len()) else {
            log::debug!("pm1: ignored write of {} bytes at {offset:#x}", data.len());
            return;
        };
        let written = (le_value(data) as u16) << shift;
        let value = (self.value & !(mask << shift)) | written;
        self.value = value & !PM1_SLP_EN;
        if value & PM1_SLP_EN == 0 {
            return;
        }
        match (value >> PM1_SLP_TYP_SHIFT) & 7 {
            SLP_TYP_S5 => report(&self.events, PowerEvent::PowerOff),
            other => log::debug!("pm1: sleep type {other} not supported, ignored"),
        }
    }
}

/// The i8042 command port, reduced to its reset command; see the
/// [module documentation](self).
#[derive(Debug)]
pub struct I8042 {
    events: Sender<PowerEvent>,
}

impl I8042 {
    /// An i8042 reporting resets on `events`.
    pub fn new(events: Sender<PowerEvent>) -> Self {
        Self { events }
    }
}

impl IoDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (0, [I8042_CMD_RESET]) => report(&self.events, PowerEvent::Reset),
            _ => log::debug!("i8042: ignored write {data:x?} at {offset:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{channel, Receiver};

    use super::*;

    fn pm1() -> (Pm1Control, Receiver<PowerEvent>) {
        let (tx, rx) = channel();
        (Pm1Control::new(tx), rx)
    }

    #[test]
    fn power_off_value_is_0x3400() {
        assert_eq!(PM1_POWER_OFF, 0x3400);
        let (mut dev, rx) = pm1();
        dev.write(0, &PM1_POWER_OFF.to_le_bytes());
        assert_eq!(rx.try_recv(), Ok(PowerEvent::PowerOff));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn reads_show_sci_enabled_and_never_slp_en() {
        let (mut dev, rx) = pm1();
        let mut word = [0u8; 2];
        dev.read(0, &mut word);
        assert_eq!(u16::from_le_bytes(word), PM1_SCI_EN);
        dev.write(0, &PM1_POWER_OFF.to_le_bytes());
        dev.read(0, &mut word);
        assert_eq!(u16::from_le_bytes(word), 0x1401);
        let mut high = [0u8];
        dev.read(1, &mut high);
        assert_eq!(high, [0x14]);
        assert_eq!(rx.try_iter().count(), 1);
    }

    #[test]
    fn byte_writes_combine_into_the_register() {
        let (mut dev, rx) = pm1();
        dev.write(1, &[(PM1_POWER_OFF >> 8) as u8]);
        assert_eq!(rx.try_recv(), Ok(PowerEvent::PowerOff));
    }

    #[test]
    fn other_sleep_types_and_writes_without_slp_en_do_nothing() {
        let (mut dev, rx) = pm1();
        dev.write(0, &(5u16 << PM1_SLP_TYP_SHIFT).to_le_bytes()); // no SLP_EN
        dev.write(0, &((3u16 << PM1_SLP_TYP_SHIFT) | PM1_SLP_EN).to_le_bytes()); // S3
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn invalid_pm1_accesses_are_ignored() {
        let (mut dev, rx) = pm1();
        dev.write(1, &PM1_POWER_OFF.to_le_bytes()); // crosses the end
        dev.write(0, &u32::from(PM1_POWER_OFF).to_le_bytes()); // too wide
        dev.write(2, &[0x20]);
        let mut wide = [0xaa; 4];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0; 4]);
        dev.read(u64::MAX, &mut []);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn i8042_reset_command_resets() {
        let (tx, rx) = channel();
        let mut kbd = I8042::new(tx);
        kbd.write(0, &[0x20]); // read controller configuration: ignored
        kbd.write(0, &[I8042_CMD_RESET, 0]); // wrong size
        kbd.write(1, &[I8042_CMD_RESET]);
        assert!(rx.try_recv().is_err());
        kbd.write(0, &[I8042_CMD_RESET]);
        assert_eq!(rx.try_recv(), Ok(PowerEvent::Reset));
        let mut status = [0xff];
        kbd.read(0, &mut status);
        assert_eq!(status, [0]);
    }

    #[test]
    fn a_gone_receiver_is_not_an_error() {
        let (tx, rx) = channel();
        drop(rx);
        let mut kbd = I8042::new(tx.clone());
        kbd.write(0, &[I8042_CMD_RESET]);
        let mut dev = Pm1Control::new(tx);
        dev.write(0, &PM1_POWER_OFF.to_le_bytes());
    }
}
