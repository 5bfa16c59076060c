//! The check [`Vcpu::restore_state`] makes before it writes anything: every
//! CPU feature the saved CPUID gives the guest must be one this host's KVM
//! offers. KVM itself takes any CPUID; a guest given a feature the host
//! cannot run faults (#UD, #GP) at its first use, long after the restore
//! said nothing.
//!
//! What KVM offers is what `KVM_GET_SUPPORTED_CPUID` lists, and what a vCPU
//! given that list reports back (`KVM_GET_CPUID2`, on a scratch VM, once per
//! [`Hypervisor`](crate::Hypervisor)): some KVMs give a guest more than they
//! list whatever the VMM sets (kvm_pvm runs the guest's instructions on the
//! host CPU and reports its features), and a state saved there holds them.
//!
//! Only feature-flag registers are compared (the table [`COMPARED`]), and
//! in them not the bits whose value is dynamic or which KVM does not list
//! although a VMM legitimately sets them.

use std::fmt;
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_cpuid_entry2, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use super::{StateError, VcpuState};
use crate::Vcpu;

/// A CPUID output register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuidRegister {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

impl CpuidRegister {
    /// The register's value in `entry`.
    fn of(self, entry: &kvm_cpuid_entry2) -> u32 {
        match self {
            Self::Eax => entry.eax,
            Self::Ebx => entry.ebx,
            Self::Ecx => entry.ecx,
            Self::Edx => entry.edx,
        }
    }
}

impl fmt::Display for CpuidRegister {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Eax => "EAX",
            Self::Ebx => "EBX",
            Self::Ecx => "ECX",
            Self::Edx => "EDX",
        })
    }
}

/// A CPU feature the saved guest was given and this host's KVM cannot offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissingFeature {
    /// The CPUID leaf (EAX in).
    pub leaf: u32,
    /// The subleaf (ECX in); 0 for a leaf without subleaves.
    pub subleaf: u32,
    /// The register the bit is in.
    pub register: CpuidRegister,
    /// The bit (0..=31).
    pub bit: u8,
}

impl MissingFeature {
    /// The feature's usual name (as Linux's `/proc/cpuinfo` flags), for
    /// well-known bits.
    pub fn name(&self) -> Option<&'static str> {
        use CpuidRegister::*;
        let names: &[(u8, &str)] = match (self.leaf, self.subleaf, self.register) {
            (1, _, Ecx) => &[
                (0, "sse3"),
                (1, "pclmulqdq"),
                (5, "vmx"),
                (9, "ssse3"),
                (12, "fma"),
                (13, "cx16"),
                (17, "pcid"),
                (19, "sse4_1"),
                (20, "sse4_2"),
                (21, "x2apic"),
                (22, "movbe"),
                (23, "popcnt"),
                (25, "aes"),
                (26, "xsave"),
                (28, "avx"),
                (29, "f16c"),
                (30, "rdrand"),
            ],
            (1, _, Edx) => &[(4, "tsc"), (5, "msr"), (19, "clflush"), (25, "sse"), (26, "sse2")],
            (7, 0, Ebx) => &[
                (0, "fsgsbase"),
                (3, "bmi1"),
                (4, "hle"),
                (5, "avx2"),
                (7, "smep"),
                (8, "bmi2"),
                (9, "erms"),
                (10, "invpcid"),
                (11, "rtm"),
                (16, "avx512f"),
                (18, "rdseed"),
                (19, "adx"),
                (20, "smap"),
                (23, "clflushopt"),
                (24, "clwb"),
                (29, "sha_ni"),
            ],
            (7, 0, Ecx) => &[(2, "umip"), (3, "pku"), (8, "gfni"), (9, "vaes"), (16, "la57"), (22, "rdpid")],
            (7, 0, Edx) => {
                &[(10, "md_clear"), (26, "spec_ctrl"), (27, "stibp"), (29, "arch_capabilities"), (31, "ssbd")]
            }
            (0xd, 1, Eax) => &[(0, "xsaveopt"), (1, "xsavec"), (2, "xgetbv1"), (3, "xsaves"), (4, "xfd")],
            (0x8000_0001, _, Ecx) => &[(0, "lahf_lm"), (2, "svm"), (5, "abm"), (6, "sse4a"), (8, "3dnowprefetch")],
            (0x8000_0001, _, Edx) => &[(11, "syscall"), (20, "nx"), (26, "pdpe1gb"), (27, "rdtscp"), (29, "lm")],
            (0x8000_0008, _, Ebx) => &[(9, "wbnoinvd"), (12, "ibpb"), (24, "amd_ssbd"), (25, "virt_ssbd")],
            _ => &[],
        };
        names.iter().find(|&&(bit, _)| bit == self.bit).map(|&(_, name)| name)
    }
}

impl fmt::Display for MissingFeature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "leaf {:#x} subleaf {} {} bit {}", self.leaf, self.subleaf, self.register, self.bit)?;
        match self.name() {
            Some(name) => write!(f, " ({name})"),
            None => Ok(()),
        }
    }
}

/// The missing features as a comma-separated list (for [`StateError`]).
pub(super) struct FeatureList<'a>(pub(super) &'a [MissingFeature]);

impl fmt::Display for FeatureList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, feature) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{feature}")?;
        }
        Ok(())
    }
}

/// Leaf 1 ECX: OSXSAVE (27, mirrors CR4.OSXSAVE), TSC-deadline (24, which
/// KVM offers through `KVM_CAP_TSC_DEADLINE_TIMER`, not in its CPUID
/// list), hypervisor (31).
const LEAF1_ECX_EXEMPT: u32 = 1 << 24 | 1 << 27 | 1 << 31;
/// Leaf 1 EDX: APIC (9, mirrors the APIC base MSR's enable bit).
const LEAF1_EDX_EXEMPT: u32 = 1 << 9;
/// Leaf 7 ECX: OSPKE (4, mirrors CR4.PKE).
const LEAF7_ECX_EXEMPT: u32 = 1 << 4;

/// The feature-flag registers compared: (leaf, subleaf — `None` for a leaf
/// without subleaves —, register, exempt bits).
const COMPARED: &[(u32, Option<u32>, CpuidRegister, u32)] = &[
    (1, None, CpuidRegister::Ecx, LEAF1_ECX_EXEMPT),
    (1, None, CpuidRegister::Edx, LEAF1_EDX_EXEMPT),
    (7, Some(0), CpuidRegister::Ebx, 0),
    (7, Some(0), CpuidRegister::Ecx, LEAF7_ECX_EXEMPT),
    (7, Some(0), CpuidRegister::Edx, 0),
    (7, Some(1), CpuidRegister::Eax, 0),
    (0xd, Some(1), CpuidRegister::Eax, 0),
    (0x8000_0001, None, CpuidRegister::Ecx, 0),
    (0x8000_0001, None, CpuidRegister::Edx, 0),
    (0x8000_0008, None, CpuidRegister::Ebx, 0),
];

/// The compared feature bits `saved` sets and no list of `offered` does
/// (a leaf a list lacks offers nothing), in [`COMPARED`]'s order.
pub(crate) fn missing_features(saved: &[kvm_cpuid_entry2], offered: &[&[kvm_cpuid_entry2]]) -> Vec<MissingFeature> {
    let matches = |leaf: u32, subleaf: Option<u32>| {
        move |e: &&kvm_cpuid_entry2| e.function == leaf && subleaf.is_none_or(|s| e.index == s)
    };
    let mut missing = Vec::new();
    for &(leaf, subleaf, register, exempt) in COMPARED {
        let offered = offered
            .iter()
            .flat_map(|list| list.iter().filter(matches(leaf, subleaf)))
            .fold(0, |bits, e| bits | register.of(e));
        for entry in saved.iter().filter(matches(leaf, subleaf)) {
            let lacking = register.of(entry) & !offered & !exempt;
            for bit in (0..32u8).filter(|&b| lacking & (1 << b) != 0) {
                let feature = MissingFeature { leaf, subleaf: subleaf.unwrap_or(0), register, bit };
                if !missing.contains(&feature) {
                    missing.push(feature);
                }
            }
        }
    }
    missing
}

/// What this host's KVM offers a guest: read at the first check that
/// asks, then kept (one per [`Hypervisor`](crate::Hypervisor)).
pub(crate) struct HostCpuid {
    kvm: Arc<Kvm>,
    /// `KVM_GET_SUPPORTED_CPUID`, and what a vCPU given it reports back.
    offered: Mutex<Option<Arc<[Vec<kvm_cpuid_entry2>; 2]>>>,
}

impl fmt::Debug for HostCpuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostCpuid").finish_non_exhaustive()
    }
}

impl HostCpuid {
    pub(crate) fn new(kvm: Arc<Kvm>) -> Self {
        Self { kvm, offered: Mutex::new(None) }
    }

    /// The two lists of what KVM offers (a failure is not kept: the next
    /// check asks again).
    pub(crate) fn offered(&self) -> Result<Arc<[Vec<kvm_cpuid_entry2>; 2]>, kvm_ioctls::Error> {
        let mut cache = self.offered.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(offered) = &*cache {
            return Ok(offered.clone());
        }
        let supported = self.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
        match self.given(&supported) {
            Ok(given) => {
                let offered = Arc::new([supported.as_slice().to_vec(), given]);
                *cache = Some(offered.clone());
                Ok(offered)
            }
            // Without a scratch vCPU (for now: not kept, the next check
            // tries again), the list alone: stricter where KVM gives more.
            Err(e) => {
                log::debug!(
                    "no scratch vCPU to read the CPUID KVM gives a guest ({e}): checking against KVM's list alone"
                );
                Ok(Arc::new([supported.as_slice().to_vec(), Vec::new()]))
            }
        }
    }

    /// What a vCPU of a scratch VM reports after it was given `supported`.
    fn given(&self, supported: &crate::Cpuid) -> Result<Vec<kvm_cpuid_entry2>, kvm_ioctls::Error> {
        let vm = self.kvm.create_vm()?;
        let vcpu = vm.create_vcpu(0)?;
        vcpu.set_cpuid2(supported)?;
        Ok(vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES)?.as_slice().to_vec())
    }
}

impl Vcpu {
    /// Whether this host's KVM offers every CPU feature `state`'s CPUID
    /// gives the guest ([`StateError::CpuFeatures`] names those it does
    /// not). [`restore_state`](Self::restore_state) checks this before it
    /// writes anything; a VMM that sets the saved CPUID itself first can
    /// ask earlier. The first check of a [`Hypervisor`](crate::Hypervisor)
    /// reads what KVM offers (with a scratch VM); later ones reuse it.
    pub fn check_cpu_features(&self, state: &VcpuState) -> Result<(), StateError> {
        let offered = self.links.host_cpuid.offered().map_err(|e| self.err("KVM_GET_SUPPORTED_CPUID", e))?;
        let missing = missing_features(&state.cpuid, &[&offered[0], &offered[1]]);
        if missing.is_empty() {
            Ok(())
        } else {
            Err(StateError::CpuFeatures { id: state.id, missing })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, [eax, ebx, ecx, edx]: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, eax, ebx, ecx, edx, ..Default::default() }
    }

    fn host() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(1, 0, [0x906ea, 0, 0x0000_0201, 0x0000_0011]),
            entry(7, 0, [0, 0x0000_0009, 0, 0]),
            entry(0xd, 0, [7, 0x340, 0x340, 0]),
            entry(0xd, 1, [0x1, 0, 0, 0]),
            entry(0x8000_0001, 0, [0, 0, 0x1, 0x2010_0800]),
        ]
    }

    #[test]
    fn the_hosts_own_cpuid_passes() {
        assert_eq!(missing_features(&host(), &[&host()]), []);
        assert_eq!(missing_features(&[], &[&host()]), []);
    }

    #[test]
    fn an_extra_bit_is_named_by_leaf_subleaf_register_and_bit() {
        let mut saved = host();
        saved[1].ebx |= 1 << 5 | 1 << 30;
        let missing = missing_features(&saved, &[&host()]);
        let avx2 = MissingFeature { leaf: 7, subleaf: 0, register: CpuidRegister::Ebx, bit: 5 };
        assert_eq!(missing, [avx2, MissingFeature { bit: 30, ..avx2 }]);
        assert_eq!(missing[0].to_string(), "leaf 0x7 subleaf 0 EBX bit 5 (avx2)");
        assert_eq!(missing[1].to_string(), "leaf 0x7 subleaf 0 EBX bit 30");

        let err = StateError::CpuFeatures { id: 3, missing };
        let text = err.to_string();
        assert!(text.starts_with("vCPU 3: "), "{text}");
        assert!(text.contains("EBX bit 5 (avx2), leaf 0x7 subleaf 0 EBX bit 30;"), "{text}");
        assert!(text.contains("restore on a host whose CPU and KVM offer them"), "{text}");
    }

    #[test]
    fn dynamic_and_capability_bits_are_exempt() {
        let mut saved = host();
        saved[0].ecx |= LEAF1_ECX_EXEMPT;
        saved[0].edx |= LEAF1_EDX_EXEMPT;
        saved[1].ecx |= LEAF7_ECX_EXEMPT;
        assert_eq!(missing_features(&saved, &[&host()]), []);
        saved[1].ecx |= 1 << 3;
        let pku = MissingFeature { leaf: 7, subleaf: 0, register: CpuidRegister::Ecx, bit: 3 };
        assert_eq!(missing_features(&saved, &[&host()]), [pku]);
    }

    #[test]
    fn only_feature_registers_of_the_right_subleaf_count() {
        let mut saved = host();
        // APIC id, XSAVE sizes, leaf 0xD subleaf 0: not feature flags.
        saved[0].ebx = 0xff00_0000;
        saved[2] = entry(0xd, 0, [!0, !0, !0, !0]);
        // Leaves without subleaves match whatever index they carry.
        saved[4].index = 5;
        assert_eq!(missing_features(&saved, &[&host()]), []);
        // Leaf 7 subleaf 1 is one the host does not list at all.
        saved.push(entry(7, 1, [1 << 4, 0, 0, 0]));
        let missing = missing_features(&saved, &[&host()]);
        assert_eq!(missing, [MissingFeature { leaf: 7, subleaf: 1, register: CpuidRegister::Eax, bit: 4 }]);
        saved[3].eax |= 1 << 3;
        assert_eq!(missing_features(&saved, &[&host()])[1].to_string(), "leaf 0xd subleaf 1 EAX bit 3 (xsaves)");
    }

    #[test]
    fn what_kvm_gives_a_vcpu_beyond_its_list_counts_as_offered() {
        let mut saved = host();
        saved[0].ecx |= 1 << 19 | 1 << 20;
        saved[1].ebx |= 1 << 5;
        let given = [entry(1, 0, [0, 0, 1 << 19 | 1 << 20, 0]), entry(7, 0, [0, 1 << 5, 0, 0])];
        assert_eq!(missing_features(&saved, &[&host()]).len(), 3);
        assert_eq!(missing_features(&saved, &[&host(), &given]), []);
        assert_eq!(missing_features(&saved, &[&host(), &given[..1]]).len(), 1);
    }
}
