//! Debian's stock cloud kernel on nkvm (`scripts/fetch-guest.sh` provides
//! it; this test runs the script if the files are missing), booted from its
//! ELF vmlinux on two vCPUs with ACPI, the IOAPIC, a virtio-pci disk with
//! MSI-X and the serial console, and migrated live during that boot: once
//! the kernel has enumerated both virtio-pci functions it moves over
//! loopback TCP to `nkvm run --incoming` (nothing else on that command
//! line), and the boot must go on there (the serial driver's probe, the
//! IOAPIC's routes, ...) to the busybox init, which checks both CPUs, reads
//! and writes the disk and powers off.
//!
//! One emulated boot proves both: on the nested development host the guest
//! kernel runs in KVM's instruction emulator, so a boot takes 12-21
//! minutes (with the initcalls nkvm blacklists there), and CI runs this
//! one slow path once. User space cannot run on
//! that host at all (its `syscall` never reaches supervisor mode): the test
//! then checks the kernel got to init and that nkvm names the resulting
//! panic (docs/architecture.md, "Host quirks"). A failure says which side
//! and which step: the source's boot, the migration, the destination's.
//! Bad input to `--kernel` and friends gets one clear line.

mod linux_guest;
mod nkvm_process;

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nkvm_process::{tail, Vmm};

/// A boot here takes up to ~21 minutes; the bound only keeps a broken
/// guest from hanging CI (CI's limit is 90 minutes, this binary's share
/// of it must leave room for the rest).
const LIMIT: Duration = Duration::from_secs(3600);

/// Printed once the kernel has enumerated the last virtio-pci function
/// (the console; the disk is 00:01.0) and goes on to size and place its
/// BARs: the migration starts here. The virtio drivers are modules that
/// the initramfs's init loads, so no virtqueue is live before `Run /init`:
/// where user space never runs, the PCI configuration state, BARs and
/// MSI-X tables travel, the queues do not get exercised.
const PCI_ENUMERATED: &str = "pci 0000:00:02.0: [1af4:1043]";

/// The guest's init writes this at byte 4096 of the disk (scripts/guest-init.sh).
const GUEST_WROTE: &[u8] = b"NKVM-GUEST-WROTE-THIS";

#[test]
fn the_stock_kernel_boots_on_two_vcpus_with_acpi_pci_and_virtio_to_its_init_across_a_live_migration() {
    let scratch = std::env::temp_dir().join(format!("nkvm-linux-boot-{}", std::process::id()));
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

    // The source boots: nkvm's host workarounds on the plain command line,
    // the loader, ACPI, SMP and the PCI bus.
    let probed = src.wait_until(deadline, |out, _| out.contains(PCI_ENUMERATED));
    let (before, src_err) = (src.stdout(), src.stderr());
    assert!(probed, "the source's boot never got to {PCI_ENUMERATED:?}:\n{}\n{src_err}", tail(&before));
    assert!(src_err.contains("nkvm: added to the kernel command line for this host: noxsave"), "{src_err}");
    assert!(before.contains("console=ttyS0 panic=-1 noxsave cryptomgr.notests clearcpuid="), "{before}");

    // The migration, mid-boot.
    let at = started.elapsed();
    let out = Command::new(env!("CARGO_BIN_EXE_nkvm"))
        .args(["ctl", "--api-socket", api.to_str().unwrap(), "migrate", &addr, "--wait"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "migrate: {answer}\n{}\n{}", src.stderr(), dest.stderr());
    let src_ended = src.wait_until(deadline, |_, err| err.contains("this process ends"));
    assert!(src_ended, "the source did not end after the migration: {}", src.stderr());
    let before = src.stdout();
    assert!(!before.contains("Run /init as init process"), "migrated too late to prove anything:\n{}", tail(&before));
    let resumed = dest.wait_until(deadline, |_, err| err.contains("the guest resumes here"));
    assert!(resumed, "the destination did not take the guest: {}", dest.stderr());

    // The destination boots on to init, and on this host to the panic that
    // follows it (or, where user space runs, through init's checks to a
    // clean power-off).
    let stopped = dest.wait_until(deadline, |_, err| err.contains("nkvm: guest stopped"));
    let (after, dest_err) = (dest.stdout(), dest.stderr());
    let tail = tail(&after);
    let report = format!(
        "migrated at {at:?} (after {PCI_ENUMERATED:?}); {}\nthe destination after {:?}:\n{tail}\nstderr:\n{dest_err}",
        src.stderr().lines().find(|l| l.contains("migrated to")).unwrap_or_default(),
        started.elapsed(),
    );
    eprintln!("{report}");
    assert!(stopped, "the destination's guest did not get to its end in {LIMIT:?}: {report}");
    let succeeded = dest.wait_exit();
    // The boot went on where it stopped: no kernel message is printed twice.
    assert!(!after.contains("Linux version"), "the destination rebooted the guest:\n{tail}");
    assert!(!after.contains(PCI_ENUMERATED), "the destination enumerated PCI again:\n{tail}");
    // Everything up to init, on one side or the other: the loader (ELF
    // vmlinux), ACPI (RSDP, MADT with both CPUs and the IOAPIC, DSDT with
    // the PCI host bridge), SMP, the PCI bus with both virtio-pci devices,
    // the serial console, the initramfs.
    let whole = format!("{before}{after}");
    for marker in [
        "Linux version 6.1",
        "ACPI: RSDP 0x00000000000E0000",
        "IOAPIC[0]: apic_id 2",
        "smp: Brought up 1 node, 2 CPUs",
        "ACPI: PCI Root Bridge [PCI0]",
        "pci 0000:00:01.0: [1af4:1042]",
        PCI_ENUMERATED,
        "ttyS0 at I/O 0x3f8 (irq = 4",
        "Freeing initrd memory",
        "Run /init as init process",
    ] {
        assert!(whole.contains(marker), "the kernel never printed {marker:?}\n{tail}\n{dest_err}");
    }
    if !after.contains("NKVM-GUEST: init started") {
        // This host (nested kvm_pvm) delivers user-mode `syscall` without
        // entering supervisor mode (tests/user_mode.rs in the nkvm crate):
        // init dies on its first system call and the kernel panics. nkvm
        // must say so and fail, not report the reboot as success.
        assert!(!succeeded, "a panicked guest must not exit 0\n{dest_err}");
        assert!(
            dest_err.contains("nkvm: guest stopped: the guest kernel panicked: Attempted to kill init!"),
            "{dest_err}"
        );
        eprintln!("user space does not run on this host: init was killed at its first syscall");
        let _ = std::fs::remove_dir_all(&scratch);
        return;
    }
    for marker in ["NKVM-GUEST: cpus online: 0-1 (2 processors)", "NKVM-GUEST: disk ok", "NKVM-GUEST: done"] {
        assert!(after.contains(marker), "the guest never printed {marker:?}\n{tail}\n{dest_err}");
    }
    assert!(succeeded, "poweroff -f must end nkvm with 0\n{dest_err}");
    // What the guest wrote through virtio-blk is in the image file.
    let image = std::fs::read(&disk).expect("read the disk image back");
    let _ = std::fs::remove_dir_all(&scratch);
    assert_eq!(&image[..14], b"NKVM-DISK-TEST", "sector 0 untouched");
    assert_eq!(&image[4096..4096 + GUEST_WROTE.len()], GUEST_WROTE, "the guest's write reached the image");
}

#[test]
fn bad_kernel_arguments_are_one_line_errors() {
    let dir = std::env::temp_dir().join(format!("nkvm-badkernel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk");
    std::fs::write(&junk, vec![0x42u8; 8192]).unwrap();
    let bad_elf = dir.join("bad-elf");
    let mut elf = b"\x7fELF".to_vec();
    elf.resize(8192, 0);
    std::fs::write(&bad_elf, elf).unwrap();
    let kernel = linux_guest::guest_dir().join("vmlinux").display().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["run".into(), "--kernel".into(), "/nonexistent/bzImage".into()], "cannot read /nonexistent/bzImage"),
        (vec!["run".into(), "--kernel".into(), junk.display().to_string()], "is not a loadable kernel"),
        (vec!["run".into(), "--kernel".into(), bad_elf.display().to_string()], "is not a loadable kernel"),
        (
            vec!["run".into(), "--kernel".into(), kernel.clone(), "--disk".into(), "/nonexistent/disk.img".into()],
            "cannot open disk image /nonexistent/disk.img",
        ),
        (
            vec!["run".into(), "--kernel".into(), kernel.clone(), "--cpus".into(), "100000".into()],
            "vCPUs requested but this host's KVM allows at most",
        ),
        (
            vec!["run".into(), "--kernel".into(), junk.display().to_string(), "--memory".into(), "512X".into()],
            "invalid size \"512X\"",
        ),
        (vec!["run".into(), "--initrd".into(), "x".into()], "--kernel"),
    ];
    for (args, needle) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_nkvm")).args(&args).stdin(Stdio::null()).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
