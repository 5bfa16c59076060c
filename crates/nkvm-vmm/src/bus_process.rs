//! Plumbing shared by the interrupt-controller device processes: listening
//! sockets, the device end of the APIC bus, and serving I/O regions on
//! threads.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;

use nkvm_devices::serve::Server;
use nkvm_devices::{ApicBusSink, IoDevice};
use nkvm_wire::apic::{self, ApicFrame, InterruptMessage};
use nkvm_wire::handshake::VersionRange;

use crate::device::{DeviceError, SPIN};

/// The device end of the APIC bus: messages go out once it is connected.
#[derive(Clone, Default)]
pub struct Bus(Arc<Mutex<Option<UnixStream>>>);

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

/// Binds `path` (replacing a stale socket file).
pub fn listen(path: &Path) -> Result<UnixListener, DeviceError> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(|source| DeviceError::Listen { path: path.display().to_string(), source })
}

/// Accepts the APIC-bus connection on a thread, handshakes, plugs it into
/// `bus` and passes each EOI it brings to `on_eoi`.
pub fn spawn_bus(listener: UnixListener, bus: Bus, mut on_eoi: impl FnMut(u8) + Send + 'static) {
    thread::spawn(move || {
        let Ok((stream, _)) = listener.accept() else { return };
        let (Ok(mut r), mut w) = (stream.try_clone(), stream) else { return };
        if let Err(e) = apic::device_handshake(&mut r, &mut w, VersionRange::CURRENT) {
            return log::error!("APIC-bus handshake: {e}");
        }
        *bus.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(w);
        loop {
            match apic::read_frame(&mut r) {
                Ok(Some(ApicFrame::Eoi(e))) => on_eoi(e.vector),
                Ok(Some(other)) => return log::error!("APIC bus: unexpected {other:?}"),
                Ok(None) => return,
                Err(e) => return log::error!("APIC bus: {e}"),
            }
        }
    });
}

/// Serves one I/O-region connection on `listener` with `device`, on a thread.
pub fn spawn_region(listener: UnixListener, mut device: impl IoDevice + 'static) {
    thread::spawn(move || {
        if let Err(e) = serve_region(&listener, &mut device) {
            log::error!("I/O region: {e}");
        }
    });
}

/// Serves one I/O-region connection on `listener` with `device`, here.
pub fn serve_region(listener: &UnixListener, device: &mut dyn IoDevice) -> Result<(), DeviceError> {
    let mut server = Server::accept_spinning(listener, SPIN).map_err(DeviceError::Serve)?;
    server.serve(device).map_err(DeviceError::Serve)?;
    Ok(())
}
