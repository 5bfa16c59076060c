//! A host that cannot give a VM the memory its dirty log needs: the memory
//! map that asks for it is refused with an error naming the backing object,
//! the installed map stays, and the guest runs on. The limit that makes the
//! host refuse (`RLIMIT_AS`) holds for a whole process and would starve
//! every other test in it, so the test runs itself again, alone, in a child.

mod common;

use std::process::Command;

use common::*;
use iced_x86::code_asm::*;
use nkvm::{Backing, Exit, GuestAddress, MemoryMap, Region, VmConfig};

/// Set in the child's environment.
const CHILD: &str = "NKVM_TEST_OUT_OF_MEMORY_CHILD";
const TEST: &str = "a_dirty_log_the_host_cannot_allocate_refuses_the_map_and_the_guest_runs_on";
const RAM: u64 = 4 << 20;
/// A sparse memfd: nothing of it is ever touched; its dirty log is 2 MiB.
const HUGE: u64 = 64 << 30;

#[test]
fn a_dirty_log_the_host_cannot_allocate_refuses_the_map_and_the_guest_runs_on() {
    if std::env::var_os(CHILD).is_some() {
        return in_child();
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = Command::new(exe)
        .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .output()
        .expect("run the test alone in a child process");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the child failed ({}):\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains("refused: cannot allocate"), "the child did not reach its check:\n{stdout}\n{stderr}");
}

fn in_child() {
    let vm = vm_with(VmConfig { vcpus: 1, memory: RAM, ..Default::default() });
    vm.write_memory(GuestAddress(0x1000), &[0x5a]).unwrap();
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        a.mov(al, byte_ptr(0x1000)).unwrap();
        a.out(0x10, al).unwrap();
        a.hlt().unwrap();
    });
    let huge = Backing::new("huge-vram", HUGE).expect("a sparse 64 GiB memfd");
    let map = MemoryMap::new(vec![
        Region::new(GuestAddress(0), vm.ram(), 0, RAM),
        Region::new(GuestAddress(1 << 40), &huge, 0, HUGE).dirty_logged(),
    ])
    .unwrap();

    // Room for 1 MiB more mappings: less than the log's 2 MiB.
    let limit = address_space_in_use() + (1 << 20);
    let before = set_address_space_limit(limit);
    let result = vm.set_memory_map(map);
    set_address_space_limit(before);

    let err = result.expect_err("a map whose dirty log cannot be mapped must be refused");
    let text = err.to_string();
    assert!(text.contains("huge-vram") && text.contains("not changed"), "{text}");
    assert_eq!(vm.memory().regions().len(), 1, "the RAM-only map is still installed");
    assert_eq!(run_to_hlt(&mut vcpu, |_| 0), vec![Exit::IoOut { port: 0x10, size: 1, data: 0x5a }]);
    println!("refused: {text}");
}

/// This process's mapped bytes (`VmSize`).
fn address_space_in_use() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmSize:")).expect("VmSize in /proc/self/status");
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

/// Sets the soft `RLIMIT_AS` to `bytes`; returns the one it replaced.
fn set_address_space_limit(bytes: libc::rlim_t) -> libc::rlim_t {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write only the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_AS, &mut lim), 0);
        let before = lim.rlim_cur;
        lim.rlim_cur = bytes.min(lim.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_AS, &lim), 0, "{}", std::io::Error::last_os_error());
        before
    }
}
