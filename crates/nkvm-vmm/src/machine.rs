//! Running a VM: one thread per vCPU; devices sit on nkvm I/O regions (in
//! process or in their own), the rest of the exits are handled here; the
//! machine stops on power-off or on a fatal exit.

use std::io::{self, Write};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;

use nkvm::io::IoRange;
use nkvm::{Exit, ExitStats, GuestAddress, Hypervisor, LineTracer, LongMode, RunState, Vcpu, Vm, VmConfig};
use nkvm_devices::power::PowerEvent;
use nkvm_devices::serial::Serial;

use crate::acpi::{self, PlatformRequest};
use crate::builtin;
use crate::cli::RunArgs;
use crate::cmdline;
use crate::console::{PanicWatch, WatchedConsole};
use crate::control::Control;
use crate::cpu_features;
use crate::devices::{DeviceProcess, InProcess};
use crate::ioapic;
use crate::linux::{self, LinuxBoot};
use crate::multiboot::{self, MultibootBoot};
use crate::pci_devices::{PciConfig, ResetHook};
use crate::sleep::{Parked, Sleep, SleepError};
use crate::terminal::{self, RawMode, SerialRegion, SharedSerial};
use crate::testdev;

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
/// a kvm-unit-tests image, or the built-in guest) and returns the process
/// exit code.
pub fn run(args: &RunArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let Some(kernel) = &args.kernel else { return crate::builtin_machine::run(args) };
    if args.api_socket.is_some() {
        return Err("--api-socket serves the built-in machine (the built-in guest, --image, --restore, --incoming); \
                    a --kernel machine cannot be snapshotted or migrated yet"
            .into());
    }
    let boot = if multiboot::is_multiboot(&kernel_head(kernel)?) {
        Boot::Multiboot
    } else {
        Boot::Linux(LinuxBoot { kernel: kernel.clone(), initrd: args.initrd.clone(), cmdline: linux_cmdline(args) })
    };
    Ok(run_kernel(args, &boot)?)
}

/// The Linux command line: the user's (or the default) with the host
/// work-arounds it lacks, unless `--no-host-workarounds`.
fn linux_cmdline(args: &RunArgs) -> String {
    let given = args.cmdline.as_deref().unwrap_or(cmdline::DEFAULT_CMDLINE);
    if args.no_host_workarounds {
        return given.to_string();
    }
    let (full, added) = cmdline::with_host_workarounds(given);
    if !added.is_empty() && args.cmdline.is_some() {
        eprintln!(
            "nkvm: added to the kernel command line for this host: {} (--no-host-workarounds to pass it as given)",
            added.join(" ")
        );
    }
    full
}

/// The first bytes of the kernel file, where a multiboot header would be.
fn kernel_head(path: &std::path::Path) -> Result<Vec<u8>, MachineError> {
    use std::io::Read;
    let read = |source| linux::LinuxError::Read { path: path.display().to_string(), source };
    let mut head = Vec::with_capacity(8192);
    std::fs::File::open(path).map_err(read)?.take(8192).read_to_end(&mut head).map_err(read)?;
    Ok(head)
}

/// What `--kernel` is.
#[derive(Debug)]
enum Boot {
    /// A Linux bzImage or ELF vmlinux: entered in long mode with a zero page.
    Linux(LinuxBoot),
    /// A multiboot kernel (kvm-unit-tests): entered in 32-bit protected mode
    /// on the PC that test suite expects (fw_cfg, the test-exit port,
    /// pc-testdev, the PM timer, CMOS).
    Multiboot,
}

/// Boots a kernel: split irqchip (APs wait for the guest's INIT/SIPI in
/// KVM), ACPI tables, the IOAPIC in this process, the 16550 on 0x3f8 (IRQ 4
/// on IOAPIC pin 4 when in process), the ACPI fixed ports; then what the
/// kind of kernel needs.
fn run_kernel(args: &RunArgs, boot: &Boot) -> Result<ExitCode, MachineError> {
    let hv = Hypervisor::open()?;
    let config = VmConfig { vcpus: args.cpus, memory: args.memory, split_irqchip: true, ..Default::default() };
    let vm = Arc::new(Vm::new(&hv, &config)?);
    let ioapic = ioapic::attach(&vm, acpi::IOAPIC_ADDR)?;
    let pm1a_evt = IoRange::pio(acpi::PM1A_EVT, u16::from(acpi::PM1A_EVT_LEN));
    vm.attach_handler(pm1a_evt, Box::new(InProcess(acpi::Pm1Event::default())))?;
    let shared = Arc::new(Shared::new(args.cpus));
    let mut cpuid = hv.supported_cpuid()?;
    // Device processes end when this drops, after the vCPUs.
    let mut processes = Vec::new();
    let boot_lint = crate::firmware::BootLint::default();
    let start = match boot {
        Boot::Linux(linux_boot) => {
            let entry = linux::load(&vm, linux_boot, args.cpus)?;
            let long_mode = LongMode::install(&vm.memory(), GuestAddress(linux::TABLES))?;
            let resetter = shared.clone();
            let reset = ResetHook(Arc::new(move || {
                resetter.reset.store(true, SeqCst);
                resetter.stop_all();
            }));
            let device_process = if args.device_process {
                Some(std::env::current_exe().map_err(crate::pci_devices::PciSetupError::Exe)?)
            } else {
                None
            };
            let pci = PciConfig {
                disk: args.disk.clone(),
                disk_read_only: args.disk_readonly,
                reset: Some(reset),
                device_process,
                device_process_env: Vec::new(),
                device_process_stdout: None,
            };
            crate::pci_devices::attach(&vm, &pci)?;
            let masked = linux::mask_unrunnable(&mut cpuid);
            if !masked.is_empty() {
                eprintln!("nkvm: CPUID: hiding {} (this host cannot run them in a guest)", masked.join(", "));
            }
            Start::Long { long_mode, entry }
        }
        Boot::Multiboot => {
            let kernel = args.kernel.as_deref().unwrap_or(std::path::Path::new(""));
            let cmdline = args.cmdline.as_deref().unwrap_or("");
            let mb = MultibootBoot { kernel, cmdline, module: args.initrd.as_deref() };
            let entry = multiboot::load(&vm.memory(), &mb)?;
            let tables =
                acpi::AcpiTables::with_s3(args.cpus, Some(acpi::PM_TIMER_PORT)).map_err(linux::LinuxError::Acpi)?;
            acpi::install_tables(&vm, &tables).map_err(linux::LinuxError::Acpi)?;
            let events = power_events(&shared)?;
            let machine = testdev::Machine {
                cpus: args.cpus,
                memory: args.memory,
                events,
                device_processes: args.device_process,
                boot_lint: boot_lint.clone(),
            };
            let platform = testdev::attach(&vm, &ioapic, &machine)?;
            processes = platform.processes;
            let _ = shared.sleep.set(Sleep::new(tables.facs, platform.wake));
            Start::Multiboot(entry)
        }
    };
    args.cpu_features.apply(&mut cpuid);
    if let Some(vendor) = args.cpu_vendor {
        vendor.apply(&mut cpuid);
    }
    if args.hyperv {
        cpuid = nkvm::hyperv::with_hyperv(&cpuid, &hv.supported_hv_cpuid()?);
    }
    let com1 = IoRange::pio(builtin::COM1, 8);
    let panic = PanicWatch::default();
    let mut input = None;
    if args.device_process {
        processes.push(DeviceProcess::attach_console(&vm, com1, panic.clone())?);
    } else {
        let console = WatchedConsole::new(io::stdout(), panic.clone());
        let serial: SharedSerial = Arc::new(Mutex::new(Serial::new(ioapic.line(usize::from(acpi::COM1_IRQ)), console)));
        vm.attach_handler(com1, Box::new(SerialRegion(serial.clone())))?;
        input = Some(serial);
    }
    let stats = ExitStats::new();
    let mut vcpus = Vec::new();
    for id in 0..args.cpus {
        let mut vcpu = vm.create_vcpu(id)?;
        let mut own = cpuid.clone();
        linux::set_apic_id(&mut own, id);
        vcpu.set_cpuid(&own)?;
        if args.hyperv {
            vcpu.enable_hyperv_synic()?;
        }
        if let Some(sleep) = shared.sleep.get() {
            sleep.remember(&mut vcpu)?;
        }
        if id == 0 {
            start.apply(&vcpu)?;
            let _ = boot_lint.set(vcpu.lint());
        }
        if args.trace {
            vcpu.add_tracer(Box::new(LineTracer::new(io::stderr())));
        }
        if args.stats {
            vcpu.add_tracer(stats.tracer());
        }
        vcpus.push(vcpu);
    }
    // KVM lets a guest touch some MSRs its CPUID does not offer; a real CPU
    // raises #GP (kvm-unit-tests' msr test checks it). The CPUID is the one
    // KVM reports for the vCPU: on this host some leaves are not what
    // KVM_SET_CPUID2 set, and the guest reads KVM's (docs/architecture.md).
    if let Some(first) = vcpus.first() {
        match vm.deny_msrs(&cpu_features::msrs_cpuid_lacks(&first.cpuid()?)) {
            Err(nkvm::VmError::MissingCapability(what)) => {
                eprintln!(
                    "nkvm: warning: this host's KVM lacks {what}: the guest can reach MSRs its CPUID does not offer"
                )
            }
            other => other?,
        }
    }
    // The terminal goes back to canonical mode when `_raw` drops: on every
    // return from here, error or not.
    let _raw = input.as_ref().map(|_| RawMode::enter());
    if let Some(serial) = input {
        let stopper = shared.clone();
        terminal::spawn_input(serial, move || {
            stopper.escaped.store(true, SeqCst);
            stopper.stop_all();
        })
        .map_err(MachineError::Thread)?;
    }
    let mut outcome = run_vcpus(vcpus, &vm, &shared)?;
    // The vCPUs are done: end the device processes now, which also lets a
    // console process's last lines reach the panic watch.
    drop(std::mem::take(&mut processes));
    if shared.escaped.load(SeqCst) {
        outcome = Outcome::Escaped;
    } else if let Some(status) = *shared.test_exit.lock().unwrap_or_else(|p| p.into_inner()) {
        outcome = Outcome::TestExit(status);
    } else if shared.reset.load(SeqCst) {
        outcome = Outcome::Reset;
    }
    // A kernel panic followed by the reboot `panic=-1` asks for is a failure.
    if let (Outcome::Reset | Outcome::Halted, Some(why)) = (&outcome, panic.message()) {
        return finish(args, &stats, Outcome::Failed(format!("the guest kernel panicked: {why}")));
    }
    finish(args, &stats, outcome)
}

/// How the boot vCPU starts.
enum Start {
    /// Linux: long mode at the 64-bit entry, the zero page in `rsi`.
    Long { long_mode: LongMode, entry: linux::Entry },
    /// Multiboot: 32-bit protected mode, the magic in `eax`, the information in `ebx`.
    Multiboot(multiboot::MultibootEntry),
}

impl Start {
    fn apply(&self, vcpu: &Vcpu) -> Result<(), MachineError> {
        match self {
            Start::Long { long_mode, entry } => {
                vcpu.set_long_mode(long_mode, entry.rip, GuestAddress(linux::BOOT_STACK))?;
                let mut regs = vcpu.regs()?;
                regs.rsi = entry.zero_page.0;
                vcpu.set_regs(&regs)?;
            }
            Start::Multiboot(entry) => {
                vcpu.set_flat_protected_mode(GuestAddress(entry.eip.into()), multiboot::BOOTLOADER_MAGIC, entry.info)?
            }
        }
        Ok(())
    }
}

/// Starts the thread that turns the platform devices' power events
/// (the test-exit port, port 0x92's fast reset) into the machine stopping;
/// returns the sender the devices report on.
fn power_events(shared: &Arc<Shared>) -> Result<mpsc::Sender<PowerEvent>, MachineError> {
    let (tx, rx) = mpsc::channel();
    let shared = shared.clone();
    thread::Builder::new()
        .name("power-events".into())
        .spawn(move || {
            for event in rx {
                match event {
                    PowerEvent::TestExit { status } => {
                        let mut exit = shared.test_exit.lock().unwrap_or_else(|p| p.into_inner());
                        exit.get_or_insert(status);
                    }
                    PowerEvent::Reset => shared.reset.store(true, SeqCst),
                    PowerEvent::PowerOff => {}
                }
                shared.stop_all();
            }
        })
        .map_err(MachineError::Thread)?;
    Ok(tx)
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

/// Runs every vCPU on its own thread until one powers off or fails (then
/// kicks the others out) or all have halted. Returns the deciding outcome.
pub(crate) fn run_vcpus(vcpus: Vec<Vcpu>, vm: &Arc<Vm>, shared: &Arc<Shared>) -> Result<Outcome, MachineError> {
    let kickers: Vec<_> = vcpus.iter().map(Vcpu::kicker).collect();
    *shared.kickers.lock().unwrap_or_else(|p| p.into_inner()) = kickers.clone();
    let (tx, rx) = mpsc::channel();
    let mut handles = Vec::new();
    for vcpu in vcpus {
        let tx = tx.clone();
        let shared = shared.clone();
        let vm = vm.clone();
        let handle = thread::Builder::new()
            .name(format!("vcpu{}", vcpu.id()))
            .spawn(move || {
                let id = vcpu.id();
                let outcome = vcpu_loop(vcpu, &vm, &shared);
                shared.control.gone(id);
                let _ = tx.send(outcome);
            })
            .map_err(MachineError::Thread)?;
        handles.push(handle);
    }
    drop(tx);
    let mut decided = None;
    for outcome in rx.iter() {
        match outcome {
            Outcome::Halted | Outcome::Stopped => {}
            decisive => {
                if decided.is_none() {
                    shared.stop.store(true, SeqCst);
                    kickers.iter().for_each(nkvm::Kicker::kick);
                    decided = Some(decisive);
                }
            }
        }
    }
    for h in handles {
        let _ = h.join();
    }
    if let Some(to) = shared.migrated.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Ok(Outcome::Migrated(to));
    }
    Ok(decided.unwrap_or(Outcome::Halted))
}

fn vcpu_loop(mut vcpu: Vcpu, vm: &Vm, shared: &Shared) -> Outcome {
    let mut run = RunState::new();
    // An exit that saving the state for a pause ran into (a string I/O
    // instruction's next element): handled before entering again.
    let mut pending = None;
    loop {
        if shared.stop.load(SeqCst) {
            return Outcome::Stopped;
        }
        if pending.is_none() && shared.control.pause_wanted() {
            match vcpu.save_state(&mut run) {
                Ok(state) => {
                    if !shared.control.park(vcpu.id(), Ok(state)) {
                        return Outcome::Stopped;
                    }
                    continue;
                }
                Err(nkvm::state::StateError::NotSettled { exit, .. }) => pending = Some(exit),
                Err(e) => {
                    if !shared.control.park(vcpu.id(), Err(e.to_string())) {
                        return Outcome::Stopped;
                    }
                    continue;
                }
            }
        }
        let exit = match pending.take() {
            Some(exit) => exit,
            None => match vcpu.enter_guest(&mut run) {
                Ok(exit) => exit,
                Err(e) => return Outcome::Failed(e.to_string()),
            },
        };
        match exit {
            Exit::IoOut { port, size, data } => match acpi::port_write(port, size, data) {
                Some(PlatformRequest::PowerOff) => return Outcome::PowerOff,
                Some(PlatformRequest::Reset) => return Outcome::Reset,
                Some(PlatformRequest::Sleep) => match shared.sleep.get() {
                    Some(sleep) => sleep.request(|| shared.kick_all()),
                    None => log::warn!("vCPU {}: S3 requested, but this machine has no S3; ignored", vcpu.id()),
                },
                None => log::debug!("vCPU {}: write to unclaimed port {port:#x} ignored", vcpu.id()),
            },
            // Nothing claims the address: reads see all ones, as on a real
            // bus, except the ACPI fixed ports and the 8042 status.
            Exit::IoIn { port, size } => run.complete_read(acpi::port_read(port, size).unwrap_or(u64::MAX)),
            Exit::MmioRead { .. } => run.complete_read(u64::MAX),
            Exit::MmioWrite { addr, .. } => log::debug!("vCPU {}: write to unclaimed {addr} ignored", vcpu.id()),
            Exit::IoRegionFailed { id } => {
                for f in vcpu_failures(vm, id) {
                    eprintln!("nkvm: device {} failed: {}; the guest now reads all ones from it", f.name, f.reason);
                }
            }
            Exit::Hlt => return Outcome::Halted,
            // S3: the kick that asked every vCPU to park came back after
            // KVM completed the exit before it (the PM1a write included).
            Exit::Kicked if shared.sleep.get().is_some_and(Sleep::requested) => {
                let Some(sleep) = shared.sleep.get() else { continue };
                match sleep.park(&mut vcpu, vm, &shared.stop) {
                    Ok(Parked::Woken) => run = RunState::new(),
                    Ok(Parked::Stopped) => return Outcome::Stopped,
                    Err(e) => return Outcome::Failed(e.to_string()),
                }
            }
            Exit::Kicked | Exit::InterruptWindow => {}
            // Instructions KVM cannot emulate on this host: complete them in
            // user space (or inject the right exception) and go on.
            Exit::InternalError(e) if e.is_emulation_failure() => match nkvm::emulate::complete(&vcpu, vm, &e) {
                Ok(done) => log::debug!("vCPU {}: {done:?}", vcpu.id()),
                Err(err) => return Outcome::Failed(format!("vCPU {}: {err}", vcpu.id())),
            },
            Exit::Shutdown => return Outcome::Failed(format!("vCPU {} triple-faulted{}", vcpu.id(), at_rip(&vcpu))),
            other => return Outcome::Failed(format!("vCPU {}: {other}{}", vcpu.id(), at_rip(&vcpu))),
        }
    }
}

fn at_rip(vcpu: &Vcpu) -> String {
    vcpu.regs().map(|r| format!(" at rip {:#x}", r.rip)).unwrap_or_default()
}

fn vcpu_failures(vm: &Vm, id: nkvm::RegionId) -> Vec<nkvm::io::RegionFailure> {
    vm.io_region_failures().into_iter().filter(|f| f.id == id).collect()
}
