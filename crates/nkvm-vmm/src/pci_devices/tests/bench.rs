//! A benchmark, not a check (ignored by default): a guest driving
//! virtio-blk with 4 KiB writes then 4 KiB reads at queue depth 1, with the
//! device in the VMM, in an nkvm device process, and behind
//! qemu-storage-daemon over vhost-user. It prints IOPS and the median
//! latency of each, and the ratios to in-process. Run it with
//!
//! ```text
//! cargo test --release -p nkvm-vmm --bin nkvm -- --ignored --nocapture virtio_blk_qd1
//! ```
//!
//! The guest timestamps each request with `rdtsc` (submit, completion)
//! into its memory; the host converts ticks to time with the ticks and the
//! wall time between the guest's first submit and its last completion.

use std::time::Instant;

use super::process::{in_a_process, nkvm_exe};
use super::*;

/// Where the guest says it starts its requests.
const START: u16 = 0x74;
/// Where it says it is done.
const FINISHED: u16 = 0x75;
/// The guest's timestamps: (submit, completion) per request.
const TIMES: u64 = 0x40_0000;
/// Requests per run.
const REQUESTS: u64 = 2000;
/// Bytes per request.
const BLOCK: u32 = 4096;
/// Distinct 4 KiB blocks the requests walk through.
const BLOCKS: u64 = 256;

/// `VIRTIO_BLK_T_OUT` (write) or `VIRTIO_BLK_T_IN` (read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Write,
    Read,
}

/// The driver script, then [`REQUESTS`] requests one at a time, each
/// timestamped before its notify and after its completion.
fn bench_code(bar: u64, direction: Direction) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    emit_driver_script(&mut a, bar);
    let mut next = a.create_label();
    let mut wait = a.create_label();
    a.out(u32::from(START), eax).unwrap();
    a.xor(r12, r12).unwrap();
    a.mov(r13, TIMES).unwrap();
    a.set_label(&mut next).unwrap();
    a.mov(rbx, HEADER).unwrap();
    a.mov(dword_ptr(rbx), u32::from(direction == Direction::Write)).unwrap();
    a.mov(rax, r12).unwrap();
    a.and(rax, (BLOCKS - 1) as i32).unwrap();
    a.shl(rax, 3).unwrap(); // 8 sectors a block
    a.mov(qword_ptr(rbx + 8), rax).unwrap();
    a.lea(rax, qword_ptr(r12 + 1)).unwrap();
    a.mov(rbx, AVAIL + 2).unwrap();
    a.rdtsc().unwrap();
    a.shl(rdx, 32).unwrap();
    a.or(rax, rdx).unwrap();
    a.mov(qword_ptr(r13), rax).unwrap();
    a.lea(rax, qword_ptr(r12 + 1)).unwrap();
    a.mov(word_ptr(rbx), ax).unwrap(); // avail.idx = i + 1
    a.mov(rbx, bar + 0x3000).unwrap();
    a.mov(word_ptr(rbx), 0).unwrap(); // notify queue 0
    a.lea(r14, qword_ptr(r12 + 1)).unwrap();
    a.mov(rbx, USED + 2).unwrap();
    a.set_label(&mut wait).unwrap();
    a.movzx(eax, word_ptr(rbx)).unwrap();
    a.cmp(ax, r14w).unwrap();
    a.jne(wait).unwrap();
    a.rdtsc().unwrap();
    a.shl(rdx, 32).unwrap();
    a.or(rax, rdx).unwrap();
    a.mov(qword_ptr(r13 + 8), rax).unwrap();
    a.add(r13, 16).unwrap();
    a.inc(r12).unwrap();
    a.cmp(r12, REQUESTS as i32).unwrap();
    a.jb(next).unwrap();
    a.out(u32::from(FINISHED), eax).unwrap();
    let mut idle = a.create_label();
    a.set_label(&mut idle).unwrap();
    a.hlt().unwrap();
    a.jmp(idle).unwrap();
    a.assemble(ENTRY).unwrap()
}

/// Chain 0 for one 4 KiB request in `direction`, empty rings.
fn bench_rings(vm: &Vm, direction: Direction) {
    let desc = |addr: u64, len: u32, flags: u16, next: u16| {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        d
    };
    let data_flags = if direction == Direction::Read { 3 } else { 1 }; // NEXT (| WRITE)
    let table = [desc(HEADER, 16, 1, 1), desc(DATA, BLOCK, data_flags, 2), desc(STATUS, 1, 2, 0)].concat();
    vm.write_memory(GuestAddress(DESC), &table).unwrap();
    vm.write_memory(GuestAddress(AVAIL), &[0u8; 64]).unwrap();
    vm.write_memory(GuestAddress(USED), &[0u8; 256]).unwrap();
    vm.write_memory(GuestAddress(DATA), &[0x5a; BLOCK as usize]).unwrap();
}

/// One run's figures.
#[derive(Debug, Clone, Copy)]
struct Figures {
    iops: f64,
    median_us: f64,
}

/// Runs [`REQUESTS`] requests in `direction` against the disk `config` asks for.
fn measure(config: &PciConfig, direction: Direction) -> Figures {
    let (mut guest, _attached) = Guest::boot_with(config, &bench_code(BAR, direction));
    bench_rings(&guest.vm, direction);
    assert!(guest.run_until_out(START, Duration::from_secs(60), |_| true).is_ok());
    let start = Instant::now();
    let done = guest.run_until_out(FINISHED, Duration::from_secs(600), |_| true);
    let wall = start.elapsed();
    assert!(done.is_ok(), "the guest finished its requests: {done:?}");
    let mut times = vec![0u8; REQUESTS as usize * 16];
    guest.vm.memory().read(GuestAddress(TIMES), &mut times).unwrap();
    let stamps: Vec<(u64, u64)> = times
        .chunks(16)
        .map(|c| (u64::from_le_bytes(c[..8].try_into().unwrap()), u64::from_le_bytes(c[8..].try_into().unwrap())))
        .collect();
    let ticks = stamps[stamps.len() - 1].1 - stamps[0].0;
    let ns_per_tick = wall.as_nanos() as f64 / ticks as f64;
    let mut latencies: Vec<f64> = stamps.iter().map(|(s, c)| (c - s) as f64 * ns_per_tick / 1000.0).collect();
    latencies.sort_by(f64::total_cmp);
    Figures { iops: REQUESTS as f64 / wall.as_secs_f64(), median_us: latencies[latencies.len() / 2] }
}

#[test]
#[ignore = "a benchmark: run it with --ignored --nocapture"]
fn virtio_blk_qd1_in_process_vs_device_process_vs_vhost_user() {
    let _ = nkvm_exe();
    let image = std::env::temp_dir().join(format!("nkvm-bench-{}.img", std::process::id()));
    std::fs::write(&image, vec![0u8; (BLOCKS * u64::from(BLOCK)) as usize]).unwrap();
    let socket = image.with_extension("sock");
    let _daemon = StorageDaemon::start(&image, &socket);
    let setups = [
        ("in process", PciConfig { disk: Some(Disk::Image(image.clone())), ..Default::default() }),
        ("device process", in_a_process(&image)),
        (
            "vhost-user (qemu-storage-daemon)",
            PciConfig { disk: Some(Disk::VhostUser(socket.clone())), ..Default::default() },
        ),
    ];
    println!("virtio-blk, 4 KiB, queue depth 1, {REQUESTS} requests per run");
    println!("{:<34} {:>6} {:>10} {:>12} {:>8}", "device", "op", "IOPS", "median µs", "ratio");
    for direction in [Direction::Write, Direction::Read] {
        let mut base = None;
        for (name, config) in &setups {
            let f = measure(config, direction);
            let ratio = f.iops / *base.get_or_insert(f.iops);
            println!("{name:<34} {:>6} {:>10.0} {:>12.1} {ratio:>7.2}x", format!("{direction:?}"), f.iops, f.median_us);
        }
    }
    let _ = std::fs::remove_file(&image);
}
