//! A paused machine as values ([`MachineState`]: its configuration, the
//! VM, vCPU and device state blobs) and as a snapshot directory on disk
//! (that plus the guest memory file); `docs/migration.md` has the layout.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nkvm::state::{FormatError, VcpuState, VmState};
use nkvm::Backing;

mod config;

pub use config::{DiskConfig, MachineConfig, MachineKind, MIGRATION_LOG_START};

/// The configuration file in a snapshot directory.
pub const MACHINE_FILE: &str = "machine.json";
/// The guest memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

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
    /// The saved machine's disk image is not the one it had.
    #[error("{path} is {found} bytes but the saved machine's disk was {expected} bytes: not the same disk")]
    DiskSize {
        /// The image.
        path: String,
        /// Its size now.
        found: u64,
        /// Its size when saved.
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

pub(crate) fn vcpu_file(id: u32) -> String {
    format!("vcpu-{id}.state")
}

pub(crate) fn device_file(name: &str) -> String {
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
    /// The configuration.
    pub config: MachineConfig,
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
        let c = &self.config;
        if vm.vcpus != c.cpus || vm.memory != c.memory || vm.split_irqchip != c.split_irqchip() {
            return Err(bad(format!(
                "the VM state is of {} vCPUs, {} bytes, split irqchip {}; the configuration says {}, {}, {}",
                vm.vcpus,
                vm.memory,
                vm.split_irqchip,
                c.cpus,
                c.memory,
                c.split_irqchip()
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
        Ok(DecodedState { config: self.config.clone(), vm, vcpus, devices: self.devices.clone() })
    }
}

/// Whether a page (at most 4096 bytes) holds anything but zeros. A slice
/// comparison (`memcmp`), fast even in a debug build, unlike a byte loop.
pub fn holds_data(page: &[u8]) -> bool {
    static ZEROS: [u8; 4096] = [0; 4096];
    page != &ZEROS[..page.len().min(ZEROS.len())]
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io { path: path.display().to_string(), op, source }
}

/// Writes a snapshot directory (created if needed; files in it replaced):
/// `machine.json`, the state files and the guest memory. Only the parts of
/// RAM that hold data are read ([`Backing::data_ranges`]); zero pages are
/// left as holes, so the memory file is sparse.
///
/// Safe over an existing snapshot, even the one the running guest was
/// restored from (whose memory file it maps): `machine.json` goes first, so
/// a write that fails half-way leaves no snapshot rather than a mix of two;
/// every file is written under a temporary name and renamed into place, so
/// a mapping of the old file keeps the old data; `machine.json` comes last.
pub fn write(dir: &Path, state: &MachineState, ram: &Backing) -> Result<(), SnapshotError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir, "creating the directory"))?;
    let machine = dir.join(MACHINE_FILE);
    match std::fs::remove_file(&machine) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&machine, "remove")(e)),
        _ => {}
    }
    let put = |name: &str, bytes: &[u8]| replace(dir, name, |f, _| f.write_all(bytes));
    put("vm.state", &state.vm)?;
    for (id, blob) in state.vcpus.iter().enumerate() {
        put(&vcpu_file(id as u32), blob)?;
    }
    for (name, blob) in &state.devices {
        put(&device_file(name), blob)?;
    }
    replace(dir, MEMORY_FILE, |file, path| {
        let mut chunk = vec![0u8; 1 << 20];
        for (start, end) in ram.data_ranges() {
            let mut offset = start;
            while offset < end {
                let n = chunk.len().min((end - offset) as usize);
                ram.read_at(offset, &mut chunk[..n])
                    .map_err(|e| io::Error::other(format!("reading guest memory for {}: {e}", path.display())))?;
                for (i, page) in chunk[..n].chunks(4096).enumerate() {
                    if holds_data(page) {
                        file.write_all_at(page, offset + 4096 * i as u64)?;
                    }
                }
                offset += n as u64;
            }
        }
        file.set_len(ram.len())
    })?;
    // The configuration last: a directory without it is not a snapshot.
    let names: Vec<&str> = state.devices.iter().map(|(n, _)| n.as_str()).collect();
    put(MACHINE_FILE, state.config.to_json(&names).as_bytes())
}

/// Writes `dir/name` through `fill` under a temporary name, then renames it
/// into place (whoever has the old file open or mapped keeps the old data).
fn replace(dir: &Path, name: &str, fill: impl FnOnce(&mut File, &Path) -> io::Result<()>) -> Result<(), SnapshotError> {
    let path = dir.join(name);
    let partial = dir.join(format!(".{name}.partial"));
    let mut f = File::create(&partial).map_err(io_err(&partial, "create"))?;
    if let Err(e) = fill(&mut f, &path) {
        let _ = std::fs::remove_file(&partial);
        return Err(io_err(&path, "write")(e));
    }
    drop(f);
    std::fs::rename(&partial, &path).map_err(|e| {
        let _ = std::fs::remove_file(&partial);
        io_err(&path, "rename into place")(e)
    })
}

/// The largest state file (or `machine.json`) a snapshot may hold: a
/// device state is at most 1 MiB on the wire, a vCPU's a few KiB.
const MAX_STATE_FILE: u64 = 16 << 20;

/// A snapshot directory read back: the state, and the guest memory file
/// mapped copy-on-write (nothing copied; the snapshot stays as it was).
#[derive(Debug)]
pub struct Loaded {
    /// The state blobs.
    pub state: MachineState,
    /// The guest RAM.
    pub ram: Backing,
}

/// Reads the snapshot directory `dir`. Its memory file is mapped
/// copy-on-write, unless other processes must map guest RAM (`shared_ram`:
/// device processes; or the machine has a vhost-user disk): then it is
/// copied into a memfd.
pub fn read(dir: &Path, shared_ram: bool) -> Result<Loaded, SnapshotError> {
    let get = |name: &str| -> Result<Vec<u8>, SnapshotError> {
        let path: PathBuf = dir.join(name);
        // Only a regular file of a state's size: a FIFO would hang the
        // restore, a link to /dev/zero fill memory.
        let meta = std::fs::metadata(&path).map_err(io_err(&path, "read"))?;
        if !meta.is_file() {
            let why = "not a regular file".to_string();
            return Err(SnapshotError::Config { path: path.display().to_string(), why });
        }
        if meta.len() > MAX_STATE_FILE {
            let why = format!("{} bytes, more than a state file holds ({MAX_STATE_FILE})", meta.len());
            return Err(SnapshotError::Config { path: path.display().to_string(), why });
        }
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
    // Not blocking in the open (a FIFO's would wait for a writer); then
    // only a regular file is taken.
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&path)
    }
    .map_err(io_err(&path, "open"))?;
    let meta = file.metadata().map_err(io_err(&path, "stat"))?;
    if !meta.is_file() {
        return Err(SnapshotError::Config { path: path.display().to_string(), why: "not a regular file".into() });
    }
    let found = meta.len();
    if found != config.memory {
        return Err(SnapshotError::MemorySize { path: path.display().to_string(), found, expected: config.memory });
    }
    let ram = if shared_ram || matches!(config.kind, MachineKind::Linux { vhost_user: Some(_), .. }) {
        // A device process or vhost-user backend maps guest RAM itself,
        // which a private mapping of the file would hide from it: the
        // memory is copied into a fresh memfd, at a cost that grows with
        // what the guest used (the file's data, not its size).
        copied_ram(file, &path, config.memory)?
    } else {
        Backing::from_file_private("nkvm-ram", file, config.memory)
            .map_err(|source| SnapshotError::Map { path: path.display().to_string(), source })?
    };
    Ok(Loaded { state: MachineState { config, vm, vcpus, devices }, ram })
}

/// `file`'s `size` bytes in a new memfd backing: only the data the file
/// holds is copied (its holes, the pages the guest never wrote, stay holes).
fn copied_ram(file: File, path: &Path, size: u64) -> Result<Backing, SnapshotError> {
    Backing::copy_of("nkvm-ram", &file, size)
        .map_err(|source| SnapshotError::Map { path: path.display().to_string(), source })
}
