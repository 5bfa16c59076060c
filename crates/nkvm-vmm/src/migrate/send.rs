//! The source's side: connect, copy all memory while the guest runs, then
//! rounds of what the dirty log collected until the rest fits the downtime
//! target (or the round limit); pause, send the rest and every state, and
//! wait for the destination's answer. On any failure the pages collected
//! and not confirmed go back into the dirty log and the guest runs on.

use std::io::{BufWriter, Write};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nkvm::{DirtyPages, GuestAddress, MemoryMap, Vm};

use super::stream::{self, PageBatch, RecordReader, RecordType, PAGE, PAGES_PER_RECORD};
use super::{Conn, Endpoint, MigrateError, MigrationStatus, Phase, Until};
use crate::machine::intake::chain;
use crate::running::Running;

/// How a migration converges.
#[derive(Debug, Clone, Copy)]
pub struct MigrateOptions {
    /// Switch over once the rest is expected to take at most this long
    /// (zero: only after `max_rounds`).
    pub downtime: Duration,
    /// Switch over after this many rounds after the full copy regardless.
    pub max_rounds: u32,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self { downtime: Duration::from_millis(50), max_rounds: 30 }
    }
}

/// Pages collected per `collect_dirty` call.
const COLLECT_BUDGET: usize = 4096;
/// How long the source waits, paused, for the destination's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts migrating `running` to `to` on a thread of its own; progress is
/// in `running.migration`. On success the source machine stops.
pub fn start(running: Arc<Running>, to: Endpoint, options: MigrateOptions) -> Result<(), MigrateError> {
    // A machine with a part nkvm cannot save is refused before anything
    // is sent: the guest never pauses for it.
    running.devices.saveable().map_err(crate::running::RunningError::from)?;
    {
        let mut status = running.migration.lock().unwrap_or_else(|p| p.into_inner());
        if status.active() {
            return Err(MigrateError::Refused("a migration is already in progress".into()));
        }
        // The guest may run there: only an operator who sees it does not
        // resumes it here, and may then migrate again.
        if status.phase == Phase::InDoubt && running.shared.control.is_paused() {
            return Err(MigrateError::Refused(
                "the last migration is in doubt (the destination may be running the guest); if it is not, \
                 `resume` here first"
                    .into(),
            ));
        }
        *running.cancel.lock().unwrap_or_else(|p| p.into_inner()) = crate::running::Cancel::default();
        *status = MigrationStatus {
            phase: Phase::Connecting,
            to: to.to_string(),
            downtime_target_ms: options.downtime.as_millis() as u64,
            ..Default::default()
        };
    }
    let status_of = running.clone();
    let spawned = std::thread::Builder::new().name("migrate".into()).spawn(move || {
        let start = Instant::now();
        let mut sender = Sender { running: &running, bytes: 0, pages: 0, start, collected: Vec::new() };
        let result = sender.migrate(&to, &options);
        let mut status = running.migration.lock().unwrap_or_else(|p| p.into_inner());
        status.total_ms = start.elapsed().as_secs_f64() * 1e3;
        match result {
            Ok(()) => {
                status.phase = Phase::Done;
                eprintln!(
                    "nkvm: migrated to {to} in {:.1} ms ({} rounds, {} pages, {:.1} MB), downtime {:.1} ms \
                     (parking the vCPUs {:.1} ms, {} pages while paused, the destination's answer {:.1} ms); \
                     the dirty log started in {:.2} ms and was armed in {:.1} ms while the guest ran",
                    status.total_ms,
                    status.rounds,
                    status.pages,
                    status.bytes as f64 / 1e6,
                    status.downtime_ms,
                    status.park_ms,
                    status.switchover_pages,
                    status.answer_ms,
                    status.log_start_ms,
                    status.log_arm_ms,
                );
                drop(status);
                running.shared.migrated(&to.to_string());
            }
            Err(e @ MigrateError::InDoubt(_)) => {
                eprintln!("nkvm: migration to {to}: {}", chain(&e));
                status.phase = Phase::InDoubt;
                status.error = Some(chain(&e));
            }
            Err(e) => {
                eprintln!("nkvm: migration to {to} failed, the guest runs on here: {}", chain(&e));
                status.phase = Phase::Failed;
                status.error = Some(chain(&e));
            }
        }
    });
    spawned.map(drop).map_err(|e| {
        // Not left `connecting`, which would refuse every later command.
        let e = MigrateError::link("starting the migration thread", e);
        let mut status = status_of.migration.lock().unwrap_or_else(|p| p.into_inner());
        status.phase = Phase::Failed;
        status.error = Some(chain(&e));
        e
    })
}

/// Cancels the running migration before its switch-over: its connection
/// is shut down, so a send blocked on a slow or stalled destination returns
/// at once; the guest runs on here and no dirty bit is lost, as in any
/// failed round. Refused when no migration runs, or once switch-over has
/// begun (the guest is paused then, and the migration ends by itself
/// within the answer's timeout).
pub fn cancel(running: &Running) -> Result<(), MigrateError> {
    // Under the status lock: the sender sets switch-over under it too, and
    // looks for a cancel right after.
    let status = running.migration.lock().unwrap_or_else(|p| p.into_inner());
    match status.phase {
        Phase::Connecting | Phase::PreCopy => {}
        Phase::SwitchOver => {
            return Err(MigrateError::Refused(
                "the migration is switching over (the guest is paused): it ends by itself".into(),
            ))
        }
        _ => return Err(MigrateError::Refused("no migration is running".into())),
    }
    let mut cancel = running.cancel.lock().unwrap_or_else(|p| p.into_inner());
    cancel.requested = true;
    if let Some(link) = &cancel.link {
        link.shutdown();
    }
    Ok(())
}

struct Sender<'a> {
    running: &'a Running,
    bytes: u64,
    pages: u64,
    start: Instant,
    /// Pages taken from the dirty log and not yet confirmed by the
    /// destination: put back if the migration fails.
    collected: Vec<GuestAddress>,
}

impl Sender<'_> {
    fn vm(&self) -> &Vm {
        &self.running.vm
    }

    fn update(&self, f: impl FnOnce(&mut MigrationStatus)) {
        let mut status = self.running.migration.lock().unwrap_or_else(|p| p.into_inner());
        status.pages = self.pages;
        status.bytes = self.bytes;
        status.mb_per_s = self.bytes as f64 / 1e6 / self.start.elapsed().as_secs_f64().max(1e-6);
        f(&mut status);
    }

    fn cancelled(&self) -> bool {
        self.running.cancel.lock().unwrap_or_else(|p| p.into_inner()).requested
    }

    fn migrate(&mut self, to: &Endpoint, options: &MigrateOptions) -> Result<(), MigrateError> {
        let result = self.migrate_inner(to, options);
        let cancel = std::mem::take(&mut *self.running.cancel.lock().unwrap_or_else(|p| p.into_inner()));
        match result {
            // The link error a cancel causes is the cancel.
            Err(e) if cancel.requested && !matches!(e, MigrateError::InDoubt(_)) => {
                log::debug!("migration cancelled: {e}");
                Err(MigrateError::Cancelled)
            }
            other => other,
        }
    }

    fn migrate_inner(&mut self, to: &Endpoint, options: &MigrateOptions) -> Result<(), MigrateError> {
        let conn = to.connect()?;
        conn.set_write_timeout(Some(super::SEND_TIMEOUT)).map_err(|e| MigrateError::link("configuring", e))?;
        {
            let mut cancel = self.running.cancel.lock().unwrap_or_else(|p| p.into_inner());
            if cancel.requested {
                return Err(MigrateError::Cancelled);
            }
            cancel.link = Some(conn.try_clone().map_err(|e| MigrateError::link("configuring", e))?);
        }
        let mut out = BufWriter::with_capacity(1 << 20, conn);
        let result = self.precopy_and_switch(&mut out, options);
        if result.is_err() {
            self.put_back();
        }
        // What is still buffered is never sent once the migration is over
        // (a drop would flush it, blocking on a stalled link again).
        let (mut conn, _unsent) = out.into_parts();
        match result {
            // A destination that refuses the guest mid-stream says why in
            // a FAILED record before it closes: that, not the broken pipe
            // it causes here, is the cause to report.
            Err(e @ MigrateError::Link { .. }) => Err(early_refusal(&mut conn).unwrap_or(e)),
            other => other,
        }
    }

    /// No dirty bit is lost: the pages taken and not delivered go back.
    fn put_back(&mut self) {
        for &gpa in &self.collected {
            self.vm().mark_dirty(gpa, PAGE as u64);
        }
        self.collected.clear();
    }

    fn precopy_and_switch(&mut self, out: &mut BufWriter<Conn>, options: &MigrateOptions) -> Result<(), MigrateError> {
        let link = |e| MigrateError::link("sending", e);
        out.write_all(&stream::header()).map_err(link)?;
        let names = self.device_names();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let config = self.running.config.to_json(&names);
        stream::write_record(out, RecordType::Config, config.as_bytes()).map_err(link)?;
        let started = Instant::now();
        start_dirty_log(self.vm())?;
        let log_start = started.elapsed().as_secs_f64() * 1e3;
        // The log now sees every write: forget what it held before. A log
        // started all-dirty (MIGRATION_LOG_START) holds every page, and this
        // drain arms KVM's write protection in budgets of pages, so the
        // start itself costs the same at any guest size.
        self.vm().sync_dirty_log().map_err(MigrateError::DirtyLog)?;
        let mut dirty = DirtyPages::default();
        self.collect(&mut dirty, |_, _| Ok(()))?;
        self.collected.clear();
        let log_arm = started.elapsed().as_secs_f64() * 1e3 - log_start;
        self.update(|s| {
            s.log_start_ms = log_start;
            s.log_arm_ms = log_arm;
        });
        self.update(|s| s.phase = Phase::PreCopy);
        let copy_start = Instant::now();
        self.full_copy(out)?;
        log::info!(
            "migration round 1 (full copy): {} pages in {:.1} ms",
            self.pages,
            copy_start.elapsed().as_secs_f64() * 1e3
        );
        self.update(|s| s.rounds = 1);
        let mut round = 1;
        loop {
            let round_start = Instant::now();
            let before = self.bytes;
            let sent = self.send_dirty(out, &mut dirty)?;
            out.flush().map_err(link)?;
            // The round is on the wire: its pages are the destination's.
            self.collected.clear();
            let elapsed = round_start.elapsed().as_secs_f64().max(1e-6);
            let rate =
                ((self.bytes - before) as f64 / elapsed).max(self.bytes as f64 / self.start.elapsed().as_secs_f64());
            let expected = (sent * (PAGE as u64 + 8)) as f64 / rate.max(1.0);
            round += 1;
            log::info!(
                "migration round {round}: {sent} pages in {:.1} ms, {:.0} MB/s, rest expected in {:.1} ms",
                elapsed * 1e3,
                rate / 1e6,
                expected * 1e3
            );
            self.update(|s| {
                s.rounds = round;
                s.last_round_pages = sent;
                s.expected_downtime_ms = expected * 1e3;
            });
            // A zero target never converges: only the round limit ends pre-copy.
            let converged = !options.downtime.is_zero() && expected <= options.downtime.as_secs_f64();
            if converged || round > options.max_rounds {
                break;
            }
            if sent == 0 {
                // Nothing dirty yet (only with a zero target): give the
                // guest time to run rather than spinning on an empty log.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        self.switch_over(out, &mut dirty)
    }

    fn device_names(&self) -> Vec<String> {
        self.running.devices.names()
    }

    /// Round 1: every non-zero page (the destination's memory starts
    /// zero); only the parts of RAM that hold data are looked at.
    fn full_copy(&mut self, out: &mut BufWriter<Conn>) -> Result<(), MigrateError> {
        let map = self.vm().memory();
        let mut batch = PageBatch::default();
        for region in map.regions() {
            for (start, end) in region.backing.data_ranges() {
                // The part of [start, end) of the backing this region maps.
                let lo = start.max(region.offset);
                let hi = end.min(region.offset + region.len);
                let mut offset = lo;
                while offset < hi {
                    let gpa = GuestAddress(region.gpa.0 + (offset - region.offset));
                    if batch.push_data(&map, gpa.0).map_err(MigrateError::Memory)? {
                        self.pages += 1;
                        if batch.len() == PAGES_PER_RECORD {
                            self.bytes += send_batch(&mut batch, &map, out)?;
                            // Progress shows as the copy goes, not per range.
                            self.update(|_| {});
                        }
                    }
                    offset += PAGE as u64;
                }
            }
        }
        self.bytes += send_batch(&mut batch, &map, out)?;
        Ok(())
    }

    /// Takes every dirty page from the log and hands it to `each` (with
    /// its data); the pages stay in `collected` until confirmed.
    fn collect(
        &mut self,
        dirty: &mut DirtyPages,
        mut each: impl FnMut(&mut Self, &[GuestAddress]) -> Result<(), MigrateError>,
    ) -> Result<u64, MigrateError> {
        self.vm().sync_dirty_log().map_err(MigrateError::DirtyLog)?;
        let mut cursor = Some(GuestAddress(0));
        let mut count = 0;
        while let Some(start) = cursor {
            self.vm()
                .collect_dirty_into(start, u64::MAX - start.0, COLLECT_BUDGET, dirty)
                .map_err(MigrateError::DirtyLog)?;
            self.collected.extend_from_slice(&dirty.pages);
            count += dirty.pages.len() as u64;
            each(self, &dirty.pages)?;
            cursor = dirty.next;
        }
        Ok(count)
    }

    /// One round: every page the log collected, with its current data.
    fn send_dirty(&mut self, out: &mut BufWriter<Conn>, dirty: &mut DirtyPages) -> Result<u64, MigrateError> {
        let map: Arc<MemoryMap> = self.vm().memory();
        let mut batch = PageBatch::default();
        let count = self.collect(dirty, |me, pages| {
            for &gpa in pages {
                batch.push(&map, gpa.0).map_err(MigrateError::Memory)?;
                me.pages += 1;
                if batch.len() == PAGES_PER_RECORD {
                    me.bytes += send_batch(&mut batch, &map, out)?;
                    me.update(|_| {});
                }
            }
            Ok(())
        })?;
        self.bytes += send_batch(&mut batch, &map, out)?;
        Ok(count)
    }

    /// Pauses the guest, sends the rest and every state, waits for the
    /// answer; resumes the guest here unless the destination took it.
    fn switch_over(&mut self, out: &mut BufWriter<Conn>, dirty: &mut DirtyPages) -> Result<(), MigrateError> {
        self.update(|s| s.phase = Phase::SwitchOver);
        // A cancel that came before switch-over began still counts.
        if self.cancelled() {
            return Err(MigrateError::Cancelled);
        }
        // A guest the operator paused stays paused if the migration fails.
        let was_paused = self.running.shared.control.is_paused();
        let paused = Instant::now();
        let vcpus = self.running.pause()?;
        let park = paused.elapsed().as_secs_f64() * 1e3;
        self.update(|s| s.park_ms = park);
        let result = self.send_rest(out, dirty, &vcpus);
        let downtime = paused.elapsed().as_secs_f64() * 1e3;
        self.update(|s| s.downtime_ms = downtime);
        match &result {
            // Told to run the guest: it may run there, so never here too.
            Err(MigrateError::InDoubt(_)) => {}
            Err(_) if was_paused => {}
            Err(_) => self.running.resume(),
            Ok(()) => {}
        }
        result
    }

    fn send_rest(
        &mut self,
        out: &mut BufWriter<Conn>,
        dirty: &mut DirtyPages,
        vcpus: &[nkvm::state::VcpuState],
    ) -> Result<(), MigrateError> {
        let link = |e| MigrateError::link("sending the final state", e);
        // The devices' state first: saving a virtio device serves what its
        // driver made available, which writes guest memory (and the dirty
        // log) that the last pages must then carry.
        let state = self.running.machine_state(vcpus)?;
        let last = self.send_dirty(out, dirty)?;
        self.update(|s| s.switchover_pages = last);
        stream::write_record(out, RecordType::VmState, &state.vm).map_err(link)?;
        for blob in &state.vcpus {
            stream::write_record(out, RecordType::VcpuState, blob).map_err(link)?;
        }
        for (name, blob) in &state.devices {
            let mut payload = vec![name.len() as u8];
            payload.extend_from_slice(name.as_bytes());
            payload.extend_from_slice(blob);
            stream::write_record(out, RecordType::DeviceState, &payload).map_err(link)?;
        }
        stream::write_record(out, RecordType::End, &[]).map_err(link)?;
        out.flush().map_err(link)?;
        let ended = Instant::now();
        let conn = out.get_mut();
        // One deadline for each answer, not for each read of it: a peer
        // that trickles bytes does not keep the guest paused past it.
        let (kind, payload, at) = RecordReader::new(&mut Until::new(conn, ANSWER_TIMEOUT, "the destination's answer"))
            .next()
            .map(|(k, p, a)| (k, p.to_vec(), a))?;
        match kind {
            RecordType::Ready => {}
            RecordType::Failed => return Err(MigrateError::Refused(String::from_utf8_lossy(&payload).into_owned())),
            other => {
                return Err(MigrateError::Stream { offset: at, why: format!("expected the answer, got {other:?}") })
            }
        }
        // The commit: a GO the link refused never reached the destination,
        // which then never runs the guest (resumed here). A GO written may
        // have reached it: from here on the guest is never resumed here by
        // itself, whatever happens to the link.
        stream::write_record(conn, RecordType::Go, &[])
            .map_err(|e| MigrateError::link("telling the destination to run the guest", e))?;
        let answer = ended.elapsed().as_secs_f64() * 1e3;
        self.update(|s| s.answer_ms = answer);
        match RecordReader::new(&mut Until::new(conn, ANSWER_TIMEOUT, "the destination's RUNNING")).next() {
            Ok((RecordType::Running, _, _)) => Ok(()),
            Ok((other, _, _)) => Err(MigrateError::InDoubt(format!("it answered {other:?}"))),
            Err(e) => Err(MigrateError::InDoubt(chain(&e))),
        }
    }
}

/// How long a source whose link broke looks for the destination's reason.
const REFUSAL_WAIT: Duration = Duration::from_secs(1);

/// The destination's FAILED record, if one is waiting on `conn` (it is
/// read before the connection's reset: the kernel hands over what arrived
/// before it).
fn early_refusal(conn: &mut Conn) -> Option<MigrateError> {
    conn.set_read_timeout(Some(REFUSAL_WAIT)).ok()?;
    match RecordReader::new(conn).next() {
        Ok((RecordType::Failed, why, _)) => Some(MigrateError::Refused(String::from_utf8_lossy(why).into_owned())),
        _ => None,
    }
}

/// Sends `batch` as one record, its pages straight from guest memory,
/// after whatever `out` holds; returns the bytes sent.
fn send_batch(batch: &mut PageBatch, map: &MemoryMap, out: &mut BufWriter<Conn>) -> Result<u64, MigrateError> {
    if batch.len() == 0 {
        return Ok(0);
    }
    out.flush().map_err(|e| MigrateError::link("sending memory", e))?;
    batch.flush(map, out.get_ref().as_fd()).map_err(|e| match e {
        nkvm::MemoryError::Gather { source } => MigrateError::link("sending memory", source),
        other => MigrateError::Memory(other),
    })
}

/// Turns dirty logging on for every RAM region (one map change; the vCPUs
/// pause only for the slot flag updates). It stays on after the
/// migration: a failed one leaves its collected pages in the log.
fn start_dirty_log(vm: &Vm) -> Result<(), MigrateError> {
    let map = vm.memory();
    if map.regions().iter().all(|r| r.dirty_log) {
        return Ok(());
    }
    let regions = map.regions().iter().map(|r| r.clone().dirty_logged()).collect();
    let map = MemoryMap::new(regions).map_err(MigrateError::Memory)?;
    vm.set_memory_map(map).map_err(MigrateError::DirtyLog)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin_machine::attach_devices;
    use crate::machine::Shared;
    use crate::snapshot::MachineConfig;

    #[test]
    fn a_failed_round_puts_its_pages_back_into_the_dirty_log() {
        let hv = nkvm::Hypervisor::open().unwrap();
        let vm = Arc::new(Vm::new(&hv, &nkvm::VmConfig { vcpus: 1, memory: 4 << 20, ..Default::default() }).unwrap());
        let devices = attach_devices(&vm).unwrap();
        let config = MachineConfig::builtin(1, 4 << 20);
        let running = Running::new(vm.clone(), Arc::new(Shared::new(1)), devices, config);
        start_dirty_log(&vm).unwrap();
        let written: Vec<u64> = (0..300).map(|i| 0x1000 * (3 * i + 1)).collect();
        for &gpa in &written {
            vm.mark_dirty(GuestAddress(gpa), 8);
        }
        let mut sender = Sender { running: &running, bytes: 0, pages: 0, start: Instant::now(), collected: Vec::new() };
        let mut dirty = DirtyPages::default();
        // The link breaks while the round's pages are being sent.
        let failed = sender.collect(&mut dirty, |_, _| Err(MigrateError::Refused("link down".into())));
        assert!(failed.is_err());
        // The round took every page out of the log...
        assert_eq!(sender.collected.len(), written.len());
        sender.put_back();
        // ... and the failure put them all back.
        vm.sync_dirty_log().unwrap();
        let again = vm.collect_dirty(GuestAddress(0), 4 << 20, 4096).unwrap();
        assert_eq!(again.pages.iter().map(|g| g.0).collect::<Vec<_>>(), written);
        let empty = vm.collect_dirty(GuestAddress(0), 4 << 20, 4096).unwrap();
        assert!(empty.pages.is_empty(), "collected once, then gone: {:?}", empty.pages.len());
    }

    /// `info` shows the pages sent while a copy goes on (a full copy of a
    /// guest that wrote all its RAM is one data range).
    #[test]
    fn progress_shows_while_the_full_copy_goes_on() {
        use std::io::Read;
        use std::sync::atomic::{AtomicBool, Ordering};
        let hv = nkvm::Hypervisor::open().unwrap();
        let mem = 16u64 << 20;
        let vm = Arc::new(Vm::new(&hv, &nkvm::VmConfig { vcpus: 1, memory: mem, ..Default::default() }).unwrap());
        vm.memory().write(GuestAddress(0), &vec![0xa5u8; mem as usize]).unwrap();
        let devices = attach_devices(&vm).unwrap();
        let running = Running::new(vm.clone(), Arc::new(Shared::new(1)), devices, MachineConfig::builtin(1, mem));
        let (tx, mut rx) = std::os::unix::net::UnixStream::pair().unwrap();
        // A slow link: a MiB every 20 ms.
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            while rx.read(&mut buf).is_ok_and(|n| n > 0) {
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let done = AtomicBool::new(false);
        let seen = std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut sender =
                    Sender { running: &running, bytes: 0, pages: 0, start: Instant::now(), collected: Vec::new() };
                let mut out = BufWriter::with_capacity(1 << 20, Conn::Unix(tx));
                sender.full_copy(&mut out).unwrap();
                done.store(true, Ordering::SeqCst);
            });
            while !done.load(Ordering::SeqCst) {
                let pages = running.migration.lock().unwrap().pages;
                if pages > 0 {
                    return Some(pages);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            None
        });
        reader.join().unwrap();
        let pages = seen.expect("no progress was shown before the copy ended");
        assert!(pages < mem / PAGE as u64, "{pages} pages");
    }
}
