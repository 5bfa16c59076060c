//! The APIC bus: interrupt messages from an IOAPIC or PIC model to the
//! in-kernel local APICs, and EOIs back. Over a socket (a model in another
//! process, `docs/wire-format.md`; a thread of this process serves it, and
//! version 2 adds fast paths, `fast_path.rs`) or direct (a model in this
//! process: no socket, no thread).

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use nkvm_wire::apic::{DeliveryMode, DestinationMode, EoiMessage, InterruptMessage, TriggerMode};

use super::{fast_path, IrqError, IrqShared, MsiMessage};

/// Receives the local APICs' EOIs of level-triggered vectors on an APIC bus
/// whose IOAPIC or PIC model lives in this process (see
/// [`Vm::attach_apic_bus_in_process`](crate::Vm::attach_apic_bus_in_process)).
pub trait EoiHandler: Send {
    /// A local APIC ended the interrupt with `vector`. Called on the vCPU
    /// thread that saw the EOI, before that vCPU re-enters the guest; it may
    /// send on the [`ApicBus`] (a level line still asserted fires again).
    fn end_of_interrupt(&mut self, vector: u8);
}

impl<F: FnMut(u8) + Send> EoiHandler for F {
    fn end_of_interrupt(&mut self, vector: u8) {
        self(vector)
    }
}

/// The VM end of an APIC bus whose IOAPIC or PIC model lives in this
/// process: the direct path. [`send`](Self::send) delivers an interrupt
/// message to the local APICs at once, on the calling thread — no socket, no
/// thread hop — exactly as the socket path delivers a message read from its
/// peer (`docs/wire-format.md`); EOIs reach the model's [`EoiHandler`].
#[derive(Debug, Clone)]
pub struct ApicBus {
    fd: Arc<kvm_ioctls::VmFd>,
    irq: Arc<IrqShared>,
}

impl ApicBus {
    /// Delivers one interrupt message (what an IOAPIC or PIC puts on the
    /// bus): fixed, lowest-priority, NMI, INIT or SMI through
    /// `KVM_SIGNAL_MSI`, ExtINT through the destination's LINT0. Messages
    /// are delivered in the order they are sent.
    pub fn send(&self, message: &InterruptMessage) -> Result<(), IrqError> {
        deliver(&self.fd, &self.irq, message)
    }
}

/// Where the VM end of an APIC bus sends EOIs.
enum EoiPath {
    /// To the peer, on the bus socket.
    Socket(Mutex<nkvm_wire::spin::SpinStream>),
    /// To a model in this process, by a call.
    Direct(Mutex<Box<dyn EoiHandler>>),
}

impl std::fmt::Debug for EoiPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EoiPath::Socket(_) => "Socket",
            EoiPath::Direct(_) => "Direct",
        })
    }
}

/// The VM end of an APIC bus: where local APICs send EOIs.
#[derive(Debug)]
pub(crate) struct ApicBusEnd {
    eoi: EoiPath,
    pub(crate) failure: Mutex<Option<String>>,
    pub(crate) alive: AtomicBool,
    /// Interrupt frames received on the socket.
    messages: AtomicU64,
    /// Fast paths the peer holds.
    fast_paths: AtomicUsize,
    /// The socket (a handle of its own), shut down when the bus fails so
    /// the peer sees the end instead of writing into a socket nobody reads.
    socket: Option<UnixStream>,
    /// The bus thread has ended and taken the fast paths down: only then
    /// is a failure reported (the peer's eventfds inject nothing more).
    closed: AtomicBool,
}

/// How [`Vm::attach_apic_bus_with`](crate::Vm::attach_apic_bus_with) sets a
/// bus up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApicBusOptions {
    /// Offer the peer fast paths (protocol version 2, [`FAST_PATH_GSIS`](super::FAST_PATH_GSIS));
    /// on by default.
    pub fast_paths: bool,
}

impl Default for ApicBusOptions {
    fn default() -> Self {
        Self { fast_paths: true }
    }
}

/// What an APIC bus attached with [`Vm::attach_apic_bus`](crate::Vm::attach_apic_bus)
/// has carried so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ApicBusStats {
    /// Interrupt messages that came over the socket (each woke the bus
    /// thread).
    pub messages: u64,
    /// Messages the peer can deliver through an eventfd instead
    /// (APIC-bus protocol version 2; none with a version-1 peer).
    pub fast_paths: usize,
}

impl ApicBusEnd {
    fn new(eoi: EoiPath, socket: Option<UnixStream>) -> Self {
        Self {
            eoi,
            failure: Mutex::new(None),
            alive: AtomicBool::new(true),
            messages: AtomicU64::new(0),
            fast_paths: AtomicUsize::new(0),
            socket,
            closed: AtomicBool::new(false),
        }
    }

    /// Sends `frame` with `fd` attached, between whole EOI frames.
    pub(super) fn send_with_fd(&self, frame: &[u8], fd: std::os::fd::RawFd) -> std::io::Result<()> {
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let EoiPath::Socket(writer) = &self.eoi else {
            return Err(std::io::ErrorKind::Unsupported.into());
        };
        let w = writer.lock().unwrap_or_else(|p| p.into_inner());
        let sent = w.get_ref().send_with_fd(frame, fd).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        if sent != frame.len() {
            // Part of a frame is on the wire: the stream is broken.
            self.fail(format!("a fast-path offer went out cut short ({sent} of {} bytes)", frame.len()));
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        Ok(())
    }

    /// Broadcasts an EOI for `vector` to the IOAPIC side.
    pub(crate) fn eoi(&self, vector: u8) {
        if !self.alive.load(Ordering::SeqCst) {
            return;
        }
        match &self.eoi {
            EoiPath::Socket(writer) => {
                let frame = EoiMessage { vector }.encode();
                let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = std::io::Write::write_all(&mut *w, &frame) {
                    self.fail(format!("sending an EOI failed: {e}"));
                }
            }
            EoiPath::Direct(handler) => handler.lock().unwrap_or_else(|p| p.into_inner()).end_of_interrupt(vector),
        }
    }

    /// Ends the bus because its VM is going: the thread sees its socket
    /// shut down and ends, releasing the VM, whatever the peer does.
    pub(crate) fn close(&self) {
        self.alive.store(false, Ordering::SeqCst);
        if let Some(socket) = &self.socket {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Marks the bus dead; the first reason is the one kept (what follows
    /// a failure is usually its consequence).
    pub(crate) fn fail(&self, reason: String) {
        log::error!("APIC bus: {reason}");
        self.alive.store(false, Ordering::SeqCst);
        self.failure.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(reason);
        if let Some(socket) = &self.socket {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// How long the APIC bus's handshake, and one blocked EOI send, may take
/// before the peer counts as gone.
const BUS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl crate::Vm {
    /// Connects the local APICs to an IOAPIC/PIC model at the other end of
    /// `socket` (APIC-bus protocol, `docs/wire-format.md`): interrupt
    /// messages from it are delivered to the vCPUs, EOIs of level-triggered
    /// vectors are sent back. A thread serves the socket; if the peer dies or
    /// sends garbage, the bus is dropped and [`apic_bus_failure`](Self::apic_bus_failure)
    /// says why. A peer that speaks version 2 gets a fast path for each
    /// asserted edge-triggered fixed or lowest-priority message it sends
    /// (an eventfd that delivers that message with no thread of this
    /// process in between; [`FAST_PATH_GSIS`](super::FAST_PATH_GSIS), [`apic_bus_stats`](Self::apic_bus_stats)),
    /// taken down when the bus ends.
    pub fn attach_apic_bus(&self, socket: UnixStream) -> Result<(), IrqError> {
        self.attach_apic_bus_with(socket, ApicBusOptions::default())
    }

    /// [`attach_apic_bus`](Self::attach_apic_bus) with `options`: without
    /// fast paths the bus speaks version 1 only, and every message comes
    /// over the socket in the order it was sent (a fast path's message can
    /// overtake messages still in the socket).
    pub fn attach_apic_bus_with(&self, socket: UnixStream, options: ApicBusOptions) -> Result<(), IrqError> {
        use nkvm_wire::handshake::VersionRange;
        use nkvm_wire::spin::Deadline;
        self.need_irqchip("an APIC bus")?;
        let attached = |bus: &Option<Arc<ApicBusEnd>>| bus.as_ref().is_some_and(|b| b.alive.load(Ordering::SeqCst));
        if attached(&self.irq.bus.read().unwrap_or_else(|p| p.into_inner())) {
            return Err(IrqError::BusAttached);
        }
        // A peer that never answers fails the attach; one that stops
        // reading fails the bus at an EOI, never blocking a vCPU for good.
        socket.set_read_timeout(Some(BUS_TIMEOUT)).map_err(IrqError::Socket)?;
        socket.set_write_timeout(Some(BUS_TIMEOUT)).map_err(IrqError::Socket)?;
        // After each message, poll briefly before blocking: interrupts come
        // in bursts, and a wake-up costs ~40 us on a nested host.
        let (mut reader, mut writer) = nkvm_wire::spin::SpinStream::pair(socket, std::time::Duration::from_micros(50))
            .map_err(IrqError::Socket)?;
        let versions = if options.fast_paths { VersionRange::APIC_BUS } else { VersionRange::CURRENT };
        // Not under the bus lock: EOIs of a bus being replaced do not wait
        // on it. One deadline for the whole hello-ack, however it is cut up.
        reader.begin();
        let handshake = nkvm_wire::apic::vm_handshake(&mut reader, &mut writer, 1, versions);
        reader.end();
        let handshake = handshake.map_err(IrqError::Handshake)?;
        // The bus thread waits for messages as long as it takes.
        reader.get_ref().set_read_timeout(None).map_err(IrqError::Socket)?;
        let mut bus = self.irq.bus.write().unwrap_or_else(|p| p.into_inner());
        if attached(&bus) {
            return Err(IrqError::BusAttached);
        }
        let control = writer.get_ref().try_clone().map_err(IrqError::Socket)?;
        let end = Arc::new(ApicBusEnd::new(EoiPath::Socket(Mutex::new(writer)), Some(control)));
        *bus = Some(end.clone());
        let (fd, irq) = (self.fd.clone(), self.irq.clone());
        std::thread::Builder::new()
            .name("nkvm-apic-bus".into())
            .spawn(move || serve_bus(&mut reader, &fd, &irq, &end, handshake.version))
            .map_err(IrqError::Socket)?;
        Ok(())
    }

    /// Connects the local APICs to an IOAPIC or PIC model in this process,
    /// with no socket and no thread between them (the direct path of the
    /// APIC bus): the model sends its interrupt messages through the
    /// returned [`ApicBus`], and `eoi` receives the EOIs of level-triggered
    /// vectors on the vCPU thread that saw them. The bus stays for the
    /// VM's lifetime.
    ///
    /// ```no_run
    /// # fn f(vm: &nkvm::Vm) -> Result<(), nkvm::irq::IrqError> {
    /// use nkvm_wire::apic::{DeliveryMode, DestinationMode, InterruptMessage, TriggerMode};
    /// let bus = vm.attach_apic_bus_in_process(Box::new(|vector: u8| println!("EOI {vector:#x}")))?;
    /// bus.send(&InterruptMessage {
    ///     destination: 0,
    ///     destination_mode: DestinationMode::Physical,
    ///     delivery_mode: DeliveryMode::Fixed,
    ///     vector: 0x40,
    ///     trigger_mode: TriggerMode::Edge,
    ///     level: true,
    /// })?;
    /// # Ok(()) }
    /// ```
    pub fn attach_apic_bus_in_process(&self, eoi: Box<dyn EoiHandler>) -> Result<ApicBus, IrqError> {
        self.need_irqchip("an APIC bus")?;
        let mut bus = self.irq.bus.write().unwrap_or_else(|p| p.into_inner());
        if bus.as_ref().is_some_and(|b| b.alive.load(Ordering::SeqCst)) {
            return Err(IrqError::BusAttached);
        }
        *bus = Some(Arc::new(ApicBusEnd::new(EoiPath::Direct(Mutex::new(eoi)), None)));
        Ok(ApicBus { fd: self.fd.clone(), irq: self.irq.clone() })
    }

    /// What the APIC bus attached with [`attach_apic_bus`](Self::attach_apic_bus)
    /// has carried (`None` without one, or with one in this process).
    pub fn apic_bus_stats(&self) -> Option<ApicBusStats> {
        let bus = self.irq.bus.read().unwrap_or_else(|p| p.into_inner());
        let end = bus.as_ref().filter(|b| matches!(b.eoi, EoiPath::Socket(_)))?;
        Some(ApicBusStats {
            messages: end.messages.load(Ordering::Relaxed),
            fast_paths: end.fast_paths.load(Ordering::Relaxed),
        })
    }

    /// Why the APIC bus was dropped, once it has been: its thread has
    /// ended and the fast paths it gave the peer inject nothing more.
    pub fn apic_bus_failure(&self) -> Option<String> {
        let end = self.irq.bus.read().unwrap_or_else(|p| p.into_inner()).clone()?;
        if end.socket.is_some() && !end.closed.load(Ordering::SeqCst) {
            return None;
        }
        let failure = end.failure.lock().unwrap_or_else(|p| p.into_inner()).clone();
        failure
    }
}

/// The APIC-bus thread: interrupt messages in, delivered to the vCPUs; with
/// a version-2 peer, each deliverable edge message is also offered a fast
/// path. When the bus ends, its fast paths go with it.
fn serve_bus(
    reader: &mut nkvm_wire::spin::SpinStream,
    fd: &kvm_ioctls::VmFd,
    irq: &Arc<IrqShared>,
    end: &ApicBusEnd,
    version: u16,
) {
    use nkvm_wire::apic::{read_frame, ApicFrame};
    let mut fast = fast_path::FastPaths::default();
    loop {
        let message = match read_frame(reader) {
            Ok(Some(ApicFrame::Interrupt(m))) => m,
            Ok(Some(other)) => {
                end.fail(format!("unexpected {other:?} from the APIC-bus peer"));
                break;
            }
            Ok(None) => {
                end.fail("the APIC-bus peer closed the connection".into());
                break;
            }
            // A peer that closes with EOIs unread resets the connection.
            Err(nkvm_wire::WireError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                end.fail("the APIC-bus peer closed the connection (reset)".into());
                break;
            }
            Err(e) => {
                end.fail(format!("malformed APIC-bus message: {e}"));
                break;
            }
        };
        end.messages.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = deliver(fd, irq, &message) {
            log::warn!("APIC bus: cannot deliver {message:?}: {e}");
        }
        if version >= 2 && fast.offer(&message, fd, irq, end) {
            end.fast_paths.fetch_add(1, Ordering::Relaxed);
        }
    }
    fast.close(fd, irq);
    end.closed.store(true, Ordering::SeqCst);
}

fn deliver(fd: &kvm_ioctls::VmFd, irq: &Arc<IrqShared>, m: &InterruptMessage) -> Result<(), IrqError> {
    match m.delivery_mode {
        DeliveryMode::ExtInt => {
            if let Some(lint) = irq.lint(m.destination) {
                lint.raise_lint0(m.vector);
            }
            return Ok(());
        }
        DeliveryMode::Nmi if m.destination_mode == DestinationMode::Physical => {
            if let Some(lint) = irq.lint(m.destination) {
                lint.nmi();
                return Ok(());
            }
        }
        _ => {}
    }
    if m.trigger_mode == TriggerMode::Level && !m.level {
        return Ok(()); // a deassert: nothing travels on a real APIC bus
    }
    let msi = MsiMessage::from_interrupt(m);
    if m.trigger_mode == TriggerMode::Level {
        irq.route_level(fd, msi, true)?;
    }
    fd.signal_msi(msi.to_kvm()).map_err(|source| IrqError::Kvm { op: "KVM_SIGNAL_MSI", source })?;
    Ok(())
}
