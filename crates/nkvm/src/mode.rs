//! Starting a vCPU in real mode, flat 32-bit protected mode (the multiboot
//! hand-over) or 64-bit long mode.
//!
//! [`LongMode`] writes a GDT and identity-mapping page tables (the first
//! 4 GiB, 2 MiB pages) into guest memory once; [`Vcpu::set_long_mode`] then
//! points a vCPU at them with a given entry point and stack. [`Idt`] writes
//! 64-bit interrupt gates for such a guest.

use crate::memory::{MemoryError, MemoryMap};
use crate::{GuestAddress, Vcpu, VcpuError};

/// Code segment selector used in long mode.
pub const CODE64_SELECTOR: u16 = 0x08;
/// Data segment selector used in long mode.
pub const DATA_SELECTOR: u16 = 0x10;

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
pub(crate) const CR0_WP: u64 = 1 << 16;
pub(crate) const CR0_PG: u64 = 1 << 31;
pub(crate) const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
pub(crate) const EFER_LMA: u64 = 1 << 10;

pub(crate) const PTE_PRESENT: u64 = 1;
pub(crate) const PTE_WRITE: u64 = 1 << 1;
pub(crate) const PTE_HUGE: u64 = 1 << 7;
pub(crate) const PTE_USER: u64 = 1 << 2;
pub(crate) const PTE_ACCESSED: u64 = 1 << 5;
pub(crate) const PTE_DIRTY: u64 = 1 << 6;
pub(crate) const CR4_PSE: u64 = 1 << 4;
pub(crate) const CR4_LA57: u64 = 1 << 12;
pub(crate) const CR4_SMAP: u64 = 1 << 21;
pub(crate) const CR4_PKE: u64 = 1 << 22;

/// Where the long-mode tables live in guest memory: `base` .. `base + LongMode::SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongMode {
    base: GuestAddress,
}

impl LongMode {
    /// Bytes of guest memory the tables take: GDT page, PML4, PDPT, 4 page directories.
    pub const SIZE: u64 = 7 * 4096;

    /// Writes the GDT and page tables at `base` (4 KiB aligned) into `memory`.
    pub fn install(memory: &MemoryMap, base: GuestAddress) -> Result<Self, MemoryError> {
        if base.0 % 4096 != 0 {
            return Err(MemoryError::Unmapped { addr: base, len: Self::SIZE as usize });
        }
        let lm = Self { base };
        // GDT: null, 64-bit code, data.
        let gdt: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
        let bytes: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
        memory.write(lm.gdt(), &bytes)?;
        let pml4 = lm.pml4();
        let pdpt = pml4.0 + 0x1000;
        memory.write(pml4, &(pdpt | PTE_PRESENT | PTE_WRITE).to_le_bytes())?;
        for i in 0..4u64 {
            let pd = pdpt + 0x1000 * (i + 1);
            memory.write(GuestAddress(pdpt + 8 * i), &(pd | PTE_PRESENT | PTE_WRITE).to_le_bytes())?;
            let entries: Vec<u8> = (0..512u64)
                .flat_map(|j| (((i << 30) + (j << 21)) | PTE_PRESENT | PTE_WRITE | PTE_HUGE).to_le_bytes())
                .collect();
            memory.write(GuestAddress(pd), &entries)?;
        }
        Ok(lm)
    }

    /// The GDT's address.
    pub fn gdt(&self) -> GuestAddress {
        self.base
    }

    /// The PML4's address (the guest's CR3).
    pub fn pml4(&self) -> GuestAddress {
        GuestAddress(self.base.0 + 0x1000)
    }
}

/// A 64-bit interrupt descriptor table in guest memory (256 gates of 16
/// bytes at `base`), for guests started with [`LongMode`].
///
/// ```no_run
/// # fn f(vm: &nkvm::Vm) -> Result<(), nkvm::MemoryError> {
/// use nkvm::{GuestAddress, Idt};
/// let idt = Idt::new(GuestAddress(0x7000));
/// idt.set_gate(&vm.memory(), 0x40, GuestAddress(0x3_0000))?; // vector 0x40's handler
/// idt.write_idtr(&vm.memory(), GuestAddress(0x6ff0))?; // the guest runs `lidt [0x6ff0]`
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Idt {
    base: GuestAddress,
}

impl Idt {
    /// Bytes of guest memory the table takes.
    pub const SIZE: u64 = 256 * 16;

    /// A table at `base` (nothing is written yet).
    pub fn new(base: GuestAddress) -> Self {
        Self { base }
    }

    /// Writes vector `vector`'s gate: a present, ring-0 interrupt gate to
    /// `handler` in the long-mode code segment.
    pub fn set_gate(&self, memory: &MemoryMap, vector: u8, handler: GuestAddress) -> Result<(), MemoryError> {
        let h = handler.0;
        let mut gate = [0u8; 16];
        gate[0..2].copy_from_slice(&(h as u16).to_le_bytes());
        gate[2..4].copy_from_slice(&CODE64_SELECTOR.to_le_bytes());
        gate[5] = 0x8e; // present, DPL 0, 64-bit interrupt gate
        gate[6..8].copy_from_slice(&((h >> 16) as u16).to_le_bytes());
        gate[8..12].copy_from_slice(&((h >> 32) as u32).to_le_bytes());
        memory.write(GuestAddress(self.base.0 + 16 * u64::from(vector)), &gate)
    }

    /// Writes the 10-byte IDTR image (limit, base) at `at`, for the
    /// guest's `lidt`.
    pub fn write_idtr(&self, memory: &MemoryMap, at: GuestAddress) -> Result<(), MemoryError> {
        let mut idtr = [0u8; 10];
        idtr[0..2].copy_from_slice(&((Self::SIZE - 1) as u16).to_le_bytes());
        idtr[2..10].copy_from_slice(&self.base.0.to_le_bytes());
        memory.write(at, &idtr)
    }
}

/// Flat 4 GiB ring-0 segments: code at [`CODE64_SELECTOR`] (64-bit with
/// `long`, else 32-bit) and data at [`DATA_SELECTOR`] in every data
/// segment register.
fn set_flat_segments(sregs: &mut crate::Sregs, long: bool) {
    let code = kvm_bindings::kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: CODE64_SELECTOR,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_bindings::kvm_segment { selector: DATA_SELECTOR, type_: 0x3, l: 0, db: 1, ..code };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
}

impl Vcpu {
    /// Puts the vCPU in 64-bit long mode at `entry` with stack pointer `stack`,
    /// using the tables of `long_mode`, and makes it runnable (an AP does not
    /// wait for INIT/SIPI). Interrupts are disabled.
    pub fn set_long_mode(
        &self,
        long_mode: &LongMode,
        entry: GuestAddress,
        stack: GuestAddress,
    ) -> Result<(), VcpuError> {
        let mut sregs = self.sregs()?;
        set_flat_segments(&mut sregs, true);
        sregs.gdt.base = long_mode.gdt().0;
        sregs.gdt.limit = 3 * 8 - 1;
        sregs.cr3 = long_mode.pml4().0;
        sregs.cr4 |= CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
        sregs.efer |= EFER_LME | EFER_LMA;
        self.set_sregs(&sregs)?;
        let regs = crate::Regs { rip: entry.0, rsp: stack.0, rflags: 0x2, ..Default::default() };
        self.set_regs(&regs)?;
        self.make_runnable()
    }

    /// Puts the vCPU in 32-bit protected mode at `entry`, paging off, with
    /// flat 4 GiB code (selector 0x08) and data (0x10) segments and
    /// interrupts disabled: the state a multiboot loader hands a kernel
    /// (which loads its own GDT before reloading a segment register). Sets
    /// `eax` and `ebx` as the loader passes them, and makes the vCPU
    /// runnable.
    ///
    /// ```no_run
    /// # use nkvm::{GuestAddress, Hypervisor, Vm, VmConfig};
    /// # let hv = Hypervisor::open()?;
    /// # let vm = Vm::new(&hv, &VmConfig::default())?;
    /// let vcpu = vm.create_vcpu(0)?;
    /// vcpu.set_flat_protected_mode(GuestAddress(0x40_0000), 0x2bad_b002, 0x9000)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn set_flat_protected_mode(&self, entry: GuestAddress, eax: u32, ebx: u32) -> Result<(), VcpuError> {
        let mut sregs = self.sregs()?;
        set_flat_segments(&mut sregs, false);
        sregs.cr0 = CR0_PE | CR0_ET;
        sregs.cr4 = 0;
        sregs.efer = 0;
        self.set_sregs(&sregs)?;
        let regs =
            crate::Regs { rip: entry.0, rax: u64::from(eax), rbx: u64::from(ebx), rflags: 0x2, ..Default::default() };
        self.set_regs(&regs)?;
        self.make_runnable()
    }

    /// Puts the vCPU in real mode at `segment:offset` (CS base = segment × 16).
    pub fn set_real_mode(&self, segment: u16, offset: u16) -> Result<(), VcpuError> {
        let mut sregs = self.sregs()?;
        sregs.cs.selector = segment;
        sregs.cs.base = u64::from(segment) << 4;
        self.set_sregs(&sregs)?;
        let regs = crate::Regs { rip: u64::from(offset), rflags: 0x2, ..Default::default() };
        self.set_regs(&regs)?;
        self.make_runnable()
    }
}
