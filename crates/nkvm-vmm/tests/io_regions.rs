//! MMIO and PIO regions served by device models in other processes
//! (`nkvm device`), with real guests: every access size, posted writes and
//! their ordering across regions, and devices that die, stall or lie.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use nkvm::io::{IoRange, Ordering, SocketOptions};
use nkvm::{Exit, GuestAddress, Hypervisor, LongMode, RunState, Vcpu, Vm, VmConfig};

const ENTRY: u64 = 0x10_0000;
const TABLES: u64 = 0x2_0000;
const MMIO_A: u64 = 0xd000_0000;
const MMIO_B: u64 = 0xd001_0000;
const PIO: u16 = 0x500;
const SCRATCH0: u64 = 0x20;
const WRITE_COUNT: u64 = 0x08;
const ID: u64 = u64::from_le_bytes(*b"nkvmtest");

fn vm() -> Vm {
    Vm::new(&Hypervisor::open().expect("/dev/kvm"), &VmConfig { vcpus: 1, memory: 16 << 20, ..Default::default() })
        .expect("VM")
}

fn guest(vm: &Vm, body: impl FnOnce(&mut CodeAssembler)) -> Vcpu {
    let mut a = CodeAssembler::new(64).unwrap();
    body(&mut a);
    a.hlt().unwrap();
    vm.write_memory(GuestAddress(ENTRY), &a.assemble(ENTRY).unwrap()).unwrap();
    let lm = LongMode::install(&vm.memory(), GuestAddress(TABLES)).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_long_mode(&lm, GuestAddress(ENTRY), GuestAddress(0x9_0000)).unwrap();
    vcpu
}

/// Runs to `hlt`, returning the values of `out 0x10, eax` (unattached port)
/// and any other exit.
fn run(vcpu: &mut Vcpu) -> Vec<Exit> {
    let mut run = RunState::new();
    let mut exits = Vec::new();
    loop {
        match vcpu.enter_guest(&mut run).unwrap() {
            Exit::Hlt => return exits,
            e @ (Exit::Shutdown | Exit::InternalError(_)) => panic!("guest failed: {e} after {exits:?}"),
            e @ (Exit::MmioRead { .. } | Exit::IoIn { .. }) => {
                run.complete_read(0);
                exits.push(e);
            }
            e => exits.push(e),
        }
    }
}

fn outs(exits: &[Exit]) -> Vec<u64> {
    exits.iter().filter_map(|e| if let Exit::IoOut { port: 0x10, data, .. } = e { Some(*data) } else { None }).collect()
}

/// A device process (`nkvm device`), killed when dropped.
struct DeviceProcess {
    child: Child,
    socket: PathBuf,
}

impl DeviceProcess {
    fn spawn(dir: &Path, name: &str, log: Option<&Path>) -> DeviceProcess {
        let socket = dir.join(format!("{name}.sock"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nkvm"));
        cmd.args(["device", "--model", "test", "--name", name, "--socket"]).arg(&socket);
        if let Some(log) = log {
            cmd.arg("--log").arg(log);
        }
        let child = cmd.spawn().expect("spawn nkvm device");
        DeviceProcess { child, socket }
    }

    fn connect(&self) -> UnixStream {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match UnixStream::connect(&self.socket) {
                Ok(s) => return s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("device at {} never listened: {e}", self.socket.display()),
            }
        }
    }
}

impl Drop for DeviceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Guest code: writes 1..=`writes` to the test device's scratch register
/// 0 at [`MMIO_A`], leaving `rbx` at the region.
fn posted_burst(a: &mut CodeAssembler, writes: u64) {
    a.mov(rbx, MMIO_A).unwrap();
    a.mov(ecx, 1u32).unwrap();
    let mut again = a.create_label();
    a.set_label(&mut again).unwrap();
    a.mov(qword_ptr(rbx + SCRATCH0), rcx).unwrap();
    a.inc(ecx).unwrap();
    a.cmp(ecx, writes as u32).unwrap();
    a.jbe(again).unwrap();
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nkvm-io-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn out_of_process_mmio_and_pio_of_every_size() {
    let dir = tempdir("sizes");
    let (mmio_dev, pio_dev) = (DeviceProcess::spawn(&dir, "mmio", None), DeviceProcess::spawn(&dir, "pio", None));
    let vm = vm();
    vm.attach_region(IoRange::mmio(MMIO_A, 0x40), mmio_dev.connect(), Ordering::Sync).unwrap();
    vm.attach_region(IoRange::pio(PIO, 0x40), pio_dev.connect(), Ordering::Sync).unwrap();
    let mut vcpu = guest(&vm, |a| {
        a.mov(rbx, MMIO_A).unwrap();
        a.mov(rax, qword_ptr(rbx)).unwrap(); // ID
        a.out(0x10, eax).unwrap();
        a.shr(rax, 32).unwrap();
        a.out(0x10, eax).unwrap();
        a.mov(byte_ptr(rbx + SCRATCH0), 0x11).unwrap();
        a.movzx(eax, byte_ptr(rbx + SCRATCH0)).unwrap();
        a.out(0x10, eax).unwrap();
        a.mov(word_ptr(rbx + SCRATCH0), 0x2233).unwrap();
        a.movzx(eax, word_ptr(rbx + SCRATCH0)).unwrap();
        a.out(0x10, eax).unwrap();
        a.mov(dword_ptr(rbx + SCRATCH0), 0x4455_6677).unwrap();
        a.mov(eax, dword_ptr(rbx + SCRATCH0)).unwrap();
        a.out(0x10, eax).unwrap();
        a.mov(rax, 0x0102_0304_0506_0708u64).unwrap();
        a.mov(qword_ptr(rbx + SCRATCH0), rax).unwrap();
        a.mov(rcx, qword_ptr(rbx + SCRATCH0)).unwrap();
        a.cmp(rcx, rax).unwrap();
        a.sete(al).unwrap();
        a.movzx(eax, al).unwrap();
        a.out(0x10, eax).unwrap();
        // Ports: 1, 2 and 4 bytes into SCRATCH0 of the PIO device.
        a.mov(dx, (PIO + SCRATCH0 as u16) as u32).unwrap();
        a.mov(al, 0x99).unwrap();
        a.out(dx, al).unwrap();
        a.in_(al, dx).unwrap();
        a.movzx(eax, al).unwrap();
        a.out(0x10, eax).unwrap();
        a.mov(ax, 0xabcdu32).unwrap();
        a.out(dx, ax).unwrap();
        a.in_(ax, dx).unwrap();
        a.movzx(eax, ax).unwrap();
        a.out(0x10, eax).unwrap();
        a.mov(eax, 0xfeed_f00du32).unwrap();
        a.out(dx, eax).unwrap();
        a.in_(eax, dx).unwrap();
        a.out(0x10, eax).unwrap();
    });
    let exits = run(&mut vcpu);
    assert_eq!(
        outs(&exits),
        vec![ID & 0xffff_ffff, ID >> 32, 0x11, 0x2233, 0x4455_6677, 1, 0x99, 0xabcd, 0xfeed_f00d],
        "{exits:?}"
    );
    assert_eq!(exits.len(), 9, "only the unattached port exits: {exits:?}");
}

#[test]
fn posted_writes_then_a_read_see_every_write_in_order() {
    let dir = tempdir("posted");
    let log = dir.join("access.log");
    let dev = DeviceProcess::spawn(&dir, "a", Some(&log));
    let vm = vm();
    vm.attach_region(IoRange::mmio(MMIO_A, 0x40), dev.connect(), Ordering::Posted).unwrap();
    let mut vcpu = guest(&vm, |a| {
        posted_burst(a, 100);
        a.mov(rax, qword_ptr(rbx + WRITE_COUNT)).unwrap();
        a.out(0x10, eax).unwrap();
        a.mov(rax, qword_ptr(rbx + SCRATCH0)).unwrap();
        a.out(0x10, eax).unwrap();
    });
    let exits = run(&mut vcpu);
    assert_eq!(outs(&exits), vec![100, 100]);
    drop(vm);
    drop(dev);
    let text = std::fs::read_to_string(&log).unwrap();
    let writes: Vec<u64> = text
        .lines()
        .filter(|l| l.starts_with("a W 0x20 "))
        .map(|l| u64::from_str_radix(l.rsplit(' ').next().unwrap().trim_start_matches("0x"), 16).unwrap())
        .collect();
    assert_eq!(writes, (1..=100).collect::<Vec<_>>(), "the device saw every posted write, in order");
}

/// Counts the MMIO write exits a vCPU's tracer sees.
#[derive(Clone, Default)]
struct MmioWrites(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl nkvm::Tracer for MmioWrites {
    fn on_exit(&mut self, record: &nkvm::ExitRecord) {
        if let Exit::MmioWrite { .. } = record.exit {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

#[test]
fn a_burst_of_posted_writes_reaches_the_device_without_an_exit_per_write() {
    const WRITES: u64 = 1000;
    let dir = tempdir("burst");
    let log = dir.join("access.log");
    let dev = DeviceProcess::spawn(&dir, "a", Some(&log));
    let vm = vm();
    vm.attach_region(IoRange::mmio(MMIO_A, 0x40), dev.connect(), Ordering::Posted).unwrap();
    let mut vcpu = guest(&vm, |a| {
        posted_burst(a, WRITES);
        // A sync read flushes what is still queued before it is served.
        a.mov(rax, qword_ptr(rbx + WRITE_COUNT)).unwrap();
        a.out(0x10, eax).unwrap();
    });
    let seen = MmioWrites::default();
    vcpu.add_tracer(Box::new(seen.clone()));
    let exits = run(&mut vcpu);
    assert_eq!(outs(&exits), vec![WRITES]);
    // The writes go to KVM's coalesced ring; only a full ring (about 170
    // entries) sends one write out as an exit, which is served after the
    // ring's earlier entries.
    let write_exits = seen.0.load(std::sync::atomic::Ordering::Relaxed) as u64;
    assert!(write_exits <= WRITES / 50, "{write_exits} MMIO write exits for {WRITES} posted writes");
    drop(vm);
    drop(dev);
    let text = std::fs::read_to_string(&log).unwrap();
    let writes: Vec<u64> = text
        .lines()
        .filter(|l| l.starts_with("a W 0x20 "))
        .map(|l| u64::from_str_radix(l.rsplit(' ').next().unwrap().trim_start_matches("0x"), 16).unwrap())
        .collect();
    assert_eq!(writes, (1..=WRITES).collect::<Vec<_>>(), "the device saw every posted write, in order");
}

#[test]
fn posted_writes_to_one_region_are_served_before_a_sync_read_of_another() {
    let dir = tempdir("cross");
    let log = dir.join("access.log");
    let (a_dev, b_dev) = (DeviceProcess::spawn(&dir, "a", Some(&log)), DeviceProcess::spawn(&dir, "b", Some(&log)));
    let vm = vm();
    vm.attach_region(IoRange::mmio(MMIO_A, 0x40), a_dev.connect(), Ordering::Posted).unwrap();
    vm.attach_region(IoRange::mmio(MMIO_B, 0x40), b_dev.connect(), Ordering::Sync).unwrap();
    let mut vcpu = guest(&vm, |a| {
        a.mov(rbx, MMIO_A).unwrap();
        a.mov(rdx, MMIO_B).unwrap();
        a.mov(ecx, 50u32).unwrap();
        let mut again = a.create_label();
        a.set_label(&mut again).unwrap();
        a.mov(qword_ptr(rbx + SCRATCH0), rcx).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(again).unwrap();
        a.mov(rax, qword_ptr(rdx)).unwrap(); // B's ID: a sync read of another region
        a.out(0x10, eax).unwrap();
    });
    let exits = run(&mut vcpu);
    assert_eq!(outs(&exits), vec![ID & 0xffff_ffff]);
    drop(vm);
    drop((a_dev, b_dev));
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let b_read = lines.iter().position(|l| l.starts_with("b R")).expect("B's read is logged");
    let a_writes: Vec<usize> = lines.iter().enumerate().filter(|(_, l)| l.starts_with("a W")).map(|(i, _)| i).collect();
    assert_eq!(a_writes.len(), 50, "{text}");
    assert!(a_writes.iter().all(|&i| i < b_read), "a posted write reached A after B's read:\n{text}");
}

#[test]
fn a_killed_device_reads_all_ones_and_is_reported() {
    let dir = tempdir("kill");
    let mut dev = DeviceProcess::spawn(&dir, "victim", None);
    let vm = vm();
    let id = vm.attach_region(IoRange::mmio(MMIO_A, 0x40), dev.connect(), Ordering::Sync).unwrap();
    let mut vcpu = guest(&vm, |a| {
        a.mov(rbx, MMIO_A).unwrap();
        a.mov(eax, dword_ptr(rbx)).unwrap();
        a.out(0x10, eax).unwrap(); // the test kills the device here
        a.mov(eax, dword_ptr(rbx)).unwrap();
        a.out(0x10, eax).unwrap();
        a.mov(dword_ptr(rbx + SCRATCH0), eax).unwrap(); // dropped
        a.mov(eax, dword_ptr(rbx)).unwrap();
        a.out(0x10, eax).unwrap();
    });
    let mut run = RunState::new();
    assert_eq!(vcpu.enter_guest(&mut run).unwrap(), Exit::IoOut { port: 0x10, size: 4, data: ID & 0xffff_ffff });
    dev.child.kill().unwrap();
    dev.child.wait().unwrap();
    assert_eq!(vcpu.enter_guest(&mut run).unwrap(), Exit::IoRegionFailed { id });
    assert_eq!(vcpu.enter_guest(&mut run).unwrap(), Exit::IoOut { port: 0x10, size: 4, data: 0xffff_ffff });
    assert_eq!(vcpu.enter_guest(&mut run).unwrap(), Exit::IoOut { port: 0x10, size: 4, data: 0xffff_ffff });
    assert_eq!(vcpu.enter_guest(&mut run).unwrap(), Exit::Hlt);
    let failures = vm.io_region_failures();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].id, id);
    assert!(failures[0].name.contains("0xd0000000"), "{failures:?}");
}

#[test]
fn a_device_that_sends_garbage_is_disconnected_with_an_error() {
    use nkvm_wire::handshake::VersionRange;
    use nkvm_wire::ioregion::device_handshake;
    let vm = vm();
    // Garbage instead of a handshake: attach fails, naming the range.
    let (vm_end, mut dev_end) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || {
        let _ = dev_end.write_all(b"this is not a hello at all, not even close....");
        dev_end
    });
    let err = vm.attach_region(IoRange::mmio(MMIO_A, 0x40), vm_end, Ordering::Sync).unwrap_err();
    assert!(err.to_string().contains("mmio 0xd0000000+0x40"), "{err}");
    drop(t.join());
    // A proper handshake, then garbage as the reply to the first request.
    let (vm_end, dev_end) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || {
        let mut reader = dev_end.try_clone().unwrap();
        let mut writer = dev_end;
        device_handshake(&mut reader, &mut writer, VersionRange::CURRENT).unwrap();
        let mut req = [0u8; 40];
        let _ = std::io::Read::read(&mut reader, &mut req);
        let _ = writer.write_all(&[0xde; 64]);
        std::thread::sleep(Duration::from_millis(200));
    });
    let id = vm.attach_region(IoRange::mmio(MMIO_A, 0x40), vm_end, Ordering::Sync).unwrap();
    let mut vcpu = guest(&vm, |a| {
        a.mov(rbx, MMIO_A).unwrap();
        a.mov(eax, dword_ptr(rbx)).unwrap();
        a.out(0x10, eax).unwrap();
    });
    let mut run = RunState::new();
    assert_eq!(vcpu.enter_guest(&mut run).unwrap(), Exit::IoRegionFailed { id });
    assert_eq!(vcpu.enter_guest(&mut run).unwrap(), Exit::IoOut { port: 0x10, size: 4, data: 0xffff_ffff });
    let failures = vm.io_region_failures();
    assert!(!failures[0].reason.is_empty(), "{failures:?}");
    t.join().unwrap();
}

#[test]
fn a_device_that_stops_answering_times_out() {
    use nkvm_wire::handshake::VersionRange;
    use nkvm_wire::ioregion::device_handshake;
    let vm = vm();
    let (vm_end, dev_end) = UnixStream::pair().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let t = std::thread::spawn(move || {
        let mut reader = dev_end.try_clone().unwrap();
        let mut writer = dev_end;
        device_handshake(&mut reader, &mut writer, VersionRange::CURRENT).unwrap();
        let _ = rx.recv(); // never answers
    });
    let options =
        SocketOptions { timeout: Duration::from_millis(200), name: Some("staller".into()), ..Default::default() };
    let id = vm.attach_region_with(IoRange::pio(PIO, 8), vm_end, options).unwrap();
    let mut vcpu = guest(&vm, |a| {
        a.mov(dx, PIO as u32).unwrap();
        a.in_(al, dx).unwrap();
        a.movzx(eax, al).unwrap();
        a.out(0x10, eax).unwrap();
    });
    let mut run = RunState::new();
    assert_eq!(vcpu.enter_guest(&mut run).unwrap(), Exit::IoRegionFailed { id });
    assert_eq!(vcpu.enter_guest(&mut run).unwrap(), Exit::IoOut { port: 0x10, size: 4, data: 0xff });
    let failures = vm.io_region_failures();
    assert_eq!(failures[0].name, "staller");
    assert!(failures[0].reason.contains("did not answer in time"), "{failures:?}");
    drop(tx);
    t.join().unwrap();
}

#[test]
fn a_detached_region_exits_to_the_caller_again() {
    let dir = tempdir("detach");
    let dev = DeviceProcess::spawn(&dir, "d", None);
    let vm = vm();
    let id = vm.attach_region(IoRange::mmio(MMIO_A, 0x40), dev.connect(), Ordering::Posted).unwrap();
    let mut vcpu = guest(&vm, |a| {
        a.mov(rbx, MMIO_A).unwrap();
        a.mov(eax, dword_ptr(rbx)).unwrap();
        a.out(0x10, eax).unwrap();
        a.mov(eax, dword_ptr(rbx)).unwrap();
        a.out(0x10, eax).unwrap();
    });
    let mut run = RunState::new();
    assert_eq!(vcpu.enter_guest(&mut run).unwrap(), Exit::IoOut { port: 0x10, size: 4, data: ID & 0xffff_ffff });
    vm.detach_region(id).unwrap();
    assert_eq!(vcpu.enter_guest(&mut run).unwrap(), Exit::MmioRead { addr: GuestAddress(MMIO_A), size: 4 });
    run.complete_mmio_read(7);
    assert_eq!(vcpu.enter_guest(&mut run).unwrap(), Exit::IoOut { port: 0x10, size: 4, data: 7 });
    assert!(vm.detach_region(id).is_err());
}

#[test]
fn a_device_process_state_holds_every_posted_write_goes_back_and_a_dead_one_is_named() {
    const WRITES: u64 = 500;
    let dir = tempdir("state");
    let dev = DeviceProcess::spawn(&dir, "a", None);
    let vm = vm();
    let id = vm.attach_region(IoRange::mmio(MMIO_A, 0x40), dev.connect(), Ordering::Posted).unwrap();
    let local = vm.attach_handler(IoRange::pio(PIO, 4), Box::new(Nothing)).unwrap();
    let mut vcpu = guest(&vm, |a| {
        posted_burst(a, WRITES);
    });
    run(&mut vcpu);
    // No read followed the posted writes: they went out before the exit
    // `run` returned on, and the state, asked for in the same stream,
    // holds them all.
    let state = vm.region_state(id).unwrap();
    let mut copy = nkvm_devices::test_device::TestDevice::new();
    nkvm_devices::Snapshot::restore(&mut copy, &state).unwrap();
    assert_eq!(copy.scratch(0), Some(WRITES), "the last posted write is in the state");
    assert_eq!(copy.writes(), WRITES, "and every one before it");

    // A state goes the other way: the process takes it, or refuses it
    // with its model's reason and goes on as it was.
    let mut other = nkvm_devices::test_device::TestDevice::new();
    nkvm_devices::IoDevice::write(&mut other, SCRATCH0, &7u64.to_le_bytes());
    vm.region_load_state(id, &nkvm_devices::Snapshot::snapshot(&other)).unwrap();
    nkvm_devices::Snapshot::restore(&mut copy, &vm.region_state(id).unwrap()).unwrap();
    assert_eq!(copy.scratch(0), Some(7), "the process took the state");
    let err = vm.region_load_state(id, b"not a state").unwrap_err();
    let text = format!("{err}: {}", std::error::Error::source(&err).map(ToString::to_string).unwrap_or_default());
    assert!(text.contains("the device model refused the state: not an nkvm device state"), "{text}");
    nkvm_devices::Snapshot::restore(&mut copy, &vm.region_state(id).unwrap()).unwrap();
    assert_eq!(copy.scratch(0), Some(7), "a refused state changed nothing");

    let err = vm.region_state(local).unwrap_err().to_string();
    assert!(err.contains("served by a handler in this process"), "{err}");
    drop(dev);
    let err = vm.region_state(id).unwrap_err();
    let text = format!("{err}: {}", std::error::Error::source(&err).map(ToString::to_string).unwrap_or_default());
    assert!(text.starts_with("state transfer with the device of I/O region"), "{text}");
    assert_eq!(vm.io_region_failures().len(), 1, "the region failed: {text}");
    let err = vm.region_state(id).unwrap_err().to_string();
    assert!(err.contains("failed earlier"), "{err}");
}

/// A device whose state is larger than the protocol's 1 MiB: the VM side
/// stops at its first chunk, so the rest is still in the stream, and the
/// region is dropped as out of step (named) rather than failing later at
/// some unrelated access.
#[test]
fn a_device_state_over_the_limit_fails_the_region_at_once() {
    struct Huge;
    impl nkvm_devices::IoDevice for Huge {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {}
        fn save_state(&self) -> Option<Vec<u8>> {
            Some(vec![0x5a; (1 << 20) + 1])
        }
    }
    let (ours, device) = served_in_a_thread(Huge);
    let vm = vm();
    let id = vm.attach_region(IoRange::mmio(MMIO_A, 0x40), ours, Ordering::Sync).unwrap();
    let err = vm.region_state(id).unwrap_err();
    let text = format!("{err}: {}", std::error::Error::source(&err).map(ToString::to_string).unwrap_or_default());
    assert!(text.contains("more than the 1048576 nkvm takes"), "{text}");
    assert_eq!(vm.io_region_failures().len(), 1, "the region is dropped, not left out of step: {text}");
    drop(vm);
    device.join().unwrap();
}

/// A device that refuses a state with a reason longer than the protocol's
/// 1 MiB: the VM side stops at the reason's first chunk, the rest still in
/// the stream, so the region is dropped as out of step rather than going
/// on to misread the next reply.
#[test]
fn a_state_refused_with_a_reason_over_the_limit_fails_the_region_at_once() {
    struct Wordy;
    impl nkvm_devices::IoDevice for Wordy {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {}
        fn load_state(&mut self, _state: &[u8]) -> Option<Result<(), String>> {
            Some(Err("no".repeat(1 << 20)))
        }
    }
    let (ours, device) = served_in_a_thread(Wordy);
    let vm = vm();
    let id = vm.attach_region(IoRange::mmio(MMIO_A, 0x40), ours, Ordering::Sync).unwrap();
    let err = vm.region_load_state(id, b"a state").unwrap_err();
    let text = format!("{err}: {}", std::error::Error::source(&err).map(ToString::to_string).unwrap_or_default());
    assert!(text.contains("more than the 1048576 nkvm takes"), "{text}");
    assert_eq!(vm.io_region_failures().len(), 1, "the region is dropped, not left out of step: {text}");
    drop(vm);
    device.join().unwrap();
}

/// `model` served by nkvm-devices' server on a thread of its own: the VM's
/// end of the socket, and the thread (it ends when the VM side closes).
fn served_in_a_thread<M: nkvm_devices::IoDevice + Send + 'static>(
    mut model: M,
) -> (std::os::unix::net::UnixStream, std::thread::JoinHandle<()>) {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let device = std::thread::spawn(move || {
        let reader = theirs.try_clone().unwrap();
        let handshake =
            nkvm_devices::serve::Server::handshake(reader, theirs, nkvm_wire::handshake::VersionRange::IO_REGION);
        let _ = handshake.unwrap().serve(&mut model);
    });
    (ours, device)
}

/// An in-process handler with nothing behind it.
struct Nothing;

impl nkvm::io::IoHandler for Nothing {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}
