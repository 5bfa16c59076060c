//! [`Vm::deny_msrs`]: MSRs the guest may not touch (KVM's MSR filter,
//! `KVM_X86_SET_MSR_FILTER`).
//!
//! KVM lets a guest read and write some MSRs whose feature its CPUID does
//! not offer (e.g. `IA32_FLUSH_CMD` on a host that has L1D flushing), where
//! a real CPU of the guest's model raises #GP. The filter makes KVM refuse
//! them: with the filter denying an MSR and no user-space MSR exit enabled
//! for filtered accesses, KVM injects #GP into the guest itself, so a denied
//! access never leaves the kernel. `KVM_GET_MSRS`/`KVM_SET_MSRS` from the
//! VMM (state save and restore) are not filtered.

use kvm_bindings::KVM_CAP_X86_MSR_FILTER;
use kvm_ioctls::{MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags};

use super::{Vm, VmError};

/// MSRs one filter range spans at most (KVM's bitmap limit, 1536 bytes).
const RANGE_SPAN: u32 = kvm_bindings::KVM_MSR_FILTER_MAX_BITMAP_SIZE * 8;

/// One range of the filter: `count` MSRs from `base`, a bit per MSR, set
/// for the allowed ones.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Range {
    base: u32,
    count: u32,
    allowed: Vec<u8>,
}

/// Groups `msrs` (any order, duplicates allowed) into the fewest ranges,
/// each allowing every MSR it spans but the denied ones.
fn ranges(msrs: &[u32]) -> Result<Vec<Range>, VmError> {
    let mut sorted = msrs.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out: Vec<Range> = Vec::new();
    for msr in sorted {
        match out.last_mut() {
            Some(r) if msr - r.base < RANGE_SPAN => r.count = msr - r.base + 1,
            _ => out.push(Range { base: msr, count: 1, allowed: Vec::new() }),
        }
    }
    if out.len() > kvm_bindings::KVM_MSR_FILTER_MAX_RANGES as usize {
        return Err(VmError::TooManyMsrRanges { ranges: out.len(), max: kvm_bindings::KVM_MSR_FILTER_MAX_RANGES });
    }
    for r in &mut out {
        r.allowed = vec![0xff; r.count.div_ceil(8) as usize];
        for &msr in msrs.iter().filter(|&&m| m >= r.base && m - r.base < r.count) {
            let bit = msr - r.base;
            r.allowed[(bit / 8) as usize] &= !(1 << (bit % 8));
        }
    }
    Ok(out)
}

impl Vm {
    /// Makes every guest `rdmsr` and `wrmsr` of the MSRs `msrs` raise #GP,
    /// as a CPU without them does; other MSRs are untouched. Replaces the
    /// previous list (an empty list removes the filter). Applies to all
    /// vCPUs, including those created later.
    ///
    /// The x2APIC MSRs (0x800..=0x8ff) cannot be denied: KVM ignores the
    /// filter for them. Indices that do not fit in 16 ranges of 12288 MSRs
    /// are refused ([`VmError::TooManyMsrRanges`]); a host without the
    /// filter gives [`VmError::MissingCapability`].
    ///
    /// ```no_run
    /// # let hv = nkvm::Hypervisor::open()?;
    /// # let vm = nkvm::Vm::new(&hv, &nkvm::VmConfig::default())?;
    /// vm.deny_msrs(&[0x10b])?; // IA32_FLUSH_CMD
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn deny_msrs(&self, msrs: &[u32]) -> Result<(), VmError> {
        if self.fd.check_extension_raw(KVM_CAP_X86_MSR_FILTER.into()) <= 0 {
            return Err(VmError::MissingCapability("an MSR filter (KVM_CAP_X86_MSR_FILTER)"));
        }
        let ranges = ranges(msrs)?;
        let filter: Vec<_> = ranges
            .iter()
            .map(|r| MsrFilterRange {
                flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
                base: r.base,
                msr_count: r.count,
                bitmap: &r.allowed,
            })
            .collect();
        self.fd
            .set_msr_filter(MsrFilterDefaultAction::ALLOW, &filter)
            .map_err(|source| VmError::Kvm { op: "KVM_X86_SET_MSR_FILTER", source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearby_msrs_share_a_range_that_allows_the_ones_between() {
        let r = ranges(&[0x10b, 0x48, 0x48]).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].base, r[0].count), (0x48, 0x10b - 0x48 + 1));
        assert_eq!(r[0].allowed[0], 0xfe, "0x48 denied, 0x49.. allowed");
        let last = 0x10b - 0x48;
        assert_eq!(r[0].allowed[last / 8] & (1 << (last % 8)), 0, "0x10b denied");
        assert_eq!(r[0].allowed.iter().map(|b| b.count_zeros()).sum::<u32>(), 2, "only the two are denied");
    }

    #[test]
    fn distant_msrs_get_their_own_ranges_and_too_many_are_refused() {
        let r = ranges(&[0x4000_0000, 0x10]).unwrap();
        assert_eq!(r.iter().map(|r| (r.base, r.count)).collect::<Vec<_>>(), vec![(0x10, 1), (0x4000_0000, 1)]);
        let spread: Vec<u32> = (0..17).map(|i| i * RANGE_SPAN).collect();
        assert!(matches!(ranges(&spread), Err(VmError::TooManyMsrRanges { ranges: 17, max: 16 })));
        assert!(ranges(&[]).unwrap().is_empty());
    }
}
