//! The guest's page tables as the CPU walks them for a data access, for
//! what `KVM_TRANSLATE` leaves out: it walks as a supervisor read, so the
//! user/supervisor and read/write bits (with CR0.WP) are checked here, and
//! a write sets the dirty bit of the entry that maps the page, as the CPU
//! does (a guest kernel relies on it to know which pages to write back).
//! SMAP and protection keys are not checked.

use super::EmulateError;
use crate::mode::{
    CR0_PG, CR0_WP, CR4_LA57, CR4_PAE, CR4_PSE, EFER_LMA, PTE_ACCESSED as ACCESSED, PTE_DIRTY as DIRTY,
    PTE_HUGE as HUGE, PTE_PRESENT as PRESENT, PTE_USER as USER, PTE_WRITE as WRITABLE,
};
use crate::{GuestAddress, Sregs, Vm};

/// Bits 51:12 of a 64-bit entry: the next table's address.
const ADDRESS_64: u64 = 0x000f_ffff_ffff_f000;

/// The paging state an access is walked with.
#[derive(Debug, Clone, Copy)]
pub(super) struct Paging {
    cr0: u64,
    cr3: u64,
    cr4: u64,
    efer: u64,
}

impl Paging {
    pub(super) fn of(sregs: &Sregs) -> Self {
        Self { cr0: sregs.cr0, cr3: sregs.cr3, cr4: sregs.cr4, efer: sregs.efer }
    }

    /// Checks an access to `gva` (which `KVM_TRANSLATE` found mapped) at
    /// `cpl`: `Ok(())` when the CPU allows it (a write's dirty bit then
    /// set), else the #PF error code (present, write, user).
    pub(super) fn check(&self, vm: &Vm, gva: u64, write: bool, cpl: u8) -> Result<Result<(), u32>, EmulateError> {
        if self.cr0 & CR0_PG == 0 {
            return Ok(Ok(()));
        }
        let Some((leaf_at, leaf, wide, user, writable)) = self.walk(vm, gva)? else {
            // Not present now (another vCPU changed it): KVM's answer stands.
            return Ok(Ok(()));
        };
        let user_access = cpl == 3;
        let denied = (user_access && !user) || (write && !writable && (user_access || self.cr0 & CR0_WP != 0));
        if denied {
            let code = 1 | if write { 1 << 1 } else { 0 } | if user_access { 1 << 2 } else { 0 };
            return Ok(Err(code));
        }
        if write && leaf & DIRTY == 0 {
            let entry = leaf | DIRTY | ACCESSED;
            let at = GuestAddress(leaf_at);
            let bytes = entry.to_le_bytes();
            let bytes = if wide { &bytes[..] } else { &bytes[..4] };
            vm.write_memory(at, bytes).map_err(EmulateError::Memory)?;
            vm.mark_dirty(at, bytes.len() as u64);
        }
        Ok(Ok(()))
    }

    /// The entry that maps `gva` (its address, value and whether it is 8
    /// bytes wide) and whether every level allows user and write access;
    /// `None` if a level is not present.
    #[allow(clippy::type_complexity)]
    fn walk(&self, vm: &Vm, gva: u64) -> Result<Option<(u64, u64, bool, bool, bool)>, EmulateError> {
        let read = |at: u64, wide: bool| -> Result<u64, EmulateError> {
            let mut bytes = [0u8; 8];
            let n = if wide { 8 } else { 4 };
            vm.read_memory(GuestAddress(at), &mut bytes[..n]).map_err(EmulateError::Memory)?;
            Ok(u64::from_le_bytes(bytes))
        };
        let (mut user, mut writable) = (true, true);
        if self.cr4 & CR4_PAE == 0 {
            // 32-bit paging: a page directory, then a page table (or a 4 MiB page).
            let pde_at = (self.cr3 & 0xffff_f000) + 4 * ((gva >> 22) & 0x3ff);
            let pde = read(pde_at, false)?;
            if pde & PRESENT == 0 {
                return Ok(None);
            }
            (user, writable) = (pde & USER != 0, pde & WRITABLE != 0);
            if pde & HUGE != 0 && self.cr4 & CR4_PSE != 0 {
                return Ok(Some((pde_at, pde, false, user, writable)));
            }
            let pte_at = (pde & 0xffff_f000) + 4 * ((gva >> 12) & 0x3ff);
            let pte = read(pte_at, false)?;
            if pte & PRESENT == 0 {
                return Ok(None);
            }
            return Ok(Some((pte_at, pte, false, user && pte & USER != 0, writable && pte & WRITABLE != 0)));
        }
        let (mut table, mut level) = if self.efer & EFER_LMA != 0 {
            (self.cr3 & ADDRESS_64, if self.cr4 & CR4_LA57 != 0 { 5 } else { 4 })
        } else {
            // PAE: the PDPTE has no user or write bit.
            let pdpte = read((self.cr3 & 0xffff_ffe0) + 8 * ((gva >> 30) & 3), true)?;
            if pdpte & PRESENT == 0 {
                return Ok(None);
            }
            (pdpte & ADDRESS_64, 2)
        };
        loop {
            let at = table + 8 * ((gva >> (12 + 9 * (level - 1))) & 0x1ff);
            let entry = read(at, true)?;
            if entry & PRESENT == 0 {
                return Ok(None);
            }
            user &= entry & USER != 0;
            writable &= entry & WRITABLE != 0;
            if level == 1 || (level <= 3 && entry & HUGE != 0) {
                return Ok(Some((at, entry, true, user, writable)));
            }
            table = entry & ADDRESS_64;
            level -= 1;
        }
    }
}
