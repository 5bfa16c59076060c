//! The input pins of an interrupt controller in another process
//! (`nkvm device --model ioapic` or `--model pic`, their `--pins` socket),
//! as [`IrqLine`]s: how a device model outside the controller's process
//! raises its interrupt.
//!
//! The pin socket is an I/O region (`docs/wire-format.md`, "Input pins"):
//! a write of 1 or 0 at offset N drives pin N. A [`PinLine`] sends *posted*
//! writes: a device raising a line waits for nothing, as on a wire, and an
//! edge ([`IrqLine::pulse`]) is both of its writes in one send. The
//! controller serves one connection's writes in order, so the levels it
//! sees are the levels the device set. [`RemotePins::sync`] waits until
//! everything sent before has been taken, for the rare caller that must
//! know (a test, or a device saving its state).
//!
//! A line cannot report an error to the device model that drives it: when
//! the socket breaks (the controller's process died), the first failed
//! send is logged, later changes are dropped, and [`RemotePins::failure`]
//! names what happened.
//!
//! ```no_run
//! use nkvm_devices::pins::RemotePins;
//! use nkvm_devices::IrqLine;
//!
//! // An IOAPIC started as `nkvm device --model ioapic ... --pins /run/nkvm/pins`.
//! let pins = RemotePins::connect("/run/nkvm/pins".as_ref(), 24)?;
//! let com1 = pins.line(4)?;
//! com1.pulse(); // one rising edge on pin 4, nothing waited for
//! # Ok::<(), nkvm_devices::pins::PinsError>(())
//! ```

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use nkvm_wire::ioregion::{AccessSize, Client, RegionInfo, Space};
use nkvm_wire::WireError;

use crate::bus::IrqLine;

/// Errors of a pin socket's client.
#[derive(Debug, thiserror::Error)]
pub enum PinsError {
    /// Nothing accepts connections at the path.
    #[error("cannot connect to the pin socket {path}: {source} (is the controller's process running?)")]
    Connect {
        /// The socket's path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The controller refused the connection or spoke another protocol.
    #[error("the pin socket's handshake failed: {0}")]
    Handshake(#[source] WireError),
    /// A line past the controller's last pin.
    #[error("pin {pin} does not exist: the controller has pins 0-{}", .pins - 1)]
    NoSuchPin {
        /// The pin asked for.
        pin: u32,
        /// How many the controller has.
        pins: u32,
    },
    /// The socket broke (the controller's process is gone).
    #[error("the pin socket failed: {0}")]
    Lost(String),
}

/// The client and what broke it, if anything did.
#[derive(Debug)]
struct Link {
    client: Client<UnixStream, UnixStream>,
    failure: Option<String>,
}

/// A connection to an interrupt controller's input pins; hands out a
/// [`PinLine`] per pin, all sending on this one connection (in order).
#[derive(Debug, Clone)]
pub struct RemotePins {
    link: Arc<Mutex<Link>>,
    pins: u32,
}

impl RemotePins {
    /// Connects to the pin socket at `path` of a controller with `pins`
    /// inputs (24 for nkvm's IOAPIC, 16 for its dual 8259).
    ///
    /// # Errors
    ///
    /// [`PinsError::Connect`] naming the path, [`PinsError::Handshake`].
    pub fn connect(path: &Path, pins: u32) -> Result<RemotePins, PinsError> {
        let stream =
            UnixStream::connect(path).map_err(|source| PinsError::Connect { path: path.to_owned(), source })?;
        RemotePins::over(stream, pins)
    }

    /// Speaks the pin protocol over a connected stream socket.
    ///
    /// # Errors
    ///
    /// [`PinsError::Handshake`].
    pub fn over(stream: UnixStream, pins: u32) -> Result<RemotePins, PinsError> {
        let region = RegionInfo { id: 0, space: Space::Mmio, base: 0, len: u64::from(pins) };
        let client = Client::over(stream, region).map_err(PinsError::Handshake)?;
        Ok(RemotePins { link: Arc::new(Mutex::new(Link { client, failure: None })), pins })
    }

    /// The line driving `pin`.
    ///
    /// # Errors
    ///
    /// [`PinsError::NoSuchPin`] past the controller's last pin.
    pub fn line(&self, pin: u32) -> Result<PinLine, PinsError> {
        if pin >= self.pins {
            return Err(PinsError::NoSuchPin { pin, pins: self.pins });
        }
        Ok(PinLine { link: self.link.clone(), pin: u64::from(pin) })
    }

    /// Returns once the controller has taken every change sent before.
    ///
    /// # Errors
    ///
    /// [`PinsError::Lost`] if the socket broke, now or earlier.
    pub fn sync(&self) -> Result<(), PinsError> {
        let mut link = lock(&self.link);
        if let Some(failure) = &link.failure {
            return Err(PinsError::Lost(failure.clone()));
        }
        link.client.sync().map_err(|e| link.fail(e))
    }

    /// What broke the socket, once something has.
    pub fn failure(&self) -> Option<String> {
        lock(&self.link).failure.clone()
    }
}

/// One input pin of a controller in another process, as a device model's
/// interrupt line; see the [module documentation](self).
#[derive(Debug, Clone)]
pub struct PinLine {
    link: Arc<Mutex<Link>>,
    pin: u64,
}

impl PinLine {
    /// Posts `levels` in order, in one send.
    fn send(&self, levels: &[bool]) {
        let mut link = lock(&self.link);
        if link.failure.is_some() {
            return;
        }
        let Link { client, .. } = &mut *link;
        let sent = levels.iter().try_for_each(|&level| client.post(self.pin, AccessSize::Byte, u64::from(level)));
        if let Err(e) = sent.and_then(|()| link.client.flush()) {
            let why = link.fail(e);
            log::error!("pin {}: {why}; later changes of the controller's pins are dropped", self.pin);
        }
    }
}

impl IrqLine for PinLine {
    fn set_level(&self, level: bool) {
        self.send(&[level]);
    }

    fn pulse(&self) {
        self.send(&[true, false]);
    }
}

impl Link {
    /// Records `e` as what broke the link; returns it as an error.
    fn fail(&mut self, e: WireError) -> PinsError {
        let why = e.to_string();
        self.failure = Some(why.clone());
        PinsError::Lost(why)
    }
}

fn lock(link: &Mutex<Link>) -> MutexGuard<'_, Link> {
    // A panic elsewhere while holding the lock leaves the link usable.
    link.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::IoDevice;
    use crate::serve::Server;

    /// Records every write it serves.
    struct Recorder(Seen);

    impl IoDevice for Recorder {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }

        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((offset, data[0]));
        }
    }

    /// The (pin, level) writes a server took, in order.
    type Seen = Arc<Mutex<Vec<(u64, u8)>>>;

    fn served() -> (RemotePins, Seen, std::thread::JoinHandle<()>) {
        let (vm_end, device_end) = UnixStream::pair().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut device = Recorder(seen.clone());
        let server = std::thread::spawn(move || {
            let mut server = Server::over(device_end).unwrap();
            let _ = server.serve(&mut device);
        });
        (RemotePins::over(vm_end, 24).unwrap(), seen, server)
    }

    #[test]
    fn lines_post_their_levels_in_order_and_a_pulse_is_an_edge() {
        let (pins, seen, server) = served();
        let (a, b) = (pins.line(5).unwrap(), pins.line(23).unwrap());
        a.set_level(true);
        b.pulse();
        a.set_level(false);
        pins.sync().unwrap();
        assert_eq!(*seen.lock().unwrap(), [(5, 1), (23, 1), (23, 0), (5, 0)]);
        drop((a, b, pins));
        server.join().unwrap();
    }

    #[test]
    fn a_pin_past_the_last_is_refused_by_name() {
        let (pins, _, _) = served();
        let e = pins.line(24).unwrap_err();
        assert!(matches!(e, PinsError::NoSuchPin { pin: 24, pins: 24 }));
        assert_eq!(e.to_string(), "pin 24 does not exist: the controller has pins 0-23");
    }

    #[test]
    fn a_missing_socket_is_named() {
        let path = std::env::temp_dir().join(format!("nkvm-no-pins-{}", std::process::id()));
        let e = RemotePins::connect(&path, 24).unwrap_err();
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    }

    #[test]
    fn a_dead_controller_is_reported_once_and_later_changes_are_dropped() {
        let (vm_end, device_end) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            drop(Server::over(device_end).unwrap());
        });
        let pins = RemotePins::over(vm_end, 24).unwrap();
        server.join().unwrap();
        let line = pins.line(1).unwrap();
        // The first send may still land in the socket buffer; keep going
        // until the broken socket is noticed.
        for _ in 0..100 {
            line.pulse();
            if pins.failure().is_some() {
                break;
            }
        }
        assert!(pins.failure().is_some(), "a closed peer was never noticed");
        line.pulse();
        assert!(matches!(pins.sync(), Err(PinsError::Lost(_))));
    }
}
