//! `nkvm device --model ioapic`: an IOAPIC in its own process, on three
//! sockets: its registers (I/O region), the APIC bus (interrupt messages
//! out, EOIs in) and its input pins (an I/O region where a write of 1 or 0
//! at offset N drives pin N, so devices in other processes can raise lines).

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::thread;

use nkvm_devices::ioapic::Ioapic;
use nkvm_devices::serve::Server;
use nkvm_devices::{ApicBusSink, IoDevice};
use nkvm_wire::apic::{self, ApicFrame, InterruptMessage};
use nkvm_wire::handshake::VersionRange;

use crate::device::{DeviceError, SPIN};

/// Sends the IOAPIC's messages on the APIC bus once it is connected.
#[derive(Clone, Default)]
struct Bus(Arc<Mutex<Option<UnixStream>>>);

impl ApicBusSink for Bus {
    fn send(&mut self, message: InterruptMessage) {
        let mut bus = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match bus.as_mut() {
            Some(s) => {
                if let Err(e) = s.write_all(&message.encode()) {
                    log::error!("APIC bus: {e}");
                }
            }
            None => log::warn!("interrupt {message:?} before the APIC bus connected: dropped"),
        }
    }
}

type SharedIoapic = Arc<Mutex<Ioapic<Bus>>>;

/// The pin-control window: offset = pin, written value = level.
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

fn listen(path: &Path) -> Result<UnixListener, DeviceError> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(|source| DeviceError::Listen { path: path.display().to_string(), source })
}

/// Serves the IOAPIC until its register connection closes.
pub fn run(regs: &Path, bus_path: &Path, pins: &Path) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let (regs_l, bus_l, pins_l) = (listen(regs)?, listen(bus_path)?, listen(pins)?);
    let bus = Bus::default();
    let ioapic: SharedIoapic = Arc::new(Mutex::new(Ioapic::new(bus.clone())));

    let eoi_target = ioapic.clone();
    thread::spawn(move || {
        let Ok((stream, _)) = bus_l.accept() else { return };
        let (Ok(mut r), mut w) = (stream.try_clone(), stream) else { return };
        if let Err(e) = apic::device_handshake(&mut r, &mut w, VersionRange::CURRENT) {
            log::error!("APIC-bus handshake: {e}");
            return;
        }
        *bus.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(w);
        loop {
            match apic::read_frame(&mut r) {
                Ok(Some(ApicFrame::Eoi(e))) => {
                    eoi_target.lock().unwrap_or_else(|p| p.into_inner()).end_of_interrupt(e.vector)
                }
                Ok(Some(other)) => return log::error!("APIC bus: unexpected {other:?}"),
                Ok(None) => return,
                Err(e) => return log::error!("APIC bus: {e}"),
            }
        }
    });
    let pin_target = ioapic.clone();
    thread::spawn(move || {
        let mut pins = Pins(pin_target);
        match Server::accept_spinning(&pins_l, SPIN) {
            Ok(mut server) => {
                if let Err(e) = server.serve(&mut pins) {
                    log::error!("pin connection: {e}");
                }
            }
            Err(e) => log::error!("pin connection: {e}"),
        }
    });
    let mut server = Server::accept_spinning(&regs_l, SPIN).map_err(DeviceError::Serve)?;
    let mut regs_dev = ioapic;
    server.serve(&mut regs_dev).map_err(DeviceError::Serve)?;
    for p in [regs, bus_path, pins] {
        let _ = std::fs::remove_file(p);
    }
    Ok(ExitCode::SUCCESS)
}
