//! virtio 1.x devices behind the modern virtio-pci transport.
//!
//! A device model implements [`VirtioDevice`]: its type, features,
//! configuration bytes, and what to do with the buffers the driver makes
//! available on a queue. [`VirtioPci`] puts it on PCI: the header
//! (vendor 0x1af4, device 0x1040 + type, revision 1), the virtio
//! capabilities (common, notify, ISR, device configuration) in one memory
//! BAR, MSI-X with its table and PBA in the same BAR, feature negotiation
//! and the device-status state machine. Queues are `virtio-queue` split
//! virtqueues over guest memory reached through `vm-memory`, so every guest
//! address is bounds-checked against guest RAM.
//!
//! | file | what |
//! |---|---|
//! | [`pci`] | the virtio-pci transport ([`VirtioPci`]) |
//! | [`common`] | the common configuration structure and device status |
//! | [`block`] | virtio-blk on a raw image file |
//! | [`console`] | virtio-console, one port, output to a writer |
//!
//! A [`VirtioPci`] over a model that is a [`Snapshot`](crate::Snapshot)
//! (both [`Block`] and [`Console`] are) is one too: one blob per PCI
//! function, holding its configuration space, MSI-X state, negotiation,
//! every queue's position and the model's own blob (`pci/snapshot.rs`).
//! [`VirtioPci::drain`] and [`VirtioPci::resume`] are what a VMM calls
//! around it: serve what is available before saving, serve and interrupt
//! once after restoring.
//!
//! A driver that hands the device garbage (descriptors outside guest
//! memory, a chain with no status byte, an available index running past the
//! queue) gets a logged error and the device sets `DEVICE_NEEDS_RESET`; the
//! VMM never panics and never writes outside guest RAM.

pub mod block;
pub mod common;
pub mod console;
pub mod pci;

pub use block::{Block, BlockError};
pub use console::Console;
pub use pci::{VirtioPci, VirtioPciError};

use virtio_queue::Queue;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::GuestMemoryMmap;

/// Guest memory as virtio devices see it. Every write made through it
/// (data buffers, used-ring entries written by `virtio-queue`) sets a bit
/// per page in its region's [`AtomicBitmap`], one atomic OR per write, so a
/// VMM can fold those pages into its dirty log; the bits are reset only by
/// whoever drains them (`AtomicBitmap::get_and_reset`).
pub type GuestRam = GuestMemoryMmap<AtomicBitmap>;

/// Feature bit: virtio 1.x (modern) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Feature bit: indirect descriptor tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;

/// Why a device stopped serving a queue. The transport logs it and sets
/// `DEVICE_NEEDS_RESET`: the driver must reset the device.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// The queue's rings could not be read or written (bad addresses, an
    /// available index past the queue size, ...).
    #[error("queue {queue}: {source}")]
    Queue {
        /// Queue index.
        queue: usize,
        /// What virtio-queue reported.
        #[source]
        source: virtio_queue::Error,
    },
    /// A descriptor chain the device cannot even answer (no writable status
    /// byte, or one outside guest memory).
    #[error("queue {queue}: descriptor chain at head {head}: {reason}")]
    BadChain {
        /// Queue index.
        queue: usize,
        /// Index of the chain's first descriptor.
        head: u16,
        /// What is wrong with it.
        reason: String,
    },
    /// The device's backend (another process) failed or went away.
    #[error("the backend failed")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// What the driver set up by the time it set `DRIVER_OK`.
#[derive(Debug, Clone, Copy)]
pub struct Activation<'a> {
    /// The features the driver accepted.
    pub features: u64,
    /// The queues, enabled or not, with their sizes and ring addresses.
    pub queues: &'a [Queue],
    /// The MSI-X vector of each queue (`common::NO_VECTOR`: none).
    pub vectors: &'a [u16],
}

/// A virtio device model, independent of its transport.
pub trait VirtioDevice: Send {
    /// The virtio device type (`VIRTIO_ID_BLOCK`, `VIRTIO_ID_CONSOLE`, ...).
    fn device_type(&self) -> u16;
    /// The PCI class code to present (e.g. 0x018000 for a block device).
    fn pci_class(&self) -> u32;
    /// The maximum size of each queue; the slice's length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Device feature bits; the transport adds `VIRTIO_F_VERSION_1`.
    fn features(&self) -> u64;
    /// The driver reads the device-specific configuration at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver writes the device-specific configuration at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set `DRIVER_OK`: the features it accepted and the queues
    /// as it set them up. A device whose data path lives elsewhere (a
    /// vhost-user backend) hands the queues over here; an error marks the
    /// device as needing a reset.
    fn activate(&mut self, activation: &Activation<'_>) -> Result<(), VirtioError>;
    /// Serves the buffers available on queue `index`; returns whether any
    /// used buffer was added (then the driver is interrupted if it wants).
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestRam) -> Result<bool, VirtioError>;
    /// Back to the state before the driver touched it (status written 0).
    fn reset(&mut self);
    /// The vCPUs are paused for a save. A device whose queues are served
    /// elsewhere (a vhost-user backend) stops them here, waits until every
    /// request it took is completed, and reports how far each queue got;
    /// they stay stopped until [`resume_after_save`](Self::resume_after_save).
    /// A device whose queues are the transport's (the default) has nothing
    /// to report: the transport's own positions are the state.
    ///
    /// # Errors
    ///
    /// [`VirtioError::Backend`] if the queues cannot be stopped or drained:
    /// the save fails and the machine runs on.
    fn stop_for_save(&mut self, _mem: &GuestRam) -> Result<Vec<QueueProgress>, VirtioError> {
        Ok(Vec::new())
    }
    /// The machine runs on after a save: restarts what
    /// [`stop_for_save`](Self::stop_for_save) stopped. Nothing by default.
    fn resume_after_save(&mut self) {}
    /// The transport's state was restored with the driver past `DRIVER_OK`:
    /// `activation` is what the driver had set up, each queue at the
    /// position it was saved at. A device whose data path lives elsewhere
    /// hands the queues over from there; an in-process model (the default)
    /// has nothing to do. An error marks the device as needing a reset.
    fn restored(&mut self, _activation: &Activation<'_>) -> Result<(), VirtioError> {
        Ok(())
    }
}

/// How far a device got on one queue, as [`VirtioDevice::stop_for_save`]
/// reports it: virtio-queue's `next_avail` and `next_used`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueProgress {
    /// The queue's index.
    pub index: usize,
    /// The next available-ring entry the device would take.
    pub next_avail: u16,
    /// The used ring's index: entries the device has completed.
    pub next_used: u16,
}

#[cfg(test)]
pub(crate) mod testing;
