//! One dirty log for every writer: the pages a virtio-blk read writes (its
//! data buffer, its status byte, the used ring) reach the VM's dirty log
//! whether the block device runs in process, in an nkvm device process, or
//! in qemu-storage-daemon — the last two through vhost-user's shared log
//! (`VHOST_USER_SET_LOG_BASE`). Each write is reported once; pages the
//! device only reads are not reported.

use std::collections::BTreeSet;
use std::sync::Mutex;

use super::process::in_a_process;
use super::*;
use crate::pci_devices::device_process::{ProcessLog, VirtioProcess};
use crate::virtio_process::NO_DIRTY_LOG_ENV;

/// Pages a read request makes the device write, with what they are.
const WRITTEN: [(&str, u64); 3] =
    [("the read's data buffer", DATA2), ("its status byte", STATUS2), ("the used ring", USED)];
/// Pages the device only reads.
const ONLY_READ: [(&str, u64); 3] =
    [("the descriptor table", DESC), ("the available ring", AVAIL), ("the write's data", DATA)];

/// Turns dirty logging on for all of the guest's memory.
fn start_dirty_log(vm: &Vm) {
    let map = vm.memory();
    let logged = map.regions().iter().map(|r| r.clone().dirty_logged()).collect();
    vm.set_memory_map(nkvm::MemoryMap::new(logged).unwrap()).unwrap();
}

/// Syncs and collects every dirty page of the guest.
fn collect(vm: &Vm) -> BTreeSet<u64> {
    let end = vm.memory().regions().iter().map(|r| r.end()).max().unwrap();
    vm.sync_dirty_log().unwrap();
    let pages = vm.collect_dirty(GuestAddress(0), end, usize::MAX).unwrap();
    assert!(pages.next.is_none(), "no budget was set");
    pages.pages.into_iter().map(|g| g.0).collect()
}

/// Collects until every page of `want` has been reported (a backend may
/// make the used index visible a moment before it logs the batch; it never
/// fails to log it), and returns all the pages collected on the way.
fn collect_until(vm: &Vm, want: &[(&str, u64)]) -> BTreeSet<u64> {
    let mut pages = BTreeSet::new();
    let start = Instant::now();
    loop {
        pages.extend(collect(vm));
        let missing: Vec<_> = want.iter().filter(|(_, gpa)| !pages.contains(gpa)).collect();
        if missing.is_empty() {
            return pages;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{missing:x?} never reached the dirty log: {pages:x?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Boots a guest with `config`, turns dirty logging on, runs the driver
/// script (a write of sector 1, a read of sector 2 into [`DATA2`]) and
/// checks the log: the pages the device wrote are reported, once; the
/// pages it only read are not. Returns the guest and what `attach` started.
fn device_writes_are_logged(config: &PciConfig, image: &Path) -> (Guest, Attached) {
    let (mut guest, attached) = Guest::boot_with(config, &guest_code(BAR));
    start_dirty_log(&guest.vm);
    // What the test itself wrote (code, tables, requests) goes here.
    collect(&guest.vm);
    assert!(collect(&guest.vm).is_empty(), "nothing written since the last collection");
    guest.expect_disk_io(image);
    let pages = collect_until(&guest.vm, &WRITTEN);
    for (what, gpa) in ONLY_READ {
        assert!(!pages.contains(&gpa), "{what} at {gpa:#x} was only read, yet is in the dirty log");
    }
    // Taken once: the device's bits were cleared as they were folded in.
    let again = collect(&guest.vm);
    for (what, gpa) in WRITTEN {
        assert!(!again.contains(&gpa), "{what} at {gpa:#x} reported twice");
    }
    (guest, attached)
}

#[test]
fn pages_an_in_process_disk_writes_are_in_the_dirty_log_once() {
    let image = test_image("dirty-in-process");
    let config = PciConfig { disk: Some(Disk::Image(image.clone())), ..Default::default() };
    device_writes_are_logged(&config, &image);
    let _ = std::fs::remove_file(&image);
}

#[test]
fn pages_a_device_process_writes_are_in_the_dirty_log_once() {
    let image = test_image("dirty-process");
    device_writes_are_logged(&in_a_process(&image), &image);
    let _ = std::fs::remove_file(&image);
}

#[test]
fn pages_qemu_storage_daemon_writes_are_in_the_dirty_log_once() {
    let image = test_image("dirty-qsd");
    let socket = image.with_extension("sock");
    let _daemon = StorageDaemon::start(&image, &socket);
    let config = PciConfig { disk: Some(Disk::VhostUser(socket.clone())), ..Default::default() };
    device_writes_are_logged(&config, &image);
    let _ = std::fs::remove_file(&image);
}

/// A device process killed after serving the guest is restarted and takes
/// the queues where the guest's used ring is; it is handed the same log,
/// so what it writes from then on is logged too. The test rewinds the used
/// ring before the kill, so the new process serves both requests again.
#[test]
fn a_restarted_device_process_logs_into_the_same_log() {
    let image = test_image("dirty-restart");
    let (guest, attached) = device_writes_are_logged(&in_a_process(&image), &image);
    let log: Arc<Mutex<ProcessLog>> = attached.block_process.clone().expect("a device process");
    // Rewind: used index 0, the read's buffer and status cleared.
    guest.vm.write_memory(GuestAddress(USED), &[0u8; 64]).unwrap();
    guest.vm.write_memory(GuestAddress(DATA2), &[0u8; 512]).unwrap();
    guest.vm.write_memory(GuestAddress(STATUS2), &[0xee]).unwrap();
    collect(&guest.vm);
    assert!(collect(&guest.vm).is_empty(), "nothing written since the last collection");
    let pid = log.lock().unwrap().pid;
    let killed = Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap();
    assert!(killed.success());
    // The watcher restarts it and hands it the queues; it serves the two
    // requests again (its predecessor's completions were rewound).
    let pages = collect_until(&guest.vm, &WRITTEN);
    assert_eq!(log.lock().unwrap().restarts, 1, "one restart");
    check_disk_io(&guest.vm, &image);
    // A restart marks every page: the dead process may have completed
    // requests before it logged their buffers.
    for (what, gpa) in ONLY_READ {
        assert!(pages.contains(&gpa), "{what} at {gpa:#x}: after a restart every page is reported");
    }
    let _ = std::fs::remove_file(&image);
}

/// A vhost-user-blk device connected to the backend at `socket`, over the
/// RAM of a fresh VM, and what keeps that RAM mapped.
fn connect(socket: &Path) -> (VhostUserDevice, RamKeeper) {
    let hv = Hypervisor::open().expect("this test needs /dev/kvm");
    let vm = Vm::new(&hv, &VmConfig { vcpus: 1, memory: 16 << 20, ..Default::default() }).unwrap();
    // SAFETY: the keeper is handed back beside the device.
    let (mem, keeper) = unsafe { guest_ram(&vm).unwrap() };
    (VhostUserDevice::connect(socket, vhost_user::BLOCK, mem).unwrap(), keeper)
}

/// nkvm's device process for `image`, with `env`, and what keeps the RAM
/// it is given mapped.
fn device_process(image: &Path, env: Vec<(String, String)>) -> (VhostUserDevice, RamKeeper) {
    let config = PciConfig { device_process_env: env, ..in_a_process(image) };
    let process = VirtioProcess::spawn(config.process_spec(vhost_user::BLOCK.name, Some(image.into()))).unwrap();
    let hv = Hypervisor::open().expect("this test needs /dev/kvm");
    let vm = Vm::new(&hv, &VmConfig { vcpus: 1, memory: 16 << 20, ..Default::default() }).unwrap();
    // SAFETY: the keeper is handed back beside the device.
    let (mem, keeper) = unsafe { guest_ram(&vm).unwrap() };
    (VhostUserDevice::connect_process(process, vhost_user::BLOCK, mem).unwrap(), keeper)
}

#[test]
fn backends_that_offer_a_shared_log_log_their_writes_and_others_do_not() {
    let image = test_image("dirty-offers");
    let socket = image.with_extension("sock");
    let _daemon = StorageDaemon::start(&image, &socket);
    let (qsd, _ram) = connect(&socket);
    // What qemu-storage-daemon offers, for the record (`--nocapture`).
    eprintln!("qemu-storage-daemon: {qsd:?}");
    assert!(qsd.logs_writes(), "qemu-storage-daemon offers LOG_SHMFD and VHOST_F_LOG_ALL: {qsd:?}");
    assert!(device_process(&image, Vec::new()).0.logs_writes(), "nkvm's device process offers both");
    let (without, _ram) = device_process(&image, vec![(NO_DIRTY_LOG_ENV.into(), "1".into())]);
    assert!(!without.logs_writes(), "a backend offering neither: {without:?}");
    let _ = std::fs::remove_file(&image);
}

/// A backend without dirty logging serves the guest all the same (nkvm
/// warns once); the pages it writes are then missing from the VM's dirty
/// log, as `VhostUserDevice::logs_writes` says.
#[test]
fn a_backend_without_a_shared_log_serves_the_guest_but_its_writes_are_not_logged() {
    let image = test_image("dirty-unlogged");
    let mut config = in_a_process(&image);
    config.device_process_env = vec![(NO_DIRTY_LOG_ENV.into(), "1".into())];
    let (mut guest, _attached) = Guest::boot_with(&config, &guest_code(BAR));
    start_dirty_log(&guest.vm);
    collect(&guest.vm);
    guest.expect_disk_io(&image);
    let pages = collect(&guest.vm);
    for (what, gpa) in WRITTEN {
        assert!(!pages.contains(&gpa), "{what} at {gpa:#x} is logged, yet the backend was given no log");
    }
    let _ = std::fs::remove_file(&image);
}

/// qemu-storage-daemon goes away and comes back: the guest's next set-up
/// hands the new one the same log, and what it writes is logged.
#[test]
fn a_vhost_user_backend_that_comes_back_logs_into_the_same_log() {
    let image = test_image("dirty-qsd-back");
    let socket = image.with_extension("sock");
    let mut daemon = StorageDaemon::start(&image, &socket);
    let config = PciConfig { disk: Some(Disk::VhostUser(socket.clone())), ..Default::default() };
    let (mut guest, _attached) = device_writes_are_logged(&config, &image);
    daemon.kill();
    let failed = guest.run_until_out(STATUS_PORT, Duration::from_secs(10), |s| s & 0x40 != 0);
    assert_eq!(failed, Ok(0x4f), "DEVICE_NEEDS_RESET once the backend is gone");
    drop(daemon);
    let _daemon = StorageDaemon::start(&image, &socket);
    // Until nkvm has reconnected, the set-up fails; the guest tries again.
    // What the test wrote at each restart (fresh requests, the rings) goes here.
    until_reconnected(&mut guest, |guest| {
        collect(&guest.vm);
    });
    check_disk_io(&guest.vm, &image);
    let pages = collect_until(&guest.vm, &WRITTEN);
    for (what, gpa) in ONLY_READ {
        assert!(!pages.contains(&gpa), "{what} at {gpa:#x} was only read, yet is in the dirty log");
    }
    let _ = std::fs::remove_file(&image);
}
