//! QEMU's `pc-testdev` (`hw/misc/pc-testdev.c`, as of QEMU 7.2): the test
//! hooks kvm-unit-tests expects of its machine, as three bus devices.
//!
//! | device | region | used by |
//! |---|---|---|
//! | [`TestdevPorts`] | ports 0xe0-0xeb | `realmode.c`, `emulator.c` (scratch), `eventinj.c` (flush page) |
//! | [`TestdevIrqLines`] | ports 0x2000-0x2017 | `ioapic.c` (`set_irq_line()` in `lib/x86/apic.c`) |
//! | [`IoRam`] | MMIO 0xff00_0000-0xff00_ffff | `emulator.c` (`x86/ioram.h`): memory operands that exit |
//!
//! # Ports 0xe0-0xeb ([`TestdevPorts`])
//!
//! | port | offset | access | meaning |
//! |---|---|---|---|
//! | 0xe0-0xe3 | 0-3 | RW | a 32-bit scratch register |
//! | 0xe4-0xe7 | 4-7 | W, 32 bits | flush page: the guest-physical page holding the value is unmapped and remapped on the host |
//! | 0xe8-0xeb | 8-11 | RW | the same scratch register again |
//!
//! Each scratch port is one byte lane: a byte, word or dword at port `p`
//! reads or writes the lanes from `p & 3` on, so `out %al, $0xe0` then
//! `in $0xe0, %al` round-trips a byte, and a word written at 0xe0 reads
//! back as two bytes at 0xe0 and 0xe1. In QEMU 0xe0 is a 4-byte region
//! taking any access size and 0xe8 one implemented byte by byte; with the
//! unaligned accesses QEMU splits into aligned pieces, both behave exactly
//! like these lanes, so the model does not tell them apart. Lanes that an
//! access reaches beyond 0xe3 land in the flush window and are dropped.
//!
//! The flush page register accepts only an aligned 32-bit write (QEMU's
//! `.valid` sizes are 4..4); it calls the flush callback with the value's
//! page, `value & !0xfff`, and the VMM removes the host mapping of that
//! page and puts it back (QEMU: `mprotect(PROT_NONE)`, then read-write), so
//! KVM must fault the page in again. The register reads as 0. Other
//! accesses to it are logged and ignored.
//!
//! # Ports 0x2000-0x2017 ([`TestdevIrqLines`])
//!
//! One byte per line: writing a nonzero byte to port `0x2000 + n` raises
//! line `n`, writing zero lowers it. Every write is passed on, even one
//! that does not change the level (QEMU's `qemu_set_irq` does the same;
//! the IOAPIC test relies on re-raising a level-triggered line). Wider
//! writes set one line per byte, as QEMU splits them into bytes. Reads
//! return 0 (QEMU 7.2's `test_irq_line_read`), not the level.
//!
//! QEMU wires line `n` to ISA IRQ `n` (PIC input and IOAPIC pin `n`) and
//! aborts on lines 16-23, past its ISA IRQs; here each of the 24 lines is
//! whatever [`IrqLine`](crate::IrqLine) the VMM connects, and writes to an
//! unconnected line are logged and ignored.
//!
//! # I/O RAM at 0xff00_0000 ([`IoRam`])
//!
//! 64 KiB of plain bytes served through MMIO exits, so that instructions
//! with memory operands there go through KVM's emulator. Any access of any
//! size and alignment inside the buffer reads or writes those bytes, as
//! QEMU's (aligned pieces of at most 4 bytes, copied with `memcpy`). Bytes
//! past the end read as `0xff` and are not written (an access cannot get
//! there under KVM, which splits accesses at page boundaries).
//!
//! In every device, zero-byte accesses and bytes past the region are
//! logged and ignored; reads fill such bytes with `0xff`.

use std::fmt;

use crate::bad_access::BadAccessLog;
use crate::bus::{le_value, IoDevice};

mod io_ram;
mod irq_lines;
mod snapshot;

pub use io_ram::IoRam;
pub use irq_lines::{PcTestdevError, TestdevIrqLines};

/// First port of [`TestdevPorts`].
pub const TESTDEV_PORTS_BASE: u16 = 0xe0;
/// Size of [`TestdevPorts`]' region in ports.
pub const TESTDEV_PORTS_SIZE: u64 = 12;
/// Offset of the scratch register in [`TestdevPorts`].
pub const TESTDEV_SCRATCH: u64 = 0;
/// Offset of the flush page register in [`TestdevPorts`].
pub const TESTDEV_FLUSH_PAGE: u64 = 4;
/// Offset of the second window on the scratch register in [`TestdevPorts`].
pub const TESTDEV_SCRATCH_BYTES: u64 = 8;
/// First port of [`TestdevIrqLines`].
pub const TESTDEV_IRQ_LINES_BASE: u16 = 0x2000;
/// Number of interrupt lines of [`TestdevIrqLines`], one port each.
pub const TESTDEV_IRQ_LINE_COUNT: usize = 24;
/// Size of [`TestdevIrqLines`]' region in ports.
pub const TESTDEV_IRQ_LINES_SIZE: u64 = TESTDEV_IRQ_LINE_COUNT as u64;
/// Guest-physical base of [`IoRam`].
pub const IO_RAM_BASE: u64 = 0xff00_0000;
/// Size of [`IoRam`] in bytes.
pub const IO_RAM_SIZE: u64 = 0x1_0000;

const PAGE_MASK: u64 = !0xfff;
const NAME: &str = "pc-testdev ports";

/// Which register a port of [`TestdevPorts`] belongs to.
enum Port {
    /// A byte lane (0-3) of the scratch register.
    ScratchLane(usize),
    FlushPage,
    Outside,
}

fn port(offset: Option<u64>) -> Port {
    match offset {
        Some(o @ (0..=3 | 8..=11)) => Port::ScratchLane((o & 3) as usize),
        Some(4..=7) => Port::FlushPage,
        _ => Port::Outside,
    }
}

/// pc-testdev's scratch and flush page registers at ports 0xe0-0xeb; see
/// the [module documentation](self).
pub struct TestdevPorts {
    scratch: u32,
    flush_page: Box<dyn FnMut(u64) + Send>,
    bad: BadAccessLog,
}

impl fmt::Debug for TestdevPorts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestdevPorts").field("scratch", &format_args!("{:#x}", self.scratch)).finish_non_exhaustive()
    }
}

impl TestdevPorts {
    /// The registers, scratch zero, calling `flush_page` with the
    /// guest-physical address of the page to flush (4 KiB aligned). The
    /// callback runs during the guest's write, on its vCPU thread, and must
    /// not access this device.
    pub fn new(flush_page: Box<dyn FnMut(u64) + Send>) -> Self {
        Self { scratch: 0, flush_page, bad: BadAccessLog::default() }
    }

    /// The scratch register's value.
    pub fn scratch(&self) -> u32 {
        self.scratch
    }
}

impl IoDevice for TestdevPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let lanes = self.scratch.to_le_bytes();
        let flush_read = offset == TESTDEV_FLUSH_PAGE && data.len() == 4;
        let mut bad = data.is_empty();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = match port(offset.checked_add(i as u64)) {
                Port::ScratchLane(lane) => lanes[lane],
                Port::FlushPage => {
                    bad |= !flush_read;
                    0
                }
                Port::Outside => {
                    bad = true;
                    0xff
                }
            };
        }
        if bad {
            self.bad.read(NAME, offset, data.len());
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == TESTDEV_FLUSH_PAGE && data.len() == 4 {
            (self.flush_page)(le_value(data) & PAGE_MASK);
            return;
        }
        let mut lanes = self.scratch.to_le_bytes();
        let mut bad = data.is_empty();
        for (i, &byte) in data.iter().enumerate() {
            match port(offset.checked_add(i as u64)) {
                Port::ScratchLane(lane) => lanes[lane] = byte,
                Port::FlushPage | Port::Outside => bad = true,
            }
        }
        self.scratch = u32::from_le_bytes(lanes);
        if bad {
            self.bad.write(NAME, offset, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    fn ports() -> (TestdevPorts, Arc<Mutex<Vec<u64>>>) {
        let flushed = Arc::new(Mutex::new(Vec::new()));
        let seen = flushed.clone();
        (TestdevPorts::new(Box::new(move |gpa| seen.lock().unwrap().push(gpa))), flushed)
    }

    fn read(dev: &mut TestdevPorts, offset: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0xaa; len];
        dev.read(offset, &mut data);
        data
    }

    #[test]
    fn realmode_pio_round_trips_at_every_width() {
        // realmode.c test_io: out %al/%ax/%eax, $0xe0, then in of the same width.
        let (mut dev, _) = ports();
        for (value, len) in [(0xffu32, 1), (0xffff, 2), (0xffff_ffff, 4)] {
            dev.write(0, &[0; 4]);
            dev.write(0, &value.to_le_bytes()[..len]);
            assert_eq!(read(&mut dev, 0, len), value.to_le_bytes()[..len]);
        }
    }

    #[test]
    fn each_port_is_one_byte_lane() {
        let (mut dev, _) = ports();
        dev.write(0, &0x9999u16.to_le_bytes()); // emulator.c test_string_io_mmio
        assert_eq!(read(&mut dev, 0, 1), [0x99]);
        assert_eq!(read(&mut dev, 1, 1), [0x99]);
        dev.write(2, &[0x12, 0x34]);
        dev.write(3, &[0x56]);
        assert_eq!(dev.scratch(), 0x5612_9999);
        assert_eq!(read(&mut dev, 2, 2), [0x12, 0x56]);
        assert_eq!(read(&mut dev, 1, 2), [0x99, 0x12], "unaligned words hit lanes 1 and 2, as QEMU splits them");
    }

    #[test]
    fn outsb_leaves_the_last_byte() {
        // emulator.c test_stringio: rep outsb to 0xe0, then inb 0xe0.
        let (mut dev, _) = ports();
        for &b in b"abcdefghijklmnop" {
            dev.write(0, &[b]);
        }
        assert_eq!(read(&mut dev, 0, 1), [b'p']);
        assert_eq!(dev.scratch(), u32::from(b'p'), "byte writes leave the other lanes alone");
    }

    #[test]
    fn ports_0xe8_to_0xeb_are_the_same_register() {
        let (mut dev, _) = ports();
        dev.write(TESTDEV_SCRATCH_BYTES, &0x1122_3344u32.to_le_bytes());
        assert_eq!(read(&mut dev, TESTDEV_SCRATCH, 4), 0x1122_3344u32.to_le_bytes());
        dev.write(TESTDEV_SCRATCH, &[0x55]);
        assert_eq!(read(&mut dev, TESTDEV_SCRATCH_BYTES + 3, 1), [0x11]);
        assert_eq!(read(&mut dev, TESTDEV_SCRATCH_BYTES, 2), [0x55, 0x33]);
    }

    #[test]
    fn flush_page_passes_the_page_of_the_written_address() {
        // eventinj.c: outl(virt_to_phys(&local), 0xe4).
        let (mut dev, flushed) = ports();
        dev.write(TESTDEV_FLUSH_PAGE, &0x0012_3abcu32.to_le_bytes());
        dev.write(TESTDEV_FLUSH_PAGE, &0x0000_1000u32.to_le_bytes());
        assert_eq!(*flushed.lock().unwrap(), vec![0x0012_3000, 0x1000]);
        assert_eq!(read(&mut dev, TESTDEV_FLUSH_PAGE, 4), [0; 4]);
        assert_eq!(dev.scratch(), 0, "flushing does not touch the scratch register");
    }

    #[test]
    fn flush_page_ignores_anything_but_an_aligned_dword() {
        let (mut dev, flushed) = ports();
        dev.write(TESTDEV_FLUSH_PAGE, &[0x10]);
        dev.write(TESTDEV_FLUSH_PAGE, &0x1000u16.to_le_bytes());
        dev.write(TESTDEV_FLUSH_PAGE + 1, &0x1000u32.to_le_bytes());
        dev.write(TESTDEV_FLUSH_PAGE, &0x1000u64.to_le_bytes());
        assert!(flushed.lock().unwrap().is_empty());
        assert_eq!(read(&mut dev, TESTDEV_FLUSH_PAGE + 2, 2), [0, 0]);
        assert_eq!(dev.scratch(), 0);
    }

    #[test]
    fn an_access_running_into_the_flush_window_keeps_its_scratch_lanes() {
        let (mut dev, flushed) = ports();
        dev.write(2, &0xaabb_ccddu32.to_le_bytes());
        assert_eq!(dev.scratch(), 0xccdd_0000);
        assert!(flushed.lock().unwrap().is_empty());
        assert_eq!(read(&mut dev, 3, 4), [0xcc, 0, 0, 0]);
    }

    #[test]
    fn bytes_past_the_region_read_all_ones_and_are_not_written() {
        let (mut dev, _) = ports();
        dev.write(TESTDEV_SCRATCH_BYTES, &0x0403_0201u32.to_le_bytes());
        dev.write(TESTDEV_SCRATCH_BYTES + 2, &0xaabb_ccddu32.to_le_bytes());
        assert_eq!(dev.scratch(), 0xccdd_0201);
        assert_eq!(read(&mut dev, TESTDEV_PORTS_SIZE - 1, 4), [0xcc, 0xff, 0xff, 0xff]);
        assert_eq!(read(&mut dev, TESTDEV_PORTS_SIZE, 2), [0xff; 2]);
        assert_eq!(read(&mut dev, u64::MAX, 2), [0xff; 2]);
        dev.write(u64::MAX, &[0; 4]);
        dev.write(TESTDEV_PORTS_SIZE, &[0; 4]);
        dev.write(0, &[]);
        dev.read(0, &mut []);
        assert_eq!(dev.scratch(), 0xccdd_0201);
    }
}
