//! Debian's stock kernel (the one tests/linux_boot.rs boots, from
//! `scripts/fetch-guest.sh`) migrated during its boot: two vCPUs, ACPI, the
//! IOAPIC, a virtio-pci disk with MSI-X and the virtio console. The source
//! runs with `--api-socket`; once the kernel has enumerated both virtio-pci
//! functions, it is migrated over loopback TCP to `nkvm run --incoming`,
//! which has nothing else on its command line, and the boot must go on
//! there (the serial driver's probe, the IOAPIC's routes, ...) to
//! `Run /init`. On the nested development host a boot takes 15-20 minutes
//! of CPU. It is its own test binary, so it runs after the boot test, not
//! beside it: two emulated boots at once on the 2-CPU CI host failed the
//! boot test once.

mod linux_guest;
mod nkvm_process;

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use nkvm_process::Vmm;

/// A boot here takes up to ~20 minutes; the bound only keeps a broken
/// guest from hanging CI.
const LIMIT: Duration = Duration::from_secs(3600);
/// Printed once the kernel has enumerated the last virtio-pci function
/// (the console; the disk is 00:01.0) and goes on to size and place its
/// BARs. The virtio drivers are modules that the initramfs's init loads, so
/// no virtqueue is live before `Run /init`: on this host user space never
/// runs (docs/architecture.md), so the PCI configuration state, BARs and
/// MSI-X tables travel, the queues do not get exercised here.
const PCI_ENUMERATED: &str = "pci 0000:00:02.0: [1af4:1043]";

#[test]
fn a_linux_guest_migrated_during_its_boot_continues_to_init_on_the_destination() {
    let scratch = std::env::temp_dir().join(format!("nkvm-linux-migration-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    // A private copy of the disk (the guest writes it), at one path both
    // sides reach, as shared storage would be.
    let disk = scratch.join("disk.img");
    linux_guest::copy_disk(&disk);
    let api = scratch.join("src.sock");
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("tcp:127.0.0.1:{port}");
    let started = Instant::now();
    let deadline = started + LIMIT;
    let mut args = linux_guest::run_args(&disk);
    args.extend(["--api-socket".to_string(), api.to_str().unwrap().to_string()]);
    let mut src = Vmm::run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut dest = Vmm::run(&["--incoming", &addr]);
    assert!(
        dest.wait_until(deadline, |_, err| err.contains("waiting for a migration")),
        "the destination never listened: {}",
        dest.stderr()
    );
    let probed = src.wait_until(deadline, |out, _| out.contains(PCI_ENUMERATED));
    assert!(
        probed,
        "the source never got to {PCI_ENUMERATED:?}:\n{}\n{}",
        linux_guest::tail(&src.stdout()),
        src.stderr()
    );
    let at = started.elapsed();
    let out = Command::new(env!("CARGO_BIN_EXE_nkvm"))
        .args(["ctl", "--api-socket", api.to_str().unwrap(), "migrate", &addr, "--wait"])
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "migrate: {answer}\n{}\n{}", src.stderr(), dest.stderr());
    let src_ended = src.wait_until(deadline, |_, err| err.contains("this process ends"));
    assert!(src_ended, "the source did not end after the migration: {}", src.stderr());
    let before = src.stdout();
    assert!(
        !before.contains("Run /init as init process"),
        "migrated too late to prove anything:\n{}",
        linux_guest::tail(&before)
    );
    let resumed = dest.wait_until(deadline, |_, err| err.contains("the guest resumes here"));
    assert!(resumed, "the destination did not take the guest: {}", dest.stderr());
    let reached = dest.wait_until(deadline, |out, _| out.contains("Run /init as init process"));
    let after = dest.stdout();
    eprintln!(
        "migrated at {at:?} (after {PCI_ENUMERATED:?}); {}\nthe destination after {:?}:\n{}\nstderr:\n{}",
        src.stderr().lines().find(|l| l.contains("migrated to")).unwrap_or_default(),
        started.elapsed(),
        linux_guest::tail(&after),
        dest.stderr()
    );
    assert!(reached, "the destination never printed \"Run /init as init process\"");
    // The boot went on where it stopped: no kernel message is printed twice.
    assert!(!after.contains("Linux version"), "the destination rebooted the guest:\n{}", linux_guest::tail(&after));
    assert!(!after.contains(PCI_ENUMERATED), "the destination enumerated PCI again:\n{}", linux_guest::tail(&after));
    let _ = std::fs::remove_dir_all(&scratch);
}
