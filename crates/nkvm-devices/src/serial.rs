//! A 16550A UART (the PC's COM port), eight byte-wide registers, built on
//! `vm_superio::Serial`.
//!
//! What the guest transmits goes to an output [`Write`]; bytes for the guest
//! (a console's keyboard) are queued with [`Serial::enqueue_input`]: what
//! does not fit in the 64-byte receive FIFO waits in a backlog, in order,
//! and moves in as the guest empties the FIFO. The backlog is part of the
//! saved state, so bytes typed before a snapshot or a migration are read by
//! the guest after it, however far behind the guest was. The
//! interrupt (ISA IRQ 4 for COM1) is signalled as a pulse on an [`IrqLine`],
//! one rising edge per new interrupt condition, as an edge-triggered ISA
//! input expects.
//!
//! Accesses other than one byte at offsets 0-7 read as all-ones (`0xff`, an
//! empty ISA bus) and are ignored on write.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt;
use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::serial::{Error as SuperioError, NoEvents};
use vm_superio::Trigger;

use crate::bus::{IoDevice, IrqLine};

/// Number of byte registers, hence the size of the region.
pub const SERIAL_SIZE: u64 = 8;
/// Offset of the receive buffer / transmit holding register.
pub const REG_DATA: u64 = 0;
/// Offset of the interrupt enable register.
pub const REG_IER: u64 = 1;
/// Offset of the interrupt identification register.
pub const REG_IIR: u64 = 2;
/// Offset of the line control register (bit 7: divisor latch access).
pub const REG_LCR: u64 = 3;
/// Offset of the line status register.
pub const REG_LSR: u64 = 5;
/// Offset of the scratch register.
pub const REG_SCR: u64 = 7;
/// LSR bit: received data ready.
pub const LSR_DATA_READY: u8 = 0x01;
/// LSR bit: transmit holding register empty.
pub const LSR_THR_EMPTY: u8 = 0x20;
/// LSR bit: transmitter idle.
pub const LSR_IDLE: u8 = 0x40;
/// Bytes [`Serial::enqueue_input`] keeps waiting beyond the receive FIFO
/// before it refuses more (the typist is that far ahead of the guest).
pub const BACKLOG_LIMIT: usize = 4096;
/// The receive FIFO's size (vm-superio's).
const FIFO_SIZE: usize = 64;

mod snapshot;

/// Adapts an [`IrqLine`] to vm-superio's interrupt trigger; shared, so a
/// UART rebuilt from saved state keeps the line.
#[derive(Clone)]
struct IrqTrigger(Arc<Mutex<Box<dyn IrqLine>>>);

impl Trigger for IrqTrigger {
    type E = Infallible;

    fn trigger(&self) -> Result<(), Infallible> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).pulse();
        Ok(())
    }
}

/// vm-superio's UART, transmitting into a buffer the model drains into
/// its output after each access (so the UART can be rebuilt from saved
/// state without giving the output up).
type Uart = vm_superio::Serial<IrqTrigger, NoEvents, Vec<u8>>;

/// The 16550A UART; `W` receives the bytes the guest transmits.
pub struct Serial<W: Write + Send> {
    uart: Uart,
    irq: IrqTrigger,
    out: W,
    /// Input that did not fit in the receive FIFO, oldest first.
    backlog: VecDeque<u8>,
}

impl<W: Write + Send> fmt::Debug for Serial<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Serial")
            .field("state", &self.uart.state())
            .field("backlog", &self.backlog.len())
            .finish_non_exhaustive()
    }
}

impl<W: Write + Send> Serial<W> {
    /// A UART in its reset state, writing guest output to `out` and
    /// pulsing `irq` on each interrupt.
    pub fn new(irq: Box<dyn IrqLine>, out: W) -> Self {
        let irq = IrqTrigger(Arc::new(Mutex::new(irq)));
        Self { uart: vm_superio::Serial::new(irq.clone(), Vec::new()), irq, out, backlog: VecDeque::new() }
    }

    /// Queues bytes for the guest to read, in order: into the receive FIFO
    /// while it has room, then into the backlog up to [`BACKLOG_LIMIT`].
    /// Returns how many were taken (0 when both are full: try again after
    /// the guest has read). Raises the receive interrupt if the guest
    /// enabled it.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        let n = input.len().min(self.input_room());
        self.hold_input(&input[..n]);
        n
    }

    /// Queues all of `input` for the guest, past [`BACKLOG_LIMIT`] if need
    /// be: for bytes taken from a source that cannot take them back (a
    /// socket drained for a snapshot).
    pub fn hold_input(&mut self, input: &[u8]) {
        self.backlog.extend(input);
        self.refill();
    }

    /// How many more bytes [`Serial::enqueue_input`] takes now.
    pub fn input_room(&self) -> usize {
        (self.uart.fifo_capacity() + BACKLOG_LIMIT).saturating_sub(self.backlog.len())
    }

    /// Input waiting behind the receive FIFO, in bytes.
    pub fn backlog_len(&self) -> usize {
        self.backlog.len()
    }

    /// Free space in the receive FIFO, in bytes.
    pub fn fifo_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Moves waiting input into the receive FIFO, as much as fits.
    fn refill(&mut self) {
        let room = self.uart.fifo_capacity().min(self.backlog.len());
        if room == 0 {
            return;
        }
        let chunk: Vec<u8> = self.backlog.iter().take(room).copied().collect();
        match self.uart.enqueue_raw_bytes(&chunk) {
            Ok(n) => {
                self.backlog.drain(..n);
            }
            Err(SuperioError::FullFifo) => {}
            // Loopback mode takes no outside input: it waits.
            Err(e) => log::debug!("serial: input waits: {e}"),
        }
    }

    /// The output sink.
    pub fn output(&self) -> &W {
        &self.out
    }

    /// The output sink, mutably (e.g. to drain a buffer).
    pub fn output_mut(&mut self) -> &mut W {
        &mut self.out
    }

    /// Consume the UART and return its output sink.
    pub fn into_output(self) -> W {
        self.out
    }

    /// Moves what the UART transmitted to the output; an output that
    /// fails loses the bytes (the guest cannot be blocked).
    fn drain(&mut self) {
        let sent = self.uart.writer_mut();
        if sent.is_empty() {
            return;
        }
        if let Err(e) = self.out.write_all(sent).and_then(|()| self.out.flush()) {
            log::debug!("serial: {} output bytes lost: {e}", sent.len());
        }
        sent.clear();
    }
}

impl<W: Write + Send> IoDevice for Serial<W> {
    fn save_state(&self) -> Option<Vec<u8>> {
        Some(crate::Snapshot::snapshot(self))
    }

    fn load_state(&mut self, state: &[u8]) -> Option<Result<(), String>> {
        Some(crate::Snapshot::restore(self, state).map_err(|e| e.to_string()))
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(reg), [byte]) if offset < SERIAL_SIZE => {
                *byte = self.uart.read(reg);
                // The guest emptied the FIFO: the next burst comes in (one
                // interrupt for it, as from a real line).
                if !self.backlog.is_empty() && self.uart.fifo_capacity() == FIFO_SIZE {
                    self.refill();
                }
            }
            (_, data) => {
                log::debug!("serial: invalid read of {} bytes at {offset:#x}", data.len());
                data.fill(0xff);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (u8::try_from(offset), data) {
            (Ok(reg), [byte]) if offset < SERIAL_SIZE => {
                if let Err(e) = self.uart.write(reg, *byte) {
                    log::debug!("serial: write failed: {e}");
                }
                self.drain();
            }
            _ => log::debug!("serial: ignored write of {} bytes at {offset:#x}", data.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    fn serial() -> (Serial<Vec<u8>>, Arc<AtomicUsize>) {
        let edges = Arc::new(AtomicUsize::new(0));
        let e = edges.clone();
        let irq = move |level: bool| {
            if level {
                e.fetch_add(1, Ordering::SeqCst);
            }
        };
        (Serial::new(Box::new(irq), Vec::new()), edges)
    }

    fn inb(s: &mut impl IoDevice, offset: u64) -> u8 {
        let mut b = [0u8];
        s.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn transmitted_bytes_reach_the_output() {
        let (mut s, _) = serial();
        for &b in b"hi\n" {
            s.write(REG_DATA, &[b]);
        }
        assert_eq!(s.output(), b"hi\n");
        s.output_mut().clear();
        s.write(REG_DATA, b"x");
        assert_eq!(s.into_output(), b"x");
    }

    #[test]
    fn line_status_reports_empty_transmitter_and_ready_data() {
        let (mut s, _) = serial();
        let lsr = inb(&mut s, REG_LSR);
        assert_eq!(lsr, LSR_THR_EMPTY | LSR_IDLE);
        assert_eq!(s.enqueue_input(b"ok"), 2);
        assert_eq!(inb(&mut s, REG_LSR) & LSR_DATA_READY, LSR_DATA_READY);
        assert_eq!(inb(&mut s, REG_DATA), b'o');
        assert_eq!(inb(&mut s, REG_DATA), b'k');
        assert_eq!(inb(&mut s, REG_LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn input_raises_the_receive_interrupt_when_enabled() {
        let (mut s, edges) = serial();
        s.enqueue_input(b"a");
        assert_eq!(edges.load(Ordering::SeqCst), 0);
        inb(&mut s, REG_DATA);
        s.write(REG_IER, &[0x01]); // receive data available
        s.enqueue_input(b"b");
        assert_eq!(edges.load(Ordering::SeqCst), 1);
        assert_eq!(inb(&mut s, REG_IIR) & 0x0f, 0x04);
        assert_eq!(inb(&mut s, REG_DATA), b'b');
        assert_eq!(inb(&mut s, REG_IIR) & 0x0f, 0x01); // none pending
    }

    #[test]
    fn transmit_interrupt_fires_when_enabled() {
        let (mut s, edges) = serial();
        s.write(REG_IER, &[0x02]); // THR empty
        assert_eq!(edges.load(Ordering::SeqCst), 1);
        assert_eq!(inb(&mut s, REG_IIR) & 0x0f, 0x02);
        s.write(REG_DATA, b"z");
        assert_eq!(edges.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn input_beyond_the_fifo_waits_in_order_and_arrives_as_the_guest_reads() {
        let (mut s, edges) = serial();
        s.write(REG_IER, &[0x01]); // receive data available
        let typed: Vec<u8> = (0..FIFO_SIZE + BACKLOG_LIMIT + 10).map(|i| i as u8).collect();
        assert_eq!(s.enqueue_input(&typed), FIFO_SIZE + BACKLOG_LIMIT, "the FIFO and the backlog fill");
        assert_eq!((s.fifo_capacity(), s.backlog_len(), s.input_room()), (0, BACKLOG_LIMIT, 0));
        assert_eq!(s.enqueue_input(b"y"), 0);
        assert_eq!(edges.load(Ordering::SeqCst), 1, "one interrupt for the first burst");
        let mut read = Vec::new();
        while inb(&mut s, REG_LSR) & LSR_DATA_READY != 0 {
            read.push(inb(&mut s, REG_DATA));
        }
        assert_eq!(read, typed[..FIFO_SIZE + BACKLOG_LIMIT], "every byte, in order");
        assert_eq!(edges.load(Ordering::SeqCst), 1 + BACKLOG_LIMIT / FIFO_SIZE, "one interrupt per burst");
        assert_eq!(s.input_room(), FIFO_SIZE + BACKLOG_LIMIT);
    }

    #[test]
    fn held_input_goes_past_the_limit_and_loopback_input_waits() {
        let (mut s, _) = serial();
        s.hold_input(&vec![b'h'; FIFO_SIZE + BACKLOG_LIMIT + 100]);
        assert_eq!((s.backlog_len(), s.input_room()), (BACKLOG_LIMIT + 100, 0));
        let (mut l, _) = serial();
        l.write(4, &[0x10]); // MCR: loopback
        assert_eq!(l.enqueue_input(b"later"), 5);
        assert_eq!((l.fifo_capacity(), l.backlog_len()), (FIFO_SIZE, 5));
        l.write(4, &[0x00]);
        assert_eq!(l.enqueue_input(b"!"), 1, "taken behind the waiting bytes");
        assert_eq!(inb(&mut l, REG_DATA), b'l');
    }

    #[test]
    fn divisor_latch_and_scratch_hold_values() {
        let (mut s, _) = serial();
        s.write(REG_LCR, &[0x80]);
        s.write(REG_DATA, &[0x01]);
        s.write(REG_IER, &[0x00]);
        assert_eq!(inb(&mut s, REG_DATA), 0x01);
        s.write(REG_LCR, &[0x03]);
        assert!(s.output().is_empty());
        s.write(REG_SCR, &[0x5a]);
        assert_eq!(inb(&mut s, REG_SCR), 0x5a);
    }

    #[test]
    fn invalid_accesses_read_all_ones_and_are_ignored() {
        let (mut s, _) = serial();
        assert_eq!(inb(&mut s, SERIAL_SIZE), 0xff);
        assert_eq!(inb(&mut s, u64::MAX), 0xff);
        let mut wide = [0u8; 4];
        s.read(REG_DATA, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        s.write(REG_DATA, b"ab");
        s.write(0x100, b"a");
        s.read(REG_DATA, &mut []);
        assert!(s.output().is_empty());
    }

    #[test]
    fn failing_output_loses_bytes_quietly() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::other("gone"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut s = Serial::new(Box::new(|_| {}), Broken);
        s.write(REG_DATA, b"a");
        assert_eq!(inb(&mut s, REG_LSR) & LSR_THR_EMPTY, LSR_THR_EMPTY);
        assert!(format!("{s:?}").starts_with("Serial"));
    }
}
