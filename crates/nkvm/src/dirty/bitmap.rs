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

    /// Whether no page is marked (a summary bit left over an empty word
    /// counts as marked: the answer may be "no" for a clean bitmap, never
    /// "yes" for one with a page in it).
    pub(crate) fn is_clean(&self) -> bool {
        self.summary.iter().all(|&s| s == 0)
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
mod tests;
