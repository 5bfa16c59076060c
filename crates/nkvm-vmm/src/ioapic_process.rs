//! `nkvm device --model ioapic`: an IOAPIC in its own process, on three
//! sockets: its registers (I/O region), the APIC bus (interrupt messages
//! out, EOIs in) and its input pins (an I/O region where a write of 1 or 0
//! at offset N drives pin N, so devices in other processes can raise lines).

use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use nkvm_devices::ioapic::{Ioapic, IOAPIC_PINS};
use nkvm_devices::IoDevice;

use crate::bus_process::{listen, serve_region, spawn_bus, spawn_pins, Bus};
use crate::device::SPIN;

type SharedIoapic = Arc<Mutex<Ioapic<Bus>>>;

/// The pin-control window: offset = pin, written value = level.
#[derive(Clone)]
struct Pins(SharedIoapic);

impl IoDevice for Pins {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let level = data.iter().any(|&b| b != 0);
        self.0.lock().unwrap_or_else(|p| p.into_inner()).set_irq(offset as usize, level);
    }
}

/// Serves the IOAPIC until its register connection closes.
pub fn run(regs: &Path, bus_path: &Path, pins: &Path) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let (regs_l, bus_l, pins_l) = (listen(regs)?, listen(bus_path)?, listen(pins)?);
    let bus = Bus::default();
    let ioapic: SharedIoapic = Arc::new(Mutex::new(Ioapic::new(bus.clone())));
    let eoi_target = ioapic.clone();
    spawn_bus(bus_l, bus, move |vector| eoi_target.lock().unwrap_or_else(|p| p.into_inner()).end_of_interrupt(vector));
    spawn_pins(pins_l, Pins(ioapic.clone()), IOAPIC_PINS as u64);
    let mut regs_dev = ioapic;
    serve_region(&regs_l, &mut regs_dev, SPIN)?;
    for p in [regs, bus_path, pins] {
        let _ = std::fs::remove_file(p);
    }
    Ok(ExitCode::SUCCESS)
}
