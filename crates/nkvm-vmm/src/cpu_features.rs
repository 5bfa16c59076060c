//! `--cpu-features -x2apic,-pcid`: CPUID feature bits a user hides from
//! the guest (the same names as QEMU's `-cpu` flags), on top of what this
//! host's KVM supports.
//!
//! Only hiding is offered: a bit KVM does not support cannot be given, and
//! a guest that sees a feature the vCPU lacks fails in ways no test wants.
//!
//! `--cpu-vendor intel|amd`: the vendor string CPUID reports ([`CpuVendor`]).
//!
//! [`msrs_cpuid_lacks`]: the MSRs a guest must not reach because its CPUID
//! does not offer them (nkvm denies them with KVM's MSR filter).
//!
//! [`hide_nested`]: VMX and SVM, always hidden: nkvm does not save nested
//! virtualization state, so a guest hypervisor would not survive a
//! snapshot or a migration.

use std::str::FromStr;

/// A CPUID register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reg {
    Ebx,
    Ecx,
}

/// (name, leaf, subleaf, register, bit) of every feature nkvm can hide.
const FEATURES: &[(&str, u32, u32, Reg, u32)] = &[
    ("pcid", 1, 0, Reg::Ecx, 17),
    ("x2apic", 1, 0, Reg::Ecx, 21),
    ("tsc-deadline", 1, 0, Reg::Ecx, 24),
    ("xsave", 1, 0, Reg::Ecx, 26),
    ("rdrand", 1, 0, Reg::Ecx, 30),
    ("invpcid", 7, 0, Reg::Ebx, 10),
    ("smep", 7, 0, Reg::Ebx, 7),
    ("smap", 7, 0, Reg::Ebx, 20),
    ("umip", 7, 0, Reg::Ecx, 2),
    ("pku", 7, 0, Reg::Ecx, 3),
    ("la57", 7, 0, Reg::Ecx, 16),
    ("rdpid", 7, 0, Reg::Ecx, 22),
];

/// Features to hide, parsed from `-name,-name`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HiddenFeatures(Vec<&'static str>);

impl FromStr for HiddenFeatures {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut names = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let Some(name) = item.strip_prefix('-') else {
                return Err(format!("{item:?}: nkvm can only hide features (write -{item}); the guest already sees every feature this host's KVM supports"));
            };
            let known = FEATURES.iter().find(|f| f.0 == name).map(|f| f.0);
            let known = known.ok_or_else(|| {
                let all: Vec<_> = FEATURES.iter().map(|f| f.0).collect();
                format!("unknown CPU feature {name:?} (known: {})", all.join(", "))
            })?;
            names.push(known);
        }
        Ok(Self(names))
    }
}

impl HiddenFeatures {
    /// Clears the features' bits in `cpuid`.
    pub fn apply(&self, cpuid: &mut nkvm::Cpuid) {
        for &(name, leaf, subleaf, reg, bit) in FEATURES {
            if !self.0.contains(&name) {
                continue;
            }
            for e in cpuid.as_mut_slice().iter_mut().filter(|e| e.function == leaf && e.index == subleaf) {
                let word = match reg {
                    Reg::Ebx => &mut e.ebx,
                    Reg::Ecx => &mut e.ecx,
                };
                *word &= !(1 << bit);
            }
        }
    }
}

/// The CPU vendor the guest's CPUID names (`--cpu-vendor`), as QEMU's
/// `-cpu ...,vendor=` does.
///
/// Only the vendor string changes: leaf 0 and leaf 0x8000_0000 (EBX, EDX,
/// ECX), not the family/model or any feature bit. Upstream KVM reads the
/// string back from the vCPU's CPUID and follows the named vendor where the
/// two differ architecturally: on an AMD host, a guest that says
/// `GenuineIntel` keeps the upper halves of `SYSENTER_ESP`/`SYSENTER_EIP`
/// (AMD drops them). On this project's nested `kvm_pvm` host they are kept
/// either way (kvm-unit-tests' `msr` passes its SYSENTER checks with both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CpuVendor {
    /// `GenuineIntel`.
    Intel,
    /// `AuthenticAMD`.
    Amd,
}

impl CpuVendor {
    /// The 12-byte vendor string.
    pub fn name(self) -> &'static [u8; 12] {
        match self {
            CpuVendor::Intel => b"GenuineIntel",
            CpuVendor::Amd => b"AuthenticAMD",
        }
    }

    /// Writes the vendor string into leaves 0 and 0x8000_0000 of `cpuid`
    /// (EBX, EDX, ECX hold bytes 0-3, 4-7, 8-11).
    pub fn apply(self, cpuid: &mut nkvm::Cpuid) {
        let name = self.name();
        let word = |i: usize| u32::from_le_bytes([name[i], name[i + 1], name[i + 2], name[i + 3]]);
        for e in cpuid.as_mut_slice().iter_mut().filter(|e| e.function == 0 || e.function == 0x8000_0000) {
            e.ebx = word(0);
            e.edx = word(4);
            e.ecx = word(8);
        }
    }
}

/// Whether bit `bit` of register `reg` (0 EAX, 1 EBX, 2 ECX, 3 EDX) of
/// leaf `leaf` (subleaf 0) is set in `cpuid`.
fn has(cpuid: &nkvm::Cpuid, leaf: u32, reg: usize, bit: u32) -> bool {
    cpuid.as_slice().iter().filter(|e| e.function == leaf && e.index == 0).any(|e| {
        let word = [e.eax, e.ebx, e.ecx, e.edx][reg];
        word & (1 << bit) != 0
    })
}

/// Clears VMX (leaf 1 ECX bit 5) and SVM (leaf 0x8000_0001 ECX bit 2):
/// nkvm's saved state has no `KVM_GET_NESTED_STATE`, so a guest in VMX or
/// SVM operation would find it gone after a restore (its next VMX
/// instruction a #UD). Returns the names of what it hid.
pub fn hide_nested(cpuid: &mut nkvm::Cpuid) -> Vec<&'static str> {
    let mut hidden = Vec::new();
    for e in cpuid.as_mut_slice().iter_mut() {
        let (bit, name) = match e.function {
            1 => (5, "vmx"),
            0x8000_0001 => (2, "svm"),
            _ => continue,
        };
        if e.ecx & (1 << bit) != 0 {
            e.ecx &= !(1 << bit);
            hidden.push(name);
        }
    }
    hidden
}

/// The MSRs whose feature `cpuid` does not offer, among those KVM lets a
/// guest touch anyway on some hosts (this one: `IA32_FLUSH_CMD` writes
/// succeed with no `FLUSH_L1D`), where a CPU of that model raises #GP:
///
/// | MSR | offered by |
/// |---|---|
/// | `IA32_SPEC_CTRL` (0x48) | IBRS, STIBP or SSBD (leaf 7 EDX 26, 27, 31; 0x8000_0008 EBX 14, 15, 24) |
/// | `IA32_PRED_CMD` (0x49) | IBPB (leaf 7 EDX 26; 0x8000_0008 EBX 12) |
/// | `IA32_FLUSH_CMD` (0x10b) | FLUSH_L1D (leaf 7 EDX 28) |
/// | `IA32_ARCH_CAPABILITIES` (0x10a) | ARCH_CAPABILITIES (leaf 7 EDX 29) |
pub fn msrs_cpuid_lacks(cpuid: &nkvm::Cpuid) -> Vec<u32> {
    let (edx7, ebx8) = (|bit| has(cpuid, 7, 3, bit), |bit| has(cpuid, 0x8000_0008, 1, bit));
    let mut lacked = Vec::new();
    if !(edx7(26) || edx7(27) || edx7(31) || ebx8(14) || ebx8(15) || ebx8(24)) {
        lacked.push(0x48);
    }
    if !(edx7(26) || ebx8(12)) {
        lacked.push(0x49);
    }
    if !edx7(29) {
        lacked.push(0x10a);
    }
    if !edx7(28) {
        lacked.push(0x10b);
    }
    lacked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmx_and_svm_are_hidden_and_nothing_else() {
        let mut cpuid = nkvm::Cpuid::new(2).unwrap();
        let entries = cpuid.as_mut_slice();
        (entries[0].function, entries[0].ecx) = (1, u32::MAX);
        (entries[1].function, entries[1].ecx) = (0x8000_0001, u32::MAX);
        assert_eq!(hide_nested(&mut cpuid), ["vmx", "svm"]);
        let ecx: Vec<u32> = cpuid.as_slice().iter().map(|e| e.ecx).collect();
        assert_eq!(ecx, [!(1 << 5), !(1 << 2)]);
        assert!(hide_nested(&mut cpuid).is_empty(), "nothing left to hide");
    }

    #[test]
    fn names_parse_and_only_hiding_is_accepted() {
        assert_eq!("-x2apic,-pcid".parse(), Ok(HiddenFeatures(vec!["x2apic", "pcid"])));
        assert_eq!("".parse(), Ok(HiddenFeatures::default()));
        assert!("+x2apic".parse::<HiddenFeatures>().unwrap_err().contains("only hide"));
        assert!("-avx9".parse::<HiddenFeatures>().unwrap_err().contains("unknown CPU feature \"avx9\""));
    }

    #[test]
    fn hiding_clears_exactly_the_named_bits() {
        let mut cpuid = nkvm::Cpuid::new(2).unwrap();
        let entries = cpuid.as_mut_slice();
        entries[0].function = 1;
        entries[0].ecx = u32::MAX;
        entries[1].function = 7;
        entries[1].ebx = u32::MAX;
        "-x2apic,-invpcid".parse::<HiddenFeatures>().unwrap().apply(&mut cpuid);
        assert_eq!(cpuid.as_slice()[0].ecx, !(1 << 21));
        assert_eq!(cpuid.as_slice()[1].ebx, !(1 << 10));
    }

    #[test]
    fn vendor_rewrites_both_vendor_leaves_and_nothing_else() {
        let mut cpuid = nkvm::Cpuid::new(3).unwrap();
        let entries = cpuid.as_mut_slice();
        entries[0].function = 0;
        entries[0].eax = 0x10;
        entries[1].function = 0x8000_0000;
        entries[1].eax = 0x8000_0021;
        entries[2].function = 1;
        entries[2].ebx = 0x1234;
        CpuVendor::Intel.apply(&mut cpuid);
        for e in &cpuid.as_slice()[..2] {
            let mut name = Vec::new();
            for word in [e.ebx, e.edx, e.ecx] {
                name.extend_from_slice(&word.to_le_bytes());
            }
            assert_eq!(name, b"GenuineIntel");
        }
        assert_eq!((cpuid.as_slice()[0].eax, cpuid.as_slice()[1].eax), (0x10, 0x8000_0021));
        assert_eq!(cpuid.as_slice()[2].ebx, 0x1234);
        CpuVendor::Amd.apply(&mut cpuid);
        assert_eq!(cpuid.as_slice()[0].ebx.to_le_bytes(), *b"Auth");
    }

    #[test]
    fn msrs_are_denied_exactly_when_no_cpuid_bit_offers_them() {
        let mut cpuid = nkvm::Cpuid::new(2).unwrap();
        cpuid.as_mut_slice()[0].function = 7;
        cpuid.as_mut_slice()[1].function = 0x8000_0008;
        assert_eq!(msrs_cpuid_lacks(&cpuid), vec![0x48, 0x49, 0x10a, 0x10b]);
        cpuid.as_mut_slice()[1].ebx = 1 << 12 | 1 << 24; // AMD IBPB, AMD SSBD
        assert_eq!(msrs_cpuid_lacks(&cpuid), vec![0x10a, 0x10b]);
        cpuid.as_mut_slice()[1].ebx = 0;
        cpuid.as_mut_slice()[0].edx = 1 << 26 | 1 << 28 | 1 << 29; // IBRS/IBPB, FLUSH_L1D, ARCH_CAPABILITIES
        assert_eq!(msrs_cpuid_lacks(&cpuid), Vec::<u32>::new());
    }
}
