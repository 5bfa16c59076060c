//! The `nkvm` binary, run as a user would: the built-in guest boots on
//! /dev/kvm, tracing and statistics print, bad input gets one clear line.

use std::process::{Command, Output};

fn nkvm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nkvm")).args(args).output().expect("run nkvm")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn no_arguments_boots_the_builtin_guest_and_powers_off() {
    let out = nkvm(&[]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "status {:?}\nstdout:\n{stdout}\nstderr:\n{}", out.status, text(&out.stderr));
    for id in 0..2 {
        assert!(stdout.contains(&format!("Hello from the nkvm built-in guest on vCPU {id}")), "{stdout}");
    }
    assert!(stdout.contains("MMIO test device: scratch register and ID read back OK"), "{stdout}");
}

#[test]
fn every_vcpu_greets_in_turn() {
    let out = nkvm(&["run", "--cpus", "3", "--memory", "32M"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let order: Vec<&str> = stdout.lines().filter(|l| l.starts_with("Hello")).collect();
    assert_eq!(order.len(), 3, "{stdout}");
    for (i, line) in order.iter().enumerate() {
        assert!(line.ends_with(&format!("vCPU {i}")), "{stdout}");
    }
}

#[test]
fn trace_prints_one_line_per_exit() {
    let out = nkvm(&["run", "--cpus", "1", "--trace"]);
    assert!(out.status.success());
    let stderr = text(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("vcpu=0 #")).collect();
    assert!(lines.len() > 50, "{stderr}");
    assert!(lines.iter().any(|l| l.contains("io-out port=0x03f8 size=1 data=0x48")), "the 'H' of Hello: {stderr}");
    assert!(lines.iter().any(|l| l.contains("mmio-write addr=0xd0000020 size=4 data=0x6e6b766d")), "{stderr}");
    assert!(lines.iter().all(|l| l.contains(" guest=") && l.contains(" handler=")));
}

#[test]
fn stats_prints_a_table_per_reason() {
    let out = nkvm(&["run", "--stats"]);
    assert!(out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("exit reason"), "{stderr}");
    for reason in ["io-out", "io-in", "mmio-read", "mmio-write", "total"] {
        assert!(stderr.lines().any(|l| l.starts_with(reason)), "{reason} missing: {stderr}");
    }
}

#[test]
fn caps_prints_table_and_json() {
    let out = nkvm(&["caps"]);
    assert!(out.status.success());
    let table = text(&out.stdout);
    assert!(table.lines().any(|l| l.starts_with("api_version") && l.trim_end().ends_with("12")), "{table}");
    let out = nkvm(&["caps", "--json"]);
    let json = text(&out.stdout);
    assert!(json.trim_start().starts_with('{') && json.trim_end().ends_with('}'), "{json}");
    assert!(json.contains("\"api_version\": 12"), "{json}");
    assert!(json.contains("\"split_irqchip\": "), "{json}");
}

#[test]
fn bad_input_is_one_line_and_a_nonzero_exit() {
    for (args, needle) in [
        (vec!["run", "--memory", "512X"], "invalid size \"512X\""),
        (vec!["run", "--cpus", "100000"], "vCPUs requested but this host's KVM allows at most"),
        (vec!["run", "--cpus", "0"], "at least one vCPU"),
        (vec!["run", "--memory", "4097"], "multiple of 4 KiB"),
    ] {
        let out = nkvm(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let stderr = text(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "{stderr}");
    }
}

#[test]
fn device_process_boots_the_same_guest_with_devices_in_other_processes() {
    let out = nkvm(&["run", "--device-process", "--cpus", "2", "--trace"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{}", text(&out.stderr));
    for id in 0..2 {
        assert!(stdout.contains(&format!("Hello from the nkvm built-in guest on vCPU {id}")), "{stdout}");
    }
    assert!(stdout.contains("MMIO test device: scratch register and ID read back OK"), "{stdout}");
    // The serial and test device accesses still appear in the trace.
    let stderr = text(&out.stderr);
    assert!(stderr.contains("io-out port=0x03f8 size=1 data=0x48"), "{stderr}");
}
