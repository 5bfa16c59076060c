//! # nkvm — the next-generation KVM API
//!
//! The API Avi Kivity sketched in the 2012 "\[RFC\] Next gen kvm api" thread,
//! on today's stock `/dev/kvm`: a VM whose whole memory map is a value, a
//! vCPU entered through `enter_guest(&mut RunState)` whose every exit is a
//! plain, traceable [`Exit`], and (in later modules) dirty logging by range
//! and work, I/O regions served over sockets, and an APIC bus.
//!
//! ## Boot a guest in a dozen lines
//!
//! ```no_run
//! use nkvm::{Exit, GuestAddress, Hypervisor, RunState, Vm, VmConfig};
//!
//! let hv = Hypervisor::open()?;
//! let vm = Vm::new(&hv, &VmConfig::default())?;
//! // Real mode: mov al, 'A'; out 0x10, al; hlt
//! vm.write_memory(GuestAddress(0x1000), &[0xb0, b'A', 0xe6, 0x10, 0xf4])?;
//! let mut vcpu = vm.create_vcpu(0)?;
//! vcpu.set_real_mode(0, 0x1000)?;
//! let mut run = RunState::new();
//! loop {
//!     match vcpu.enter_guest(&mut run)? {
//!         Exit::IoOut { port: 0x10, data, .. } => println!("guest says {}", data as u8 as char),
//!         Exit::Hlt => break,
//!         other => panic!("unexpected {other}"),
//!     }
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Map
//!
//! | module | holds |
//! |---|---|
//! | [`hypervisor`] | `/dev/kvm`, the capability probe |
//! | [`hyperv`] | Hyper-V enlightenments: CPUID leaves, SynIC |
//! | [`vm`] | a VM, its memory map, vCPU creation |
//! | [`memory`] | backing objects, regions, the memory map value |
//! | [`ram_view`] | guest RAM as a vm-memory `GuestMemoryMmap`, for in-process devices |
//! | [`vcpu`], [`run_state`], [`exit`] | `enter_guest`, the caller-owned state, the exits |
//! | [`kick`] | forcing a vCPU out from another thread |
//! | [`trace`] | exit tracing and statistics |
//! | [`mode`] | real-mode and long-mode start-up |
//! | [`state`] | saved vCPU and VM state as values, and their byte format |
//!
//! All `unsafe` code lives in one private module (`sys`), each block with a
//! `SAFETY:` note.

mod address;
pub mod dirty;
pub mod emulate;
mod eoi_watch;
pub mod exit;
#[cfg(feature = "exit-timing")]
pub mod exit_timing;
pub mod gather;
pub mod hyperv;
pub mod hypervisor;
pub mod io;
pub mod irq;
pub mod kick;
pub mod memory;
pub mod mode;
mod pause;
pub mod ram_view;
pub mod run_state;
pub mod state;
mod sys;
pub mod trace;
pub mod vcpu;
pub mod vm;

pub use address::GuestAddress;
pub use dirty::{DirtyLogMode, DirtyLogStart, DirtyPages, DirtySource};
pub use exit::{Exit, InternalError, SystemEvent};
pub use hypervisor::{Capabilities, Hypervisor, HypervisorError};
pub use io::{IoHandler, IoRange, IoRegionError, IoSpace, RegionId};
pub use irq::{ApicBus, ApicBusOptions, ApicBusStats, EoiHandler, Lapic, Lint, MsiMessage, VcpuConfig};
pub use kick::Kicker;
pub use memory::{Backing, MemoryError, MemoryMap, Region, PAGE_SIZE};
pub use mode::{Idt, LongMode};
pub use run_state::RunState;
pub use state::{FormatError, StateError, VcpuState, VmState};
pub use trace::{ExitRecord, ExitStats, LineTracer, Tracer};
pub use vcpu::{Fpu, Regs, Sregs, Vcpu, VcpuError, VcpuEvents};
pub use vm::{Vm, VmConfig, VmError};

/// CPUID entries (`struct kvm_cpuid2` with its entries).
pub type Cpuid = kvm_bindings::CpuId;
