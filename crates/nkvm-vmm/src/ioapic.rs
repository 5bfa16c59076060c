//! The IOAPIC in the VMM process: the `nkvm_devices` model's registers on an
//! MMIO handler, its interrupt messages and the local APICs' EOIs on an
//! APIC-bus socket pair (the same protocol as `nkvm device --model ioapic`,
//! without the second process). Devices in this process drive its pins
//! through [`IoapicPins::line`].

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread;

use nkvm::io::IoRange;
use nkvm::Vm;
use nkvm_devices::ioapic::{Ioapic, IOAPIC_SIZE};
use nkvm_devices::{ApicBusSink, IrqLine};
use nkvm_wire::apic::{self, ApicFrame, InterruptMessage};
use nkvm_wire::handshake::VersionRange;

use crate::devices::InProcess;

/// Errors attaching the IOAPIC.
#[derive(Debug, thiserror::Error)]
pub enum IoapicError {
    /// The APIC-bus socket pair or its EOI thread could not be set up.
    #[error("cannot set up the IOAPIC's APIC-bus socket")]
    Socket(#[source] std::io::Error),
    /// The IOAPIC side of the APIC-bus handshake failed.
    #[error("the IOAPIC's APIC-bus handshake failed")]
    Handshake(#[source] nkvm_wire::WireError),
    /// The thread running the IOAPIC side of the handshake panicked.
    #[error("the IOAPIC's APIC-bus handshake thread panicked")]
    HandshakeThread,
    /// The VM refused the APIC bus (it needs a split irqchip).
    #[error(transparent)]
    Bus(#[from] nkvm::irq::IrqError),
    /// The register window could not be attached.
    #[error(transparent)]
    Attach(#[from] nkvm::IoRegionError),
}

/// The IOAPIC end of the APIC bus: interrupt messages go out on it.
struct BusWriter(UnixStream);

impl ApicBusSink for BusWriter {
    fn send(&mut self, message: InterruptMessage) {
        if let Err(e) = self.0.write_all(&message.encode()) {
            log::error!("IOAPIC: cannot send {message:?} on the APIC bus: {e}");
        }
    }
}

type SharedIoapic = Arc<Mutex<Ioapic<BusWriter>>>;

/// The input pins of an IOAPIC attached by [`attach`].
#[derive(Clone)]
pub struct IoapicPins(SharedIoapic);

impl std::fmt::Debug for IoapicPins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IoapicPins")
    }
}

impl IoapicPins {
    /// An interrupt line driving `pin` (for a device model's `IrqLine`).
    pub fn line(&self, pin: usize) -> Box<dyn IrqLine> {
        let ioapic = self.0.clone();
        Box::new(move |level: bool| ioapic.lock().unwrap_or_else(|p| p.into_inner()).set_irq(pin, level))
    }
}

/// Puts an IOAPIC's registers at `base` in `vm` (which needs a split
/// irqchip) and connects it to the local APICs; returns its pins.
pub fn attach(vm: &Vm, base: u64) -> Result<IoapicPins, IoapicError> {
    let (vm_end, dev_end) = UnixStream::pair().map_err(IoapicError::Socket)?;
    let mut reader = dev_end.try_clone().map_err(IoapicError::Socket)?;
    // Both ends handshake at once: the device end on a thread.
    let device = thread::Builder::new()
        .name("nkvm-ioapic-hello".into())
        .spawn(move || {
            let mut writer = dev_end;
            apic::device_handshake(&mut reader, &mut writer, VersionRange::CURRENT).map(|_| (reader, writer))
        })
        .map_err(IoapicError::Socket)?;
    let attached = vm.attach_apic_bus(vm_end);
    // A failed VM side has closed its end, so the device side returns too.
    let handshake = device.join();
    attached?;
    let (mut reader, writer) = handshake.map_err(|_| IoapicError::HandshakeThread)?.map_err(IoapicError::Handshake)?;

    let ioapic: SharedIoapic = Arc::new(Mutex::new(Ioapic::new(BusWriter(writer))));
    let eoi_target = ioapic.clone();
    thread::Builder::new()
        .name("nkvm-ioapic-eoi".into())
        .spawn(move || loop {
            match apic::read_frame(&mut reader) {
                Ok(Some(ApicFrame::Eoi(e))) => {
                    eoi_target.lock().unwrap_or_else(|p| p.into_inner()).end_of_interrupt(e.vector)
                }
                Ok(Some(other)) => return log::error!("IOAPIC: unexpected {other:?} on the APIC bus"),
                Ok(None) => return,
                Err(e) => return log::error!("IOAPIC: APIC bus: {e}"),
            }
        })
        .map_err(IoapicError::Socket)?;
    vm.attach_handler(IoRange::mmio(base, IOAPIC_SIZE), Box::new(InProcess(ioapic.clone())))?;
    Ok(IoapicPins(ioapic))
}
