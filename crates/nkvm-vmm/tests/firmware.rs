//! The BIOS state nkvm gives a multiboot kernel (kvm-unit-tests' machine),
//! checked by tiny guests that go back to real mode as `realmode.flat`
//! does: the IVT, the initialised 8259s and the PIT's 18.2 Hz tick; and
//! ACPI S3 as `s3.flat` uses it: sleep through PM1a control, wake on the
//! RTC alarm, resume in real mode at the FACS waking vector.

mod common;
mod nkvm_process;

use std::time::Duration;

use common::{elf32, run_kernel, write_temp};
use iced_x86::code_asm::*;

/// Where the guest is loaded: below 64 KiB, so real mode reaches it with
/// CS = 0, as kvm-unit-tests' realmode.flat (linked at 32 KiB).
const LOAD: u32 = 0x8000;
const GDT: u32 = LOAD + 0x100;
const GDTR: u32 = LOAD + 0x180;
const REAL_IDTR: u32 = LOAD + 0x188;
const REAL_CODE: u32 = LOAD + 0x200;
const REAL_BODY: u32 = LOAD + 0x280;
const TICK_HANDLER: u32 = LOAD + 0x600;
/// The guest's tick count.
const TICKS: u32 = 0x500;
const PASS: i32 = 0x11;
/// A bound on a run that works in well under a second.
const BOUND: Duration = Duration::from_secs(120);

fn out_code(a: &mut CodeAssembler, code: i32) {
    a.mov(al, code).unwrap();
    a.out(0xf4, al).unwrap();
    a.hlt().unwrap();
}

/// The 32-bit entry: a 16-bit GDT, then a far return into 16-bit code.
fn entry() -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    a.mov(esp, 0x7000).unwrap(); // multiboot gives no stack
    a.lgdt(ptr(GDTR)).unwrap();
    a.push(0x08).unwrap();
    a.push(REAL_CODE as i32).unwrap();
    a.retf().unwrap();
    a.assemble(u64::from(LOAD)).unwrap()
}

/// The 16-bit protected-mode stub: leaves protected mode and far-returns
/// to [`REAL_BODY`] with CS = 0.
fn leave_protected_mode() -> Vec<u8> {
    let mut a = CodeAssembler::new(16).unwrap();
    a.mov(ax, 0x10).unwrap();
    a.mov(ds, ax).unwrap();
    a.mov(ss, ax).unwrap();
    a.mov(eax, cr0).unwrap();
    a.and(eax, !1i32).unwrap();
    a.mov(cr0, eax).unwrap();
    a.push(0).unwrap();
    a.push(REAL_BODY as i32).unwrap();
    a.retf().unwrap();
    a.assemble(u64::from(REAL_CODE)).unwrap()
}

/// Real mode: DS = SS = 0, the real-mode IDT at 0, then `body`.
fn real_mode(body: impl FnOnce(&mut CodeAssembler)) -> Vec<u8> {
    let mut a = CodeAssembler::new(16).unwrap();
    a.xor(ax, ax).unwrap();
    a.mov(ds, ax).unwrap();
    a.mov(ss, ax).unwrap();
    a.mov(sp, 0x7000).unwrap();
    a.lidt(ptr(REAL_IDTR)).unwrap();
    body(&mut a);
    a.assemble(u64::from(REAL_BODY)).unwrap()
}

/// Counts a tick and sends the master 8259 its EOI.
fn tick_handler() -> Vec<u8> {
    let mut a = CodeAssembler::new(16).unwrap();
    a.inc(word_ptr(TICKS)).unwrap();
    a.push(ax).unwrap();
    a.mov(al, 0x20).unwrap();
    a.out(0x20, al).unwrap();
    a.pop(ax).unwrap();
    a.iret().unwrap();
    a.assemble(u64::from(TICK_HANDLER)).unwrap()
}

/// The kernel image: entry, GDT, descriptors, real-mode code, handler.
fn image(body: impl FnOnce(&mut CodeAssembler)) -> Vec<u8> {
    let mut code = entry();
    let mut place = |at: u32, bytes: &[u8]| {
        let at = (at - LOAD) as usize;
        assert!(code.len() <= at, "pieces overlap at {at:#x}");
        code.resize(at, 0);
        code.extend_from_slice(bytes);
    };
    let gdt: Vec<u8> = [0u64, 0x9b00_0000_ffff, 0x9300_0000_ffff].iter().flat_map(|d| d.to_le_bytes()).collect();
    place(GDT, &gdt);
    let mut gdtr = 23u16.to_le_bytes().to_vec();
    gdtr.extend_from_slice(&GDT.to_le_bytes());
    place(GDTR, &gdtr);
    let mut idtr = 0x3ffu16.to_le_bytes().to_vec();
    idtr.extend_from_slice(&0u32.to_le_bytes());
    place(REAL_IDTR, &idtr);
    place(REAL_CODE, &leave_protected_mode());
    place(REAL_BODY, &real_mode(body));
    place(TICK_HANDLER, &tick_handler());
    elf32(&code, LOAD)
}

/// Latches PIT counter 0 and reads it into `bx`.
fn read_counter0(a: &mut CodeAssembler) {
    a.mov(al, 0x00).unwrap();
    a.out(0x43, al).unwrap();
    a.in_(al, 0x40).unwrap();
    a.mov(bl, al).unwrap();
    a.in_(al, 0x40).unwrap();
    a.mov(bh, al).unwrap();
}

/// The checks: (1) the IVT's timer vector points into the BIOS segment;
/// (2) `sti; hlt` returns three times (the firmware's handler EOIs each
/// tick); (3) with IRQ 0 masked, no tick reaches the guest's own handler
/// while PIT counter 0 wraps four times (two periods); (4) unmasked again,
/// ticks come. Each failure writes its own code to port 0xf4.
fn timer_checks(a: &mut CodeAssembler) {
    let mut fail1 = a.create_label();
    let mut fail3 = a.create_label();
    let mut fail4 = a.create_label();
    a.cmp(dword_ptr(8 * 4), 0xf000_fe00u32 as i32).unwrap();
    a.jne(fail1).unwrap();
    a.mov(cx, 3).unwrap();
    let mut halts = a.create_label();
    a.set_label(&mut halts).unwrap();
    a.sti().unwrap();
    a.hlt().unwrap();
    a.dec(cx).unwrap();
    a.jnz(halts).unwrap();
    // Mask IRQ 0; let a tick already on its way land (interrupts on), then
    // take the timer vector over.
    a.mov(al, 0xff).unwrap();
    a.out(0x21, al).unwrap();
    for _ in 0..8 {
        a.in_(al, 0x61).unwrap();
    }
    a.cli().unwrap();
    a.mov(word_ptr(TICKS), 0).unwrap();
    a.mov(dword_ptr(8 * 4), TICK_HANDLER as i32).unwrap();
    a.sti().unwrap();
    // Wait for four wraps of counter 0 (it counts down by 2 in mode 3).
    a.mov(cx, 4).unwrap();
    read_counter0(a);
    a.mov(dx, bx).unwrap();
    let mut wait = a.create_label();
    let mut no_wrap = a.create_label();
    a.set_label(&mut wait).unwrap();
    read_counter0(a);
    a.cmp(bx, dx).unwrap();
    a.mov(dx, bx).unwrap();
    a.jbe(no_wrap).unwrap();
    a.dec(cx).unwrap();
    a.set_label(&mut no_wrap).unwrap();
    a.test(cx, cx).unwrap();
    a.jnz(wait).unwrap();
    a.cmp(word_ptr(TICKS), 0).unwrap();
    a.jne(fail3).unwrap();
    // Unmask IRQ 0 (and the cascade) as the firmware left it: ticks resume.
    a.mov(al, 0xfa).unwrap();
    a.out(0x21, al).unwrap();
    a.hlt().unwrap();
    a.cli().unwrap();
    a.cmp(word_ptr(TICKS), 0).unwrap();
    a.je(fail4).unwrap();
    out_code(a, PASS);
    a.set_label(&mut fail1).unwrap();
    out_code(a, 1);
    a.set_label(&mut fail3).unwrap();
    out_code(a, 3);
    a.set_label(&mut fail4).unwrap();
    out_code(a, 4);
}

#[test]
fn real_mode_gets_the_bios_ivt_and_the_pit_tick_through_the_8259() {
    let kernel = write_temp("timer.flat", &image(timer_checks));
    let run = run_kernel(&kernel, &["--cpus", "1"], BOUND);
    assert_eq!(run.status, Some((PASS << 1) | 1), "(code << 1) | 1; None = still halted at the bound\n{}", run.stderr);
}

#[test]
fn with_irq_0_masked_hlt_is_never_woken_by_the_timer() {
    // The failure path of the above: IRQ 0 masked and nothing else to
    // wake it, `sti; hlt` sleeps until nkvm is stopped.
    let kernel = write_temp(
        "masked.flat",
        &image(|a| {
            a.mov(al, 0xff).unwrap();
            a.out(0x21, al).unwrap();
            a.sti().unwrap();
            a.hlt().unwrap();
            out_code(a, 1);
        }),
    );
    let run = run_kernel(&kernel, &["--cpus", "1"], Duration::from_secs(3));
    assert_eq!(run.status, None, "a masked timer woke the guest\n{}", run.stderr);
}

/// Where the S3 guest's resume code is: real mode reaches it as
/// `0x0880:0000`.
const RESUME: u32 = LOAD + 0x800;
/// A byte the guest sets before sleeping and reports after the wake.
const MARKER: u32 = 0x600;
const MARKER_BEFORE_SLEEP: i32 = 0x5a;
/// What the guest writes if it ran on after asking to sleep.
const MARKER_AFTER_SLEEP: i32 = 0x66;

/// 32-bit: find the FACS (64-byte aligned in 0xe0000-0xfffff), point its
/// waking vector at [`RESUME`], arm the RTC alarm for every second if
/// `arm_alarm`, set the marker, write SLP_TYP 1 | SLP_EN to PM1a control;
/// anything run after that overwrites the marker.
fn s3_entry(arm_alarm: bool) -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    let mut scan = a.create_label();
    let mut found = a.create_label();
    let mut not_found = a.create_label();
    a.mov(esp, 0x7000).unwrap();
    a.mov(esi, 0xe_0000).unwrap();
    a.set_label(&mut scan).unwrap();
    a.cmp(dword_ptr(esi), i32::from_le_bytes(*b"FACS")).unwrap();
    a.je(found).unwrap();
    a.add(esi, 64).unwrap();
    a.cmp(esi, 0x10_0000).unwrap();
    a.jb(scan).unwrap();
    a.set_label(&mut not_found).unwrap();
    a.mov(al, 2).unwrap();
    a.out(0xf4, al).unwrap();
    a.hlt().unwrap();
    a.set_label(&mut found).unwrap();
    a.mov(dword_ptr(esi + 12), RESUME as i32).unwrap();
    if arm_alarm {
        // Clear status C, every alarm byte "don't care", AIE on.
        a.mov(al, 0x0c).unwrap();
        a.out(0x70, al).unwrap();
        a.in_(al, 0x71).unwrap();
        for index in [1, 3, 5] {
            a.mov(al, index).unwrap();
            a.out(0x70, al).unwrap();
            a.mov(al, 0xc0).unwrap();
            a.out(0x71, al).unwrap();
        }
        a.mov(al, 0x0b).unwrap();
        a.out(0x70, al).unwrap();
        a.in_(al, 0x71).unwrap();
        a.or(al, 0x20).unwrap();
        a.out(0x71, al).unwrap();
    }
    a.mov(byte_ptr(MARKER), MARKER_BEFORE_SLEEP).unwrap();
    a.mov(dx, 0x604).unwrap();
    a.mov(ax, 0x2400).unwrap();
    a.out(dx, ax).unwrap();
    let mut ran_on = a.create_label();
    a.set_label(&mut ran_on).unwrap();
    a.mov(byte_ptr(MARKER), MARKER_AFTER_SLEEP).unwrap();
    a.jmp(ran_on).unwrap();
    a.assemble(u64::from(LOAD)).unwrap()
}

/// Real mode at `0x0880:0000`: report the marker on port 0xf4.
fn s3_resume() -> Vec<u8> {
    let mut a = CodeAssembler::new(16).unwrap();
    a.xor(ax, ax).unwrap();
    a.mov(ds, ax).unwrap();
    a.mov(al, byte_ptr(MARKER)).unwrap();
    a.out(0xf4, al).unwrap();
    a.hlt().unwrap();
    a.assemble(0).unwrap()
}

fn s3_image(arm_alarm: bool) -> Vec<u8> {
    let mut code = s3_entry(arm_alarm);
    let at = (RESUME - LOAD) as usize;
    assert!(code.len() <= at);
    code.resize(at, 0);
    code.extend_from_slice(&s3_resume());
    elf32(&code, LOAD)
}

#[test]
fn s3_sleeps_at_once_and_the_rtc_alarm_resumes_vcpu_0_in_real_mode_at_the_waking_vector() {
    let kernel = write_temp("s3.flat", &s3_image(true));
    for cpus in ["1", "2"] {
        let run = run_kernel(&kernel, &["--cpus", cpus], BOUND);
        assert_eq!(
            run.status,
            Some((MARKER_BEFORE_SLEEP << 1) | 1),
            "{cpus} vCPUs: {:#x} would mean the guest ran on after the PM1a write; None that it never woke\n{}",
            (MARKER_AFTER_SLEEP << 1) | 1,
            run.stderr
        );
        assert!(run.stderr.contains("S3: vCPU 0 resumes at 0880:0"), "{}", run.stderr);
    }
}

#[test]
fn without_a_wake_event_s3_sleeps_until_nkvm_is_stopped() {
    let kernel = write_temp("s3-no-alarm.flat", &s3_image(false));
    let run = run_kernel(&kernel, &["--cpus", "1"], Duration::from_secs(4));
    assert_eq!(run.status, None, "the machine woke or ended with no alarm armed\n{}", run.stderr);
    assert!(run.stderr.contains("S3: asleep") && !run.stderr.contains("resumes"), "{}", run.stderr);
}

/// A guest asleep in S3 has no vCPU in the guest to pause: `snapshot` and
/// `pause` are refused with the reason at once, and the API goes on
/// (they used to wait forever for the sleeping vCPUs, holding the lock
/// every later pause, resume and snapshot waited on).
#[test]
fn a_snapshot_or_pause_of_a_guest_asleep_in_s3_is_refused_not_hung_on() {
    let kernel = write_temp("s3-api.flat", &s3_image(false));
    let dir = nkvm_process::scratch("s3-api");
    let api = dir.join("api.sock");
    let mut vmm = nkvm_process::Vmm::run(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "32M",
        "--api-socket",
        api.to_str().unwrap(),
    ]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !api.exists() {
        assert!(std::time::Instant::now() < deadline, "no API socket: {}", vmm.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    // The guest's first instructions put it to sleep.
    std::thread::sleep(Duration::from_millis(1500));
    let snap = dir.join("snap");
    for command in [vec!["snapshot", snap.to_str().unwrap()], vec!["pause"]] {
        let mut child = nkvm_process::nkvm()
            .args(["ctl", "--api-socket", api.to_str().unwrap()])
            .args(&command)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let asked = std::time::Instant::now();
        while child.try_wait().unwrap().is_none() {
            if asked.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                panic!("{command:?} hung on the sleeping guest");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        let answer = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{command:?}: {answer}");
        assert!(answer.contains("asleep in ACPI S3"), "{command:?}: {answer}");
    }
    let info = nkvm_process::ctl(&api, &["info"]);
    assert_eq!(info["state"], "running", "{info}");
    vmm.kill();
    let _ = std::fs::remove_dir_all(&dir);
}
