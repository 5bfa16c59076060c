use super::*;

/// `take`, with the words it emits expanded to pages.
fn take(b: &mut PageBitmap, start: u64, end: u64, max: usize) -> (Vec<u64>, usize, Option<u64>) {
    let mut pages = Vec::new();
    let (n, resume) = b.take(start, end, max, |w, mut bits| {
        let before = pages.len();
        while bits != 0 {
            pages.push(w as u64 * 64 + u64::from(bits.trailing_zeros()));
            bits &= bits - 1;
        }
        pages.len() - before
    });
    (pages, n, resume)
}

#[test]
fn take_respects_range_budget_and_cursor() {
    let mut b = PageBitmap::new(100_000).unwrap();
    for p in [0u64, 5, 63, 64, 4095, 4096, 70_000, 99_999] {
        b.set(p);
    }
    // The budget runs out at the end of word 1: resume at word 2.
    assert_eq!(take(&mut b, 1, 100_000, 3), (vec![5, 63, 64], 3, Some(128)));
    assert_eq!(take(&mut b, 4095, 70_000, 10), (vec![4095, 4096], 2, None));
    assert!(b.get(0) && b.get(70_000) && !b.get(5));
    assert_eq!(take(&mut b, 0, 100_000, 10), (vec![0, 70_000, 99_999], 3, None));
    assert_eq!(take(&mut b, 0, 100_000, 10), (vec![], 0, None));
}

#[test]
fn budget_can_end_inside_a_word() {
    let mut b = PageBitmap::new(1000).unwrap();
    b.set_range(3, 10);
    assert_eq!(take(&mut b, 0, 1000, 4), (vec![3, 4, 5, 6], 4, Some(7)));
    assert!(b.get(7) && !b.get(6));
    assert_eq!(take(&mut b, 7, 1000, 100), ((7..13).collect(), 6, None));
}

#[test]
fn or_bits_sets_pages_at_an_offset() {
    let mut b = PageBitmap::new(256).unwrap();
    b.or_bits(64, &[0b101, 1 << 63]);
    assert_eq!(take(&mut b, 0, 256, 10).0, vec![64, 66, 191]);
    // Aligned, with a last word past the end of the bitmap.
    let mut b = PageBitmap::new(100).unwrap();
    b.or_bits(0, &[1, u64::MAX]);
    assert_eq!(take(&mut b, 0, 1 << 20, usize::MAX).0, [0].into_iter().chain(64..100).collect::<Vec<_>>());
}

#[test]
fn or_bits_matches_setting_each_page() {
    // Pseudo-random sparse words, ORed at word offsets that do and do
    // not line up with a summary word, and at a page offset.
    let bits = sparse_words(0x9e37_79b9_7f4a_7c15, 300);
    for first in [0u64, 64 * 5, 64 * 63, 64 * 64, 17] {
        let pages = first + 300 * 64 - 40;
        let mut fast = PageBitmap::new(pages).unwrap();
        fast.or_bits(first, &bits);
        let mut slow = PageBitmap::new(pages).unwrap();
        for (i, &word) in bits.iter().enumerate() {
            (0..64).filter(|b| word >> b & 1 != 0).for_each(|b| slow.set(first + i as u64 * 64 + b));
        }
        assert_eq!(fast.words, slow.words, "first page {first}");
        assert_eq!(fast.summary, slow.summary, "first page {first}");
    }
}

/// Pseudo-random sparse words (xorshift from `seed`), a third of them zero.
fn sparse_words(seed: u64, n: usize) -> Vec<u64> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x % 3 == 0 {
                0
            } else {
                x & (x >> 11)
            }
        })
        .collect()
}

#[test]
fn a_log_written_into_clean_words_is_what_or_bits_would_make() {
    let bits = sparse_words(0x2545_f491_4f6c_dd1d, 300);
    // Aligned starts inside and across summary words; a slot whose last
    // word is partial (its extra bits must be dropped).
    for (first, pages) in [(0u64, 300 * 64u64), (64 * 5, 300 * 64 - 40), (64 * 63, 300 * 64), (64 * 64, 299 * 64 + 1)] {
        let total = first + 300 * 64 + 64;
        let mut direct = PageBitmap::new(total).unwrap();
        // A dirty word outside the slot stays as it is.
        direct.set(total - 1);
        let mut ored = direct.clone();
        let n = pages.div_ceil(64) as usize;
        let done = direct.fill_clean(first, pages, |words| {
            assert_eq!(words.len(), n);
            words.copy_from_slice(&bits[..n]);
            Ok::<(), ()>(())
        });
        assert_eq!(done, Some(Ok(())), "first page {first}");
        let mut slot_bits = bits[..n].to_vec();
        slot_bits[n - 1] &= low_bits(pages - (n as u64 - 1) * 64);
        ored.or_bits(first, &slot_bits);
        assert_eq!(direct.words, ored.words, "first page {first}");
        // The same pages come out, in budgeted queries and in one.
        let mut again = direct.clone();
        let all = take(&mut ored, 0, total, usize::MAX).0;
        assert_eq!(take(&mut direct, 0, total, usize::MAX).0, all, "first page {first}");
        let mut pieces = Vec::new();
        let mut cursor = Some(0);
        while let Some(start) = cursor {
            let (pages, _, next) = take(&mut again, start, total, 100);
            pieces.extend(pages);
            cursor = next;
        }
        assert_eq!(pieces, all, "first page {first}, 100 at a time");
        // Every mark of an empty word is gone once everything is taken.
        assert!(direct.summary.iter().all(|&s| s == 0), "first page {first}");
    }
}

#[test]
fn a_scan_of_whole_marked_summary_words_takes_only_the_range() {
    // Five summary words' worth, written straight in (every word marked,
    // the scanned path), against the same bits ORed in (only non-zero
    // words marked, the word-by-word path): ranges that start and end
    // inside, on and across summary words, with and without a budget.
    let mut bits = sparse_words(0x1234_5678_9abc_def1, 64 * 5);
    // Pages just outside the ranges below, inside their first or last word.
    bits[0] |= 1;
    bits[64] |= 0x1f;
    bits[255] |= 1 << 63;
    let total = 64 * 64 * 5;
    let ranges = [
        (0, total, usize::MAX),
        (4096 + 5, 3 * 4096 + 7, usize::MAX),
        (4096 + 2000, 4 * 4096 - 3, usize::MAX),
        (4096, 3 * 4096, usize::MAX),
        (1, total, 5000),
    ];
    for (start, end, max) in ranges {
        let mut direct = PageBitmap::new(total).unwrap();
        let filled = direct.fill_clean(0, total, |w| {
            w.copy_from_slice(&bits);
            Ok::<(), ()>(())
        });
        assert_eq!(filled, Some(Ok(())));
        let mut ored = PageBitmap::new(total).unwrap();
        ored.or_bits(0, &bits);
        let got = take(&mut direct, start, end, max);
        assert_eq!(got, take(&mut ored, start, end, max), "{start}..{end} max {max}");
        assert!(got.0.iter().all(|&p| (start..end).contains(&p)), "{start}..{end}");
        // What was outside the range (or the budget) is still there.
        assert_eq!(take(&mut direct, 0, total, usize::MAX), take(&mut ored, 0, total, usize::MAX));
        assert!(direct.summary.iter().all(|&s| s == 0) && direct.words.iter().all(|&w| w == 0));
    }
}

#[test]
fn a_log_is_not_written_over_dirty_unaligned_or_outside_words() {
    let mut b = PageBitmap::new(64 * 200).unwrap();
    b.set(64 * 100 + 3);
    let never = |_: &mut [u64]| -> Result<(), ()> { panic!("must not be called") };
    assert_eq!(b.fill_clean(64 * 90, 64 * 20, never), None, "a dirty word in the range");
    assert_eq!(b.fill_clean(17, 64, never), None, "not word-aligned");
    assert_eq!(b.fill_clean(64 * 190, 64 * 20, never), None, "past the bitmap");
    // Taking the page makes the range clean again.
    let (pages, _, _) = take(&mut b, 0, 64 * 200, usize::MAX);
    assert_eq!(pages, [64 * 100 + 3]);
    let fill = |w: &mut [u64]| -> Result<(), ()> {
        w[0] = 1;
        Ok(())
    };
    assert_eq!(b.fill_clean(64 * 90, 64 * 20, fill), Some(Ok(())));
    assert!(b.get(64 * 90));
    // A failed fill leaves nothing behind.
    let mut b = PageBitmap::new(64 * 4).unwrap();
    let failing = |w: &mut [u64]| {
        w.fill(u64::MAX);
        Err("KVM_GET_DIRTY_LOG failed")
    };
    assert_eq!(b.fill_clean(0, 64 * 4, failing), Some(Err("KVM_GET_DIRTY_LOG failed")));
    assert_eq!(take(&mut b, 0, 64 * 4, usize::MAX).0, Vec::<u64>::new());
}

#[test]
fn word_level_updates_match_page_by_page() {
    let mut words = PageBitmap::new(200).unwrap();
    words.or_bits(37, &[u64::MAX, 0x8000_0000_0000_0001, u64::MAX, u64::MAX]);
    words.set_range(190, 50);
    let (pages, ..) = take(&mut words, 0, 1 << 20, usize::MAX);
    let mut expected: Vec<u64> = (37..101).chain([101, 164]).chain(165..200).collect();
    expected.sort_unstable();
    expected.dedup();
    assert_eq!(pages, expected);
    assert!(!words.get(5) && words.summary.iter().all(|&s| s == 0), "all taken");
}

/// `take_all` takes what `take` with no budget takes, leaves the same
/// words and summary behind, over ranges that start and end inside
/// words and summary words, on sparse and fully marked bitmaps.
#[test]
fn take_all_matches_an_unlimited_take() {
    let pages = 64 * 64 * 3 + 100;
    for (seed, fill) in [(7u64, false), (11, true)] {
        let bits = sparse_words(seed, (pages as usize).div_ceil(64));
        for (start, end) in [(0, pages), (1, pages - 1), (63, 4097), (4096, 8192), (4000, 12_000), (5, 6)] {
            let mut a = PageBitmap::new(pages).unwrap();
            if fill {
                a.fill_clean(0, pages, |w| {
                    w.copy_from_slice(&bits);
                    Ok::<(), ()>(())
                })
                .unwrap()
                .unwrap();
            } else {
                a.or_bits(0, &bits);
            }
            let mut b = a.clone();
            let (want, n, resume) = take(&mut a, start, end, usize::MAX);
            assert_eq!((n, resume), (want.len(), None));
            let mut got = Vec::new();
            assert_eq!(b.take_all(start, end, &mut got, 0x1000), want.len(), "{start}..{end}");
            let got: Vec<u64> = got.iter().map(|g| (g.0 - 0x1000) / PAGE_SIZE).collect();
            assert_eq!(got, want, "{start}..{end}, filled {fill}");
            assert_eq!(a.words, b.words, "{start}..{end}");
            assert_eq!(a.summary, b.summary, "{start}..{end}, filled {fill}");
        }
    }
}
