//! The API socket (`nkvm run --api-socket PATH`): one JSON object per
//! line in, one per line out (`docs/migration.md`, "API"). Commands:
//! `info`, `pause`, `resume`, `snapshot` (`dir`), `migrate` (`to`,
//! optional `downtime_ms`, `max_rounds`), `cancel`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::machine::intake::chain;
use crate::migrate::send::{self, MigrateOptions};
use crate::running::{Running, RunningError};

/// Removes the API socket at `path` when its VMM ends (only if it is
/// still a socket: a file put there since is left alone).
pub fn remove(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

/// Makes room for a socket at `path`: a socket left there (by an nkvm
/// that ended) is removed; any other file is refused, never removed.
pub fn clear_stale_socket(path: &Path) -> io::Result<()> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket; it was left as it is (choose another path)",
            ));
        }
        std::fs::remove_file(path)?;
    }
    Ok(())
}

/// Serves `path` on a thread of its own for as long as the process lives.
/// A socket left at `path` (by an nkvm that ended) is replaced; any other
/// file there is refused, never removed.
pub fn serve(path: &Path, running: Arc<Running>) -> io::Result<()> {
    clear_stale_socket(path)?;
    let listener = UnixListener::bind(path)?;
    std::thread::Builder::new().name("api".into()).spawn(move || serve_on(listener, running, MAX_CONNECTIONS, IDLE))?;
    Ok(())
}

/// How many API connections are served at once (a thread each); one more
/// is told so and closed.
const MAX_CONNECTIONS: usize = 64;

/// How long a connection may sit without a request before it is closed
/// (its place freed for another client).
const IDLE: Duration = Duration::from_secs(300);

/// How long an answer may wait for a client that does not read it.
const WRITE_STALL: Duration = Duration::from_secs(10);

/// Takes the connections of `listener`, at most `max` served at once,
/// each closed after `idle` without a request.
fn serve_on(listener: UnixListener, running: Arc<Running>, max: usize, idle: Duration) {
    let open = Arc::new(AtomicUsize::new(0));
    for mut conn in listener.incoming().flatten() {
        let Some(slot) = Slot::take(&open, max) else {
            log::warn!("api: {max} connections already open: one more refused");
            let _ = writeln!(conn, "{}", error(format!("too many API connections ({max} open): try again later")));
            continue;
        };
        let running = running.clone();
        let spawned = std::thread::Builder::new().name("api-conn".into()).spawn(move || {
            // Given back when the thread ends, by return or by panic.
            let _slot = slot;
            if let Err(e) = handle(conn, &running, idle) {
                log::debug!("api connection: {e}");
            }
        });
        if let Err(e) = spawned {
            log::warn!("api: cannot serve a connection: {e}");
        }
    }
}

/// One of the connections `serve_on` serves at once, given back on drop.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(open: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        let taken = open.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < max).then_some(n + 1));
        taken.ok().map(|_| Slot(open.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The longest request line taken (a request is a few hundred bytes).
const MAX_REQUEST: u64 = 64 << 10;

fn handle(conn: UnixStream, running: &Arc<Running>, idle: Duration) -> io::Result<()> {
    // Neither a client that sends nothing nor one that reads nothing holds
    // its connection's place for ever.
    conn.set_read_timeout(Some(idle))?;
    conn.set_write_timeout(Some(WRITE_STALL))?;
    let mut out = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    loop {
        line.clear();
        // Bounded: a client cannot make the VMM hold an endless line.
        let n = match (&mut reader).take(MAX_REQUEST + 1).read_line(&mut line) {
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                let answer = error(format!("no request for {} s: connection closed", idle.as_secs_f64()));
                return writeln!(out, "{answer}");
            }
            read => read?,
        };
        if n == 0 {
            return Ok(());
        }
        if n as u64 > MAX_REQUEST {
            let answer = error(format!("request longer than {MAX_REQUEST} bytes: connection closed"));
            return writeln!(out, "{answer}");
        }
        if line.trim().is_empty() {
            continue;
        }
        let answer = dispatch(line.trim_end(), running);
        writeln!(out, "{answer}")?;
    }
}

fn error(msg: impl std::fmt::Display) -> Value {
    json!({ "ok": false, "error": msg.to_string() })
}

/// Runs one request, returns the answer.
fn dispatch(line: &str, running: &Arc<Running>) -> Value {
    let request: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return error(format!("not a JSON object: {e}")),
    };
    let command = request.get("command").and_then(Value::as_str).unwrap_or("");
    // One command at a time may pause or resume the guest.
    let _exclusive = match command {
        "pause" | "resume" | "snapshot" | "migrate" => match running.exclusive() {
            Ok(guard) => {
                // Not while a migration runs, and a guest handed over to a
                // destination never runs here again (a snapshot, too, would
                // resume it when written): one look at the phase decides.
                // (A new migration while one runs is refused by its start.)
                match running.may_pause_or_resume() {
                    Err(RunningError::Migrating) if command == "migrate" => {}
                    Err(e) => return error(e),
                    Ok(()) => {}
                }
                Some(guard)
            }
            Err(e) => return error(e),
        },
        _ => None,
    };
    match command {
        "info" => {
            let mut info = running.info();
            info["ok"] = Value::Bool(true);
            info
        }
        "pause" => match running.pause() {
            Ok(_) => json!({ "ok": true }),
            Err(e) => error(chain(&e)),
        },
        "resume" => {
            running.resume();
            json!({ "ok": true })
        }
        "snapshot" => {
            let Some(dir) = request.get("dir").and_then(Value::as_str) else {
                return error("snapshot needs \"dir\"");
            };
            match running.snapshot(Path::new(dir)) {
                Ok(paused) => json!({ "ok": true, "paused_ms": paused.as_secs_f64() * 1e3 }),
                Err(e) => error(chain(&e)),
            }
        }
        "migrate" => {
            let Some(to) = request.get("to").and_then(Value::as_str) else {
                return error("migrate needs \"to\": tcp:HOST:PORT or unix:PATH");
            };
            let mut options = MigrateOptions::default();
            // Present but not a whole number in range: refused, not
            // silently replaced by the default.
            let number = |field: &str, max: u64| match request.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_u64().filter(|&n| n <= max).map(Some).ok_or_else(|| {
                    error(format!("migrate: \"{field}\" must be a whole number from 0 to {max}, not {v}"))
                }),
            };
            match number("downtime_ms", 3_600_000) {
                Ok(Some(ms)) => options.downtime = Duration::from_millis(ms),
                Ok(None) => {}
                Err(answer) => return answer,
            }
            match number("max_rounds", 1000) {
                Ok(Some(n)) => options.max_rounds = n as u32,
                Ok(None) => {}
                Err(answer) => return answer,
            }
            match to.parse().and_then(|to| send::start(running.clone(), to, options)) {
                Ok(()) => json!({ "ok": true }),
                Err(e) => error(chain(&e)),
            }
        }
        "cancel" => match send::cancel(running) {
            Ok(()) => json!({ "ok": true }),
            Err(e) => error(chain(&e)),
        },
        other => error(format!("unknown command {other:?}; commands: info, pause, resume, snapshot, migrate, cancel")),
    }
}

/// `nkvm ctl`: sends one request, prints the answer; with `wait`, for a
/// migration, polls `info` until it ends (or the source process has).
pub fn ctl(socket: &Path, request: Value, wait: bool) -> Result<std::process::ExitCode, Box<dyn std::error::Error>> {
    let answer = ask(socket, &request).map_err(|e| {
        format!("cannot reach an nkvm at {} (is `nkvm run --api-socket` running?): {e}", socket.display())
    })?;
    println!("{answer}");
    if answer.get("ok") != Some(&Value::Bool(true)) {
        return Ok(std::process::ExitCode::from(1));
    }
    if !wait {
        return Ok(std::process::ExitCode::SUCCESS);
    }
    loop {
        std::thread::sleep(Duration::from_millis(20));
        // Only a socket nobody listens on means the source has ended; an
        // answer lost otherwise (refused over the connection limit, say)
        // is asked for again.
        let Ok(conn) = UnixStream::connect(socket) else {
            // The source ends right after the destination took the guest.
            println!("{}", json!({ "ok": true, "phase": "done", "note": "the source process has ended" }));
            return Ok(std::process::ExitCode::SUCCESS);
        };
        let Ok(info) = exchange(conn, &json!({ "command": "info" })) else { continue };
        match info["migration"]["phase"].as_str() {
            Some("done") => {
                println!("{info}");
                return Ok(std::process::ExitCode::SUCCESS);
            }
            // In doubt: the source waits for the operator, not for time.
            Some("failed" | "in-doubt") => {
                println!("{info}");
                return Ok(std::process::ExitCode::from(1));
            }
            _ => {}
        }
    }
}

fn ask(socket: &Path, request: &Value) -> io::Result<Value> {
    exchange(UnixStream::connect(socket)?, request)
}

/// Sends `request` on `conn` and reads the answer. A refusal the VMM
/// wrote before closing is read even if the request could not be sent.
fn exchange(mut conn: UnixStream, request: &Value) -> io::Result<Value> {
    let sent = writeln!(conn, "{request}");
    let mut line = String::new();
    let read = BufReader::new(conn).read_line(&mut line);
    if line.is_empty() {
        sent?;
        read?;
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the VMM closed the API socket"));
    }
    serde_json::from_str(&line).map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin_machine::attach_devices;
    use crate::machine::Shared;
    use crate::snapshot::MachineConfig;

    /// A real VM with the built-in machine's devices, not started.
    fn running() -> Arc<Running> {
        let hv = nkvm::Hypervisor::open().unwrap();
        let vm =
            Arc::new(nkvm::Vm::new(&hv, &nkvm::VmConfig { vcpus: 1, memory: 4 << 20, ..Default::default() }).unwrap());
        let devices = attach_devices(&vm).unwrap();
        Arc::new(Running::new(vm, Arc::new(Shared::new(1)), devices, MachineConfig::builtin(1, 4 << 20)))
    }

    /// A slot is given back when its holder ends, by a panic too.
    #[test]
    fn a_connection_slot_comes_back_even_after_a_panic() {
        let open = Arc::new(AtomicUsize::new(0));
        let first = Slot::take(&open, 1).expect("a free slot");
        assert!(Slot::take(&open, 1).is_none(), "over the limit");
        let held = std::thread::spawn(move || {
            let _slot = first;
            panic!("a request handler that panics");
        });
        assert!(held.join().is_err());
        assert_eq!(open.load(Ordering::SeqCst), 0);
        assert!(Slot::take(&open, 1).is_some());
    }

    /// Connections beyond the limit are told so and closed; once one of
    /// those served closes, the next is served.
    #[test]
    fn connections_beyond_the_limit_are_refused_until_one_closes() {
        let running = running();
        let path = std::env::temp_dir().join(format!("nkvm-api-limit-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || serve_on(listener, running, 3, IDLE));
        // As `nkvm ctl` asks: a refusal is read even if the request could
        // not be sent (the VMM may close a refused connection first).
        let info = |conn: &mut UnixStream| -> Value {
            conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            exchange(conn.try_clone().unwrap(), &json!({ "command": "info" })).unwrap()
        };
        let mut held: Vec<UnixStream> = (0..3).map(|_| UnixStream::connect(&path).unwrap()).collect();
        for conn in &mut held {
            assert_eq!(info(conn)["ok"], true);
        }
        let mut extra = UnixStream::connect(&path).unwrap();
        let answer = info(&mut extra);
        assert!(answer["error"].as_str().unwrap().contains("too many API connections (3 open)"), "{answer}");
        drop(held.pop());
        // The served thread notices the close; then there is room again.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut next = UnixStream::connect(&path).unwrap();
            if info(&mut next)["ok"] == true {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "a closed connection's place never came back");
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_file(&path);
    }

    /// Migration options of the wrong type or out of range are refused by
    /// name, not replaced by their defaults.
    #[test]
    fn migrate_options_that_are_no_whole_number_in_range_are_refused() {
        let running = running();
        for (request, needle) in [
            (r#"{"command":"migrate","to":"unix:/x","downtime_ms":"5"}"#, "\"downtime_ms\" must be a whole number"),
            (r#"{"command":"migrate","to":"unix:/x","downtime_ms":-1}"#, "not -1"),
            (r#"{"command":"migrate","to":"unix:/x","max_rounds":5000}"#, "from 0 to 1000, not 5000"),
        ] {
            let answer = dispatch(request, &running);
            assert_eq!(answer["ok"], false, "{request}: {answer}");
            assert!(answer["error"].as_str().unwrap().contains(needle), "{request}: {answer}");
        }
    }

    /// While one command holds the guest (here: a snapshot being written),
    /// another that would pause or resume it is refused by name, not run
    /// across it; `info` still answers.
    #[test]
    fn commands_that_pause_or_resume_the_guest_wait_for_each_other() {
        let running = running();
        let snapshot_under_way = running.exclusive().unwrap();
        for request in [
            r#"{"command":"migrate","to":"unix:/nonexistent/nkvm.sock"}"#,
            r#"{"command":"snapshot","dir":"/nonexistent/snap"}"#,
            r#"{"command":"pause"}"#,
            r#"{"command":"resume"}"#,
        ] {
            let answer = dispatch(request, &running);
            assert_eq!(answer["ok"], false, "{request}: {answer}");
            assert!(answer["error"].as_str().unwrap().contains("another command is in progress"), "{answer}");
        }
        assert_eq!(dispatch(r#"{"command":"info"}"#, &running)["ok"], true);
        drop(snapshot_under_way);
        // Free again: the next command runs (and fails for its own reason).
        let answer = dispatch(r#"{"command":"migrate","to":"ftp:x"}"#, &running);
        assert!(answer["error"].as_str().unwrap().contains("bad migration address"), "{answer}");
    }

    /// Once a migration has handed the guest over (phase `done`, set before
    /// the vCPUs are stopped), nothing resumes it here: resume, snapshot,
    /// pause and a new migration are refused, naming where it went.
    #[test]
    fn a_guest_handed_over_to_a_destination_is_never_resumed_here() {
        let running = running();
        {
            let mut status = running.migration.lock().unwrap();
            status.phase = crate::migrate::Phase::Done;
            status.to = "tcp:127.0.0.1:4444".into();
        }
        for request in [
            r#"{"command":"resume"}"#,
            r#"{"command":"snapshot","dir":"/nonexistent/snap"}"#,
            r#"{"command":"pause"}"#,
            r#"{"command":"migrate","to":"unix:/nonexistent/nkvm.sock"}"#,
        ] {
            let answer = dispatch(request, &running);
            assert_eq!(answer["ok"], false, "{request}: {answer}");
            let msg = answer["error"].as_str().unwrap();
            assert!(msg.contains("migrated to tcp:127.0.0.1:4444 and runs there now"), "{request}: {answer}");
        }
    }

    /// A hand-over racing the command (the phase flipping between
    /// switch-over and done) never lets a resume through: the phase is
    /// looked at once.
    #[test]
    fn a_resume_racing_the_hand_over_is_refused_either_way() {
        use crate::migrate::Phase;
        let running = running();
        {
            let mut status = running.migration.lock().unwrap();
            status.to = "tcp:127.0.0.1:4444".into();
            status.phase = Phase::SwitchOver;
        }
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                while !stop.load(Ordering::SeqCst) {
                    for phase in [Phase::SwitchOver, Phase::Done] {
                        running.migration.lock().unwrap().phase = phase;
                    }
                }
            });
            for attempt in 0..200_000 {
                let answer = dispatch(r#"{"command":"resume"}"#, &running);
                if answer["ok"] != false {
                    stop.store(true, Ordering::SeqCst);
                    panic!("attempt {attempt}: {answer}");
                }
            }
            stop.store(true, Ordering::SeqCst);
        });
    }

    /// A client that connects and sends nothing is closed after the idle
    /// time, told why, and its place goes to the next client.
    #[test]
    fn an_idle_connection_is_closed_and_its_place_freed() {
        let running = running();
        let path = std::env::temp_dir().join(format!("nkvm-api-idle-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || serve_on(listener, running, 1, Duration::from_millis(200)));
        let idle = UnixStream::connect(&path).unwrap();
        idle.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut told = String::new();
        BufReader::new(idle.try_clone().unwrap()).read_to_string(&mut told).unwrap();
        assert!(told.contains("no request for 0.2 s: connection closed"), "{told}");
        let next = UnixStream::connect(&path).unwrap();
        next.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let answer = exchange(next.try_clone().unwrap(), &json!({ "command": "info" })).unwrap();
        assert_eq!(answer["ok"], true, "{answer}");
        let _ = std::fs::remove_file(&path);
    }
}
