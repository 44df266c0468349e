//! Byte ranges of a volume mapped to where their content is: non-
//! overlapping `[start, end)` intervals, each with a value.

use std::collections::BTreeMap;

/// Non-overlapping intervals with values.
#[derive(Clone, Debug, Default)]
pub struct RangeMap<V> {
    /// start -> (end, value)
    map: BTreeMap<u64, (u64, V)>,
}

impl<V: Clone> RangeMap<V> {
    pub fn new() -> RangeMap<V> {
        RangeMap {
            map: BTreeMap::new(),
        }
    }

    pub fn clear(&mut self) {
        self.map.clear();
    }

    /// Whether any interval meets `[start, end)` (one lookup).
    pub fn touches(&self, start: u64, end: u64) -> bool {
        start < end
            && self
                .map
                .range(..end)
                .next_back()
                .is_some_and(|(_, (e, _))| *e > start)
    }

    /// The covered pieces of `[start, end)`, in order: (start, end, value
    /// of the interval that covers it, that interval's start).
    pub fn covered(&self, start: u64, end: u64) -> Vec<(u64, u64, V, u64)> {
        let mut out = Vec::new();
        self.covered_into(start, end, &mut out);
        out
    }

    /// [`RangeMap::covered`] into `out` (cleared first), which keeps its
    /// allocation from one call to the next.
    pub fn covered_into(&self, start: u64, end: u64, out: &mut Vec<(u64, u64, V, u64)>) {
        out.clear();
        if start >= end {
            return;
        }
        // The interval that may begin before `start`.
        if let Some((&s, (e, v))) = self.map.range(..start).next_back() {
            if *e > start {
                out.push((start, (*e).min(end), v.clone(), s));
            }
        }
        for (&s, (e, v)) in self.map.range(start..end) {
            out.push((s, (*e).min(end), v.clone(), s));
        }
    }

    /// The parts of `[start, end)` no interval covers, in order.
    pub fn gaps(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = start;
        for (s, e, _, _) in self.covered(start, end) {
            if s > at {
                out.push((at, s));
            }
            at = e;
        }
        if at < end {
            out.push((at, end));
        }
        out
    }

    /// Maps `[start, end)` to `value` where nothing covers it yet (the
    /// first value of a byte wins). Returns the pieces it filled.
    pub fn fill(&mut self, start: u64, end: u64, value: V) -> Vec<(u64, u64)> {
        let gaps = self.gaps(start, end);
        for &(s, e) in &gaps {
            self.map.insert(s, (e, value.clone()));
        }
        gaps
    }

    /// Maps `[start, end)`, which meets no interval ([`RangeMap::touches`]
    /// said so), to `value`: one insertion, no lookup before it.
    pub fn insert_apart(&mut self, start: u64, end: u64, value: V) {
        debug_assert!(
            !self.touches(start, end),
            "{start}..{end} meets an interval"
        );
        if start < end {
            self.map.insert(start, (end, value));
        }
    }

    /// Maps `[start, end)` to `value`, replacing what covered it (the
    /// last value of a byte wins); intervals cut by it keep their value
    /// on either side (values say where their bytes are in absolute
    /// terms, so a cut piece keeps the value unchanged).
    pub fn overwrite(&mut self, start: u64, end: u64, value: V) {
        if start >= end {
            return;
        }
        if !self.touches(start, end) {
            self.map.insert(start, (end, value));
            return;
        }
        // Cut an interval that straddles `start`.
        if let Some((&s, &(e, ref v))) = self.map.range(..start).next_back() {
            if e > start {
                let v = v.clone();
                if e > end {
                    self.map.insert(end, (e, v.clone()));
                }
                self.map.insert(s, (start, v));
            }
        }
        // Remove what begins inside, keeping the part of the last one
        // past `end`.
        while let Some((&s, _)) = self.map.range(start..end).next() {
            if let Some((e, v)) = self.map.remove(&s) {
                if e > end {
                    self.map.insert(end, (e, v));
                }
            }
        }
        self.map.insert(start, (end, value));
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // small test values
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A model: one value per byte of a small space.
    fn check(map: &RangeMap<(u32, u64)>, model: &[Option<(u32, u64)>]) {
        let mut seen = vec![None; model.len()];
        for (s, e, (id, origin), _) in map.covered(0, model.len() as u64) {
            for b in s..e {
                // The value names the write and where it began: each byte
                // knows its offset within that write.
                seen[b as usize] = Some((id, origin));
            }
        }
        assert_eq!(seen, model);
    }

    proptest! {
        #[test]
        fn fill_keeps_the_first_and_overwrite_the_last(
            ops in prop::collection::vec((any::<bool>(), 0u64..200, 1u64..60), 1..40),
            queries in prop::collection::vec((0u64..260, 0u64..40), 0..20),
        ) {
            let mut first: RangeMap<(u32, u64)> = RangeMap::new();
            let mut apart: RangeMap<(u32, u64)> = RangeMap::new();
            let mut apart_model = vec![None; 260];
            let mut last: RangeMap<(u32, u64)> = RangeMap::new();
            let mut first_model = vec![None; 260];
            let mut last_model = vec![None; 260];
            for (id, (_, start, len)) in ops.iter().enumerate() {
                let id = id as u32;
                let end = start + len;
                first.fill(*start, end, (id, *start));
                last.overwrite(*start, end, (id, *start));
                if !apart.touches(*start, end) {
                    apart.insert_apart(*start, end, (id, *start));
                    apart_model[*start as usize..end as usize].fill(Some((id, *start)));
                }
                for b in *start..end {
                    if first_model[b as usize].is_none() {
                        first_model[b as usize] = Some((id, *start));
                    }
                    last_model[b as usize] = Some((id, *start));
                }
            }
            check(&first, &first_model);
            check(&last, &last_model);
            check(&apart, &apart_model);
            // A query touches the map where a byte of it is mapped.
            for (start, len) in queries {
                let end = (start + len).min(260);
                let mapped = last_model[start as usize..end as usize]
                    .iter()
                    .any(Option::is_some);
                prop_assert_eq!(last.touches(start, end), mapped);
            }
            // Gaps are exactly the unmapped bytes.
            for (s, e) in first.gaps(0, 260) {
                for b in s..e {
                    prop_assert!(first_model[b as usize].is_none());
                }
            }
        }
    }
}
