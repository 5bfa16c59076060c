//! The guest's serial console on the user's terminal: raw mode while the
//! guest runs (restored on every way out of `nkvm run`), keystrokes to the
//! guest's 16550 (in this process, or over the console channel of a
//! 16550 in a device process, docs/wire-format.md), and the escape key.
//!
//! **Escape key: Ctrl-A then `x`** ends the guest (as in QEMU);
//! Ctrl-A Ctrl-A sends one Ctrl-A to the guest.

use std::collections::VecDeque;
use std::io::{self, IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use nkvm_devices::IoDevice;
use vmm_sys_util::terminal::Terminal;

/// The escape key, as the help text spells it.
pub const ESCAPE: &str = "Ctrl-A x";
const CTRL_A: u8 = 0x01;

/// While alive, the terminal on stdin is in raw mode (no line editing, no
/// echo, Ctrl-C goes to the guest); dropping it restores canonical mode.
/// Does nothing when stdin is not a terminal.
#[derive(Debug)]
pub struct RawMode {
    active: bool,
}

impl RawMode {
    /// Puts the terminal on stdin in raw mode, if it is one.
    pub fn enter() -> Self {
        let stdin = io::stdin();
        let active = stdin.is_terminal() && stdin.lock().set_raw_mode().is_ok();
        Self { active }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if self.active {
            let _ = io::stdin().lock().set_canon_mode();
        }
    }
}

/// What a keystroke means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    /// Send this byte to the guest.
    Send(u8),
    /// The escape sequence: end the guest.
    Quit,
    /// Nothing yet (the first half of an escape).
    Pending,
}

/// Splits the input stream into guest bytes and the escape sequence.
#[derive(Debug, Default)]
pub struct EscapeDecoder {
    after_ctrl_a: bool,
}

impl EscapeDecoder {
    /// Feeds one input byte.
    pub fn feed(&mut self, byte: u8) -> Key {
        if std::mem::take(&mut self.after_ctrl_a) {
            return match byte {
                b'x' | b'X' => Key::Quit,
                other => Key::Send(other),
            };
        }
        if byte == CTRL_A {
            self.after_ctrl_a = true;
            return Key::Pending;
        }
        Key::Send(byte)
    }
}

/// A 16550 shared between its I/O region (the vCPUs) and the input thread.
pub type SharedSerial = Arc<Mutex<dyn SerialInput>>;

/// The part of a UART the input thread needs.
pub trait SerialInput: IoDevice {
    /// Queues bytes for the guest; returns how many fit.
    fn enqueue(&mut self, input: &[u8]) -> usize;
}

impl<W: io::Write + Send> SerialInput for nkvm_devices::serial::Serial<W> {
    fn enqueue(&mut self, input: &[u8]) -> usize {
        self.enqueue_input(input)
    }
}

/// The I/O-region side of a [`SharedSerial`].
pub struct SerialRegion(pub SharedSerial);

impl nkvm::IoHandler for SerialRegion {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).write(offset, data);
    }
}

/// Where the keystrokes for the guest go.
pub enum ConsoleInput {
    /// A 16550 in this process.
    Local(SharedSerial),
    /// The console channel of a 16550 in a device process: the bytes
    /// written are its input (what the process has not moved into its
    /// UART waits in the socket, and a full socket holds this side back).
    Process(UnixStream),
}

impl std::fmt::Debug for ConsoleInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local(_) => f.write_str("ConsoleInput::Local"),
            Self::Process(s) => f.debug_tuple("ConsoleInput::Process").field(s).finish(),
        }
    }
}

impl ConsoleInput {
    /// Hands bytes to the UART, in order, waiting while its FIFO and
    /// backlog are full. A device process's channel takes them at once
    /// (its socket holds what the process has not moved into its UART
    /// yet, and the process saves that with its state).
    pub(crate) fn send(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        match self {
            Self::Local(serial) => {
                while !bytes.is_empty() {
                    let n = serial.lock().unwrap_or_else(|p| p.into_inner()).enqueue(bytes);
                    bytes = &bytes[n..];
                    if n == 0 {
                        thread::sleep(Duration::from_millis(5));
                    }
                }
                Ok(())
            }
            Self::Process(channel) => channel.write_all(bytes),
        }
    }
}

/// The most keystrokes kept while the guest takes none; more are dropped
/// (with one warning) rather than held without bound.
const MAX_TYPED_AHEAD: usize = 1 << 20;

/// Keystrokes read from stdin and not yet handed to the UART.
#[derive(Default)]
struct Typed {
    /// The bytes, and whether stdin is done (no more will come).
    queue: Mutex<(VecDeque<u8>, bool)>,
    ready: Condvar,
}

impl Typed {
    fn lock(&self) -> std::sync::MutexGuard<'_, (VecDeque<u8>, bool)> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `keys`; returns how many did not fit.
    fn push(&self, keys: &[u8]) -> usize {
        let mut q = self.lock();
        let room = MAX_TYPED_AHEAD.saturating_sub(q.0.len());
        q.0.extend(&keys[..keys.len().min(room)]);
        self.ready.notify_all();
        keys.len().saturating_sub(room)
    }

    fn close(&self) {
        self.lock().1 = true;
        self.ready.notify_all();
    }

    /// The next bytes to hand over, `None` once stdin is done and all are.
    fn next(&self) -> Option<Vec<u8>> {
        let mut q = self.lock();
        while q.0.is_empty() && !q.1 {
            q = self.ready.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        let n = q.0.len().min(4096);
        (n > 0).then(|| q.0.drain(..n).collect())
    }
}

/// Starts the threads that read stdin and feed the guest. The reader never
/// waits for the guest, so the escape key calls `quit` (once) however far
/// behind the guest is; the feeder hands the keystrokes to `input` in
/// order, waiting while the UART's FIFO and backlog are full (up to 1 MiB
/// waits beside it; more is dropped with one warning). They end at end of
/// input or after the escape. If a device process's channel breaks (the
/// process is gone; the VMM names that elsewhere), keystrokes are dropped
/// from then on, with one warning, and the escape key still works.
pub fn spawn_input(mut input: ConsoleInput, quit: impl FnOnce() + Send + 'static) -> io::Result<()> {
    let typed = Arc::new(Typed::default());
    let feed = typed.clone();
    thread::Builder::new().name("console-feed".into()).spawn(move || {
        while let Some(keys) = feed.next() {
            if let Err(e) = input.send(&keys) {
                log::warn!(
                    "console input is dropped from now on: the serial device process took no more ({e}); \
                     {ESCAPE} still ends the guest"
                );
                // Taken and dropped from now on, so the reader never waits.
                while feed.next().is_some() {}
                return;
            }
        }
    })?;
    thread::Builder::new().name("console-input".into()).spawn(move || {
        let mut decoder = EscapeDecoder::default();
        let mut buf = [0u8; 64];
        let mut keys = Vec::with_capacity(buf.len());
        let mut stdin = io::stdin();
        let mut warned = false;
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return typed.close(),
                Ok(n) => n,
            };
            keys.clear();
            let mut quitting = false;
            for &byte in &buf[..n] {
                match decoder.feed(byte) {
                    Key::Quit => {
                        quitting = true;
                        break;
                    }
                    Key::Pending => {}
                    Key::Send(b) => keys.push(b),
                }
            }
            // What was typed before the escape still goes to the guest.
            if typed.push(&keys) > 0 && !warned {
                log::warn!(
                    "console input is dropped: the guest has not read the last {MAX_TYPED_AHEAD} bytes typed; \
                     {ESCAPE} still ends it"
                );
                warned = true;
            }
            if quitting {
                typed.close();
                return quit();
            }
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_a_x_quits_and_ctrl_a_ctrl_a_sends_one_ctrl_a() {
        let mut d = EscapeDecoder::default();
        let keys: Vec<Key> = b"a\x01\x01b\x01x".iter().map(|&b| d.feed(b)).collect();
        assert_eq!(keys, [Key::Send(b'a'), Key::Pending, Key::Send(CTRL_A), Key::Send(b'b'), Key::Pending, Key::Quit]);
    }
}
