//! The `--kernel` machines (a Linux kernel, or a multiboot kernel such as
//! a kvm-unit-tests image), booted fresh or brought back from a snapshot
//! or a migration: [`super::build`] puts the machine together, this
//! runs it behind the API socket and turns how it ended into an exit code.

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Instant;

use nkvm::{ExitStats, Hypervisor, Vm};

use super::build::{self, Built, Parts};
use super::intake::{self, Arriving, RestoreError, Resumed};
use super::{finish, run_vcpus, MachineError, Outcome};
use crate::cli::RunArgs;
use crate::cmdline;
use crate::linux::{self, LinuxBoot};
use crate::multiboot;
use crate::pci_devices::Disk;
use crate::running::Running;
use crate::snapshot::{DiskConfig, MachineConfig, MachineKind};
use crate::terminal::{self, RawMode};

/// Where the guest comes from.
#[derive(Debug)]
pub(super) enum Source {
    /// `--kernel`, booted now.
    Boot,
    /// A snapshot of a `--kernel` machine.
    Saved(Box<Resumed>),
    /// A migration of one: the machine is built while its memory and state
    /// still arrive, then they are put in.
    Arriving(Box<Arriving>),
}

/// What `--kernel` is.
#[derive(Debug)]
pub(super) enum Boot {
    /// A Linux bzImage or ELF vmlinux: entered in long mode with a zero page.
    Linux(LinuxBoot),
    /// A multiboot kernel (kvm-unit-tests): entered in 32-bit protected mode
    /// on the PC that test suite expects (fw_cfg, the test-exit port,
    /// pc-testdev, the PM timer, CMOS).
    Multiboot,
}

/// Builds and runs a `--kernel` machine; returns the process exit code.
pub(super) fn run(hv: &Hypervisor, args: &RunArgs, source: Source) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let (vm, saved, arriving, since, boot) = match source {
        Source::Boot => {
            let boot = boot_of(args)?;
            let config = fresh_config(args, &boot);
            let vm = Vm::new(hv, &config.vm_config()).map_err(MachineError::from)?;
            (vm, None, None, Instant::now(), Some((boot, config)))
        }
        Source::Saved(r) => {
            let r = *r;
            (r.vm, Some((r.state, r.answer)), None, r.since, None)
        }
        Source::Arriving(a) => {
            let a = *a;
            (a.vm, None, Some(a.stream), a.since, None)
        }
    };
    let config = match (&boot, &saved, &arriving) {
        (Some((_, config)), _, _) => config.clone(),
        (None, Some((state, _)), _) => state.config.clone(),
        (None, None, Some(stream)) => stream.config().clone(),
        (None, None, None) => return Err("neither a kernel to boot nor a saved machine".into()),
    };
    let vm = Arc::new(vm);
    let stats = ExitStats::new();
    let parts = Parts {
        hv,
        vm: &vm,
        config: &config,
        args,
        boot: boot.as_ref().map(|(b, _)| b),
        restoring: boot.is_none(),
        stats: &stats,
    };
    let built = build::build(&parts);
    let (state, mut answer) = match (saved, arriving) {
        (Some((state, answer)), _) => (Some(state), answer),
        // A migration's memory and state, into the machine built meanwhile
        // (an error here has been answered already).
        (None, Some(stream)) => match &built {
            Ok(_) => {
                let (state, answer) = stream.finish(&vm).map_err(RestoreError::from)?;
                (Some(state), Some(answer))
            }
            Err(e) => {
                stream.refuse(&intake::chain(e));
                (None, None)
            }
        },
        (None, None) => (None, None),
    };
    let restored = built.and_then(|mut built| {
        if let Some(state) = &state {
            build::restore(&parts, &mut built, state)?;
        }
        Ok(built)
    });
    let built = match restored {
        Ok(built) => built,
        Err(e) => {
            Resumed::refuse(answer.as_mut(), &e);
            return Err(e.into());
        }
    };
    let Built { vcpus, devices, shared, mut processes, input, panic } = built;
    let running = Arc::new(Running::new(vm.clone(), shared.clone(), devices, config));
    if let Some(path) = &args.api_socket {
        let served = crate::api::serve(path, running.clone());
        if let Err(source) = served {
            let e = RestoreError::Api { path: path.display().to_string(), source };
            Resumed::refuse(answer.as_mut(), &e);
            return Err(e.into());
        }
    }
    Resumed::announce(answer, args, since)?;
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
    let outcome = run_vcpus(vcpus, &vm, &shared);
    if let Some(path) = &args.api_socket {
        crate::api::remove(path);
    }
    let mut outcome = outcome?;
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
        return Ok(finish(args, &stats, Outcome::Failed(format!("the guest kernel panicked: {why}")))?);
    }
    Ok(finish(args, &stats, outcome)?)
}

/// What kind of kernel `--kernel` names.
fn boot_of(args: &RunArgs) -> Result<Boot, MachineError> {
    let kernel = args.kernel.as_deref().unwrap_or(Path::new(""));
    Ok(if multiboot::is_multiboot(&kernel_head(kernel)?) {
        Boot::Multiboot
    } else {
        Boot::Linux(LinuxBoot {
            kernel: kernel.to_path_buf(),
            initrd: args.initrd.clone(),
            cmdline: linux_cmdline(args),
        })
    })
}

/// The configuration a fresh boot records, for its snapshots and
/// migrations. A disk is recorded by its absolute path and its size now.
fn fresh_config(args: &RunArgs, boot: &Boot) -> MachineConfig {
    let kind = match boot {
        Boot::Multiboot => MachineKind::Multiboot,
        Boot::Linux(_) => {
            let disk = match &args.disk {
                Some(Disk::Image(path)) => Some(DiskConfig {
                    path: std::path::absolute(path).unwrap_or_else(|_| path.clone()),
                    // An image that cannot be read fails the PCI setup, with its own error.
                    size: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
                    read_only: args.disk_readonly,
                }),
                Some(Disk::VhostUser(_)) | None => None,
            };
            let vhost_user = match &args.disk {
                Some(Disk::VhostUser(socket)) => Some(std::path::absolute(socket).unwrap_or_else(|_| socket.clone())),
                _ => None,
            };
            MachineKind::Linux { disk, vhost_user }
        }
    };
    MachineConfig { cpus: args.cpus, memory: args.memory, kind, hyperv: args.hyperv }
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
