//! Loading a Linux kernel (bzImage, 64-bit boot protocol) with its command
//! line, initramfs, zero page, e820 map and ACPI tables into guest memory.

use std::path::{Path, PathBuf};

use linux_loader::bootparam::boot_params;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::load_cmdline;
use nkvm::{GuestAddress, Vm};
use vm_memory::{Bytes, FileOffset, GuestMemoryMmap};

use crate::acpi;

/// Where the zero page (`struct boot_params`) goes.
pub const ZERO_PAGE: u64 = 0x7000;
/// Where the command line goes.
pub const CMDLINE: u64 = 0x2_0000;
const CMDLINE_MAX: usize = 4096;
/// Where the long-mode tables go (7 pages).
pub const TABLES: u64 = 0x3_0000;
/// Start of the boot stack (grows down).
pub const BOOT_STACK: u64 = 0x8ff0;
/// Where the protected-mode kernel goes and RAM above the BIOS area starts (1 MiB).
pub(crate) const HIMEM: u64 = 0x10_0000;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// What to boot.
#[derive(Debug, Clone)]
pub struct LinuxBoot {
    /// The bzImage.
    pub kernel: PathBuf,
    /// An initramfs, if any.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
}

/// Where the vCPU starts.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    /// 64-bit entry point (kernel load address + 0x200).
    pub rip: GuestAddress,
    /// The zero page, passed in RSI.
    pub zero_page: GuestAddress,
}

/// Errors loading Linux.
#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    /// A file could not be opened or read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel image is neither a loadable bzImage nor an ELF vmlinux.
    #[error("{path} is not a loadable kernel (bzImage or ELF vmlinux): {reason}")]
    BadKernel {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The command line is too long or malformed.
    #[error("bad kernel command line: {0}")]
    Cmdline(String),
    /// Guest memory could not be prepared.
    #[error("guest memory: {0}")]
    Memory(String),
    /// RAM would overlap the PCI hole below 4 GiB, where BARs, the IOAPIC
    /// and the local APICs live.
    #[error(
        "a Linux machine takes at most {hole} bytes of RAM here (below the PCI hole at {hole:#x}); \
         {memory} were asked for"
    )]
    MemoryOverlapsPciHole {
        /// The RAM size asked for.
        memory: u64,
        /// Where the hole starts.
        hole: u64,
    },
    /// The ACPI tables could not be built or written.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// The kernel needs more RAM below 4 GiB than the VM has, to unpack
    /// itself.
    #[error(
        "this kernel needs RAM up to {needs:#x} to unpack itself (its setup header's init_size), and the RAM \
         below 4 GiB ends at {low_ram:#x}; give the VM more (--memory)"
    )]
    KernelTooBig {
        /// The first byte after what it needs.
        needs: u64,
        /// The end of low RAM.
        low_ram: u64,
    },
    /// The initramfs does not fit.
    #[error(
        "the initramfs ({size} bytes) does not fit between the kernel (with the room it unpacks itself \
         into) and {limit:#x} (the end of low RAM or 896 MiB, whichever is lower)"
    )]
    InitrdTooBig {
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> LinuxError + '_ {
    move |source| LinuxError::Read { path: path.display().to_string(), source }
}

/// Loads `boot` into `vm`'s RAM, with ACPI tables describing `vcpus`
/// vCPUs, and returns where to start.
pub fn load(vm: &Vm, boot: &LinuxBoot, vcpus: u32) -> Result<Entry, LinuxError> {
    // A vm-memory view of the same memfd (a second shared mapping), for
    // linux-loader.
    let map = vm.memory();
    let ranges: Vec<(vm_memory::GuestAddress, usize, Option<FileOffset>)> = map
        .regions()
        .iter()
        .map(|r| {
            let file = r.backing.file().try_clone().map_err(|e| LinuxError::Memory(e.to_string()))?;
            Ok((vm_memory::GuestAddress(r.gpa.0), r.len as usize, Some(FileOffset::new(file, r.offset))))
        })
        .collect::<Result<_, LinuxError>>()?;
    let gm: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges_with_files(ranges).map_err(|e| LinuxError::Memory(e.to_string()))?;

    let low_ram = map.regions().first().map(|r| r.end()).unwrap_or(0);
    if low_ram <= HIMEM {
        return Err(LinuxError::Memory(format!(
            "the RAM ends at {low_ram:#x}, below 1 MiB where the kernel is loaded; give the VM more (--memory)"
        )));
    }
    let loaded = crate::kernel_image::load(&gm, &boot.kernel)?;
    log::info!("{}: {:?} kernel, entry {:#x}", boot.kernel.display(), loaded.format, loaded.entry);
    let hdr = loaded.header;
    let kernel_end = loaded.needs_end();
    if kernel_end > low_ram {
        return Err(LinuxError::KernelTooBig { needs: kernel_end, low_ram });
    }
    let ram_end = map.regions().iter().map(|r| r.end()).max().unwrap_or(0);
    if ram_end > acpi::PCI_MMIO_START {
        let memory = map.regions().iter().map(|r| r.len).sum();
        return Err(LinuxError::MemoryOverlapsPciHole { memory, hole: acpi::PCI_MMIO_START });
    }
    let rsdp = acpi::install(vm, vcpus, None)?;
    let mut params = boot_params { hdr, acpi_rsdp_addr: rsdp.0, ..Default::default() };

    // The kernel's own limit (boot protocol 2.06 on; 255 bytes before):
    // it would cut a longer line without a word, and nkvm's host
    // work-arounds are at its end.
    // An ELF vmlinux has no setup header of its own (nkvm makes one): the
    // x86 kernel's COMMAND_LINE_SIZE, 2048 with its NUL, is the limit.
    let elf = loaded.format == crate::kernel_image::KernelFormat::Elf;
    let kernel_max = match (elf, hdr.version >= 0x0206, hdr.cmdline_size) {
        (true, ..) => 2047,
        (false, false, _) => 255,
        // A header that leaves it 0 says nothing: nkvm's own limit.
        (false, true, 0) => CMDLINE_MAX - 1,
        (false, true, n) => n as usize,
    };
    if boot.cmdline.len() > kernel_max.min(CMDLINE_MAX - 1) {
        return Err(LinuxError::Cmdline(format!(
            "{} bytes (with nkvm's additions), more than the {} this kernel takes",
            boot.cmdline.len(),
            kernel_max.min(CMDLINE_MAX - 1)
        )));
    }
    let mut cmdline = Cmdline::new(CMDLINE_MAX).map_err(|e| LinuxError::Cmdline(e.to_string()))?;
    cmdline.insert_str(&boot.cmdline).map_err(|e| LinuxError::Cmdline(e.to_string()))?;
    load_cmdline(&gm, vm_memory::GuestAddress(CMDLINE), &cmdline).map_err(|e| LinuxError::Cmdline(e.to_string()))?;
    params.hdr.type_of_loader = 0xff;
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    params.hdr.loadflags |= 0x80; // CAN_USE_HEAP
    params.hdr.heap_end_ptr = 0xfe00;

    let low_end = map.regions().first().map(|r| r.end()).unwrap_or(0);
    if let Some(initrd) = &boot.initrd {
        let limit = low_end.min(0x3800_0000);
        let place = |size: u64| {
            let at = limit.checked_sub(size).map(|a| a & !0xfff).filter(|&a| a >= kernel_end.max(HIMEM));
            at.ok_or(LinuxError::InitrdTooBig { size, limit })
        };
        // Sized before it is read: a file larger than guest memory (or one
        // with no end, a FIFO) is refused without reading it.
        let meta = std::fs::metadata(initrd).map_err(read_err(initrd))?;
        if !meta.is_file() {
            let e = std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file");
            return Err(read_err(initrd)(e));
        }
        place(meta.len())?;
        let data = std::fs::read(initrd).map_err(read_err(initrd))?;
        let size = data.len() as u64;
        let at = place(size)?;
        vm.write_memory(GuestAddress(at), &data).map_err(|e| LinuxError::Memory(e.to_string()))?;
        params.hdr.ramdisk_image = at as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    // The BIOS area holds the ACPI tables: reserved, as on a PC.
    let bios = (acpi::BIOS_AREA_START, acpi::BIOS_AREA_END - acpi::BIOS_AREA_START, E820_RESERVED);
    let mut e820 = vec![(0u64, 0x9fc00u64, E820_RAM), (0x9fc00, 0x400, E820_RESERVED), bios];
    for r in map.regions() {
        let start = r.gpa.0.max(HIMEM);
        if r.end() > start {
            e820.push((start, r.end() - start, E820_RAM));
        }
    }
    for (i, &(addr, size, kind)) in e820.iter().enumerate() {
        params.e820_table[i].addr = addr;
        params.e820_table[i].size = size;
        params.e820_table[i].r#type = kind;
    }
    params.e820_entries = e820.len() as u8;
    gm.write_obj(params, vm_memory::GuestAddress(ZERO_PAGE)).map_err(|e| LinuxError::Memory(e.to_string()))?;
    Ok(Entry { rip: GuestAddress(loaded.entry), zero_page: GuestAddress(ZERO_PAGE) })
}

/// Gives vCPU `id` its own APIC ID in `cpuid` (leaf 1 EBX bits 31-24, the
/// x2APIC ID in EDX of leaves 0xb and 0x1f): KVM's supported list says 0
/// for every vCPU, and Linux checks each CPU's against the MADT.
pub fn set_apic_id(cpuid: &mut nkvm::Cpuid, id: u32) {
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (id << 24),
            0xb | 0x1f => e.edx = id,
            _ => {}
        }
    }
}

/// KVM paravirtual features (leaf 0x4000_0001 EAX) a guest uses through a
/// hypercall: PV_UNHALT (spinlock kicks), PV_SEND_IPI, PV_SCHED_YIELD and
/// HC_MAP_GPA_RANGE.
const HYPERCALL_FEATURES: [(u32, &str); 4] =
    [(7, "kvm-pv-unhalt"), (11, "kvm-pv-ipi"), (13, "kvm-pv-sched-yield"), (16, "kvm-hc-map-gpa-range")];

/// Clears CPUID features whose instructions KVM on this nested host fails
/// to run in a guest (they come back as emulation failures): CX16
/// (`cmpxchg16b`), XSAVE/OSXSAVE (`xrstor`) and the AVX family that needs
/// XSAVE; and the KVM paravirtual features that make hypercalls, which this
/// host cannot complete (`vmcall` never returns, and KVM's emulator
/// "fixes" a `vmmcall` by writing the kernel's read-only text, a fatal #PF
/// in the guest's spinlock kick). Returns the names of what it hid.
pub fn mask_unrunnable(cpuid: &mut nkvm::Cpuid) -> Vec<&'static str> {
    let mut hidden = Vec::new();
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            1 => {
                for (bit, name) in [
                    (13, "cx16"),
                    (23, "popcnt"),
                    (26, "xsave"),
                    (27, "osxsave"),
                    (28, "avx"),
                    (12, "fma"),
                    (29, "f16c"),
                ] {
                    if e.ecx & (1 << bit) != 0 {
                        e.ecx &= !(1 << bit);
                        hidden.push(name);
                    }
                }
            }
            7 if e.index == 0 => {
                for (bit, name) in [(5, "avx2"), (16, "avx512f")] {
                    if e.ebx & (1 << bit) != 0 {
                        e.ebx &= !(1 << bit);
                        hidden.push(name);
                    }
                }
            }
            0xd => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0x4000_0001 => {
                for (bit, name) in HYPERCALL_FEATURES {
                    if e.eax & (1 << bit) != 0 {
                        e.eax &= !(1 << bit);
                        hidden.push(name);
                    }
                }
            }
            _ => {}
        }
    }
    hidden
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hypercall_features_and_the_unrunnable_instructions_are_hidden() {
        let mut cpuid = nkvm::Cpuid::new(2).unwrap();
        let entries = cpuid.as_mut_slice();
        entries[0].function = 1;
        entries[0].ecx = 1 << 13 | 1;
        entries[1].function = 0x4000_0001;
        entries[1].eax = u32::MAX;
        let hidden = mask_unrunnable(&mut cpuid);
        assert_eq!(hidden, ["cx16", "kvm-pv-unhalt", "kvm-pv-ipi", "kvm-pv-sched-yield", "kvm-hc-map-gpa-range"]);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ecx, 1, "SSE3 stays");
        assert_eq!(e[1].eax, !(1 << 7 | 1 << 11 | 1 << 13 | 1 << 16), "the clock and the other PV features stay");
    }
}
