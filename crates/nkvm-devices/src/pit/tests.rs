use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::*;

/// A PIT on a clock the test moves (nanoseconds), counting IRQ 0 pulses.
fn pit() -> (Pit, Arc<AtomicU64>, Arc<AtomicUsize>) {
    let now = Arc::new(AtomicU64::new(0));
    let pulses = Arc::new(AtomicUsize::new(0));
    let (clock, counted) = (now.clone(), pulses.clone());
    let irq = Box::new(move |level: bool| {
        if level {
            counted.fetch_add(1, Ordering::SeqCst);
        }
    });
    let pit = Pit::with_clock(irq, Box::new(move || Duration::from_nanos(clock.load(Ordering::SeqCst))));
    (pit, now, pulses)
}

/// Nanoseconds of `ticks` PIT ticks, rounded up.
fn ticks(ticks: u64) -> u64 {
    (ticks * 1_000_000_000).div_ceil(PIT_HZ)
}

fn latch_and_read(pit: &mut Pit, counter: u8) -> u16 {
    pit.write(3, &[counter << 6]);
    let mut b = [0u8; 1];
    pit.read(u64::from(counter), &mut b);
    let low = b[0];
    pit.read(u64::from(counter), &mut b);
    u16::from(low) | (u16::from(b[0]) << 8)
}

#[test]
fn mode_2_counts_down_and_interrupts_once_per_period() {
    let (mut pit, now, pulses) = pit();
    pit.program(0, 2, 1000);
    assert_eq!(latch_and_read(&mut pit, 0), 1000);
    now.store(ticks(300), Ordering::SeqCst);
    assert_eq!(latch_and_read(&mut pit, 0), 700);
    let wait = pit.poll().expect("a periodic counter has a next edge");
    assert_eq!(pulses.load(Ordering::SeqCst), 0);
    assert_eq!(wait, Duration::from_nanos(ticks(700)));
    now.store(ticks(1000), Ordering::SeqCst);
    assert!(pit.poll().is_some());
    assert_eq!(pulses.load(Ordering::SeqCst), 1);
    // Polling again in the same period raises nothing more.
    pit.poll();
    assert_eq!(pulses.load(Ordering::SeqCst), 1);
    now.store(ticks(2500), Ordering::SeqCst);
    pit.poll();
    assert_eq!(pulses.load(Ordering::SeqCst), 2, "missed edges are coalesced into one");
    assert_eq!(latch_and_read(&mut pit, 0), 500);
}

#[test]
fn mode_3_with_count_0_is_the_bios_18_hz_tick() {
    let (mut pit, now, pulses) = pit();
    pit.program(0, 3, 0);
    let wait = pit.poll().expect("running");
    assert_eq!(wait, Duration::from_nanos(ticks(65536)));
    assert!(wait > Duration::from_millis(54) && wait < Duration::from_millis(56));
    // The count goes down by two per tick in mode 3.
    now.store(ticks(100), Ordering::SeqCst);
    assert_eq!(latch_and_read(&mut pit, 0), 0u16.wrapping_sub(200));
    now.store(ticks(65536 * 3), Ordering::SeqCst);
    pit.poll();
    assert_eq!(pulses.load(Ordering::SeqCst), 1);
}

#[test]
fn mode_0_fires_once_at_terminal_count() {
    let (mut pit, now, pulses) = pit();
    pit.program(0, 0, 50);
    now.store(ticks(49), Ordering::SeqCst);
    assert!(pit.poll().is_some());
    assert_eq!(pulses.load(Ordering::SeqCst), 0);
    now.store(ticks(50), Ordering::SeqCst);
    assert_eq!(pit.poll(), None, "a one-shot that fired has no next edge");
    assert_eq!(pulses.load(Ordering::SeqCst), 1);
    now.store(ticks(500_000), Ordering::SeqCst);
    assert_eq!(pit.poll(), None);
    assert_eq!(pulses.load(Ordering::SeqCst), 1);
}

#[test]
fn an_unprogrammed_pit_raises_nothing() {
    let (mut pit, now, pulses) = pit();
    now.store(10_000_000_000, Ordering::SeqCst);
    assert_eq!(pit.poll(), None);
    assert_eq!(pulses.load(Ordering::SeqCst), 0);
}

#[test]
fn reprogramming_counter_0_restarts_its_period() {
    let (mut pit, now, pulses) = pit();
    pit.program(0, 2, 100);
    now.store(ticks(150), Ordering::SeqCst);
    pit.program(0, 2, 100);
    pit.poll();
    assert_eq!(pulses.load(Ordering::SeqCst), 0, "the old period's edge is not raised again");
    now.store(ticks(250), Ordering::SeqCst);
    pit.poll();
    assert_eq!(pulses.load(Ordering::SeqCst), 1);
}

#[test]
fn low_and_high_byte_access_modes() {
    let (mut pit, _now, _) = pit();
    // Counter 1, low byte only, mode 2.
    pit.write(3, &[0x54]);
    pit.write(1, &[0x34]);
    let mut b = [0u8; 1];
    pit.read(1, &mut b);
    assert_eq!(b[0], 0x34);
    // High byte only: count 0x1200.
    pit.write(3, &[0x64]);
    pit.write(1, &[0x12]);
    pit.read(1, &mut b);
    assert_eq!(b[0], 0x12);
}

#[test]
fn word_reads_of_the_live_count_alternate_low_then_high() {
    let (mut pit, _now, _) = pit();
    pit.program(2, 0, 0xabcd);
    let mut b = [0u8; 1];
    pit.read(2, &mut b);
    assert_eq!(b[0], 0xcd);
    pit.read(2, &mut b);
    assert_eq!(b[0], 0xab);
}

#[test]
fn read_back_latches_status_then_count() {
    let (mut pit, now, _) = pit();
    pit.program(2, 0, 10);
    now.store(ticks(20), Ordering::SeqCst);
    // Read-back of counter 2: count and status.
    pit.write(3, &[0xc0 | (1 << 3)]);
    let mut b = [0u8; 1];
    pit.read(2, &mut b);
    assert_eq!(b[0], 0x80 | (3 << 4), "output high after terminal count, word access, mode 0");
    pit.read(2, &mut b);
    let low = b[0];
    pit.read(2, &mut b);
    assert_eq!(u16::from(low) | (u16::from(b[0]) << 8), 10u16.wrapping_sub(20));
    // A control word leaves the status's null-count bit set until a count is written.
    pit.write(3, &[0xb0]);
    pit.write(3, &[0xe8]);
    pit.read(2, &mut b);
    assert_eq!(b[0] & 0x40, 0x40);
}

#[test]
fn speaker_port_gates_counter_2_and_shows_its_output() {
    let (pit, now, _) = pit();
    let shared = SharedPit::new(pit);
    let mut speaker = shared.port(PitWindow::Speaker, Box::new(|| {}));
    let mut counters = shared.port(PitWindow::Counters, Box::new(|| {}));
    // Mode 0 on counter 2 with the gate low, as a calibration loop does.
    counters.write(3, &[0xb0]);
    counters.write(2, &[100]);
    counters.write(2, &[0]);
    let mut b = [0u8; 1];
    speaker.read(0, &mut b);
    assert_eq!(b[0] & (SPEAKER_OUT2 | SPEAKER_GATE2), 0);
    speaker.write(0, &[SPEAKER_GATE2 | SPEAKER_DATA]);
    now.store(ticks(100), Ordering::SeqCst);
    speaker.read(0, &mut b);
    assert_eq!(b[0] & (SPEAKER_OUT2 | SPEAKER_GATE2 | SPEAKER_DATA), SPEAKER_OUT2 | SPEAKER_GATE2 | SPEAKER_DATA);
}

#[test]
fn the_refresh_bit_toggles() {
    let (pit, now, _) = pit();
    let shared = SharedPit::new(pit);
    let mut speaker = shared.port(PitWindow::Speaker, Box::new(|| {}));
    let mut seen = [false; 2];
    for step in 0..4 {
        now.store(step * 15_085, Ordering::SeqCst);
        let mut b = [0u8; 1];
        speaker.read(0, &mut b);
        seen[usize::from(b[0] & SPEAKER_REFRESH != 0)] = true;
    }
    assert_eq!(seen, [true, true]);
}

#[test]
fn writes_notify_the_poller_and_bad_offsets_are_harmless() {
    let (pit, _now, _) = pit();
    let shared = SharedPit::new(pit);
    let notified = Arc::new(AtomicUsize::new(0));
    let n = notified.clone();
    let mut counters = shared.port(
        PitWindow::Counters,
        Box::new(move || {
            n.fetch_add(1, Ordering::SeqCst);
        }),
    );
    counters.write(3, &[0x34]);
    counters.write(7, &[1]);
    assert_eq!(notified.load(Ordering::SeqCst), 2);
    let mut b = [0u8; 2];
    counters.read(3, &mut b);
    assert_eq!(b, [0xff, 0xff], "the control port is write-only");
    let mut speaker = shared.port(PitWindow::Speaker, Box::new(|| {}));
    speaker.read(4, &mut b);
    assert_eq!(b, [0xff, 0xff]);
}

#[test]
fn a_new_count_written_byte_by_byte_raises_no_extra_interrupt_before_it_is_whole() {
    let (mut pit, now, pulses) = pit();
    // Mode 0, lo/hi access, count 100: one pulse at terminal count.
    pit.write(3, &[0x30]);
    pit.write(0, &[100]);
    pit.write(0, &[0]);
    now.store(ticks(200), Ordering::SeqCst);
    pit.poll();
    pit.poll();
    assert_eq!(pulses.load(Ordering::SeqCst), 1);
    // A new count, its low byte first (no control word): the old count
    // runs on until the high byte, and its edge is not signalled again.
    pit.write(0, &[50]);
    pit.poll();
    assert_eq!(pulses.load(Ordering::SeqCst), 1, "the low byte alone raised IRQ 0 again");
    pit.write(0, &[0]);
    now.store(ticks(260), Ordering::SeqCst);
    pit.poll();
    assert_eq!(pulses.load(Ordering::SeqCst), 2, "the whole new count fires once");
}

#[test]
fn a_count_of_1_does_not_make_the_caller_poll_faster_than_the_minimum_period() {
    let (mut pit, now, pulses) = pit();
    pit.program(0, 2, 1);
    let wait = pit.poll().expect("periodic");
    assert_eq!(wait, Pit::MIN_POLL);
    // Edges in between are merged into one pulse per poll.
    now.store(Pit::MIN_POLL.as_nanos() as u64, Ordering::SeqCst);
    pit.poll();
    assert_eq!(pulses.load(Ordering::SeqCst), 1);
}
