//! [`PageBitmap`]: the dirty log's bitmap of one backing object, with a
//! summary bit per 64 pages so that queries cost what they return.

use crate::memory::PAGE_SIZE;
use crate::sys::anon::AnonWords;
use crate::GuestAddress;

/// A two-level page bitmap: `words` has one bit per page, `summary` one bit
/// per word of `words` that may be non-zero (set for every non-zero word;
/// a set bit over an empty word is cleared when [`take`](Self::take) meets
/// it).
#[derive(Debug)]
#[cfg_attr(test, derive(Clone))]
pub(crate) struct PageBitmap {
    /// In a mapping of their own: KVM copies its logs straight in
    /// ([`fill_clean`](Self::fill_clean)), and into a `Vec` that copy cost
    /// this host five times as much ([`crate::sys::anon`]).
    words: AnonWords,
    summary: Vec<u64>,
    pages: u64,
}

impl PageBitmap {
    /// A clean bitmap of `pages` pages. Fails, rather than aborting as a
    /// `Vec` would, when the host cannot give it the memory.
    pub(crate) fn new(pages: u64) -> std::io::Result<Self> {
        let nwords = usize::try_from(pages.div_ceil(64)).map_err(|_| std::io::ErrorKind::OutOfMemory)?;
        let (words, mut summary) = (AnonWords::new(nwords)?, Vec::new());
        summary.try_reserve_exact(nwords.div_ceil(64)).map_err(|_| std::io::ErrorKind::OutOfMemory)?;
        summary.resize(nwords.div_ceil(64), 0);
        Ok(Self { words, summary, pages })
    }

    pub(crate) fn set(&mut self, page: u64) {
        if page < self.pages {
            let w = (page / 64) as usize;
            self.words[w] |= 1 << (page % 64);
            self.summary[w / 64] |= 1 << (w % 64);
        }
    }

    /// The bits of word `w` that are pages of this bitmap.
    fn valid(&self, w: usize) -> u64 {
        let first = w as u64 * 64;
        match self.pages.saturating_sub(first) {
            0 => 0,
            n if n >= 64 => u64::MAX,
            n => (1 << n) - 1,
        }
    }

    /// ORs `bits` into word `w` (bits past the last page are dropped).
    pub(crate) fn or_word(&mut self, w: usize, bits: u64) {
        let bits = bits & self.valid(w);
        if bits != 0 {
            self.words[w] |= bits;
            self.summary[w / 64] |= 1 << (w % 64);
        }
    }

    /// Sets `count` pages from `first`, a word at a time.
    pub(crate) fn set_range(&mut self, first: u64, count: u64) {
        let end = first.saturating_add(count).min(self.pages);
        let mut page = first;
        while page < end {
            let w = (page / 64) as usize;
            let lo = page % 64;
            let n = (64 - lo).min(end - page);
            let bits = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << lo };
            self.or_word(w, bits);
            page += n;
        }
    }

    /// ORs `bits` (bit i = page `first + i`) into the bitmap, a word at a
    /// time (shifted when `first` is not a multiple of 64).
    pub(crate) fn or_bits(&mut self, first: u64, bits: &[u64]) {
        let base = (first / 64) as usize;
        let shift = first % 64;
        if shift == 0 {
            // The common case (slots start at a multiple of 64 pages of
            // their backing): plain word ORs, the summary built 64 words
            // at a time, no branch per word, so a sparse log costs about a
            // memory pass.
            let full = ((self.pages / 64) as usize).saturating_sub(base).min(bits.len());
            let (head, tail) = bits.split_at(full);
            let words = &mut self.words[base..base + full];
            let mut w = base;
            for (dst, src) in words.chunks_mut(64).zip(head.chunks(64)) {
                // A clean stretch (most of a sparse log) is only read: no
                // store dirties the bitmap's cache lines.
                if src.iter().fold(0, |acc, &x| acc | x) == 0 {
                    w += src.len();
                    continue;
                }
                let mut nonzero = 0u64;
                for (j, (d, &x)) in dst.iter_mut().zip(src).enumerate() {
                    *d |= x;
                    nonzero |= u64::from(x != 0) << j;
                }
                // The chunk may straddle two summary words when `base` is
                // not a multiple of 64.
                self.summary[w / 64] |= nonzero << (w % 64);
                if w % 64 != 0 && nonzero >> (64 - w % 64) != 0 {
                    self.summary[w / 64 + 1] |= nonzero >> (64 - w % 64);
                }
                w += src.len();
            }
            if let Some(&last) = tail.first() {
                self.or_word(base + full, last);
            }
            return;
        }
        let nwords = self.words.len();
        for (i, &word) in bits.iter().enumerate().filter(|(_, w)| **w != 0) {
            let w = base + i;
            if w < nwords {
                self.or_word(w, word << shift);
            }
            if w + 1 < nwords {
                self.or_word(w + 1, word >> (64 - shift));
            }
        }
    }

    /// Lets `fill` write the bits of `pages` pages from `first` straight
    /// into the bitmap's words (bit i = page `first + i`), when that saves
    /// [`or_bits`](Self::or_bits)' pass over a copy: `first` is a multiple
    /// of 64, the words lie inside the bitmap and every one of them is clean
    /// (as after a collection took everything). Bits past the `pages` are
    /// dropped. The summary marks every word of the stretch as possibly
    /// dirty, without a pass over them: [`take`](Self::take) reads only the
    /// words it walks and clears the marks of those it finds empty, so a
    /// budgeted query after a large sync costs what it returns. Returns
    /// `None`, having called nothing, when the words do not qualify; the
    /// caller then ORs.
    pub(crate) fn fill_clean<E>(
        &mut self,
        first: u64,
        pages: u64,
        fill: impl FnOnce(&mut [u64]) -> Result<(), E>,
    ) -> Option<Result<(), E>> {
        if first % 64 != 0 || pages == 0 || first.checked_add(pages)? > self.pages {
            return None;
        }
        let base = usize::try_from(first / 64).ok()?;
        let n = usize::try_from(pages.div_ceil(64)).ok()?;
        if !self.clean(base, n) {
            return None;
        }
        if let Err(e) = fill(&mut self.words[base..base + n]) {
            // Nothing may be half-written into a clean stretch.
            self.words[base..base + n].fill(0);
            return Some(Err(e));
        }
        self.words[base + n - 1] &= low_bits(pages - (n as u64 - 1) * 64);
        self.mark_words(base, n);
        Some(Ok(()))
    }

    /// Whether the summary says words `base..base + n` are all zero.
    fn clean(&self, base: usize, n: usize) -> bool {
        summary_spans(base, n).all(|(sw, bits)| self.summary[sw] & bits == 0)
    }

    /// Sets the summary bits of words `base..base + n`.
    fn mark_words(&mut self, base: usize, n: usize) {
        for (sw, bits) in summary_spans(base, n) {
            self.summary[sw] |= bits;
        }
    }

    #[cfg(test)]
    pub(crate) fn get(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Takes (clears and returns) up to `max` set pages in `start..end`, in
    /// order, a word at a time: `emit(w, bits)` receives the bits taken from
    /// word `w` (pages `64 * w + i`) and returns how many there are (it
    /// walks them anyway, and counting there keeps a popcount off this
    /// loop, which has no hardware one at the baseline target). Returns the number of pages taken and
    /// the page to resume from if the budget ran out first. Skips clean
    /// stretches 4096 pages at a time (the summary), so the cost follows
    /// the dirty pages returned, not the range.
    pub(crate) fn take(
        &mut self,
        start: u64,
        end: u64,
        max: usize,
        mut emit: impl FnMut(usize, u64) -> usize,
    ) -> (usize, Option<u64>) {
        let end = end.min(self.pages);
        if start >= end {
            return (0, None);
        }
        let (first_w, last_w) = ((start / 64) as usize, ((end - 1) / 64) as usize);
        let mut count = 0;
        for sw in first_w / 64..=last_w / 64 {
            // Walk only the non-zero words, through the summary's set bits.
            let mut dirty_words = self.summary[sw];
            if sw == first_w / 64 {
                dirty_words &= u64::MAX << (first_w % 64);
            }
            if sw == last_w / 64 {
                dirty_words &= low_bits(last_w as u64 % 64 + 1);
            }
            let inside = sw as u64 * 4096 >= start && (sw as u64 + 1) * 4096 <= end;
            if dirty_words == u64::MAX && inside && max - count >= 4096 {
                // 64 words, all marked (a log KVM wrote straight in): a plain
                // scan, then one clear, as a raw scan of KVM's bitmap does.
                let chunk = &mut self.words[sw * 64..sw * 64 + 64];
                for (i, &word) in chunk.iter().enumerate() {
                    if word != 0 {
                        count += emit(sw * 64 + i, word);
                    }
                }
                chunk.fill(0);
                self.summary[sw] = 0;
                continue;
            }
            // Summary bits of the words emptied here, cleared once at the end.
            let mut emptied = 0u64;
            while dirty_words != 0 {
                let bit = dirty_words & dirty_words.wrapping_neg();
                dirty_words ^= bit;
                let w = sw * 64 + bit.trailing_zeros() as usize;
                let mut word = self.words[w];
                if word == 0 {
                    // Marked by a direct fill (`fill_clean`) and empty.
                    emptied |= bit;
                    continue;
                }
                if w == first_w {
                    word &= u64::MAX << (start % 64);
                }
                if w == last_w {
                    word &= low_bits(end - w as u64 * 64);
                }
                if word == 0 {
                    continue;
                }
                if max - count < 64 && word.count_ones() as usize > max - count {
                    // Only the lowest `max - count` pages fit in the budget.
                    let mut rest = word;
                    for _ in count..max {
                        rest &= rest - 1;
                    }
                    let taken = word & !rest;
                    if taken != 0 {
                        emit(w, taken);
                        self.words[w] &= !taken;
                    }
                    self.summary[sw] &= !emptied;
                    return (max, Some(w as u64 * 64 + u64::from(rest.trailing_zeros())));
                }
                count += emit(w, word);
                let rest = self.words[w] & !word;
                self.words[w] = rest;
                emptied |= if rest == 0 { bit } else { 0 };
                let next = (w as u64 + 1) * 64;
                if count == max && next < end {
                    self.summary[sw] &= !emptied;
                    return (count, Some(next));
                }
            }
            self.summary[sw] &= !emptied;
        }
        (count, None)
    }

    /// Takes every page in `start..end` (no budget), pushing the guest
    /// address `origin + page * 4096` of each onto `out` in page order;
    /// returns how many. What [`take`](Self::take) does with an unlimited
    /// budget, in the shape of a raw VMM's scan: each word cleared as it is
    /// read, the pages pushed straight onto the list. In the dirty-collect
    /// bench's context `take`'s emit-per-word loop cost 18-19 µs for 2622
    /// pages in 4096 words against 10-13 µs for this shape (an isolated
    /// timing saw no difference).
    pub(crate) fn take_all(&mut self, start: u64, end: u64, out: &mut Vec<GuestAddress>, origin: u64) -> usize {
        let end = end.min(self.pages);
        if start >= end {
            return 0;
        }
        let before = out.len();
        let (first_w, last_w) = ((start / 64) as usize, ((end - 1) / 64) as usize);
        for sw in first_w / 64..=last_w / 64 {
            let (lo, hi) = ((sw * 64).max(first_w), (sw * 64 + 63).min(last_w));
            // The summary bits of words lo..=hi; those left set are words
            // with pages outside the range (only the two end words).
            let span = (u64::MAX << (lo % 64)) & low_bits((hi % 64) as u64 + 1);
            let mut marked = self.summary[sw] & span;
            if marked == 0 {
                continue;
            }
            let mut kept = 0;
            if marked == span && lo > first_w && hi < last_w {
                // Every word marked, none at an end: the raw scan.
                for (i, word) in self.words[lo..=hi].iter_mut().enumerate() {
                    let bits = std::mem::take(word);
                    push_pages(out, origin, lo + i, bits);
                }
                marked = 0;
            }
            while marked != 0 {
                let w = sw * 64 + marked.trailing_zeros() as usize;
                marked &= marked - 1;
                let mut mask = u64::MAX;
                if w == first_w {
                    mask &= u64::MAX << (start % 64);
                }
                if w == last_w {
                    mask &= low_bits(end - w as u64 * 64);
                }
                let word = self.words[w];
                self.words[w] = word & !mask;
                if word & !mask != 0 {
                    kept |= 1 << (w % 64);
                }
                push_pages(out, origin, w, word & mask);
            }
            self.summary[sw] &= !span | kept;
        }
        out.len() - before
    }
}

/// The summary words that cover words `base..base + n`, each with the bits
/// of those words in it.
fn summary_spans(base: usize, n: usize) -> impl Iterator<Item = (usize, u64)> {
    let end = base + n;
    let mut w = base;
    std::iter::from_fn(move || {
        (w < end).then(|| {
            let sw = w / 64;
            let stop = ((sw + 1) * 64).min(end);
            let bits = (u64::MAX << (w % 64)) & low_bits((stop - sw * 64) as u64);
            w = stop;
            (sw, bits)
        })
    })
}

/// Pushes the guest addresses of the pages set in `bits`, word `w` of a
/// bitmap whose page 0 is at guest address `origin`.
pub(crate) fn push_pages(out: &mut Vec<GuestAddress>, origin: u64, w: usize, mut bits: u64) {
    let base = w as u64 * 64;
    while bits != 0 {
        out.push(GuestAddress(origin.wrapping_add((base + u64::from(bits.trailing_zeros())) * PAGE_SIZE)));
        bits &= bits - 1;
    }
}

/// The lowest `n` bits set (`n` <= 64).
pub(crate) fn low_bits(n: u64) -> u64 {
    if n >= 64 {
        u64::MAX
    } else {
        (1 << n) - 1
    }
}

#[cfg(test)]
mod tests {
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
        for (first, pages) in
            [(0u64, 300 * 64u64), (64 * 5, 300 * 64 - 40), (64 * 63, 300 * 64), (64 * 64, 299 * 64 + 1)]
        {
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
}
