//! The vCPU threads: each runs its vCPU, serves the exits no device
//! claims (the ACPI fixed ports, unclaimed addresses, emulation failures),
//! parks for a pause (saving its state) or for S3, and reports how it ended.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::{mpsc, Arc};
use std::thread;

use nkvm::{Exit, RunState, Vcpu, Vm};

use super::{MachineError, Outcome, Shared};
use crate::acpi::{self, PlatformRequest};
use crate::control::Stop;
use crate::sleep::{Parked, Sleep};

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
            // Out of the guest; the state is read once every vCPU is.
            match shared.control.stop_here(vcpu.id()) {
                Stop::Save => {}
                Stop::Resume => continue,
                Stop::Stopping => return Outcome::Stopped,
            }
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
