//! The two kernel formats `nkvm run --kernel` takes: a bzImage (the
//! compressed kernel a distribution ships) or an uncompressed ELF vmlinux,
//! both entered at their 64-bit entry point.
//!
//! A vmlinux skips the decompressor, which matters on hosts where code at
//! low addresses runs slowly (on the nested `kvm_pvm` host the bzImage's
//! decompressor takes about a minute before the kernel prints a line).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::bootparam::setup_header;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::KernelLoader;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::linux::{LinuxError, HIMEM};

/// Offset of the 64-bit entry point in a bzImage's protected-mode kernel.
const BZIMAGE_ENTRY_64: u64 = 0x200;
/// `xloadflags` bit 0: the kernel has a 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1;
/// The boot sector signature and "HdrS": what a boot loader fills in for
/// a vmlinux, which has no setup header of its own.
const BOOT_FLAG: u16 = 0xaa55;
const HDRS: u32 = 0x5372_6448;
/// An ELF program header's type for a loadable segment.
const PT_LOAD: u32 = 1;
/// The physical alignment the kernel is built for (CONFIG_PHYSICAL_ALIGN).
const KERNEL_ALIGNMENT: u32 = 0x100_0000;

/// Which format the file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// A compressed bzImage with its setup header.
    BzImage,
    /// An uncompressed ELF vmlinux.
    Elf,
}

/// A kernel in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// The format it was in.
    pub format: KernelFormat,
    /// Its 64-bit entry point (guest physical).
    pub entry: u64,
    /// The first byte after it.
    pub end: u64,
    /// The setup header to put in the zero page.
    pub header: setup_header,
}

/// Loads the kernel at `path` into `gm`, detecting its format.
pub fn load(gm: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, LinuxError> {
    let bad = |reason: String| LinuxError::BadKernel { path: path.display().to_string(), reason };
    let read = |source| LinuxError::Read { path: path.display().to_string(), source };
    let mut file = File::open(path).map_err(read)?;
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic).map_err(|_| bad("shorter than any kernel".into()))?;
    if magic == *b"\x7fELF" {
        if let Some((i, paddr)) = segment_below_himem(&mut file).map_err(read)? {
            return Err(bad(format!(
                "its segment {i} is at {paddr:#x}, below 1 MiB, where nkvm puts the boot tables (zero page, \
                 command line, page tables, ACPI)"
            )));
        }
        let loaded = Elf::load(gm, None, &mut file, Some(GuestAddress(HIMEM))).map_err(|e| bad(e.to_string()))?;
        let header = setup_header {
            boot_flag: BOOT_FLAG,
            header: HDRS,
            kernel_alignment: KERNEL_ALIGNMENT,
            ..Default::default()
        };
        return Ok(LoadedKernel {
            format: KernelFormat::Elf,
            entry: loaded.kernel_load.0,
            end: loaded.kernel_end,
            header,
        });
    }
    let loaded = BzImage::load(gm, None, &mut file, Some(GuestAddress(HIMEM))).map_err(|e| bad(e.to_string()))?;
    let header = loaded.setup_header.ok_or_else(|| bad("no setup header".into()))?;
    // nkvm enters the kernel in long mode at its 64-bit entry (+0x200),
    // which only a kernel that says so has (an older one would triple-fault).
    if header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(bad(
            "it has no 64-bit entry point (boot protocol xloadflags bit 0); nkvm boots 64-bit kernels".into()
        ));
    }
    Ok(LoadedKernel {
        format: KernelFormat::BzImage,
        entry: loaded.kernel_load.0 + BZIMAGE_ENTRY_64,
        end: loaded.kernel_end,
        header,
    })
}

/// The first `PT_LOAD` segment of an ELF64 file whose physical address is
/// below 1 MiB (index and address), which linux-loader would load there
/// and nkvm's boot tables would then overwrite. A file too short to say is
/// left for linux-loader to refuse.
fn segment_below_himem(file: &mut File) -> std::io::Result<Option<(usize, u64)>> {
    let mut ehdr = [0u8; 64];
    file.seek(SeekFrom::Start(0))?;
    if file.read_exact(&mut ehdr).is_err() || ehdr[4] != 2 {
        return Ok(None);
    }
    let phoff = u64::from_le_bytes(ehdr[32..40].try_into().expect("8 bytes"));
    let phentsize = u64::from(u16::from_le_bytes([ehdr[54], ehdr[55]]));
    let phnum = usize::from(u16::from_le_bytes([ehdr[56], ehdr[57]]));
    let mut found = None;
    for i in 0..phnum {
        let mut phdr = [0u8; 56];
        let Some(at) = phentsize.checked_mul(i as u64).and_then(|o| o.checked_add(phoff)) else { break };
        file.seek(SeekFrom::Start(at))?;
        if phentsize < 56 || file.read_exact(&mut phdr).is_err() {
            break;
        }
        let kind = u32::from_le_bytes(phdr[0..4].try_into().expect("4 bytes"));
        let paddr = u64::from_le_bytes(phdr[24..32].try_into().expect("8 bytes"));
        let memsz = u64::from_le_bytes(phdr[40..48].try_into().expect("8 bytes"));
        if kind == PT_LOAD && memsz > 0 && paddr < HIMEM {
            found = Some((i, paddr));
            break;
        }
    }
    file.seek(SeekFrom::Start(0))?;
    Ok(found)
}

impl LoadedKernel {
    /// The first byte after the memory the kernel needs before it reads
    /// the e820 map: its image, and for a bzImage the buffer it unpacks
    /// itself into, `init_size` bytes from where it will run (boot
    /// protocol 2.10: `pref_address`, or for a relocatable kernel its
    /// load address aligned up, whichever is higher). An initramfs or
    /// anything else placed below this is overwritten.
    pub fn needs_end(&self) -> u64 {
        let h = &self.header;
        if self.format != KernelFormat::BzImage || h.init_size == 0 {
            return self.end;
        }
        let mut start = h.pref_address;
        if h.relocatable_kernel != 0 {
            let align = u64::from(h.kernel_alignment.max(1));
            start = start.max(HIMEM.div_ceil(align) * align);
        }
        self.end.max(start.saturating_add(u64::from(h.init_size)))
    }
}
