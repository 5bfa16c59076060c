//! Queue notifications without an exit to user space: one ioeventfd per
//! queue on the virtio notify register, and a worker thread per device that
//! serves the queue when its eventfd fires, off the vCPU thread.
//!
//! The ioeventfds follow BAR0: registered where it decodes, removed when
//! the guest moves it or turns memory decoding off, registered again at
//! the new address. Where one cannot be registered, the BAR's MMIO handler
//! serves the notify register in the vCPU thread (the same model code).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Weak;
use std::thread;

use nkvm::{IoSpace, Vm};
use nkvm_devices::pci::PciDevice;
use nkvm_devices::virtio::pci::{NOTIFY_OFFSET, NOTIFY_OFF_MULTIPLIER};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The epoll token of the stop eventfd.
const STOP: u64 = u64::MAX;

/// The notification eventfds of one device and its worker.
#[derive(Debug)]
pub(super) struct QueueNotifier {
    queues: Vec<EventFd>,
    stop: EventFd,
    /// Where BAR0's ioeventfds are registered (BAR0's address), if anywhere.
    at: Option<u64>,
}

impl QueueNotifier {
    /// Starts a worker that serves `device`'s queue N when eventfd N fires.
    pub(super) fn start(device: Weak<std::sync::Mutex<dyn PciDevice>>, queues: usize) -> io::Result<Self> {
        let fds = (0..queues).map(|_| EventFd::new(EFD_NONBLOCK)).collect::<io::Result<Vec<_>>>()?;
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        for (q, fd) in fds.iter().enumerate() {
            epoll.ctl(ControlOperation::Add, fd.as_raw_fd(), EpollEvent::new(EventSet::IN, q as u64))?;
        }
        epoll.ctl(ControlOperation::Add, stop.as_raw_fd(), EpollEvent::new(EventSet::IN, STOP))?;
        let worker_fds = fds.iter().map(EventFd::try_clone).collect::<io::Result<Vec<_>>>()?;
        thread::Builder::new().name("virtio-queues".into()).spawn(move || serve(&epoll, &worker_fds, &device))?;
        Ok(Self { queues: fds, stop, at: None })
    }

    /// The eventfds alone, served by someone else (a vhost-user backend).
    pub(super) fn without_worker(queues: usize) -> io::Result<Self> {
        let queues = (0..queues).map(|_| EventFd::new(EFD_NONBLOCK)).collect::<io::Result<Vec<_>>>()?;
        Ok(Self { queues, stop: EventFd::new(EFD_NONBLOCK)?, at: None })
    }

    /// Queue N's eventfd.
    pub(super) fn eventfds(&self) -> &[EventFd] {
        &self.queues
    }

    /// Puts the ioeventfds where BAR0 now decodes (`None`: nowhere),
    /// removing them from where it decoded before.
    pub(super) fn follow_bar(&mut self, vm: &Vm, bar: Option<u64>) {
        if self.at == bar {
            return;
        }
        if let Some(old) = self.at.take() {
            for (q, fd) in self.queues.iter().enumerate() {
                if let Err(e) = vm.remove_ioeventfd(IoSpace::Mmio, notify_address(old, q), None, fd) {
                    log::warn!("pci: queue {q}: cannot remove the ioeventfd at {:#x}: {e}", notify_address(old, q));
                }
            }
        }
        let Some(bar) = bar else { return };
        self.at = Some(bar);
        for (q, fd) in self.queues.iter().enumerate() {
            let addr = notify_address(bar, q);
            if let Err(e) = vm.ioeventfd(IoSpace::Mmio, addr, None, fd) {
                // The MMIO handler still serves the register, with an exit.
                log::warn!("pci: no ioeventfd for queue {q} at {addr:#x}: {e}");
            }
        }
    }
}

/// Queue `q`'s notify register when BAR0 is at `bar`.
fn notify_address(bar: u64, q: usize) -> u64 {
    bar + NOTIFY_OFFSET + q as u64 * u64::from(NOTIFY_OFF_MULTIPLIER)
}

impl Drop for QueueNotifier {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
    }
}

/// The worker: waits for notifications and serves them through the
/// device's notify register, as the vCPU would have.
fn serve(epoll: &Epoll, fds: &[EventFd], device: &Weak<std::sync::Mutex<dyn PciDevice>>) {
    let mut events = vec![EpollEvent::default(); fds.len() + 1];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("pci: virtio queue worker stops: {e}");
                return;
            }
        };
        for event in &events[..n] {
            let q = event.data();
            let Some(fd) = usize::try_from(q).ok().and_then(|q| fds.get(q)) else { return };
            let _ = fd.read();
            let Some(device) = device.upgrade() else { return };
            let offset = NOTIFY_OFFSET + q * u64::from(NOTIFY_OFF_MULTIPLIER);
            device.lock().unwrap_or_else(|e| e.into_inner()).bar_write(0, offset, &(q as u16).to_le_bytes());
        }
    }
}
