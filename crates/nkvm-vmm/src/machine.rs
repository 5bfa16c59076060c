//! Running a VM: one thread per vCPU, exits dispatched to the device buses,
//! the machine stopped on power-off or on a fatal exit.

use std::io::{self, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;

use nkvm::{Exit, ExitStats, GuestAddress, Hypervisor, LineTracer, LongMode, RunState, Vcpu, Vm, VmConfig};
use nkvm_devices::serial::Serial;
use nkvm_devices::test_device::{TestDevice, TEST_DEVICE_SIZE};
use nkvm_devices::IoBus;

use crate::builtin;
use crate::cli::RunArgs;

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
    /// A device could not be placed.
    #[error("cannot place device: {0}")]
    Device(String),
    /// Starting a vCPU thread failed.
    #[error("cannot start a vCPU thread")]
    Thread(#[source] io::Error),
}

/// How one vCPU thread ended.
#[derive(Debug)]
enum Outcome {
    /// The guest asked to power off.
    PowerOff,
    /// The vCPU halted with interrupts off: it will never run again.
    Halted,
    /// The VMM stopped it.
    Stopped,
    /// The guest or KVM failed.
    Failed(String),
}

/// What the vCPU threads share.
struct Shared {
    pio: Mutex<IoBus>,
    mmio: Mutex<IoBus>,
    stop: AtomicBool,
}

/// Boots the built-in guest per `args` and returns the process exit code.
pub fn run(args: &RunArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    Ok(run_builtin(args)?)
}

fn run_builtin(args: &RunArgs) -> Result<ExitCode, MachineError> {
    let hv = Hypervisor::open()?;
    let vm = Arc::new(Vm::new(&hv, &VmConfig { vcpus: args.cpus, memory: args.memory, ..Default::default() })?);
    let code = builtin::assemble().map_err(|e| MachineError::Assemble(e.to_string()))?;
    vm.write_memory(GuestAddress(builtin::ENTRY), &code)?;
    let long_mode = LongMode::install(&vm.memory(), GuestAddress(builtin::TABLES))?;

    let mut pio = IoBus::new();
    let serial = Serial::new(Box::new(|_level: bool| {}), io::stdout());
    pio.insert(u64::from(builtin::COM1), 8, Box::new(serial)).map_err(|e| MachineError::Device(e.to_string()))?;
    let mut mmio = IoBus::new();
    mmio.insert(builtin::TEST_DEVICE, TEST_DEVICE_SIZE, Box::new(TestDevice::new()))
        .map_err(|e| MachineError::Device(e.to_string()))?;
    let shared = Arc::new(Shared { pio: Mutex::new(pio), mmio: Mutex::new(mmio), stop: AtomicBool::new(false) });

    let stats = ExitStats::new();
    let mut vcpus = Vec::new();
    for id in 0..args.cpus {
        let mut vcpu = vm.create_vcpu(id)?;
        vcpu.set_cpuid(&hv.supported_cpuid()?)?;
        let stack = builtin::STACK_TOP - 0x4000 * u64::from(id);
        vcpu.set_long_mode(&long_mode, GuestAddress(builtin::ENTRY), GuestAddress(stack))?;
        let mut regs = vcpu.regs()?;
        regs.rdi = u64::from(id);
        regs.rbp = u64::from(args.cpus);
        vcpu.set_regs(&regs)?;
        if args.trace {
            vcpu.add_tracer(Box::new(LineTracer::new(io::stderr())));
        }
        if args.stats {
            vcpu.add_tracer(stats.tracer());
        }
        vcpus.push(vcpu);
    }

    let outcome = run_vcpus(vcpus, &shared)?;
    if args.stats {
        eprint!("{}", stats.render());
    }
    let _ = io::stdout().flush();
    Ok(match outcome {
        Outcome::PowerOff => ExitCode::SUCCESS,
        Outcome::Failed(why) => {
            eprintln!("nkvm: guest stopped: {why}");
            ExitCode::from(1)
        }
        Outcome::Halted | Outcome::Stopped => {
            eprintln!("nkvm: every vCPU halted without powering off");
            ExitCode::from(1)
        }
    })
}

/// Runs every vCPU on its own thread until one powers off or fails (then
/// kicks the others out) or all have halted. Returns the deciding outcome.
fn run_vcpus(vcpus: Vec<Vcpu>, shared: &Arc<Shared>) -> Result<Outcome, MachineError> {
    let kickers: Vec<_> = vcpus.iter().map(Vcpu::kicker).collect();
    let (tx, rx) = mpsc::channel();
    let mut handles = Vec::new();
    for vcpu in vcpus {
        let tx = tx.clone();
        let shared = shared.clone();
        let handle = thread::Builder::new()
            .name(format!("vcpu{}", vcpu.id()))
            .spawn(move || {
                let outcome = vcpu_loop(vcpu, &shared);
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
                    shared.stop.store(true, Ordering::SeqCst);
                    kickers.iter().for_each(nkvm::Kicker::kick);
                    decided = Some(decisive);
                }
            }
        }
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(decided.unwrap_or(Outcome::Halted))
}

fn vcpu_loop(mut vcpu: Vcpu, shared: &Shared) -> Outcome {
    let mut run = RunState::new();
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return Outcome::Stopped;
        }
        let exit = match vcpu.enter_guest(&mut run) {
            Ok(exit) => exit,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        match exit {
            Exit::IoOut { port, size, data } => {
                if port == builtin::PM1A_CNT && size == 2 && data as u16 == builtin::PM1_POWER_OFF {
                    return Outcome::PowerOff;
                }
                let bytes = data.to_le_bytes();
                lock(&shared.pio).write(u64::from(port), &bytes[..usize::from(size)]);
            }
            Exit::IoIn { port, size } => {
                let mut bytes = [0xffu8; 8];
                lock(&shared.pio).read(u64::from(port), &mut bytes[..usize::from(size)]);
                run.complete_io_in(u64::from_le_bytes(bytes));
            }
            Exit::MmioWrite { addr, size, data } => {
                let bytes = data.to_le_bytes();
                lock(&shared.mmio).write(addr.0, &bytes[..usize::from(size)]);
            }
            Exit::MmioRead { addr, size } => {
                let mut bytes = [0xffu8; 8];
                lock(&shared.mmio).read(addr.0, &mut bytes[..usize::from(size)]);
                run.complete_mmio_read(u64::from_le_bytes(bytes));
            }
            Exit::Hlt => return Outcome::Halted,
            Exit::Kicked | Exit::InterruptWindow => {}
            Exit::Shutdown => return Outcome::Failed(format!("vCPU {} triple-faulted{}", vcpu.id(), at_rip(&vcpu))),
            other => return Outcome::Failed(format!("vCPU {}: {other}{}", vcpu.id(), at_rip(&vcpu))),
        }
    }
}

fn at_rip(vcpu: &Vcpu) -> String {
    vcpu.regs().map(|r| format!(" at rip {:#x}", r.rip)).unwrap_or_default()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
