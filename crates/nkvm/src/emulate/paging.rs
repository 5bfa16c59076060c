//! The guest's page tables as the CPU walks them for a data access, for
//! what `KVM_TRANSLATE` leaves out: it walks as a supervisor read, so the
//! user/supervisor and read/write bits (with CR0.WP) are checked here, and
//! a write sets the dirty bit of the entry that maps the page, as the CPU
//! does (a guest kernel relies on it to know which pages to write back).
//! SMAP is checked (a supervisor access to a user page with CR4.SMAP set
//! faults unless RFLAGS.AC allows it and the access is explicit), and so
//! are protection keys (CR4.PKE: PKRU's access- and write-disable bits for
//! the key in a user page's leaf entry, bits 62:59).

use super::EmulateError;
use crate::mode::{
    CR0_PG, CR0_WP, CR4_LA57, CR4_PAE, CR4_PKE, CR4_PSE, CR4_SMAP, EFER_LMA, PTE_ACCESSED as ACCESSED,
    PTE_DIRTY as DIRTY, PTE_HUGE as HUGE, PTE_PRESENT as PRESENT, PTE_USER as USER, PTE_WRITE as WRITABLE,
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
    /// RFLAGS.AC, which lets explicit supervisor accesses reach user pages
    /// under SMAP.
    ac: bool,
    /// PKRU, when CR4.PKE makes protection keys apply (long mode only).
    pkru: Option<u32>,
}

/// The #PF error code's protection-key bit.
const PF_PK: u32 = 1 << 5;

impl Paging {
    pub(super) fn of(sregs: &Sregs, rflags: u64) -> Self {
        const RFLAGS_AC: u64 = 1 << 18;
        let (cr0, cr3, cr4, efer) = (sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer);
        Self { cr0, cr3, cr4, efer, ac: rflags & RFLAGS_AC != 0, pkru: None }
    }

    /// Whether protection keys apply (CR4.PKE in long mode): then the
    /// caller reads PKRU and gives it with [`Paging::with_pkru`].
    pub(super) fn needs_pkru(&self) -> bool {
        self.cr4 & CR4_PKE != 0 && self.efer & EFER_LMA != 0
    }

    /// The same state with PKRU's value.
    pub(super) fn with_pkru(self, pkru: u32) -> Self {
        Self { pkru: Some(pkru), ..self }
    }

    /// The same state for an implicit supervisor access (a descriptor
    /// table read), which RFLAGS.AC does not exempt from SMAP.
    pub(super) fn implicit(self) -> Self {
        Self { ac: false, ..self }
    }

    /// The same state for fetching instruction bytes, which SMAP does not
    /// govern (SMEP does, and KVM already fetched the instruction).
    pub(super) fn fetch(self) -> Self {
        Self { ac: true, pkru: None, ..self }
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
        let smap = !user_access && user && self.cr4 & CR4_SMAP != 0 && !self.ac;
        let denied = smap || (user_access && !user) || (write && !writable && (user_access || self.cr0 & CR0_WP != 0));
        let code = 1 | if write { 1 << 1 } else { 0 } | if user_access { 1 << 2 } else { 0 };
        if denied {
            return Ok(Err(code));
        }
        if let (Some(pkru), true) = (self.pkru, user) {
            let key = (leaf >> 59) & 0xf;
            let (access_off, write_off) = (pkru >> (2 * key) & 1 != 0, pkru >> (2 * key + 1) & 1 != 0);
            if access_off || (write && write_off && (user_access || self.cr0 & CR0_WP != 0)) {
                return Ok(Err(code | PF_PK));
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Hypervisor, VmConfig};

    /// SMAP, checked here on a real VM's memory: KVM on the nested test
    /// host offers no SMAP to guests, so no vCPU can be given CR4.SMAP.
    #[test]
    fn smap_keeps_supervisor_data_accesses_out_of_user_pages_unless_ac_allows_them() {
        let hv = Hypervisor::open().unwrap();
        let vm = Vm::new(&hv, &VmConfig { memory: 4 << 20, ..Default::default() }).unwrap();
        // PML4 at 0x1000 -> PDPT at 0x2000 -> PD at 0x3000: one 2 MiB user
        // page at 0, every level present, writable and user.
        let bits = PRESENT | WRITABLE | USER;
        for (at, entry) in [(0x1000, 0x2000 | bits), (0x2000, 0x3000 | bits), (0x3000, HUGE | bits)] {
            vm.write_memory(GuestAddress(at), &entry.to_le_bytes()).unwrap();
        }
        let mut sregs =
            Sregs { cr0: CR0_PG | CR0_WP | 1, cr3: 0x1000, cr4: CR4_PAE, efer: EFER_LMA, ..Default::default() };
        let check = |paging: Paging, cpl| paging.check(&vm, 0x5000, true, cpl).unwrap();
        assert_eq!(check(Paging::of(&sregs, 0), 0), Ok(()), "no SMAP: the kernel may write");
        sregs.cr4 |= CR4_SMAP;
        assert_eq!(check(Paging::of(&sregs, 0), 0), Err(3), "#PF: present, write, supervisor");
        assert_eq!(check(Paging::of(&sregs, 0), 3), Ok(()), "user mode's own page");
        const AC: u64 = 1 << 18;
        assert_eq!(check(Paging::of(&sregs, AC), 0), Ok(()), "RFLAGS.AC (stac) lets an explicit access through");
        assert_eq!(check(Paging::of(&sregs, AC).implicit(), 0), Err(3), "but not an implicit one");
        assert_eq!(check(Paging::of(&sregs, 0).fetch(), 0), Ok(()), "instruction bytes are not data");
    }

    /// Protection keys on the same kind of tables: a user page with key 5.
    #[test]
    fn protection_keys_deny_what_pkru_disables_for_the_page_key() {
        let hv = Hypervisor::open().unwrap();
        let vm = Vm::new(&hv, &VmConfig { memory: 4 << 20, ..Default::default() }).unwrap();
        let bits = PRESENT | WRITABLE | USER;
        for (at, entry) in [(0x1000, 0x2000 | bits), (0x2000, 0x3000 | bits), (0x3000, HUGE | bits | 5 << 59)] {
            vm.write_memory(GuestAddress(at), &entry.to_le_bytes()).unwrap();
        }
        let sregs = Sregs {
            cr0: CR0_PG | CR0_WP | 1,
            cr3: 0x1000,
            cr4: CR4_PAE | CR4_PKE,
            efer: EFER_LMA,
            ..Default::default()
        };
        let paging = Paging::of(&sregs, 0);
        assert!(paging.needs_pkru());
        let check = |pkru: u32, write, cpl| paging.with_pkru(pkru).check(&vm, 0x5000, write, cpl).unwrap();
        let (ad, wd) = (1 << 10, 1 << 11); // key 5's access- and write-disable bits
        assert_eq!(check(0, true, 3), Ok(()), "PKRU 0: everything allowed");
        assert_eq!(check(wd, false, 3), Ok(()), "write-disabled: reads pass");
        assert_eq!(check(wd, true, 3), Err(0x27), "#PF: present, write, user, protection key");
        assert_eq!(check(wd, true, 0), Err(0x23), "the kernel too, with CR0.WP");
        assert_eq!(check(ad, false, 3), Err(0x25), "access-disabled: reads fault");
        assert_eq!(check(0b11, true, 3), Ok(()), "key 0's bits do not touch key 5's page");
        assert_eq!(paging.with_pkru(ad).fetch().check(&vm, 0x5000, false, 3).unwrap(), Ok(()), "fetches are not data");
    }
}
