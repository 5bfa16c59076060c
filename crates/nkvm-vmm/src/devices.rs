//! Placing device models: in the VMM process (an nkvm I/O handler) or each
//! in its own process (`nkvm device`, behind an I/O-region socket). The
//! model code is the same either way.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use nkvm::io::{IoHandler, IoRange, Ordering, RegionId, SocketOptions};
use nkvm::Vm;
use nkvm_devices::{IoDevice, IrqLine};

use crate::cli::DeviceModel;
use crate::console::{PanicWatch, WatchedConsole};
use crate::saved::{LoadError, SavedDevice};

/// An nkvm-devices model as an in-process nkvm handler.
pub struct InProcess<D>(pub D);

impl<D: IoDevice> IoHandler for InProcess<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.write(offset, data);
    }
}

/// Errors starting a device process.
#[derive(Debug, thiserror::Error)]
pub enum DeviceProcessError {
    /// The process could not be started.
    #[error("cannot start the {model:?} device process")]
    Spawn {
        /// Which model.
        model: DeviceModel,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// It never listened on its socket.
    #[error("the {model:?} device process did not listen on {path} within 10 s")]
    NoSocket {
        /// Which model.
        model: DeviceModel,
        /// The socket path.
        path: String,
    },
    /// Attaching its region failed.
    #[error(transparent)]
    Attach(#[from] nkvm::IoRegionError),
}

/// A device model running in a child process; killed when dropped.
#[derive(Debug)]
pub struct DeviceProcess {
    child: Child,
    socket: PathBuf,
    /// The region its socket serves.
    region: RegionId,
    /// The threads serving a serial console: one copies the child's output
    /// through a [`WatchedConsole`], one pulses the UART's interrupt line
    /// for the child (docs/wire-format.md, "Console channel"). Joined on
    /// drop, after the child ends, so every line it wrote has been seen.
    console: Vec<std::thread::JoinHandle<()>>,
}

impl DeviceProcess {
    /// Starts `nkvm device --model MODEL` and attaches its socket to `range`.
    pub fn attach(vm: &Vm, model: DeviceModel, range: IoRange, ordering: Ordering) -> Result<Self, DeviceProcessError> {
        Self::start(vm, model, range, ordering, None)
    }

    /// Starts the 16550 in its own process (`nkvm device --model serial
    /// --console-channel`), as interactive as one in process:
    /// - its output (the guest's console) is copied to this process's
    ///   stdout through a [`WatchedConsole`], so a guest kernel's panic is
    ///   seen as it is with the serial port in process;
    /// - every interrupt the UART raises pulses `irq`;
    /// - the bytes written to the returned channel are the guest's input
    ///   (hand it to [`crate::terminal::spawn_input`]).
    pub fn attach_console(
        vm: &Vm,
        range: IoRange,
        watch: PanicWatch,
        irq: Box<dyn IrqLine>,
    ) -> Result<(Self, UnixStream), DeviceProcessError> {
        let spawn = |source| DeviceProcessError::Spawn { model: DeviceModel::Serial, source };
        let (ours, theirs) = UnixStream::pair().map_err(spawn)?;
        let console = Console { watch, channel: theirs.into() };
        let mut process = Self::start(vm, DeviceModel::Serial, range, Ordering::Sync, Some(console))?;
        let mut pulses = ours.try_clone().map_err(spawn)?;
        let pulse = std::thread::Builder::new().name("console-irq".into()).spawn(move || {
            // One byte per interrupt; ends at EOF, when the child has ended.
            let mut buf = [0u8; 64];
            while let Ok(n @ 1..) = pulses.read(&mut buf) {
                for _ in 0..n {
                    irq.pulse();
                }
            }
        });
        process.console.push(pulse.map_err(spawn)?);
        Ok((process, ours))
    }

    fn start(
        vm: &Vm,
        model: DeviceModel,
        range: IoRange,
        ordering: Ordering,
        console: Option<Console>,
    ) -> Result<Self, DeviceProcessError> {
        let exe = std::env::current_exe().map_err(|source| DeviceProcessError::Spawn { model, source })?;
        let socket = std::env::temp_dir().join(format!("nkvm-{}-{model:?}.sock", std::process::id()).to_lowercase());
        // The name `nkvm device --model` takes (clap's spelling: pm-timer).
        let model_arg = clap::ValueEnum::to_possible_value(&model)
            .map_or_else(|| format!("{model:?}").to_lowercase(), |v| v.get_name().to_string());
        let mut command = Command::new(exe);
        command.args(["device", "--model", &model_arg, "--socket"]).arg(&socket);
        let watch = console.map(|Console { watch, channel }| {
            command.arg("--console-channel").stdin(Stdio::from(channel)).stdout(Stdio::piped());
            watch
        });
        let mut child = command.spawn().map_err(|source| DeviceProcessError::Spawn { model, source })?;
        let console = match (watch, child.stdout.take()) {
            (Some(watch), Some(mut output)) => {
                let copy = std::thread::Builder::new().name("console".into()).spawn(move || {
                    let mut console = WatchedConsole::new(std::io::stdout(), watch);
                    // Each read passed on at once, as the in-process UART
                    // does (a prompt has no newline). Ends at EOF, when the
                    // child has ended.
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = output.read(&mut buf) {
                        if console.write_all(&buf[..n]).and_then(|()| console.flush()).is_err() {
                            break;
                        }
                    }
                });
                vec![copy.map_err(|source| DeviceProcessError::Spawn { model, source })?]
            }
            _ => Vec::new(),
        };
        let mut process = DeviceProcess { child, socket, console, region: RegionId(0) };
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(&process.socket) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
                Err(_) => {
                    return Err(DeviceProcessError::NoSocket { model, path: process.socket.display().to_string() })
                }
            }
        };
        let options =
            SocketOptions { ordering, name: Some(format!("{model_arg} device process")), ..Default::default() };
        process.region = vm.attach_region_with(range, stream, options)?;
        Ok(process)
    }

    /// The process's model as a machine's saved device: its state is asked
    /// for, and given back, over the region's socket
    /// ([`Vm::region_state`], [`Vm::region_load_state`]).
    pub fn saved(&self, vm: &Arc<Vm>) -> Arc<dyn SavedDevice> {
        Arc::new(ProcessState { vm: Arc::downgrade(vm), region: self.region })
    }
}

/// What a serial console process is started with.
struct Console {
    /// Watches its output for a kernel panic.
    watch: PanicWatch,
    /// The child's end of the console channel: its stdin.
    channel: OwnedFd,
}

/// A device process's model in a machine's saved devices.
struct ProcessState {
    vm: Weak<Vm>,
    region: RegionId,
}

impl SavedDevice for ProcessState {
    fn save(&self) -> Result<Vec<u8>, String> {
        let vm = self.vm.upgrade().ok_or("the VM is gone")?;
        vm.region_state(self.region).map_err(|e| crate::machine::intake::chain(&e))
    }

    fn restore(&self, name: &str, blob: &[u8]) -> Result<(), LoadError> {
        let process = |why: String| LoadError::Process { name: name.to_string(), why };
        let vm = self.vm.upgrade().ok_or_else(|| process("the VM is gone".into()))?;
        vm.region_load_state(self.region, blob).map_err(|e| process(crate::machine::intake::chain(&e)))
    }
}

impl Drop for DeviceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for thread in self.console.drain(..) {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}
