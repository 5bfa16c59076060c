//! The common configuration's part of a virtio-pci device's state: the
//! negotiation (feature selects, the driver's features, status, config
//! generation), the MSI-X vector numbers, and per queue what the driver set
//! up (size, ready, ring addresses) and how far the device got
//! (virtio-queue's `next_avail`, `next_used`, event-idx).
//!
//! What the device offers (its features, its queues' maximum sizes, its
//! vector count) is not taken from the blob: it comes from building the
//! same device, and a blob that disagrees is another device's state.

use virtio_queue::{Queue, QueueState, QueueT};

use super::{CommonConfig, NO_VECTOR, STATUS_FEATURES_OK};
use crate::snapshot::{SnapshotError, StateReader, StateWriter};

impl CommonConfig {
    /// Writes the state into a transport's body.
    pub(crate) fn save(&self, out: &mut StateWriter) {
        out.u64(self.device_features);
        out.u32(self.device_feature_select);
        out.u32(self.driver_feature_select);
        out.u64(self.driver_features);
        out.u8(self.status);
        out.u8(self.config_generation);
        out.u16(self.queue_select);
        out.u16(self.config_vector);
        out.u16(self.queues.len() as u16);
        for (q, &vector) in self.queues.iter().zip(&self.queue_vectors) {
            let s = q.state();
            out.u16(s.max_size);
            out.u16(s.size);
            out.bool(s.ready);
            out.u64(s.desc_table);
            out.u64(s.avail_ring);
            out.u64(s.used_ring);
            out.u16(s.next_avail);
            out.u16(s.next_used);
            out.bool(s.event_idx_enabled);
            out.u16(vector);
        }
    }

    /// Reads what [`save`](Self::save) wrote, checked against this device,
    /// into a new value; `self` is unchanged.
    pub(crate) fn load(&self, input: &mut StateReader<'_>) -> Result<Self, SnapshotError> {
        let device_features = input.u64("device features")?;
        if device_features != self.device_features {
            return Err(input.mismatch("the device features offered", device_features, self.device_features));
        }
        let device_feature_select = input.u32("device feature select")?;
        let driver_feature_select = input.u32("driver feature select")?;
        let at = input.offset();
        let driver_features = input.u64("driver features")?;
        let status = input.u8("device status")?;
        // Before FEATURES_OK the driver may have written anything there (the
        // check is FEATURES_OK's); after it, only what was offered.
        if status & STATUS_FEATURES_OK != 0 && driver_features & !device_features != 0 {
            return Err(input.invalid(
                "driver features",
                driver_features,
                at,
                "a subset of the device's features once FEATURES_OK is set",
            ));
        }
        let config_generation = input.u8("config generation")?;
        let queue_select = input.u16("queue select")?;
        let config_vector = self.vector(input, "config vector")?;
        let count = input.u16("queue count")?;
        if usize::from(count) != self.queues.len() {
            return Err(input.mismatch("the number of queues", count.into(), self.queues.len() as u64));
        }
        let mut queues = Vec::with_capacity(self.queues.len());
        let mut queue_vectors = Vec::with_capacity(self.queues.len());
        for mine in &self.queues {
            queues.push(load_queue(input, mine)?);
            queue_vectors.push(self.vector(input, "queue vector")?);
        }
        Ok(Self {
            device_features,
            device_feature_select,
            driver_feature_select,
            driver_features,
            status,
            config_generation,
            queue_select,
            config_vector,
            queues,
            queue_vectors,
            msix_vectors: self.msix_vectors,
            driver_errors: Default::default(),
        })
    }

    /// An MSI-X vector number: one the table has, or [`NO_VECTOR`].
    fn vector(&self, input: &mut StateReader<'_>, field: &'static str) -> Result<u16, SnapshotError> {
        let at = input.offset();
        let v = input.u16(field)?;
        if v != NO_VECTOR && v >= self.msix_vectors {
            return Err(input.invalid(field, v.into(), at, "a vector of the MSI-X table or 0xffff"));
        }
        Ok(v)
    }
}

/// One queue's state, checked as virtio-queue checks it (size a power of
/// two within the maximum, rings aligned) and against `mine`'s maximum.
fn load_queue(input: &mut StateReader<'_>, mine: &Queue) -> Result<Queue, SnapshotError> {
    let max_size = input.u16("queue maximum size")?;
    if max_size != mine.max_size() {
        return Err(input.mismatch("a queue's maximum size", max_size.into(), mine.max_size().into()));
    }
    let at = input.offset();
    let state = QueueState {
        max_size,
        size: input.u16("queue size")?,
        ready: input.bool("queue ready")?,
        desc_table: input.u64("descriptor table address")?,
        avail_ring: input.u64("available ring address")?,
        used_ring: input.u64("used ring address")?,
        next_avail: input.u16("next available index")?,
        next_used: input.u16("next used index")?,
        event_idx_enabled: input.bool("event idx")?,
    };
    Queue::try_from(state).map_err(|e| {
        log::debug!("virtio: saved queue state refused: {e}");
        input.invalid(
            "queue size",
            state.size.into(),
            at,
            "a queue virtio-queue accepts: a power-of-two size within the maximum, rings aligned (16, 2, 4)",
        )
    })
}
