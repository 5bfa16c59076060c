//! The destination's side: `nkvm run --incoming ADDR` waits for one
//! source, builds the machine its configuration describes, fills the
//! memory and collects the states; the caller restores them and then
//! [`confirm`](Answer::confirm)s, after which the source ends.

use std::time::Duration;

use nkvm::{GuestAddress, Hypervisor, Vm};

use super::stream::{self, RecordReader, RecordType};
use super::{Conn, Endpoint, MigrateError};
use crate::snapshot::{DecodedState, MachineConfig, MachineState};

/// A received guest, not yet running.
#[derive(Debug)]
pub struct Incoming {
    vm: Vm,
    state: DecodedState,
    conn: Answer,
}

/// The link back to the source, for the one answer.
#[derive(Debug)]
pub struct Answer(Conn);

impl Answer {
    /// Tells the source the guest runs here now (it then ends).
    pub fn confirm(mut self) -> Result<(), MigrateError> {
        stream::write_record(&mut self.0, RecordType::Resumed, &[])
            .map_err(|e| MigrateError::link("confirming to the source", e))
    }

    /// Tells the source the guest was refused (it then resumes it).
    pub fn refuse(&mut self, why: &str) {
        if let Err(e) = stream::write_record(&mut self.0, RecordType::Failed, why.as_bytes()) {
            log::warn!("could not tell the source the migration failed: {e}");
        }
    }
}

impl Incoming {
    /// The VM (memory filled), the decoded states, and the answer link.
    pub fn into_parts(self) -> (Vm, DecodedState, Answer) {
        (self.vm, self.state, self.conn)
    }
}

/// Waits on `addr` for one migration and receives it.
pub fn accept(hv: &Hypervisor, addr: &str) -> Result<Incoming, MigrateError> {
    let endpoint: Endpoint = addr.parse()?;
    eprintln!("nkvm: waiting for a migration on {endpoint}");
    let conn = endpoint.accept()?;
    // A source that stops sending for this long is gone.
    conn.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| MigrateError::link("configuring", e))?;
    let mut reader = RecordReader::new(conn);
    let received = receive(hv, &mut reader);
    let mut answer = Answer(reader.into_inner());
    match received {
        Ok((vm, state)) => Ok(Incoming { vm, state, conn: answer }),
        Err(e) => {
            answer.refuse(&e.to_string());
            Err(e)
        }
    }
}

fn receive(hv: &Hypervisor, reader: &mut RecordReader<Conn>) -> Result<(Vm, DecodedState), MigrateError> {
    stream::read_header(reader.get_mut())?;
    let (kind, payload, at) = reader.next()?;
    if kind != RecordType::Config {
        return Err(MigrateError::Stream { offset: at, why: format!("expected the configuration, got {kind:?}") });
    }
    let text = std::str::from_utf8(payload)
        .map_err(|_| MigrateError::Stream { offset: at, why: "the configuration is not UTF-8".into() })?;
    let (config, _) = MachineConfig::from_json(text, "the migration stream's configuration")?;
    // Refused before any memory is sent: the source runs on.
    config.check_disk()?;
    let vm = Vm::new(hv, &config.vm_config()).map_err(MigrateError::Vm)?;
    let memory = vm.memory();
    let zero = [0u8; stream::PAGE];
    let mut state = MachineState { config, vm: Vec::new(), vcpus: Vec::new(), devices: Vec::new() };
    loop {
        let (kind, payload, at) = reader.next()?;
        let bad = |why: String| MigrateError::Stream { offset: at, why };
        match kind {
            RecordType::Pages => {
                for (gpa, data) in stream::parse_pages(payload, at)? {
                    memory
                        .write(GuestAddress(gpa), data.unwrap_or(&zero))
                        .map_err(|e| bad(format!("page {gpa:#x} is outside guest memory ({e})")))?;
                }
            }
            RecordType::VmState => state.vm = payload.to_vec(),
            RecordType::VcpuState => state.vcpus.push(payload.to_vec()),
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
    let decoded = state.decode("the migration stream")?;
    Ok((vm, decoded))
}
