//! Debian's stock cloud kernel on nkvm (`scripts/fetch-guest.sh` provides
//! it; this test runs the script if the files are missing): booted from its
//! ELF vmlinux on two vCPUs with ACPI, the IOAPIC, a virtio-pci disk with
//! MSI-X and the serial console, to the busybox init, which checks both
//! CPUs, reads and writes the disk and powers off. On the nested
//! development host the guest kernel runs in KVM's instruction emulator,
//! so this takes minutes, and user space cannot run there at all (its
//! `syscall` never reaches supervisor mode): the test then checks the
//! kernel got to init and that nkvm names the resulting panic
//! (docs/architecture.md, "Host quirks").
//! Bad input to `--kernel` and friends gets one clear line.

mod linux_guest;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs nkvm, killing it after `limit`.
fn nkvm_with_limit(args: &[&str], limit: Duration) -> (Output, bool) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nkvm"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nkvm");
    let deadline = Instant::now() + limit;
    let mut killed = false;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            killed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    (child.wait_with_output().expect("output"), killed)
}

/// The guest's init writes this at byte 4096 of the disk (scripts/guest-init.sh).
const GUEST_WROTE: &[u8] = b"NKVM-GUEST-WROTE-THIS";

#[test]
fn the_stock_kernel_boots_on_two_vcpus_with_acpi_pci_and_virtio_to_its_init() {
    // A private copy of the disk: the guest writes it.
    let disk = std::env::temp_dir().join(format!("nkvm-linux-disk-{}.img", std::process::id()));
    linux_guest::copy_disk(&disk);
    let args: Vec<String> = std::iter::once("run".to_string()).chain(linux_guest::run_args(&disk)).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = Instant::now();
    let (out, killed) = nkvm_with_limit(&args, Duration::from_secs(2700));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail = linux_guest::tail(&stdout);
    eprintln!(
        "boot took {:?}; killed by the time limit: {killed}\nlast lines:\n{tail}\nstderr:\n{stderr}",
        started.elapsed()
    );
    assert!(!killed, "the boot did not finish within the limit");
    assert!(stderr.contains("nkvm: added to the kernel command line for this host: noxsave"), "{stderr}");
    assert!(stdout.contains("console=ttyS0 panic=-1 noxsave cryptomgr.notests clearcpuid="), "{tail}");
    // Everything up to init: the loader (ELF vmlinux), ACPI (RSDP, MADT
    // with both CPUs and the IOAPIC, DSDT with the PCI host bridge), SMP,
    // the PCI bus with both virtio-pci devices, the serial console.
    for marker in [
        "Linux version 6.1",
        "ACPI: RSDP 0x00000000000E0000",
        "IOAPIC[0]: apic_id 2",
        "smp: Brought up 1 node, 2 CPUs",
        "ACPI: PCI Root Bridge [PCI0]",
        "pci 0000:00:01.0: [1af4:1042]",
        "pci 0000:00:02.0: [1af4:1043]",
        "ttyS0 at I/O 0x3f8 (irq = 4",
        "Freeing initrd memory",
        "Run /init as init process",
    ] {
        assert!(stdout.contains(marker), "the kernel never printed {marker:?}\n{tail}\n{stderr}");
    }
    if !stdout.contains("NKVM-GUEST: init started") {
        // This host (nested kvm_pvm) delivers user-mode `syscall` without
        // entering supervisor mode (tests/user_mode.rs in the nkvm crate):
        // init dies on its first system call and the kernel panics. nkvm
        // must say so and fail, not report the reboot as success.
        assert!(!out.status.success(), "a panicked guest must not exit 0\n{stderr}");
        assert!(stderr.contains("nkvm: guest stopped: the guest kernel panicked: Attempted to kill init!"), "{stderr}");
        eprintln!("user space does not run on this host: init was killed at its first syscall");
        let _ = std::fs::remove_file(&disk);
        return;
    }
    for marker in ["NKVM-GUEST: cpus online: 0-1 (2 processors)", "NKVM-GUEST: disk ok", "NKVM-GUEST: done"] {
        assert!(stdout.contains(marker), "the guest never printed {marker:?}\n{tail}\n{stderr}");
    }
    assert!(out.status.success(), "poweroff -f must end nkvm with 0: {:?}\n{stderr}", out.status);
    // What the guest wrote through virtio-blk is in the image file.
    let image = std::fs::read(&disk).expect("read the disk image back");
    let _ = std::fs::remove_file(&disk);
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
