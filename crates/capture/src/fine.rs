//! Fine-grained dirty ranges (4 KiB blocks) kept in memory for a replica
//! whose queued records were dropped. Sparse: 128 bytes per touched 4 MiB
//! region.

use std::collections::BTreeMap;

use crate::dirty::{REGION_SHIFT, REGION_SIZE};

pub const BLOCK_SHIFT: u32 = 12;
pub const BLOCK_SIZE: u64 = 1 << BLOCK_SHIFT;
/// Blocks in a region.
const PER_REGION: u64 = REGION_SIZE >> BLOCK_SHIFT;
const WORDS: usize = (REGION_SIZE >> BLOCK_SHIFT) as usize / 64;

/// Past this many partly dirty regions (about 10 MiB of bitmaps), they are
/// widened to whole regions: memory stays bounded, at the cost of comparing
/// more later.
const MAX_FINE_REGIONS: usize = 1 << 16;

/// Dirty 4 KiB blocks of one volume, plus whole dirty regions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FineDirty {
    regions: BTreeMap<u64, Box<[u64; WORDS]>>,
    /// Regions dirty as a whole (bitset, grown on demand).
    whole: Vec<u64>,
}

impl FineDirty {
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty() && self.whole.iter().all(|w| *w == 0)
    }

    fn is_whole(&self, region: u64) -> bool {
        self.whole
            .get((region / 64) as usize)
            .is_some_and(|w| w & (1 << (region % 64)) != 0)
    }

    /// Marks all of region `region` (4 MiB).
    pub fn add_region(&mut self, region: u64) {
        let w = (region / 64) as usize;
        if self.whole.len() <= w {
            self.whole.resize(w + 1, 0);
        }
        self.whole[w] |= 1 << (region % 64);
        self.regions.remove(&region);
    }

    /// Marks every block touched by `[offset, offset + len)`.
    pub fn add(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset >> BLOCK_SHIFT;
        let last = (offset + len - 1) >> BLOCK_SHIFT;
        let mut block = first;
        while block <= last {
            let region = block / PER_REGION;
            let region_last = ((region + 1) * PER_REGION - 1).min(last);
            if self.is_whole(region) {
                block = region_last + 1;
                continue;
            }
            let words = self
                .regions
                .entry(region)
                .or_insert_with(|| Box::new([0; WORDS]));
            for b in block..=region_last {
                let i = (b % PER_REGION) as usize;
                words[i / 64] |= 1 << (i % 64);
            }
            block = region_last + 1;
        }
        if self.regions.len() > MAX_FINE_REGIONS {
            let partial: Vec<u64> = self.regions.keys().copied().collect();
            for region in partial {
                self.add_region(region);
            }
        }
    }

    /// Adds everything dirty in `other`.
    pub fn merge(&mut self, other: &FineDirty) {
        for region in other.whole_regions() {
            self.add_region(region);
        }
        for (&region, words) in &other.regions {
            if self.is_whole(region) {
                continue;
            }
            let mine = self
                .regions
                .entry(region)
                .or_insert_with(|| Box::new([0; WORDS]));
            for (m, o) in mine.iter_mut().zip(words.iter()) {
                *m |= o;
            }
        }
    }

    /// Moves the first `max` regions (4 MiB) with anything dirty, in
    /// region order, into a set of their own: a resync's next part.
    pub fn split_off_regions(&mut self, max: usize) -> FineDirty {
        let mut part = FineDirty::default();
        let whole: Vec<u64> = self.whole_regions().collect();
        let mut whole = whole.into_iter().peekable();
        let mut partial = self
            .regions
            .keys()
            .copied()
            .collect::<Vec<_>>()
            .into_iter()
            .peekable();
        for _ in 0..max {
            let take_whole = match (whole.peek(), partial.peek()) {
                (Some(w), Some(p)) => w < p,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            if take_whole {
                let Some(region) = whole.next() else { break };
                self.whole[(region / 64) as usize] &= !(1 << (region % 64));
                part.add_region(region);
            } else {
                let Some(region) = partial.next() else { break };
                if let Some(words) = self.regions.remove(&region) {
                    part.regions.insert(region, words);
                }
            }
        }
        part
    }

    /// Regions (4 MiB) with anything dirty.
    pub fn region_count(&self) -> usize {
        self.whole_regions().count() + self.regions.len()
    }

    /// Whether any block of region `region` (4 MiB) is dirty.
    pub fn touches_region(&self, region: u64) -> bool {
        self.is_whole(region) || self.regions.contains_key(&region)
    }

    /// Merged `(offset, len)` ranges of dirty blocks, clipped to `size`.
    pub fn ranges(&self, size: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut push = |start: u64, end: u64| match out.last_mut() {
            Some(last) if last.0 + last.1 == start => last.1 = end - last.0,
            _ => out.push((start, end - start)),
        };
        let mut whole = self.whole_regions().peekable();
        for (&region, words) in &self.regions {
            while let Some(w) = whole.next_if(|&w| w < region) {
                let start = w << REGION_SHIFT;
                if start < size {
                    push(start, ((w + 1) << REGION_SHIFT).min(size));
                }
            }
            let base = region << REGION_SHIFT;
            for (w, &word) in words.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let i = bits.trailing_zeros() as u64;
                    bits &= bits - 1;
                    let start = base + ((w as u64 * 64 + i) << BLOCK_SHIFT);
                    if start >= size {
                        continue;
                    }
                    push(start, (start + BLOCK_SIZE).min(size));
                }
            }
        }
        for w in whole {
            let start = w << REGION_SHIFT;
            if start < size {
                push(start, ((w + 1) << REGION_SHIFT).min(size));
            }
        }
        out
    }

    fn whole_regions(&self) -> impl Iterator<Item = u64> + '_ {
        self.whole.iter().enumerate().flat_map(|(i, &word)| {
            let mut bits = word;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                Some(i as u64 * 64 + b)
            })
        })
    }

    /// Bytes covered by dirty blocks.
    pub fn dirty_bytes(&self) -> u64 {
        let blocks: u64 = self
            .regions
            .values()
            .flat_map(|w| w.iter())
            .map(|w| u64::from(w.count_ones()) * BLOCK_SIZE)
            .sum();
        blocks + self.whole_regions().count() as u64 * REGION_SIZE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges_merge_across_regions() {
        let mut d = FineDirty::default();
        d.add(REGION_SIZE - 4096, 8192);
        d.add(1, 1);
        assert_eq!(
            d.ranges(u64::MAX),
            vec![(0, 4096), (REGION_SIZE - 4096, 8192)]
        );
        assert_eq!(d.dirty_bytes(), 3 * 4096);
    }

    #[test]
    fn whole_regions_absorb_blocks_and_merge_with_neighbours() {
        let mut d = FineDirty::default();
        d.add(REGION_SIZE + 4096, 4096);
        d.add_region(1);
        d.add(REGION_SIZE, 10); // inside a whole region: no bitmap
        d.add(2 * REGION_SIZE, 4096);
        assert_eq!(d.ranges(u64::MAX), vec![(REGION_SIZE, REGION_SIZE + 4096)]);
        assert!(d.touches_region(1) && d.touches_region(2) && !d.touches_region(0));
    }

    proptest! {
        #[test]
        fn covers_exactly_the_touched_blocks(writes in proptest::collection::vec((0u64..(3 << 22), 1u64..300_000), 1..20)) {
            let size = 4u64 << 22;
            let block = |offset: u64| usize::try_from(offset / BLOCK_SIZE).expect("a 16 MiB volume's block");
            let mut d = FineDirty::default();
            let mut model = vec![false; block(size)];
            for &(off, len) in &writes {
                let len = len.min(size - off);
                d.add(off, len);
                model[block(off)..=block(off + len - 1)].fill(true);
            }
            let mut got = vec![false; model.len()];
            for (off, len) in d.ranges(size) {
                for g in &mut got[block(off)..block(off + len)] {
                    prop_assert!(!*g, "block listed twice");
                    *g = true;
                }
            }
            prop_assert_eq!(got, model);
        }
    }

    #[test]
    fn a_part_takes_the_first_regions_and_leaves_the_rest() {
        let size = 64 * REGION_SIZE;
        let mut d = FineDirty::default();
        d.add_region(1);
        d.add(2 * REGION_SIZE + 4096, 4096);
        d.add_region(5);
        d.add(9 * REGION_SIZE, 8192);
        let all = d.ranges(size);
        let first = d.split_off_regions(2);
        assert_eq!(
            first.ranges(size),
            vec![(REGION_SIZE, REGION_SIZE), (2 * REGION_SIZE + 4096, 4096)]
        );
        let second = d.split_off_regions(5);
        assert!(d.is_empty());
        let mut back = first.clone();
        back.merge(&second);
        assert_eq!(back.ranges(size), all);
        assert!(d.split_off_regions(3).is_empty());
    }
}
