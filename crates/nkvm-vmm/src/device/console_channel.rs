//! The 16550 behind the console channel on stdin (`--console-channel`).
//!
//! The VMM writes what is typed for the guest into the channel; this
//! process moves it into the UART's receive FIFO and backlog. Nothing typed
//! is held anywhere else: bytes move from the socket into the model only
//! under the model's lock, and a state save first drains the socket into
//! the backlog under the same lock, so every byte the VMM wrote before it
//! asked for the state is in the state (read by the guest after a restore
//! or a migration, however far behind it was).

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nkvm_devices::serial::Serial;
use nkvm_devices::{IoDevice, IrqLine};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// The UART of this process.
type Uart = Serial<io::Stdout>;

/// Writes one byte to the channel per rising edge of the UART's line.
struct Pulses(Mutex<UnixStream>);

impl IrqLine for Pulses {
    fn set_level(&self, level: bool) {
        if level {
            // A VMM that is gone takes no interrupt; its end of the
            // I/O region ends this process.
            let _ = self.0.lock().unwrap_or_else(|p| p.into_inner()).write_all(&[1]);
        }
    }
}

/// The channel's receiving side: the socket and a readiness check, so a
/// read under the model's lock never waits.
struct Typed {
    channel: UnixStream,
    ready: Epoll,
}

impl Typed {
    fn new(channel: UnixStream) -> io::Result<Self> {
        let ready = Epoll::new()?;
        ready.ctl(ControlOperation::Add, channel.as_raw_fd(), EpollEvent::new(EventSet::IN, 0))?;
        Ok(Self { channel, ready })
    }

    /// Whether bytes (or the end of input) wait, within `timeout_ms`
    /// (-1: as long as it takes).
    fn readable(&self, timeout_ms: i32) -> io::Result<bool> {
        let mut events = [EpollEvent::default()];
        loop {
            match self.ready.wait(timeout_ms, &mut events) {
                Ok(n) => return Ok(n > 0),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Moves waiting bytes into `uart`, at most `limit`, without waiting;
    /// returns how many, or `None` at the end of input (the VMM is gone).
    /// The caller holds the model's lock, so no other reader takes the
    /// bytes between the check and the read.
    fn take(&self, uart: &mut Uart, limit: usize) -> io::Result<Option<usize>> {
        let mut buf = [0u8; 4096];
        let mut taken = 0;
        while taken < limit && self.readable(0)? {
            let want = (limit - taken).min(buf.len());
            match (&self.channel).read(&mut buf[..want]) {
                Ok(0) => return Ok(if taken == 0 { None } else { Some(taken) }),
                Ok(n) => {
                    uart.hold_input(&buf[..n]);
                    taken += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Some(taken))
    }
}

/// The UART wired to the channel: its interrupts go out on it, and what
/// comes in is moved into the UART by a thread (waiting while the FIFO and
/// the backlog are full, which holds the VMM's side back).
pub(super) struct ChannelSerial {
    uart: Arc<Mutex<Uart>>,
    typed: Arc<Typed>,
}

impl ChannelSerial {
    fn lock(&self) -> MutexGuard<'_, Uart> {
        self.uart.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl IoDevice for ChannelSerial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.lock().read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.lock().write(offset, data);
    }

    fn save_state(&self) -> Option<Vec<u8>> {
        let mut uart = self.lock();
        // What the VMM wrote before it asked is in the socket: it belongs
        // to the state, past the backlog's limit if need be.
        if let Err(e) = self.typed.take(&mut uart, usize::MAX) {
            log::warn!("console channel: typed bytes not saved: {e}");
        }
        uart.save_state()
    }

    fn load_state(&mut self, state: &[u8]) -> Option<Result<(), String>> {
        self.lock().load_state(state)
    }
}

/// The UART on the channel that is this process's stdin, and the thread
/// that feeds it.
pub(super) fn serial() -> io::Result<ChannelSerial> {
    let channel = UnixStream::from(io::stdin().as_fd().try_clone_to_owned()?);
    if let Err(e) = channel.local_addr() {
        let why = format!("--console-channel needs a stream socket on stdin (the VMM's end of the channel): {e}");
        return Err(io::Error::new(io::ErrorKind::InvalidInput, why));
    }
    let pulses = Pulses(Mutex::new(channel.try_clone()?));
    let uart = Arc::new(Mutex::new(Serial::new(Box::new(pulses), io::stdout())));
    let typed = Arc::new(Typed::new(channel)?);
    let serial = ChannelSerial { uart: uart.clone(), typed: typed.clone() };
    std::thread::Builder::new().name("console-input".into()).spawn(move || {
        let feeder = ChannelSerial { uart, typed };
        loop {
            // Wait without the lock; read under it.
            match feeder.typed.readable(-1) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => return log::warn!("console channel: {e}"),
            }
            let mut uart = feeder.lock();
            let room = uart.input_room();
            let taken = if room == 0 { Ok(Some(0)) } else { feeder.typed.take(&mut uart, room) };
            drop(uart);
            match taken {
                // The guest is behind: let it read.
                Ok(Some(0)) => std::thread::sleep(Duration::from_millis(5)),
                Ok(Some(_)) => {}
                // The VMM is gone or has no more input.
                Ok(None) => return,
                Err(e) => return log::warn!("console channel: {e}"),
            }
        }
    })?;
    Ok(serial)
}
