//! `nkvm`, the VMM: boots a guest on the nkvm API.
//!
//! With no arguments it boots a small guest built into the binary: each vCPU
//! greets over the 16550 serial port, vCPU 0 exercises an MMIO device and
//! powers the machine off.

mod acpi;
mod builtin;
mod bus_process;
mod caps;
mod cli;
mod cmdline;
mod console;
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
mod multiboot;
mod pci_devices;
mod pic_process;
mod sandbox;
mod size;
mod sleep;
mod terminal;
mod testdev;
mod virtio_process;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    logger::init();
    let result = match cli.command.unwrap_or_default() {
        Command::Run(args) => machine::run(&args),
        Command::Caps(args) => caps::print(&args),
        Command::Device(args) => device::run(&args),
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
