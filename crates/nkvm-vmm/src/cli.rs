//! The command line.

use clap::{Args, Parser, Subcommand};

use crate::cpu_features::{CpuVendor, HiddenFeatures};
use crate::size::parse_size;

/// nkvm: a VMM on the next-generation KVM API.
#[derive(Debug, Parser)]
#[command(name = "nkvm", version, about, long_about = None)]
pub struct Cli {
    /// What to do (default: `run` the built-in guest).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a VM (with no options: the small guest built into nkvm). A
    /// --kernel guest's serial console is the terminal: keystrokes go to
    /// the guest, and Ctrl-A x ends it. Exit status: 0 when the guest powers
    /// off or resets, 4 when it fails (triple fault, kernel panic, an exit
    /// nkvm cannot handle), 2 when nkvm cannot run it, and the status a
    /// kvm-unit-tests kernel writes to port 0xf4, (v << 1) | 1.
    Run(RunArgs),
    /// Print what this host's KVM can do.
    Caps(CapsArgs),
    /// Run one device model in this process, serving an I/O-region socket
    /// (the other end of `attach_region`); see docs/wire-format.md.
    Device(DeviceArgs),
    /// Drive a running nkvm through its --api-socket: pause, resume,
    /// snapshot, migrate, info (one JSON answer on stdout).
    Ctl(CtlArgs),
}

/// `nkvm ctl`.
#[derive(Debug, Args, Clone)]
pub struct CtlArgs {
    /// The socket `nkvm run --api-socket` serves.
    #[arg(long)]
    pub api_socket: std::path::PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// `nkvm ctl` commands.
#[derive(Debug, Subcommand, Clone)]
pub enum CtlCommand {
    /// State, configuration and migration progress (rounds, pages, MB/s,
    /// expected downtime).
    Info,
    /// Pause every vCPU (each completes its current exit first).
    Pause,
    /// Resume the vCPUs.
    Resume,
    /// Write a snapshot directory (the guest pauses while it is written,
    /// then runs on unless it was paused).
    Snapshot {
        /// The directory (created if needed).
        dir: std::path::PathBuf,
    },
    /// Migrate the guest to an `nkvm run --incoming` there: tcp:HOST:PORT
    /// or unix:PATH. The source ends when the destination runs the guest,
    /// and runs on if the migration fails.
    Migrate {
        /// The destination.
        to: String,
        /// Switch over when the rest is expected to take at most this long
        /// (0: only after --max-rounds).
        #[arg(long, default_value_t = 50)]
        downtime_ms: u64,
        /// Switch over after this many rounds regardless.
        #[arg(long, default_value_t = 30)]
        max_rounds: u32,
        /// Wait until the migration ends; exit 1 if it failed.
        #[arg(long)]
        wait: bool,
    },
    /// Cancel the running migration before its switch-over (the guest
    /// runs on here; a send blocked on the destination returns at once).
    Cancel,
}

impl Default for Command {
    fn default() -> Self {
        Command::Run(RunArgs::default())
    }
}

/// `nkvm run`.
#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    /// Number of vCPUs.
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Guest RAM, in bytes or with a K, M or G suffix (e.g. 512M).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub memory: u64,
    /// Print one line per exit on stderr: vCPU, reason, port/address, size,
    /// data, time in the guest and in the handler.
    #[arg(long)]
    pub trace: bool,
    /// Print a table of exits per reason with latency percentiles at the end.
    #[arg(long)]
    pub stats: bool,
    /// Run each device model (serial, test device) in its own process,
    /// behind an I/O-region socket, instead of in the VMM; and a --disk
    /// image's virtio-blk in a sandboxed, restartable process of its own.
    /// Their states travel with snapshots and migrations, which restore
    /// into device processes with it and in process without it.
    #[arg(long)]
    pub device_process: bool,
    /// Boot this kernel instead of the built-in guest: a Linux bzImage or
    /// uncompressed ELF vmlinux (faster to start: no decompressor), entered
    /// at its 64-bit entry point with ACPI tables, the IOAPIC, PCI and the
    /// 16550 console on ttyS0; or a multiboot kernel such as a
    /// kvm-unit-tests `x86/*.flat`, entered in 32-bit protected mode on the
    /// PC that suite expects (fw_cfg, pc-testdev, the test-exit port at
    /// 0xf4: nkvm then exits with the suite's status, (v << 1) | 1).
    #[arg(long)]
    pub kernel: Option<std::path::PathBuf>,
    /// An initramfs for a Linux --kernel; the one module for a multiboot
    /// kernel (kvm-unit-tests read it as their environment, KEY=VALUE lines).
    #[arg(long, requires = "kernel")]
    pub initrd: Option<std::path::PathBuf>,
    /// The kernel command line. Linux's default is `console=ttyS0
    /// reboot=k panic=-1` (`panic=-1` reboots on a panic, which nkvm
    /// reports), and nkvm adds to any Linux command line the options this
    /// kind of host needs (see --no-host-workarounds). A multiboot kernel
    /// gets its path, then this (default empty), as QEMU's -append builds it.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// A raw disk image for --kernel, presented as a virtio-blk PCI device
    /// (Linux's /dev/vda); or `vhost-user:SOCKET`, the same device served by
    /// a vhost-user-blk backend listening there (qemu-storage-daemon, ...).
    #[arg(long, requires = "kernel", value_parser = |s: &str| s.parse::<crate::pci_devices::Disk>())]
    pub disk: Option<crate::pci_devices::Disk>,
    /// Present --disk read-only (writes fail with an I/O error).
    #[arg(long, requires = "disk")]
    pub disk_readonly: bool,
    /// CPUID features to hide from a --kernel guest, QEMU's names with a
    /// minus: `-x2apic,-pcid,-invpcid` (see `cpu_features.rs` for the list).
    #[arg(long, value_parser = |s: &str| s.parse::<HiddenFeatures>(), default_value = "", allow_hyphen_values = true)]
    pub cpu_features: HiddenFeatures,
    /// The CPU vendor a --kernel guest's CPUID names (leaves 0 and
    /// 0x8000_0000), as QEMU's `-cpu ...,vendor=`; default: this host's.
    #[arg(long, value_enum)]
    pub cpu_vendor: Option<CpuVendor>,
    /// Offer a --kernel guest the Hyper-V enlightenments this host's KVM
    /// emulates (QEMU's `-cpu ...,hv_passthrough`): Hyper-V's CPUID leaves
    /// at 0x4000_0000 (KVM's move to 0x4000_0100) and the SynIC on every
    /// vCPU (reference counter, TSC page, synthetic timers, hypercalls).
    #[arg(long)]
    pub hyperv: bool,
    /// Pass a Linux --cmdline as given. By default nkvm adds what a nested
    /// `kvm_pvm` host needs and the line lacks: `noxsave`, `clearcpuid=` of
    /// the SIMD past SSE2, `cryptomgr.notests` (and says so on stderr).
    #[arg(long)]
    pub no_host_workarounds: bool,
    /// Run this raw 64-bit image on the built-in guest's machine instead of
    /// the built-in guest: loaded at 0x100000 and entered there in long
    /// mode by every vCPU, its id in rdi and the vCPU count in rbp, stacks
    /// 16 KiB apart below 0xf0000 (identity-mapped 1 GiB pages from 0).
    #[arg(long, conflicts_with = "kernel")]
    pub image: Option<std::path::PathBuf>,
    /// Serve a JSON API on this Unix socket (`nkvm ctl`): pause, resume,
    /// snapshot, migrate, info. Any machine; one with a part nkvm cannot
    /// save (a vhost-user backend that does not log its writes) refuses
    /// snapshot and migrate, saying which part, and runs on.
    #[arg(long)]
    pub api_socket: Option<std::path::PathBuf>,
    /// Resume the snapshot in this directory (written by `nkvm ctl
    /// snapshot`); its memory file is mapped copy-on-write, not copied.
    /// The machine (kind, --cpus, --memory, the disk, --hyperv) comes from
    /// the snapshot; a disk must be at the same path, of the same size.
    #[arg(long, conflicts_with_all = ["kernel", "image", "incoming"])]
    pub restore: Option<std::path::PathBuf>,
    /// Wait for a migration on tcp:HOST:PORT or unix:PATH and run the
    /// guest it brings (its configuration travels in the stream; a disk
    /// must be reachable at the same path, as shared storage would be).
    #[arg(long, conflicts_with_all = ["kernel", "image"])]
    pub incoming: Option<String>,
}

impl Default for RunArgs {
    fn default() -> Self {
        Self {
            cpus: 2,
            memory: 64 << 20,
            trace: false,
            stats: false,
            device_process: false,
            kernel: None,
            initrd: None,
            cmdline: None,
            disk: None,
            disk_readonly: false,
            cpu_features: HiddenFeatures::default(),
            cpu_vendor: None,
            hyperv: false,
            no_host_workarounds: false,
            image: None,
            api_socket: None,
            restore: None,
            incoming: None,
        }
    }
}

/// `nkvm caps`.
#[derive(Debug, Args, Clone, Default)]
pub struct CapsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Device models `nkvm device` can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceModel {
    /// The test device: ID, counters, scratch registers (nkvm_devices::test_device).
    Test,
    /// A 16550 UART whose output goes to this process's stdout.
    Serial,
    /// An IOAPIC: registers on --socket, interrupt messages and EOIs on
    /// --apic-bus, input pins on --pins (a write of 1/0 at offset N sets pin N).
    Ioapic,
    /// A dual 8259: master registers on --socket, slave on --slave, input
    /// lines on --pins, INTR as ExtINT messages on --apic-bus.
    Pic,
    /// The MC146818 RTC and CMOS RAM (ports 0x70-0x71).
    Cmos,
    /// The ACPI PM timer (4 ports).
    PmTimer,
    /// pc-testdev's 64 KiB of RAM-like device memory (kvm-unit-tests).
    IoRam,
    /// The 8254 PIT's counters and control port (ports 0x40-0x43); its
    /// IRQ 0 output drives a controller's pin with --irq-pins, else nothing.
    Pit,
    /// virtio-blk on --disk, as a sandboxed vhost-user-blk backend on
    /// --socket (what `nkvm run --device-process --disk IMAGE` starts).
    VirtioBlk,
    /// virtio-console (one port, output to stdout), as a sandboxed
    /// vhost-user backend on --socket.
    VirtioConsole,
}

/// `nkvm device`.
#[derive(Debug, Args, Clone)]
pub struct DeviceArgs {
    /// Which model to serve.
    #[arg(long, value_enum)]
    pub model: DeviceModel,
    /// Listen on this Unix socket path and serve the first connection.
    #[arg(long)]
    pub socket: std::path::PathBuf,
    /// Append one line per access to this file ("NAME R|W OFFSET SIZE DATA"),
    /// for ordering checks across device processes.
    #[arg(long)]
    pub log: Option<std::path::PathBuf>,
    /// The name used in the log (default: the model).
    #[arg(long)]
    pub name: Option<String>,
    /// IOAPIC and PIC: listen here for the APIC-bus connection.
    #[arg(long, required_if_eq_any([("model", "ioapic"), ("model", "pic")]))]
    pub apic_bus: Option<std::path::PathBuf>,
    /// IOAPIC and PIC: listen here for the pin-control connection.
    #[arg(long, required_if_eq_any([("model", "ioapic"), ("model", "pic")]))]
    pub pins: Option<std::path::PathBuf>,
    /// PIC only: listen here for the slave's register connection.
    #[arg(long, required_if_eq("model", "pic"))]
    pub slave: Option<std::path::PathBuf>,
    /// virtio-blk only: the raw image.
    #[arg(long, required_if_eq("model", "virtio-blk"))]
    pub disk: Option<std::path::PathBuf>,
    /// virtio-blk only: present the image read-only.
    #[arg(long, requires = "disk")]
    pub read_only: bool,
    /// serial only: stdin is the console channel, a stream socket to the
    /// VMM: the bytes read from it are the guest's input, and each
    /// interrupt the UART raises is written back as one byte
    /// (docs/wire-format.md, "Console channel").
    #[arg(long)]
    pub console_channel: bool,
    /// pit and serial: drive the model's interrupt line as a pin of an
    /// IOAPIC or PIC in its own process, through that controller's --pins
    /// socket (docs/wire-format.md, "Input pins"), with no VMM in between.
    #[arg(long, conflicts_with = "console_channel")]
    pub irq_pins: Option<std::path::PathBuf>,
    /// With --irq-pins: which pin (default: 0 for pit, IRQ 0; 4 for
    /// serial, COM1's IRQ 4).
    #[arg(long, requires = "irq_pins")]
    pub irq_pin: Option<u32>,
}
