//! A saved machine coming in: `--restore DIR` (the snapshot read, its
//! memory file mapped) or `--incoming ADDR` (the migration received). Both
//! end as a [`Resumed`]: a VM with its RAM filled and the decoded states,
//! whose configuration says which machine to build around them.

use std::io;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use nkvm::{Backing, GuestAddress, Hypervisor, Vm, PAGE_SIZE};

use super::MachineError;
use crate::cli::RunArgs;
use crate::migrate::receive::{self, Answer};
use crate::saved::LoadError;
use crate::snapshot::{self, DecodedState, MachineKind};

/// Why a saved machine could not be brought back.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The snapshot or stream was refused.
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    /// The saved devices do not fit this machine's, or one refused its state.
    #[error(transparent)]
    Devices(#[from] LoadError),
    /// KVM refused the VM or a vCPU state.
    #[error(transparent)]
    State(#[from] nkvm::state::StateError),
    /// Reading the image failed.
    #[error("cannot read the guest image {path}")]
    Image {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Setting the machine up failed.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// Receiving a migration failed.
    #[error(transparent)]
    Incoming(#[from] crate::migrate::MigrateError),
    /// The API socket could not be served.
    #[error("cannot serve the API socket {path}")]
    Api {
        /// The socket path.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// A saved machine's VM and state, not yet running.
#[derive(Debug)]
pub struct Resumed {
    /// The VM, created from the saved configuration, its RAM filled.
    pub vm: Vm,
    /// The decoded states (the configuration among them).
    pub state: DecodedState,
    /// The link back to a migration's source: confirm once the guest is
    /// ready here, refuse if it cannot be.
    pub answer: Option<Answer>,
    /// When the restore or the receiving began.
    pub since: Instant,
}

impl Resumed {
    /// Tells a migration's source that the guest cannot run here (it then
    /// runs on there); nothing for a snapshot.
    pub fn refuse(answer: Option<&mut Answer>, why: &dyn std::error::Error) {
        if let Some(answer) = answer {
            answer.refuse(&chain(why));
        }
    }

    /// What to say once the guest runs: where it came from, how long it took.
    pub fn announce(answer: Option<Answer>, args: &RunArgs, since: Instant) -> Result<(), RestoreError> {
        if let Some(answer) = answer {
            answer.confirm()?;
            eprintln!("nkvm: migration received; the guest resumes here");
        } else if let Some(dir) = &args.restore {
            eprintln!("nkvm: restored {} in {:.1} ms", dir.display(), since.elapsed().as_secs_f64() * 1e3);
        }
        Ok(())
    }
}

/// Copies the pages of `ram` (the snapshot's memory, byte `i` at
/// guest-physical `i`) that hold data into `vm`'s zero-filled RAM: only
/// the file's data ranges are read (it is sparse), from the file, so its
/// holes cost nothing.
fn copy_ram(ram: &Backing, vm: &Vm) -> Result<(), RestoreError> {
    let file = ram.file();
    let io = |source| snapshot::SnapshotError::Io { path: "the snapshot's memory file".into(), op: "read", source };
    let mut chunk = vec![0u8; 1 << 20];
    for (start, end) in file_data(file, ram.len()).map_err(io)? {
        let mut offset = start;
        while offset < end {
            let n = chunk.len().min((end - offset) as usize);
            file.read_exact_at(&mut chunk[..n], offset).map_err(io)?;
            for (i, page) in chunk[..n].chunks(PAGE_SIZE as usize).enumerate() {
                if snapshot::holds_data(page) {
                    let gpa = GuestAddress(offset + PAGE_SIZE * i as u64);
                    vm.write_memory(gpa, page).map_err(MachineError::from)?;
                }
            }
            offset += n as u64;
        }
    }
    Ok(())
}

/// The page-aligned ranges of the first `len` bytes of `file` that may
/// hold data (`SEEK_DATA`/`SEEK_HOLE`); all of it where the file system
/// cannot say.
fn file_data(file: &std::fs::File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let seek = |offset: u64, whence| -> io::Result<Option<u64>> {
        let offset = libc::off_t::try_from(offset).map_err(io::Error::other)?;
        // SAFETY: lseek only moves the file offset of a descriptor `file`
        // owns for the duration of the call; no memory is passed.
        let at = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
        match at {
            -1 if io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) => Ok(None),
            -1 => Err(io::Error::last_os_error()),
            at => Ok(Some(at as u64)),
        }
    };
    let page = PAGE_SIZE;
    let mut ranges = Vec::new();
    let mut at = 0;
    while at < len {
        let start = match seek(at, libc::SEEK_DATA) {
            Ok(Some(start)) => start,
            Ok(None) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(vec![(0, len)]),
            Err(e) => return Err(e),
        };
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        let (start, end) = (start / page * page, end.div_ceil(page) * page);
        if start >= len {
            break;
        }
        ranges.push((start, end.min(len)));
        at = end;
    }
    Ok(ranges)
}

/// An error and its causes on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}

/// The saved machine `--restore` or `--incoming` names (this waits for the
/// migration), or `None` for a fresh boot.
pub fn take(hv: &Hypervisor, args: &RunArgs) -> Result<Option<Resumed>, RestoreError> {
    let since = Instant::now();
    if let Some(dir) = &args.restore {
        let loaded = snapshot::read(dir)?;
        loaded.state.config.check_disk()?;
        let state = loaded.state.decode(&dir.display().to_string())?;
        let vm = if matches!(state.config.kind, MachineKind::Linux { .. }) {
            // Its in-process virtio devices map guest RAM through the
            // backing's file, which a copy-on-write mapping of the snapshot
            // does not share with the guest: copied into fresh memory.
            let vm = Vm::new(hv, &state.config.vm_config()).map_err(MachineError::from)?;
            copy_ram(&loaded.ram, &vm)?;
            vm
        } else {
            Vm::with_ram(hv, &state.config.vm_config(), loaded.ram).map_err(MachineError::from)?
        };
        return Ok(Some(Resumed { vm, state, answer: None, since }));
    }
    if let Some(uri) = &args.incoming {
        let (vm, state, answer) = receive::accept(hv, uri)?.into_parts();
        return Ok(Some(Resumed { vm, state, answer: Some(answer), since }));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparse_file_is_read_by_its_data_ranges_only() {
        let path = std::env::temp_dir().join(format!("nkvm-sparse-{}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(4 << 20).unwrap();
        file.write_all_at(b"head", 10).unwrap();
        file.write_all_at(b"tail", (2 << 20) + 5).unwrap();
        let ranges = file_data(&file, 4 << 20).unwrap();
        let _ = std::fs::remove_file(&path);
        // Every byte written is inside a range, and the ranges are page-aligned.
        for at in [10, (2 << 20) + 5] {
            assert!(ranges.iter().any(|&(s, e)| s <= at && at < e), "{at:#x} in {ranges:x?}");
        }
        assert!(ranges.iter().all(|&(s, e)| s % PAGE_SIZE == 0 && e % PAGE_SIZE == 0 && s < e && e <= 4 << 20));
    }
}
