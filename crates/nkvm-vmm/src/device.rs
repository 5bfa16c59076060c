//! `nkvm device`: one device model in its own process, behind an
//! I/O-region socket.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::ExitCode;

use nkvm_devices::cmos::Cmos;
use nkvm_devices::pc_testdev::IoRam;
use nkvm_devices::pins::RemotePins;
use nkvm_devices::pit::{Pit, PitPort, PitWindow, SharedPit};
use nkvm_devices::pm_timer::PmTimer;
use nkvm_devices::serial::Serial;
use nkvm_devices::serve::Server;
use nkvm_devices::test_device::TestDevice;
use nkvm_devices::{IoDevice, IrqLine};

use crate::cli::{DeviceArgs, DeviceModel};

mod console_channel;

/// How long the device polls for the next request before it blocks.
pub(crate) const SPIN: std::time::Duration = std::time::Duration::from_micros(200);

/// Errors of the device process.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Binding the socket path failed.
    #[error("cannot listen on {path}")]
    Listen {
        /// The path.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Opening the log failed.
    #[error("cannot open the access log {path}")]
    Log {
        /// The path.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The VM side broke the protocol or went away uncleanly.
    #[error("serving the I/O region failed")]
    Serve(#[source] nkvm_wire::WireError),
    /// `--irq-pins` with a model that has no interrupt line to give.
    #[error("--irq-pins: the {0} model has no interrupt line (pit and serial have)")]
    NoIrq(String),
    /// The controller's pin socket could not be used.
    #[error("--irq-pins")]
    Pins(#[source] nkvm_devices::pins::PinsError),
}

/// A device that appends every access to a shared log file.
struct Logged<D> {
    inner: D,
    name: String,
    log: File,
}

impl<D: IoDevice> Logged<D> {
    fn record(&mut self, kind: char, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        bytes[..data.len().min(8)].copy_from_slice(&data[..data.len().min(8)]);
        let line = format!("{} {kind} {offset:#x} {} {:#x}\n", self.name, data.len(), u64::from_le_bytes(bytes));
        // O_APPEND: one write per line keeps lines of several processes whole.
        if let Err(e) = self.log.write_all(line.as_bytes()) {
            log::warn!("access log: {e}");
        }
    }
}

impl<D: IoDevice> IoDevice for Logged<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.inner.read(offset, data);
        self.record('R', offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.record('W', offset, data);
        self.inner.write(offset, data);
    }
    fn save_state(&self) -> Option<Vec<u8>> {
        self.inner.save_state()
    }

    fn load_state(&mut self, state: &[u8]) -> Option<Result<(), String>> {
        self.inner.load_state(state)
    }
}

/// An interrupt line that leads nowhere.
fn unconnected() -> Box<dyn IrqLine> {
    Box::new(|_level: bool| {})
}

/// `--irq-pins`: the model's line as a pin of a controller in another
/// process; the pin defaults to the model's ISA IRQ.
fn irq_line(model: DeviceModel, pins: &Path, pin: Option<u32>) -> Result<Box<dyn IrqLine>, DeviceError> {
    let pin = match (model, pin) {
        (_, Some(pin)) => pin,
        (DeviceModel::Pit, None) => u32::try_from(nkvm_devices::pit::PIT_IRQ).unwrap_or(0),
        (DeviceModel::Serial, None) => 4,
        (other, None) => return Err(DeviceError::NoIrq(format!("{other:?}").to_lowercase())),
    };
    if !matches!(model, DeviceModel::Pit | DeviceModel::Serial) {
        return Err(DeviceError::NoIrq(format!("{model:?}").to_lowercase()));
    }
    // Only as many pins as needed: the controller serves any count up to
    // its own, and refuses pins past it.
    let remote = RemotePins::connect(pins, pin + 1).map_err(DeviceError::Pins)?;
    Ok(Box::new(remote.line(pin).map_err(DeviceError::Pins)?))
}

/// A PIT whose counter 0 drives its line on time: the counters' window,
/// and the model shared with the thread that polls it.
struct TimedPit {
    port: PitPort,
    pit: SharedPit,
    /// Wakes the polling thread (the model changed under it).
    poke: std::sync::mpsc::Sender<()>,
}

impl IoDevice for TimedPit {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.port.read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.port.write(offset, data);
    }

    fn save_state(&self) -> Option<Vec<u8>> {
        self.pit.lock().save_state()
    }

    fn load_state(&mut self, state: &[u8]) -> Option<Result<(), String>> {
        let loaded = self.pit.lock().load_state(state);
        let _ = self.poke.send(());
        loaded
    }
}

/// A PIT whose counter 0 drives `irq`, polled on time by a thread of its
/// own (as the VMM's `pit` thread does for the PIT in its process).
fn pit_with_timer(irq: Box<dyn IrqLine>) -> io::Result<TimedPit> {
    let pit = SharedPit::new(Pit::new(irq));
    let (poke, polls) = std::sync::mpsc::channel();
    let writes = poke.clone();
    let port = pit.port(
        PitWindow::Counters,
        Box::new(move || {
            let _ = writes.send(());
        }),
    );
    crate::firmware::spawn_pit_timer(pit.clone(), polls)?;
    Ok(TimedPit { port, pit, poke })
}

/// Serves one connection on `args.socket`, then exits.
pub fn run(args: &DeviceArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    match (args.model, &args.apic_bus, &args.pins, &args.slave) {
        (DeviceModel::Ioapic, Some(bus), Some(pins), _) => return crate::ioapic_process::run(&args.socket, bus, pins),
        (DeviceModel::Pic, Some(bus), Some(pins), Some(slave)) => {
            let paths = crate::pic_process::PicSockets { master: &args.socket, slave, bus, pins };
            return crate::pic_process::run(&paths);
        }
        (DeviceModel::VirtioBlk | DeviceModel::VirtioConsole, ..) => return crate::virtio_process::run(args),
        _ => {}
    }
    let irq = match &args.irq_pins {
        Some(path) => Some(irq_line(args.model, path, args.irq_pin)?),
        None => None,
    };
    let model: Box<dyn IoDevice> = match args.model {
        DeviceModel::Test => Box::new(TestDevice::new()),
        DeviceModel::Serial if args.console_channel => Box::new(console_channel::serial()?),
        DeviceModel::Serial => Box::new(Serial::new(irq.unwrap_or_else(unconnected), io::stdout())),
        DeviceModel::Cmos => Box::new(Cmos::new()),
        DeviceModel::PmTimer => Box::new(PmTimer::new()),
        DeviceModel::IoRam => Box::new(IoRam::new()),
        // Counter 0's edges need a thread that polls the model on time
        // (and again after each guest write); without --irq-pins nothing
        // listens, and the counters only count and read back.
        DeviceModel::Pit => match irq {
            Some(line) => Box::new(pit_with_timer(line)?),
            None => Box::new(Pit::new(unconnected())),
        },
        // Checked above; clap requires --apic-bus and --pins with it.
        DeviceModel::Ioapic | DeviceModel::Pic | DeviceModel::VirtioBlk | DeviceModel::VirtioConsole => {
            return Err("the ioapic and pic models need --apic-bus and --pins (and --slave for pic)".into())
        }
    };
    let mut device: Box<dyn IoDevice> = match &args.log {
        Some(log) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .map_err(|source| DeviceError::Log { path: log.display().to_string(), source })?;
            let name = args.name.clone().unwrap_or_else(|| format!("{:?}", args.model).to_lowercase());
            Box::new(Logged { inner: model, name, log: file })
        }
        None => model,
    };
    // Listening last: a model that cannot be built leaves no socket behind.
    let path = args.socket.display().to_string();
    let _ = std::fs::remove_file(&args.socket);
    let listener =
        UnixListener::bind(&args.socket).map_err(|source| DeviceError::Listen { path: path.clone(), source })?;
    let mut server = Server::accept_spinning(&listener, SPIN).map_err(DeviceError::Serve)?;
    let _ = std::fs::remove_file(&args.socket);
    let stats = server.serve(&mut *device).map_err(DeviceError::Serve)?;
    log::info!("device on {path} done: {stats:?}");
    Ok(ExitCode::SUCCESS)
}
