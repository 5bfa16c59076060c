//! Guest memory as the host reaches it: a write that does not fit is
//! refused whole, and dropping the host's mapping of a page (pc-testdev's
//! "flush page") keeps what the guest wrote, also in a copy-on-write
//! backing such as a restored snapshot's.

mod common;

use std::io::Write;

use common::*;
use iced_x86::code_asm::*;
use nkvm::{Backing, GuestAddress, MemoryMap, VmConfig};

const RAM: u64 = 16 << 20;

/// A file of `len` bytes of `byte` in the temporary directory, opened
/// for reading and writing (and already unlinked).
fn file_of(byte: u8, len: usize) -> std::fs::File {
    let path = std::env::temp_dir().join(format!("nkvm-host-memory-{}-{byte}", std::process::id()));
    let mut file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    file.write_all(&vec![byte; len]).unwrap();
    file
}

#[test]
fn a_write_running_past_the_end_of_ram_is_refused_with_nothing_written() {
    let vm = vm_with(VmConfig { vcpus: 1, memory: RAM, ..Default::default() });
    let err = vm.write_memory(GuestAddress(RAM - 2), &[1, 2, 3, 4]).unwrap_err();
    assert!(err.to_string().contains("is not (entirely) backed by memory"), "{err}");
    let mut tail = [0xffu8; 2];
    vm.read_memory(GuestAddress(RAM - 2), &mut tail).unwrap();
    assert_eq!(tail, [0, 0], "the part that was mapped is not written either");
}

#[test]
fn dropping_the_host_mapping_of_a_copy_on_write_page_keeps_the_guests_write() {
    let ram = Backing::from_file_private("snapshot", file_of(0x11, RAM as usize), RAM).unwrap();
    let vm = nkvm::Vm::with_ram(&hypervisor(), &VmConfig { vcpus: 1, memory: RAM, ..Default::default() }, ram).unwrap();
    let mut vcpu = long_mode_guest(&vm, 0, |a| {
        a.mov(rbx, 0x60_0000u64).unwrap();
        a.mov(byte_ptr(rbx), 0x5a).unwrap();
        a.hlt().unwrap();
        // After the flush: the byte the guest sees, reported.
        a.movzx(eax, byte_ptr(rbx)).unwrap();
        a.out(0x10, eax).unwrap();
        a.hlt().unwrap();
    });
    run_to_hlt_within(&mut vcpu, std::time::Duration::from_secs(10));
    vm.memory().drop_host_mapping(GuestAddress(0x60_0000)).unwrap();
    let mut byte = [0u8];
    vm.read_memory(GuestAddress(0x60_0000), &mut byte).unwrap();
    assert_eq!(byte, [0x5a], "the host still sees the guest's write, not the file's 0x11");
    let exits = run_to_hlt_within(&mut vcpu, std::time::Duration::from_secs(10));
    assert!(exits.contains(&nkvm::Exit::IoOut { port: 0x10, size: 4, data: 0x5a }), "{exits:?}");
    // A shared backing keeps its bytes too (the memfd holds them).
    let shared = Backing::new("shared", 0x2000).unwrap();
    let map = MemoryMap::ram(&shared).unwrap();
    map.write(GuestAddress(0x1000), &[0x22]).unwrap();
    map.drop_host_mapping(GuestAddress(0x1000)).unwrap();
    map.read(GuestAddress(0x1000), &mut byte).unwrap();
    assert_eq!(byte, [0x22]);
}

/// Guest RAM's memfd goes to device processes and vhost-user backends: a
/// peer that shrank it would make the VMM's next access past the new end a
/// SIGBUS. Its size is sealed; and a file shorter than what is asked is
/// not mapped.
#[test]
fn guest_rams_memfd_cannot_be_resized_and_a_short_file_is_not_mapped() {
    let vm = vm_with(VmConfig { vcpus: 1, memory: RAM, ..Default::default() });
    let err = vm.ram().file().set_len(0x4000).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
    assert!(vm.ram().file().set_len(2 * RAM).is_err(), "nor grown");
    let mut byte = [0u8];
    vm.read_memory(GuestAddress(RAM - 1), &mut byte).unwrap();
    let err = Backing::from_file("short", file_of(0, 0x1000), 0x2000).unwrap_err();
    assert!(err.to_string().contains("short") && format!("{err:?}").contains("fewer than the 8192"), "{err:?}");
}
