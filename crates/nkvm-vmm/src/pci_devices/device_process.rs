//! The VMM's side of a virtio device process (`nkvm run --device-process`:
//! virtio-blk with `--disk IMAGE`, virtio-console): starting `nkvm device
//! --model virtio-blk|virtio-console`, reading what it says on stderr, and
//! telling how it died.
//!
//! The process is a vhost-user-blk backend; [`super::vhost_user`] speaks to
//! it as to any other, and its watcher notices the socket hang up the
//! moment the process dies, then asks this module to reap it ([`Child`]'s
//! exit status: the signal), report it (with the forbidden system call's
//! number and name when the sandbox killed it), and start a new one.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::sandbox::{syscall_name, FORBIDDEN_LINE};

/// How long a device process must have lived for its death not to count
/// as one more in a row.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);
/// How long a new process may take to bind its socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a device process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum DeviceProcessError {
    /// The executable could not be run.
    #[error("cannot start the {model} device process {}", exe.display())]
    Spawn {
        /// The model.
        model: &'static str,
        /// The executable (nkvm itself).
        exe: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// It exited before it listened.
    #[error("the device process exited before it listened on {}: {death}", socket.display())]
    Died {
        /// Its socket.
        socket: PathBuf,
        /// How it ended.
        death: Death,
    },
    /// It never listened.
    #[error("the {model} device process did not listen on {} within {START_TIMEOUT:?}", socket.display())]
    NoSocket {
        /// The model.
        model: &'static str,
        /// Its socket.
        socket: PathBuf,
    },
}

/// How a device process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Death {
    /// Its model (`virtio-blk`).
    pub model: &'static str,
    /// Its process id.
    pub pid: u32,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// Its exit code, if it exited.
    pub code: Option<i32>,
    /// The system call the sandbox refused, if that is what killed it.
    pub forbidden_call: Option<i64>,
}

impl std::fmt::Display for Death {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the {} device process (pid {}) ", self.model, self.pid)?;
        match (self.forbidden_call, self.signal, self.code) {
            (Some(nr), _, _) => {
                let name = syscall_name(nr).unwrap_or("unknown");
                write!(f, "was killed by its sandbox: forbidden system call {nr} ({name})")
            }
            (None, Some(signal), _) => write!(f, "was killed by signal {signal} ({})", signal_name(signal)),
            (None, None, Some(crate::virtio_process::GUEST_QUEUE_ERROR_EXIT)) => {
                write!(f, "stopped: its guest broke a queue (the line before names the error)")
            }
            (None, None, Some(code)) => write!(f, "exited with status {code}"),
            (None, None, None) => write!(f, "ended"),
        }
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGSYS => "SIGSYS",
        libc::SIGTERM => "SIGTERM",
        libc::SIGBUS => "SIGBUS",
        _ => "another signal",
    }
}

/// What the VMM needs to start the process again.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    /// The executable: nkvm itself.
    pub exe: PathBuf,
    /// The model (`nkvm device --model`): `virtio-blk`, `virtio-console`.
    pub model: &'static str,
    /// The image (virtio-blk).
    pub disk: Option<PathBuf>,
    /// Present it read-only.
    pub read_only: bool,
    /// The socket the process listens on.
    pub socket: PathBuf,
    /// Environment added to the process's.
    pub env: Vec<(String, String)>,
    /// Where its stdout goes (a console's output), if not to the VMM's.
    pub stdout: Option<PathBuf>,
}

/// What tests and the log learn about a device process over its life.
#[derive(Debug, Default)]
pub struct ProcessLog {
    /// The running process's id.
    pub pid: u32,
    /// Every death, in order.
    pub deaths: Vec<Death>,
    /// Restarts so far.
    pub restarts: u32,
    /// The device was given up on.
    pub failed: bool,
}

/// A running virtio device process; killed when dropped.
#[derive(Debug)]
pub struct VirtioProcess {
    spec: ProcessSpec,
    child: Child,
    /// Forwards the child's stderr and catches the sandbox's line.
    stderr: Option<JoinHandle<Option<i64>>>,
    /// When this process was started.
    started: Instant,
    /// Deaths in a row, each within [`STABLE_AFTER`] of its start, and
    /// restarts that failed.
    pub in_a_row: u32,
    /// The child was waited for (reaped) and no other started since.
    reaped: bool,
    /// Shared with whoever watches (tests).
    pub log: Arc<Mutex<ProcessLog>>,
}

impl VirtioProcess {
    /// Starts the process and waits until it listens on `spec.socket`.
    pub fn spawn(spec: ProcessSpec) -> Result<Self, DeviceProcessError> {
        let (child, stderr) = start(&spec)?;
        let log = Arc::new(Mutex::new(ProcessLog { pid: child.id(), ..Default::default() }));
        Ok(Self { spec, child, stderr: Some(stderr), started: Instant::now(), in_a_row: 0, reaped: false, log })
    }

    /// The socket it listens on.
    pub fn socket(&self) -> &Path {
        &self.spec.socket
    }

    /// Waits for the (dead or dying) process and says how it ended; `None`
    /// if it was reaped already (a restart that failed started no other).
    pub fn reap(&mut self) -> Option<Death> {
        if self.reaped {
            return None;
        }
        self.reaped = true;
        // A process that hung up but lives on (it should exit with its
        // connection) is given a moment, then killed.
        let deadline = Instant::now() + Duration::from_secs(1);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let status = self.child.wait();
        // Its stderr is closed now, unless a process it left behind holds
        // it (the sandbox allows no fork; a process started unsandboxed
        // might): the forwarder is given a moment, then left to end alone.
        let forbidden_call = self.stderr.take().and_then(|h| {
            let call = forwarded(h, Duration::from_secs(1));
            if call.is_none() {
                log::debug!("{} device process {}: no forbidden call reported", self.spec.model, self.child.id());
            }
            call
        });
        let death = death(self.spec.model, self.child.id(), status.ok(), forbidden_call);
        if self.started.elapsed() >= STABLE_AFTER {
            self.in_a_row = 0;
        }
        self.in_a_row += 1;
        self.log.lock().unwrap_or_else(|e| e.into_inner()).deaths.push(death.clone());
        Some(death)
    }

    /// A restart that failed counts against the watcher's `MAX_RESTARTS` as a death
    /// would: a device whose process cannot start again is given up. (One
    /// that started a process that then failed is counted when that
    /// process is reaped.)
    pub fn restart_failed(&mut self) {
        if self.reaped {
            self.in_a_row += 1;
        }
    }

    /// Starts a new process in place of the reaped one.
    pub fn respawn(&mut self) -> Result<(), DeviceProcessError> {
        let (child, stderr) = start(&self.spec)?;
        self.child = child;
        self.stderr = Some(stderr);
        self.started = Instant::now();
        self.reaped = false;
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.pid = self.child.id();
        log.restarts += 1;
        Ok(())
    }
}

impl Drop for VirtioProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.spec.socket);
    }
}

fn death(model: &'static str, pid: u32, status: Option<ExitStatus>, forbidden_call: Option<i64>) -> Death {
    let signal = status.and_then(|s| s.signal());
    let code = status.and_then(|s| s.code());
    // The line counts only if the sandbox's signal is what ended it.
    let forbidden_call = forbidden_call.filter(|_| signal == Some(libc::SIGSYS));
    Death { model, pid, signal, code, forbidden_call }
}

/// Starts `nkvm device --model MODEL` and waits for its socket.
fn start(spec: &ProcessSpec) -> Result<(Child, JoinHandle<Option<i64>>), DeviceProcessError> {
    let _ = std::fs::remove_file(&spec.socket);
    let spawn_err = |source| DeviceProcessError::Spawn { model: spec.model, exe: spec.exe.clone(), source };
    let mut command = Command::new(&spec.exe);
    command.args(["device", "--model", spec.model, "--socket"]).arg(&spec.socket);
    if let Some(disk) = &spec.disk {
        command.arg("--disk").arg(disk);
    }
    if spec.read_only {
        command.arg("--read-only");
    }
    // Only a console writes to stdout; the others get none.
    if let Some(path) = &spec.stdout {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(spawn_err)?;
        command.stdout(file);
    } else if spec.model != super::vhost_user::CONSOLE.name {
        command.stdout(Stdio::null());
    }
    let mut child = command
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    let stderr = child.stderr.take().map(forward_stderr);
    let deadline = Instant::now() + START_TIMEOUT;
    while !spec.socket.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            let forbidden = stderr.and_then(|h| h.join().ok()).flatten();
            let death = death(spec.model, child.id(), Some(status), forbidden);
            return Err(DeviceProcessError::Died { socket: spec.socket.clone(), death });
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(DeviceProcessError::NoSocket { model: spec.model, socket: spec.socket.clone() });
        }
        thread::sleep(Duration::from_millis(2));
    }
    let stderr = match stderr {
        Some(h) => h,
        None => thread::spawn(|| None),
    };
    Ok((child, stderr))
}

/// What the stderr forwarder found, once it ends: within `wait`, or never
/// if something else holds the pipe open (it then ends by itself later).
fn forwarded(forwarder: JoinHandle<Option<i64>>, wait: Duration) -> Option<i64> {
    let deadline = Instant::now() + wait;
    while !forwarder.is_finished() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    if !forwarder.is_finished() {
        log::warn!("a device process's stderr is still open after its end: not waited for");
        return None;
    }
    forwarder.join().ok().flatten()
}

/// The longest line forwarded whole; a longer one is forwarded in pieces,
/// so a process cannot make the VMM hold an endless line.
const MAX_STDERR_LINE: u64 = 4096;

/// Copies the child's stderr to ours, line by line; returns the system
/// call the sandbox reported, if it did.
fn forward_stderr(pipe: std::process::ChildStderr) -> JoinHandle<Option<i64>> {
    thread::spawn(move || {
        let mut forbidden = None;
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match (&mut reader).take(MAX_STDERR_LINE).read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let text = String::from_utf8_lossy(&line);
            let text = text.strip_suffix('\n').unwrap_or(&text);
            match text.strip_prefix(FORBIDDEN_LINE).and_then(|n| n.trim().parse().ok()) {
                Some(nr) => forbidden = Some(nr),
                None => {
                    let _ = writeln!(std::io::stderr(), "{text}");
                }
            }
        }
        forbidden
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process's stderr through the forwarder: `script` run by `sh`.
    fn forward(script: &str) -> (Child, JoinHandle<Option<i64>>) {
        let mut child = Command::new("sh").args(["-c", script]).stderr(Stdio::piped()).spawn().unwrap();
        let forwarder = forward_stderr(child.stderr.take().unwrap());
        (child, forwarder)
    }

    #[test]
    fn a_line_longer_than_the_limit_is_forwarded_in_pieces_and_the_forbidden_call_still_found() {
        let (mut child, forwarder) = forward(&format!("printf '%4200s' '' >&2; printf '\\n{FORBIDDEN_LINE}41\\n' >&2"));
        child.wait().unwrap();
        assert_eq!(forwarded(forwarder, Duration::from_secs(30)), Some(41));
    }

    #[test]
    fn a_process_left_holding_stderr_does_not_hold_the_reaper() {
        // The shell ends at once; the `sleep` it leaves holds the pipe.
        let (mut child, forwarder) = forward(&format!("printf '{FORBIDDEN_LINE}41\\n' >&2; sleep 20 & exit 0"));
        child.wait().unwrap();
        let start = Instant::now();
        assert_eq!(forwarded(forwarder, Duration::from_millis(200)), None);
        assert!(start.elapsed() < Duration::from_secs(10), "waited for the process left behind");
    }

    #[test]
    fn a_death_names_the_signal_or_the_forbidden_call() {
        let sys = Death {
            model: "virtio-blk",
            pid: 7,
            signal: Some(libc::SIGSYS),
            code: None,
            forbidden_call: Some(libc::SYS_socket),
        };
        assert_eq!(
            sys.to_string(),
            format!(
                "the virtio-blk device process (pid 7) was killed by its sandbox: forbidden system call {} (socket)",
                libc::SYS_socket
            )
        );
        let kill = death("virtio-blk", 8, Some(ExitStatus::from_raw(libc::SIGKILL)), Some(41));
        assert_eq!(kill.forbidden_call, None, "a line without the sandbox's signal does not count");
        assert!(kill.to_string().ends_with("was killed by signal 9 (SIGKILL)"), "{kill}");
    }
}
