//! The command line.

use clap::{Args, Parser, Subcommand};

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
    /// Boot a VM (with no options: the small guest built into nkvm).
    Run(RunArgs),
    /// Print what this host's KVM can do.
    Caps(CapsArgs),
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
}

impl Default for RunArgs {
    fn default() -> Self {
        Self { cpus: 2, memory: 64 << 20, trace: false, stats: false }
    }
}

/// `nkvm caps`.
#[derive(Debug, Args, Clone, Default)]
pub struct CapsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}
