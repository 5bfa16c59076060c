//! Loading a multiboot (v1) kernel as QEMU's `-kernel` does: the ELF32
//! segments at their physical addresses, then the multiboot information
//! (memory sizes and map, the command line, one module, the loader's name)
//! in the page after the highest segment. The kvm-unit-tests x86 images
//! (`x86/*.flat`) are such kernels.
//!
//! | what | where |
//! |---|---|
//! | ELF `PT_LOAD` segments | `p_paddr`, `p_memsz` bytes (the rest of `p_filesz` zeroed) |
//! | multiboot information (0x58 bytes) | the first page boundary after the segments |
//! | memory map (20 + 4 bytes an entry) | after the information |
//! | module list, command line, loader name | after the map |
//! | the module (`--initrd`) | the next page boundary |
//!
//! The command line is built as QEMU builds it: the kernel's path, a blank,
//! then the user's command line (kvm-unit-tests take its first word as
//! `argv[0]`). The vCPU starts in 32-bit protected mode, paging off, with
//! `eax` = [`BOOTLOADER_MAGIC`] and `ebx` = the information's address.

use std::path::Path;

use nkvm::{GuestAddress, MemoryMap};

/// The magic a multiboot header starts with.
pub const HEADER_MAGIC: u32 = 0x1bad_b002;
/// What the loader leaves in `eax` for the kernel.
pub const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// The header must sit in the first 8 KiB of the file, 4-byte aligned.
const HEADER_SEARCH: usize = 8192;
/// Header flag 16: the a.out kludge (load addresses in the header).
const HEADER_AOUT_KLUDGE: u32 = 1 << 16;
/// Header flags nkvm honours or may ignore: page-aligned modules (0),
/// memory information (1), video mode (2, ignored: there is no display).
const HEADER_KNOWN: u32 = 0b111;

/// Information flags.
const INFO_MEMORY: u32 = 1 << 0;
const INFO_CMDLINE: u32 = 1 << 2;
const INFO_MODS: u32 = 1 << 3;
const INFO_MMAP: u32 = 1 << 6;
const INFO_LOADER_NAME: u32 = 1 << 9;
/// Size of the information structure (through the VBE fields).
const INFO_SIZE: usize = 0x58;
/// Conventional memory below the EBDA, in KiB, as a PC BIOS reports it.
const MEM_LOWER_KIB: u32 = 640;
const HIMEM: u64 = 0x10_0000;
const LOADER_NAME: &str = "nkvm";

/// What nkvm writes below 1 MiB after loading a multiboot kernel: the
/// real-mode interrupt table (`firmware.rs`), the ACPI tables and the BIOS
/// segment with its interrupt handlers (`acpi.rs`). A kernel linked below
/// 1 MiB (kvm-unit-tests' `realmode.flat` is at 32 KiB) must stay clear.
const FIRMWARE: [(&str, u64, u64); 2] =
    [("the real-mode interrupt table", 0, 0x400), ("the ACPI tables and BIOS", crate::acpi::ACPI_START, HIMEM)];

const PT_LOAD: u32 = 1;
const EM_386: u16 = 3;
const PAGE: u64 = 0x1000;

/// Errors loading a multiboot kernel.
#[derive(Debug, thiserror::Error)]
pub enum MultibootError {
    /// The file is not a multiboot ELF32 kernel nkvm can load.
    #[error("{path} is not a loadable multiboot kernel: {reason}")]
    BadImage {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Something does not fit in the guest's RAM below 4 GiB.
    #[error("{what} at {at:#x}+{len:#x} does not fit in the guest's RAM; give the VM more memory (--memory)")]
    DoesNotFit {
        /// What.
        what: &'static str,
        /// Where it would go.
        at: u64,
        /// How big it is.
        len: u64,
    },
    /// Something would sit where nkvm's firmware writes, and be
    /// overwritten by it.
    #[error(
        "{what} at {at:#x}+{len:#x} overlaps {firmware} ({start:#x}-{end:#x}), which nkvm writes after \
         loading it; link the kernel elsewhere"
    )]
    OverlapsFirmware {
        /// What.
        what: &'static str,
        /// Where it would go.
        at: u64,
        /// How big it is.
        len: u64,
        /// What the firmware keeps there.
        firmware: &'static str,
        /// Where that starts.
        start: u64,
        /// Where that ends.
        end: u64,
    },
    /// Writing guest memory failed.
    #[error("cannot write the multiboot kernel into guest memory")]
    Memory(#[source] nkvm::MemoryError),
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct MultibootBoot<'a> {
    /// The kernel file (its path also starts the command line).
    pub kernel: &'a Path,
    /// The rest of the command line (may be empty).
    pub cmdline: &'a str,
    /// The one module (kvm-unit-tests read it as their environment).
    pub module: Option<&'a Path>,
}

/// Where the loaded kernel starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultibootEntry {
    /// The ELF entry point (32-bit protected mode).
    pub eip: u32,
    /// The multiboot information's address, for `ebx`.
    pub info: u32,
}

/// Whether `image` carries a multiboot (v1) header in its first 8 KiB.
pub fn is_multiboot(image: &[u8]) -> bool {
    header(image).is_some()
}

/// The header's flags, if `image` has a valid header.
fn header(image: &[u8]) -> Option<u32> {
    let search = &image[..image.len().min(HEADER_SEARCH)];
    search.chunks_exact(4).enumerate().find_map(|(i, word)| {
        if u32_at(word, 0)? != HEADER_MAGIC {
            return None;
        }
        let at = i * 4;
        let flags = u32_at(image, at + 4)?;
        let checksum = u32_at(image, at + 8)?;
        (HEADER_MAGIC.wrapping_add(flags).wrapping_add(checksum) == 0).then_some(flags)
    })
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at.checked_add(2)?)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

/// One `PT_LOAD` segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    paddr: u64,
    offset: usize,
    filesz: usize,
    memsz: u64,
}

/// The entry point and loadable segments of an ELF32 i386 image.
fn elf32_segments(image: &[u8]) -> Result<(u32, Vec<Segment>), String> {
    if image.get(..4) != Some(b"\x7fELF") {
        return Err("no ELF header (only ELF multiboot kernels are supported)".into());
    }
    if image.get(4) != Some(&1) || image.get(5) != Some(&1) {
        return Err("not a little-endian ELF32 file".into());
    }
    let short = || "the ELF header is truncated".to_string();
    if u16_at(image, 18).ok_or_else(short)? != EM_386 {
        return Err("not an i386 ELF file".into());
    }
    let entry = u32_at(image, 24).ok_or_else(short)?;
    let phoff = u32_at(image, 28).ok_or_else(short)? as usize;
    let phentsize = usize::from(u16_at(image, 42).ok_or_else(short)?);
    let phnum = usize::from(u16_at(image, 44).ok_or_else(short)?);
    if phentsize < 32 {
        return Err(format!("program header entries of {phentsize} bytes (ELF32 needs 32)"));
    }
    let mut segments = Vec::new();
    for i in 0..phnum {
        let at = phoff.checked_add(i * phentsize).ok_or("program header table out of range")?;
        let field = |off: usize| u32_at(image, at + off).ok_or_else(|| format!("program header {i} is truncated"));
        if field(0)? != PT_LOAD {
            continue;
        }
        let segment = Segment {
            offset: field(4)? as usize,
            paddr: u64::from(field(12)?),
            filesz: field(16)? as usize,
            memsz: u64::from(field(20)?),
        };
        if segment.filesz as u64 > segment.memsz {
            return Err(format!("segment {i} has more file bytes than memory bytes"));
        }
        if segment.offset.checked_add(segment.filesz).is_none_or(|end| end > image.len()) {
            return Err(format!("segment {i} reaches past the end of the file"));
        }
        segments.push(segment);
    }
    if segments.is_empty() {
        return Err("no loadable segment".into());
    }
    Ok((entry, segments))
}

/// Builds guest memory contents: byte ranges to write, with their address.
#[derive(Debug, Default)]
struct Layout {
    writes: Vec<(u64, Vec<u8>)>,
}

/// Loads the kernel of `boot` into `memory` and returns where to start.
pub fn load(memory: &MemoryMap, boot: &MultibootBoot<'_>) -> Result<MultibootEntry, MultibootError> {
    let path = boot.kernel.display().to_string();
    let image = std::fs::read(boot.kernel).map_err(|source| MultibootError::Read { path: path.clone(), source })?;
    let ram_bytes: u64 = memory.regions().iter().map(|r| r.len).sum();
    let module = match boot.module {
        Some(m) => {
            let read_err = |source| MultibootError::Read { path: m.display().to_string(), source };
            // Sized before it is read: larger than guest memory, or a file
            // with no end (a FIFO), it is refused without reading it.
            let meta = std::fs::metadata(m).map_err(read_err)?;
            if !meta.is_file() {
                return Err(read_err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file")));
            }
            if meta.len() > ram_bytes {
                return Err(MultibootError::DoesNotFit { what: "the module (--initrd)", at: 0, len: meta.len() });
            }
            Some(std::fs::read(m).map_err(read_err)?)
        }
        None => None,
    };
    let cmdline = if boot.cmdline.is_empty() { path.clone() } else { format!("{path} {}", boot.cmdline) };
    let ram: Vec<(u64, u64)> = memory.regions().iter().map(|r| (r.gpa.0, r.end())).collect();
    let (entry, layout) = plan(&image, &cmdline, module.as_deref(), &ram).map_err(|e| e.into_error(&path))?;
    for (at, bytes) in &layout.writes {
        memory.write(GuestAddress(*at), bytes).map_err(MultibootError::Memory)?;
    }
    Ok(entry)
}

/// Why [`plan`] failed, before the path is known.
#[derive(Debug, PartialEq, Eq)]
enum PlanError {
    Bad(String),
    DoesNotFit { what: &'static str, at: u64, len: u64 },
    OverlapsFirmware { what: &'static str, at: u64, len: u64, firmware: (&'static str, u64, u64) },
}

impl PlanError {
    fn into_error(self, path: &str) -> MultibootError {
        match self {
            PlanError::Bad(reason) => MultibootError::BadImage { path: path.to_string(), reason },
            PlanError::DoesNotFit { what, at, len } => MultibootError::DoesNotFit { what, at, len },
            PlanError::OverlapsFirmware { what, at, len, firmware: (firmware, start, end) } => {
                MultibootError::OverlapsFirmware { what, at, len, firmware, start, end }
            }
        }
    }
}

/// Lays out the kernel, the information and the module for a guest whose
/// RAM is `ram` (sorted `(start, end)` ranges).
fn plan(
    image: &[u8],
    cmdline: &str,
    module: Option<&[u8]>,
    ram: &[(u64, u64)],
) -> Result<(MultibootEntry, Layout), PlanError> {
    let flags = header(image).ok_or_else(|| PlanError::Bad("no multiboot header in its first 8 KiB".into()))?;
    if flags & HEADER_AOUT_KLUDGE != 0 {
        return Err(PlanError::Bad("it asks for the a.out kludge (header flag 16); nkvm loads ELF kernels".into()));
    }
    if flags & 0xffff & !HEADER_KNOWN != 0 {
        return Err(PlanError::Bad(format!("it asks for multiboot features nkvm lacks (header flags {flags:#x})")));
    }
    let (eip, segments) = elf32_segments(image).map_err(PlanError::Bad)?;
    let in_ram = |what, at: u64, len: u64| {
        let fits = ram.iter().any(|&(start, end)| at >= start && at.saturating_add(len) <= end && at + len <= 1 << 32);
        if !fits {
            return Err(PlanError::DoesNotFit { what, at, len });
        }
        match FIRMWARE.iter().find(|&&(_, start, end)| len > 0 && at < end && start < at + len) {
            Some(&firmware) => Err(PlanError::OverlapsFirmware { what, at, len, firmware }),
            None => Ok(()),
        }
    };
    let mut layout = Layout::default();
    let mut top = 0u64;
    // Each segment gets a buffer of its memory size: overlapping ones
    // (which no linker makes) could claim RAM many times over.
    let mut spans: Vec<(u64, u64)> = segments.iter().map(|s| (s.paddr, s.paddr.saturating_add(s.memsz))).collect();
    spans.sort_unstable();
    if let Some(w) = spans.windows(2).find(|w| w[1].0 < w[0].1) {
        return Err(PlanError::Bad(format!("two of its segments overlap (at {:#x} and {:#x})", w[0].0, w[1].0)));
    }
    for s in &segments {
        in_ram("a kernel segment", s.paddr, s.memsz)?;
        let mut bytes = image[s.offset..s.offset + s.filesz].to_vec();
        bytes.resize(s.memsz as usize, 0);
        layout.writes.push((s.paddr, bytes));
        top = top.max(s.paddr + s.memsz);
    }

    let info_at = top.next_multiple_of(PAGE);
    let mmap = memory_map(ram);
    let mmap_at = info_at + INFO_SIZE as u64;
    let mods_at = mmap_at + mmap.len() as u64;
    let cmdline_at = mods_at + 16;
    let name_at = cmdline_at + cmdline.len() as u64 + 1;
    let module_name_at = name_at + LOADER_NAME.len() as u64 + 1;
    let info_end = module_name_at + 1;
    let module_at = info_end.next_multiple_of(PAGE);
    let module_len = module.map_or(0, |m| m.len() as u64);
    in_ram("the multiboot information", info_at, info_end - info_at)?;
    in_ram("the module (--initrd)", module_at, module_len)?;

    let low_end = ram.iter().find(|&&(start, _)| start == 0).map_or(0, |&(_, end)| end.min(1 << 32));
    let mut info = [0u8; INFO_SIZE];
    let mut put = |at: usize, v: u32| info[at..at + 4].copy_from_slice(&v.to_le_bytes());
    put(0, INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_MMAP | INFO_LOADER_NAME);
    put(4, MEM_LOWER_KIB);
    put(8, (low_end.saturating_sub(HIMEM) / 1024) as u32);
    put(16, cmdline_at as u32);
    put(20, u32::from(module.is_some()));
    put(24, mods_at as u32);
    put(44, mmap.len() as u32);
    put(48, mmap_at as u32);
    put(64, name_at as u32);

    let mut tail = mmap;
    let mut entry = [0u8; 16];
    entry[..4].copy_from_slice(&(module_at as u32).to_le_bytes());
    entry[4..8].copy_from_slice(&((module_at + module_len) as u32).to_le_bytes());
    entry[8..12].copy_from_slice(&(module_name_at as u32).to_le_bytes());
    tail.extend_from_slice(&entry);
    for s in [cmdline, LOADER_NAME, ""] {
        tail.extend_from_slice(s.as_bytes());
        tail.push(0);
    }
    let mut block = info.to_vec();
    block.extend_from_slice(&tail);
    layout.writes.push((info_at, block));
    if let Some(m) = module {
        layout.writes.push((module_at, m.to_vec()));
    }
    Ok((MultibootEntry { eip, info: info_at as u32 }, layout))
}

/// The e820-style map: conventional memory, the EBDA and BIOS area
/// reserved, then RAM from 1 MiB and above 4 GiB.
fn memory_map(ram: &[(u64, u64)]) -> Vec<u8> {
    const AVAILABLE: u32 = 1;
    const RESERVED: u32 = 2;
    let low = u64::from(MEM_LOWER_KIB) * 1024;
    let ebda = low - 0x400;
    let mut entries = vec![(0, ebda, AVAILABLE), (ebda, 0x400, RESERVED), (0xe_0000, 0x2_0000, RESERVED)];
    for &(start, end) in ram {
        let start = start.max(HIMEM);
        if end > start {
            entries.push((start, end - start, AVAILABLE));
        }
    }
    let mut bytes = Vec::new();
    for (base, len, kind) in entries {
        bytes.extend_from_slice(&20u32.to_le_bytes());
        bytes.extend_from_slice(&u64::to_le_bytes(base));
        bytes.extend_from_slice(&u64::to_le_bytes(len));
        bytes.extend_from_slice(&kind.to_le_bytes());
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF32 multiboot image: one segment of `code` at `paddr`
    /// with `bss` zero bytes after it, entry at `paddr`.
    fn image(paddr: u32, code: &[u8], bss: u32, flags: u32) -> Vec<u8> {
        let mut img = vec![0u8; 0x100];
        img[..4].copy_from_slice(b"\x7fELF");
        img[4] = 1; // ELFCLASS32
        img[5] = 1; // little endian
        img[18..20].copy_from_slice(&EM_386.to_le_bytes());
        img[24..28].copy_from_slice(&paddr.to_le_bytes());
        img[28..32].copy_from_slice(&52u32.to_le_bytes()); // phoff
        img[42..44].copy_from_slice(&32u16.to_le_bytes());
        img[44..46].copy_from_slice(&1u16.to_le_bytes());
        let ph = 52;
        let put = |img: &mut Vec<u8>, at: usize, v: u32| img[at..at + 4].copy_from_slice(&v.to_le_bytes());
        put(&mut img, ph, PT_LOAD);
        put(&mut img, ph + 4, 0x100); // offset
        put(&mut img, ph + 12, paddr);
        put(&mut img, ph + 16, code.len() as u32);
        put(&mut img, ph + 20, code.len() as u32 + bss);
        // The multiboot header right after the program header.
        put(&mut img, 0x80, HEADER_MAGIC);
        put(&mut img, 0x84, flags);
        put(&mut img, 0x88, 0u32.wrapping_sub(HEADER_MAGIC.wrapping_add(flags)));
        img.extend_from_slice(code);
        img
    }

    const RAM_128M: &[(u64, u64)] = &[(0, 128 << 20)];

    fn info_u32(layout: &Layout, info: u32, at: usize) -> u32 {
        let block = &layout.writes.iter().find(|(a, _)| *a == u64::from(info)).unwrap().1;
        u32_at(block, at).unwrap()
    }

    /// The bytes the layout writes at guest address `gpa`, `len` of them.
    fn read(layout: &Layout, gpa: u64, len: usize) -> Vec<u8> {
        let (at, bytes) = layout.writes.iter().find(|(a, b)| gpa >= *a && gpa < a + b.len() as u64).unwrap();
        let off = (gpa - at) as usize;
        bytes[off..off + len].to_vec()
    }

    fn c_string(layout: &Layout, gpa: u64) -> String {
        let (at, bytes) = layout.writes.iter().find(|(a, b)| gpa >= *a && gpa < a + b.len() as u64).unwrap();
        let rest = &bytes[(gpa - at) as usize..];
        String::from_utf8(rest[..rest.iter().position(|&b| b == 0).unwrap()].to_vec()).unwrap()
    }

    #[test]
    fn the_header_is_found_only_with_a_valid_checksum() {
        let img = image(0x40_0000, &[0xf4], 0, 0);
        assert!(is_multiboot(&img));
        let mut broken = img.clone();
        broken[0x88] ^= 1;
        assert!(!is_multiboot(&broken));
        assert!(!is_multiboot(b"\x7fELF"));
        assert!(!is_multiboot(&[]));
    }

    #[test]
    fn overlapping_segments_are_refused_not_each_given_its_memory() {
        // Eight copies of one 120 MiB segment: 960 MiB of buffers for a
        // 128 MiB guest, had each been planned.
        let mut img = image(0x40_0000, &[0xf4], 120 << 20, 0);
        let ph = img[52..84].to_vec();
        let phoff = img.len() as u32;
        (0..8).for_each(|_| img.extend_from_slice(&ph));
        img[28..32].copy_from_slice(&phoff.to_le_bytes());
        img[44..46].copy_from_slice(&8u16.to_le_bytes());
        let err = plan(&img, "/k.flat", None, RAM_128M).unwrap_err().into_error("/k.flat").to_string();
        assert!(err.contains("two of its segments overlap"), "{err}");
    }

    #[test]
    fn segments_load_at_their_physical_address_with_bss_zeroed() {
        let img = image(0x40_0000, &[0x90, 0xf4], 0x3000, 0);
        let (entry, layout) = plan(&img, "/k.flat", None, RAM_128M).unwrap();
        assert_eq!(entry.eip, 0x40_0000);
        let (at, bytes) = &layout.writes[0];
        assert_eq!((*at, bytes.len()), (0x40_0000, 0x3002));
        assert_eq!(&bytes[..2], &[0x90, 0xf4]);
        assert!(bytes[2..].iter().all(|&b| b == 0));
        assert_eq!(entry.info, 0x40_4000, "the page after the segment");
    }

    #[test]
    fn the_information_carries_memory_the_command_line_the_module_and_the_map() {
        let img = image(0x40_0000, &[0xf4], 0, 0);
        let env = b"NR_CPUS=2\nMEMSIZE=64\n";
        let (entry, layout) = plan(&img, "/x/vmexit.flat cpuid", Some(env), RAM_128M).unwrap();
        let info = entry.info;
        let flags = info_u32(&layout, info, 0);
        assert_eq!(flags, 0b10_0100_1101, "memory, cmdline, mods, mmap, loader name");
        assert_eq!(info_u32(&layout, info, 4), 640);
        assert_eq!(info_u32(&layout, info, 8), (127 << 20) / 1024, "mem_upper: KiB above 1 MiB");
        assert_eq!(c_string(&layout, info_u32(&layout, info, 16).into()), "/x/vmexit.flat cpuid");
        assert_eq!(c_string(&layout, info_u32(&layout, info, 64).into()), "nkvm");
        assert_eq!(info_u32(&layout, info, 20), 1, "one module");
        let mods = u64::from(info_u32(&layout, info, 24));
        let entry_bytes = read(&layout, mods, 8);
        let (start, end) = (u32_at(&entry_bytes, 0).unwrap(), u32_at(&entry_bytes, 4).unwrap());
        assert_eq!(start % 0x1000, 0, "the module is page aligned");
        assert_eq!(read(&layout, start.into(), env.len()), env);
        assert_eq!(end - start, env.len() as u32);
        // The map: 20-byte entries with a size word; RAM above 1 MiB is type 1.
        let (len, at) = (info_u32(&layout, info, 44), u64::from(info_u32(&layout, info, 48)));
        let map = read(&layout, at, len as usize);
        let entries: Vec<(u64, u64, u32)> = map
            .chunks(24)
            .map(|e| {
                assert_eq!(u32_at(e, 0), Some(20));
                (
                    u64::from_le_bytes(e[4..12].try_into().unwrap()),
                    u64::from_le_bytes(e[12..20].try_into().unwrap()),
                    u32_at(e, 20).unwrap(),
                )
            })
            .collect();
        assert!(entries.contains(&(0x10_0000, (127 << 20), 1)), "{entries:x?}");
        assert!(entries.contains(&(0, 0x9fc00, 1)), "{entries:x?}");
        assert!(entries.contains(&(0xe_0000, 0x2_0000, 2)), "{entries:x?}");
    }

    #[test]
    fn without_a_module_the_count_is_zero_and_the_command_line_is_the_path() {
        let img = image(0x40_0000, &[0xf4], 0, 0);
        let (entry, layout) = plan(&img, "/k.flat", None, RAM_128M).unwrap();
        assert_eq!(info_u32(&layout, entry.info, 20), 0);
        assert_eq!(c_string(&layout, info_u32(&layout, entry.info, 16).into()), "/k.flat");
    }

    #[test]
    fn bad_images_are_refused_with_the_reason() {
        let bad = |img: &[u8]| match plan(img, "k", None, RAM_128M) {
            Err(PlanError::Bad(reason)) => reason,
            other => panic!("{other:?}"),
        };
        assert!(bad(b"not a kernel at all").contains("no multiboot header"));
        assert!(bad(&image(0x40_0000, &[0xf4], 0, HEADER_AOUT_KLUDGE)).contains("a.out"));
        assert!(bad(&image(0x40_0000, &[0xf4], 0, 1 << 5)).contains("features"));
        let mut elf64 = image(0x40_0000, &[0xf4], 0, 0);
        elf64[4] = 2;
        assert!(bad(&elf64).contains("ELF32"));
        let mut past_end = image(0x40_0000, &[0xf4], 0, 0);
        past_end[52 + 16..52 + 20].copy_from_slice(&0x10_0000u32.to_le_bytes());
        past_end[52 + 20..52 + 24].copy_from_slice(&0x10_0000u32.to_le_bytes());
        assert!(bad(&past_end).contains("past the end"));
        let mut no_load = image(0x40_0000, &[0xf4], 0, 0);
        no_load[52] = 2;
        assert!(bad(&no_load).contains("no loadable segment"));
        let truncated = image(0x40_0000, &[0xf4], 0, 0);
        assert!(bad(&truncated[..0x8c]).contains("truncated") || bad(&truncated[..0x8c]).contains("past the end"));
    }

    #[test]
    fn a_kernel_beyond_ram_does_not_fit() {
        let img = image(0x40_0000, &[0xf4], 16 << 20, 0);
        let small: &[(u64, u64)] = &[(0, 8 << 20)];
        assert_eq!(
            plan(&img, "k", None, small).unwrap_err(),
            PlanError::DoesNotFit { what: "a kernel segment", at: 0x40_0000, len: (16 << 20) + 1 }
        );
    }

    #[test]
    fn what_the_firmware_writes_over_is_refused_and_low_kernels_load() {
        // realmode.flat's place: 32 KiB, clear of both.
        let (entry, _) = plan(&image(0x8000, &[0xf4], 0x1000, 0), "k", None, RAM_128M).unwrap();
        assert_eq!(entry.eip, 0x8000);
        let table = ("the real-mode interrupt table", 0, 0x400);
        assert_eq!(
            plan(&image(0x200, &[0xf4], 0, 0), "k", None, RAM_128M).unwrap_err(),
            PlanError::OverlapsFirmware { what: "a kernel segment", at: 0x200, len: 1, firmware: table }
        );
        let bios = ("the ACPI tables and BIOS", 0xe_0000, 0x10_0000);
        // A segment ending inside the ACPI tables.
        assert_eq!(
            plan(&image(0xd_0000, &[0xf4], 0x1_0000, 0), "k", None, RAM_128M).unwrap_err(),
            PlanError::OverlapsFirmware { what: "a kernel segment", at: 0xd_0000, len: 0x1_0001, firmware: bios }
        );
        // A segment that ends just below: the information after it would not.
        let err = plan(&image(0xd_0000, &[0xf4], 0xffff - 0x10, 0), "k", None, RAM_128M).unwrap_err();
        assert!(matches!(err, PlanError::OverlapsFirmware { what: "the multiboot information", .. }), "{err:?}");
        let text = err.into_error("/k.flat").to_string();
        assert!(text.contains("overlaps the ACPI tables and BIOS (0xe0000-0x100000)"), "{text}");
    }
}
