//! The difference between the installed memory map and a new one, as the
//! slots to delete and the slots to create, and which regions only start or
//! stop their dirty log (their slots stay).

use crate::memory::{Region, RegionKey};

/// Which installed regions go (indices into `old`, ascending) and which new
/// ones come (indices into `new`, ascending), both lists sorted by address.
/// A change usually touches a few regions of many: the unchanged head and
/// tail are skipped with slice comparisons (`memcmp` over the keys), and
/// only the middle is merged key by key.
pub(super) fn diff(old: &[RegionKey], new: &[RegionKey], remove: &mut Vec<usize>, add: &mut Vec<usize>) {
    const CHUNK: usize = 16;
    let common = old.len().min(new.len());
    let mut head = 0;
    while head + CHUNK <= common && old[head..head + CHUNK] == new[head..head + CHUNK] {
        head += CHUNK;
    }
    while head < common && old[head] == new[head] {
        head += 1;
    }
    let mut tail = 0;
    while tail + CHUNK <= common - head
        && old[old.len() - tail - CHUNK..old.len() - tail] == new[new.len() - tail - CHUNK..new.len() - tail]
    {
        tail += CHUNK;
    }
    while tail < common - head && old[old.len() - tail - 1] == new[new.len() - tail - 1] {
        tail += 1;
    }
    let (old_end, new_end) = (old.len() - tail, new.len() - tail);
    remove.clear();
    add.clear();
    let (mut i, mut j) = (head, head);
    while i < old_end || j < new_end {
        match (old[..old_end].get(i), new[..new_end].get(j)) {
            (Some(o), Some(n)) if o == n => {
                i += 1;
                j += 1;
            }
            // Keys start with the guest address.
            (Some(o), Some(n)) if o[0] < n[0] => {
                remove.push(i);
                i += 1;
            }
            (Some(o), Some(n)) if n[0] < o[0] => {
                add.push(j);
                j += 1;
            }
            (Some(_), Some(_)) => {
                remove.push(i);
                add.push(j);
                i += 1;
                j += 1;
            }
            (Some(_), None) => {
                remove.push(i);
                i += 1;
            }
            (None, Some(_)) => {
                add.push(j);
                j += 1;
            }
            (None, None) => break,
        }
    }
}

/// Moves out of `remove` and `add` (indices into `installed` and `new`,
/// ascending; both sorted by address) the pairs that map the same memory
/// the same way except for dirty logging, into `toggles` as (installed,
/// new) pairs, ascending.
pub(super) fn split_toggles(
    installed: &[(Region, u32)],
    new: &[Region],
    remove: &mut Vec<usize>,
    add: &mut Vec<usize>,
    toggles: &mut Vec<(usize, usize)>,
) {
    toggles.clear();
    // The keys are what the diff compares (the same host mapping, the same
    // flags); equal once both are logged, and one is not: only the log differs.
    let only_log_differs = |old: &Region, new: &Region| {
        old.dirty_log != new.dirty_log && old.clone().dirty_logged().key() == new.clone().dirty_logged().key()
    };
    let mut next = 0;
    remove.retain(|&i| {
        let old = &installed[i].0;
        while add.get(next).is_some_and(|&j| new[j].gpa < old.gpa) {
            next += 1;
        }
        match add.get(next) {
            Some(&j) if only_log_differs(old, &new[j]) => {
                toggles.push((i, j));
                next += 1;
                false
            }
            _ => true,
        }
    });
    let mut t = 0;
    add.retain(|&j| {
        let paired = toggles.get(t).is_some_and(|&(_, tj)| tj == j);
        t += usize::from(paired);
        !paired
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Backing;
    use crate::GuestAddress;

    /// A key at guest page `gpa` of backing `id` (offset 0, one page).
    fn key(gpa: u64, id: u64) -> RegionKey {
        [gpa << 12, 4096, 0, id << 2]
    }

    fn run(old: &[RegionKey], new: &[RegionKey]) -> (Vec<usize>, Vec<usize>) {
        let (mut remove, mut add) = (vec![99], vec![99]);
        diff(old, new, &mut remove, &mut add);
        (remove, add)
    }

    #[test]
    fn the_same_map_changes_nothing() {
        let map: Vec<_> = (0..100).map(|i| key(i, 1)).collect();
        assert_eq!(run(&map, &map), (vec![], vec![]));
        assert_eq!(run(&[], &[]), (vec![], vec![]));
    }

    #[test]
    fn one_region_added_or_removed_anywhere_is_found() {
        let map: Vec<_> = (0..40).map(|i| key(2 * i, 1)).collect();
        for at in [0, 1, 17, 39] {
            let mut less = map.clone();
            less.remove(at);
            assert_eq!(run(&map, &less), (vec![at], vec![]), "remove at {at}");
            assert_eq!(run(&less, &map), (vec![], vec![at]), "add at {at}");
        }
    }

    #[test]
    fn a_region_remapped_in_place_is_removed_and_added() {
        let old: Vec<_> = (0..40).map(|i| key(i, 1)).collect();
        let mut new = old.clone();
        new[20] = key(20, 2);
        new[21][3] |= 1; // read-only now
        assert_eq!(run(&old, &new), (vec![20, 21], vec![20, 21]));
    }

    #[test]
    fn whole_maps_replaced_by_disjoint_ones() {
        let old: Vec<_> = (0..20).map(|i| key(i, 1)).collect();
        let new: Vec<_> = (100..130).map(|i| key(i, 1)).collect();
        assert_eq!(run(&old, &new), ((0..20).collect(), (0..30).collect()));
        assert_eq!(run(&old, &[]), ((0..20).collect(), vec![]));
        assert_eq!(run(&[], &new), (vec![], (0..30).collect()));
    }

    #[test]
    fn a_moved_region_between_unchanged_ones() {
        // Regions 0..32 stay, region at page 50 moves to page 70, 80..112 stay.
        let mut old: Vec<_> = (0..32).map(|i| key(i, 1)).collect();
        old.push(key(50, 1));
        old.extend((80..112).map(|i| key(i, 1)));
        let mut new = old.clone();
        new[32] = key(70, 1);
        assert_eq!(run(&old, &new), (vec![32], vec![32]));
    }

    #[test]
    fn a_region_whose_log_alone_changes_is_toggled_not_replaced() {
        let mem = Backing::new("t", 0x40_0000).unwrap();
        let r = |gpa: u64, offset: u64| Region::new(GuestAddress(gpa), &mem, offset, 0x10_0000);
        let installed: Vec<(Region, u32)> =
            vec![(r(0, 0), 0), (r(0x10_0000, 0x10_0000).dirty_logged(), 1), (r(0x20_0000, 0x20_0000), 2)];
        // Region 0 starts logging, region 1 stops, region 2 moves (and logs).
        let new = [r(0, 0).dirty_logged(), r(0x10_0000, 0x10_0000), r(0x30_0000, 0x20_0000).dirty_logged()];
        let (mut remove, mut add, mut toggles) = (vec![0, 1, 2], vec![0, 1, 2], vec![(9, 9)]);
        split_toggles(&installed, &new, &mut remove, &mut add, &mut toggles);
        assert_eq!(toggles, [(0, 0), (1, 1)]);
        assert_eq!((remove, add), (vec![2], vec![2]));
        // Same address, another offset: a real replacement.
        let new = [r(0, 0x10_0000).dirty_logged()];
        let (mut remove, mut add) = (vec![0], vec![0]);
        split_toggles(&installed[..1], &new, &mut remove, &mut add, &mut toggles);
        assert_eq!((remove, add, toggles), (vec![0], vec![0], vec![]));
    }
}
