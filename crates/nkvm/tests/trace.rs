//! Every exit can be observed by a tracer: one record per exit, in order,
//! with the exit's data and timings; the statistics table counts them.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use iced_x86::code_asm::*;
use nkvm::{Exit, ExitRecord, ExitStats, LineTracer, Tracer};

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<ExitRecord>>>);

impl Tracer for Recorder {
    fn on_exit(&mut self, record: &ExitRecord) {
        self.0.lock().unwrap().push(record.clone());
    }
}

#[test]
fn every_exit_reaches_the_tracer_in_order_with_timings() {
    let vm = vm();
    let mut vcpu = real_mode_guest(&vm, 0, |a| {
        a.mov(cx, 5u32).unwrap();
        let mut again = a.create_label();
        a.set_label(&mut again).unwrap();
        a.out(0x10, al).unwrap();
        a.in_(al, 0x20).unwrap();
        a.loop_(again).unwrap();
        a.hlt().unwrap();
    });
    let recorder = Recorder::default();
    let stats = ExitStats::new();
    vcpu.add_tracer(Box::new(recorder.clone()));
    vcpu.add_tracer(stats.tracer());
    let exits = run_to_hlt(&mut vcpu, |_| 7);
    drop(vcpu); // flushes the last record (the hlt)
    let records = recorder.0.lock().unwrap().clone();
    assert_eq!(records.len(), exits.len() + 1);
    for (i, (rec, exit)) in records.iter().zip(exits.iter()).enumerate() {
        assert_eq!(rec.seq, i as u64);
        assert_eq!(&rec.exit, exit);
        assert!(rec.handler_time.is_some());
        assert!(!rec.guest_time.is_zero());
    }
    let last = records.last().unwrap();
    assert_eq!(last.exit, Exit::Hlt);
    assert!(last.handler_time.is_none());
    let rows = stats.rows();
    let count = |reason: &str| rows.iter().find(|r| r.reason == reason).map(|r| r.count);
    assert_eq!(count("io-out"), Some(5));
    assert_eq!(count("io-in"), Some(5));
    assert_eq!(count("hlt"), Some(1));
}

#[test]
fn line_tracer_prints_one_line_per_exit() {
    let vm = vm();
    let mut vcpu = real_mode_guest(&vm, 0, |a| {
        a.mov(al, 0x41).unwrap();
        a.mov(dx, 0x3f8u32).unwrap();
        a.out(dx, al).unwrap();
        a.hlt().unwrap();
    });
    let buf = SharedBuf::default();
    vcpu.add_tracer(Box::new(LineTracer::new(buf.clone())));
    run_to_hlt(&mut vcpu, |_| 0);
    drop(vcpu);
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].starts_with("vcpu=0 #0 io-out port=0x03f8 size=1 data=0x41 guest="), "{text}");
    assert!(lines[1].starts_with("vcpu=0 #1 hlt"), "{text}");
}

#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for SharedBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
