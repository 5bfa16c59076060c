//! The serial console's output on the terminal, watched for the one line a
//! VMM must not miss: the guest kernel's panic message. A stock kernel
//! booted with `panic=-1` reboots right after it, which would otherwise
//! look like a clean `reboot -f`.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

/// What Linux prints when it panics.
const PANIC: &[u8] = b"Kernel panic - not syncing: ";

/// The first panic line seen on the console, shared with the VMM.
#[derive(Debug, Clone, Default)]
pub struct PanicWatch {
    seen: Arc<Mutex<Option<String>>>,
}

impl PanicWatch {
    /// The panic message (what follows "Kernel panic - not syncing: "), if any.
    pub fn message(&self) -> Option<String> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A writer that forwards console bytes to `inner` and records the first
/// kernel panic line in a [`PanicWatch`].
#[derive(Debug)]
pub struct WatchedConsole<W> {
    inner: W,
    line: Vec<u8>,
    watch: PanicWatch,
}

impl<W: Write> WatchedConsole<W> {
    /// Wraps `inner`; panics are reported to `watch`.
    pub fn new(inner: W, watch: PanicWatch) -> Self {
        Self { inner, line: Vec::new(), watch }
    }

    fn scan(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b != b'\n' {
                // A console line longer than this is not a panic header.
                if self.line.len() < 512 {
                    self.line.push(b);
                }
                continue;
            }
            if let Some(at) = self.line.windows(PANIC.len()).position(|w| w == PANIC) {
                let msg = String::from_utf8_lossy(&self.line[at + PANIC.len()..]).trim_end().to_string();
                let mut seen = self.watch.seen.lock().unwrap_or_else(|p| p.into_inner());
                seen.get_or_insert(msg);
            }
            self.line.clear();
        }
    }
}

impl<W: Write> Write for WatchedConsole<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.scan(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_panic_line_is_recorded_and_everything_is_forwarded() {
        let watch = PanicWatch::default();
        let mut console = WatchedConsole::new(Vec::new(), watch.clone());
        console.write_all(b"[  1.0] hello\r\n[ 379.68] Kernel panic - not sync").unwrap();
        assert_eq!(watch.message(), None, "not before the line ends");
        console.write_all(b"ing: Attempted to kill init! exitcode=0x0000000b\r\n").unwrap();
        console.write_all(b"Kernel panic - not syncing: second\n").unwrap();
        assert_eq!(watch.message().as_deref(), Some("Attempted to kill init! exitcode=0x0000000b"));
        assert!(console.inner.starts_with(b"[  1.0] hello\r\n"));
    }
}
