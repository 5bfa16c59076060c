//! The watcher thread of a vhost-user device: it notices the backend's
//! socket hang up the moment the backend dies. For a foreign backend it
//! marks the device failed and waits for one to answer on the socket
//! again; for nkvm's own device process it reaps the process, reports how
//! it died, and starts a new one that takes the queues where the guest's
//! rings are — up to [`MAX_RESTARTS`] times in a row, after which the
//! device is failed (`DEVICE_NEEDS_RESET`) and the VM goes on.

use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::thread;
use std::time::Duration;

use nkvm_devices::virtio::{VirtioError, VirtioPci};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::{DeviceKind, Session, VhostUserDevice, VhostUserError};

/// Restarts in a row after which a device process is given up on (a
/// process that served a while starts the count again: see
/// [`super::super::device_process::STABLE_AFTER`]).
pub const MAX_RESTARTS: u32 = 3;

/// The epoll token of the socket.
const SOCKET: u64 = 0;
/// The epoll token of the stop eventfd.
const STOP: u64 = 1;
/// How often the watcher tries the socket again once the backend is gone.
const RECONNECT_PERIOD: Duration = Duration::from_millis(200);

/// Starts a thread that notices the backend hanging up — it logs a line
/// naming the socket and marks the device failed (`DEVICE_NEEDS_RESET`) —
/// and then tries the socket until a backend answers again, which it
/// reports; the guest gets the new backend when it resets the device.
pub(in crate::pci_devices) fn watch(device: &Arc<Mutex<VirtioPci<VhostUserDevice>>>) -> io::Result<()> {
    let epoll = Epoll::new()?;
    let (stop, socket, kind) = {
        let pci = device.lock().unwrap_or_else(|e| e.into_inner());
        (pci.device().stop.try_clone()?, pci.device().socket.clone(), pci.device().kind)
    };
    epoll.ctl(ControlOperation::Add, stop.as_raw_fd(), EpollEvent::new(EventSet::IN, STOP))?;
    let watcher = Watcher { epoll, device: Arc::downgrade(device), socket, kind };
    watcher.follow(&device.lock().unwrap_or_else(|e| e.into_inner()))?;
    thread::Builder::new().name("vhost-user-watch".into()).spawn(move || watcher.run())?;
    Ok(())
}

/// The watcher thread's state.
struct Watcher {
    epoll: Epoll,
    device: Weak<Mutex<VirtioPci<VhostUserDevice>>>,
    socket: PathBuf,
    kind: DeviceKind,
}

impl Watcher {
    /// Watches the device's current connection for a hang-up.
    fn follow(&self, pci: &VirtioPci<VhostUserDevice>) -> io::Result<()> {
        let hangup = EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR;
        let fd = pci.device().frontend.as_raw_fd();
        self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(hangup, SOCKET))
    }

    /// Waits up to `timeout_ms` (-1: for ever); `None` when told to stop.
    fn wait(&self, timeout_ms: i32) -> Option<bool> {
        let mut events = [EpollEvent::default(); 2];
        loop {
            return match self.epoll.wait(timeout_ms, &mut events) {
                Ok(n) if events[..n].iter().any(|e| e.data() == STOP) => None,
                Ok(n) => Some(n > 0),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("vhost-user {}: the watcher stops: {e}", self.socket.display());
                    None
                }
            };
        }
    }

    /// The device process died: reaps it, reports it, starts another and
    /// hands it the queues. Returns whether a process serves the device
    /// again (false: the device has failed for good).
    fn restart(&self, pci: &mut VirtioPci<VhostUserDevice>) -> bool {
        let mut what = String::new();
        loop {
            let Some(process) = pci.device_mut().process.as_mut() else { return false };
            // A process a failed restart left running is reaped too; one
            // already reaped is not reaped (or reported) again.
            if let Some(death) = process.reap() {
                what = death.to_string();
            }
            if process.in_a_row > MAX_RESTARTS {
                eprintln!(
                    "nkvm: {}: {what}; given up after {MAX_RESTARTS} restarts in a row: \
                     the device has failed, the VM goes on",
                    self.kind.name
                );
                process.log.lock().unwrap_or_else(|e| e.into_inner()).failed = true;
                let gone = VhostUserError::Gone { socket: self.socket.clone() };
                pci.device_mut().mark_gone();
                pci.fail(&VirtioError::Backend(Box::new(gone)));
                return false;
            }
            eprintln!(
                "nkvm: {}: {what}; restarting it ({} of {MAX_RESTARTS} in a row)",
                self.kind.name, process.in_a_row
            );
            match self.start_again(pci) {
                Ok(()) => return true,
                Err(e) => {
                    eprintln!("nkvm: {}: the restarted device process failed: {e}", self.kind.name);
                    what = format!("its restart failed ({e})");
                    if let Some(process) = pci.device_mut().process.as_mut() {
                        process.restart_failed();
                    }
                }
            }
        }
    }

    /// A new process, the start-up handshake, the driver's queues.
    fn start_again(&self, pci: &mut VirtioPci<VhostUserDevice>) -> Result<(), Box<dyn std::error::Error>> {
        let block = pci.device_mut();
        let Some(process) = block.process.as_mut() else { return Err("no device process".into()) };
        process.respawn()?;
        // The dead process may have completed requests (used entries
        // published) before it logged the pages their buffers filled: a
        // migration under way copies everything again rather than miss one.
        block.log.set_all();
        let session = Session::open(&self.socket, &self.kind)?;
        let _ = std::fs::remove_file(&self.socket);
        block.reconnected(session);
        block.started.clear();
        // Stopped for a save (the machine paused, its state being taken):
        // the queues are handed over when the save lets them run again.
        if !block.stopped_for_save {
            block.resume()?;
        }
        self.follow(pci)?;
        Ok(())
    }

    fn run(self) {
        loop {
            // Connected: wait for the hang-up.
            match self.wait(-1) {
                None => return,
                Some(false) => continue,
                Some(true) => {}
            }
            {
                let Some(device) = self.device.upgrade() else { return };
                let mut pci = device.lock().unwrap_or_else(|e| e.into_inner());
                let fd = pci.device().frontend.as_raw_fd();
                let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                if pci.device().process.is_some() {
                    if self.restart(&mut pci) {
                        continue;
                    }
                    // Given up on: the device stays failed, nothing to
                    // reconnect to.
                    return;
                }
                let gone = VhostUserError::Gone { socket: self.socket.clone() };
                eprintln!("nkvm: {}: {gone}; the device has failed, the VM goes on", self.kind.name);
                pci.device_mut().mark_gone();
                pci.fail(&VirtioError::Backend(Box::new(gone)));
            }
            // Gone: try the socket until a backend answers.
            loop {
                if self.wait(RECONNECT_PERIOD.as_millis() as i32).is_none() {
                    return;
                }
                let Ok(session) = Session::open(&self.socket, &self.kind) else { continue };
                let Some(device) = self.device.upgrade() else { return };
                let mut pci = device.lock().unwrap_or_else(|e| e.into_inner());
                pci.device_mut().reconnected(session);
                if let Err(e) = self.follow(&pci) {
                    log::error!("vhost-user {}: cannot watch the new connection: {e}", self.socket.display());
                }
                eprintln!(
                    "nkvm: {}: vhost-user backend at {} is back; the device works again once the guest resets it",
                    self.kind.name,
                    self.socket.display()
                );
                break;
            }
        }
    }
}
