//! Saving and restoring a vhost-user device: its queues stopped for a
//! save with their positions read, and its state in the in-process model's
//! format ([`Snapshot`]), so a copy runs on nkvm's own model or on a
//! backend serving the same disk.

use std::time::{Duration, Instant};

use nkvm_devices::snapshot::{StateReader, StateWriter};
use nkvm_devices::virtio::QueueProgress;
use nkvm_devices::{Snapshot, SnapshotError};
use vhost::VhostBackend;
use vm_memory::{Bytes, GuestAddress};

use super::{VhostUserDevice, VhostUserError, BLOCK, VIRTIO_BLK_F_RO};

/// How long a save waits for a backend to complete the requests it had
/// taken when its queues stopped.
pub const SAVE_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

impl VhostUserDevice {
    /// Waits until the guest's used ring shows every request it made
    /// available completed (the vCPUs are paused: the available rings do
    /// not move), then stops every started queue (`GET_VRING_BASE`: the
    /// next available entry the backend would take). Draining first
    /// matters: a backend built on libvhost-user (qemu-storage-daemon)
    /// closes a queue's call eventfd when it stops it, and a request it
    /// completes after that brings it down. If the requests do not
    /// complete in time nothing is stopped, and the save fails with the
    /// backend serving on. The queues stay stopped until
    /// [`resume_after_save`](nkvm_devices::virtio::VirtioDevice::resume_after_save).
    pub(super) fn stop_queues(&mut self) -> Result<Vec<QueueProgress>, VhostUserError> {
        let Some(saved) = self.saved.clone() else { return Ok(Vec::new()) };
        if self.gone {
            return Err(VhostUserError::Gone { socket: self.socket.clone() });
        }
        let read_u16 = |gpa: u64, ring: u64, index: usize| {
            self.mem
                .read_obj::<u16>(GuestAddress(gpa + 2))
                .map_err(|_| VhostUserError::RingAddress { queue: index, gpa: ring })
        };
        let rings: Vec<_> = saved.rings.iter().filter(|r| self.started.contains(&r.index)).collect();
        let deadline = Instant::now() + SAVE_DRAIN_TIMEOUT;
        for ring in &rings {
            loop {
                let (avail, used) =
                    (read_u16(ring.avail, ring.avail, ring.index)?, read_u16(ring.used, ring.used, ring.index)?);
                if avail == used {
                    break;
                }
                if Instant::now() >= deadline {
                    let pending = avail.wrapping_sub(used);
                    return Err(VhostUserError::InFlight { socket: self.socket.clone(), queue: ring.index, pending });
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        self.stopped_for_save = true;
        let _deadline = self.deadline()?;
        let mut progress = Vec::new();
        self.started.clear();
        for ring in rings {
            let base = self.frontend.get_vring_base(ring.index).map_err(self.request_err("GET_VRING_BASE"))?;
            let next_avail = base as u16;
            // Every request made available was completed above.
            let next_used = read_u16(ring.used, ring.used, ring.index)?;
            if next_used != next_avail {
                let pending = next_avail.wrapping_sub(next_used);
                return Err(VhostUserError::InFlight { socket: self.socket.clone(), queue: ring.index, pending });
            }
            progress.push(QueueProgress { index: ring.index, next_avail, next_used });
        }
        log::debug!("vhost-user {}: queues stopped for a save at {progress:?}", self.socket.display());
        Ok(progress)
    }
}

/// The device's state is the in-process model's of the same kind
/// ([`nkvm_devices::virtio::Block`]: capacity and read-only;
/// [`nkvm_devices::virtio::Console`]: nothing), so a machine saved with its
/// devices in nkvm's device processes restores with them in process, and
/// one whose disk is a foreign backend's restores onto a backend serving
/// the same disk.
impl Snapshot for VhostUserDevice {
    fn snapshot_name(&self) -> &'static str {
        self.kind.name
    }

    fn snapshot_version(&self) -> u16 {
        1
    }

    fn save_body(&self, out: &mut StateWriter) {
        if self.kind.device_type == BLOCK.device_type {
            out.u64(self.capacity());
            out.bool(self.backend_features & VIRTIO_BLK_F_RO != 0);
        }
    }

    /// The backend must serve the same disk: its capacity and read-only
    /// setting are checked as the in-process model checks them. The queue
    /// positions are the transport's; [`VirtioDevice::restored`](nkvm_devices::virtio::VirtioDevice::restored) hands
    /// them to the backend.
    fn load_body(&mut self, input: &mut StateReader<'_>) -> Result<(), SnapshotError> {
        if self.kind.device_type != BLOCK.device_type {
            return Ok(());
        }
        let capacity = input.u64("capacity")?;
        if capacity != self.capacity() {
            return Err(input.mismatch("the disk's capacity in 512-byte sectors", capacity, self.capacity()));
        }
        let read_only = input.bool("read-only")?;
        let here = self.backend_features & VIRTIO_BLK_F_RO != 0;
        if read_only != here {
            return Err(input.mismatch("read-only (1: yes)", read_only.into(), here.into()));
        }
        Ok(())
    }
}
