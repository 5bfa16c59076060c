//! The `nkvm` binary, run as a user would: the built-in guest boots on
//! /dev/kvm, tracing and statistics print, bad input gets one clear line.

mod common;

use std::process::{Command, Output};

use common::{nkvm, text, tiny_bzimage};

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
fn an_api_socket_path_that_is_a_file_is_refused_and_the_file_kept() {
    let path = std::env::temp_dir().join(format!("nkvm-cli-precious-{}", std::process::id()));
    std::fs::write(&path, b"precious").unwrap();
    let out = nkvm(&["run", "--api-socket", path.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("exists and is not a socket"), "{stderr}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious", "the file is left as it was");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn bad_input_is_one_line_and_a_nonzero_exit() {
    for (args, needle) in [
        (vec!["run", "--memory", "512X"], "invalid size \"512X\""),
        (vec!["run", "--cpus", "100000"], "vCPUs requested but this host's KVM allows at most"),
        (vec!["run", "--cpus", "0"], "at least one vCPU"),
        (vec!["run", "--memory", "4097"], "multiple of 4 KiB"),
        (vec!["run", "--cpus", "62"], "the built-in guest runs on at most 48 vCPUs (62 requested)"),
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

/// Boots `code` as a kernel on 2 vCPUs; kills nkvm after 60 s (a guest
/// waiting with `hlt` for an interrupt that never comes waits in KVM).
fn run_tiny_kernel(name: &str, code: &[u8]) -> Output {
    run_tiny_kernel_with(name, code, &[])
}

/// [`run_tiny_kernel`] with more `nkvm run` arguments.
fn run_tiny_kernel_with(name: &str, code: &[u8], extra: &[&str]) -> Output {
    let path = std::env::temp_dir().join(format!("nkvm-tiny-{name}-{}", std::process::id()));
    std::fs::write(&path, tiny_bzimage(code)).expect("write the tiny kernel");
    let mut child = Command::new(env!("CARGO_BIN_EXE_nkvm"))
        .args(["run", "--kernel", path.to_str().unwrap(), "--cpus", "2", "--memory", "64M"])
        .args(extra)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run nkvm");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().expect("wait for nkvm").is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("nkvm output");
    let _ = std::fs::remove_file(&path);
    out
}

/// 64-bit code at the tiny kernel's entry: `build`'s, then a `hlt` loop
/// (the label `build` gets, to give up).
fn assemble(
    build: impl FnOnce(
        &mut iced_x86::code_asm::CodeAssembler,
        iced_x86::code_asm::CodeLabel,
    ) -> Result<(), iced_x86::IcedError>,
) -> Vec<u8> {
    let mut a = iced_x86::code_asm::CodeAssembler::new(64).unwrap();
    let mut hang = a.create_label();
    build(&mut a, hang).unwrap();
    a.set_label(&mut hang).unwrap();
    a.hlt().unwrap();
    a.jmp(hang).unwrap();
    a.assemble(0x10_0200).unwrap()
}

#[test]
fn a_kernel_that_pulse_resets_through_the_8042_ends_nkvm_with_success() {
    use iced_x86::code_asm::*;
    let code = assemble(|a, hang| {
        a.in_(al, 0x64)?; // the 8042 status: its input buffer must be empty
        a.test(al, 2)?;
        a.jnz(hang)?;
        a.mov(al, 0xfe)?; // pulse reset
        a.out(0x64, al)
    });
    let out = run_tiny_kernel("reset", &code);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "status {:?}: {stderr}", out.status);
    assert!(stderr.contains("nkvm: guest reset"), "{stderr}");
}

#[test]
fn a_kernel_that_resets_through_the_acpi_reset_register_ends_nkvm_with_success() {
    use iced_x86::code_asm::*;
    // 0xcf9 shares its ports with PCI configuration: a dword at 0xcf8 is a
    // config address, a byte at 0xcf9 with bit 2 set is a reset.
    let code = assemble(|a, _hang| {
        a.mov(dx, 0xcf8)?;
        a.mov(eax, 0x8000_0000u32)?;
        a.out(dx, eax)?;
        a.mov(dx, 0xcf9)?;
        a.mov(al, 0x06)?;
        a.out(dx, al)
    });
    let out = run_tiny_kernel("reset-cf9", &code);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "status {:?}: {stderr}", out.status);
    assert!(stderr.contains("nkvm: guest reset"), "{stderr}");
}

#[test]
fn a_kernel_that_enters_s5_through_pm1a_control_powers_off() {
    use iced_x86::code_asm::*;
    // As ACPICA does: read PM1a control (SCI_EN set), add SLP_TYP 5 and SLP_EN.
    let code = assemble(|a, _| {
        a.mov(dx, 0x604)?;
        a.in_(ax, dx)?;
        a.or(ax, 0x3400)?;
        a.out(dx, ax)
    });
    let out = run_tiny_kernel("poweroff", &code);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "status {:?}: {stderr}", out.status);
    assert!(!stderr.contains("guest reset"), "{stderr}");
}

#[test]
fn the_serial_interrupt_reaches_the_guest_through_ioapic_pin_4() {
    serial_interrupt_reaches_pin_4("serial-irq", &[]);
}

#[test]
fn the_interrupt_of_a_16550_in_a_device_process_reaches_ioapic_pin_4() {
    serial_interrupt_reaches_pin_4("serial-irq-process", &["--device-process"]);
}

/// A guest that waits for COM1's transmitter-empty interrupt (IOAPIC pin
/// 4) after one byte, and powers off when it comes.
fn serial_interrupt_reaches_pin_4(name: &str, extra: &[&str]) {
    use iced_x86::code_asm::*;
    const IDT: u64 = 0x20_0000;
    const VECTOR: u64 = 0x40;
    let code = assemble(|a, hang| {
        let mut handler = a.create_label();
        // An IDT whose only gate, VECTOR, leads to `handler`.
        a.lea(rax, ptr(handler))?;
        a.mov(rdi, IDT + VECTOR * 16)?;
        a.mov(word_ptr(rdi), ax)?;
        a.mov(word_ptr(rdi + 2), 0x08)?;
        a.mov(word_ptr(rdi + 4), 0x8e00)?;
        a.shr(rax, 16)?;
        a.mov(word_ptr(rdi + 6), ax)?;
        a.shr(rax, 16)?;
        a.mov(dword_ptr(rdi + 8), eax)?;
        a.mov(rdi, IDT + 0x1000)?;
        a.mov(word_ptr(rdi), 0xfff)?;
        a.mov(rax, IDT)?;
        a.mov(qword_ptr(rdi + 2), rax)?;
        a.lidt(ptr(rdi))?;
        a.mov(rax, 0xfee0_00f0u64)?; // enable the local APIC
        a.mov(dword_ptr(rax), 0x1ff)?;
        // IOAPIC pin 4: edge, active high, fixed, VECTOR, to APIC 0.
        a.mov(rbx, 0xfec0_0000u64)?;
        a.mov(dword_ptr(rbx), 0x11 + 2 * 4)?;
        a.mov(dword_ptr(rbx + 0x10), 0)?;
        a.mov(dword_ptr(rbx), 0x10 + 2 * 4)?;
        a.mov(dword_ptr(rbx + 0x10), VECTOR as u32)?;
        // COM1: OUT2, the transmitter-empty interrupt, one byte out.
        a.mov(dx, 0x3fc)?;
        a.mov(al, 0x08)?;
        a.out(dx, al)?;
        a.mov(dx, 0x3f9)?;
        a.mov(al, 0x02)?;
        a.out(dx, al)?;
        a.mov(dx, 0x3f8)?;
        a.mov(al, b'!' as u32)?;
        a.out(dx, al)?;
        a.sti()?;
        a.jmp(hang)?;
        // The interrupt arrived: power off.
        a.set_label(&mut handler)?;
        a.mov(dx, 0x604)?;
        a.mov(ax, 0x3400)?;
        a.out(dx, ax)
    });
    let out = run_tiny_kernel_with(name, &code, extra);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "no interrupt within 60 s (status {:?}): {stderr}", out.status);
    assert_eq!(text(&out.stdout), "!");
}

#[test]
fn console_input_reaches_the_guest_and_ctrl_a_x_ends_it() {
    console_echo("echo", &[], false);
}

#[test]
fn console_input_reaches_a_16550_in_a_device_process_and_ctrl_a_x_ends_it() {
    console_echo("echo-process", &["--device-process"], false);
}

/// The 16550's process dies under a running guest: nkvm names the failed
/// device, drops what is typed from then on with one warning, and Ctrl-A x
/// still ends it.
#[test]
fn when_the_16550_process_dies_nkvm_says_so_and_ctrl_a_x_still_works() {
    console_echo("echo-process-dies", &["--device-process"], true);
}

/// The `nkvm device --model serial` child of the process `pid`.
fn serial_child(pid: u32) -> u32 {
    let children = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|task| std::fs::read_to_string(task.unwrap().path().join("children")).unwrap_or_default() + " ")
        .collect::<String>();
    children
        .split_whitespace()
        .map(|c| c.parse::<u32>().unwrap())
        .find(|c| {
            std::fs::read(format!("/proc/{c}/cmdline")).is_ok_and(|l| l.windows(15).any(|w| w == b"--model\0serial\0"))
        })
        .expect("a serial device process")
}

/// A guest that echoes what its 16550 receives: typed bytes come back, and
/// Ctrl-A x ends nkvm. With `kill_serial`, the 16550's device process is
/// killed after the echo, and a little more is typed before Ctrl-A x.
fn console_echo(name: &str, extra: &[&str], kill_serial: bool) {
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use iced_x86::code_asm::*;
    // Echo every byte the 16550 receives (polling its line status).
    let code = assemble(|a, _hang| {
        let mut poll = a.create_label();
        a.set_label(&mut poll)?;
        a.mov(dx, 0x3fd)?;
        a.in_(al, dx)?;
        a.test(al, 1)?;
        a.jz(poll)?;
        a.mov(dx, 0x3f8)?;
        a.in_(al, dx)?;
        a.out(dx, al)?;
        a.jmp(poll)
    });
    let path = std::env::temp_dir().join(format!("nkvm-tiny-{name}-{}", std::process::id()));
    std::fs::write(&path, tiny_bzimage(&code)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nkvm"))
        .args(["run", "--kernel", path.to_str().unwrap(), "--cpus", "1", "--memory", "64M"])
        .args(extra)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let echoed = Arc::new(Mutex::new(Vec::new()));
    let mut stdout = child.stdout.take().unwrap();
    let sink = echoed.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"hi\x01\x01").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while echoed.lock().unwrap().len() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if kill_serial {
        let serial = serial_child(child.id());
        Command::new("kill").args(["-9", &serial.to_string()]).status().unwrap();
        // Every thread gone (the fd table, and its end of the channel, go
        // with the last one) and the rest a zombie until nkvm reaps it.
        let dead = || {
            let zombie = std::fs::read_to_string(format!("/proc/{serial}/stat")).map_or(true, |s| s.contains(") Z "));
            let threads = std::fs::read_dir(format!("/proc/{serial}/task")).map_or(0, |d| d.count());
            zombie && threads <= 1
        };
        while !dead() {
            assert!(Instant::now() < deadline, "the serial device process did not die");
            std::thread::sleep(Duration::from_millis(10));
        }
        stdin.write_all(b"zz").unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    stdin.write_all(b"\x01x").unwrap();
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    reader.join().unwrap();
    let _ = std::fs::remove_file(&path);
    let stderr = text(&out.stderr);
    assert_eq!(
        *echoed.lock().unwrap(),
        b"hi\x01",
        "the guest echoes what was typed (Ctrl-A Ctrl-A is one Ctrl-A): {stderr}"
    );
    assert!(out.status.success(), "Ctrl-A x must end nkvm with 0: {:?} {stderr}", out.status);
    assert!(stderr.contains("guest ended from the console (Ctrl-A x)"), "{stderr}");
    if kill_serial {
        assert!(stderr.contains("nkvm: device serial device process failed"), "{stderr}");
        assert!(stderr.contains("console input is dropped from now on"), "{stderr}");
    }
}

/// A guest that reads nothing from its 16550, and more typed than the
/// UART's FIFO and backlog hold: Ctrl-A x after it still ends nkvm (its
/// reader used to wait for the UART to take bytes, and never read the
/// escape).
#[test]
fn ctrl_a_x_ends_a_guest_that_reads_none_of_what_was_typed_before_it() {
    use std::io::Write;
    use std::time::{Duration, Instant};
    let code = assemble(|a, hang| a.jmp(hang));
    let path = std::env::temp_dir().join(format!("nkvm-tiny-deaf-{}", std::process::id()));
    std::fs::write(&path, tiny_bzimage(&code)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nkvm"))
        .args(["run", "--kernel", path.to_str().unwrap(), "--cpus", "1", "--memory", "64M"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&[b'a'; 8000]).unwrap();
    stdin.write_all(b"\x01x").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_file(&path);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "Ctrl-A x must end nkvm with 0: {:?} {stderr}", out.status);
    assert!(stderr.contains("guest ended from the console (Ctrl-A x)"), "{stderr}");
}

#[test]
fn a_console_channel_that_is_not_a_socket_is_named() {
    let socket = std::env::temp_dir().join(format!("nkvm-cli-channel-{}.sock", std::process::id()));
    // stdin is /dev/null here, not the VMM's end of a socket pair.
    let out = nkvm(&["device", "--model", "serial", "--console-channel", "--socket", socket.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("--console-channel needs a stream socket on stdin"), "{stderr}");
    assert!(!socket.exists(), "nothing listens after the refusal");
}

#[test]
fn irq_pins_that_lead_nowhere_or_a_model_without_a_line_are_named() {
    let socket = std::env::temp_dir().join(format!("nkvm-cli-irq-pins-{}.sock", std::process::id()));
    let socket = socket.to_str().unwrap();
    let missing = std::env::temp_dir().join(format!("nkvm-no-such-pins-{}", std::process::id()));
    let missing = missing.to_str().unwrap();
    let out = nkvm(&["device", "--model", "pit", "--socket", socket, "--irq-pins", missing]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains(&format!("cannot connect to the pin socket {missing}")), "{stderr}");
    let out = nkvm(&["device", "--model", "cmos", "--socket", socket, "--irq-pins", missing]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("the cmos model has no interrupt line"), "{}", text(&out.stderr));
    let out = nkvm(&["device", "--model", "serial", "--console-channel", "--socket", socket, "--irq-pins", missing]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("cannot be used with"), "{}", text(&out.stderr));
    assert!(!std::path::Path::new(socket).exists(), "nothing listens after a refusal");
}

#[test]
fn a_virtio_blk_device_process_needs_a_disk_and_names_a_missing_one() {
    let socket = std::env::temp_dir().join(format!("nkvm-cli-virtio-blk-{}.sock", std::process::id()));
    let out = nkvm(&["device", "--model", "virtio-blk", "--socket", socket.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--disk"), "{}", text(&out.stderr));
    let missing = std::env::temp_dir().join("nkvm-no-such-image.img");
    let out = nkvm(&[
        "device",
        "--model",
        "virtio-blk",
        "--socket",
        socket.to_str().unwrap(),
        "--disk",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
}

#[test]
fn a_virtio_device_process_exits_when_its_vmm_hangs_up() {
    for model in ["virtio-console", "virtio-blk"] {
        let dir = std::env::temp_dir();
        let socket = dir.join(format!("nkvm-cli-hangup-{}-{model}.sock", std::process::id()));
        let image = dir.join(format!("nkvm-cli-hangup-{}.img", std::process::id()));
        std::fs::write(&image, [0u8; 4096]).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_nkvm"))
            .args(["device", "--model", model, "--socket", socket.to_str().unwrap()])
            .args(if model == "virtio-blk" { vec!["--disk", image.to_str().unwrap()] } else { vec![] })
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(&socket) {
                Ok(s) => break s,
                Err(e) if start.elapsed() > std::time::Duration::from_secs(10) => panic!("{model} never listened: {e}"),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
            }
        };
        drop(stream);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if start.elapsed() > std::time::Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(&image);
        assert!(status.is_some_and(|s| s.success()), "{model}: the process outlived its VMM ({status:?})");
    }
}
