//! The destination's side: `nkvm run --incoming ADDR` waits for a
//! source (refusing, and waiting on past, connections it took nothing
//! of) and takes its configuration ([`start`]: the VM is created, and
//! the caller builds the machine around it while the source still sends),
//! then fills the memory and collects the states ([`Arriving::finish`]);
//! the caller restores them and then
//! [`confirm`](Answer::confirm)s: `READY`, then the source's `GO`, and
//! only then does the guest run here (docs/migration.md, the two-step
//! commit).

use std::io;
use std::time::Duration;

use nkvm::{GuestAddress, Hypervisor, Vm};

use super::stream::{self, RecordReader, RecordType};
use super::{Conn, Endpoint, MigrateError, Until};
use crate::machine::intake::chain;
use crate::snapshot::{DecodedState, MachineConfig, MachineState};

/// The link back to the source, for the one answer.
#[derive(Debug)]
pub struct Answer(Conn);

impl Answer {
    /// Tells the source the guest is restored here and waits for its word
    /// to run it (`READY`, then `GO`); only then may the guest run here.
    /// An error means the source never said so: the guest must not run
    /// here (the source resumes it, or keeps it paused if in doubt).
    pub fn confirm(mut self) -> Result<(), MigrateError> {
        stream::write_record(&mut self.0, RecordType::Ready, &[])
            .map_err(|e| MigrateError::link("telling the source the guest is ready", e))?;
        // One deadline for the whole record, not for each read: a source
        // that trickles bytes does not keep this side waiting.
        let mut timed = Until::new(&mut self.0, GO_TIMEOUT, "the source's GO");
        let mut reader = RecordReader::new(&mut timed);
        match reader.next()? {
            (RecordType::Go, _, _) => {}
            (other, _, at) => {
                return Err(MigrateError::Stream { offset: at, why: format!("expected GO, got {other:?}") });
            }
        }
        // The guest is ours now, whether or not the source hears it.
        if let Err(e) = stream::write_record(&mut self.0, RecordType::Running, &[]) {
            log::warn!("could not tell the source the guest runs here: {e}");
        }
        Ok(())
    }

    /// Tells the source the guest was refused (it then resumes it).
    pub fn refuse(&mut self, why: &str) {
        if let Err(e) = stream::write_record(&mut self.0, RecordType::Failed, why.as_bytes()) {
            log::warn!("could not tell the source the migration failed: {e}");
        }
    }
}

/// How long a destination that is ready waits for the source's `GO`.
const GO_TIMEOUT: Duration = Duration::from_secs(30);

/// A migration whose configuration has come (its VM is created) while its
/// memory and state are still on the way: the machine can be built around
/// the VM meanwhile, off the guest's downtime, then [`finish`](Self::finish)
/// takes the rest.
#[derive(Debug)]
pub struct Arriving {
    reader: RecordReader<Conn>,
    config: MachineConfig,
}

impl Arriving {
    /// The machine the source runs.
    pub fn config(&self) -> &MachineConfig {
        &self.config
    }

    /// Receives the rest into `vm` (the one [`start`] created) up to
    /// `END`; returns the decoded states and the link for the answer. An
    /// error has been answered with `FAILED` already.
    pub fn finish(self, vm: &Vm) -> Result<(DecodedState, Answer), MigrateError> {
        let Self { mut reader, config } = self;
        let received = receive_rest(vm, &mut reader, config);
        let mut answer = Answer(reader.into_inner());
        match received {
            Ok(state) => Ok((state, answer)),
            Err(e) => {
                answer.refuse(&chain(&e));
                Err(e)
            }
        }
    }

    /// Tells the source the guest cannot be taken here (it runs on there).
    pub fn refuse(self, why: &str) {
        Answer(self.reader.into_inner()).refuse(why);
    }
}

/// Waits on `addr` for one migration and receives its configuration:
/// returns the VM it describes (memory zero) and what is still arriving.
/// A connection whose header and configuration do not come within
/// [`CONFIG_DEADLINE`], or that it cannot take (another stream, a disk not
/// at its path, a VM this host cannot make), is answered with `FAILED` and
/// the next one accepted: only a listening socket that fails is an error.
pub fn start(hv: &Hypervisor, addr: &str) -> Result<(Vm, Arriving), MigrateError> {
    let endpoint: Endpoint = addr.parse()?;
    // Listening before saying so: a source told to go may connect at once.
    let listener = endpoint.listen()?;
    // What the vCPU states will be checked against, read while the stream
    // comes, not in its downtime.
    hv.prepare_restore();
    eprintln!("nkvm: waiting for a migration on {endpoint}");
    loop {
        let mut conn = match listener.accept() {
            Ok(conn) => conn,
            // A client that reset its connection before it was taken.
            Err(MigrateError::Connect { source, .. }) if source.kind() == io::ErrorKind::ConnectionAborted => {
                continue;
            }
            Err(e) => return Err(e),
        };
        // Nothing of the peer's is taken until its configuration is (no VM
        // is kept, no memory written): a stray client, a wrong source or a
        // disk not at its path here leaves this destination waiting on.
        let taken = receive_config(hv, &mut conn).and_then(|arrived| {
            // A source that stops sending for this long is gone.
            conn.set_read_timeout(Some(Duration::from_secs(60)))
                .map_err(|e| MigrateError::link("configuring", e))
                .map(|()| arrived)
        });
        match taken {
            Ok((vm, config, offset)) => {
                return Ok((vm, Arriving { reader: RecordReader::resume(conn, offset), config }));
            }
            Err(e) => {
                let why = chain(&e);
                Answer(conn).refuse(&why);
                eprintln!("nkvm: refused a connection on {endpoint}: {why}; still waiting for a migration");
            }
        }
    }
}

/// How long a connection may take to send the stream's header and
/// configuration (a few KiB a source sends at once). Well inside a
/// source's send timeout ([`super::SEND_TIMEOUT`]), so that a source that
/// connected behind a client that sends nothing, or a byte at a time, is
/// still taken before its sends fail.
pub const CONFIG_DEADLINE: Duration = Duration::from_secs(4);

/// The header and the configuration from `conn`, within
/// [`CONFIG_DEADLINE`]; the VM it describes, and the stream offset after it.
fn receive_config(hv: &Hypervisor, conn: &mut Conn) -> Result<(Vm, MachineConfig, u64), MigrateError> {
    let mut timed = Until::new(conn, CONFIG_DEADLINE, "the header and configuration");
    stream::read_header(&mut timed)?;
    let mut reader = RecordReader::new(&mut timed);
    let (kind, payload, at) = reader.next()?;
    if kind != RecordType::Config {
        return Err(MigrateError::Stream { offset: at, why: format!("expected the configuration, got {kind:?}") });
    }
    let text = std::str::from_utf8(payload)
        .map_err(|_| MigrateError::Stream { offset: at, why: "the configuration is not UTF-8".into() })?;
    let (config, _) = MachineConfig::from_json(text, "the migration stream's configuration")?;
    // Refused before any memory is sent: the source runs on.
    config.check_disk()?;
    // KVM takes kernel memory for a slot up front, in proportion to its
    // size (about 2.5 MiB per GiB on a shadow-paging host): a claimed size
    // no guest could be given here is refused before it costs anything.
    if let Some(host) = host_memory() {
        if config.memory > host {
            return Err(MigrateError::TooBig { claimed: config.memory >> 20, host: host >> 20 });
        }
    }
    let vm = Vm::new(hv, &config.vm_config()).map_err(MigrateError::Vm)?;
    Ok((vm, config, reader.offset()))
}

/// This host's RAM and swap in bytes (`/proc/meminfo`), if it says.
fn host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |key: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(key))?;
        line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()
    };
    Some((kib("MemTotal:")? + kib("SwapTotal:").unwrap_or(0)) << 10)
}

/// The most device states a stream may carry (a machine has a few dozen).
const MAX_DEVICES: usize = 256;

/// The most bytes of VM, vCPU and device state a stream may carry, all
/// kept until `END` (a machine's come to well under 1 MiB; without a
/// bound, 8 MiB records up to the counts above would be gigabytes).
const MAX_STATE_BYTES: usize = 64 << 20;

fn receive_rest(vm: &Vm, reader: &mut RecordReader<Conn>, config: MachineConfig) -> Result<DecodedState, MigrateError> {
    let memory = vm.memory();
    let zero = [0u8; stream::PAGE];
    let mut state = MachineState { config, vm: Vec::new(), vcpus: Vec::new(), devices: Vec::new() };
    let mut kept = 0usize;
    loop {
        let (kind, payload, at) = reader.next()?;
        let bad = |why: String| MigrateError::Stream { offset: at, why };
        if matches!(kind, RecordType::VmState | RecordType::VcpuState | RecordType::DeviceState) {
            kept += payload.len();
            if kept > MAX_STATE_BYTES {
                return Err(bad(format!("machine states of more than {} MiB in all", MAX_STATE_BYTES >> 20)));
            }
        }
        match kind {
            RecordType::Pages => {
                let pages = stream::parse_pages(payload, at)?;
                // Each run of adjacent pages in one write through the
                // memory file: the fresh RAM is not faulted in page by page.
                for run in pages.chunk_by(|a, b| a.0.checked_add(stream::PAGE as u64) == Some(b.0)) {
                    let start = run[0].0;
                    let bufs: Vec<&[u8]> = run.iter().map(|(_, data)| data.unwrap_or(&zero)).collect();
                    memory.fill(GuestAddress(start), &bufs).map_err(|e| {
                        bad(format!("pages {start:#x}+{:#x} are outside guest memory ({e})", bufs.len() * stream::PAGE))
                    })?;
                }
            }
            // Each state is kept until END: no more of them than the
            // machine has, whatever the peer sends.
            RecordType::VmState if !state.vm.is_empty() => return Err(bad("a second VM state".into())),
            RecordType::VmState => state.vm = payload.to_vec(),
            RecordType::VcpuState if state.vcpus.len() >= state.config.cpus as usize => {
                return Err(bad(format!("more vCPU states than the machine's {} vCPUs", state.config.cpus)));
            }
            RecordType::VcpuState => state.vcpus.push(payload.to_vec()),
            RecordType::DeviceState if state.devices.len() >= MAX_DEVICES => {
                return Err(bad(format!("more than {MAX_DEVICES} device states")));
            }
            RecordType::DeviceState => {
                let n = usize::from(*payload.first().ok_or_else(|| bad("an empty device record".into()))?);
                let name = payload.get(1..1 + n).ok_or_else(|| bad("a device record's name is cut short".into()))?;
                let name = String::from_utf8_lossy(name).into_owned();
                state.devices.push((name, payload[1 + n..].to_vec()));
            }
            RecordType::End => break,
            other => return Err(bad(format!("unexpected {other:?} record"))),
        }
    }
    Ok(state.decode("the migration stream")?)
}
