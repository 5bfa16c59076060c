//! The PC the kvm-unit-tests x86 suite expects around a multiboot kernel,
//! as QEMU gives it with `-device pc-testdev -device isa-debug-exit`: each
//! piece an `nkvm_devices` model on an nkvm I/O region. With
//! `--device-process` the CMOS, the PM timer and the I/O RAM each run in
//! their own process.
//!
//! | ports / address | model |
//! |---|---|
//! | 0x70-0x71 | CMOS/RTC (its alarm wakes the machine from S3, [`crate::sleep`]) |
//! | 0x20-0x21, 0xa0-0xa1 | the 8259s, initialised as a BIOS leaves them; INTR on the boot vCPU's LINT0 |
//! | 0x40-0x43, 0x61 | the 8254 PIT (counter 0 at 18.2 Hz on IRQ 0) and its port 0x61 bits |
//! | 0x92 | system control port A (A20, fast reset) |
//! | 0xe0-0xeb | pc-testdev: scratch register, flush-page port |
//! | 0xf4-0xf7 | isa-debug-exit: a write of `v` ends nkvm with status `(v << 1) \| 1` |
//! | 0x4d0-0x4d1 | ELCR |
//! | 0x510-0x511 | fw_cfg: CPU count, RAM size |
//! | 0x608-0x60b | ACPI PM timer (named in the FADT) |
//! | 0x2000-0x2017 | pc-testdev: 24 interrupt lines into the IOAPIC's pins |
//! | 0xff00_0000 + 64 KiB | pc-testdev: RAM-like memory served by MMIO exits |
//! | 0-0x3ff, 0xf0000-0xfffff | the real-mode IVT and its handlers ([`crate::firmware`]) |
//!
//! # Saved state
//!
//! [`Platform::register_saved`] hands every in-process model to the
//! machine's [`SavedDevices`], under these names and in this order (no
//! restore needs a later one: fw_cfg first, so a machine configured
//! differently is refused before anything is touched; the PIC before the
//! PIT, which may raise a tick that was due):
//!
//! | name | model |
//! |---|---|
//! | `fw-cfg` | fw_cfg (refuses another CPU count or RAM size) |
//! | `pic` | the 8259 pair and its ELCR (restoring it lets the INTA thread go, [`firmware::SavedPic`]) |
//! | `pit` | the 8254 and port 0x61 (its thread re-arms on the restored counter, [`firmware::SavedPit`]) |
//! | `cmos` | CMOS/RTC and its alarm |
//! | `pm-timer` | the ACPI PM timer |
//! | `pc-testdev-ioram` | the I/O RAM |
//! | `port92` | system control port A |
//! | `isa-debug-exit` | isa-debug-exit (no state) |
//! | `pc-testdev-ports` | the scratch register |
//! | `pc-testdev-irq-lines` | the interrupt lines' levels |
//! | `acpi-s3` | refuses to save while the machine sleeps in S3 ([`crate::sleep`]) |
//!
//! With `--device-process`, the CMOS, the PM timer and the I/O RAM live in
//! device processes: their states are registered under the same names and
//! asked of the processes over their sockets ([`nkvm::Vm::region_state`]),
//! and a restore serves them in process. The boot
//! vCPU's LINT0 wiring ([`BootLint`]) and the real-mode IVT are not state
//! of these models: the machine builder sets them up again (the IVT is in
//! guest RAM, which travels on its own).

use std::sync::atomic::AtomicBool;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use nkvm::io::{IoHandler, IoRange, Ordering};
use nkvm::{GuestAddress, Vm};
use nkvm_devices::cmos::{Cmos, CMOS_PORT, CMOS_SIZE};
use nkvm_devices::debug_exit::{DebugExit, DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE};
use nkvm_devices::fw_cfg::{FwCfg, FwCfgConfig, FW_CFG_PORT, FW_CFG_SIZE};
use nkvm_devices::pc_testdev::{
    IoRam, TestdevIrqLines, TestdevPorts, IO_RAM_BASE, IO_RAM_SIZE, TESTDEV_IRQ_LINES_BASE, TESTDEV_IRQ_LINES_SIZE,
    TESTDEV_IRQ_LINE_COUNT, TESTDEV_PORTS_BASE, TESTDEV_PORTS_SIZE,
};
use nkvm_devices::pit::{Pit, PitWindow, SharedPit, PIT_IRQ, PIT_PORT, PIT_SIZE, SPEAKER_PORT, SPEAKER_SIZE};
use nkvm_devices::pm_timer::{PmTimer, PM_TIMER_SIZE};
use nkvm_devices::port92::{SystemControlA, SYSTEM_CONTROL_A_PORT, SYSTEM_CONTROL_A_SIZE};
use nkvm_devices::power::PowerEvent;

use crate::acpi;
use crate::cli::DeviceModel;
use crate::devices::{DeviceProcess, InProcess};
use crate::firmware::{self, BootLint, SavedPic, SavedPit};
use crate::ioapic::IoapicPins;
use crate::saved::{SavedDevice, SavedDevices};
use crate::sleep::{S3Guard, WakeSource};

/// Errors attaching the platform devices.
#[derive(Debug, thiserror::Error)]
pub enum TestdevError {
    /// A device's region could not be attached.
    #[error(transparent)]
    Attach(#[from] nkvm::IoRegionError),
    /// A device process could not be started.
    #[error(transparent)]
    DeviceProcess(#[from] crate::devices::DeviceProcessError),
    /// A pc-testdev interrupt line could not be connected.
    #[error("cannot connect a pc-testdev interrupt line")]
    Line(#[source] nkvm_devices::pc_testdev::PcTestdevError),
    /// The PIC's or the PIT's thread could not be started.
    #[error("cannot start the {0} thread")]
    Thread(&'static str, #[source] std::io::Error),
    /// The real-mode IVT could not be written.
    #[error("cannot write the real-mode interrupt vector table")]
    Ivt(#[source] nkvm::MemoryError),
}

/// What the devices need to know of the machine.
#[derive(Debug)]
pub struct Machine {
    /// vCPUs (fw_cfg's CPU count: the suite waits for that many APs).
    pub cpus: u32,
    /// RAM in bytes (fw_cfg's RAM size).
    pub memory: u64,
    /// Where the test-exit port and the fast-reset bit report.
    pub events: Sender<PowerEvent>,
    /// Run the models that need nothing of the VMM (CMOS, the PM timer,
    /// the I/O RAM) each in its own process (`nkvm device`).
    pub device_processes: bool,
    /// The boot vCPU's LINT0, where the 8259's INTR goes once it is set.
    pub boot_lint: BootLint,
}

/// What [`attach`] set up that the VMM keeps.
pub struct Platform {
    /// The device processes it started (they end when dropped).
    pub processes: Vec<DeviceProcess>,
    /// The S3 wake event: how long until the RTC alarm goes off. Never,
    /// when the CMOS runs in its own process (its alarm is not visible
    /// to the VMM).
    pub wake: WakeSource,
    /// The models whose state a snapshot takes.
    models: Models,
}

/// The in-process models, shared with the I/O regions that serve them.
struct Models {
    pic: Arc<SavedPic>,
    pit: Arc<SavedPit>,
    /// The CMOS, the PM timer and the I/O RAM in process, or their device
    /// processes' states.
    local: Result<LocalModels, RemoteModels>,
    port92: Arc<Mutex<SystemControlA>>,
    fw_cfg: Arc<Mutex<FwCfg>>,
    debug_exit: Arc<Mutex<DebugExit>>,
    testdev_ports: Arc<Mutex<TestdevPorts>>,
    irq_lines: Arc<Mutex<TestdevIrqLines>>,
    s3: Arc<S3Guard>,
}

/// The CMOS, the PM timer and the I/O RAM in their device processes, by
/// the name their state is saved under.
type RemoteModels = Vec<(&'static str, Arc<dyn SavedDevice>)>;

/// The models `--device-process` moves out of the VMM.
struct LocalModels {
    cmos: Arc<Mutex<Cmos>>,
    /// A clone of the attached timer: clones share their count.
    pm_timer: Arc<Mutex<PmTimer>>,
    io_ram: Arc<Mutex<IoRam>>,
}

impl std::fmt::Debug for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Platform").field("processes", &self.processes).finish_non_exhaustive()
    }
}

impl Platform {
    /// Registers every model with `saved`, under the names and in the
    /// order of the [module documentation](self), those in device
    /// processes included.
    pub fn register_saved(&self, saved: &mut SavedDevices) {
        let m = &self.models;
        saved.add_shared("fw-cfg", m.fw_cfg.clone());
        saved.add("pic", m.pic.clone());
        saved.add("pit", m.pit.clone());
        match &m.local {
            Ok(local) => {
                saved.add_shared("cmos", local.cmos.clone());
                saved.add_shared("pm-timer", local.pm_timer.clone());
                saved.add_shared("pc-testdev-ioram", local.io_ram.clone());
            }
            // Asked of the processes over their sockets; restored in process.
            Err(remote) => remote.iter().for_each(|(name, state)| saved.add(name, state.clone())),
        }
        saved.add_shared("port92", m.port92.clone());
        saved.add_shared("isa-debug-exit", m.debug_exit.clone());
        saved.add_shared("pc-testdev-ports", m.testdev_ports.clone());
        saved.add_shared("pc-testdev-irq-lines", m.irq_lines.clone());
        saved.add("acpi-s3", m.s3.clone());
    }

    /// On a machine about to be restored whose vCPUs are created before
    /// the restore: the 8259's INTA cycle waits until the `pic` state is
    /// restored, so what the fresh machine's PIT raises meanwhile queues
    /// nothing on the boot vCPU's LINT0. (Without vCPUs, no INTA cycle runs
    /// anyway: this is only needed when they exist first.)
    pub fn hold_interrupts_until_restored(&self) {
        self.models.pic.hold();
    }
}

/// Attaches every platform device of the kvm-unit-tests machine to `vm`;
/// the pc-testdev interrupt lines drive `ioapic`'s pins of the same number.
pub fn attach(vm: &Arc<Vm>, ioapic: &IoapicPins, machine: &Machine) -> Result<Platform, TestdevError> {
    let pio = |port: u16, size: u64| IoRange::pio(port, size as u16);
    let handler = |device: Box<dyn IoHandler>, range: IoRange| vm.attach_handler(range, device).map(|_| ());

    let debug_exit = Arc::new(Mutex::new(DebugExit::new(machine.events.clone())));
    handler(Box::new(InProcess(debug_exit.clone())), pio(DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE))?;
    let cpus = u16::try_from(machine.cpus).unwrap_or(u16::MAX);
    let fw_cfg = Arc::new(Mutex::new(FwCfg::new(FwCfgConfig { cpus, ram_size: machine.memory, max_ram: 0 })));
    handler(Box::new(InProcess(fw_cfg.clone())), pio(FW_CFG_PORT, FW_CFG_SIZE))?;
    let pm_timer = pio(acpi::PM_TIMER_PORT, PM_TIMER_SIZE);
    let cmos = pio(CMOS_PORT, CMOS_SIZE);
    let io_ram = IoRange::mmio(IO_RAM_BASE, IO_RAM_SIZE);
    let mut processes = Vec::new();
    let wake: WakeSource;
    let local = if machine.device_processes {
        let mut remote = RemoteModels::new();
        for (name, model, range) in [
            ("cmos", DeviceModel::Cmos, cmos),
            ("pm-timer", DeviceModel::PmTimer, pm_timer),
            ("pc-testdev-ioram", DeviceModel::IoRam, io_ram),
        ] {
            let process = DeviceProcess::attach(vm, model, range, Ordering::Sync)?;
            remote.push((name, process.saved(vm)));
            processes.push(process);
        }
        wake = WakeSource::never();
        Err(remote)
    } else {
        let timer = PmTimer::new();
        handler(Box::new(InProcess(timer.clone())), pm_timer)?;
        let rtc = Arc::new(Mutex::new(Cmos::new()));
        handler(Box::new(InProcess(rtc.clone())), cmos)?;
        let alarm = rtc.clone();
        wake = WakeSource::new(Box::new(move || alarm.lock().unwrap_or_else(|p| p.into_inner()).alarm_in()));
        let ram = Arc::new(Mutex::new(IoRam::new()));
        handler(Box::new(InProcess(ram.clone())), io_ram)?;
        Ok(LocalModels { cmos: rtc, pm_timer: Arc::new(Mutex::new(timer)), io_ram: ram })
    };
    let port92 = Arc::new(Mutex::new(SystemControlA::new(machine.events.clone())));
    handler(Box::new(InProcess(port92.clone())), pio(SYSTEM_CONTROL_A_PORT, SYSTEM_CONTROL_A_SIZE))?;

    let (pic, pit) = attach_timer(vm, machine.boot_lint.clone())?;

    // The flush-page port makes the host drop and rebuild its mapping of a
    // page, so KVM invalidates the guest's view of it.
    let memory_of = Arc::downgrade(vm);
    let flush = Box::new(move |gpa: u64| {
        if let Some(vm) = memory_of.upgrade() {
            if let Err(e) = vm.memory().drop_host_mapping(GuestAddress(gpa)) {
                log::warn!("pc-testdev: flush of page {gpa:#x}: {e}");
            }
        }
    });
    let testdev_ports = Arc::new(Mutex::new(TestdevPorts::new(flush)));
    handler(Box::new(InProcess(testdev_ports.clone())), pio(TESTDEV_PORTS_BASE, TESTDEV_PORTS_SIZE))?;
    let mut lines = TestdevIrqLines::new();
    for line in 0..TESTDEV_IRQ_LINE_COUNT {
        lines.connect(line, ioapic.line(line)).map_err(TestdevError::Line)?;
    }
    let irq_lines = Arc::new(Mutex::new(lines));
    handler(Box::new(InProcess(irq_lines.clone())), pio(TESTDEV_IRQ_LINES_BASE, TESTDEV_IRQ_LINES_SIZE))?;
    let s3 = Arc::new(wake.guard());
    let models = Models { pic, pit, local, port92, fw_cfg, debug_exit, testdev_ports, irq_lines, s3 };
    Ok(Platform { processes, wake, models })
}

/// The 8259s (INTR on `boot_lint`) and the PIT, as a BIOS leaves them, and
/// the real-mode IVT ([`crate::firmware`]). Tests in protected or long mode
/// mask the 8259s first thing; `realmode` waits for the tick.
fn attach_timer(vm: &Arc<Vm>, boot_lint: BootLint) -> Result<(Arc<SavedPic>, Arc<SavedPit>), TestdevError> {
    let pio = |port: u16, size: u64| IoRange::pio(port, size as u16);
    let handler = |device: Box<dyn IoHandler>, range: IoRange| vm.attach_handler(range, device).map(|_| ());
    let hold = Arc::new(AtomicBool::new(false));
    let pic = firmware::pic_on_lint0(boot_lint, hold.clone()).map_err(|e| TestdevError::Thread("pic-inta", e))?;
    firmware::init_pic(&pic);
    handler(Box::new(InProcess(pic.master_port())), pio(0x20, 2))?;
    handler(Box::new(InProcess(pic.slave_port())), pio(0xa0, 2))?;
    handler(Box::new(InProcess(pic.elcr_port())), pio(0x4d0, 2))?;
    let irq0 = pic.clone();
    let pit = SharedPit::new(Pit::new(Box::new(move |level: bool| irq0.lock().set_irq(PIT_IRQ, level))));
    pit.lock().program(0, 3, 0);
    let (writes, polls) = std::sync::mpsc::channel();
    for (window, range) in
        [(PitWindow::Counters, pio(PIT_PORT, PIT_SIZE)), (PitWindow::Speaker, pio(SPEAKER_PORT, SPEAKER_SIZE))]
    {
        let writes = writes.clone();
        let port = pit.port(
            window,
            Box::new(move || {
                let _ = writes.send(());
            }),
        );
        handler(Box::new(InProcess(port)), range)?;
    }
    firmware::spawn_pit_timer(pit.clone(), polls).map_err(|e| TestdevError::Thread("pit", e))?;
    firmware::install_ivt(vm).map_err(TestdevError::Ivt)?;
    Ok((Arc::new(SavedPic { pic, hold }), Arc::new(SavedPit { pit, poke: writes })))
}

#[cfg(test)]
mod tests;
