//! The undo history (docs/HISTORY.md): every listed point reads back as
//! exactly the prefix of the records up to it (G10), views do not move
//! while more records are applied, and a crash in the middle of a commit
//! is rolled back to the last synced position (H3, H5).
#![allow(clippy::unwrap_used)]
#![allow(clippy::cast_possible_truncation)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use tandem_replication::history::{PointChoice, Retention};
use tandem_replication::journal::{Entry, RecordOp};
use tandem_replication::replica::{ReplicaGroup, ReplicaOptions, ReplicaVolume};
use tandem_volume::RawImage;

const SIZE: u64 = 256 << 10;
const VOLUMES: usize = 2;

fn options() -> ReplicaOptions {
    ReplicaOptions {
        history: Some(Retention {
            keep: Duration::from_secs(24 * 3600),
            max_bytes: 10 << 30,
        }),
    }
}

fn open(dir: &Path) -> ReplicaGroup {
    open_with(dir, options())
}

fn open_with(dir: &Path, options: ReplicaOptions) -> ReplicaGroup {
    let volumes = (0..VOLUMES)
        .map(|i| ReplicaVolume {
            name: format!("v{i}"),
            image: Arc::new(
                RawImage::open_or_create(&dir.join(format!("v{i}.img")), SIZE).unwrap(),
            ),
        })
        .collect();
    ReplicaGroup::open_with(&dir.join("replica"), "g", volumes, options).unwrap()
}

/// A group keeping `keep` and at most `max_bytes` of history, made
/// consistent.
fn open_capped(dir: &Path, keep: Duration, max_bytes: u64) -> ReplicaGroup {
    synced(open_with(
        dir,
        ReplicaOptions {
            history: Some(Retention { keep, max_bytes }),
        },
    ))
}

/// A new replica made consistent (an empty resync): marks make points
/// only on a prefix.
fn open_synced(dir: &Path) -> ReplicaGroup {
    synced(open(dir))
}

/// `g` after an empty resync of epoch 1: consistent.
fn synced(mut g: ReplicaGroup) -> ReplicaGroup {
    g.set_epoch(1).unwrap();
    g.begin_resync(1, 1).unwrap();
    g.end_resync(1).unwrap();
    assert!(g.position().consistent);
    g
}

#[derive(Clone, Debug)]
enum Step {
    Write {
        volume: u32,
        offset: u64,
        len: u64,
    },
    Zero {
        volume: u32,
        offset: u64,
        len: u64,
        trim: bool,
    },
    Flush,
    Mark,
    Commit,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..VOLUMES as u32, 0u64..SIZE / 512, 1u64..64).prop_map(|(volume, o, n)| {
            let offset = o * 512;
            Step::Write { volume, offset, len: (n * 512).min(SIZE - offset) }
        }),
        1 => (0..VOLUMES as u32, 0u64..SIZE / 4096, 1u64..16, any::<bool>()).prop_map(|(volume, o, n, trim)| {
            let offset = o * 4096;
            Step::Zero { volume, offset, len: (n * 4096).min(SIZE - offset), trim }
        }),
        1 => Just(Step::Flush),
        2 => Just(Step::Mark),
        2 => Just(Step::Commit),
    ]
}

/// Feeds `steps` from seq `first`; returns the model after each seq
/// (index = seq) appended to `models`, and the seqs that were marked.
fn feed(
    g: &mut ReplicaGroup,
    steps: &[Step],
    models: &mut Vec<Vec<Vec<u8>>>,
    marked: &mut Vec<u64>,
) {
    for s in steps {
        let seq = models.len() as u64;
        let mut m = models.last().unwrap().clone();
        let entry = match *s {
            Step::Write {
                volume,
                offset,
                len,
            } => {
                let data: Vec<u8> = (0..len).map(|i| (seq as u8) ^ (i as u8) | 1).collect();
                m[volume as usize][offset as usize..(offset + len) as usize].copy_from_slice(&data);
                Some(Entry {
                    epoch: 1,
                    seq,
                    volume,
                    op: RecordOp::Write,
                    fua: false,
                    offset,
                    len,
                    data,
                })
            }
            Step::Zero {
                volume,
                offset,
                len,
                trim,
            } => {
                m[volume as usize][offset as usize..(offset + len) as usize].fill(0);
                let op = if trim {
                    RecordOp::Trim
                } else {
                    RecordOp::WriteZeroes
                };
                Some(Entry {
                    epoch: 1,
                    seq,
                    volume,
                    op,
                    fua: false,
                    offset,
                    len,
                    data: Vec::new(),
                })
            }
            Step::Flush => Some(Entry {
                epoch: 1,
                seq,
                volume: 0,
                op: RecordOp::Flush,
                fua: false,
                offset: 0,
                len: 0,
                data: Vec::new(),
            }),
            Step::Mark => {
                let last = seq - 1;
                if last > 0 && marked.last() != Some(&last) {
                    g.mark(last, 1_000_000 + last);
                    marked.push(last);
                }
                None
            }
            Step::Commit => {
                g.commit().unwrap();
                None
            }
        };
        if let Some(e) = entry {
            g.receive(&e).unwrap();
            models.push(m);
        }
    }
    g.commit().unwrap();
}

fn check_points(
    g: &ReplicaGroup,
    models: &[Vec<Vec<u8>>],
    marked: &[u64],
) -> Vec<tandem_replication::history::PointView> {
    let history = g.history().unwrap();
    let points = history.points();
    let seqs: Vec<u64> = points.iter().map(|p| p.seq).collect();
    assert_eq!(seqs, marked, "every mark is a point, in order");
    let mut views = Vec::new();
    for p in points {
        assert_eq!(p.time_ms, 1_000_000 + p.seq);
        let view = history.open_view(p).unwrap();
        for (v, want) in models[p.seq as usize].iter().enumerate() {
            let mut got = vec![0u8; SIZE as usize];
            view.read(v as u32, 0, &mut got).unwrap();
            assert!(got == *want, "point {} volume {v} is the prefix", p.seq);
        }
        views.push(view);
    }
    views
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn every_point_is_the_prefix_up_to_it_and_stays_so(
        first in prop::collection::vec(step(), 1..120),
        more in prop::collection::vec(step(), 1..120),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut g = open_synced(dir.path());
        let mut models = vec![vec![vec![0u8; SIZE as usize]; VOLUMES]];
        let mut marked = Vec::new();
        feed(&mut g, &first, &mut models, &mut marked);
        let views = check_points(&g, &models, &marked);
        // More records: the open views do not move.
        feed(&mut g, &more, &mut models, &mut marked);
        for view in &views {
            let p = view.point();
            for (v, want) in models[p.seq as usize].iter().enumerate() {
                let mut got = vec![0u8; SIZE as usize];
                view.read(v as u32, 0, &mut got).unwrap();
                prop_assert!(got == *want, "view of {} moved", p.seq);
            }
        }
        drop(views);
        check_points(&g, &models, &marked);
        // The latest image is the latest model.
        let last = models.last().unwrap();
        drop(g);
        for (v, want) in last.iter().enumerate() {
            let got = std::fs::read(dir.path().join(format!("v{v}.img"))).unwrap();
            prop_assert!(got == *want);
        }
        // And the points survive a restart.
        let g = open(dir.path());
        check_points(&g, &models, &marked);
    }
}

#[test]
fn the_latest_point_and_a_time_choose_points() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = open_synced(dir.path());
    let mut models = vec![vec![vec![0u8; SIZE as usize]; VOLUMES]];
    let mut marked = Vec::new();
    let steps: Vec<Step> = (0..10)
        .flat_map(|i| {
            [
                Step::Write {
                    volume: 0,
                    offset: i * 4096,
                    len: 4096,
                },
                Step::Mark,
            ]
        })
        .collect();
    feed(&mut g, &steps, &mut models, &mut marked);
    let h = g.history().unwrap();
    assert_eq!(h.choose(PointChoice::Latest).unwrap().seq, 10);
    assert_eq!(h.choose(PointChoice::AtOrBefore(1_000_004)).unwrap().seq, 4);
    assert_eq!(
        h.choose(PointChoice::AtOrBefore(1_000_004 - 1))
            .unwrap()
            .seq,
        3
    );
    assert!(h.choose(PointChoice::AtOrBefore(5)).is_err());
    let s = h.summary();
    assert_eq!(
        (s.count, s.oldest.unwrap().seq, s.newest.unwrap().seq),
        (10, 1, 10)
    );
    assert!(s.bytes > 0);
}

/// A crash after a commit's undo entries were synced and while its
/// records were reaching the image: the next open rolls the image back
/// to what the state says it holds (H3, H5), and a crash without
/// anything past the synced end leaves the image alone.
#[test]
fn a_commit_cut_short_by_a_crash_is_rolled_back_at_open() {
    use tandem_replication::history::undo::{self, Change, Encoded};
    let dir = tempfile::tempdir().unwrap();
    let mut models = vec![vec![vec![0u8; SIZE as usize]; VOLUMES]];
    let mut marked = Vec::new();
    {
        let mut g = open_synced(dir.path());
        let steps: Vec<Step> = (0..6)
            .flat_map(|i| {
                [
                    Step::Write {
                        volume: (i % 2) as u32,
                        offset: i * 8192,
                        len: 8192,
                    },
                    Step::Mark,
                ]
            })
            .collect();
        feed(&mut g, &steps, &mut models, &mut marked);
        // The crash: a commit's undo entries are synced, part of its
        // record reached the image, the state was not written.
        let h = g.history().unwrap();
        let image = Arc::clone(&g.volumes()[0].image);
        let data = vec![0xabu8; 20_000];
        let change = Change {
            epoch: 1,
            seq: 7,
            volume: 0,
            offset: 1000,
            len: 20_000,
            data: &data,
            zero: false,
        };
        let other = Arc::clone(&g.volumes()[1].image);
        let mut enc = Encoded::default();
        undo::build(&[&*image, &*other], &[change], &[], &mut enc).unwrap();
        h.append(&enc).unwrap();
        h.sync().unwrap();
        image.write(1000, &data[..9000]).unwrap();
        image.sync().unwrap();
    }
    let g = open(dir.path());
    assert_eq!(g.position().applied, 6);
    for (v, want) in models[6].iter().enumerate() {
        let got = std::fs::read(dir.path().join(format!("v{v}.img"))).unwrap();
        assert!(got == *want, "volume {v} is back at seq 6");
    }
    check_points(&g, &models, &marked);
    drop(g);
    // Opened again with nothing to roll back: the same.
    let g = open(dir.path());
    check_points(&g, &models, &marked);
    let got = std::fs::read(dir.path().join("v0.img")).unwrap();
    assert!(got == models[6][0]);
}

/// History off (`retention = "0s"`) removes a history left from before.
#[test]
fn turning_history_off_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut g = open_synced(dir.path());
        let mut models = vec![vec![vec![0u8; SIZE as usize]; VOLUMES]];
        let mut marked = Vec::new();
        feed(
            &mut g,
            &[
                Step::Write {
                    volume: 0,
                    offset: 0,
                    len: 512,
                },
                Step::Mark,
            ],
            &mut models,
            &mut marked,
        );
        assert_eq!(g.history().unwrap().points().len(), 1);
    }
    assert!(dir.path().join("replica/history").exists());
    let volumes = (0..VOLUMES)
        .map(|i| ReplicaVolume {
            name: format!("v{i}"),
            image: Arc::new(
                RawImage::open_or_create(&dir.path().join(format!("v{i}.img")), SIZE).unwrap(),
            ),
        })
        .collect();
    let g = ReplicaGroup::open_with(
        &dir.path().join("replica"),
        "g",
        volumes,
        ReplicaOptions::default(),
    )
    .unwrap();
    assert!(g.history().is_none());
    assert!(!dir.path().join("replica/history").exists());
    assert_eq!(g.position().applied, 1);
}

/// `roll_back_to` a point: the images are exactly that point's prefix,
/// the points after it are gone, the ones before it still read as their
/// prefixes, and what changed since the point was told first.
#[test]
fn rolling_back_to_a_point_restores_its_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = open_synced(dir.path());
    let mut models = vec![vec![vec![0u8; SIZE as usize]; VOLUMES]];
    let mut marked = Vec::new();
    let steps: Vec<Step> = (0..12)
        .flat_map(|i| {
            [
                Step::Write {
                    volume: (i % 2) as u32,
                    offset: (i % 5) * 12288,
                    len: 12288,
                },
                Step::Mark,
            ]
        })
        .collect();
    feed(&mut g, &steps, &mut models, &mut marked);
    let h = g.history().unwrap();
    let p = h.points().into_iter().find(|p| p.seq == 5).unwrap();
    let changed = h.changed_since(p).unwrap();
    // Writes 6..=12 touched offsets (i % 5) * 12288 for i in 5..12 on both volumes.
    assert!(changed
        .iter()
        .all(|&(_, o, l)| o % 12288 == 0 && l % 12288 == 0));
    // seqs 6..=12 wrote seven distinct (volume, offset) places.
    assert_eq!(changed.iter().map(|c| c.2).sum::<u64>(), 7 * 12288);
    g.roll_back_to(p).unwrap();
    for (v, want) in models[5].iter().enumerate() {
        let got = std::fs::read(dir.path().join(format!("v{v}.img"))).unwrap();
        assert!(got == *want, "volume {v} is the prefix up to 5");
    }
    assert_eq!(g.position().applied, 5);
    models.truncate(6);
    marked.retain(|s| *s <= 5);
    check_points(&g, &models, &marked);
    // A new history goes on from the point, and survives a restart.
    feed(&mut g, &steps[..6], &mut models, &mut marked);
    check_points(&g, &models, &marked);
    drop((g, h));
    let g = open(dir.path());
    check_points(&g, &models, &marked);
}

/// `history_max`: past it the oldest segments go with their points, and
/// nothing else: every point left still reads as its prefix, the newest
/// is kept, the images hold the latest records, and nothing waits.
#[test]
fn the_byte_cap_drops_the_oldest_points_and_nothing_else() {
    const RECORDS: u64 = 800; // 800 x 256 KiB of old data: 200 MiB of log
    let dir = tempfile::tempdir().unwrap();
    let cap = 100 << 20;
    let mut g = open_capped(dir.path(), Duration::from_secs(24 * 3600), cap);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for seq in 1..=RECORDS {
        g.receive(&Entry {
            epoch: 1,
            seq,
            volume: 0,
            op: RecordOp::Write,
            fua: false,
            offset: 0,
            len: SIZE,
            data: vec![seq as u8; SIZE as usize],
        })
        .unwrap();
        // Recent times: retention (24 h) keeps them all, only the cap
        // drops.
        g.mark(seq, now + seq);
        if seq % 10 == 0 {
            g.commit().unwrap();
        }
    }
    g.commit().unwrap();
    let h = g.history().unwrap();
    let s = h.summary();
    assert!(
        s.bytes <= cap + (64 << 20),
        "the log ({} bytes) is within the cap and one segment",
        s.bytes
    );
    assert!(s.dropped_bytes > 0, "the cap dropped history");
    let points = h.points();
    assert_eq!(
        points.last().unwrap().seq,
        RECORDS,
        "the newest point is kept"
    );
    assert!(points.first().unwrap().seq > 1, "the oldest points went");
    // The points left are consecutive (only the oldest went), and each
    // still reads as its prefix.
    for w in points.windows(2) {
        assert_eq!(w[0].seq + 1, w[1].seq);
    }
    for p in points.iter().step_by(37).chain(points.last()) {
        let view = h.open_view(*p).unwrap();
        let mut got = vec![0u8; SIZE as usize];
        view.read(0, 0, &mut got).unwrap();
        assert!(
            got.iter().all(|b| *b == p.seq as u8),
            "point {} reads as its prefix",
            p.seq
        );
    }
    let got = std::fs::read(dir.path().join("v0.img")).unwrap();
    assert!(
        got.iter().all(|b| *b == RECORDS as u8),
        "the image holds the latest records"
    );
    assert_eq!(g.position().applied, RECORDS);
}

/// H6: a resync makes no points, so its images stay promotable at the
/// point from before it, however long it runs (past `retention`) and
/// however much it overwrites (past `history_max`); status says the log
/// is held over the cap, and a rollback to the point restores it.
#[test]
fn a_resync_never_loses_the_newest_point() {
    const CHUNK: u64 = 64 << 10;
    let dir = tempfile::tempdir().unwrap();
    let cap = 64 << 20;
    let mut g = open_capped(dir.path(), Duration::from_secs(3600), cap);
    // The point: two hours old, past `retention` (1 h).
    let old = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        - 2 * 3600 * 1000;
    g.receive(&Entry {
        epoch: 1,
        seq: 1,
        volume: 0,
        op: RecordOp::Write,
        fua: true,
        offset: 0,
        len: SIZE,
        data: vec![0xAA; SIZE as usize],
    })
    .unwrap();
    g.mark(1, old);
    g.commit().unwrap();
    let point = g.history().unwrap().latest().unwrap();
    assert_eq!(point.seq, 1);

    // A resync overwrites the volume again and again: 192 MiB of undo
    // data, three times the cap, with records streaming (each commit
    // trims).
    g.begin_resync(1, 2).unwrap();
    let mut seq = 1;
    for round in 0..(192 << 20) / SIZE {
        for off in (0..SIZE).step_by(CHUNK as usize) {
            g.write_chunk(0, off, &vec![round as u8 | 1; CHUNK as usize])
                .unwrap();
        }
        seq += 1;
        g.receive(&Entry {
            epoch: 1,
            seq,
            volume: 1,
            op: RecordOp::Write,
            fua: false,
            offset: 0,
            len: 4096,
            data: vec![seq as u8; 4096],
        })
        .unwrap();
        g.commit().unwrap();
    }
    let h = g.history().unwrap();
    let s = h.summary();
    assert!(s.bytes > cap, "the resync's undo data is all kept: {s:?}");
    assert!(s.held_over_cap, "status says the log is held over the cap");
    assert_eq!(h.points(), vec![point], "the point is still listed");
    assert!(!g.position().consistent, "the images are mid-resync");
    assert!(g.position().point, "and promotable at the point");

    g.roll_back_to(point).unwrap();
    let v0 = std::fs::read(dir.path().join("v0.img")).unwrap();
    assert!(v0.iter().all(|b| *b == 0xAA), "v0 is back at the point");
    let v1 = std::fs::read(dir.path().join("v1.img")).unwrap();
    assert!(v1.iter().all(|b| *b == 0), "v1 is back at the point");
}

/// H1's exception: a new replica's first sync (no point yet) writes no
/// undo data for its chunks (nothing could go back to them); once a point
/// exists, a resync's chunks are undoable again.
#[test]
fn a_first_sync_writes_no_undo_data_and_a_later_resync_does() {
    const CHUNK: usize = 64 << 10;
    let dir = tempfile::tempdir().unwrap();
    let mut g = open(dir.path());
    let h = g.history().unwrap();
    assert!(h.latest().is_none());
    g.begin_resync(1, 1).unwrap();
    for i in 0..SIZE / CHUNK as u64 {
        g.write_chunk(0, i * CHUNK as u64, &[0x11; CHUNK]).unwrap();
    }
    assert_eq!(h.end(), 0, "no undo data without a point");
    g.end_resync(1).unwrap();
    g.receive(&Entry {
        epoch: 1,
        seq: 1,
        volume: 0,
        op: RecordOp::Write,
        fua: true,
        offset: 0,
        len: 4096,
        data: vec![0x22; 4096],
    })
    .unwrap();
    g.mark(1, 0);
    g.commit().unwrap();
    let point = h.latest().expect("a point after the first sync");
    let end = h.end();

    g.begin_resync(1, 2).unwrap();
    g.write_chunk(0, 0, &[0x33; CHUNK]).unwrap();
    assert!(
        h.end() >= end + CHUNK as u64,
        "the chunk's old data is kept"
    );
    g.roll_back_to(point).unwrap();
    let v0 = std::fs::read(dir.path().join("v0.img")).unwrap();
    assert!(v0[..4096].iter().all(|b| *b == 0x22), "back at the point");
    assert!(v0[4096..].iter().all(|b| *b == 0x11));
}
