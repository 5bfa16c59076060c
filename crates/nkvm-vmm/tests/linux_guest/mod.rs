//! The stock Linux guest the Linux tests boot: Debian's cloud kernel, the
//! busybox initramfs and a small disk image, from `scripts/fetch-guest.sh`
//! (run by the first test that finds a file missing).

use std::path::{Path, PathBuf};
use std::process::Command;

/// `target/guest`, its files fetched if any is missing (once per test
/// binary, not in racing runs).
pub fn guest_dir() -> PathBuf {
    static FETCHED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FETCHED
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
            let dir = root.join("target/guest");
            if ["bzImage", "vmlinux", "initramfs.cpio", "disk.img"].iter().any(|f| !dir.join(f).exists()) {
                let status =
                    Command::new("bash").arg(root.join("scripts/fetch-guest.sh")).status().expect("run fetch-guest.sh");
                assert!(status.success(), "scripts/fetch-guest.sh failed");
            }
            dir
        })
        .clone()
}

/// The `nkvm run` arguments of the guest on two vCPUs and 512 MiB with
/// `disk` (a private copy of `disk.img`: the guest writes it) and a plain
/// command line, to which nkvm adds what this host needs (noxsave, ...).
pub fn run_args(disk: &Path) -> Vec<String> {
    let dir = guest_dir();
    let (kernel, initrd) = (dir.join("vmlinux"), dir.join("initramfs.cpio"));
    let args = [
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--memory",
        "512M",
        "--cpus",
        "2",
        "--disk",
        disk.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 panic=-1",
    ];
    args.map(String::from).to_vec()
}

/// A private copy of the guest's disk image at `to`.
pub fn copy_disk(to: &Path) {
    std::fs::copy(guest_dir().join("disk.img"), to).expect("copy the disk image");
}
