//! Putting a `--kernel` machine together, fresh or saved: split irqchip
//! (APs wait for the guest's INIT/SIPI in KVM), the IOAPIC in this
//! process, the ACPI fixed ports, the 16550 on 0x3f8 (IRQ 4 on IOAPIC pin
//! 4 when in process), then what the kind of machine has (Linux: PCI;
//! multiboot: the kvm-unit-tests platform and S3). Every model whose state
//! travels is registered in the machine's [`SavedDevices`]; a part nkvm
//! cannot save registers why.
//!
//! A fresh machine loads its kernel and places vCPU 0 at its entry. A saved
//! one loads nothing (the kernel, its ACPI tables and boot information are
//! in the saved RAM) and [`build`] leaves its vCPUs blank; [`restore`] then
//! puts back the VM state, each vCPU's state (its CPUID among it), then the
//! devices, before any vCPU runs. Between the two a migration's memory and
//! state arrive: the machine is built while the source still runs.

use std::io;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{mpsc, Arc, Mutex};
use std::thread;

use nkvm::io::IoRange;
use nkvm::{ExitStats, GuestAddress, Hypervisor, LineTracer, LongMode, Vcpu, Vm};
use nkvm_devices::power::PowerEvent;
use nkvm_devices::serial::Serial;

use super::kernel::Boot;
use super::{MachineError, Shared};
use crate::acpi;
use crate::builtin;
use crate::cli::RunArgs;
use crate::console::{PanicWatch, WatchedConsole};
use crate::cpu_features;
use crate::devices::{DeviceProcess, InProcess};
use crate::firmware::BootLint;
use crate::ioapic::{self, IoapicPins};
use crate::linux;
use crate::multiboot::{self, MultibootBoot};
use crate::pci_devices::{Disk, PciConfig, ResetHook};
use crate::saved::SavedDevices;
use crate::sleep::Sleep;
use crate::snapshot::{DecodedState, MachineConfig, MachineKind};
use crate::terminal::{ConsoleInput, SerialRegion, SharedSerial};
use crate::testdev;

/// The saved devices' names (the platform and PCI parts name their own).
const IOAPIC: &str = "ioapic";
const PM1A_EVENT: &str = "acpi-pm1-event";
const SERIAL: &str = "serial";

/// What a machine is built from.
pub(super) struct Parts<'a> {
    pub hv: &'a Hypervisor,
    pub vm: &'a Arc<Vm>,
    pub config: &'a MachineConfig,
    pub args: &'a RunArgs,
    /// The kernel of a fresh boot.
    pub boot: Option<&'a Boot>,
    /// A saved machine (a snapshot, a migration): load nothing, and leave
    /// the vCPUs for [`restore`].
    pub restoring: bool,
    /// Where `--stats` counts exits.
    pub stats: &'a ExitStats,
}

/// A machine ready to run.
pub(super) struct Built {
    /// Its vCPUs, placed at the entry or restored.
    pub vcpus: Vec<Vcpu>,
    /// The models whose state travels.
    pub devices: SavedDevices,
    /// What the vCPU threads share.
    pub shared: Arc<Shared>,
    /// Device processes (they end when dropped, after the vCPUs).
    pub processes: Vec<DeviceProcess>,
    /// The in-process 16550, for the terminal's keystrokes.
    pub input: Option<ConsoleInput>,
    /// The console's panic watch.
    pub panic: PanicWatch,
}

/// How the boot vCPU of a fresh machine starts.
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

/// What the machine-kind parts hand back.
struct Kind {
    /// Where vCPU 0 starts (fresh machines).
    start: Option<Start>,
    /// The CPUID every vCPU gets, before its APIC ID (fresh machines).
    cpuid: Option<nkvm::Cpuid>,
}

/// Builds the machine `parts` describe.
pub(super) fn build(parts: &Parts<'_>) -> Result<Built, MachineError> {
    let vm = parts.vm;
    let mut devices = SavedDevices::default();
    let ioapic = ioapic::attach(vm, acpi::IOAPIC_ADDR)?;
    devices.add(IOAPIC, Arc::new(ioapic.saved()));
    let pm1a = Arc::new(Mutex::new(acpi::Pm1Event::default()));
    let pm1a_evt = IoRange::pio(acpi::PM1A_EVT, u16::from(acpi::PM1A_EVT_LEN));
    vm.attach_handler(pm1a_evt, Box::new(InProcess(pm1a.clone())))?;
    devices.add_shared(PM1A_EVENT, pm1a);
    let shared = Arc::new(Shared::new(parts.config.cpus));
    let boot_lint = BootLint::default();
    let mut processes = Vec::new();
    let kind = match &parts.config.kind {
        MachineKind::Linux { .. } => linux_parts(parts, &shared, &mut devices)?,
        MachineKind::Multiboot => multiboot_parts(parts, &shared, &ioapic, &boot_lint, &mut devices, &mut processes)?,
        MachineKind::Builtin => return Err(MachineError::NotAKernelMachine),
    };
    let (input, panic) = console(parts, &ioapic, &mut devices, &mut processes)?;
    let vcpus = create_vcpus(parts, &shared, &kind, &boot_lint)?;
    if !parts.restoring {
        deny_msrs(vm, &vcpus)?;
    }
    Ok(Built { vcpus, devices, shared, processes, input, panic })
}

/// Puts `saved` into the machine [`build`] made for it: the VM state (the
/// clock), each vCPU's (CPUID first; then S3's reset state is taken and,
/// with `hyperv`, the SynIC enabled; then the rest), then the devices. The
/// devices come after the vCPUs (which do not run yet): a restored device
/// may raise an interrupt (a virtio device interrupts its driver once per
/// queue), which a local APIC restored afterwards would lose.
pub(super) fn restore(parts: &Parts<'_>, built: &mut Built, saved: &DecodedState) -> Result<(), MachineError> {
    parts.vm.restore_state(&saved.vm)?;
    // One state per vCPU (`MachineState::decode` checked the count).
    for (id, (vcpu, state)) in built.vcpus.iter_mut().zip(&saved.vcpus).enumerate() {
        // Before the saved CPUID is set: a feature this host lacks is named.
        vcpu.check_cpu_features(state)?;
        let cpuid = nkvm::Cpuid::from_entries(&state.cpuid)
            .map_err(|_| nkvm::state::StateError::TooManyCpuidEntries { id: id as u32, count: state.cpuid.len() })?;
        configure_vcpu(vcpu, &cpuid, parts.config, &built.shared)?;
        vcpu.restore_state(state)?;
    }
    built.devices.restore_all(&saved.devices)?;
    deny_msrs(parts.vm, &built.vcpus)
}

/// A vCPU's CPUID, then what is taken or enabled after it: S3's reset
/// state, the SynIC (`hyperv`).
fn configure_vcpu(
    vcpu: &mut Vcpu,
    cpuid: &nkvm::Cpuid,
    config: &MachineConfig,
    shared: &Shared,
) -> Result<(), MachineError> {
    let mut cpuid = cpuid.clone();
    let hidden = crate::cpu_features::hide_nested(&mut cpuid);
    if !hidden.is_empty() && vcpu.id() == 0 {
        log::info!("CPUID: hiding {} (nkvm does not save nested virtualization state)", hidden.join(", "));
    }
    vcpu.set_cpuid(&cpuid)?;
    if config.hyperv {
        vcpu.enable_hyperv_synic()?;
    }
    if let Some(sleep) = shared.sleep.get() {
        sleep.remember(vcpu)?;
    }
    Ok(())
}

/// Linux: the kernel loaded (fresh), PCI with virtio-console and the disk.
fn linux_parts(parts: &Parts<'_>, shared: &Arc<Shared>, devices: &mut SavedDevices) -> Result<Kind, MachineError> {
    let (vm, args) = (parts.vm, parts.args);
    let mut kind = Kind { start: None, cpuid: None };
    if let Some(Boot::Linux(linux_boot)) = parts.boot {
        let entry = linux::load(vm, linux_boot, parts.config.cpus)?;
        let long_mode = LongMode::install(&vm.memory(), GuestAddress(linux::TABLES))?;
        kind.start = Some(Start::Long { long_mode, entry });
        let mut cpuid = parts.hv.supported_cpuid()?;
        let masked = linux::mask_unrunnable(&mut cpuid);
        if !masked.is_empty() {
            eprintln!("nkvm: CPUID: hiding {} (this host cannot run them in a guest)", masked.join(", "));
        }
        kind.cpuid = Some(cpuid);
    }
    let resetter = shared.clone();
    let reset = ResetHook(Arc::new(move || {
        resetter.reset.store(true, SeqCst);
        resetter.stop_all();
    }));
    let (disk, disk_read_only) = match (&parts.config.kind, parts.restoring) {
        // Checked when the machine came in (`MachineConfig::check_disk`).
        (MachineKind::Linux { disk: Some(disk), .. }, true) => (Some(Disk::Image(disk.path.clone())), disk.read_only),
        (MachineKind::Linux { vhost_user: Some(socket), .. }, true) => (Some(Disk::VhostUser(socket.clone())), false),
        _ => (args.disk.clone(), args.disk_readonly),
    };
    let device_process = if args.device_process {
        Some(std::env::current_exe().map_err(crate::pci_devices::PciSetupError::Exe)?)
    } else {
        None
    };
    let pci = PciConfig {
        disk,
        disk_read_only,
        reset: Some(reset),
        device_process,
        device_process_env: Vec::new(),
        device_process_stdout: None,
    };
    // The bus and each in-process virtio device; a device served by a
    // device process or a vhost-user backend registers why it cannot be.
    crate::pci_devices::attach(vm, &pci)?.register_saved(devices);
    Ok(kind)
}

/// Multiboot: the kernel and the ACPI tables loaded (fresh), the
/// kvm-unit-tests platform, S3.
fn multiboot_parts(
    parts: &Parts<'_>,
    shared: &Arc<Shared>,
    ioapic: &IoapicPins,
    boot_lint: &BootLint,
    devices: &mut SavedDevices,
    processes: &mut Vec<DeviceProcess>,
) -> Result<Kind, MachineError> {
    let (vm, args, config) = (parts.vm, parts.args, parts.config);
    let mut kind = Kind { start: None, cpuid: None };
    // The same tables as at boot: a saved machine has them in its RAM, and
    // S3 needs to know where their FACS is.
    let tables = acpi::AcpiTables::with_s3(config.cpus, Some(acpi::PM_TIMER_PORT)).map_err(linux::LinuxError::Acpi)?;
    if parts.boot.is_some() {
        let kernel = args.kernel.as_deref().unwrap_or(std::path::Path::new(""));
        let cmdline = args.cmdline.as_deref().unwrap_or("");
        let mb = MultibootBoot { kernel, cmdline, module: args.initrd.as_deref() };
        kind.start = Some(Start::Multiboot(multiboot::load(&vm.memory(), &mb)?));
        acpi::install_tables(vm, &tables).map_err(linux::LinuxError::Acpi)?;
        kind.cpuid = Some(parts.hv.supported_cpuid()?);
    }
    let events = power_events(shared)?;
    let machine = testdev::Machine {
        cpus: config.cpus,
        memory: config.memory,
        events,
        device_processes: args.device_process,
        boot_lint: boot_lint.clone(),
    };
    // Attaching writes the BIOS's real-mode IVT and handlers; a saved
    // guest's own copy of that memory is what it must find.
    let firmware = parts.restoring.then(|| firmware_memory(vm)).transpose()?;
    let platform = testdev::attach(vm, ioapic, &machine)?;
    if let Some(saved) = firmware {
        put_back(vm, saved)?;
        // The vCPUs (vCPU 0's LINT0 among them) exist before the devices
        // are restored: no INTA cycle until the 8259's state is back.
        platform.hold_interrupts_until_restored();
    }
    // Every model, those in device processes included.
    platform.register_saved(devices);
    let _ = shared.sleep.set(Sleep::new(tables.facs, platform.wake));
    processes.extend(platform.processes);
    Ok(kind)
}

/// The real-mode IVT and the BIOS segment, as the guest left them.
const FIRMWARE_RANGES: [(u64, usize); 2] = [(0, 0x400), (0xf_0000, 0x1_0000)];

fn firmware_memory(vm: &Vm) -> Result<Vec<(u64, Vec<u8>)>, MachineError> {
    FIRMWARE_RANGES
        .iter()
        .map(|&(at, len)| {
            let mut bytes = vec![0u8; len];
            vm.read_memory(GuestAddress(at), &mut bytes)?;
            Ok((at, bytes))
        })
        .collect()
}

fn put_back(vm: &Vm, saved: Vec<(u64, Vec<u8>)>) -> Result<(), MachineError> {
    for (at, bytes) in saved {
        vm.write_memory(GuestAddress(at), &bytes)?;
    }
    Ok(())
}

/// The 16550 on 0x3f8: in process or in a device process. Either way its
/// state travels, keystrokes reach it and its interrupt drives IOAPIC pin 4.
fn console(
    parts: &Parts<'_>,
    ioapic: &IoapicPins,
    devices: &mut SavedDevices,
    processes: &mut Vec<DeviceProcess>,
) -> Result<(Option<ConsoleInput>, PanicWatch), MachineError> {
    let com1 = IoRange::pio(builtin::COM1, 8);
    let panic = PanicWatch::default();
    let irq = ioapic.line(usize::from(acpi::COM1_IRQ));
    if parts.args.device_process {
        let (process, input) = DeviceProcess::attach_console(parts.vm, com1, panic.clone(), irq)?;
        // Its state is asked of the process, and given back on a restore.
        devices.add(SERIAL, process.saved(parts.vm));
        processes.push(process);
        return Ok((Some(ConsoleInput::Process(input)), panic));
    }
    let console = WatchedConsole::new(io::stdout(), panic.clone());
    let serial = Arc::new(Mutex::new(Serial::new(irq, console)));
    devices.add_shared(SERIAL, serial.clone());
    let input: SharedSerial = serial;
    parts.vm.attach_handler(com1, Box::new(SerialRegion(input.clone())))?;
    Ok((Some(ConsoleInput::Local(input)), panic))
}

/// Creates the vCPUs: a fresh machine's with the CPUID `kind` says (plus
/// the user's changes), S3's reset state, the SynIC (`--hyperv`) and vCPU 0
/// at the entry; a saved machine's blank, for [`restore`]. Either way with
/// vCPU 0's LINT0 for the 8259 and the tracers.
fn create_vcpus(
    parts: &Parts<'_>,
    shared: &Shared,
    kind: &Kind,
    boot_lint: &BootLint,
) -> Result<Vec<Vcpu>, MachineError> {
    let (args, config) = (parts.args, parts.config);
    let cpuid = match &kind.cpuid {
        Some(cpuid) => {
            let mut cpuid = cpuid.clone();
            args.cpu_features.apply(&mut cpuid);
            if let Some(vendor) = args.cpu_vendor {
                vendor.apply(&mut cpuid);
            }
            if config.hyperv {
                cpuid = nkvm::hyperv::with_hyperv(&cpuid, &parts.hv.supported_hv_cpuid()?);
            }
            Some(cpuid)
        }
        None => None,
    };
    let mut vcpus = Vec::new();
    for id in 0..config.cpus {
        let mut vcpu = parts.vm.create_vcpu(id)?;
        if !parts.restoring {
            let own = match &cpuid {
                Some(cpuid) => {
                    let mut own = cpuid.clone();
                    linux::set_apic_id(&mut own, id);
                    own
                }
                None => parts.hv.supported_cpuid()?,
            };
            configure_vcpu(&mut vcpu, &own, config, shared)?;
            if let (0, Some(start)) = (id, &kind.start) {
                start.apply(&vcpu)?;
            }
        }
        if id == 0 {
            let _ = boot_lint.set(vcpu.lint());
        }
        if args.trace {
            vcpu.add_tracer(Box::new(LineTracer::new(io::stderr())));
        }
        if args.stats {
            vcpu.add_tracer(parts.stats.tracer());
        }
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

/// KVM lets a guest touch some MSRs its CPUID does not offer; a real CPU
/// raises #GP (kvm-unit-tests' msr test checks it). The CPUID is the one
/// KVM reports for the vCPU: on this host some leaves are not what
/// KVM_SET_CPUID2 set, and the guest reads KVM's (docs/architecture.md).
/// A saved machine's vCPUs have their saved CPUID back by now, so the
/// filter derives from the same CPUID as on the source.
fn deny_msrs(vm: &Vm, vcpus: &[Vcpu]) -> Result<(), MachineError> {
    let Some(first) = vcpus.first() else { return Ok(()) };
    match vm.deny_msrs(&cpu_features::msrs_cpuid_lacks(&first.cpuid()?)) {
        Err(nkvm::VmError::MissingCapability(what)) => {
            eprintln!("nkvm: warning: this host's KVM lacks {what}: the guest can reach MSRs its CPUID does not offer");
            Ok(())
        }
        other => Ok(other?),
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
