//! A minimal QMP client: JSON lines over QEMU's Unix monitor socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// One QMP connection, past the capabilities negotiation.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to `socket` (retrying while QEMU starts), reads the
    /// greeting and leaves negotiation mode.
    pub fn connect(socket: &Path) -> Self {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if start.elapsed() > Duration::from_secs(30) => panic!("QMP {}: {e}", socket.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        let writer = stream.try_clone().unwrap();
        let mut qmp = Self { reader: BufReader::new(stream), writer };
        let greeting = qmp.read();
        assert!(greeting.get("QMP").is_some(), "not a QMP greeting: {greeting}");
        qmp.execute("qmp_capabilities", json!({}));
        qmp
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).unwrap();
        assert!(n > 0, "QEMU closed its QMP socket");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP sent {line:?}: {e}"))
    }

    /// Runs `command` with `arguments`; its `return` value (asserts
    /// success). Events that arrive meanwhile are skipped.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Value {
        let msg = json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{msg}").unwrap();
        loop {
            let answer = self.read();
            if answer.get("event").is_some() {
                continue;
            }
            if let Some(r) = answer.get("return") {
                return r.clone();
            }
            panic!("QMP {command}: {answer}");
        }
    }
}
