//! Guest memory as an emulated instruction sees it: linear addresses of
//! memory operands, translated through the guest's page tables
//! (`KVM_TRANSLATE`) and accessed in the VM's memory map.

use iced_x86::{Instruction, Register};

use super::regs::gpr;
use super::EmulateError;
use crate::mode::EFER_LMA;
use crate::{GuestAddress, Regs, Sregs, Vcpu, Vm, PAGE_SIZE};

/// Why a guest access did not happen: the fault the CPU would raise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fault {
    /// #PF at `addr` (the error code says not-present, write, user).
    Page { addr: u64, error_code: u32 },
    /// #GP with this error code: 0 for a misaligned operand that must be
    /// aligned or a reserved bit, the IDT error code for `int n`.
    General(u32),
    /// #NP with this error code: a gate or segment `int n` needs is not
    /// present.
    NotPresent(u32),
}

/// Reads and writes guest-virtual memory for one instruction.
pub(super) struct GuestMemory<'a> {
    pub(super) vcpu: &'a Vcpu,
    pub(super) vm: &'a Vm,
    /// The privilege level: 0 in real mode, 3 in virtual-8086 mode, else
    /// SS.DPL.
    pub(super) cpl: u8,
    /// Linear addresses are 64-bit and must be canonical (long mode);
    /// otherwise they wrap at 4 GiB.
    pub(super) long_mode: bool,
    /// The paging state permissions are checked with.
    pub(super) paging: super::paging::Paging,
}

const PF_WRITE: u32 = 1 << 1;
const PF_USER: u32 = 1 << 2;

impl GuestMemory<'_> {
    /// The linear address of memory operand `op` of `insn`: the segment's
    /// base (in 64-bit code only FS and GS have one) + base + index * scale
    /// + displacement (RIP-relative already resolved by the decoder).
    pub(super) fn operand_address(insn: &Instruction, op: u32, regs: &Regs, sregs: &Sregs) -> Option<u64> {
        let code64 = sregs.cs.l != 0 && sregs.efer & EFER_LMA != 0;
        let base = |base: u64| Some(if code64 { 0 } else { base });
        insn.virtual_address(op, 0, |reg, _, _| match reg {
            Register::FS => Some(sregs.fs.base),
            Register::GS => Some(sregs.gs.base),
            Register::ES => base(sregs.es.base),
            Register::CS => base(sregs.cs.base),
            Register::SS => base(sregs.ss.base),
            Register::DS => base(sregs.ds.base),
            r => gpr(regs, r),
        })
    }

    /// Whether an access to `gva` would fault, without reading it (a
    /// device's register behind it is not touched).
    pub(super) fn probe(&self, gva: u64) -> Result<Result<(), Fault>, EmulateError> {
        Ok(self.translate(gva, false)?.map(|_| ()))
    }

    /// The guest-physical address of `gva`, or the fault the access takes:
    /// #GP(0) for a non-canonical address in long mode, #PF for an
    /// unmapped page. Outside long mode the address wraps at 4 GiB.
    fn translate(&self, gva: u64, write: bool) -> Result<Result<u64, Fault>, EmulateError> {
        let gva = if self.long_mode {
            if ((gva as i64) << 16 >> 16) as u64 != gva {
                return Ok(Err(Fault::General(0)));
            }
            gva
        } else {
            gva & 0xffff_ffff
        };
        Ok(match self.vcpu.translate(gva)? {
            Some(gpa) => match self.paging.check(self.vm, gva, write, self.cpl)? {
                Ok(()) => Ok(gpa),
                Err(error_code) => Err(Fault::Page { addr: gva, error_code }),
            },
            None => {
                let error_code = if write { PF_WRITE } else { 0 } | if self.cpl == 3 { PF_USER } else { 0 };
                Err(Fault::Page { addr: gva, error_code })
            }
        })
    }

    /// Reads `buf.len()` bytes at `gva`, page by page.
    pub(super) fn read(&self, gva: u64, buf: &mut [u8]) -> Result<Result<(), Fault>, EmulateError> {
        let mut done = 0;
        while done < buf.len() {
            let at = gva.wrapping_add(done as u64);
            let n = (PAGE_SIZE - at % PAGE_SIZE).min((buf.len() - done) as u64) as usize;
            let gpa = match self.translate(at, false)? {
                Ok(gpa) => gpa,
                Err(fault) => return Ok(Err(fault)),
            };
            self.read_physical(gpa, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(Ok(()))
    }

    /// Reads guest-physical bytes: RAM, or an attached MMIO range (8 bytes
    /// at a time) as the vCPU's own access would reach it.
    fn read_physical(&self, gpa: u64, buf: &mut [u8]) -> Result<(), EmulateError> {
        // One map for the lookup and the access: a change in between
        // cannot split them.
        let map = self.vm.memory();
        if map.find(GuestAddress(gpa)).is_some() {
            return map.read(GuestAddress(gpa), buf).map_err(EmulateError::Memory);
        }
        for (i, chunk) in buf.chunks_mut(8).enumerate() {
            let at = gpa + 8 * i as u64;
            let value = self.vm.mmio_access(at, chunk.len() as u8, None).ok_or_else(|| unmapped(at, chunk.len()))?;
            chunk.copy_from_slice(&value.to_le_bytes()[..chunk.len()]);
        }
        Ok(())
    }

    /// Writes guest-physical bytes: RAM (marked dirty) or an attached MMIO
    /// range. A read-only region (ROM) keeps its bytes: the write goes to
    /// a device claiming the range, as KVM's exit would, or nowhere.
    fn write_physical(&self, gpa: u64, data: &[u8]) -> Result<(), EmulateError> {
        // One map for the lookup and the access (see `read_physical`).
        let map = self.vm.memory();
        let rom = match map.find(GuestAddress(gpa)) {
            Some(region) if !region.read_only => {
                map.write(GuestAddress(gpa), data).map_err(EmulateError::Memory)?;
                self.vm.mark_dirty(GuestAddress(gpa), data.len() as u64);
                return Ok(());
            }
            Some(_) => true,
            None => false,
        };
        for (i, chunk) in data.chunks(8).enumerate() {
            let at = gpa + 8 * i as u64;
            let mut bytes = [0u8; 8];
            bytes[..chunk.len()].copy_from_slice(chunk);
            let value = u64::from_le_bytes(bytes);
            if self.vm.mmio_access(at, chunk.len() as u8, Some(value)).is_none() && !rom {
                return Err(unmapped(at, chunk.len()));
            }
        }
        Ok(())
    }

    /// Writes `data` at `gva`, page by page, after checking every page is
    /// mapped (so a fault leaves memory untouched), and marks it dirty.
    pub(super) fn write(&self, gva: u64, data: &[u8]) -> Result<Result<(), Fault>, EmulateError> {
        let mut pieces = Vec::new();
        let mut done = 0;
        while done < data.len() {
            let at = gva.wrapping_add(done as u64);
            let n = (PAGE_SIZE - at % PAGE_SIZE).min((data.len() - done) as u64) as usize;
            match self.translate(at, true)? {
                Ok(gpa) => pieces.push((gpa, done, n)),
                Err(fault) => return Ok(Err(fault)),
            }
            done += n;
        }
        for (gpa, start, n) in pieces {
            self.write_physical(gpa, &data[start..start + n])?;
        }
        Ok(Ok(()))
    }

    /// One atomic 128-bit compare-exchange at `gva` (16-byte aligned, so on
    /// one page) on the host mapping of guest RAM.
    pub(super) fn compare_exchange_u128(
        &self,
        gva: u64,
        current: u128,
        new: u128,
    ) -> Result<Result<Result<u128, u128>, Fault>, EmulateError> {
        if gva % 16 != 0 {
            return Ok(Err(Fault::General(0)));
        }
        let gpa = match self.translate(gva, true)? {
            Ok(gpa) => gpa,
            Err(fault) => return Ok(Err(fault)),
        };
        let map = self.vm.memory();
        let region = map
            .find(GuestAddress(gpa))
            .ok_or(EmulateError::Memory(crate::MemoryError::Unmapped { addr: GuestAddress(gpa), len: 16 }))?;
        if region.read_only {
            // ROM: compared, never written.
            let mut bytes = [0u8; 16];
            self.vm.read_memory(GuestAddress(gpa), &mut bytes).map_err(EmulateError::Memory)?;
            let found = u128::from_le_bytes(bytes);
            return Ok(Ok(if found == current { Ok(found) } else { Err(found) }));
        }
        let offset = region.offset + (gpa - region.gpa.0);
        let result = region.backing.compare_exchange_u128(offset, current, new).map_err(EmulateError::Memory)?;
        if result.is_ok() {
            self.vm.mark_dirty(GuestAddress(gpa), 16);
        }
        Ok(Ok(result))
    }
}

/// The error for a guest-physical address neither RAM nor a device claims.
fn unmapped(gpa: u64, len: usize) -> EmulateError {
    EmulateError::Memory(crate::MemoryError::Unmapped { addr: GuestAddress(gpa), len })
}
