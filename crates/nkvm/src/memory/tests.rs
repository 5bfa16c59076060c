//! Unit tests of `Backing`, `Region` and `MemoryMap`.

use std::fs::File;

use super::*;

#[test]
fn data_ranges_skip_what_was_never_written_and_a_private_map_is_whole() {
    let b = Backing::new("t", 64 << 20).unwrap();
    assert!(b.data_ranges().is_empty());
    b.write_at(0x5000, &[1]).unwrap();
    b.write_at(40 << 20, &[2]).unwrap();
    let ranges = b.data_ranges();
    assert!(ranges.iter().any(|&(s, e)| s <= 0x5000 && 0x5000 < e), "{ranges:x?}");
    assert!(ranges.iter().any(|&(s, e)| s <= 40 << 20 && 40 << 20 < e), "{ranges:x?}");
    assert!(ranges.iter().map(|(s, e)| e - s).sum::<u64>() < 8 << 20, "{ranges:x?}");
    let private = Backing::from_file_private("p", b.file().try_clone().unwrap(), 64 << 20).unwrap();
    assert_eq!(private.data_ranges(), [(0, 64 << 20)]);
    let mut byte = [0u8];
    private.read_at(40 << 20, &mut byte).unwrap();
    assert_eq!(byte, [2]);
    private.write_at(40 << 20, &[3]).unwrap();
    b.read_at(40 << 20, &mut byte).unwrap();
    assert_eq!(byte, [2], "a private mapping's writes stay out of the file");
}

#[test]
fn a_copy_holds_the_files_data_and_keeps_its_holes() {
    use std::io::{Seek, SeekFrom, Write};
    // A sparse 64 MiB file: two pages of data, one of them past a chunk.
    let path = std::env::temp_dir().join(format!("nkvm-copy-of-{}", std::process::id()));
    let mut file = File::create(&path).unwrap();
    file.seek(SeekFrom::Start(0x3000)).unwrap();
    file.write_all(&[0xaa; 4096]).unwrap();
    file.seek(SeekFrom::Start((40 << 20) + 0x1000)).unwrap();
    file.write_all(&[0x55; 4096]).unwrap();
    file.set_len(64 << 20).unwrap();
    let file = File::open(&path).unwrap();
    let copy = Backing::copy_of("c", &file, 64 << 20).unwrap();
    let mut page = [0u8; 4096];
    copy.read_at(0x3000, &mut page).unwrap();
    assert_eq!(page, [0xaa; 4096]);
    copy.read_at((40 << 20) + 0x1000, &mut page).unwrap();
    assert_eq!(page, [0x55; 4096]);
    copy.read_at(0x10_0000, &mut page).unwrap();
    assert_eq!(page, [0; 4096], "a hole reads as zero");
    let used: u64 = copy.data_ranges().iter().map(|(s, e)| e - s).sum();
    assert!(used < 8 << 20, "the holes stay holes: {:x?}", copy.data_ranges());
    // A file shorter than the size asked for is named, not zero-filled.
    let short = Backing::copy_of("c", &file, 128 << 20);
    std::fs::remove_file(&path).unwrap();
    let e = short.expect_err("a 64 MiB file copied as 128 MiB");
    assert!(matches!(e, MemoryError::CopyFrom { offset: 0x400_0000, .. }), "{e:?}");
    assert!(e.to_string().contains("cannot read"), "{e}");
}

#[test]
fn fill_writes_through_the_file_what_write_would_through_the_mapping() {
    let b = Backing::new("t", 4 << 20).unwrap();
    let map = MemoryMap::new(vec![
        Region::new(GuestAddress(0), &b, 0, 2 << 20),
        Region::new(GuestAddress(2 << 20), &b, 2 << 20, 2 << 20),
    ])
    .unwrap();
    // 1500 pages (more than one pwritev takes) in one region, then a
    // run across the two regions.
    let pages: Vec<Vec<u8>> = (0..1500u32).map(|i| vec![(i % 251) as u8 + 1; 4096]).collect();
    let bufs: Vec<&[u8]> = pages.iter().take(400).map(Vec::as_slice).collect();
    map.fill(GuestAddress(0x1000), &bufs).unwrap();
    let across: Vec<&[u8]> = pages.iter().take(3).map(Vec::as_slice).collect();
    map.fill(GuestAddress((2 << 20) - 0x1000), &across).unwrap();
    let big = Backing::new("big", 8 << 20).unwrap();
    let all: Vec<&[u8]> = pages.iter().map(Vec::as_slice).collect();
    MemoryMap::ram(&big).unwrap().fill(GuestAddress(0x2000), &all).unwrap();
    let mut page = vec![0u8; 4096];
    for (i, want) in pages.iter().take(400).enumerate() {
        map.read(GuestAddress(0x1000 + 0x1000 * i as u64), &mut page).unwrap();
        assert_eq!(&page, want, "page {i}");
    }
    for (i, want) in pages.iter().take(3).enumerate() {
        map.read(GuestAddress((2 << 20) - 0x1000 + 0x1000 * i as u64), &mut page).unwrap();
        assert_eq!(&page, want, "page {i} of the run across regions");
    }
    for (i, want) in pages.iter().enumerate() {
        big.read_at(0x2000 + 0x1000 * i as u64, &mut page).unwrap();
        assert_eq!(&page, want, "page {i} of the 1500");
    }
    // A private mapping's file is not its memory: it stays unchanged.
    let private = Backing::from_file_private("p", big.file().try_clone().unwrap(), 8 << 20).unwrap();
    private.fill_at(0x2000, &[&[9u8; 4096]]).unwrap();
    private.read_at(0x2000, &mut page).unwrap();
    assert_eq!(page, [9u8; 4096]);
    big.read_at(0x2000, &mut page).unwrap();
    assert_eq!(&page, &pages[0], "the file under a private mapping is never written");
    // Outside the backing: an error, nothing written.
    assert!(matches!(big.fill_at((8 << 20) - 0x1000, &[&page, &page]), Err(MemoryError::OutOfBounds { .. })));
}

#[test]
fn a_fill_running_past_guest_memory_is_refused_whole_without_joining_its_buffers() {
    let b = Backing::new("t", 4 << 20).unwrap();
    let map = MemoryMap::new(vec![
        Region::new(GuestAddress(0), &b, 0, 2 << 20),
        Region::new(GuestAddress(2 << 20), &b, 2 << 20, 2 << 20),
    ])
    .unwrap();
    // A run that starts in the first region, crosses into the second and
    // claims 256 MiB more, as a hostile migration stream's zero pages can.
    let page = [0xa5u8; 4096];
    let run = vec![&page[..]; 65536];
    let err = map.fill(GuestAddress((2 << 20) - 0x1000), &run).unwrap_err();
    assert!(matches!(err, MemoryError::Unmapped { .. }), "{err}");
    let mut back = [0u8; 4096];
    for gpa in [(2 << 20) - 0x1000, 2 << 20, (4 << 20) - 0x1000] {
        map.read(GuestAddress(gpa), &mut back).unwrap();
        assert_eq!(back, [0u8; 4096], "nothing written at {gpa:#x}");
    }
}

#[test]
fn overlapping_regions_are_named() {
    let b = Backing::new("t", 0x200000).unwrap();
    let err = MemoryMap::new(vec![
        Region::new(GuestAddress(0xfff00000), &b, 0, 0x100000),
        Region::new(GuestAddress(0xfffe0000), &b, 0, 0x20000),
    ])
    .unwrap_err();
    assert_eq!(err.to_string(), "region 0xfff00000+0x100000 overlaps region 0xfffe0000+0x20000");
}

#[test]
fn unaligned_and_outside_backing_are_rejected() {
    let b = Backing::new("t", 0x2000).unwrap();
    assert!(matches!(
        MemoryMap::new(vec![Region::new(GuestAddress(0x800), &b, 0, 0x1000)]),
        Err(MemoryError::Unaligned(_))
    ));
    assert!(matches!(
        MemoryMap::new(vec![Region::new(GuestAddress(0), &b, 0x1000, 0x2000)]),
        Err(MemoryError::OutsideBacking { .. })
    ));
    assert!(matches!(Backing::new("t", 0), Err(MemoryError::BadSize(0))));
    assert!(matches!(Backing::new("t", 4097), Err(MemoryError::BadSize(4097))));
}

#[test]
fn reads_span_adjacent_regions_and_aliases_share_bytes() {
    let a = Backing::new("a", 0x1000).unwrap();
    let b = Backing::new("b", 0x1000).unwrap();
    let map = MemoryMap::new(vec![
        Region::new(GuestAddress(0x1000), &b, 0, 0x1000),
        Region::new(GuestAddress(0), &a, 0, 0x1000),
        Region::new(GuestAddress(0x10000), &a, 0, 0x1000),
    ])
    .unwrap();
    map.write(GuestAddress(0xffe), &[1, 2, 3, 4]).unwrap();
    let mut buf = [0u8; 2];
    map.read(GuestAddress(0x10ffe), &mut buf).unwrap();
    assert_eq!(buf, [1, 2]);
    b.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, [3, 4]);
    assert!(matches!(map.read(GuestAddress(0x2000), &mut buf), Err(MemoryError::Unmapped { .. })));
}

#[test]
fn ram_above_3g_skips_the_hole() {
    let b = Backing::new("ram", (3 << 30) + 0x1000).unwrap();
    let map = MemoryMap::ram(&b).unwrap();
    assert_eq!(map.regions().len(), 2);
    assert_eq!(map.regions()[1].gpa, GuestAddress(4 << 30));
    assert_eq!(map.regions()[1].len, 0x1000);
}
