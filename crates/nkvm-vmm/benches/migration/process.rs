//! A VMM process whose console bytes are timestamped as they arrive, and
//! what the timestamps say about a migration.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::guest::next_tick_byte;

/// How long any one wait may take (the machine is shared and the guests
/// run under the host's instruction emulator).
const BOUND: Duration = Duration::from_secs(120);

/// A running VMM (nkvm or QEMU); killed when dropped.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    /// Every console byte with the moment the bench read it.
    console: Arc<Mutex<Vec<(Instant, u8)>>>,
    stderr: Arc<Mutex<String>>,
}

impl Proc {
    /// Starts `cmd` with its stdout (the guest's serial console) and
    /// stderr piped.
    pub fn spawn(name: &str, mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        let console = Arc::new(Mutex::new(Vec::new()));
        let mut out = child.stdout.take().unwrap();
        let c = console.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = out.read(&mut chunk) {
                let now = Instant::now();
                c.lock().unwrap().extend(chunk[..n].iter().map(|&b| (now, b)));
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().unwrap();
        let e = stderr.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = err.read(&mut chunk) {
                e.lock().unwrap().push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        });
        Self { name: name.to_string(), child, console, stderr }
    }

    /// The console bytes so far, timestamped.
    pub fn console(&self) -> Vec<(Instant, u8)> {
        self.console.lock().unwrap().clone()
    }

    /// How many console bytes so far.
    pub fn console_len(&self) -> usize {
        self.console.lock().unwrap().len()
    }

    /// What it printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until `done(self)`; panics with its output if it ends first or
    /// after [`BOUND`].
    pub fn wait_for(&mut self, what: &str, done: impl Fn(&Self) -> bool) {
        if let Err(e) = self.wait_until(what, done) {
            panic!("{e}");
        }
    }

    /// Waits until `done(self)`; an error with its stderr if it ends first
    /// or after [`BOUND`].
    pub fn wait_until(&mut self, what: &str, done: impl Fn(&Self) -> bool) -> Result<(), String> {
        let start = Instant::now();
        while !done(self) {
            if let Some(status) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                if done(self) {
                    return Ok(());
                }
                return Err(format!("{} ended ({status}) before {what}:\n{}", self.name, self.stderr()));
            }
            if start.elapsed() > BOUND {
                return Err(format!("{}: no {what} in {BOUND:?}:\n{}", self.name, self.stderr()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Waits for `n` more console bytes than there are now.
    pub fn wait_ticks(&mut self, n: usize) {
        let after = self.console_len() + n;
        self.wait_for("console bytes", |p| p.console_len() >= after);
    }

    /// Its exit status, if it has ended.
    pub fn exit_code(&mut self) -> Option<Option<i32>> {
        self.child.try_wait().unwrap().map(|s| s.code())
    }

    /// Kills it now and waits.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The guest's rate over the last `window` of its console: console bytes
/// (ticks) per second.
pub fn tick_rate(p: &Proc, window: Duration) -> f64 {
    let n0 = p.console_len();
    let t0 = Instant::now();
    std::thread::sleep(window);
    (p.console_len() - n0) as f64 / t0.elapsed().as_secs_f64()
}

/// What the console of a source and of its destination say about one
/// switch-over.
#[derive(Clone, Copy, Debug)]
pub struct Switch {
    /// From the last byte the source printed to the first the destination
    /// printed: the guest-visible downtime, within one tick.
    pub gap: Duration,
    /// The destination's first byte follows the source's last one in the
    /// rotating sequence: no tick lost or repeated on the console.
    pub in_sequence: bool,
}

/// The switch-over seen on the consoles; `None` if either printed nothing.
pub fn switch(source: &[(Instant, u8)], dest: &[(Instant, u8)]) -> Option<Switch> {
    let &(last_at, last) = source.last()?;
    let &(first_at, first) = dest.first()?;
    Some(Switch { gap: first_at.saturating_duration_since(last_at), in_sequence: next_tick_byte(last) == first })
}
