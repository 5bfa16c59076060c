//! Live migration between two `nkvm` processes over loopback TCP and Unix
//! sockets, with the pattern guest (tests/pattern_guest) checking its own
//! memory on 2 vCPUs; a destination that dies mid-stream; bad streams.

mod nkvm_process;
mod pattern_guest;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use nkvm_process::{ctl, scratch, Vmm};
use pattern_guest::{check_console, check_memory, image, passes};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn source(dir: &Path, api: &Path) -> Vmm {
    let img = image(dir);
    Vmm::run(&[
        "--cpus",
        "2",
        "--memory",
        "16M",
        "--image",
        img.to_str().unwrap(),
        "--api-socket",
        api.to_str().unwrap(),
    ])
}

/// Starts `nkvm run --incoming ADDR --api-socket API` and waits until it listens.
fn destination(addr: &str, api: &Path) -> Vmm {
    let mut dest = Vmm::run(&["--incoming", addr, "--api-socket", api.to_str().unwrap()]);
    dest.wait_for("the destination to listen", |_, err| err.contains("waiting for a migration"));
    dest
}

/// Migrates `src` to a fresh destination at `addr` and checks the guest
/// there: memory as the guest wrote it, the console continued with no
/// line lost, the source ended. Returns the source's summary line.
fn migrate_and_check(dir: &Path, src: &mut Vmm, src_api: &Path, addr: &str, before: &str) -> String {
    let dest_api = dir.join("dest.sock");
    let mut dest = destination(addr, &dest_api);
    assert_eq!(ctl(src_api, &["migrate", addr])["ok"], true);
    assert!(src.wait_exit(), "the source ends with success: {}", src.stderr());
    let summary = src.stderr().lines().find(|l| l.contains("migrated to")).unwrap_or_default().to_string();
    assert!(!summary.is_empty(), "{}", src.stderr());
    dest.wait_for("the guest to resume", |_, err| err.contains("the guest resumes here"));
    let from_source = before.to_string() + &src.stdout()[before.len()..];
    dest.wait_passes(0, 3);
    ctl(&dest_api, &["pause"]);
    let snap = dir.join("dest-snap");
    ctl(&dest_api, &["snapshot", snap.to_str().unwrap()]);
    let gens = check_memory(&std::fs::read(snap.join("memory")).unwrap());
    let console = from_source.clone() + &dest.stdout();
    let p = check_console(&console);
    assert!(p.len() >= passes(&from_source).len() + 3);
    assert!(gens[0] >= p.last().unwrap().0, "{gens:?} {p:?}");
    dest.kill();
    summary
}

#[test]
fn live_migration_over_tcp_keeps_every_write_and_the_console() {
    let dir = scratch("migrate-tcp");
    let api = dir.join("src.sock");
    let mut src = source(&dir, &api);
    src.wait_passes(0, 3);
    let addr = format!("tcp:127.0.0.1:{}", free_port());
    let summary = migrate_and_check(&dir, &mut src, &api, &addr, "");
    eprintln!("{summary}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_destination_that_dies_mid_stream_leaves_the_source_running_and_a_second_migration_succeeds() {
    let dir = scratch("migrate-fail");
    let api = dir.join("src.sock");
    let mut src = source(&dir, &api);
    src.wait_passes(0, 2);

    // A destination that takes 1 MiB of the stream and dies.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp:{}", listener.local_addr().unwrap());
    let dying = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        conn.read_exact(&mut buf).unwrap();
    });
    assert_eq!(ctl(&api, &["migrate", &addr])["ok"], true);
    dying.join().unwrap();
    let info = wait_phase(&api, "failed");
    assert!(info["migration"]["error"].as_str().unwrap().contains("link failed"), "{info}");
    assert_eq!(info["state"], "running");
    let seen = passes(&src.stdout()).len();
    src.wait_passes(seen, 2);

    // A real destination killed (SIGKILL) in the middle of pre-copy: a
    // zero downtime target keeps the rounds going until it dies.
    let port = free_port();
    let addr = format!("tcp:127.0.0.1:{port}");
    let mut dest = destination(&addr, &dir.join("killed.sock"));
    let started = ctl(&api, &["migrate", &addr, "--downtime-ms", "0", "--max-rounds", "1000"]);
    assert_eq!(started["ok"], true);
    let info = wait_rounds(&api, 3);
    assert_eq!(info["migration"]["phase"], "precopy", "{info}");
    assert!(info["migration"]["pages"].as_u64().unwrap() > 0, "{info}");
    dest.kill();
    let info = wait_phase(&api, "failed");
    assert_eq!(info["state"], "running", "{info}");
    let seen = passes(&src.stdout()).len();
    src.wait_passes(seen, 2);

    // A destination that takes everything and dies before answering: the
    // source was paused waiting for the answer and resumes; a guest the
    // operator had paused before stays paused.
    for paused_before in [false, true] {
        if paused_before {
            assert_eq!(ctl(&api, &["pause"])["ok"], true);
        }
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("tcp:{}", listener.local_addr().unwrap());
        let silent = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            read_until_end(&mut conn);
        });
        assert_eq!(ctl(&api, &["migrate", &addr])["ok"], true);
        silent.join().unwrap();
        let info = wait_phase(&api, "failed");
        assert_eq!(info["migration"]["rounds"].as_u64().map(|r| r >= 1), Some(true), "{info}");
        let expected = if paused_before { "paused" } else { "running" };
        assert_eq!(info["state"], expected, "{info}");
        if paused_before {
            assert_eq!(ctl(&api, &["resume"])["ok"], true);
        }
        let seen = passes(&src.stdout()).len();
        src.wait_passes(seen, 2);
    }

    // The second real attempt, over a Unix socket, succeeds.
    let before = src.stdout();
    let addr = format!("unix:{}", dir.join("mig.sock").display());
    migrate_and_check(&dir, &mut src, &api, &addr, &before);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A destination that accepts, reads the stream's header and then nothing
/// more, keeping the connection open until [`Stalled::close`].
struct Stalled {
    addr: String,
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Stalled {
    fn listen() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("tcp:{}", listener.local_addr().unwrap());
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut header = [0u8; 16];
            conn.read_exact(&mut header).unwrap();
            let _ = stopped.recv();
        });
        Self { addr, stop, thread }
    }

    fn close(self) {
        self.stop.send(()).unwrap();
        self.thread.join().unwrap();
    }
}

/// A source (in a scratch directory named `name`, its API socket) whose
/// migration to a [`Stalled`] destination has started; a zero downtime
/// target keeps the rounds coming until the link fills.
fn migrating_to_a_stalled_destination(name: &str) -> (PathBuf, PathBuf, Vmm, Stalled) {
    let dir = scratch(name);
    let api = dir.join("src.sock");
    let mut src = source(&dir, &api);
    src.wait_passes(0, 1);
    let stalled = Stalled::listen();
    let addr = stalled.addr.clone();
    assert_eq!(ctl(&api, &["migrate", &addr, "--downtime-ms", "0", "--max-rounds", "1000"])["ok"], true);
    (dir, api, src, stalled)
}

/// A destination that accepts and then stops reading (hung, stopped) holds
/// the source only for the send timeout (10 s per blocked send): the
/// migration fails with a timeout, the guest runs on, and the API is free
/// again.
#[test]
fn a_destination_that_stops_reading_fails_the_migration_at_the_send_timeout() {
    let (dir, api, mut src, stalled) = migrating_to_a_stalled_destination("migrate-stall");
    let info = wait_phase(&api, "failed");
    stalled.close();
    assert!(info["migration"]["error"].as_str().unwrap().contains("timed out"), "{info}");
    assert_eq!(info["state"], "running", "{info}");
    assert_eq!(ctl(&api, &["pause"])["ok"], true, "the API takes commands again");
    assert_eq!(ctl(&api, &["resume"])["ok"], true);
    let seen = passes(&src.stdout()).len();
    src.wait_passes(seen, 2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A destination host that drops the connection request (here its accept
/// queue is full; a firewall that drops it does the same) fails the
/// migration at the connect timeout (10 s), not after the kernel's two
/// minutes of retries, which held the API (and `cancel`) all that time.
#[test]
fn a_destination_that_never_takes_the_connection_fails_the_migration_at_the_connect_timeout() {
    use std::os::fd::AsRawFd;
    let dir = scratch("migrate-connect");
    let api = dir.join("src.sock");
    let mut src = source(&dir, &api);
    src.wait_passes(0, 1);
    let full = TcpListener::bind("127.0.0.1:0").unwrap();
    // SAFETY: listen(2) on the listener's own open socket. A backlog of 0
    // queues one connection; the next connection request is dropped.
    assert_eq!(unsafe { libc::listen(full.as_raw_fd(), 0) }, 0);
    let addr = full.local_addr().unwrap();
    let _queued = std::net::TcpStream::connect(addr).unwrap();
    let start = std::time::Instant::now();
    assert_eq!(ctl(&api, &["migrate", &format!("tcp:{addr}")])["ok"], true);
    let info = wait_phase(&api, "failed");
    let took = start.elapsed();
    assert!(info["migration"]["error"].as_str().unwrap().contains("timed out"), "{info}");
    // The kernel alone would retry for about 127 s.
    assert!(took < std::time::Duration::from_secs(60), "gave up only after {took:?}: {info}");
    assert_eq!(info["state"], "running", "{info}");
    let seen = passes(&src.stdout()).len();
    src.wait_passes(seen, 2);
    drop(full);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `nkvm ctl cancel` ends a migration before its switch-over at once, even
/// one blocked on a destination that stopped reading: the guest runs on,
/// and a second cancel is refused by name.
#[test]
fn an_operator_cancels_a_migration_stuck_on_a_stalled_destination() {
    let (dir, api, mut src, stalled) = migrating_to_a_stalled_destination("migrate-cancel");
    // In its first round (the full copy), blocked on the full link.
    wait_phase(&api, "precopy");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(ctl(&api, &["cancel"])["ok"], true);
    let info = wait_phase(&api, "failed");
    stalled.close();
    assert!(info["migration"]["error"].as_str().unwrap().contains("cancelled by the operator"), "{info}");
    assert_eq!(info["state"], "running", "{info}");
    let seen = passes(&src.stdout()).len();
    src.wait_passes(seen, 2);
    let out = nkvm_process::nkvm().args(["ctl", "--api-socket", api.to_str().unwrap(), "cancel"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no migration is running"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The link drops at the commit: a proxy between the source and a real
/// destination forwards everything but the source's `GO` (type 7), and
/// cuts both sides there. The destination never heard `GO`, so it must not
/// run the guest; the source sent it, so it cannot know: it keeps the guest
/// paused ("in-doubt") until the operator resumes it (`ctl migrate --wait`
/// returns, failed), and a later migration still works.
#[test]
fn a_link_lost_at_the_commit_never_runs_the_guest_twice() {
    let dir = scratch("migrate-commit");
    let api = dir.join("src.sock");
    let mut src = source(&dir, &api);
    src.wait_passes(0, 2);
    let dest_addr = format!("tcp:127.0.0.1:{}", free_port());
    let mut dest = destination(&dest_addr, &dir.join("dest.sock"));
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_addr = format!("tcp:{}", proxy.local_addr().unwrap());
    let dest_port = dest_addr.rsplit(':').next().unwrap().to_string();
    let cut = std::thread::spawn(move || {
        let (mut from_src, _) = proxy.accept().unwrap();
        let mut to_dest = std::net::TcpStream::connect(format!("127.0.0.1:{dest_port}")).unwrap();
        let (mut back_from, mut back_to) = (to_dest.try_clone().unwrap(), from_src.try_clone().unwrap());
        std::thread::spawn(move || std::io::copy(&mut back_from, &mut back_to));
        let mut header = [0u8; 16];
        from_src.read_exact(&mut header).unwrap();
        to_dest.write_all(&header).unwrap();
        loop {
            let mut head = [0u8; 5];
            from_src.read_exact(&mut head).unwrap();
            if head[0] == 7 {
                // GO: never delivered.
                let _ = to_dest.shutdown(std::net::Shutdown::Both);
                let _ = from_src.shutdown(std::net::Shutdown::Both);
                return;
            }
            let mut payload = vec![0u8; u32::from_le_bytes(head[1..].try_into().unwrap()) as usize];
            from_src.read_exact(&mut payload).unwrap();
            to_dest.write_all(&head).unwrap();
            to_dest.write_all(&payload).unwrap();
        }
    });
    // `--wait` returns once the migration is in doubt, with exit status 1.
    let mut waiting = nkvm_process::nkvm()
        .args(["ctl", "--api-socket", api.to_str().unwrap(), "migrate", "--wait", &proxy_addr])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let since = std::time::Instant::now();
    while waiting.try_wait().unwrap().is_none() {
        if since.elapsed() > std::time::Duration::from_secs(300) {
            let _ = waiting.kill();
            panic!("`ctl migrate --wait` still waiting after 300 s: {}", ctl(&api, &["info"]));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let waited = waiting.wait_with_output().unwrap();
    cut.join().unwrap();
    let said = String::from_utf8_lossy(&waited.stdout);
    assert_eq!(waited.status.code(), Some(1), "`ctl migrate --wait` on a migration in doubt: {said}");
    assert!(said.lines().last().is_some_and(|l| l.contains("\"in-doubt\"")), "{said}");
    // The destination was ready and never told to run: it ends, unrun.
    assert!(!dest.wait_exit(), "the destination must fail: {}", dest.stderr());
    assert!(dest.stderr().contains("GO") || dest.stderr().contains("link failed"), "{}", dest.stderr());
    assert!(!dest.stderr().contains("the guest resumes here"), "{}", dest.stderr());
    assert!(dest.stdout().is_empty(), "the guest never ran there: {:?}", dest.stdout());
    // The source cannot know: paused, in doubt, and it says what to do.
    let info = wait_phase(&api, "in-doubt");
    assert_eq!(info["state"], "paused", "{info}");
    assert!(info["migration"]["error"].as_str().unwrap().contains("nkvm ctl resume"), "{info}");
    let quiet = src.stdout().len();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(src.stdout().len(), quiet, "a guest in doubt stays paused");
    // Nor does it migrate again before the operator has decided.
    let addr = format!("tcp:127.0.0.1:{}", free_port());
    let out = nkvm_process::nkvm().args(["ctl", "--api-socket", api.to_str().unwrap(), "migrate", &addr]).output();
    let answer = String::from_utf8_lossy(&out.unwrap().stdout).into_owned();
    assert!(answer.contains("the last migration is in doubt"), "{answer}");
    // The operator knows the destination is gone: resume here.
    assert_eq!(ctl(&api, &["resume"])["ok"], true);
    let seen = passes(&src.stdout()).len();
    src.wait_passes(seen, 2);
    // And a migration after it completes.
    let before = src.stdout();
    let addr = format!("tcp:127.0.0.1:{}", free_port());
    migrate_and_check(&dir, &mut src, &api, &addr, &before);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Polls `info` until the migration reaches `phase`.
fn wait_phase(api: &Path, phase: &str) -> serde_json::Value {
    let start = std::time::Instant::now();
    loop {
        let info = ctl(api, &["info"]);
        if info["migration"]["phase"] == phase {
            return info;
        }
        assert!(start.elapsed().as_secs() < 300, "{info}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Polls `info` until the migration has done `rounds` rounds.
fn wait_rounds(api: &Path, rounds: u64) -> serde_json::Value {
    let start = std::time::Instant::now();
    loop {
        let info = ctl(api, &["info"]);
        if info["migration"]["rounds"].as_u64().unwrap_or(0) >= rounds {
            return info;
        }
        assert!(start.elapsed().as_secs() < 300, "{info}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Reads a migration stream up to its END record (type 6).
fn read_until_end(conn: &mut impl Read) {
    let mut header = [0u8; 16];
    conn.read_exact(&mut header).unwrap();
    assert_eq!(&header[..8], b"NKVMMIG\0");
    loop {
        let mut head = [0u8; 5];
        conn.read_exact(&mut head).unwrap();
        let len = u32::from_le_bytes(head[1..].try_into().unwrap());
        let mut payload = vec![0u8; len as usize];
        conn.read_exact(&mut payload).unwrap();
        if head[0] == 6 {
            return;
        }
    }
}

#[test]
fn a_bad_stream_is_refused_with_an_error() {
    let dir = scratch("migrate-bad");
    let port = free_port();
    let mut dest = destination(&format!("tcp:127.0.0.1:{port}"), &dir.join("d.sock"));
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer);
    assert_eq!(answer.first(), Some(&0x81), "a FAILED answer: {answer:?}");
    assert!(String::from_utf8_lossy(&answer).contains("not an nkvm migration stream"));
    // Refused before anything was taken: the destination waits on, through
    // a client that connects and hangs up too, for the real source.
    let refused = |n: usize| move |_: &str, err: &str| err.matches("still waiting for a migration").count() >= n;
    dest.wait_for("the refusal", refused(1));
    assert!(dest.stderr().contains("not an nkvm migration stream"), "{}", dest.stderr());
    drop(std::net::TcpStream::connect(("127.0.0.1", port)).unwrap());
    dest.wait_for("the second refusal", refused(2));
    let api = dir.join("src.sock");
    let mut src = source(&dir, &api);
    src.wait_passes(0, 1);
    let snap = dir.join("snap");
    assert_eq!(ctl(&api, &["snapshot", snap.to_str().unwrap()])["ok"], true);
    // A client that connects and says nothing holds the destination for the
    // configuration's deadline (4 s) at most: the source, queued behind it,
    // is still taken within its own send timeout (10 s).
    let silent = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(ctl(&api, &["migrate", &format!("tcp:127.0.0.1:{port}")])["ok"], true);
    assert!(src.wait_exit(), "the source ends with success: {}", src.stderr());
    dest.wait_for("the guest to resume", |_, err| err.contains("the guest resumes here"));
    assert!(dest.stderr().contains("took longer than 4s"), "{}", dest.stderr());
    drop(silent);
    dest.kill();

    // Well-formed records a source would never send, after a real
    // machine's configuration (a snapshot's machine.json): taken after the
    // configuration, they end the destination.
    let config = std::fs::read(snap.join("machine.json")).unwrap();
    let record = |kind: u8, payload: &[u8]| [&[kind][..], &(payload.len() as u32).to_le_bytes(), payload].concat();
    let vcpu = std::fs::read(snap.join("vcpu-0.state")).unwrap();
    let top_page =
        [&2u32.to_le_bytes()[..], &0xffff_ffff_ffff_f001u64.to_le_bytes(), &0x1001u64.to_le_bytes()].concat();
    // 1048575 zero pages from address 0 on: 4 GiB claimed by an 8 MiB record.
    let claim = 1_048_575u32;
    let zeros: Vec<u8> = (0..u64::from(claim)).flat_map(|i| ((i << 12) | 1).to_le_bytes()).collect();
    let junk_device = [&[1u8, b'x'][..], &vec![0x5a; (8 << 20) - 2]].concat();
    for (name, records, expect) in [
        ("a zero page at the top of the address space", record(2, &top_page), "outside guest memory"),
        (
            "zero pages running 4 GiB past guest memory",
            record(2, &[&claim.to_le_bytes()[..], &zeros].concat()),
            "outside guest memory",
        ),
        ("nine 8 MiB device states", vec![record(5, &junk_device); 9].concat(), "more than 64 MiB in all"),
        (
            "a third vCPU state for 2 vCPUs",
            [record(4, &vcpu), record(4, &vcpu), record(4, &vcpu)].concat(),
            "more vCPU states than the machine's 2 vCPUs",
        ),
    ] {
        let port = free_port();
        let mut dest = destination(&format!("tcp:127.0.0.1:{port}"), &dir.join(format!("{port}.sock")));
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let header = [&b"NKVMMIG\0"[..], &2u16.to_le_bytes(), &[0, 0], &4096u32.to_le_bytes()].concat();
        conn.write_all(&[header, record(1, &config), records].concat()).unwrap();
        let mut answer = Vec::new();
        let _ = conn.read_to_end(&mut answer);
        let text = String::from_utf8_lossy(&answer);
        assert_eq!(answer.first(), Some(&0x81), "{name}: a FAILED answer: {text}");
        assert!(text.contains(expect), "{name}: {text}");
        assert!(!dest.wait_exit(), "{name}");
        assert!(!dest.stderr().contains("panicked"), "{name}: {}", dest.stderr());
    }
    // A machine claiming more RAM than this host has (KVM would take kernel
    // memory for it up front) is refused before its VM is made, and the
    // destination waits on.
    let text = String::from_utf8(config).unwrap();
    let at = text.find("\"memory\": ").unwrap() + "\"memory\": ".len();
    let end = at + text[at..].find(|c: char| !c.is_ascii_digit()).unwrap();
    let huge = format!("{}{}{}", &text[..at], 1u64 << 50, &text[end..]);
    let port = free_port();
    let mut dest = destination(&format!("tcp:127.0.0.1:{port}"), &dir.join("huge.sock"));
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let header = [&b"NKVMMIG\0"[..], &2u16.to_le_bytes(), &[0, 0], &4096u32.to_le_bytes()].concat();
    conn.write_all(&[header, record(1, huge.as_bytes())].concat()).unwrap();
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    assert!(text.contains("1073741824 MiB of RAM, more than this host's"), "{text}");
    dest.wait_for("the refusal", |_, err| err.contains("still waiting for a migration"));
    dest.kill();
    let _ = std::fs::remove_dir_all(&dir);
}
