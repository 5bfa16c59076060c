//! The PC's two cascaded 8259A interrupt controllers: master at ports
//! 0x20-0x21, slave at 0xa0-0xa1 on the master's IRQ 2, and the edge/level
//! control registers (ELCR) at 0x4d0-0x4d1.
//!
//! [`Pic`] is the state machine. The VMM drives its inputs with
//! [`Pic::set_irq`], watches its INTR output with [`Pic::has_interrupt`] (or
//! an [`IrqLine`] given to [`Pic::with_intr_line`]) and runs the INTA cycle
//! with [`Pic::acknowledge`] when the vCPU takes the ExtINT interrupt.
//!
//! The three register windows are three regions, so three bus devices must
//! share one `Pic`: [`SharedPic`] holds it in an `Arc<Mutex<_>>` and hands out
//! [`PicPort`] devices for each window, while the VMM keeps a clone to raise
//! IRQs and acknowledge. (A lock is the simplest sound choice: the windows and
//! the interrupt sources may run on different vCPU threads.)
//!
//! Each port is one byte; a wider access touches consecutive ports, and
//! bytes past the 2-port window read as 0xff and are ignored on write.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::bus::{IoDevice, IrqLine};

mod chip;
mod snapshot;

use chip::Chip;

/// Size of each register window in ports.
pub const PIC_WINDOW_SIZE: u64 = 2;
/// Master command/data ports.
pub const MASTER_PORT: u64 = 0x20;
/// Slave command/data ports.
pub const SLAVE_PORT: u64 = 0xa0;
/// Edge/level control registers (master, slave).
pub const ELCR_PORT: u64 = 0x4d0;
/// The master input the slave is cascaded on.
pub const CASCADE_IRQ: usize = 2;

/// Which two-port register window a [`PicPort`] serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PicWindow {
    /// Master command (offset 0) and data (offset 1) ports.
    Master,
    /// Slave command and data ports.
    Slave,
    /// ELCR of the master (offset 0) and the slave (offset 1).
    Elcr,
}

/// The dual 8259A; see the [module documentation](self).
pub struct Pic {
    master: Chip,
    slave: Chip,
    intr: bool,
    intr_line: Option<Box<dyn IrqLine>>,
}

impl fmt::Debug for Pic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pic")
            .field("master", &self.master)
            .field("slave", &self.slave)
            .field("intr", &self.intr)
            .finish_non_exhaustive()
    }
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    /// Both chips uninitialised (as at power-on), all inputs low.
    pub fn new() -> Self {
        Self { master: Chip::new(true), slave: Chip::new(false), intr: false, intr_line: None }
    }

    /// Like [`Pic::new`], and drive `line` with each change of the INTR
    /// output. `line` runs with the `Pic` borrowed (or, in a [`SharedPic`],
    /// locked): it must not call back into the `Pic`.
    pub fn with_intr_line(line: Box<dyn IrqLine>) -> Self {
        Self { intr_line: Some(line), ..Self::new() }
    }

    /// Return both chips to their power-on state; input levels are kept.
    pub fn reset(&mut self) {
        self.master.reset();
        self.slave.reset();
        self.update();
    }

    /// Drive input `irq` (0-15; 8-15 are the slave's) to `level`. IRQ 2 is
    /// the cascade and cannot be driven (ISA IRQ 2 devices use IRQ 9).
    pub fn set_irq(&mut self, irq: usize, level: bool) {
        match irq {
            CASCADE_IRQ => log::debug!("pic: IRQ 2 is the cascade, ignored"),
            0..=7 => self.master.set_line(irq as u8, level),
            8..=15 => self.slave.set_line(irq as u8 - 8, level),
            _ => log::debug!("pic: set_irq on nonexistent IRQ {irq}"),
        }
        self.update();
    }

    /// The INTR output: an unmasked request outranks everything in service.
    pub fn has_interrupt(&self) -> bool {
        self.intr
    }

    /// The INTA cycle: mark the winning request in service and return its
    /// vector. With nothing pending, returns the spurious IRQ 7 vector of
    /// the chip involved (and sets no ISR bit), as the 8259A does.
    pub fn acknowledge(&mut self) -> u8 {
        let vector = match self.master.pending() {
            None => self.master.vector_base | 7,
            Some(irq) if usize::from(irq) == CASCADE_IRQ => {
                self.master.ack(irq);
                let vector = match self.slave.pending() {
                    Some(slave_irq) => {
                        self.slave.ack(slave_irq);
                        self.slave.vector_base | slave_irq
                    }
                    None => self.slave.vector_base | 7,
                };
                // The slave's INT drops during INTA; a request still pending
                // raises it again, giving the master a fresh edge.
                self.master.set_line(CASCADE_IRQ as u8, false);
                vector
            }
            Some(irq) => {
                self.master.ack(irq);
                self.master.vector_base | irq
            }
        };
        self.update();
        vector
    }

    /// Recompute the cascade input and the INTR output.
    fn update(&mut self) {
        let slave_out = self.slave.pending().is_some();
        self.master.set_line(CASCADE_IRQ as u8, slave_out);
        let intr = self.master.pending().is_some();
        if intr != self.intr {
            self.intr = intr;
            if let Some(line) = &self.intr_line {
                line.set_level(intr);
            }
        }
    }

    fn read_port(&mut self, window: PicWindow, offset: u64) -> u8 {
        let value = match (window, offset) {
            (PicWindow::Master, 0) => self.master.read_command(),
            (PicWindow::Master, 1) => self.master.imr,
            (PicWindow::Slave, 0) => self.slave.read_command(),
            (PicWindow::Slave, 1) => self.slave.imr,
            (PicWindow::Elcr, 0) => self.master.elcr,
            (PicWindow::Elcr, 1) => self.slave.elcr,
            _ => {
                log::debug!("pic: read past {window:?} window at offset {offset:#x}");
                return 0xff;
            }
        };
        self.update(); // a poll acknowledges
        value
    }

    fn write_port(&mut self, window: PicWindow, offset: u64, value: u8) {
        let chip = match (window, offset) {
            (PicWindow::Master, 0 | 1) => &mut self.master,
            (PicWindow::Slave, 0 | 1) => &mut self.slave,
            (PicWindow::Elcr, 0) => &mut self.master,
            (PicWindow::Elcr, 1) => &mut self.slave,
            _ => {
                log::debug!("pic: write past {window:?} window at offset {offset:#x}");
                return;
            }
        };
        match (window, offset) {
            (PicWindow::Elcr, _) => {
                chip.elcr = value & chip.elcr_mask();
                chip.resync_level_requests();
            }
            (_, 0) => chip.write_command(value),
            _ => chip.write_data(value),
        }
        self.update();
    }
}

/// A [`Pic`] shared between its three register windows and the VMM.
#[derive(Debug, Clone, Default)]
pub struct SharedPic(Arc<Mutex<Pic>>);

impl SharedPic {
    /// Share `pic`.
    pub fn new(pic: Pic) -> Self {
        Self(Arc::new(Mutex::new(pic)))
    }

    /// Lock the `Pic` to raise IRQs or acknowledge. A poisoned lock is
    /// recovered: the state is plain data.
    pub fn lock(&self) -> MutexGuard<'_, Pic> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The device for ports 0x20-0x21.
    pub fn master_port(&self) -> PicPort {
        self.port(PicWindow::Master)
    }

    /// The device for ports 0xa0-0xa1.
    pub fn slave_port(&self) -> PicPort {
        self.port(PicWindow::Slave)
    }

    /// The device for ports 0x4d0-0x4d1.
    pub fn elcr_port(&self) -> PicPort {
        self.port(PicWindow::Elcr)
    }

    /// The device for any window.
    pub fn port(&self, window: PicWindow) -> PicPort {
        PicPort { pic: self.clone(), window }
    }
}

/// One two-port register window of a [`SharedPic`], as a bus device.
#[derive(Debug, Clone)]
pub struct PicPort {
    pic: SharedPic,
    window: PicWindow,
}

impl IoDevice for PicPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut pic = self.pic.lock();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset.checked_add(i as u64).map_or(0xff, |port| pic.read_port(self.window, port));
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut pic = self.pic.lock();
        for (i, &byte) in data.iter().enumerate() {
            if let Some(port) = offset.checked_add(i as u64) {
                pic.write_port(self.window, port, byte);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::chip::Init;
    use super::*;

    const MASTER: PicWindow = PicWindow::Master;
    const SLAVE: PicWindow = PicWindow::Slave;

    /// Linux's init sequence: vectors 0x20/0x28, slave on IRQ 2, 8086 mode.
    fn init(pic: &mut Pic, icw4: u8) {
        for (window, base, cascade) in [(MASTER, 0x20, 0x04), (SLAVE, 0x28, 0x02)] {
            pic.write_port(window, 0, 0x11);
            pic.write_port(window, 1, base);
            pic.write_port(window, 1, cascade);
            pic.write_port(window, 1, icw4);
            pic.write_port(window, 1, 0x00); // OCW1: unmask all
        }
    }

    fn pic() -> Pic {
        let mut pic = Pic::new();
        init(&mut pic, 0x01);
        pic
    }

    fn eoi(pic: &mut Pic, window: PicWindow) {
        pic.write_port(window, 0, 0x20);
    }

    fn pulse(pic: &mut Pic, irq: usize) {
        pic.set_irq(irq, true);
        pic.set_irq(irq, false);
    }

    fn isr(pic: &mut Pic, window: PicWindow) -> u8 {
        pic.write_port(window, 0, 0x0b);
        pic.read_port(window, 0)
    }

    fn irr(pic: &mut Pic, window: PicWindow) -> u8 {
        pic.write_port(window, 0, 0x0a);
        pic.read_port(window, 0)
    }

    #[test]
    fn init_sequence_sets_vectors_and_masks() {
        let mut pic = Pic::new();
        init(&mut pic, 0x01);
        assert_eq!(pic.master.init, Init::Ready);
        assert_eq!((pic.master.vector_base, pic.slave.vector_base), (0x20, 0x28));
        pic.write_port(MASTER, 1, 0xfb);
        assert_eq!(pic.read_port(MASTER, 1), 0xfb);
        // Without ICW4 in single mode the sequence is ICW1, ICW2 only.
        pic.write_port(MASTER, 0, 0x12);
        pic.write_port(MASTER, 1, 0x08);
        assert_eq!(pic.master.init, Init::Ready);
        assert_eq!(pic.read_port(MASTER, 1), 0, "ICW1 clears the mask");
    }

    #[test]
    fn edge_irq_is_acknowledged_then_eoied() {
        let mut pic = pic();
        assert!(!pic.has_interrupt());
        pulse(&mut pic, 0);
        assert!(pic.has_interrupt());
        assert_eq!(irr(&mut pic, MASTER), 0x01);
        assert_eq!(pic.acknowledge(), 0x20);
        assert!(!pic.has_interrupt());
        assert_eq!(isr(&mut pic, MASTER), 0x01);
        assert_eq!(irr(&mut pic, MASTER), 0x00);
        eoi(&mut pic, MASTER);
        assert_eq!(isr(&mut pic, MASTER), 0x00);
    }

    #[test]
    fn priority_orders_and_nests_interrupts() {
        let mut pic = pic();
        pulse(&mut pic, 3);
        pulse(&mut pic, 1);
        assert_eq!(pic.acknowledge(), 0x21);
        assert!(!pic.has_interrupt(), "IRQ 3 waits for IRQ 1");
        pulse(&mut pic, 0);
        assert!(pic.has_interrupt(), "IRQ 0 preempts IRQ 1");
        assert_eq!(pic.acknowledge(), 0x20);
        eoi(&mut pic, MASTER); // ends IRQ 0, the highest in service
        assert_eq!(isr(&mut pic, MASTER), 0x02);
        assert!(!pic.has_interrupt());
        eoi(&mut pic, MASTER);
        assert_eq!(pic.acknowledge(), 0x23);
    }

    #[test]
    fn slave_interrupts_cascade_through_irq2() {
        let mut pic = pic();
        pulse(&mut pic, 12);
        assert!(pic.has_interrupt());
        assert_eq!(irr(&mut pic, MASTER), 0x04);
        assert_eq!(pic.acknowledge(), 0x2c);
        assert_eq!((isr(&mut pic, MASTER), isr(&mut pic, SLAVE)), (0x04, 0x10));
        pulse(&mut pic, 9);
        assert!(!pic.has_interrupt(), "IRQ 2 is in service on the master");
        eoi(&mut pic, SLAVE);
        eoi(&mut pic, MASTER);
        assert_eq!(pic.acknowledge(), 0x29);
        pic.set_irq(CASCADE_IRQ, true); // not drivable
        assert_eq!(irr(&mut pic, MASTER), 0);
    }

    #[test]
    fn specific_eoi_clears_the_named_level() {
        let mut pic = pic();
        pulse(&mut pic, 5);
        pic.acknowledge();
        pulse(&mut pic, 4);
        pic.acknowledge();
        assert_eq!(isr(&mut pic, MASTER), 0x30);
        pic.write_port(MASTER, 0, 0x65); // specific EOI, level 5
        assert_eq!(isr(&mut pic, MASTER), 0x10);
    }

    #[test]
    fn masked_requests_wait_in_irr() {
        let mut pic = pic();
        pic.write_port(MASTER, 1, 0x10);
        pulse(&mut pic, 4);
        assert!(!pic.has_interrupt());
        assert_eq!(irr(&mut pic, MASTER), 0x10);
        pic.write_port(MASTER, 1, 0x00);
        assert!(pic.has_interrupt());
        assert_eq!(pic.acknowledge(), 0x24);
        eoi(&mut pic, MASTER);
        pic.write_port(MASTER, 1, 0x04); // masking the cascade hides the slave
        pulse(&mut pic, 14);
        assert!(!pic.has_interrupt());
        pic.write_port(MASTER, 1, 0x00);
        assert_eq!(pic.acknowledge(), 0x2e);
    }

    #[test]
    fn level_triggered_inputs_follow_the_line() {
        let mut pic = pic();
        pic.write_port(PicWindow::Elcr, 1, 0xff);
        assert_eq!(pic.read_port(PicWindow::Elcr, 1), 0xde);
        pic.set_irq(10, true);
        assert_eq!(pic.acknowledge(), 0x2a);
        eoi(&mut pic, SLAVE);
        eoi(&mut pic, MASTER);
        assert!(pic.has_interrupt(), "still asserted after EOI");
        assert_eq!(pic.acknowledge(), 0x2a);
        pic.set_irq(10, false);
        eoi(&mut pic, SLAVE);
        eoi(&mut pic, MASTER);
        assert!(!pic.has_interrupt());
        assert_eq!(irr(&mut pic, SLAVE), 0);
    }

    #[test]
    fn rotation_commands_move_the_priority() {
        let mut pic = pic();
        pic.write_port(MASTER, 0, 0xc4); // set priority: IRQ 4 lowest
        pulse(&mut pic, 3);
        pulse(&mut pic, 5);
        assert_eq!(pic.acknowledge(), 0x25);
        pic.write_port(MASTER, 0, 0xa0); // rotate on non-specific EOI
        assert_eq!(pic.master.top_priority, 6);
        assert_eq!(pic.acknowledge(), 0x23);
        pic.write_port(MASTER, 0, 0xe3); // rotate on specific EOI 3
        assert_eq!((pic.master.top_priority, pic.master.isr), (4, 0));
    }

    #[test]
    fn auto_eoi_leaves_nothing_in_service() {
        let mut pic = Pic::new();
        init(&mut pic, 0x03);
        pic.write_port(MASTER, 0, 0x80); // rotate in auto-EOI mode
        pulse(&mut pic, 6);
        assert_eq!(pic.acknowledge(), 0x26);
        assert_eq!(isr(&mut pic, MASTER), 0);
        assert_eq!(pic.master.top_priority, 7);
    }

    #[test]
    fn poll_reads_and_acknowledges() {
        let mut pic = pic();
        pic.write_port(MASTER, 0, 0x0c);
        assert_eq!(pic.read_port(MASTER, 0), 0x00);
        pulse(&mut pic, 7);
        pic.write_port(MASTER, 0, 0x0c);
        assert_eq!(pic.read_port(MASTER, 0), 0x87);
        assert_eq!(isr(&mut pic, MASTER), 0x80);
        assert!(!pic.has_interrupt());
    }

    #[test]
    fn special_mask_lets_lower_priorities_through() {
        let mut pic = pic();
        pulse(&mut pic, 1);
        pic.acknowledge();
        pic.write_port(MASTER, 1, 0x02); // mask the one in service
        pic.write_port(MASTER, 0, 0x68); // special mask mode on
        pulse(&mut pic, 6);
        assert_eq!(pic.acknowledge(), 0x26);
    }

    #[test]
    fn spurious_acknowledge_returns_irq7() {
        let mut pic = pic();
        assert_eq!(pic.acknowledge(), 0x27);
        assert_eq!(isr(&mut pic, MASTER), 0);
    }

    #[test]
    fn shared_ports_and_intr_line() {
        let levels = Arc::new(Mutex::new(Vec::new()));
        let l = levels.clone();
        let line = move |level| l.lock().unwrap().push(level);
        let shared = SharedPic::new(Pic::with_intr_line(Box::new(line)));
        let (mut master, mut slave) = (shared.master_port(), shared.slave_port());
        for (port, bytes) in [(&mut master, [0x11, 0x20]), (&mut slave, [0x11, 0x28])] {
            port.write(0, &bytes); // one word access: ICW1 then ICW2
            port.write(1, &[0x04]);
            port.write(1, &[0x01]);
            port.write(1, &[0x00]);
        }
        shared.lock().set_irq(8, true);
        assert_eq!(shared.lock().acknowledge(), 0x28);
        assert_eq!(*levels.lock().unwrap(), vec![true, false]);
        let mut word = [0u8; 2];
        slave.read(0, &mut word); // IRR, then IMR
        assert_eq!(word, [0x00, 0x00]);
        let mut wide = [0u8; 4];
        shared.elcr_port().read(0, &mut wide);
        assert_eq!(wide, [0, 0, 0xff, 0xff]);
        master.read(u64::MAX, &mut word);
        master.write(u64::MAX, &[0x11, 0x11]);
        assert_eq!(shared.lock().master.init, Init::Ready);
        shared.lock().set_irq(16, true);
        shared.lock().reset();
        assert_eq!(shared.lock().master.vector_base, 0);
    }
}
