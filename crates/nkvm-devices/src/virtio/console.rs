//! virtio-console with one port (virtio 1.2 section 5.3), no multiport
//! control queue: queue 0 receives (input for the guest, not fed yet),
//! queue 1 transmits (the guest's output, written to a [`Write`]).

use std::fmt;
use std::io::{Read, Write};

use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader};

use super::{Activation, GuestRam, VirtioDevice, VirtioError};
use crate::bad_access::BadAccessLog;
use crate::snapshot::{Snapshot, SnapshotError, StateReader, StateWriter};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 64;
/// Index of port 0's receive queue.
pub const RECEIVE_QUEUE: usize = 0;
/// Index of port 0's transmit queue.
pub const TRANSMIT_QUEUE: usize = 1;
/// PCI class: simple communication controller, other.
const CLASS_COMMUNICATION_OTHER: u32 = 0x07_80_00;

/// A virtio console writing the guest's output to `W`.
pub struct Console<W: Write + Send> {
    out: W,
    /// Buffers the guest got wrong: the first at warn level, then debug.
    guest_errors: BadAccessLog,
}

impl<W: Write + Send> fmt::Debug for Console<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Console").finish_non_exhaustive()
    }
}

impl<W: Write + Send> Console<W> {
    /// A console whose output goes to `out`.
    pub fn new(out: W) -> Self {
        Self { out, guest_errors: BadAccessLog::default() }
    }

    /// The output sink.
    pub fn output(&self) -> &W {
        &self.out
    }

    fn transmit(&mut self, index: usize, queue: &mut Queue, mem: &GuestRam) -> Result<bool, VirtioError> {
        let mut used = false;
        let mut buf = [0u8; 4096];
        loop {
            let chain = queue.iter(mem).map_err(|source| VirtioError::Queue { queue: index, source })?.next();
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            match Reader::new(mem, chain) {
                // Copied a page at a time: a huge buffer costs no huge allocation.
                Ok(mut reader) => loop {
                    match reader.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if let Err(e) = self.out.write_all(&buf[..n]) {
                                log::debug!("virtio-console: output lost: {e}");
                            }
                        }
                        Err(e) => {
                            self.guest_errors
                                .log("virtio-console", format_args!("output buffer at head {head} unreadable: {e}"));
                            break;
                        }
                    }
                },
                Err(e) => self
                    .guest_errors
                    .log("virtio-console", format_args!("output buffer at head {head} not in guest memory: {e}")),
            }
            if let Err(e) = self.out.flush() {
                log::debug!("virtio-console: output lost: {e}");
            }
            queue.add_used(mem, head, 0).map_err(|source| VirtioError::Queue { queue: index, source })?;
            used = true;
        }
        Ok(used)
    }
}

impl<W: Write + Send> VirtioDevice for Console<W> {
    fn device_type(&self) -> u16 {
        VIRTIO_ID_CONSOLE as u16
    }

    fn pci_class(&self) -> u32 {
        CLASS_COMMUNICATION_OTHER
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        0
    }

    /// `struct virtio_console_config`: cols, rows, max_nr_ports, emerg_wr — all 0.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!("virtio-console: ignored config write of {} bytes at {offset:#x}", data.len());
    }

    fn activate(&mut self, _activation: &Activation<'_>) -> Result<(), VirtioError> {
        Ok(())
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestRam) -> Result<bool, VirtioError> {
        match index {
            TRANSMIT_QUEUE => self.transmit(index, queue, mem),
            // Receive buffers wait for input, which is not wired yet.
            _ => Ok(false),
        }
    }

    fn reset(&mut self) {
        let _ = self.out.flush();
    }
}

/// The console keeps nothing between requests (its output is written as it
/// comes, its receive queue is not fed): its state is an empty body, which
/// still names the model, so a console's blob restores only into a console.
impl<W: Write + Send> Snapshot for Console<W> {
    fn snapshot_name(&self) -> &'static str {
        "virtio-console"
    }

    fn snapshot_version(&self) -> u16 {
        1
    }

    fn save_body(&self, _out: &mut StateWriter) {}

    fn load_body(&mut self, _input: &mut StateReader<'_>) -> Result<(), SnapshotError> {
        Ok(())
    }
}
