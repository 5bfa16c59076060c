//! Kernel images `nkvm run --kernel` is given, refused by name for what
//! the kernel cannot take: a command line too long for it, a 32-bit-only
//! bzImage, too little RAM for it to unpack itself into, an initramfs in
//! that room, a vmlinux segment where nkvm puts its boot tables. Each
//! image would otherwise run (a `ud2` without an IDT ends it).

mod common;

use common::{nkvm, text, tiny_bzimage};

#[test]
fn a_kernel_machine_refuses_what_the_kernel_cannot_take_by_name() {
    let write = |name: &str, cmdline_size: u32| {
        let mut image = tiny_bzimage(&[0xf4]);
        image[0x238..0x23c].copy_from_slice(&cmdline_size.to_le_bytes());
        let path = std::env::temp_dir().join(format!("nkvm-cli-{name}-{}", std::process::id()));
        std::fs::write(&path, image).unwrap();
        path
    };
    // nkvm's own additions for this host come to a few hundred bytes.
    let (short, roomy) = (write("cmdline-64", 64), write("cmdline-2047", 2047));
    let mut old = std::fs::read(&roomy).unwrap();
    old[0x236] = 0; // xloadflags without XLF_KERNEL_64
    let old_kernel = std::env::temp_dir().join(format!("nkvm-cli-32bit-{}", std::process::id()));
    std::fs::write(&old_kernel, old).unwrap();
    for (args, needle) in [
        (vec!["run", "--kernel", short.to_str().unwrap()], "more than the 64 this kernel takes"),
        (vec!["run", "--kernel", roomy.to_str().unwrap(), "--initrd", "/dev/zero"], "/dev/zero"),
        (vec!["run", "--kernel", roomy.to_str().unwrap(), "--memory", "1M"], "below 1 MiB where the kernel is loaded"),
        (vec!["run", "--kernel", old_kernel.to_str().unwrap()], "it has no 64-bit entry point"),
        (vec!["run", "--kernel", roomy.to_str().unwrap(), "--memory", "4G"], "at most 3221225472 bytes of RAM here"),
    ] {
        let out = nkvm(&args);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    let out = nkvm(&["run", "--kernel", roomy.to_str().unwrap(), "--initrd", "/dev/zero"]);
    assert!(text(&out.stderr).contains("not a regular file"), "{}", text(&out.stderr));
    let _ = (std::fs::remove_file(short), std::fs::remove_file(roomy), std::fs::remove_file(old_kernel));
}

#[test]
fn a_bzimage_gets_the_room_it_unpacks_itself_into() {
    // Like a distribution kernel: relocatable, run from 16 MiB, and needing
    // 48 MiB from there to unpack itself (Debian's asks for 51.5 MiB). Its
    // code (ud2, no IDT: a triple fault) ends the run if it ever starts.
    let mut image = tiny_bzimage(&[0x0f, 0x0b]);
    image[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
    image[0x234] = 1; // relocatable_kernel
    image[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes()); // pref_address
    image[0x260..0x264].copy_from_slice(&0x300_0000u32.to_le_bytes()); // init_size
    let dir = std::env::temp_dir().join(format!("nkvm-cli-init-size-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("bzImage");
    std::fs::write(&kernel, image).unwrap();
    // 20 MiB: top-placed in 72 MiB of RAM it would start at 52 MiB, inside
    // the 16-64 MiB the kernel unpacks into.
    let initrd = dir.join("initrd");
    std::fs::File::create(&initrd).unwrap().set_len(20 << 20).unwrap();
    let (k, i) = (kernel.to_str().unwrap(), initrd.to_str().unwrap());
    for (args, needle) in [
        (
            vec!["run", "--kernel", k, "--memory", "32M"],
            "needs RAM up to 0x4000000 to unpack itself (its setup header's init_size), and the RAM below 4 GiB \
             ends at 0x2000000",
        ),
        (vec!["run", "--kernel", k, "--memory", "72M", "--initrd", i], "does not fit between the kernel"),
    ] {
        let out = nkvm(&args);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// An ELF64 vmlinux-like image: `code` in a segment at 1 MiB (the entry),
/// and a second, data segment at `data_at`.
fn elf64_with_data_at(code: &[u8], data_at: u64) -> Vec<u8> {
    let mut img = vec![0u8; 0x200];
    let put16 = |img: &mut Vec<u8>, at: usize, v: u16| img[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put32 = |img: &mut Vec<u8>, at: usize, v: u32| img[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let put64 = |img: &mut Vec<u8>, at: usize, v: u64| img[at..at + 8].copy_from_slice(&v.to_le_bytes());
    img[..4].copy_from_slice(b"\x7fELF");
    img[4] = 2; // 64-bit
    img[5] = 1; // little endian
    img[6] = 1; // version
    put16(&mut img, 16, 2); // ET_EXEC
    put16(&mut img, 18, 62); // EM_X86_64
    put32(&mut img, 20, 1);
    put64(&mut img, 24, 0x10_0000); // entry
    put64(&mut img, 32, 64); // phoff
    put16(&mut img, 52, 64); // ehsize
    put16(&mut img, 54, 56); // phentsize
    put16(&mut img, 56, 2); // phnum
    for (i, (paddr, offset, len)) in [(0x10_0000, 0x200, code.len()), (data_at, 0x200, 16)].into_iter().enumerate() {
        let ph = 64 + 56 * i;
        put32(&mut img, ph, 1); // PT_LOAD
        put32(&mut img, ph + 4, 7);
        put64(&mut img, ph + 8, offset);
        put64(&mut img, ph + 16, paddr);
        put64(&mut img, ph + 24, paddr);
        put64(&mut img, ph + 32, len as u64);
        put64(&mut img, ph + 40, len as u64);
    }
    img.extend_from_slice(code);
    img.resize(0x200 + 16.max(code.len()), 0);
    img
}

#[test]
fn a_vmlinux_segment_below_1_mib_is_refused_not_overwritten() {
    let dir = std::env::temp_dir().join(format!("nkvm-cli-low-elf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // ud2 without an IDT (a triple fault) ends the run if it ever starts.
    let low = dir.join("low");
    std::fs::write(&low, elf64_with_data_at(&[0x0f, 0x0b], 0x8000)).unwrap();
    let out = nkvm(&["run", "--kernel", low.to_str().unwrap(), "--memory", "32M"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("its segment 1 is at 0x8000, below 1 MiB, where nkvm puts the boot tables"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}
