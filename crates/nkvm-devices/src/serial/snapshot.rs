//! The 16550's [`Snapshot`]: its registers and the receive FIFO (what
//! vm-superio's `SerialState` holds), then the input waiting behind the
//! FIFO (format version 2). The output and the interrupt line stay those
//! the restored UART was built with.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::SerialState;

use super::{Serial, FIFO_SIZE};
use crate::snapshot::{Snapshot, SnapshotError, StateReader, StateWriter};

/// The most waiting input a state may carry: the backlog's limit and
/// what a drained console socket can add to it.
const BACKLOG_MAX: usize = 1 << 20;

impl<W: Write + Send> Snapshot for Serial<W> {
    fn snapshot_name(&self) -> &'static str {
        "serial-16550"
    }

    fn snapshot_version(&self) -> u16 {
        2
    }

    fn save_body(&self, out: &mut StateWriter) {
        let s = self.uart.state();
        for b in [
            s.baud_divisor_low,
            s.baud_divisor_high,
            s.interrupt_enable,
            s.interrupt_identification,
            s.line_control,
            s.line_status,
            s.modem_control,
            s.modem_status,
            s.scratch,
        ] {
            out.u8(b);
        }
        out.blob(&s.in_buffer);
        let (front, back) = self.backlog.as_slices();
        out.blob(&[front, back].concat());
    }

    fn load_body(&mut self, input: &mut StateReader<'_>) -> Result<(), SnapshotError> {
        let state = SerialState {
            baud_divisor_low: input.u8("DLL")?,
            baud_divisor_high: input.u8("DLM")?,
            interrupt_enable: input.u8("IER")?,
            interrupt_identification: input.u8("IIR")?,
            line_control: input.u8("LCR")?,
            line_status: input.u8("LSR")?,
            modem_control: input.u8("MCR")?,
            modem_status: input.u8("MSR")?,
            scratch: input.u8("SCR")?,
            in_buffer: input.blob("receive FIFO", FIFO_SIZE)?.to_vec(),
        };
        let backlog = input.blob("input behind the FIFO", BACKLOG_MAX)?.iter().copied().collect();
        // Within FIFO_SIZE, from_state cannot fail (its trigger never does);
        // it raises the interrupt the saved state had pending.
        let at = input.offset();
        match vm_superio::Serial::from_state(&state, self.irq.clone(), NoEvents, Vec::new()) {
            Ok(uart) => self.uart = uart,
            Err(_) => return Err(input.invalid("receive FIFO", state.in_buffer.len() as u64, at, "at most 64 bytes")),
        }
        self.backlog = backlog;
        // A FIFO saved empty with input behind it (drained from a socket
        // for the snapshot) takes its first burst now.
        self.refill();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serial::{REG_DATA, REG_IER, REG_LCR, REG_SCR};
    use crate::snapshot::check::refuses_damage;
    use crate::IoDevice;

    fn serial() -> Serial<Vec<u8>> {
        Serial::new(Box::new(|_| {}), Vec::new())
    }

    #[test]
    fn serial_round_trips_and_refuses_damage() {
        let mut s = serial();
        s.write(REG_LCR, &[0x83]);
        s.write(REG_DATA, &[0x0c]);
        s.write(REG_LCR, &[0x03]);
        s.write(REG_SCR, &[0x5a]);
        s.write(REG_IER, &[0x01]);
        s.enqueue_input(b"queued");
        let behind: Vec<u8> = (0..100).collect();
        s.enqueue_input(&[b'f'; 58]);
        s.enqueue_input(&behind);
        assert_eq!(s.backlog_len(), 100);
        let blob = s.snapshot();
        let mut copy = serial();
        copy.restore(&blob).unwrap();
        let mut b = [0u8];
        copy.read(REG_SCR, &mut b);
        assert_eq!(b, [0x5a]);
        let mut read = Vec::new();
        for _ in 0..64 + 100 {
            copy.read(REG_DATA, &mut b);
            read.push(b[0]);
        }
        assert_eq!(read, [&b"queued"[..], &[b'f'; 58], &behind].concat(), "the FIFO, then the backlog, in order");
        copy.write(REG_DATA, b"!");
        assert_eq!(copy.output(), b"!");
        refuses_damage(&blob, serial);
    }

    #[test]
    fn an_overlong_fifo_is_refused() {
        let mut w = StateWriter::default();
        (0..9).for_each(|_| w.u8(0));
        w.blob(&[0u8; 65]);
        w.blob(&[]);
        let mut body = StateReader::for_test(w.into_bytes(), "serial-16550");
        let err = serial().load_body(&mut body).unwrap_err();
        assert!(err.to_string().contains("receive FIFO"), "{err}");
    }

    #[test]
    fn input_saved_behind_an_empty_fifo_reaches_the_guest() {
        let mut s = serial();
        s.hold_input(b"drained");
        let mut b = [0u8];
        s.read(REG_DATA, &mut b);
        let blob = s.snapshot();
        let mut copy = serial();
        copy.restore(&blob).unwrap();
        let mut read = Vec::new();
        for _ in 0..6 {
            copy.read(REG_DATA, &mut b);
            read.push(b[0]);
        }
        assert_eq!(read, b"rained");
    }
}
