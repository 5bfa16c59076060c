//! `nkvm`, the VMM: boots a guest on the nkvm API.
//!
//! With no arguments it boots a small guest built into the binary: each vCPU
//! greets over the 16550 serial port, vCPU 0 exercises an MMIO device and
//! powers the machine off.

mod acpi;
mod api;
mod builtin;
mod builtin_machine;
mod bus_process;
mod caps;
mod cli;
mod cmdline;
mod console;
mod control;
mod cpu_features;
mod device;
mod devices;
mod firmware;
mod ioapic;
mod ioapic_process;
mod kernel_image;
mod linux;
mod logger;
mod machine;
mod migrate;
mod multiboot;
mod pci_devices;
mod pic_process;
mod running;
mod sandbox;
mod saved;
mod size;
mod sleep;
mod snapshot;
mod terminal;
mod testdev;
mod virtio_process;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};

/// `nkvm ctl`: one request on the API socket.
fn ctl(args: &cli::CtlArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    use cli::CtlCommand;
    use serde_json::json;
    let (request, wait) = match &args.command {
        CtlCommand::Info => (json!({ "command": "info" }), false),
        CtlCommand::Pause => (json!({ "command": "pause" }), false),
        CtlCommand::Resume => (json!({ "command": "resume" }), false),
        CtlCommand::Cancel => (json!({ "command": "cancel" }), false),
        CtlCommand::Snapshot { dir } => {
            let dir = std::path::absolute(dir)?;
            (json!({ "command": "snapshot", "dir": dir }), false)
        }
        CtlCommand::Migrate { to, downtime_ms, max_rounds, wait } => {
            (json!({ "command": "migrate", "to": to, "downtime_ms": downtime_ms, "max_rounds": max_rounds }), *wait)
        }
    };
    api::ctl(&args.api_socket, request, wait)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logger::init();
    let result = match cli.command.unwrap_or_default() {
        Command::Run(args) => machine::run(&args),
        Command::Caps(args) => caps::print(&args),
        Command::Device(args) => device::run(&args),
        Command::Ctl(args) => ctl(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line naming the cause and its causes, never a backtrace.
            let mut msg = format!("nkvm: {e}");
            let mut source = std::error::Error::source(&*e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{msg}");
            ExitCode::from(2)
        }
    }
}
