//! A failback compares only what may differ (docs/PEER.md, "Divergence"),
//! and that is enough: with real captures on disk, every byte written on
//! the old owner that the new owner never acknowledged, and every byte the
//! new owner wrote since its fork, lies inside the ranges the new owner's
//! resync hands out for the returning old owner — whatever the writes, the
//! acknowledgements, the periodic clears of the old owner's map, and
//! restarts of the new owner in between.
#![allow(clippy::unwrap_used)]
#![allow(clippy::cast_possible_truncation)] // test writes of at most 1 MiB

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use tandem_capture::{CaptureVolume, Event, GroupCapture};
use tandem_volume::RawImage;

const SIZE: u64 = 64 << 20;

fn open(dir: &Path, replica: &str) -> GroupCapture {
    let image = Arc::new(RawImage::open_or_create(&dir.join("v.img"), SIZE).unwrap());
    GroupCapture::open(
        &dir.join("capture"),
        "g",
        vec![CaptureVolume {
            name: "v".into(),
            image,
        }],
        &[false],
        &[replica.to_string()],
        16 << 20,
    )
    .unwrap()
}

fn covered(ranges: &[(u64, u64)], offset: u64, len: u64) -> bool {
    // Ranges are merged and sorted: one must hold the whole write.
    ranges
        .iter()
        .any(|&(o, l)| o <= offset && offset + len <= o + l)
}

prop_compose! {
    fn write()(offset in 0..SIZE - 4096, len in 1u64..(1 << 20)) -> (u64, u64) {
        (offset, len.min(SIZE - offset))
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn every_write_after_the_fork_on_either_side_is_compared(
        old_writes in proptest::collection::vec(write(), 1..30),
        acked in 0usize..30,
        clears in 0usize..3,
        new_writes in proptest::collection::vec(write(), 0..30),
        restart_new in any::<bool>(),
    ) {
        let a_dir = tempfile::tempdir().unwrap();
        let b_dir = tempfile::tempdir().unwrap();
        // The old owner "a", replicated to "b".
        let a = open(a_dir.path(), "b");
        let mut seqs = Vec::new();
        for &(offset, len) in &old_writes {
            seqs.push(a.write(0, offset, &vec![1; len as usize], false).unwrap());
        }
        // b acknowledged a prefix: its fork point.
        let acked = acked.min(seqs.len());
        let fork = if acked == 0 { 0 } else { seqs[acked - 1] };
        a.ack("b", fork).unwrap();
        for _ in 0..clears {
            a.clear_cold().unwrap();
        }
        let diverged = a.dirty_ranges();
        drop(a);

        // The new owner "b" starts a new history after the fork.
        std::fs::create_dir_all(b_dir.path().join("capture")).unwrap();
        tandem_capture::seq::SeqAllocator::create_from(&b_dir.path().join("capture").join("seq"), fork + 1).unwrap();
        let mut b = open(b_dir.path(), "a");
        for &(offset, len) in &new_writes {
            b.write(0, offset, &vec![2; len as usize], false).unwrap();
        }
        if restart_new {
            drop(b);
            b = open(b_dir.path(), "a");
        }
        // "a" returns with its map.
        b.owe_ranges("a", &diverged).unwrap();
        let mut compared: Vec<(u64, u64)> = Vec::new();
        loop {
            match b.next_event("a", Duration::ZERO).unwrap() {
                Some(Event::Resync { ranges, resume_at, more }) => {
                    compared.extend(ranges[0].iter().copied());
                    b.resync_done("a", resume_at).unwrap();
                    if more == 0 {
                        break;
                    }
                }
                other => panic!("expected a resync, got {other:?}"),
            }
        }
        compared.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (o, l) in compared {
            match merged.last_mut() {
                Some(last) if last.0 + last.1 >= o => last.1 = last.1.max(o + l - last.0),
                _ => merged.push((o, l)),
            }
        }
        for &(offset, len) in old_writes.iter().skip(acked).chain(&new_writes) {
            prop_assert!(covered(&merged, offset, len), "write {offset}+{len} not compared: {merged:?}");
        }
        // Not the whole volume, unless the writes touched it all.
        let total: u64 = merged.iter().map(|r| r.1).sum();
        let touched: std::collections::BTreeSet<u64> = old_writes
            .iter()
            .chain(&new_writes)
            .flat_map(|&(o, l)| (o >> 22)..=((o + l - 1) >> 22))
            .collect();
        prop_assert!(total <= touched.len() as u64 * (4 << 20), "{total} compared for {} regions written", touched.len());
    }
}
