//! Running a VM: one thread per vCPU ([`vcpus`]); devices sit on nkvm I/O
//! regions (in process or in their own), the rest of the exits are handled
//! in the vCPU loop; the machine stops on power-off or on a fatal exit.
//!
//! [`run`] picks the machine: the built-in one ([`crate::builtin_machine`])
//! or a `--kernel` one ([`kernel`]), booted fresh or brought back from a
//! snapshot or a migration ([`intake`]: the saved configuration says which).

mod build;
pub mod intake;
mod kernel;
mod vcpus;

use std::io::{self, Write};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Mutex;

use nkvm::{ExitStats, Hypervisor};

use crate::cli::RunArgs;
use crate::control::Control;
use crate::ioapic;
use crate::linux;
use crate::multiboot;
use crate::sleep::{Sleep, SleepError};
use crate::snapshot::MachineKind;
use crate::terminal;
use crate::testdev;
use intake::Intake;

pub(crate) use vcpus::run_vcpus;

/// Why the VMM could not run the VM.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// Opening KVM failed.
    #[error(transparent)]
    Hypervisor(#[from] nkvm::HypervisorError),
    /// Creating the VM failed.
    #[error(transparent)]
    Vm(#[from] nkvm::VmError),
    /// A vCPU operation failed.
    #[error(transparent)]
    Vcpu(#[from] nkvm::VcpuError),
    /// Loading the guest failed.
    #[error(transparent)]
    Memory(#[from] nkvm::MemoryError),
    /// Assembling the built-in guest failed.
    #[error("cannot assemble the built-in guest: {0}")]
    Assemble(String),
    /// More vCPUs than the built-in guest has stacks for.
    #[error(
        "the built-in guest runs on at most {max} vCPUs ({requested} requested): its stacks are 16 KiB apart \
         below 0xf0000; boot a kernel (--kernel) for more"
    )]
    BuiltinCpus {
        /// `--cpus`.
        requested: u32,
        /// The most it runs on.
        max: u32,
    },
    /// The kernel could not be loaded.
    #[error(transparent)]
    Linux(#[from] linux::LinuxError),
    /// Attaching a device failed.
    #[error(transparent)]
    Attach(#[from] nkvm::IoRegionError),
    /// Starting a device process failed.
    #[error(transparent)]
    DeviceProcess(#[from] crate::devices::DeviceProcessError),
    /// Starting a vCPU thread failed.
    #[error("cannot start a vCPU thread")]
    Thread(#[source] io::Error),
    /// Attaching the IOAPIC failed.
    #[error(transparent)]
    Ioapic(#[from] ioapic::IoapicError),
    /// Setting up the PCI devices failed.
    #[error(transparent)]
    Pci(#[from] crate::pci_devices::PciSetupError),
    /// The multiboot kernel could not be loaded.
    #[error(transparent)]
    Multiboot(#[from] multiboot::MultibootError),
    /// The kvm-unit-tests platform devices could not be attached.
    #[error(transparent)]
    Testdev(#[from] testdev::TestdevError),
    /// S3 could not be set up.
    #[error(transparent)]
    Sleep(#[from] SleepError),
    /// The saved machine does not fit this host (its disk is missing, ...).
    #[error(transparent)]
    Saved(#[from] crate::snapshot::SnapshotError),
    /// The saved devices do not fit this machine, or one refused its state.
    #[error(transparent)]
    Devices(#[from] crate::saved::LoadError),
    /// KVM refused the saved VM or vCPU state.
    #[error(transparent)]
    State(#[from] nkvm::state::StateError),
    /// The built-in machine's configuration reached the `--kernel` builder.
    #[error("the built-in machine has no kernel to build around")]
    NotAKernelMachine,
}

/// The exit status when the guest failed (a triple fault, an exit nkvm
/// cannot handle, a kernel panic): even, so it never reads as a
/// kvm-unit-tests status, which is always odd (`(v << 1) | 1`). nkvm's own
/// errors (bad arguments, no KVM) exit with 2.
pub const GUEST_FAILED: u8 = 4;

/// How one vCPU thread ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The guest asked to power off.
    PowerOff,
    /// The guest asked to reset (reboot): the VMM ends, as for power-off.
    Reset,
    /// The vCPU halted with interrupts off: it will never run again.
    Halted,
    /// The VMM stopped it.
    Stopped,
    /// The user pressed the console's escape key.
    Escaped,
    /// The guest wrote the test-exit port (kvm-unit-tests): end the
    /// process with this status, `(value << 1) | 1` as QEMU's isa-debug-exit.
    TestExit(u8),
    /// The guest or KVM failed.
    Failed(String),
    /// The guest moved to another nkvm (a migration completed).
    Migrated(String),
}

/// What the vCPU threads share.
pub(crate) struct Shared {
    stop: AtomicBool,
    /// The console's escape key ended the guest.
    escaped: AtomicBool,
    /// The guest reset the machine through a device (port 0xcf9 or 0x92).
    reset: AtomicBool,
    /// The guest wrote the test-exit port: the process status it asked for.
    test_exit: Mutex<Option<u8>>,
    /// Filled by `run_vcpus`, for whoever must stop the vCPUs.
    kickers: std::sync::Mutex<Vec<nkvm::Kicker>>,
    /// ACPI S3, on a machine that has it (the multiboot one).
    sleep: std::sync::OnceLock<Sleep>,
    /// Pausing and resuming the vCPUs (the API socket, migration).
    pub(crate) control: Control,
    /// Set when the guest has moved away: where to.
    migrated: Mutex<Option<String>>,
}

impl Shared {
    /// State for `cpus` vCPUs.
    pub(crate) fn new(cpus: u32) -> Self {
        Self {
            stop: AtomicBool::new(false),
            escaped: AtomicBool::new(false),
            reset: AtomicBool::new(false),
            test_exit: Mutex::new(None),
            kickers: Mutex::new(Vec::new()),
            sleep: std::sync::OnceLock::new(),
            control: Control::new(cpus),
            migrated: Mutex::new(None),
        }
    }

    /// Stops every vCPU (they return `Outcome::Stopped`).
    pub(crate) fn stop_all(&self) {
        self.stop.store(true, SeqCst);
        self.control.stop();
        self.kick_all();
    }

    /// Kicks every vCPU out of the guest (to see a pause or a stop, or S3).
    pub(crate) fn kick_all(&self) {
        self.kickers.lock().unwrap_or_else(|p| p.into_inner()).iter().for_each(nkvm::Kicker::kick);
    }

    /// The guest now runs elsewhere: stop here, and say where it went.
    pub(crate) fn migrated(&self, to: &str) {
        *self.migrated.lock().unwrap_or_else(|p| p.into_inner()) = Some(to.to_string());
        self.stop_all();
    }
}

/// Boots the guest `args` name (a Linux kernel, a multiboot kernel such as
/// a kvm-unit-tests image, or the built-in guest), or brings back the one
/// `--restore` or `--incoming` names, and returns the process exit code.
pub fn run(args: &RunArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let hv = Hypervisor::open()?;
    match intake::take(&hv, args)? {
        // The built-in machine is built once everything has come.
        Some(Intake::Arriving(a)) if a.stream.config().kind == MachineKind::Builtin => {
            crate::builtin_machine::run(&hv, args, Some(a.finish()?))
        }
        Some(Intake::Arriving(a)) => kernel::run(&hv, args, kernel::Source::Arriving(Box::new(a))),
        Some(Intake::Saved(resumed)) if resumed.state.config.kind == MachineKind::Builtin => {
            crate::builtin_machine::run(&hv, args, Some(resumed))
        }
        Some(Intake::Saved(resumed)) => kernel::run(&hv, args, kernel::Source::Saved(Box::new(resumed))),
        None if args.kernel.is_some() => kernel::run(&hv, args, kernel::Source::Boot),
        None => crate::builtin_machine::run(&hv, args, None),
    }
}

/// Prints the statistics and turns the outcome into the exit code.
pub(crate) fn finish(args: &RunArgs, stats: &ExitStats, outcome: Outcome) -> Result<ExitCode, MachineError> {
    if args.stats {
        eprint!("{}", stats.render());
    }
    let _ = io::stdout().flush();
    Ok(match outcome {
        Outcome::PowerOff => ExitCode::SUCCESS,
        Outcome::Reset => {
            eprintln!("nkvm: guest reset");
            ExitCode::SUCCESS
        }
        Outcome::Escaped => {
            eprintln!("\r\nnkvm: guest ended from the console ({})", terminal::ESCAPE);
            ExitCode::SUCCESS
        }
        Outcome::TestExit(status) => ExitCode::from(status),
        Outcome::Migrated(to) => {
            eprintln!("nkvm: the guest migrated to {to}; this process ends");
            ExitCode::SUCCESS
        }
        Outcome::Failed(why) => {
            eprintln!("nkvm: guest stopped: {why}");
            ExitCode::from(GUEST_FAILED)
        }
        Outcome::Halted | Outcome::Stopped => {
            eprintln!("nkvm: every vCPU halted without powering off");
            ExitCode::from(GUEST_FAILED)
        }
    })
}
