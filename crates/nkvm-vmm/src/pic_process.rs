//! `nkvm device --model pic`: a dual 8259 in its own process. Its master
//! and slave register windows are two I/O regions (ports 0x20-0x21 and
//! 0xa0-0xa1 for the guest), its input lines a pin region (a write of 1/0 at
//! offset N drives IRQ N), and its INTR output goes out on the APIC bus as
//! an ExtINT message carrying the vector of the INTA cycle, which the VM
//! delivers through LINT0 (virtual-wire mode).

use std::path::Path;
use std::process::ExitCode;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use nkvm_devices::pic::{Pic, SharedPic};
use nkvm_devices::{ApicBusSink, IoDevice};
use nkvm_wire::apic::{DeliveryMode, DestinationMode, InterruptMessage, TriggerMode};

use crate::bus_process::{listen, serve_region, spawn_bus, spawn_pins, spawn_region, Bus};
use crate::device::SPIN;

/// How often the INTA thread looks again at an INTR still up after an INTA.
const INTA_RETRY: Duration = Duration::from_millis(10);

/// The pin-control window: offset = IRQ, written value = level.
#[derive(Clone)]
struct Pins(SharedPic);

impl IoDevice for Pins {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.lock().set_irq(offset as usize, data.iter().any(|&b| b != 0));
    }
}

/// Paths of the PIC process's sockets.
#[derive(Debug)]
pub struct PicSockets<'a> {
    /// Master registers.
    pub master: &'a Path,
    /// Slave registers.
    pub slave: &'a Path,
    /// The APIC bus.
    pub bus: &'a Path,
    /// Input lines.
    pub pins: &'a Path,
}

/// Serves the PIC until its master register connection closes.
pub fn run(paths: &PicSockets<'_>) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let (master_l, slave_l) = (listen(paths.master)?, listen(paths.slave)?);
    let (bus_l, pins_l) = (listen(paths.bus)?, listen(paths.pins)?);
    let bus = Bus::default();
    // INTR rising is noticed under the PIC's lock; the INTA cycle runs on
    // its own thread so it can take that lock.
    let (intr_tx, intr_rx) = mpsc::channel::<()>();
    let pic = SharedPic::new(Pic::with_intr_line(Box::new(move |level: bool| {
        if level {
            let _ = intr_tx.send(());
        }
    })));
    let (wire_pic, mut wire_bus) = (pic.clone(), bus.clone());
    thread::spawn(move || {
        let mut pending = false;
        loop {
            // INTR can stay up after an INTA (auto-EOI sets no in-service
            // bit), or come up before the APIC bus is connected: no rising
            // edge says so, so it is looked at again after a retry interval.
            let woke = if pending {
                intr_rx.recv_timeout(INTA_RETRY)
            } else {
                intr_rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected)
            };
            if woke == Err(mpsc::RecvTimeoutError::Disconnected) {
                return;
            }
            if !wire_bus.connected() {
                // No INTA before the vector can go anywhere: INTR stays up
                // (the 8259 holds the request) until the VM side connects.
                pending = true;
                continue;
            }
            let vector = {
                let mut p = wire_pic.lock();
                if !p.has_interrupt() {
                    pending = false;
                    continue;
                }
                let vector = p.acknowledge();
                pending = p.has_interrupt();
                vector
            };
            wire_bus.send(InterruptMessage {
                destination: 0,
                destination_mode: DestinationMode::Physical,
                delivery_mode: DeliveryMode::ExtInt,
                vector,
                trigger_mode: TriggerMode::Edge,
                level: true,
            });
        }
    });
    // The 8259's EOI is a port write, not an APIC-bus message.
    spawn_bus(bus_l, bus, |_| {});
    spawn_pins(pins_l, Pins(pic.clone()), 16);
    spawn_region(slave_l, pic.slave_port(), SPIN);
    serve_region(&master_l, &mut pic.master_port(), SPIN)?;
    for p in [paths.master, paths.slave, paths.bus, paths.pins] {
        let _ = std::fs::remove_file(p);
    }
    Ok(ExitCode::SUCCESS)
}
