//! Bad configurations get errors that name the cause.

mod common;

use common::*;
use nkvm::{Hypervisor, HypervisorError, MemoryError, Vm, VmConfig, VmError};

#[test]
fn missing_device_node_is_named() {
    let err = Hypervisor::open_path("/dev/nkvm-no-such-node").unwrap_err();
    assert!(matches!(err, HypervisorError::NotFound(_)));
    assert!(err.to_string().contains("/dev/nkvm-no-such-node does not exist"), "{err}");
}

#[test]
fn a_non_kvm_node_is_reported() {
    // /dev/null opens fine but is not KVM: the API-version ioctl fails.
    let err = Hypervisor::open_path("/dev/null").unwrap_err();
    assert!(matches!(err, HypervisorError::ApiVersion { .. } | HypervisorError::Open { .. }), "{err}");
}

#[test]
fn capabilities_are_probed() {
    let hv = hypervisor();
    let caps = hv.capabilities();
    assert_eq!(caps.api_version, 12);
    assert!(caps.max_vcpus >= 1);
    assert!(caps.max_memory_slots >= 32);
    assert!(caps.ioeventfd && caps.irqfd, "{caps:?}");
    assert_eq!(caps.rows().len(), 14);
}

#[test]
fn zero_or_unaligned_memory_is_rejected() {
    let hv = hypervisor();
    for memory in [0u64, 4097] {
        let err = Vm::new(&hv, &VmConfig { memory, ..Default::default() }).unwrap_err();
        assert!(matches!(err, VmError::Memory(MemoryError::BadSize(m)) if m == memory), "{err}");
        assert!(err.to_string().contains("multiple of 4 KiB"), "{err}");
    }
}

#[test]
fn vcpu_counts_are_checked() {
    let hv = hypervisor();
    let max = hv.capabilities().max_vcpus;
    let err = Vm::new(&hv, &VmConfig { vcpus: max + 1, ..Default::default() }).unwrap_err();
    assert!(err.to_string().contains(&format!("allows at most {max}")), "{err}");
    let err = Vm::new(&hv, &VmConfig { vcpus: 0, ..Default::default() }).unwrap_err();
    assert!(matches!(err, VmError::NoVcpus));
    let vm = Vm::new(&hv, &VmConfig { vcpus: 1, ..Default::default() }).unwrap();
    let err = vm.create_vcpu(1).unwrap_err();
    assert!(err.to_string().contains("vCPU id 1 is outside this VM's 1 vCPUs"), "{err}");
}

#[test]
fn memory_is_a_shareable_memfd() {
    let vm = vm();
    let ram = vm.ram().clone();
    vm.write_memory(nkvm::GuestAddress(0x1234), b"shared").unwrap();
    // Map the same memfd a second time, as a device process would.
    let file = ram.file().try_clone().unwrap();
    let other = nkvm::Backing::from_file("other", file, ram.len()).unwrap();
    let mut buf = [0u8; 6];
    other.read_at(0x1234, &mut buf).unwrap();
    assert_eq!(&buf, b"shared");
}
