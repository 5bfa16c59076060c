//! The IOAPIC in the VMM process: the `nkvm_devices` model's registers on an
//! MMIO handler, its interrupt messages and the local APICs' EOIs on the
//! APIC bus's direct path ([`Vm::attach_apic_bus_in_process`]): a raised
//! pin reaches the local APICs on the raising thread, with no socket or
//! thread between them (`nkvm device --model ioapic` speaks the same bus
//! over a socket). Devices in this process drive its pins through
//! [`IoapicPins::line`].

use std::sync::{Arc, Mutex, OnceLock, Weak};

use nkvm::io::IoRange;
use nkvm::irq::ApicBus;
use nkvm::Vm;
use nkvm_devices::ioapic::{Ioapic, IOAPIC_SIZE};
use nkvm_devices::{ApicBusSink, IrqLine};
use nkvm_wire::apic::InterruptMessage;

use crate::devices::InProcess;

/// Errors attaching the IOAPIC.
#[derive(Debug, thiserror::Error)]
pub enum IoapicError {
    /// The VM refused the APIC bus (it needs a split irqchip).
    #[error(transparent)]
    Bus(#[from] nkvm::irq::IrqError),
    /// The register window could not be attached.
    #[error(transparent)]
    Attach(#[from] nkvm::IoRegionError),
}

/// The IOAPIC's end of the APIC bus: interrupt messages go out on it.
struct BusSender(ApicBus);

impl ApicBusSink for BusSender {
    fn send(&mut self, message: InterruptMessage) {
        if let Err(e) = self.0.send(&message) {
            log::error!("IOAPIC: cannot deliver {message:?}: {e}");
        }
    }
}

type SharedIoapic = Arc<Mutex<Ioapic<BusSender>>>;

/// The input pins of an IOAPIC attached by [`attach`].
#[derive(Clone)]
pub struct IoapicPins(SharedIoapic);

impl std::fmt::Debug for IoapicPins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IoapicPins")
    }
}

impl IoapicPins {
    /// The model as one of the machine's saved devices: its state, and
    /// its deliveries held while the machine pauses (see
    /// `nkvm_devices::ioapic::Ioapic::hold`).
    pub fn saved(&self) -> SavedIoapic {
        SavedIoapic(self.0.clone())
    }

    /// An interrupt line driving `pin` (for a device model's `IrqLine`).
    pub fn line(&self, pin: usize) -> Box<dyn IrqLine> {
        let ioapic = self.0.clone();
        Box::new(move |level: bool| ioapic.lock().unwrap_or_else(|p| p.into_inner()).set_irq(pin, level))
    }
}

/// The IOAPIC as a saved device ([`IoapicPins::saved`]).
pub struct SavedIoapic(SharedIoapic);

impl std::fmt::Debug for SavedIoapic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SavedIoapic")
    }
}

impl SavedIoapic {
    fn lock(&self) -> std::sync::MutexGuard<'_, Ioapic<BusSender>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl crate::saved::SavedDevice for SavedIoapic {
    fn save(&self) -> Result<Vec<u8>, String> {
        use nkvm_devices::Snapshot;
        Ok(self.lock().snapshot())
    }

    fn restore(&self, name: &str, blob: &[u8]) -> Result<(), crate::saved::LoadError> {
        use nkvm_devices::Snapshot;
        let mut ioapic = self.lock();
        ioapic.restore(blob).map_err(|source| crate::saved::LoadError::Device { name: name.to_string(), source })?;
        // What the saved one held (pending edges) goes out now.
        ioapic.hold(false);
        Ok(())
    }

    /// Under the IOAPIC's lock, and its sends are synchronous
    /// (`KVM_SIGNAL_MSI`): every interrupt sent before is in a local APIC
    /// before any vCPU reads its own.
    fn pause(&self) {
        self.lock().hold(true);
    }

    fn resume(&self) {
        self.lock().hold(false);
    }
}

/// Puts an IOAPIC's registers at `base` in `vm` (which needs a split
/// irqchip) and connects it to the local APICs; returns its pins.
pub fn attach(vm: &Vm, base: u64) -> Result<IoapicPins, IoapicError> {
    // The bus needs the EOI target before the model (which needs the bus)
    // exists; a weak reference keeps the VM from owning the model in a cycle.
    let eoi_target: Arc<OnceLock<Weak<Mutex<Ioapic<BusSender>>>>> = Arc::default();
    let target = eoi_target.clone();
    let bus = vm.attach_apic_bus_in_process(Box::new(move |vector: u8| {
        if let Some(ioapic) = target.get().and_then(Weak::upgrade) {
            ioapic.lock().unwrap_or_else(|p| p.into_inner()).end_of_interrupt(vector);
        }
    }))?;
    let ioapic: SharedIoapic = Arc::new(Mutex::new(Ioapic::new(BusSender(bus))));
    let _ = eoi_target.set(Arc::downgrade(&ioapic));
    vm.attach_handler(IoRange::mmio(base, IOAPIC_SIZE), Box::new(InProcess(ioapic.clone())))?;
    Ok(IoapicPins(ioapic))
}
