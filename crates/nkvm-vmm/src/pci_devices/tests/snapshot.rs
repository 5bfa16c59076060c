//! Snapshot and restore of the PCI side with a real guest: the guest moves
//! BAR0, brings virtio-blk to DRIVER_OK and gets two requests served; the
//! machine is saved (vCPU, VM clock, RAM, the PCI devices) and restored
//! into a second VM attached with the same [`PciConfig`]. A request made
//! available before the save is served by the save; one found in the
//! copy's RAM, by the restore; one the guest notifies after the restore,
//! through the moved BAR's ioeventfd; each with its MSI-X interrupt.

use super::*;
use crate::saved::SavedDevices;

/// The guest polls this byte; non-zero: notify queue 0 once (and clear it).
const FLAG: u64 = 0x21_6000;
/// Request 3 (made available before the save, never notified): IN of
/// sector 1 into DATA3.
const HEADER3: u64 = 0x21_7000;
const DATA3: u64 = 0x21_8000;
const STATUS3: u64 = 0x21_9000;
/// Request 4 (found in the restored RAM, never notified): IN of sector 2.
const HEADER4: u64 = 0x21_a000;
const DATA4: u64 = 0x21_b000;
const STATUS4: u64 = 0x21_c000;
/// Request 5 (notified by the guest after the restore): OUT of sector 3.
const HEADER5: u64 = 0x21_d000;
const DATA5: u64 = 0x21_e000;
const STATUS5: u64 = 0x21_f000;
/// What request 5 writes.
const AFTER: &[u8] = b"WRITTEN-AFTER-THE-RESTORE";
/// Guest RAM of these VMs.
const RAM: usize = 16 << 20;

/// The driver script with BAR0 at `bar`, then an idle loop that reports
/// the device status and notifies queue 0 whenever the test sets [`FLAG`].
fn guest_code(bar: u64) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    emit_driver_script(&mut a, bar);
    a.sti().unwrap();
    let mut idle = a.create_label();
    a.set_label(&mut idle).unwrap();
    a.mov(rbx, bar + 0x14).unwrap();
    a.mov(al, byte_ptr(rbx)).unwrap();
    a.out(u32::from(STATUS_PORT), al).unwrap();
    a.pause().unwrap();
    a.mov(rbx, FLAG).unwrap();
    a.mov(al, byte_ptr(rbx)).unwrap();
    a.test(al, al).unwrap();
    a.jz(idle).unwrap();
    a.mov(byte_ptr(rbx), 0).unwrap();
    a.mov(rbx, bar + 0x3000).unwrap();
    a.xor(eax, eax).unwrap();
    a.mov(word_ptr(rbx), ax).unwrap();
    a.jmp(idle).unwrap();
    a.assemble(ENTRY).unwrap()
}

/// Makes a request of `type_` on `sector` available as chain `head`
/// (header, 512-byte data buffer, status), in avail slot `head / 3`.
fn make_available(vm: &Vm, head: u16, type_: u8, sector: u8, (header, data, status): (u64, u64, u64)) {
    let data_flags: u16 = if type_ == 0 { 3 } else { 1 }; // IN: NEXT | WRITE
    let mut table = Vec::new();
    for (addr, len, flags, next) in
        [(header, 16u32, 1u16, head + 1), (data, 512, data_flags, head + 2), (status, 1, 2, 0)]
    {
        table.extend_from_slice(&addr.to_le_bytes());
        table.extend_from_slice(&len.to_le_bytes());
        table.extend_from_slice(&flags.to_le_bytes());
        table.extend_from_slice(&next.to_le_bytes());
    }
    vm.write_memory(GuestAddress(DESC + 16 * u64::from(head)), &table).unwrap();
    let mut h = [0u8; 16];
    h[0] = type_;
    h[8] = sector;
    vm.write_memory(GuestAddress(header), &h).unwrap();
    vm.write_memory(GuestAddress(status), &[0xee]).unwrap();
    let slot = u64::from(head / 3);
    vm.write_memory(GuestAddress(AVAIL + 4 + 2 * slot), &head.to_le_bytes()).unwrap();
    vm.write_memory(GuestAddress(AVAIL + 2), &(head / 3 + 1).to_le_bytes()).unwrap();
}

fn read(vm: &Vm, gpa: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    vm.memory().read(GuestAddress(gpa), &mut buf).unwrap();
    buf
}

/// The used ring's index and its entry `n` (id, len), once the device has
/// written `want` entries (the worker serves off the vCPU thread).
fn used_entry(vm: &Vm, want: u16, n: u64) -> (u16, (u32, u32)) {
    let idx = |vm: &Vm| u16::from_le_bytes(read(vm, USED + 2, 2).try_into().unwrap());
    let start = Instant::now();
    while idx(vm) < want && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let e = read(vm, USED + 4 + 8 * n, 8);
    (idx(vm), (u32::from_le_bytes(e[..4].try_into().unwrap()), u32::from_le_bytes(e[4..].try_into().unwrap())))
}

/// A VM for the second machine: same size, same PCI devices, a vCPU that
/// has not run.
fn second_machine(config: &PciConfig) -> (Guest, Attached) {
    let hv = Hypervisor::open().expect("this test needs /dev/kvm");
    let vm_config = VmConfig { vcpus: 1, memory: RAM as u64, split_irqchip: true, ..Default::default() };
    let vm = Arc::new(Vm::new(&hv, &vm_config).unwrap());
    let attached = attach(&vm, config).unwrap();
    let long_mode = LongMode::install(&vm.memory(), GuestAddress(TABLES)).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    (Guest { vm, vcpu, run: RunState::new(), long_mode }, attached)
}

/// The source machine after the driver script, paused in its idle loop
/// with request 3 available: its device blobs, vCPU and VM state, RAM.
struct Saved {
    devices: Vec<(String, Vec<u8>)>,
    vcpu: nkvm::state::VcpuState,
    vm: nkvm::state::VmState,
    ram: Vec<u8>,
}

fn run_and_save(config: &PciConfig, image: &Path) -> Saved {
    let (mut guest, attached) = Guest::boot_with(config, &guest_code(MOVED_BAR));
    guest.expect_disk_io(image);
    assert_eq!(guest.run_until_out(STATUS_PORT, Duration::from_secs(10), |s| s == 0xf), Ok(0xf));
    make_available(&guest.vm, 6, 0, 1, (HEADER3, DATA3, STATUS3));
    let mut saved = SavedDevices::default();
    attached.register_saved(&mut saved);
    assert_eq!(saved.names(), ["pci-bus", "virtio-pci-blk@00:01.0", "virtio-pci-console@00:02.0"]);
    let devices = saved.save_all().unwrap();
    // Saving served what was available: the state and RAM agree.
    assert_eq!(used_entry(&guest.vm, 3, 2), (3, (6, 513)), "request 3 served by the save, in used slot 2");
    assert_eq!(&read(&guest.vm, DATA3, 13), b"NKVM-PCI-TEST", "the sector the guest wrote");
    let vcpu = guest.vcpu.save_state(&mut guest.run).unwrap();
    Saved { devices, vcpu, vm: guest.vm.save_state().unwrap(), ram: read(&guest.vm, 0, RAM) }
}

#[test]
fn a_restored_machine_serves_pending_and_new_requests_with_msix_interrupts() {
    let image = test_image("snapshot");
    let config = PciConfig { disk: Some(Disk::Image(image.clone())), ..Default::default() };
    let state = run_and_save(&config, &image);
    restore_and_serve(&state, &config, &image);
    let _ = std::fs::remove_file(&image);
}

/// Boots `config`'s machine through the driver script, has the guest
/// notify request 3 and its backend complete it, then saves the machine
/// (vCPUs paused as a machine pauses them). Returns the running source,
/// its saved devices (to resume) and the state.
fn save_after_a_served_request(config: &PciConfig, image: &Path) -> (Guest, Attached, SavedDevices, Saved) {
    let (mut guest, attached) = Guest::boot_with(config, &guest_code(MOVED_BAR));
    guest.expect_disk_io(image);
    assert_eq!(guest.run_until_out(STATUS_PORT, Duration::from_secs(10), |s| s == 0xf), Ok(0xf));
    make_available(&guest.vm, 6, 0, 1, (HEADER3, DATA3, STATUS3));
    guest.vm.write_memory(GuestAddress(FLAG), &[1]).unwrap();
    assert_eq!(guest.run_until_out(REPORT, Duration::from_secs(20), |_| true), Ok(u64::from(VECTOR)));
    assert_eq!(used_entry(&guest.vm, 3, 2), (3, (6, 513)), "request 3 in used slot 2");
    let mut saved = SavedDevices::default();
    attached.register_saved(&mut saved);
    assert_eq!(saved.names(), ["pci-bus", "virtio-pci-blk@00:01.0", "virtio-pci-console@00:02.0"]);
    saved.saveable().expect("a backend that logs its writes is saved through the transport");
    saved.pause_all();
    let devices = saved.save_all().unwrap();
    let vcpu = guest.vcpu.save_state(&mut guest.run).unwrap();
    let state = Saved { devices, vcpu, vm: guest.vm.save_state().unwrap(), ram: read(&guest.vm, 0, RAM) };
    // The device's part of the blob is what the in-process model saves for
    // the same disk.
    let model = nkvm_devices::virtio::Block::open(image, false).unwrap().snapshot();
    assert!(
        state.devices[1].1.windows(model.len()).any(|w| w == model.as_slice()),
        "the backend's blob holds an in-process disk's state"
    );
    (guest, attached, saved, state)
}

#[test]
fn a_machine_with_its_disk_in_a_device_process_saves_runs_on_and_restores_both_ways() {
    let image = test_image("snapshot-from-process");
    let (mut guest, attached, saved, state) = save_after_a_served_request(&process::in_a_process(&image), &image);

    // The source runs on: the process takes its queues back where they
    // stopped and serves the next request.
    saved.resume_all();
    make_available(&guest.vm, 9, 0, 2, (HEADER4, DATA4, STATUS4));
    guest.vm.write_memory(GuestAddress(FLAG), &[1]).unwrap();
    // The guest runs (its idle loop exits on every pass) until the process
    // has served request 4; the hand-back's own kick and vector (raised in
    // case the stop lost one) may come before, or with, the guest's.
    let vm = guest.vm.clone();
    let served = move |_: u16, _: u64| u16::from_le_bytes(read(&vm, USED + 2, 2).try_into().unwrap()) >= 4;
    assert!(guest.run_until(Duration::from_secs(30), served).is_ok(), "request 4 is served after the save");
    assert_eq!(used_entry(&guest.vm, 4, 3), (4, (9, 513)), "the source serves request 4 after the save");
    assert_eq!(&read(&guest.vm, DATA4, SECTOR_2.len()), SECTOR_2);
    drop(attached);

    // The state restores with the disk in process, and into a new device
    // process, which takes the queue at the saved position.
    restore_and_serve(&state, &PciConfig { disk: Some(Disk::Image(image.clone())), ..Default::default() }, &image);
    restore_and_serve(&state, &process::in_a_process(&image), &image);
    let _ = std::fs::remove_file(&image);
}

/// A disk served by qemu-storage-daemon: saved with the backend's queue
/// stopped where the guest left it, and restored onto the same backend
/// (the first machine gone, as a snapshot's source is), which takes the
/// queue at the saved position and serves the request found in the
/// restored RAM and a new one.
#[test]
fn a_disk_served_by_qemu_storage_daemon_saves_and_restores_onto_its_backend() {
    let image = test_image("snapshot-qsd");
    let socket = image.with_extension("sock");
    let daemon = StorageDaemon::start(&image, &socket);
    let config = PciConfig { disk: Some(Disk::VhostUser(socket.clone())), ..Default::default() };
    let (guest, attached, saved, state) = save_after_a_served_request(&config, &image);
    // qemu-storage-daemon serves one connection at a time: the source goes.
    drop((guest, attached, saved));
    restore_and_serve(&state, &config, &image);
    drop(daemon);
    let _ = std::fs::remove_file(&image);
}

/// A save that starts while qemu-storage-daemon still runs requests: it
/// waits for them before stopping the queue. (Stopped first, libvhost-user
/// closes the queue's call eventfd, and the late completion brought the
/// daemon down with "vu_panic: Error writing eventfd", taking the disk.)
/// The disk serves on after the save.
#[test]
fn a_save_waits_for_requests_qemu_storage_daemon_still_runs_and_the_disk_serves_on() {
    struct Daemon(std::process::Child);
    impl Drop for Daemon {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let socket = std::env::temp_dir().join(format!("nkvm-qsd-in-flight-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    // Every request takes a second.
    let mut daemon = Daemon(
        Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg("driver=null-co,node-name=d0,size=1048576,latency-ns=1000000000,read-zeroes=on")
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},writable=on",
                socket.display()
            ))
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon (the CI installs it)"),
    );
    let start = Instant::now();
    while !socket.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "qemu-storage-daemon did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
    let config = PciConfig { disk: Some(Disk::VhostUser(socket.clone())), ..Default::default() };
    let (mut guest, attached) = Guest::boot_with(&config, &guest_code(MOVED_BAR));
    assert_eq!(guest.run_until_out(STATUS_PORT, Duration::from_secs(10), |s| s == 0xf), Ok(0xf));
    let mut saved = SavedDevices::default();
    attached.register_saved(&mut saved);
    saved.pause_all();
    let result = saved.save_all();
    assert!(result.is_ok(), "{:?}", result.map(|_| ()));
    assert!(matches!(daemon.0.try_wait(), Ok(None)), "the daemon lives on");
    saved.resume_all();
    make_available(&guest.vm, 6, 0, 1, (HEADER3, DATA3, STATUS3));
    guest.vm.write_memory(GuestAddress(FLAG), &[1]).unwrap();
    let vm = guest.vm.clone();
    let served = move |_: u16, _: u64| u16::from_le_bytes(read(&vm, USED + 2, 2).try_into().unwrap()) >= 3;
    assert!(guest.run_until(Duration::from_secs(15), served).is_ok(), "a request after the save is served");
    drop((guest, attached, saved, daemon));
    let _ = std::fs::remove_file(&socket);
}

/// Restores `state` into a second machine attached with `config`: request
/// 4, found in the restored RAM, is served by the restore; request 5, which
/// the guest notifies on the copy, by the copy; each with its interrupt.
fn restore_and_serve(state: &Saved, config: &PciConfig, image: &Path) {
    let (mut guest, attached) = second_machine(config);
    guest.vm.write_memory(GuestAddress(0), &state.ram).unwrap();
    guest.vm.restore_state(&state.vm).unwrap();
    guest.vcpu.restore_state(&state.vcpu).unwrap();
    make_available(&guest.vm, 9, 0, 2, (HEADER4, DATA4, STATUS4));
    let mut saved = SavedDevices::default();
    attached.register_saved(&mut saved);
    saved.restore_all(&state.devices).unwrap();
    // The restore kicked the queue: request 4 is served already.
    assert_eq!(used_entry(&guest.vm, 4, 3), (4, (9, 513)), "request 4 served by the restore, in used slot 3");
    assert_eq!(read(&guest.vm, STATUS4, 1), [0], "VIRTIO_BLK_S_OK");
    assert_eq!(&read(&guest.vm, DATA4, SECTOR_2.len()), SECTOR_2);
    // BAR0 decodes where the guest moved it, with its queue ioeventfds.
    assert!(has_ioeventfd(&guest.vm, MOVED_BAR + 0x3000), "queue 0's ioeventfd follows the restored BAR0");
    assert!(!has_ioeventfd(&guest.vm, BAR + 0x3000), "and none is left where attach first put it");

    // Its MSI-X vector (and request 3's, raised on the old machine as it
    // saved) reaches the guest's handler on the first run. Then the guest
    // reads the device status through BAR0 where it moved it.
    assert_eq!(guest.run_until_out(REPORT, Duration::from_secs(20), |_| true), Ok(u64::from(VECTOR)));
    assert_eq!(guest.run_until_out(STATUS_PORT, Duration::from_secs(10), |s| s == 0xf), Ok(0xf));

    // Request 5: the guest notifies it on the restored machine.
    make_available(&guest.vm, 12, 1, 3, (HEADER5, DATA5, STATUS5));
    guest.vm.write_memory(GuestAddress(DATA5), AFTER).unwrap();
    guest.vm.write_memory(GuestAddress(FLAG), &[1]).unwrap();
    assert_eq!(guest.run_until_out(REPORT, Duration::from_secs(20), |_| true), Ok(u64::from(VECTOR)));
    assert_eq!(used_entry(&guest.vm, 5, 4), (5, (12, 1)), "request 5 in used slot 4");
    assert_eq!(read(&guest.vm, STATUS5, 1), [0], "VIRTIO_BLK_S_OK");
    assert_eq!(&std::fs::read(image).unwrap()[3 * 512..3 * 512 + AFTER.len()], AFTER);
    drop(attached);
}

#[test]
fn a_bar_whose_memory_decoding_is_off_is_mapped_nowhere_after_the_restore() {
    let image = test_image("snapshot-decoding-off");
    let config = PciConfig { disk: Some(Disk::Image(image.clone())), ..Default::default() };
    let (mut guest, attached) = Guest::boot_with(&config, &guest_code(MOVED_BAR));
    guest.expect_disk_io(&image);
    // The guest's driver turns memory decoding off (bus master stays on).
    let ports = attached.saved.ports.clone().unwrap();
    {
        let mut ports = ports.lock().unwrap();
        ports.bus.config_write(1, nkvm_devices::pci::config::COMMAND, &[0x4, 0]);
        ports.apply_bar_events();
    }
    assert!(!has_ioeventfd(&guest.vm, MOVED_BAR + 0x3000));
    let mut saved = SavedDevices::default();
    attached.register_saved(&mut saved);
    let blobs = saved.save_all().unwrap();

    let (dest, attached) = second_machine(&config);
    let mut saved = SavedDevices::default();
    attached.register_saved(&mut saved);
    saved.restore_all(&blobs).unwrap();
    let ports = attached.saved.ports.clone().unwrap();
    let mut bar0 = [0u8; 4];
    ports.lock().unwrap().bus.config_read(1, 0x10, &mut bar0);
    assert_eq!(u32::from_le_bytes(bar0), MOVED_BAR as u32 | 0x4, "BAR0 holds the address the guest gave it");
    assert!(ports.lock().unwrap().regions.keys().all(|&(slot, _)| slot != 1), "no BAR region for the disk");
    for bar in [BAR, MOVED_BAR] {
        assert!(!has_ioeventfd(&dest.vm, bar + 0x3000), "no queue ioeventfd at {bar:#x}");
    }
    let _ = std::fs::remove_file(&image);
}

#[test]
fn a_disk_of_another_size_is_refused_naming_both_sizes() {
    let image = test_image("snapshot-size");
    let config = PciConfig { disk: Some(Disk::Image(image.clone())), ..Default::default() };
    let state = run_and_save(&config, &image);
    std::fs::write(&image, vec![0u8; 16 * 512]).unwrap();
    let (_guest, attached) = second_machine(&config);
    let mut saved = SavedDevices::default();
    attached.register_saved(&mut saved);
    let err = saved.restore_all(&state.devices).unwrap_err();
    let mut line = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        line.push_str(&format!(": {s}"));
        source = s.source();
    }
    assert_eq!(
        line,
        "device virtio-pci-blk@00:01.0: bad state: virtio-blk state: the disk's capacity in 512-byte sectors is 8 \
         in the saved state but 16 on this machine"
    );
    let _ = std::fs::remove_file(&image);
}

/// The reason `save_all` gives for a machine attached with `config`.
fn unsaveable(config: &PciConfig) -> String {
    let hv = Hypervisor::open().expect("this test needs /dev/kvm");
    let vm = Arc::new(
        Vm::new(&hv, &VmConfig { vcpus: 1, memory: RAM as u64, split_irqchip: true, ..Default::default() }).unwrap(),
    );
    let attached = attach(&vm, config).unwrap();
    let mut saved = SavedDevices::default();
    attached.register_saved(&mut saved);
    saved.save_all().expect_err("the machine cannot be saved").to_string()
}

#[test]
fn a_backend_that_does_not_log_its_writes_cannot_be_saved_and_the_error_says_why() {
    let image = test_image("snapshot-unlogged");
    let mut config = process::in_a_process(&image);
    config.device_process_env = vec![(crate::virtio_process::NO_DIRTY_LOG_ENV.into(), "1".into())];
    let err = unsaveable(&config);
    assert!(err.starts_with("this machine cannot be saved: the virtio-blk backend at "), "{err}");
    assert!(
        err.ends_with(
            "does not log the pages it writes (it offers neither VHOST_USER_PROTOCOL_F_LOG_SHMFD nor \
             VHOST_F_LOG_ALL), so a copy of the guest could miss them"
        ),
        "{err}"
    );
    let _ = std::fs::remove_file(&image);
}

/// `state.ram` as a snapshot's memory file in `dir`, opened as a restore
/// opens it but writable, so that a write through a mapping of the file
/// would land in it (the restore must never make one) and the byte-for-byte
/// check after the run can see it.
fn memory_file(state: &Saved, name: &str) -> (PathBuf, std::fs::File) {
    let path = std::env::temp_dir().join(format!("nkvm-pci-snapshot-memory-{}-{name}", std::process::id()));
    std::fs::write(&path, &state.ram).unwrap();
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    (path, file)
}

/// A machine like [`second_machine`], its RAM the snapshot's memory file
/// mapped copy-on-write, as `nkvm run --restore` maps it.
fn mapped_machine(config: &PciConfig, file: std::fs::File) -> (Guest, Attached) {
    let hv = Hypervisor::open().expect("this test needs /dev/kvm");
    let vm_config = VmConfig { vcpus: 1, memory: RAM as u64, split_irqchip: true, ..Default::default() };
    let ram = nkvm::Backing::from_file_private("snapshot", file, RAM as u64).unwrap();
    let vm = Arc::new(Vm::with_ram(&hv, &vm_config, ram).unwrap());
    assert!(vm.memory().regions().iter().all(|r| r.backing.is_copy_on_write()));
    let attached = attach(&vm, config).unwrap();
    // The page tables are in the snapshot already: this rewrites the same bytes.
    let long_mode = LongMode::install(&vm.memory(), GuestAddress(TABLES)).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    (Guest { vm, vcpu, run: RunState::new(), long_mode }, attached)
}

/// Every page of the VM, as KVM's dirty log has it since the last call.
fn dirty_pages(vm: &Vm) -> Vec<u64> {
    vm.sync_dirty_log().unwrap();
    let pages = vm.collect_dirty(GuestAddress(0), RAM as u64, usize::MAX).unwrap();
    pages.pages.into_iter().map(|g| g.0).collect()
}

/// The restore maps the snapshot's memory file copy-on-write and the
/// in-process virtio-blk serves the guest through that very mapping: what
/// it writes (a read's data, the status byte, the used ring) the guest
/// reads and the dirty log holds, what the guest writes (an OUT request's
/// data) it reads, and the file stays as the snapshot wrote it, so the same
/// snapshot restores again, to the same result. A device view that mapped
/// the file a second time would see neither the guest's writes nor show it
/// its own, and would write the snapshot.
#[test]
fn a_restore_from_a_mapped_memory_file_serves_the_disk_through_the_guests_own_pages() {
    let image = test_image("snapshot-mapped");
    let config = PciConfig { disk: Some(Disk::Image(image.clone())), ..Default::default() };
    let state = run_and_save(&config, &image);
    let (path, file) = memory_file(&state, "mapped");
    for round in ["first", "second"] {
        let (mut guest, attached) = mapped_machine(&config, file.try_clone().unwrap());
        guest.vm.restore_state(&state.vm).unwrap();
        guest.vcpu.restore_state(&state.vcpu).unwrap();
        let logged = guest.vm.memory().regions().iter().map(|r| r.clone().dirty_logged()).collect();
        guest.vm.set_memory_map(nkvm::MemoryMap::new(logged).unwrap()).unwrap();
        // Request 4 goes into the guest's (copy-on-write) pages only.
        make_available(&guest.vm, 9, 0, 2, (HEADER4, DATA4, STATUS4));
        dirty_pages(&guest.vm);
        let mut saved = SavedDevices::default();
        attached.register_saved(&mut saved);
        saved.restore_all(&state.devices).unwrap();
        // The device found it there and answered into the guest's pages.
        assert_eq!(used_entry(&guest.vm, 4, 3), (4, (9, 513)), "{round} restore: request 4 served");
        assert_eq!(read(&guest.vm, STATUS4, 1), [0], "{round} restore: VIRTIO_BLK_S_OK");
        assert_eq!(&read(&guest.vm, DATA4, SECTOR_2.len()), SECTOR_2, "{round} restore: the sector read");
        let pages = dirty_pages(&guest.vm);
        for (what, gpa) in [("the read's data buffer", DATA4), ("its status byte", STATUS4), ("the used ring", USED)] {
            assert!(pages.contains(&gpa), "{round} restore: {what} at {gpa:#x} not in the dirty log: {pages:x?}");
        }
        assert_eq!(guest.run_until_out(REPORT, Duration::from_secs(20), |_| true), Ok(u64::from(VECTOR)));

        // Request 5: data the guest wrote after the restore reaches the disk.
        let after = format!("{round}-{}", std::str::from_utf8(AFTER).unwrap());
        make_available(&guest.vm, 12, 1, 3, (HEADER5, DATA5, STATUS5));
        guest.vm.write_memory(GuestAddress(DATA5), after.as_bytes()).unwrap();
        guest.vm.write_memory(GuestAddress(FLAG), &[1]).unwrap();
        assert_eq!(guest.run_until_out(REPORT, Duration::from_secs(20), |_| true), Ok(u64::from(VECTOR)));
        assert_eq!(used_entry(&guest.vm, 5, 4), (5, (12, 1)), "{round} restore: request 5 served");
        assert_eq!(read(&guest.vm, STATUS5, 1), [0], "{round} restore: VIRTIO_BLK_S_OK");
        let disk = std::fs::read(&image).unwrap();
        assert_eq!(&disk[3 * 512..3 * 512 + after.len()], after.as_bytes(), "{round} restore: the guest's data");
        drop((guest, attached));
        assert!(std::fs::read(&path).unwrap() == state.ram, "{round} restore: the memory file was written");
    }
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&image);
}

/// A device process maps guest RAM through its file: a restored machine's
/// copy-on-write RAM has none to give it, and `attach` says so.
#[test]
fn a_device_process_is_refused_copy_on_write_ram() {
    let image = test_image("snapshot-mapped-process");
    let path = image.with_extension("ram");
    std::fs::write(&path, vec![0u8; RAM]).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let hv = Hypervisor::open().expect("this test needs /dev/kvm");
    let vm_config = VmConfig { vcpus: 1, memory: RAM as u64, split_irqchip: true, ..Default::default() };
    let ram = nkvm::Backing::from_file_private("snapshot", file, RAM as u64).unwrap();
    let vm = Arc::new(Vm::with_ram(&hv, &vm_config, ram).unwrap());
    let err = attach(&vm, &process::in_a_process(&image)).expect_err("no file to hand the device process");
    let msg = err.to_string();
    assert!(msg.contains("copy-on-write mapping of a file (a restored snapshot)"), "{msg}");
    assert!(msg.contains("serve the devices in process"), "{msg}");
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&image);
}
