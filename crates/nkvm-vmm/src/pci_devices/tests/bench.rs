//! A benchmark, not a check (ignored by default): a guest driving
//! virtio-blk with 4 KiB writes then 4 KiB reads at queue depth 1 and 32,
//! with the device in the VMM, in an nkvm device process, and behind
//! qemu-storage-daemon over vhost-user. It prints IOPS and the median
//! latency of each (at depth 32: of a batch of 32 requests, submitted with
//! one notify and awaited together), and the ratios to in-process. Run it
//! with
//!
//! ```text
//! cargo test --release -p nkvm-vmm --bin nkvm -- --ignored --nocapture virtio_blk_qd1
//! ```
//!
//! The guest timestamps each batch with `rdtsc` (submit, completion) into
//! its memory; the host converts ticks to time with the ticks and the
//! wall time between the guest's first submit and its last completion.
//! IOPS come from the median time from one batch's submit to the next's
//! (so a vCPU thread descheduled on a shared host does not weigh).

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
const REQUESTS: u64 = 8192;
/// Bytes per request.
const BLOCK: u32 = 4096;
/// The queue size the benchmark's driver sets (room for 32 chains of 3).
const QUEUE: u16 = 128;
/// Request headers, one per slot of a batch.
const HEADERS: u64 = 0x48_0000;
/// Status bytes, one per slot.
const STATUSES: u64 = 0x48_1000;
/// Data buffers, 4 KiB per slot.
const BUFFERS: u64 = 0x50_0000;

/// `VIRTIO_BLK_T_OUT` (write) or `VIRTIO_BLK_T_IN` (read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Write,
    Read,
}

/// The driver script (queue size [`QUEUE`]), then [`REQUESTS`] requests in
/// batches of `depth`: each batch made available with one move of the
/// available index and one notify, awaited on the used index, and
/// timestamped before the notify and after the last completion. The
/// descriptors, headers and ring slots are laid out by [`bench_rings`].
fn bench_code(bar: u64, depth: u64) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    let ops = driver_script(bar)
        .into_iter()
        .map(|op| match op {
            Op::Mmio(0x18, 2, _) => Op::Mmio(0x18, 2, u32::from(QUEUE)),
            other => other,
        })
        .collect();
    emit_ops(&mut a, bar, ops);
    let mut next = a.create_label();
    let mut wait = a.create_label();
    a.out(u32::from(START), eax).unwrap();
    a.xor(r12, r12).unwrap(); // requests made available so far
    a.mov(r13, TIMES).unwrap();
    a.set_label(&mut next).unwrap();
    a.add(r12, depth as i32).unwrap();
    a.rdtsc().unwrap();
    a.shl(rdx, 32).unwrap();
    a.or(rax, rdx).unwrap();
    a.mov(qword_ptr(r13), rax).unwrap();
    a.mov(rbx, AVAIL + 2).unwrap();
    a.mov(word_ptr(rbx), r12w).unwrap(); // avail.idx += depth
    a.mov(rbx, bar + 0x3000).unwrap();
    a.mov(word_ptr(rbx), 0).unwrap(); // notify queue 0
    a.mov(rbx, USED + 2).unwrap();
    a.set_label(&mut wait).unwrap();
    a.movzx(eax, word_ptr(rbx)).unwrap();
    a.cmp(ax, r12w).unwrap();
    a.jne(wait).unwrap();
    a.rdtsc().unwrap();
    a.shl(rdx, 32).unwrap();
    a.or(rax, rdx).unwrap();
    a.mov(qword_ptr(r13 + 8), rax).unwrap();
    a.add(r13, 16).unwrap();
    a.cmp(r12, REQUESTS as i32).unwrap();
    a.jb(next).unwrap();
    a.out(u32::from(FINISHED), eax).unwrap();
    let mut idle = a.create_label();
    a.set_label(&mut idle).unwrap();
    a.hlt().unwrap();
    a.jmp(idle).unwrap();
    a.assemble(ENTRY).unwrap()
}

/// One chain of 3 descriptors per slot of a batch (slot k: header k for
/// 4 KiB block k in `direction`, buffer k, status k), every ring slot
/// naming the chain its position in the batch uses, empty rings.
fn bench_rings(vm: &Vm, direction: Direction, depth: u64) {
    let desc = |addr: u64, len: u32, flags: u16, next: u16| {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        d
    };
    let data_flags = if direction == Direction::Read { 3 } else { 1 }; // NEXT (| WRITE)
    let mut table = Vec::new();
    for k in 0..depth {
        let first = (3 * k) as u16;
        table.extend(desc(HEADERS + 16 * k, 16, 1, first + 1));
        table.extend(desc(BUFFERS + u64::from(BLOCK) * k, BLOCK, data_flags, first + 2));
        table.extend(desc(STATUSES + k, 1, 2, 0));
        let mut header = [0u8; 16];
        header[0] = u8::from(direction == Direction::Write);
        header[8..16].copy_from_slice(&(8 * k).to_le_bytes());
        vm.write_memory(GuestAddress(HEADERS + 16 * k), &header).unwrap();
    }
    vm.write_memory(GuestAddress(DESC), &table).unwrap();
    let mut avail = vec![0u8; 4 + 2 * usize::from(QUEUE)];
    for slot in 0..u64::from(QUEUE) {
        let head = (3 * (slot % depth)) as u16;
        avail[4 + 2 * slot as usize..6 + 2 * slot as usize].copy_from_slice(&head.to_le_bytes());
    }
    vm.write_memory(GuestAddress(AVAIL), &avail).unwrap();
    vm.write_memory(GuestAddress(USED), &vec![0u8; 4 + 8 * usize::from(QUEUE)]).unwrap();
    vm.write_memory(GuestAddress(BUFFERS), &vec![0x5a; (BLOCK as u64 * depth) as usize]).unwrap();
}

/// One run's figures.
#[derive(Debug, Clone, Copy)]
struct Figures {
    iops: f64,
    median_us: f64,
}

/// Runs [`REQUESTS`] requests in `direction`, `depth` at a time, against
/// the disk `config` asks for.
fn measure(config: &PciConfig, direction: Direction, depth: u64) -> Figures {
    let (mut guest, _attached) = Guest::boot_with(config, &bench_code(BAR, depth));
    bench_rings(&guest.vm, direction, depth);
    assert!(guest.run_until_out(START, Duration::from_secs(60), |_| true).is_ok());
    let start = Instant::now();
    let done = guest.run_until_out(FINISHED, Duration::from_secs(600), |_| true);
    let wall = start.elapsed();
    assert!(done.is_ok(), "the guest finished its requests: {done:?}");
    let mut times = vec![0u8; (REQUESTS / depth) as usize * 16];
    guest.vm.memory().read(GuestAddress(TIMES), &mut times).unwrap();
    let stamps: Vec<(u64, u64)> = times
        .chunks(16)
        .map(|c| (u64::from_le_bytes(c[..8].try_into().unwrap()), u64::from_le_bytes(c[8..].try_into().unwrap())))
        .collect();
    let ticks = stamps[stamps.len() - 1].1 - stamps[0].0;
    let ns_per_tick = wall.as_nanos() as f64 / ticks as f64;
    let mut latencies: Vec<f64> = stamps.iter().map(|(s, c)| (c - s) as f64 * ns_per_tick / 1000.0).collect();
    latencies.sort_by(f64::total_cmp);
    // IOPS from the median time from one batch's submit to the next's: on
    // a shared host a vCPU thread descheduled for milliseconds would
    // dominate a total, not a median.
    let mut cycles: Vec<f64> = stamps.windows(2).map(|w| (w[1].0 - w[0].0) as f64 * ns_per_tick).collect();
    cycles.sort_by(f64::total_cmp);
    let cycle_ns = cycles[cycles.len() / 2];
    Figures { iops: depth as f64 * 1e9 / cycle_ns, median_us: latencies[latencies.len() / 2] }
}

#[test]
#[ignore = "a benchmark: run it with --ignored --nocapture"]
fn virtio_blk_qd1_in_process_vs_device_process_vs_vhost_user() {
    let _ = nkvm_exe();
    let image = std::env::temp_dir().join(format!("nkvm-bench-{}.img", std::process::id()));
    std::fs::write(&image, vec![0u8; 64 * BLOCK as usize]).unwrap();
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
    println!("virtio-blk, 4 KiB, {REQUESTS} requests per run; median µs: of a request (QD1), of a batch (QD32)");
    println!("{:<34} {:>6} {:>4} {:>10} {:>12} {:>8}", "device", "op", "QD", "IOPS", "median µs", "ratio");
    for depth in [1, 32] {
        for direction in [Direction::Write, Direction::Read] {
            let mut base = None;
            for (name, config) in &setups {
                let f = measure(config, direction, depth);
                let ratio = f.iops / *base.get_or_insert(f.iops);
                let op = format!("{direction:?}");
                println!("{name:<34} {op:>6} {depth:>4} {:>10.0} {:>12.1} {ratio:>7.2}x", f.iops, f.median_us);
            }
        }
    }
    let _ = std::fs::remove_file(&image);
}
