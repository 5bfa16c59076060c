//! What a PC BIOS leaves behind when it hands a multiboot kernel the CPU,
//! for the kvm-unit-tests machine (QEMU + SeaBIOS `-kernel`): tests such as
//! `realmode` go back to real mode and rely on it. Not set up for Linux
//! boots, which start in long mode and program the timer and 8259s
//! themselves.
//!
//! | what | state, as SeaBIOS leaves it |
//! |---|---|
//! | 8259s | initialised: ICW4 8086 mode, vectors 0x08-0x0f (master) and 0x70-0x77 (slave), all masked but IRQ 0 (timer) and IRQ 2 (cascade) |
//! | 8254 counter 0 | mode 3, count 0: IRQ 0 at 18.2 Hz |
//! | real-mode IVT (0-0x3ff) | vectors 0x08-0x0f: a handler that sends the master a non-specific EOI; 0x70-0x77: the slave and master; the rest: `iret` |
//! | handlers | in the BIOS segment 0xf000 (0xf0000-0xfffff, free RAM on this machine), the `iret` at SeaBIOS's 0xf000:0xff53 |
//!
//! The 8259's INTR goes to the boot vCPU's LINT0 (virtual-wire mode, which
//! KVM's local APIC reset state selects): on a rising INTR a thread runs the
//! INTA cycle and queues the vector on that LINT0 ([`nkvm::Lint`]), which
//! delivers it when the guest can take it. The PIT is polled by a thread of
//! its own ([`spawn_pit_timer`]).
//!
//! Both threads follow a restored state ([`SavedPic`], [`SavedPit`]): the
//! PIC's restore raises INTR again if the saved one was up, and the PIT's
//! restore wakes its thread, which polls the restored counters and re-arms
//! on their next edge. No INTA cycle runs before the boot vCPU exists, so a
//! machine restored before its vCPUs are created neither loses a restored
//! request nor delivers a tick of its fresh PIT; one restored after, can
//! hold the INTA cycle until the PIC's state is in ([`SavedPic::hold`]).

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::Duration;

use nkvm::{GuestAddress, Lint, MemoryError, Vm};
use nkvm_devices::pic::{Pic, SharedPic};
use nkvm_devices::pit::SharedPit;
use nkvm_devices::{IoDevice, Snapshot};

use crate::saved::{LoadError, SavedDevice};

/// The BIOS code segment the IVT's handlers live in.
pub const BIOS_SEGMENT: u16 = 0xf000;
/// The offset of the bare `iret` handler (SeaBIOS's `entry_iret_official`).
pub const IRET_OFFSET: u16 = 0xff53;
/// The offset of the master's EOI handler (vectors 0x08-0x0f).
pub const MASTER_HANDLER_OFFSET: u16 = 0xfe00;
/// The offset of the slave's EOI handler (vectors 0x70-0x77).
pub const SLAVE_HANDLER_OFFSET: u16 = 0xfe10;
/// The master 8259's first vector.
pub const MASTER_VECTOR_BASE: u8 = 0x08;
/// The slave 8259's first vector.
pub const SLAVE_VECTOR_BASE: u8 = 0x70;
/// The master's interrupt mask: only IRQ 0 (timer) and IRQ 2 (cascade) open.
pub const MASTER_MASK: u8 = !0b101;
/// The slave's interrupt mask: all masked.
pub const SLAVE_MASK: u8 = 0xff;

/// `push ax; mov al, 0x20; out 0x20, al; pop ax; iret`.
const MASTER_HANDLER: [u8; 7] = [0x50, 0xb0, 0x20, 0xe6, 0x20, 0x58, 0xcf];
/// `push ax; mov al, 0x20; out 0xa0, al; out 0x20, al; pop ax; iret`.
const SLAVE_HANDLER: [u8; 9] = [0x50, 0xb0, 0x20, 0xe6, 0xa0, 0xe6, 0x20, 0x58, 0xcf];
const IRET: u8 = 0xcf;

/// The real-mode IVT the table describes, as 256 far pointers.
pub fn ivt() -> Vec<u8> {
    (0..=255u8)
        .flat_map(|vector| {
            let offset = match vector {
                v if v & !7 == MASTER_VECTOR_BASE => MASTER_HANDLER_OFFSET,
                v if v & !7 == SLAVE_VECTOR_BASE => SLAVE_HANDLER_OFFSET,
                _ => IRET_OFFSET,
            };
            (u32::from(offset) | (u32::from(BIOS_SEGMENT) << 16)).to_le_bytes()
        })
        .collect()
}

/// Writes the IVT at 0 and its handlers in the BIOS segment.
pub fn install_ivt(vm: &Vm) -> Result<(), MemoryError> {
    let at = |offset: u16| GuestAddress((u64::from(BIOS_SEGMENT) << 4) + u64::from(offset));
    vm.write_memory(GuestAddress(0), &ivt())?;
    vm.write_memory(at(MASTER_HANDLER_OFFSET), &MASTER_HANDLER)?;
    vm.write_memory(at(SLAVE_HANDLER_OFFSET), &SLAVE_HANDLER)?;
    vm.write_memory(at(IRET_OFFSET), &[IRET])
}

/// Initialises both 8259s as the BIOS does (through their ports, as a BIOS
/// would): edge-triggered, cascaded, 8086 mode, the vectors and masks above.
pub fn init_pic(pic: &SharedPic) {
    let (mut master, mut slave) = (pic.master_port(), pic.slave_port());
    master.write(0, &[0x11]);
    slave.write(0, &[0x11]);
    master.write(1, &[MASTER_VECTOR_BASE]);
    slave.write(1, &[SLAVE_VECTOR_BASE]);
    master.write(1, &[0x04]);
    slave.write(1, &[0x02]);
    master.write(1, &[0x01]);
    slave.write(1, &[0x01]);
    master.write(1, &[MASTER_MASK]);
    slave.write(1, &[SLAVE_MASK]);
}

/// The boot vCPU's LINT0, filled in once that vCPU exists.
pub type BootLint = Arc<OnceLock<Lint>>;

/// How often the INTA thread looks again at an INTR it left pending.
const INTA_RETRY: Duration = Duration::from_millis(10);

/// A dual 8259 whose INTR feeds `lint`: on each rising INTR a thread
/// acknowledges the PIC and queues the vector on LINT0. Until the boot
/// vCPU exists (`lint` is set), and while `hold` is set, INTR is left
/// pending (nothing is acknowledged, so no vector is lost with its ISR bit
/// set) and looked at again every [`INTA_RETRY`].
pub fn pic_on_lint0(lint: BootLint, hold: Arc<AtomicBool>) -> std::io::Result<SharedPic> {
    let (intr_tx, intr_rx) = mpsc::channel::<()>();
    let pic = SharedPic::new(Pic::with_intr_line(Box::new(move |level: bool| {
        if level {
            let _ = intr_tx.send(());
        }
    })));
    let inta = pic.clone();
    // INTR rises under the PIC's lock; the INTA cycle takes that lock, so it
    // runs here. The thread holds the PIC, whose INTR line holds the
    // thread's sender: it lives as long as the process (one VM per `nkvm`).
    thread::Builder::new().name("pic-inta".into()).spawn(move || {
        let mut pending = false;
        loop {
            let woke = if pending {
                intr_rx.recv_timeout(INTA_RETRY)
            } else {
                intr_rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
            };
            if woke == Err(RecvTimeoutError::Disconnected) {
                return;
            }
            let mut p = inta.lock();
            let (Some(lint), false) = (lint.get(), hold.load(SeqCst)) else {
                pending = p.has_interrupt();
                continue;
            };
            if p.has_interrupt() {
                // Queued under the PIC's lock: whoever sets `hold` under it
                // knows every vector acknowledged so far is on LINT0.
                let vector = p.acknowledge();
                lint.raise_lint0(vector);
            }
            // INTR still up (auto-EOI sets no in-service bit, so another
            // request keeps it high): no new rising edge will say so, so it
            // is looked at again after the retry interval.
            pending = p.has_interrupt();
        }
    })?;
    Ok(pic)
}

/// The 8259 pair as a saved device: the model's state, and on restore the
/// INTA thread let go (see [`SavedPic::hold`]).
#[derive(Debug)]
pub struct SavedPic {
    /// The PIC.
    pub pic: SharedPic,
    /// The INTA thread's hold flag ([`pic_on_lint0`]).
    pub hold: Arc<AtomicBool>,
}

impl SavedPic {
    /// Holds the INTA cycle until the PIC's state is restored: what the
    /// fresh machine's devices raise before then queues nothing on LINT0.
    pub fn hold(&self) {
        self.hold.store(true, SeqCst);
    }
}

impl SavedDevice for SavedPic {
    fn save(&self) -> Result<Vec<u8>, String> {
        Ok(self.pic.lock().snapshot())
    }

    /// Held under the PIC's lock: a vector acknowledged before is on
    /// LINT0 already (the boot vCPU's saved state carries it), and none is
    /// acknowledged after, so none is lost with its in-service bit set.
    fn pause(&self) {
        let _pic = self.pic.lock();
        self.hold.store(true, SeqCst);
    }

    /// Let go: an INTR left pending meanwhile is acknowledged within
    /// [`INTA_RETRY`].
    fn resume(&self) {
        let _pic = self.pic.lock();
        self.hold.store(false, SeqCst);
    }

    fn restore(&self, name: &str, blob: &[u8]) -> Result<(), LoadError> {
        let mut pic = self.pic.lock();
        let restored = pic.restore(blob).map_err(|source| LoadError::Device { name: name.to_string(), source });
        // Under the lock: the INTA thread, woken by the restored INTR (or a
        // tick held back), sees the restored PIC and no hold.
        if restored.is_ok() {
            self.hold.store(false, SeqCst);
        }
        restored
    }
}

/// The PIT as a saved device; a restore wakes its timer thread, which
/// polls the restored counters and sleeps until their next edge.
#[derive(Debug)]
pub struct SavedPit {
    /// The PIT.
    pub pit: SharedPit,
    /// Wakes the thread [`spawn_pit_timer`] started.
    pub poke: Sender<()>,
}

impl SavedDevice for SavedPit {
    fn save(&self) -> Result<Vec<u8>, String> {
        Ok(self.pit.lock().snapshot())
    }

    fn restore(&self, name: &str, blob: &[u8]) -> Result<(), LoadError> {
        self.pit.lock().restore(blob).map_err(|source| LoadError::Device { name: name.to_string(), source })?;
        let _ = self.poke.send(());
        Ok(())
    }
}

/// Polls `pit` at the times it asks for, and again whenever `writes`
/// receives (a guest write reprogrammed it); ends when every sender of
/// `writes` is gone (the PIT's ports were dropped with the VM).
pub fn spawn_pit_timer(pit: SharedPit, writes: Receiver<()>) -> std::io::Result<()> {
    const IDLE: Duration = Duration::from_secs(3600);
    thread::Builder::new().name("pit".into()).spawn(move || loop {
        let wait = pit.lock().poll().unwrap_or(IDLE);
        match writes.recv_timeout(wait) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ivt_points_timer_and_slave_vectors_at_eoi_handlers() {
        let ivt = ivt();
        assert_eq!(ivt.len(), 1024);
        let entry = |v: usize| u32::from_le_bytes(ivt[v * 4..v * 4 + 4].try_into().unwrap());
        assert_eq!(entry(8), 0xf000_fe00);
        assert_eq!(entry(0x0f), 0xf000_fe00);
        assert_eq!(entry(0x70), 0xf000_fe10);
        assert_eq!(entry(0x77), 0xf000_fe10);
        assert_eq!(entry(0x10), 0xf000_ff53);
        assert_eq!(entry(0x78), 0xf000_ff53);
        assert_eq!(entry(0), 0xf000_ff53);
    }

    #[test]
    fn the_initialised_pic_delivers_only_the_timer() {
        let pic = SharedPic::new(Pic::new());
        init_pic(&pic);
        let mut p = pic.lock();
        p.set_irq(1, true);
        p.set_irq(8, true);
        assert!(!p.has_interrupt(), "IRQ 1 and the slave are masked");
        p.set_irq(0, true);
        assert!(p.has_interrupt());
        assert_eq!(p.acknowledge(), MASTER_VECTOR_BASE);
    }

    #[test]
    fn a_pic_paused_for_a_save_acknowledges_nothing_until_resumed() {
        let (lint, hold) = (BootLint::default(), Arc::new(AtomicBool::new(false)));
        let pic = pic_on_lint0(lint.clone(), hold.clone()).unwrap();
        init_pic(&pic);
        let hv = nkvm::Hypervisor::open().expect("this test needs /dev/kvm");
        let vm = Vm::new(&hv, &nkvm::VmConfig { vcpus: 1, memory: 1 << 20, ..Default::default() }).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let _ = lint.set(vcpu.lint());
        let saved = SavedPic { pic: pic.clone(), hold };
        saved.pause();
        // A tick while the vCPUs are paused for a save: left pending in
        // the 8259, so its state (saved after the vCPUs') still has it.
        pic.lock().set_irq(0, true);
        thread::sleep(Duration::from_millis(50));
        assert!(pic.lock().has_interrupt(), "acknowledged while paused for a save");
        saved.resume();
        let start = std::time::Instant::now();
        while pic.lock().has_interrupt() {
            assert!(start.elapsed() < Duration::from_secs(10), "never acknowledged after the resume");
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn no_inta_cycle_runs_while_held_or_before_the_boot_vcpu_exists() {
        let (lint, hold) = (BootLint::default(), Arc::new(AtomicBool::new(true)));
        let pic = pic_on_lint0(lint.clone(), hold.clone()).unwrap();
        init_pic(&pic);
        let saved = SavedPic { pic: pic.clone(), hold };
        // The saved machine: the timer's request up, not yet acknowledged.
        let source = SharedPic::new(Pic::new());
        init_pic(&source);
        source.lock().set_irq(0, true);
        let blob = source.lock().snapshot();
        // The fresh machine's own tick, while held: left pending.
        pic.lock().set_irq(0, true);
        thread::sleep(Duration::from_millis(50));
        assert!(pic.lock().has_interrupt(), "the held INTA cycle acknowledged a request");
        saved.restore("pic", &blob).unwrap();
        thread::sleep(Duration::from_millis(50));
        assert!(pic.lock().has_interrupt(), "acknowledged with no boot vCPU to take the vector");
        let hv = nkvm::Hypervisor::open().expect("this test needs /dev/kvm");
        let vm = Vm::new(&hv, &nkvm::VmConfig { vcpus: 1, memory: 1 << 20, ..Default::default() }).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let _ = lint.set(vcpu.lint());
        let start = std::time::Instant::now();
        while pic.lock().has_interrupt() {
            assert!(start.elapsed() < Duration::from_secs(10), "the restored request was never acknowledged");
            thread::sleep(Duration::from_millis(1));
        }
        assert!(saved.restore("pic", &blob[..blob.len() - 1]).is_err());
    }
}
