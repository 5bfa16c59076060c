//! Plumbing shared by the interrupt-controller device processes: listening
//! sockets, the device end of the APIC bus, and serving I/O regions on
//! threads.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;

use nkvm_devices::serve::Server;
use nkvm_devices::{ApicBusSink, IoDevice};
use nkvm_wire::apic::{self, ApicFrame, InterruptMessage};
use nkvm_wire::handshake::VersionRange;
use nkvm_wire::spin::SpinStream;
use nkvm_wire::WireError;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::device::DeviceError;

/// The device end of the APIC bus: messages go out once it is connected,
/// each through the fast path the VM side gave it, if it has one (protocol
/// version 2: an eventfd write, no VMM thread in between), or on the
/// socket.
#[derive(Clone, Default)]
pub struct Bus(Arc<Mutex<Option<Connected>>>);

/// A connected bus.
struct Connected {
    stream: UnixStream,
    /// The eventfds the VM side offered, by the message each delivers.
    fast: HashMap<InterruptMessage, File>,
}

impl Bus {
    /// Whether a VM side is connected (its handshake done).
    pub fn connected(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }
}

impl ApicBusSink for Bus {
    fn send(&mut self, message: InterruptMessage) {
        let mut bus = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let Some(bus) = bus.as_mut() else {
            return log::warn!("interrupt {message:?} with no APIC bus connected (not yet, or no longer): dropped");
        };
        if let Some(mut eventfd) = bus.fast.get(&message) {
            match eventfd.write_all(&1u64.to_ne_bytes()) {
                Ok(()) => return,
                // The socket still delivers it.
                Err(e) => log::warn!("APIC bus: the fast path of {message:?} failed: {e}"),
            }
        }
        if let Err(e) = bus.stream.write_all(&message.encode()) {
            log::error!("APIC bus: {e}");
        }
    }
}

/// The bus socket read with `recvmsg`, keeping the descriptors that come
/// with fast-path frames, in order.
struct FdReader {
    stream: UnixStream,
    fds: VecDeque<File>,
}

impl Read for FdReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (n, fd) = self.stream.recv_with_fd(buf).map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        self.fds.extend(fd);
        Ok(n)
    }
}

/// Binds `path` (replacing a stale socket file).
pub fn listen(path: &Path) -> Result<UnixListener, DeviceError> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(|source| DeviceError::Listen { path: path.display().to_string(), source })
}

/// Accepts the APIC-bus connection on a thread, handshakes, plugs it into
/// `bus` and passes each EOI it brings to `on_eoi`; keeps the fast paths
/// the VM side offers.
pub fn spawn_bus(listener: UnixListener, bus: Bus, mut on_eoi: impl FnMut(u8) + Send + 'static) {
    thread::spawn(move || {
        let Ok((stream, _)) = listener.accept() else { return };
        let (Ok(reader), mut w) = (stream.try_clone(), stream) else { return };
        let mut r = FdReader { stream: reader, fds: VecDeque::new() };
        let version = match apic::device_handshake(&mut r, &mut w, VersionRange::APIC_BUS) {
            Ok(handshake) => handshake.version,
            Err(e) => return log::error!("APIC-bus handshake: {e}"),
        };
        *bus.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(Connected { stream: w, fast: HashMap::new() });
        let ended = loop {
            match apic::read_frame(&mut r) {
                Ok(Some(ApicFrame::Eoi(e))) => on_eoi(e.vector),
                // Fast paths are version 2: a version-1 peer that sends
                // one does not speak the protocol it agreed to.
                Ok(Some(ApicFrame::FastPath(m))) if version < 2 => {
                    break Some(format!("a fast path for {m:?} on a version-{version} bus"));
                }
                Ok(Some(ApicFrame::FastPath(m))) => {
                    let Some(eventfd) = r.fds.pop_front() else {
                        break Some(format!("a fast path for {m:?} came without its eventfd"));
                    };
                    if let Some(bus) = bus.0.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                        bus.fast.insert(m, eventfd);
                    }
                }
                Ok(Some(other)) => break Some(format!("unexpected {other:?}")),
                Ok(None) => break None,
                Err(e) => break Some(e.to_string()),
            }
        };
        if let Some(why) = ended {
            log::error!("APIC bus: {why}: closed");
        }
        // Closed both ways (and its fast paths dropped): the VM side sees
        // the end, and later interrupts are dropped here, not written into
        // a socket nobody reads.
        if let Some(connected) = bus.0.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = connected.stream.shutdown(std::net::Shutdown::Both);
        }
    });
}

/// How long a pin socket's server polls for the next change before it
/// blocks. Nobody waits on a pin write (devices post them), so a long poll
/// buys nothing and, on a host with few CPUs, holds back the threads a
/// raised interrupt wakes (the vCPU, the device): the scheduler lets a
/// freshly woken thread wait while the poller spins. A short poll still
/// takes an edge's second write, or a burst from several devices, without
/// a wake-up each. Measured by `benches/interrupt_latency.rs` (docs/benchmarks.md).
pub const PIN_SPIN: std::time::Duration = std::time::Duration::from_micros(20);

/// Serves one I/O-region connection on `listener` with `device`, on a
/// thread, polling for `spin` before each blocking read.
pub fn spawn_region(listener: UnixListener, mut device: impl IoDevice + 'static, spin: std::time::Duration) {
    thread::spawn(move || {
        if let Err(e) = serve_region(&listener, &mut device, spin) {
            log::error!("I/O region: {e}");
        }
    });
}

/// Serves the pin socket of a controller with `pins` inputs: every client
/// (each device process driving its own lines, and a restarted one again)
/// on a thread of its own, at most [`MAX_PIN_CLIENTS`] at once; a write at
/// offset N drives pin N. A client that fails the handshake (closes, sends
/// garbage, or sends nothing for [`PIN_HANDSHAKE_TIMEOUT`]), asks for more
/// pins, or comes past the limit is told so in this process's log and
/// closed; the others are served on.
pub fn spawn_pins(listener: UnixListener, device: impl IoDevice + Clone + 'static, pins: u64) {
    let clients = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    thread::spawn(move || loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => return log::error!("pin socket: accept failed: {e}"),
        };
        let client = PinClient::admit(&clients);
        if client.is_none() {
            log::error!("pin socket: {MAX_PIN_CLIENTS} clients are connected already: closed");
            continue;
        }
        let mut device = device.clone();
        thread::spawn(move || {
            let _client = client;
            let mut server = match pin_handshake(stream) {
                Ok(server) => server,
                Err(e) => return log::error!("pin socket: a client failed the handshake ({e}): closed"),
            };
            let asked = server.region().len;
            if asked > pins {
                return log::error!(
                    "pin socket: a client asked for {asked} pins, this controller has {pins} (0-{}): closed",
                    pins - 1
                );
            }
            if let Err(e) = server.serve(&mut device) {
                log::error!("pin socket: {e}");
            }
        });
    });
}

/// How many pin clients a controller serves at once.
pub const MAX_PIN_CLIENTS: usize = 32;

/// A pin client's place among the [`MAX_PIN_CLIENTS`], given back when
/// it is dropped.
struct PinClient(Arc<std::sync::atomic::AtomicUsize>);

impl PinClient {
    fn admit(count: &Arc<std::sync::atomic::AtomicUsize>) -> Option<PinClient> {
        use std::sync::atomic::Ordering::SeqCst;
        count.fetch_update(SeqCst, SeqCst, |n| (n < MAX_PIN_CLIENTS).then_some(n + 1)).ok()?;
        Some(PinClient(count.clone()))
    }
}

impl Drop for PinClient {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// How long a pin client may take to send its hello.
pub const PIN_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The device side of a pin client's handshake, bounded in time; the
/// connection then waits as long as it takes for pin changes.
fn pin_handshake(stream: UnixStream) -> Result<Server<SpinStream, SpinStream>, WireError> {
    let control = stream.try_clone()?;
    control.set_read_timeout(Some(PIN_HANDSHAKE_TIMEOUT))?;
    let (reader, writer) = SpinStream::pair(stream, PIN_SPIN)?;
    let server = Server::handshake(reader, writer, VersionRange::IO_REGION)?;
    control.set_read_timeout(None)?;
    Ok(server)
}

/// Serves one I/O-region connection on `listener` with `device`, here,
/// polling for `spin` before each blocking read.
pub fn serve_region(
    listener: &UnixListener,
    device: &mut dyn IoDevice,
    spin: std::time::Duration,
) -> Result<(), DeviceError> {
    let mut server = Server::accept_spinning(listener, spin).map_err(DeviceError::Serve)?;
    server.serve(device).map_err(DeviceError::Serve)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nkvm_wire::apic::{DeliveryMode, DestinationMode, TriggerMode};
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    /// The VM end of a bus served by `spawn_bus` (and the device end's
    /// `Bus`), handshake done with `offered`.
    fn vm_end(dir: &str, offered: VersionRange) -> (UnixStream, Bus) {
        let path = std::env::temp_dir().join(format!("nkvm-bus-{dir}-{}", std::process::id()));
        let listener = listen(&path).unwrap();
        let bus = Bus::default();
        spawn_bus(listener, bus.clone(), |_| {});
        let stream = UnixStream::connect(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let (mut r, mut w) = (stream.try_clone().unwrap(), stream.try_clone().unwrap());
        apic::vm_handshake(&mut r, &mut w, 1, offered).unwrap();
        (stream, bus)
    }

    const EDGE: InterruptMessage = InterruptMessage {
        destination: 0,
        destination_mode: DestinationMode::Physical,
        delivery_mode: DeliveryMode::Fixed,
        vector: 0x40,
        trigger_mode: TriggerMode::Edge,
        level: true,
    };

    /// A fast-path offer for [`EDGE`], its eventfd attached, on `stream`;
    /// returns the eventfd.
    fn offer(stream: &UnixStream) -> vmm_sys_util::eventfd::EventFd {
        let evt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let frame = EDGE.encode_fast_path();
        assert_eq!(stream.send_with_fd(&frame[..], evt.as_raw_fd()).unwrap(), frame.len());
        evt
    }

    #[test]
    fn a_fast_path_offer_on_a_version_1_bus_closes_it() {
        let (mut v1, _) = vm_end("v1", VersionRange::CURRENT);
        offer(&v1);
        assert_eq!(v1.read(&mut [0u8; 16]).expect("the bus was left open"), 0, "the device side closed it");
        // On a version-2 bus the same offer is taken: the message then goes
        // through its eventfd, not the socket, and the bus stays.
        let (mut v2, mut bus) = vm_end("v2", VersionRange::APIC_BUS);
        let evt = offer(&v2);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            bus.send(EDGE);
            std::thread::sleep(Duration::from_millis(10));
            if evt.read().is_ok() {
                break;
            }
            // Not taken yet: the message went over the socket (drained
            // here), or was dropped as the device end was not yet connected.
            v2.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
            let mut frame = [0u8; 24];
            if let Err(e) = v2.read_exact(&mut frame) {
                assert!(matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut), "closed: {e}");
            }
            assert!(std::time::Instant::now() < deadline, "the offer was never taken");
        }
    }
}
