//! A paused machine as values ([`MachineState`]: its configuration, the
//! VM, vCPU and device state blobs) and as a snapshot directory on disk
//! (that plus the guest memory file); `docs/migration.md` has the layout.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nkvm::state::{FormatError, VcpuState, VmState};
use nkvm::Backing;
use serde_json::{json, Value};

/// The snapshot directory format this nkvm writes and reads
/// (`machine.json`'s `"format"`).
pub const SNAPSHOT_FORMAT: u64 = 1;
/// The configuration file in a snapshot directory.
pub const MACHINE_FILE: &str = "machine.json";
/// The guest memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

/// What a machine is built from: enough for another nkvm to create the
/// same machine (the guest code is in its memory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineConfig {
    /// vCPUs.
    pub cpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
}

/// Why a snapshot or a machine state was refused or could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file could not be read or written.
    #[error("{path}: {op} failed")]
    Io {
        /// The file.
        path: String,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The configuration is not what this nkvm reads.
    #[error("{path}: {why}")]
    Config {
        /// The file (or "the migration stream").
        path: String,
        /// What is wrong.
        why: String,
    },
    /// A VM or vCPU state blob was refused.
    #[error("{path}: bad state")]
    State {
        /// The file or record.
        path: String,
        /// What the decoder found.
        #[source]
        source: FormatError,
    },
    /// The memory file's size is not the configured RAM size.
    #[error("{path} is {found} bytes but the machine has {expected} bytes of RAM: the snapshot is truncated or not this machine's")]
    MemorySize {
        /// The memory file.
        path: String,
        /// Its size.
        found: u64,
        /// `memory` in the configuration.
        expected: u64,
    },
    /// Mapping the memory file failed.
    #[error("cannot map {path}")]
    Map {
        /// The memory file.
        path: String,
        /// The cause.
        #[source]
        source: nkvm::MemoryError,
    },
}

impl MachineConfig {
    /// The configuration as `machine.json` holds it.
    pub fn to_json(&self, devices: &[&str]) -> String {
        let vcpus: Vec<String> = (0..self.cpus).map(vcpu_file).collect();
        let devices: serde_json::Map<String, Value> =
            devices.iter().map(|d| ((*d).to_string(), Value::from(device_file(d)))).collect();
        let v = json!({
            "format": SNAPSHOT_FORMAT,
            "kind": "builtin",
            "cpus": self.cpus,
            "memory": self.memory,
            "memory_file": MEMORY_FILE,
            "vm": "vm.state",
            "vcpus": vcpus,
            "devices": devices,
        });
        format!("{v:#}\n")
    }

    /// Reads `machine.json` text (`origin` names it in errors); returns the
    /// configuration and the device names it lists.
    pub fn from_json(text: &str, origin: &str) -> Result<(Self, Vec<String>), SnapshotError> {
        let bad = |why: String| SnapshotError::Config { path: origin.to_string(), why };
        let v: Value = serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let num = |key: &str| v.get(key).and_then(Value::as_u64).ok_or_else(|| bad(format!("no number \"{key}\"")));
        let format = num("format")?;
        if format != SNAPSHOT_FORMAT {
            return Err(bad(format!("snapshot format {format}; this nkvm reads format {SNAPSHOT_FORMAT}")));
        }
        match v.get("kind").and_then(Value::as_str) {
            Some("builtin") => {}
            other => return Err(bad(format!("machine kind {other:?}; this nkvm restores \"builtin\" machines"))),
        }
        let cpus = num("cpus")?;
        let cpus = u32::try_from(cpus).ok().filter(|&c| (1..=1024).contains(&c));
        let cpus = cpus.ok_or_else(|| bad("\"cpus\" must be 1-1024".into()))?;
        let memory = num("memory")?;
        if memory == 0 || memory % 4096 != 0 {
            return Err(bad(format!("\"memory\" = {memory} is not a non-zero multiple of 4096")));
        }
        let devices = match v.get("devices").and_then(Value::as_object) {
            Some(map) => map.keys().cloned().collect(),
            None => return Err(bad("no \"devices\" object".into())),
        };
        Ok((Self { cpus, memory }, devices))
    }
}

fn vcpu_file(id: u32) -> String {
    format!("vcpu-{id}.state")
}

fn device_file(name: &str) -> String {
    format!("device-{name}.state")
}

/// A paused machine's state besides its RAM, as encoded blobs.
#[derive(Debug, Clone)]
pub struct MachineState {
    /// The configuration.
    pub config: MachineConfig,
    /// [`VmState`] blob.
    pub vm: Vec<u8>,
    /// [`VcpuState`] blobs, by vCPU id.
    pub vcpus: Vec<Vec<u8>>,
    /// Device state blobs (`nkvm_devices::Snapshot`), by device name.
    pub devices: Vec<(String, Vec<u8>)>,
}

/// A [`MachineState`] decoded and checked against its configuration.
#[derive(Debug)]
pub struct DecodedState {
    /// The VM's state.
    pub vm: VmState,
    /// The vCPUs' states, by id.
    pub vcpus: Vec<VcpuState>,
    /// Device blobs, by name (the machine restores them into its models).
    pub devices: Vec<(String, Vec<u8>)>,
}

impl MachineState {
    /// Decodes every blob; `origin` names the snapshot or stream in errors.
    pub fn decode(&self, origin: &str) -> Result<DecodedState, SnapshotError> {
        let state_err = |what: String| move |source| SnapshotError::State { path: what, source };
        let vm = VmState::decode(&self.vm).map_err(state_err(format!("{origin}: vm.state")))?;
        let bad = |why: String| SnapshotError::Config { path: origin.to_string(), why };
        if vm.vcpus != self.config.cpus || vm.memory != self.config.memory {
            return Err(bad(format!(
                "the VM state is of {} vCPUs and {} bytes, the configuration says {} and {}",
                vm.vcpus, vm.memory, self.config.cpus, self.config.memory
            )));
        }
        if self.vcpus.len() != self.config.cpus as usize {
            return Err(bad(format!("{} vCPU states for {} vCPUs", self.vcpus.len(), self.config.cpus)));
        }
        let mut vcpus = Vec::new();
        for (id, blob) in self.vcpus.iter().enumerate() {
            let state = VcpuState::decode(blob).map_err(state_err(format!("{origin}: {}", vcpu_file(id as u32))))?;
            if state.id != id as u32 {
                return Err(bad(format!("{} holds vCPU {}'s state", vcpu_file(id as u32), state.id)));
            }
            vcpus.push(state);
        }
        Ok(DecodedState { vm, vcpus, devices: self.devices.clone() })
    }
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io { path: path.display().to_string(), op, source }
}

/// Writes a snapshot directory (created if needed; files in it replaced):
/// `machine.json`, the state files and the guest memory. Only the parts of
/// RAM that hold data are read ([`Backing::data_ranges`]); zero pages are
/// left as holes, so the memory file is sparse.
pub fn write(dir: &Path, state: &MachineState, ram: &Backing) -> Result<(), SnapshotError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir, "creating the directory"))?;
    let put = |name: &str, bytes: &[u8]| -> Result<(), SnapshotError> {
        let path = dir.join(name);
        let mut f = File::create(&path).map_err(io_err(&path, "create"))?;
        f.write_all(bytes).map_err(io_err(&path, "write"))
    };
    put("vm.state", &state.vm)?;
    for (id, blob) in state.vcpus.iter().enumerate() {
        put(&vcpu_file(id as u32), blob)?;
    }
    for (name, blob) in &state.devices {
        put(&device_file(name), blob)?;
    }
    let path = dir.join(MEMORY_FILE);
    let file = File::create(&path).map_err(io_err(&path, "create"))?;
    let mut chunk = vec![0u8; 1 << 20];
    for (start, end) in ram.data_ranges() {
        let mut offset = start;
        while offset < end {
            let n = chunk.len().min((end - offset) as usize);
            ram.read_at(offset, &mut chunk[..n]).map_err(|e| SnapshotError::Io {
                path: path.display().to_string(),
                op: "reading guest memory",
                source: io::Error::other(e),
            })?;
            for (i, page) in chunk[..n].chunks(4096).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    file.write_all_at(page, offset + 4096 * i as u64).map_err(io_err(&path, "write"))?;
                }
            }
            offset += n as u64;
        }
    }
    file.set_len(ram.len()).map_err(io_err(&path, "set_len"))?;
    // The configuration last: a directory without it is not a snapshot.
    let names: Vec<&str> = state.devices.iter().map(|(n, _)| n.as_str()).collect();
    put(MACHINE_FILE, state.config.to_json(&names).as_bytes())
}

/// A snapshot directory read back: the state, and the guest memory file
/// mapped copy-on-write (nothing copied; the snapshot stays as it was).
#[derive(Debug)]
pub struct Loaded {
    /// The state blobs.
    pub state: MachineState,
    /// The guest RAM.
    pub ram: Backing,
}

/// Reads the snapshot directory `dir`.
pub fn read(dir: &Path) -> Result<Loaded, SnapshotError> {
    let get = |name: &str| -> Result<Vec<u8>, SnapshotError> {
        let path: PathBuf = dir.join(name);
        std::fs::read(&path).map_err(io_err(&path, "read"))
    };
    let machine = dir.join(MACHINE_FILE);
    let text = get(MACHINE_FILE)?;
    let text = String::from_utf8(text)
        .map_err(|_| SnapshotError::Config { path: machine.display().to_string(), why: "not UTF-8 text".into() })?;
    let (config, device_names) = MachineConfig::from_json(&text, &machine.display().to_string())?;
    let vm = get("vm.state")?;
    let vcpus = (0..config.cpus).map(|id| get(&vcpu_file(id))).collect::<Result<_, _>>()?;
    let devices = device_names.into_iter().map(|n| get(&device_file(&n)).map(|b| (n, b))).collect::<Result<_, _>>()?;
    let path = dir.join(MEMORY_FILE);
    let file = File::open(&path).map_err(io_err(&path, "open"))?;
    let found = file.metadata().map_err(io_err(&path, "stat"))?.len();
    if found != config.memory {
        return Err(SnapshotError::MemorySize { path: path.display().to_string(), found, expected: config.memory });
    }
    let ram = Backing::from_file_private("nkvm-ram", file, config.memory)
        .map_err(|source| SnapshotError::Map { path: path.display().to_string(), source })?;
    Ok(Loaded { state: MachineState { config, vm, vcpus, devices }, ram })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_json_round_trips() {
        let c = MachineConfig { cpus: 2, memory: 16 << 20 };
        let text = c.to_json(&["serial", "test-device"]);
        let (back, devices) = MachineConfig::from_json(&text, "m").unwrap();
        assert_eq!(back, c);
        assert_eq!(devices, ["serial", "test-device"]);
    }

    #[test]
    fn a_newer_format_and_a_bad_config_are_named() {
        let c = MachineConfig { cpus: 2, memory: 16 << 20 };
        let text = c.to_json(&[]).replace("\"format\": 1", "\"format\": 2");
        let err = MachineConfig::from_json(&text, "m").unwrap_err().to_string();
        assert!(err.contains("snapshot format 2; this nkvm reads format 1"), "{err}");
        let text = c.to_json(&[]).replace("\"memory\": 16777216", "\"memory\": 12345");
        let err = MachineConfig::from_json(&text, "m").unwrap_err().to_string();
        assert!(err.contains("\"memory\" = 12345"), "{err}");
        let err = MachineConfig::from_json("{", "m").unwrap_err().to_string();
        assert!(err.contains("not valid JSON"), "{err}");
    }
}
