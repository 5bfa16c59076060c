//! Running the `nkvm` binary from a test: a scratch directory, `nkvm ctl`,
//! and [`Vmm`], an `nkvm run` whose console and stderr are collected as
//! they come. Every test that drives nkvm as a process uses these, so a
//! fix to how output is read or a process is reaped is made once.
#![allow(dead_code)] // each test binary uses a part

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The `nkvm` binary, its stdin closed.
pub fn nkvm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nkvm"));
    c.stdin(Stdio::null());
    c
}

/// A fresh directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nkvm-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `nkvm ctl --api-socket SOCKET ARGS...`: the JSON answer (asserts success).
pub fn ctl(socket: &Path, args: &[&str]) -> serde_json::Value {
    let out = nkvm().arg("ctl").arg("--api-socket").arg(socket).args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "nkvm ctl {args:?}: {text}{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(text.lines().next().unwrap_or("")).unwrap()
}

/// The last 25 lines of `text` (a console, for a failure message).
pub fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

/// A running `nkvm run`: its stdin a pipe (the guest's console input), its
/// stdout (the console) and stderr collected; killed when dropped.
pub struct Vmm {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

/// How long one [`Vmm::wait_for`] may take before the test fails (the
/// guest is slow under the nested host's instruction emulator, and the
/// machine is shared).
pub const BOUND: Duration = Duration::from_secs(300);

/// Collects what `from` says into a shared string, on a thread.
fn collect(mut from: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = from.read(&mut chunk) {
            sink.lock().unwrap().push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    });
    text
}

impl Vmm {
    /// Starts `nkvm run ARGS...`.
    pub fn run(args: &[&str]) -> Self {
        let mut child = nkvm()
            .arg("run")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nkvm");
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        Self { child, stdout, stderr }
    }

    /// What it printed on stdout (the guest console) so far.
    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// What it printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Types `bytes` on the guest's console.
    pub fn type_(&mut self, bytes: &[u8]) {
        self.child.stdin.as_mut().unwrap().write_all(bytes).unwrap();
    }

    /// Waits until `done(stdout, stderr)`, the process ends or `deadline`
    /// passes; returns whether `done` held (for waits longer than
    /// [`BOUND`], such as a Linux boot).
    pub fn wait_until(&mut self, deadline: Instant, done: impl Fn(&str, &str) -> bool) -> bool {
        loop {
            if done(&self.stdout(), &self.stderr()) {
                return true;
            }
            if self.child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                // Let the readers drain the pipes.
                std::thread::sleep(Duration::from_millis(200));
                return done(&self.stdout(), &self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `done(stdout, stderr)`; fails the test, with both
    /// outputs, if the process ends first or after [`BOUND`].
    pub fn wait_for(&mut self, what: &str, done: impl Fn(&str, &str) -> bool) {
        if !self.wait_until(Instant::now() + BOUND, done) {
            match self.child.try_wait().unwrap() {
                Some(status) => panic!("nkvm ended ({status}) before {what}:\n{}\n{}", self.stdout(), self.stderr()),
                None => panic!("no {what} in {BOUND:?}:\n{}\n{}", self.stdout(), self.stderr()),
            }
        }
    }

    /// Waits for `text` on the console.
    pub fn wait_console(&mut self, text: &str) {
        self.wait_for(&format!("{text:?} on the console"), |out, _| out.contains(text));
    }

    /// Waits for `text` on stderr.
    pub fn wait_stderr(&mut self, text: &str) {
        self.wait_for(&format!("{text:?} on stderr"), |_, err| err.contains(text));
    }

    /// Waits for the process to end; returns its success.
    pub fn wait_exit(&mut self) -> bool {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the readers drain the pipes.
                std::thread::sleep(Duration::from_millis(200));
                return status.success();
            }
            if start.elapsed() > BOUND {
                let tail = tail(&self.stdout());
                panic!("nkvm did not end in {BOUND:?}; the console's last lines:\n{tail}\nstderr:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills it now and waits.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
