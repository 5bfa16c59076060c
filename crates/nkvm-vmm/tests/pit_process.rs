//! `nkvm device --model pit`: the 8254's counters in their own process,
//! read by a real guest through an I/O-region socket.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use nkvm::io::{IoRange, Ordering};
use nkvm::{Exit, GuestAddress, Hypervisor, LongMode, RunState, Vm, VmConfig};

const ENTRY: u64 = 0x10_0000;
const TABLES: u64 = 0x2_0000;
/// Where the guest reports values (no device there: the exit shows them).
const REPORT: u16 = 0x10;

/// The device process, killed when dropped.
struct PitProcess {
    child: Child,
    socket: PathBuf,
}

impl PitProcess {
    fn spawn() -> Self {
        let dir = std::env::temp_dir().join(format!("nkvm-pit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("pit.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_nkvm"))
            .args(["device", "--model", "pit", "--socket"])
            .arg(&socket)
            .spawn()
            .expect("spawn nkvm device");
        PitProcess { child, socket }
    }

    fn connect(&self) -> UnixStream {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match UnixStream::connect(&self.socket) {
                Ok(s) => return s,
                Err(e) if Instant::now() > deadline => panic!("the PIT process never listened: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

impl Drop for PitProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Latches counter 2 and reports its count on [`REPORT`].
fn report_counter2(a: &mut CodeAssembler) {
    a.mov(al, 0x80).unwrap(); // counter 2, counter latch
    a.out(0x43, al).unwrap();
    a.in_(al, 0x42).unwrap();
    a.mov(bl, al).unwrap();
    a.in_(al, 0x42).unwrap();
    a.mov(bh, al).unwrap();
    a.movzx(eax, bx).unwrap();
    a.out(i32::from(REPORT), eax).unwrap();
}

#[test]
fn a_pit_in_a_device_process_counts_down_and_answers_read_back() {
    let pit = PitProcess::spawn();
    let hv = Hypervisor::open().expect("/dev/kvm");
    let vm = Vm::new(&hv, &VmConfig { vcpus: 1, memory: 16 << 20, ..Default::default() }).unwrap();
    vm.attach_region(IoRange::pio(0x40, 4), pit.connect(), Ordering::Sync).unwrap();
    let mut a = CodeAssembler::new(64).unwrap();
    // Counter 2: low-then-high access, mode 0, count 0xffff (55 ms).
    a.mov(al, 0xb0).unwrap();
    a.out(0x43, al).unwrap();
    a.mov(al, 0xff).unwrap();
    a.out(0x42, al).unwrap();
    a.out(0x42, al).unwrap();
    report_counter2(&mut a);
    // Read-back of counter 2's status: mode 0, word access, count loaded.
    a.mov(al, 0xe8).unwrap();
    a.out(0x43, al).unwrap();
    a.in_(al, 0x42).unwrap();
    a.movzx(eax, al).unwrap();
    a.out(i32::from(REPORT), eax).unwrap();
    // Wait until the count moves, then report it again.
    let mut wait = a.create_label();
    a.set_label(&mut wait).unwrap();
    a.mov(al, 0x80).unwrap();
    a.out(0x43, al).unwrap();
    a.in_(al, 0x42).unwrap();
    a.mov(cl, al).unwrap();
    a.in_(al, 0x42).unwrap();
    a.mov(ch, al).unwrap();
    a.cmp(cx, bx).unwrap();
    a.je(wait).unwrap();
    report_counter2(&mut a);
    a.hlt().unwrap();
    vm.write_memory(GuestAddress(ENTRY), &a.assemble(ENTRY).unwrap()).unwrap();
    let lm = LongMode::install(&vm.memory(), GuestAddress(TABLES)).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_long_mode(&lm, GuestAddress(ENTRY), GuestAddress(0x9_0000)).unwrap();
    let mut run = RunState::new();
    let mut reports = Vec::new();
    loop {
        match vcpu.enter_guest(&mut run).unwrap() {
            Exit::Hlt => break,
            Exit::IoOut { port: REPORT, data, .. } => reports.push(data),
            e @ (Exit::Shutdown | Exit::InternalError(_) | Exit::IoRegionFailed { .. }) => panic!("guest failed: {e}"),
            _ => {}
        }
    }
    let [first, status, later] = reports[..] else { panic!("reports: {reports:x?}") };
    assert!(first <= 0xffff && first > later, "counts down: {first:#x} then {later:#x}");
    assert_eq!(status, 0x30, "output low, count loaded, word access, mode 0");
}
