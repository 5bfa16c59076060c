//! The built-in guest's machine: RAM, the 16550 on 0x3f8, the test device,
//! the ACPI power-off port; no irqchip. It runs the built-in guest, a raw
//! `--image`, a snapshot (`--restore`) or a migrated guest (`--incoming`),
//! and it is the machine that snapshots and migrates. With
//! `--device-process` the 16550 and the test device run in their own
//! processes (their states are asked of them and given back to them).

use std::io;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use nkvm::io::{IoHandler, IoRange, Ordering};
use nkvm::{ExitStats, GuestAddress, Hypervisor, LineTracer, LongMode, Vm, VmConfig};
use nkvm_devices::serial::Serial;
use nkvm_devices::test_device::{TestDevice, TEST_DEVICE_SIZE};
use nkvm_devices::IoDevice;

use crate::builtin;
use crate::cli::{DeviceModel, RunArgs};
use crate::devices::DeviceProcess;
use crate::machine::intake::{RestoreError, Resumed};
use crate::machine::{self, MachineError, Shared};
use crate::running::Running;
use crate::saved::SavedDevices;
use crate::snapshot::{DecodedState, MachineConfig};

/// An nkvm-devices model shared between its I/O region and the VMM (which
/// saves and restores it).
struct SharedDevice<D>(Arc<Mutex<D>>);

impl<D: IoDevice + Send> IoHandler for SharedDevice<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).write(offset, data);
    }
}

/// The saved devices' names, as snapshots and streams hold them.
const SERIAL: &str = "serial";
const TEST_DEVICE: &str = "test-device";

/// Attaches fresh models to `vm`; returns them as the machine's saved set.
pub fn attach_devices(vm: &Vm) -> Result<SavedDevices, MachineError> {
    let serial = Arc::new(Mutex::new(Serial::new(Box::new(|_level: bool| {}), io::stdout())));
    let test = Arc::new(Mutex::new(TestDevice::new()));
    vm.attach_handler(IoRange::pio(builtin::COM1, 8), Box::new(SharedDevice(serial.clone())))?;
    vm.attach_handler(IoRange::mmio(builtin::TEST_DEVICE, TEST_DEVICE_SIZE), Box::new(SharedDevice(test.clone())))?;
    let mut saved = SavedDevices::default();
    saved.add_shared(SERIAL, serial);
    saved.add_shared(TEST_DEVICE, test);
    Ok(saved)
}

/// Starts the 16550 and the test device each in its own process, attached
/// to `vm`; returns their states (asked of the processes) as the machine's
/// saved set.
fn attach_processes(vm: &Arc<Vm>, processes: &mut Vec<DeviceProcess>) -> Result<SavedDevices, MachineError> {
    let mut saved = SavedDevices::default();
    for (name, model, range) in [
        (SERIAL, DeviceModel::Serial, IoRange::pio(builtin::COM1, 8)),
        (TEST_DEVICE, DeviceModel::Test, IoRange::mmio(builtin::TEST_DEVICE, TEST_DEVICE_SIZE)),
    ] {
        let process = DeviceProcess::attach(vm, model, range, Ordering::Sync)?;
        saved.add(name, process.saved(vm));
        processes.push(process);
    }
    Ok(saved)
}

/// Runs the machine as `args` say, or the saved one `resumed` brings, and
/// returns the exit code.
pub fn run(hv: &Hypervisor, args: &RunArgs, resumed: Option<Resumed>) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let (vm, saved, mut answer, since) = match resumed {
        Some(r) => (r.vm, Some(r.state), r.answer, r.since),
        None => {
            let config = VmConfig {
                vcpus: args.cpus,
                memory: args.memory,
                dirty_log_start: crate::snapshot::MIGRATION_LOG_START,
                ..Default::default()
            };
            let vm = Vm::new(hv, &config).map_err(MachineError::from)?;
            // After the host's own limit, which names itself.
            if args.cpus > builtin::MAX_CPUS {
                return Err(MachineError::BuiltinCpus { requested: args.cpus, max: builtin::MAX_CPUS }.into());
            }
            (vm, None, None, Instant::now())
        }
    };
    let vm = Arc::new(vm);
    // The device processes (with --device-process) end when dropped, after the vCPUs.
    let mut processes = Vec::new();
    let (vcpus, running) = match prepare(hv, &vm, args, saved.as_ref(), &mut processes) {
        Ok(ready) => ready,
        Err(e) => {
            Resumed::refuse(answer.as_mut(), &e);
            return Err(e.into());
        }
    };
    let running = Arc::new(running);
    if let Some(path) = &args.api_socket {
        crate::api::serve(path, running.clone())
            .map_err(|source| RestoreError::Api { path: path.display().to_string(), source })?;
    }
    Resumed::announce(answer, args, since)?;
    let stats = ExitStats::new();
    let outcome = machine::run_vcpus(with_tracers(vcpus, args, &stats), &vm, &running.shared);
    if let Some(path) = &args.api_socket {
        crate::api::remove(path);
    }
    Ok(machine::finish(args, &stats, outcome?)?)
}

/// Devices, vCPUs and the shared state of a fresh or a saved machine.
/// With `--device-process` each model runs in its own process (into
/// `processes`), whose state a save asks of it and a restore gives it.
fn prepare(
    hv: &Hypervisor,
    vm: &Arc<Vm>,
    args: &RunArgs,
    saved: Option<&DecodedState>,
    processes: &mut Vec<DeviceProcess>,
) -> Result<(Vec<nkvm::Vcpu>, Running), RestoreError> {
    let devices = if args.device_process { attach_processes(vm, processes)? } else { attach_devices(vm)? };
    let machine_config = MachineConfig::builtin(vm.config().vcpus, vm.config().memory);
    let mut vcpus = Vec::new();
    if let Some(saved) = saved {
        vm.restore_state(&saved.vm)?;
        devices.restore_all(&saved.devices)?;
        for state in &saved.vcpus {
            let mut vcpu = vm.create_vcpu(state.id).map_err(nkvm::state::StateError::from)?;
            vcpu.restore_state(state)?;
            vcpus.push(vcpu);
        }
    } else {
        load_guest(vm, args)?;
        vcpus = boot_vcpus(hv, vm)?;
    }
    let shared = Arc::new(Shared::new(machine_config.cpus));
    Ok((vcpus, Running::new(vm.clone(), shared, devices, machine_config)))
}

/// Creates the vCPUs of a fresh machine: long mode at [`builtin::ENTRY`],
/// the id in `rdi`, the count in `rbp`, stacks 16 KiB apart.
fn boot_vcpus(hv: &Hypervisor, vm: &Vm) -> Result<Vec<nkvm::Vcpu>, MachineError> {
    let long_mode = LongMode::install(&vm.memory(), GuestAddress(builtin::TABLES))?;
    let cpuid = hv.supported_cpuid()?;
    let cpus = vm.config().vcpus;
    let mut vcpus = Vec::new();
    for id in 0..cpus {
        let vcpu = vm.create_vcpu(id)?;
        vcpu.set_cpuid(&cpuid)?;
        let stack = builtin::STACK_TOP - 0x4000 * u64::from(id);
        vcpu.set_long_mode(&long_mode, GuestAddress(builtin::ENTRY), GuestAddress(stack))?;
        let mut regs = vcpu.regs()?;
        regs.rdi = u64::from(id);
        regs.rbp = u64::from(cpus);
        vcpu.set_regs(&regs)?;
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

/// Writes the built-in guest, or the `--image`, at [`builtin::ENTRY`].
fn load_guest(vm: &Vm, args: &RunArgs) -> Result<(), RestoreError> {
    let code = match &args.image {
        Some(path) => {
            std::fs::read(path).map_err(|source| RestoreError::Image { path: path.display().to_string(), source })?
        }
        None => builtin::assemble().map_err(|e| MachineError::Assemble(e.to_string()))?,
    };
    Ok(vm.write_memory(GuestAddress(builtin::ENTRY), &code).map_err(MachineError::from)?)
}

fn with_tracers(mut vcpus: Vec<nkvm::Vcpu>, args: &RunArgs, stats: &ExitStats) -> Vec<nkvm::Vcpu> {
    for vcpu in &mut vcpus {
        if args.trace {
            vcpu.add_tracer(Box::new(LineTracer::new(io::stderr())));
        }
        if args.stats {
            vcpu.add_tracer(stats.tracer());
        }
    }
    vcpus
}
