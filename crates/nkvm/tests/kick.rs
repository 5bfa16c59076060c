//! A vCPU spinning in the guest can be kicked out from another thread, and a
//! kick sent while it is outside the guest is not lost.

mod common;

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::*;
use nkvm::{Exit, RunState};

fn spinning_guest(vm: &nkvm::Vm) -> nkvm::Vcpu {
    long_mode_guest(vm, 0, |a| {
        let mut spin = a.create_label();
        a.set_label(&mut spin).unwrap();
        a.pause().unwrap();
        a.jmp(spin).unwrap();
    })
}

#[test]
fn kick_forces_a_spinning_guest_out() {
    let vm = vm();
    let mut vcpu = spinning_guest(&vm);
    let kicker = vcpu.kicker();
    let (tx, rx) = mpsc::channel();
    let runner = thread::spawn(move || {
        let mut run = RunState::new();
        for _ in 0..3 {
            let exit = vcpu.enter_guest(&mut run).expect("enter_guest");
            tx.send(exit).unwrap();
        }
    });
    for _ in 0..3 {
        // The guest never exits by itself: only the kick can end each entry.
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err(), "guest left without a kick");
        kicker.kick();
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).expect("kick was lost"), Exit::Kicked);
    }
    runner.join().unwrap();
}

#[test]
fn kick_before_entry_makes_the_next_entry_return_at_once() {
    let vm = vm();
    let mut vcpu = spinning_guest(&vm);
    vcpu.kicker().kick();
    let mut run = RunState::new();
    assert_eq!(vcpu.enter_guest(&mut run).unwrap(), Exit::Kicked);
    // The kick is consumed: the next entry runs the guest again, until kicked.
    let kicker = vcpu.kicker();
    let t = thread::spawn(move || {
        thread::sleep(Duration::from_millis(50));
        kicker.kick();
    });
    assert_eq!(vcpu.enter_guest(&mut run).unwrap(), Exit::Kicked);
    t.join().unwrap();
}

#[test]
fn many_kicks_race_with_entries_without_losing_one() {
    // Kicks sent back-to-back while the vCPU thread re-enters: every round
    // must end with Kicked (none may be lost in the enter/leave window).
    let vm = vm();
    let mut vcpu = spinning_guest(&vm);
    let kicker = vcpu.kicker();
    let (tx, rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel::<Exit>();
    let runner = thread::spawn(move || {
        let mut run = RunState::new();
        while rx.recv().is_ok() {
            done_tx.send(vcpu.enter_guest(&mut run).unwrap()).unwrap();
        }
    });
    for round in 0..200 {
        tx.send(()).unwrap();
        if round % 2 == 0 {
            thread::yield_now();
        }
        kicker.kick();
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(10)).expect("kick lost"), Exit::Kicked);
    }
    drop(tx);
    runner.join().unwrap();
}
