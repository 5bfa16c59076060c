//! `--cpu-features -x2apic,-pcid`: CPUID feature bits a user hides from
//! the guest (the same names as QEMU's `-cpu` flags), on top of what this
//! host's KVM supports.
//!
//! Only hiding is offered: a bit KVM does not support cannot be given, and
//! a guest that sees a feature the vCPU lacks fails in ways no test wants.

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
