//! One 8259A: request, in-service and mask registers, priority
//! resolution, and the ICW/OCW command set. The PC's cascaded pair and its
//! port windows are in the parent module.

use super::CASCADE_IRQ;
use crate::snapshot::{SnapshotError, StateReader, StateWriter};

/// Where a chip is in its ICW1-ICW4 initialisation sequence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) enum Init {
    #[default]
    Ready,
    Icw2,
    Icw3,
    Icw4,
}

/// One 8259A.
#[derive(Debug, Clone, Default)]
pub(super) struct Chip {
    is_master: bool,
    irr: u8,
    pub(super) isr: u8,
    pub(super) imr: u8,
    /// Electrical level of each input.
    lines: u8,
    pub(super) elcr: u8,
    /// ICW1 LTIM: every input level-triggered.
    all_level: bool,
    pub(super) vector_base: u8,
    pub(super) init: Init,
    needs_icw4: bool,
    single: bool,
    auto_eoi: bool,
    rotate_on_auto_eoi: bool,
    special_mask: bool,
    special_fully_nested: bool,
    read_isr: bool,
    poll: bool,
    /// The input with the highest priority (0 unless rotated).
    pub(super) top_priority: u8,
}

impl Chip {
    /// Writes every field, for the PIC's snapshot.
    pub(super) fn save(&self, out: &mut StateWriter) {
        for b in [self.irr, self.isr, self.imr, self.lines, self.elcr, self.vector_base, self.top_priority] {
            out.u8(b);
        }
        out.u8(self.init as u8);
        for f in [
            self.all_level,
            self.needs_icw4,
            self.single,
            self.auto_eoi,
            self.rotate_on_auto_eoi,
            self.special_mask,
            self.special_fully_nested,
            self.read_isr,
            self.poll,
        ] {
            out.bool(f);
        }
    }

    /// Reads what [`save`](Self::save) wrote, for the chip `is_master` says.
    pub(super) fn load(is_master: bool, input: &mut StateReader<'_>) -> Result<Self, SnapshotError> {
        let (irr, isr, imr, lines) = (input.u8("IRR")?, input.u8("ISR")?, input.u8("IMR")?, input.u8("lines")?);
        let (elcr, vector_base) = (input.u8("ELCR")?, input.u8("vector base")?);
        let at = input.offset();
        let top_priority = input.u8("top priority")?;
        if top_priority > 7 {
            return Err(input.invalid("top priority", top_priority.into(), at, "an input 0-7"));
        }
        let at = input.offset();
        let init = match input.u8("init step")? {
            0 => Init::Ready,
            1 => Init::Icw2,
            2 => Init::Icw3,
            3 => Init::Icw4,
            v => return Err(input.invalid("init step", v.into(), at, "0-3 (ready, ICW2, ICW3, ICW4)")),
        };
        Ok(Self {
            is_master,
            irr,
            isr,
            imr,
            lines,
            elcr,
            vector_base,
            top_priority,
            init,
            all_level: input.bool("LTIM")?,
            needs_icw4: input.bool("IC4")?,
            single: input.bool("SNGL")?,
            auto_eoi: input.bool("AEOI")?,
            rotate_on_auto_eoi: input.bool("rotate on AEOI")?,
            special_mask: input.bool("special mask")?,
            special_fully_nested: input.bool("SFNM")?,
            read_isr: input.bool("read ISR")?,
            poll: input.bool("poll")?,
        })
    }

    pub(super) fn new(is_master: bool) -> Self {
        Self { is_master, ..Self::default() }
    }

    /// Back to the power-on state, keeping the input levels.
    pub(super) fn reset(&mut self) {
        *self = Self { lines: self.lines, ..Self::new(self.is_master) };
    }

    fn level_bits(&self) -> u8 {
        if self.all_level {
            0xff
        } else {
            self.elcr
        }
    }

    pub(super) fn elcr_mask(&self) -> u8 {
        // IRQ 0, 1, 2, 8 and 13 are always edge-triggered.
        if self.is_master {
            0xf8
        } else {
            0xde
        }
    }

    fn priority(&self, irq: u8) -> u8 {
        irq.wrapping_sub(self.top_priority) & 7
    }

    /// The highest-priority input whose bit is set in `bits`.
    fn highest(&self, bits: u8) -> Option<u8> {
        (0..8).map(|p| (self.top_priority + p) & 7).find(|irq| bits & (1 << irq) != 0)
    }

    /// The input that would be delivered now: requested, unmasked, and of
    /// higher priority than anything in service.
    pub(super) fn pending(&self) -> Option<u8> {
        let irq = self.highest(self.irr & !self.imr)?;
        let mut in_service = self.isr;
        if self.special_mask {
            in_service &= !self.imr;
        }
        if self.is_master && self.special_fully_nested {
            in_service &= !(1 << CASCADE_IRQ);
        }
        match self.highest(in_service) {
            Some(current) if self.priority(current) <= self.priority(irq) => None,
            _ => Some(irq),
        }
    }

    pub(super) fn set_line(&mut self, irq: u8, level: bool) {
        let bit = 1 << irq;
        if self.level_bits() & bit != 0 {
            self.irr = if level { self.irr | bit } else { self.irr & !bit };
        } else if level && self.lines & bit == 0 {
            self.irr |= bit;
        }
        self.lines = if level { self.lines | bit } else { self.lines & !bit };
    }

    /// The INTA cycle for `irq`: move it from requested to in service.
    pub(super) fn ack(&mut self, irq: u8) {
        let bit = 1 << irq;
        if self.level_bits() & bit == 0 {
            self.irr &= !bit;
        }
        if !self.auto_eoi {
            self.isr |= bit;
        } else if self.rotate_on_auto_eoi {
            self.top_priority = (irq + 1) & 7;
        }
    }

    /// Level-triggered requests follow their lines; edge ones keep theirs.
    pub(super) fn resync_level_requests(&mut self) {
        let level = self.level_bits();
        self.irr = (self.irr & !level) | (self.lines & level);
    }

    pub(super) fn write_command(&mut self, value: u8) {
        if value & 0x10 != 0 {
            // ICW1: edge detection restarts, so edge requests are dropped.
            *self = Self {
                is_master: self.is_master,
                lines: self.lines,
                elcr: self.elcr,
                vector_base: self.vector_base,
                all_level: value & 0x08 != 0,
                single: value & 0x02 != 0,
                needs_icw4: value & 0x01 != 0,
                init: Init::Icw2,
                ..Self::default()
            };
            self.resync_level_requests();
        } else if value & 0x08 != 0 {
            self.write_ocw3(value);
        } else {
            self.write_ocw2(value);
        }
    }

    fn write_ocw2(&mut self, value: u8) {
        let level = value & 7;
        match value >> 5 {
            0b001 | 0b101 => {
                if let Some(irq) = self.highest(self.isr) {
                    self.isr &= !(1 << irq);
                    if value >> 5 == 0b101 {
                        self.top_priority = (irq + 1) & 7;
                    }
                }
            }
            0b011 => self.isr &= !(1 << level),
            0b111 => {
                self.isr &= !(1 << level);
                self.top_priority = (level + 1) & 7;
            }
            0b110 => self.top_priority = (level + 1) & 7,
            0b100 => self.rotate_on_auto_eoi = true,
            0b000 => self.rotate_on_auto_eoi = false,
            _ => {} // 0b010: no operation
        }
    }

    fn write_ocw3(&mut self, value: u8) {
        self.poll = value & 0x04 != 0;
        match value & 3 {
            2 => self.read_isr = false,
            3 => self.read_isr = true,
            _ => {}
        }
        match (value >> 5) & 3 {
            2 => self.special_mask = false,
            3 => self.special_mask = true,
            _ => {}
        }
    }

    pub(super) fn write_data(&mut self, value: u8) {
        self.init = match self.init {
            Init::Icw2 => {
                self.vector_base = value & 0xf8;
                match (self.single, self.needs_icw4) {
                    (false, _) => Init::Icw3,
                    (true, true) => Init::Icw4,
                    (true, false) => Init::Ready,
                }
            }
            // ICW3 (cascade wiring) is fixed on a PC: slave on IRQ 2.
            Init::Icw3 if self.needs_icw4 => Init::Icw4,
            Init::Icw3 => Init::Ready,
            Init::Icw4 => {
                if value & 0x01 == 0 {
                    log::debug!("pic: 8080 mode (ICW4 {value:#x}) not supported");
                }
                self.auto_eoi = value & 0x02 != 0;
                self.special_fully_nested = value & 0x10 != 0;
                Init::Ready
            }
            Init::Ready => {
                self.imr = value; // OCW1
                Init::Ready
            }
        };
    }

    pub(super) fn read_command(&mut self) -> u8 {
        if std::mem::take(&mut self.poll) {
            // A poll is an INTA done by a read: it sets the ISR bit.
            return self.pending().map_or(0, |irq| {
                self.ack(irq);
                0x80 | irq
            });
        }
        if self.read_isr {
            self.isr
        } else {
            self.irr
        }
    }
}
