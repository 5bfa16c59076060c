//! [`MachineConfig`]: what a saved machine was built from, as
//! `machine.json` and the migration stream's configuration record hold it
//! (`docs/migration.md`, "machine.json"). It is enough to build the same
//! machine again *without* loading a kernel: the guest's code, its ACPI
//! tables and its boot information are in its memory, and each vCPU's
//! CPUID is in its state.

use std::path::PathBuf;

use nkvm::VmConfig;
use serde_json::{json, Value};

use super::{device_file, vcpu_file, SnapshotError, MEMORY_FILE};

/// How the VMM's machines start their dirty log (a migration starts it):
/// every page dirty, so the start costs the same at any guest size and
/// write protection is armed in budgets as the migration drains the log
/// before its first copy (`nkvm::DirtyLogStart::AllDirty`).
pub const MIGRATION_LOG_START: nkvm::DirtyLogStart = nkvm::DirtyLogStart::AllDirty;

/// The snapshot directory format this nkvm writes (`machine.json`'s
/// `"format"`). Format 1 (the built-in machine only, no `"split_irqchip"`
/// or `"hyperv"`) is still read.
pub const SNAPSHOT_FORMAT: u64 = 2;
/// The oldest format this nkvm reads.
const OLDEST_FORMAT: u64 = 1;

/// Which machine a configuration builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MachineKind {
    /// The built-in guest's machine: RAM, the 16550, the test device; no irqchip.
    Builtin,
    /// The kvm-unit-tests PC around a multiboot kernel (`testdev`): split
    /// irqchip, IOAPIC, the platform devices, the 16550, ACPI with S3.
    Multiboot,
    /// The Linux PC: split irqchip, IOAPIC, the 16550, PCI with a
    /// virtio-console and, if it has one, a virtio-blk disk.
    Linux {
        /// The virtio-blk disk image, if any.
        disk: Option<DiskConfig>,
        /// The socket of the vhost-user backend serving the disk instead,
        /// if any: a backend serving the same disk must listen there.
        vhost_user: Option<PathBuf>,
    },
}

impl MachineKind {
    /// The name `machine.json` spells it with.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Builtin => "builtin",
            Self::Multiboot => "multiboot",
            Self::Linux { .. } => "linux",
        }
    }
}

/// A raw disk image a Linux machine presents as virtio-blk. The file is
/// not in the snapshot: it must be at the same path (shared storage), of
/// the same size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The image file (absolute).
    pub path: PathBuf,
    /// Its size in bytes when the machine was saved.
    pub size: u64,
    /// Presented read-only.
    pub read_only: bool,
}

impl DiskConfig {
    /// Checks that the image is there and of the saved size.
    pub fn check(&self) -> Result<(), SnapshotError> {
        let path = self.path.display().to_string();
        let found = std::fs::metadata(&self.path)
            .map_err(|source| SnapshotError::Io { path: path.clone(), op: "opening the saved machine's disk", source })?
            .len();
        if found != self.size {
            return Err(SnapshotError::DiskSize { path, found, expected: self.size });
        }
        Ok(())
    }
}

/// What a machine is built from: enough for another nkvm to create the
/// same machine (the guest code is in its memory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineConfig {
    /// vCPUs.
    pub cpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Which machine.
    pub kind: MachineKind,
    /// The Hyper-V enlightenments (`--hyperv`): the SynIC is enabled on
    /// every vCPU before its state (the SynIC MSRs among it) goes back.
    pub hyperv: bool,
}

impl MachineConfig {
    /// The built-in machine of `cpus` vCPUs and `memory` bytes.
    pub fn builtin(cpus: u32, memory: u64) -> Self {
        Self { cpus, memory, kind: MachineKind::Builtin, hyperv: false }
    }

    /// Whether the machine has a split irqchip (every `--kernel` machine).
    pub fn split_irqchip(&self) -> bool {
        self.kind != MachineKind::Builtin
    }

    /// The VM to create for it.
    pub fn vm_config(&self) -> VmConfig {
        VmConfig {
            vcpus: self.cpus,
            memory: self.memory,
            split_irqchip: self.split_irqchip(),
            dirty_log_start: MIGRATION_LOG_START,
            ..Default::default()
        }
    }

    /// Checks that the machine's disk, if it has one, is at its path and of
    /// its size: a machine is refused before anything of it is built.
    pub fn check_disk(&self) -> Result<(), SnapshotError> {
        match &self.kind {
            MachineKind::Linux { disk: Some(disk), .. } => disk.check(),
            _ => Ok(()),
        }
    }

    /// The configuration as `machine.json` holds it.
    pub fn to_json(&self, devices: &[&str]) -> String {
        let vcpus: Vec<String> = (0..self.cpus).map(vcpu_file).collect();
        let devices: serde_json::Map<String, Value> =
            devices.iter().map(|d| ((*d).to_string(), Value::from(device_file(d)))).collect();
        let mut v = json!({
            "format": SNAPSHOT_FORMAT,
            "kind": self.kind.name(),
            "cpus": self.cpus,
            "memory": self.memory,
            "split_irqchip": self.split_irqchip(),
            "hyperv": self.hyperv,
            "memory_file": MEMORY_FILE,
            "vm": "vm.state",
            "vcpus": vcpus,
            "devices": devices,
        });
        if let MachineKind::Linux { disk, vhost_user } = &self.kind {
            v["disk"] = match disk {
                Some(d) => json!({ "path": d.path, "size": d.size, "read_only": d.read_only }),
                None => Value::Null,
            };
            if let Some(socket) = vhost_user {
                v["vhost_user_disk"] = json!(socket);
            }
        }
        format!("{v:#}\n")
    }

    /// Reads `machine.json` text (`origin` names it in errors); returns the
    /// configuration and the device names it lists.
    pub fn from_json(text: &str, origin: &str) -> Result<(Self, Vec<String>), SnapshotError> {
        let bad = |why: String| SnapshotError::Config { path: origin.to_string(), why };
        let v: Value = serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let num = |key: &str| v.get(key).and_then(Value::as_u64).ok_or_else(|| bad(format!("no number \"{key}\"")));
        let flag = |key: &str| v.get(key).and_then(Value::as_bool).ok_or_else(|| bad(format!("no boolean \"{key}\"")));
        let format = num("format")?;
        if !(OLDEST_FORMAT..=SNAPSHOT_FORMAT).contains(&format) {
            return Err(bad(format!(
                "snapshot format {format}; this nkvm reads formats {OLDEST_FORMAT} to {SNAPSHOT_FORMAT}"
            )));
        }
        let kind = match (format, v.get("kind").and_then(Value::as_str)) {
            (_, Some("builtin")) => MachineKind::Builtin,
            (2.., Some("multiboot")) => MachineKind::Multiboot,
            (2.., Some("linux")) => MachineKind::Linux {
                disk: disk_from_json(v.get("disk")).map_err(bad)?,
                vhost_user: vhost_user_from_json(v.get("vhost_user_disk")).map_err(bad)?,
            },
            (_, other) => {
                return Err(bad(format!(
                    "machine kind {other:?} in format {format}; this nkvm restores \"builtin\", \"multiboot\" and \
                     \"linux\" machines (the last two from format 2)"
                )))
            }
        };
        let cpus = num("cpus")?;
        let cpus = u32::try_from(cpus).ok().filter(|&c| (1..=1024).contains(&c));
        let cpus = cpus.ok_or_else(|| bad("\"cpus\" must be 1-1024".into()))?;
        let memory = num("memory")?;
        if memory == 0 || memory % 4096 != 0 {
            return Err(bad(format!("\"memory\" = {memory} is not a non-zero multiple of 4096")));
        }
        let hyperv = if format >= 2 { flag("hyperv")? } else { false };
        let config = Self { cpus, memory, kind, hyperv };
        if format >= 2 && flag("split_irqchip")? != config.split_irqchip() {
            return Err(bad(format!(
                "\"split_irqchip\" must be {} for a {:?} machine",
                config.split_irqchip(),
                config.kind.name()
            )));
        }
        let devices = match v.get("devices").and_then(Value::as_object) {
            Some(map) => map.keys().cloned().collect(),
            None => return Err(bad("no \"devices\" object".into())),
        };
        Ok((config, devices))
    }
}

/// A Linux machine's `"vhost_user_disk"`: absent or null, or the
/// backend's socket (an absolute path).
fn vhost_user_from_json(socket: Option<&Value>) -> Result<Option<PathBuf>, String> {
    match socket {
        None | Some(Value::Null) => Ok(None),
        Some(s) => match s.as_str().filter(|p| p.starts_with('/')) {
            Some(path) => Ok(Some(path.into())),
            None => Err("\"vhost_user_disk\" must be null or an absolute socket path".into()),
        },
    }
}

/// A Linux machine's `"disk"`: null, or path, size and read-only.
fn disk_from_json(disk: Option<&Value>) -> Result<Option<DiskConfig>, String> {
    let disk = match disk {
        None => return Err("a \"linux\" machine needs \"disk\" (null when it has none)".into()),
        Some(Value::Null) => return Ok(None),
        Some(d) => d,
    };
    let path = disk.get("path").and_then(Value::as_str).filter(|p| p.starts_with('/'));
    let path = path.ok_or("\"disk\" needs an absolute \"path\"")?;
    let size = disk.get("size").and_then(Value::as_u64).ok_or("\"disk\" needs a number \"size\"")?;
    let read_only = disk.get("read_only").and_then(Value::as_bool).ok_or("\"disk\" needs a boolean \"read_only\"")?;
    Ok(Some(DiskConfig { path: path.into(), size, read_only }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linux() -> MachineConfig {
        let disk = DiskConfig { path: "/var/disk.img".into(), size: 1 << 20, read_only: true };
        let kind = MachineKind::Linux { disk: Some(disk), vhost_user: None };
        MachineConfig { cpus: 2, memory: 256 << 20, kind, hyperv: true }
    }

    #[test]
    fn machine_json_round_trips_for_every_kind() {
        let multiboot = MachineConfig { kind: MachineKind::Multiboot, ..MachineConfig::builtin(1, 32 << 20) };
        let no_disk = MachineConfig { kind: MachineKind::Linux { disk: None, vhost_user: None }, ..linux() };
        let vhost_user = MachineConfig {
            kind: MachineKind::Linux { disk: None, vhost_user: Some("/run/qsd.sock".into()) },
            ..linux()
        };
        for c in [MachineConfig::builtin(2, 16 << 20), multiboot, linux(), no_disk, vhost_user] {
            let text = c.to_json(&["serial", "test-device"]);
            let (back, devices) = MachineConfig::from_json(&text, "m").unwrap();
            assert_eq!(back, c, "{text}");
            assert_eq!(devices, ["serial", "test-device"]);
            assert_eq!(c.vm_config().split_irqchip, c.kind != MachineKind::Builtin);
        }
    }

    #[test]
    fn a_format_1_builtin_machine_is_still_read() {
        let text = r#"{"format": 1, "kind": "builtin", "cpus": 2, "memory": 16777216, "devices": {"serial": "x"}}"#;
        let (c, devices) = MachineConfig::from_json(text, "m").unwrap();
        assert_eq!(c, MachineConfig::builtin(2, 16 << 20));
        assert_eq!(devices, ["serial"]);
        let err = MachineConfig::from_json(&text.replace("builtin", "linux"), "m").unwrap_err().to_string();
        assert!(err.contains("machine kind Some(\"linux\") in format 1"), "{err}");
    }

    #[test]
    fn a_newer_format_and_a_bad_config_are_named() {
        let c = MachineConfig::builtin(2, 16 << 20);
        let text = c.to_json(&[]).replace("\"format\": 2", "\"format\": 3");
        let err = MachineConfig::from_json(&text, "m").unwrap_err().to_string();
        assert!(err.contains("snapshot format 3; this nkvm reads formats 1 to 2"), "{err}");
        let text = c.to_json(&[]).replace("\"memory\": 16777216", "\"memory\": 12345");
        let err = MachineConfig::from_json(&text, "m").unwrap_err().to_string();
        assert!(err.contains("\"memory\" = 12345"), "{err}");
        let err = MachineConfig::from_json("{", "m").unwrap_err().to_string();
        assert!(err.contains("not valid JSON"), "{err}");
        let text = linux().to_json(&[]).replace("\"split_irqchip\": true", "\"split_irqchip\": false");
        let err = MachineConfig::from_json(&text, "m").unwrap_err().to_string();
        assert!(err.contains("\"split_irqchip\" must be true for a \"linux\" machine"), "{err}");
        let text = linux().to_json(&[]).replace("/var/disk.img", "disk.img");
        let err = MachineConfig::from_json(&text, "m").unwrap_err().to_string();
        assert!(err.contains("\"disk\" needs an absolute \"path\""), "{err}");
        let text = linux().to_json(&[]).replace("\"disk\": {", "\"vhost_user_disk\": \"qsd.sock\", \"disk\": {");
        let err = MachineConfig::from_json(&text, "m").unwrap_err().to_string();
        assert!(err.contains("\"vhost_user_disk\" must be null or an absolute socket path"), "{err}");
    }

    #[test]
    fn a_missing_disk_and_a_disk_of_another_size_are_refused() {
        let dir = std::env::temp_dir().join(format!("nkvm-diskcheck-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.img");
        let mut disk = DiskConfig { path: path.clone(), size: 4096, read_only: false };
        let err = disk.check().unwrap_err().to_string();
        assert!(err.contains("d.img: opening the saved machine's disk failed"), "{err}");
        std::fs::write(&path, [0u8; 512]).unwrap();
        let err = disk.check().unwrap_err().to_string();
        assert!(err.contains("d.img is 512 bytes but the saved machine's disk was 4096 bytes"), "{err}");
        disk.size = 512;
        disk.check().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
