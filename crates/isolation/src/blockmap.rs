//! Block maps of changed files: which 4 KiB blocks the view holds for a file, and where.
//!
//! Kept as extents, not one entry per block: a sequential write of a GiB lands in
//! consecutive journal blocks and is one entry, so the daemon's memory follows the number
//! of separate pieces written, not the bytes, and SEEK_DATA/SEEK_HOLE or a read step over
//! a whole extent at once.

use std::collections::BTreeMap;

use crate::change::BLOCK;

/// Where a block of a changed file lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loc {
    /// At this offset of the journal.
    Journal(u64),
    /// Nowhere: reads as zeros, and is a hole for SEEK_HOLE.
    Hole,
    /// Allocated zeros: reads as zeros, and is data for SEEK_DATA.
    Zeros,
}

impl Loc {
    /// The location `k` blocks further on in the same extent.
    fn advanced(self, k: u64) -> Loc {
        match self {
            Loc::Journal(o) => Loc::Journal(o + k * BLOCK),
            other => other,
        }
    }
}

/// `count` blocks; the first at `loc`, the others following it (in the journal: at
/// consecutive block offsets).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Extent {
    count: u64,
    loc: Loc,
}

/// A file's changed blocks. Extents never overlap, and two that touch and continue each
/// other are one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockMap {
    extents: BTreeMap<u64, Extent>,
    allocated_blocks: u64,
}

impl BlockMap {
    /// How many blocks hold data: in the journal, or allocated zeros (what a file system
    /// counts in st_blocks; holes are not).
    pub fn allocated_blocks(&self) -> u64 {
        self.allocated_blocks
    }

    /// How many extents the map holds (what its memory is proportional to).
    pub fn extent_count(&self) -> usize {
        self.extents.len()
    }

    /// Block `b`'s location and how many blocks from `b` on (`b` included) continue it.
    pub fn get(&self, b: u64) -> Option<(Loc, u64)> {
        let (&start, e) = self.extents.range(..=b).next_back()?;
        let k = b - start;
        (k < e.count).then(|| (e.loc.advanced(k), e.count - k))
    }

    /// The first mapped block at or after `b`.
    pub fn next_mapped(&self, b: u64) -> Option<u64> {
        if self.get(b).is_some() {
            return Some(b);
        }
        self.extents.range(b..).next().map(|(&start, _)| start)
    }

    /// Maps blocks `[start, start + count)` to `loc` (for the journal: to consecutive
    /// blocks from `loc` on), replacing what they were.
    pub fn set(&mut self, start: u64, count: u64, loc: Loc) {
        if count == 0 {
            return;
        }
        self.remove(start, start + count);
        self.insert_merged(start, Extent { count, loc });
    }

    /// How many blocks of `[from, to)` are mapped (to anything).
    pub fn mapped_in(&self, from: u64, to: u64) -> u64 {
        if from >= to {
            return 0;
        }
        let first = self.extents.range(..from).next_back();
        first
            .into_iter()
            .chain(self.extents.range(from..to))
            .map(|(&s, e)| (s + e.count).min(to).saturating_sub(s.max(from)))
            .sum()
    }

    /// Forgets every block from `keep` on.
    pub fn truncate(&mut self, keep: u64) {
        self.remove(keep, u64::MAX);
    }

    /// `(first block, count, location of the first)` of every extent, in order.
    pub fn extents(&self) -> impl Iterator<Item = (u64, u64, Loc)> + '_ {
        self.extents.iter().map(|(&s, e)| (s, e.count, e.loc))
    }

    /// Removes blocks `[from, to)`, cutting extents that straddle either end.
    fn remove(&mut self, from: u64, to: u64) {
        self.split_at(from);
        self.split_at(to);
        while let Some((&start, _)) = self.extents.range(from..to).next() {
            let e = self.extents.remove(&start).expect("just found");
            if e.loc != Loc::Hole {
                self.allocated_blocks -= e.count;
            }
        }
    }

    /// Makes `b` the first block of an extent if an extent covers it.
    fn split_at(&mut self, b: u64) {
        let Some((&start, &e)) = self.extents.range(..b).next_back() else {
            return;
        };
        let head = b - start;
        if head < e.count {
            self.extents.insert(
                start,
                Extent {
                    count: head,
                    loc: e.loc,
                },
            );
            let tail = Extent {
                count: e.count - head,
                loc: e.loc.advanced(head),
            };
            self.extents.insert(b, tail);
        }
    }

    /// Inserts `e` at `start` (where nothing is mapped), joined with the extents it
    /// continues and that continue it.
    fn insert_merged(&mut self, mut start: u64, mut e: Extent) {
        if e.loc != Loc::Hole {
            self.allocated_blocks += e.count;
        }
        if let Some((&s, &prev)) = self.extents.range(..start).next_back() {
            if s + prev.count == start && prev.loc.advanced(prev.count) == e.loc {
                self.extents.remove(&s);
                start = s;
                e = Extent {
                    count: prev.count + e.count,
                    loc: prev.loc,
                };
            }
        }
        let end = start + e.count;
        if let Some(&next) = self.extents.get(&end) {
            if e.loc.advanced(e.count) == next.loc {
                self.extents.remove(&end);
                e.count += next.count;
            }
        }
        self.extents.insert(start, e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same operations on a plain per-block map, to compare against.
    fn model_get(m: &BTreeMap<u64, Loc>, b: u64) -> Option<Loc> {
        m.get(&b).copied()
    }

    #[test]
    fn a_sequential_write_is_one_extent() {
        let mut m = BlockMap::default();
        for b in 0..1000 {
            m.set(b, 1, Loc::Journal((1 << 20) + b * BLOCK));
        }
        assert_eq!(m.extent_count(), 1);
        assert_eq!(m.allocated_blocks(), 1000);
        assert_eq!(m.get(999), Some((Loc::Journal((1 << 20) + 999 * BLOCK), 1)));
        assert_eq!(m.get(1000), None);
    }

    #[test]
    fn mapped_blocks_of_a_range_are_counted() {
        let mut m = BlockMap::default();
        m.set(2, 3, Loc::Journal(0));
        m.set(8, 2, Loc::Hole);
        assert_eq!(m.mapped_in(0, 20), 5);
        assert_eq!(m.mapped_in(3, 9), 3);
        assert_eq!(m.mapped_in(5, 8), 0);
        assert_eq!(m.mapped_in(4, 4), 0);
    }

    #[test]
    fn overwrites_split_and_join_again() {
        let mut m = BlockMap::default();
        m.set(0, 10, Loc::Journal(0));
        m.set(4, 2, Loc::Hole);
        assert_eq!(m.extent_count(), 3);
        assert_eq!(m.allocated_blocks(), 8);
        assert_eq!(m.get(6), Some((Loc::Journal(6 * BLOCK), 4)));
        m.set(4, 2, Loc::Journal(4 * BLOCK));
        assert_eq!(m.extent_count(), 1);
        assert_eq!(m.allocated_blocks(), 10);
        m.truncate(3);
        assert_eq!(m.allocated_blocks(), 3);
        assert_eq!(m.next_mapped(3), None);
        assert_eq!(m.next_mapped(1), Some(1));
    }

    #[test]
    fn agrees_with_a_per_block_map_under_random_operations() {
        // A small xorshift: the test needs no crate and its sequence is fixed.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut m = BlockMap::default();
        let mut model: BTreeMap<u64, Loc> = BTreeMap::new();
        let mut journal = 0u64;
        for _ in 0..20_000 {
            let start = next(200);
            let count = next(12) + 1;
            match next(10) {
                0 => {
                    m.truncate(start);
                    model.split_off(&start);
                }
                1 => {
                    m.set(start, count, Loc::Hole);
                    for b in start..start + count {
                        model.insert(b, Loc::Hole);
                    }
                }
                2 => {
                    m.set(start, count, Loc::Zeros);
                    for b in start..start + count {
                        model.insert(b, Loc::Zeros);
                    }
                }
                _ => {
                    // Sometimes continue the previous write in the journal, as appends do.
                    let at = journal;
                    journal += count * BLOCK;
                    m.set(start, count, Loc::Journal(at));
                    for k in 0..count {
                        model.insert(start + k, Loc::Journal(at + k * BLOCK));
                    }
                }
            }
            let allocated = model.values().filter(|l| **l != Loc::Hole).count() as u64;
            assert_eq!(m.allocated_blocks(), allocated);
        }
        for b in 0..220 {
            assert_eq!(m.get(b).map(|(l, _)| l), model_get(&model, b), "block {b}");
            let next_model = model.range(b..).next().map(|(&k, _)| k);
            assert_eq!(m.next_mapped(b), next_model, "next from {b}");
            if let Some((loc, run)) = m.get(b) {
                for k in 0..run {
                    assert_eq!(model_get(&model, b + k), Some(loc.advanced(k)));
                }
            }
        }
        // Merged as far as it goes: no two extents that continue each other.
        let all: Vec<_> = m.extents().collect();
        for w in all.windows(2) {
            let (s, c, l) = w[0];
            assert!(!(s + c == w[1].0 && l.advanced(c) == w[1].2), "{w:?}");
        }
    }
}
