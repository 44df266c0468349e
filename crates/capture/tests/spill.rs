//! The queue's disk tier (docs/CAPTURE.md, "The replication queue on
//! disk"): a replica behind by more than `queue_memory` but less than
//! `max_queue` gets every record, in order, from the spill; past
//! `max_queue`, or when the spill fails or is damaged, it falls back to
//! dirty ranges and still converges; a restart deletes the spill.
#![allow(clippy::unwrap_used)]
#![allow(clippy::cast_possible_truncation)] // test lengths of a few MiB, a few volumes, bytes < 252

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use proptest::prelude::*;
use tandem_capture::{CaptureVolume, Event, GroupCapture, Op, QueueOptions};
use tandem_volume::RawImage;

const SIZE: u64 = 16 << 20;
const MEMORY: u64 = 256 << 10;
const SEGMENT: u64 = 1 << 20;
const NOW: Duration = Duration::ZERO;

/// A change as the primary made it.
type Change = (u64, u32, Op);
/// Ranges per volume.
type Ranges = Vec<Vec<(u64, u64)>>;

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn capture_dir(dir: &Path) -> PathBuf {
    dir.join("capture")
}

/// Waits until the spill writer has put a segment file's first `bytes`
/// on disk (it writes a file's blocks in order, whole).
fn on_disk(path: &Path, bytes: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::fs::metadata(path).unwrap().len() < bytes {
        assert!(
            std::time::Instant::now() < deadline,
            "{} not written within 30 s",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

fn spill_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(capture_dir(dir).join("spill")) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
    files.sort();
    files
}

fn open_group(dir: &Path, replicas: &[&str], options: QueueOptions) -> Arc<GroupCapture> {
    let volumes = (0..2)
        .map(|i| CaptureVolume {
            name: format!("v{i}"),
            image: Arc::new(
                RawImage::open_or_create(&dir.join(format!("v{i}.img")), SIZE).unwrap(),
            ),
        })
        .collect();
    let replicas: Vec<String> = replicas.iter().map(|r| r.to_string()).collect();
    let group = GroupCapture::open_with(
        &capture_dir(dir),
        "g",
        volumes,
        &[false, false],
        &replicas,
        options,
    )
    .unwrap();
    Arc::new(group)
}

fn spilling(max_queue: u64) -> QueueOptions {
    QueueOptions {
        segment_bytes: SEGMENT,
        ..QueueOptions::with_spill(MEMORY, max_queue)
    }
}

/// A replica's images, under `dir`.
struct Copy {
    files: Vec<File>,
    dir: PathBuf,
    name: String,
}

impl Copy {
    fn new(dir: &Path, name: &str) -> Copy {
        let files = (0..2)
            .map(|i| {
                let f = File::create(dir.join(format!("{name}{i}.img"))).unwrap();
                f.set_len(SIZE).unwrap();
                f
            })
            .collect();
        Copy {
            files,
            dir: dir.to_owned(),
            name: name.to_owned(),
        }
    }

    fn apply(&self, volume: u32, op: &Op) {
        let f = &self.files[volume as usize];
        match op {
            Op::Write { offset, data, .. } => f.write_all_at(data, *offset).unwrap(),
            Op::WriteZeroes { offset, len, .. } | Op::Trim { offset, len, .. } => {
                f.write_all_at(&vec![0u8; *len as usize], *offset).unwrap()
            }
            Op::Flush => {}
        }
    }

    /// Copies resync ranges from the primary.
    fn copy(&self, group: &GroupCapture, ranges: &[Vec<(u64, u64)>]) {
        for (v, list) in ranges.iter().enumerate() {
            for &(offset, len) in list {
                let mut buf = vec![0u8; len as usize];
                group.image(v).read(offset, &mut buf).unwrap();
                self.files[v].write_all_at(&buf, offset).unwrap();
            }
        }
    }

    fn assert_same_as_primary(&self) {
        for v in 0..2 {
            let primary = std::fs::read(self.dir.join(format!("v{v}.img"))).unwrap();
            let copy = std::fs::read(self.dir.join(format!("{}{v}.img", self.name))).unwrap();
            assert!(
                primary == copy,
                "{} volume {v} differs from the primary",
                self.name
            );
        }
    }
}

/// What one replica received.
#[derive(Default)]
struct Received {
    records: Vec<Change>,
    resyncs: Vec<(Ranges, u64)>,
}

/// Applies `replica`'s events to `copy` until none comes within `wait`,
/// acknowledging each; at most `limit` events.
fn drain(
    group: &GroupCapture,
    replica: &str,
    copy: &Copy,
    wait: Duration,
    limit: usize,
) -> Received {
    let mut got = Received::default();
    for _ in 0..limit {
        match group.next_event(replica, wait).unwrap() {
            Some(Event::Record(r)) => {
                copy.apply(r.volume, &r.op);
                group.ack(replica, r.seq).unwrap();
                got.records.push((r.seq, r.volume, r.op.clone()));
            }
            Some(Event::Resync {
                ranges, resume_at, ..
            }) => {
                copy.copy(group, &ranges);
                group.resync_done(replica, resume_at).unwrap();
                got.resyncs.push((ranges, resume_at));
            }
            None => break,
        }
    }
    got
}

/// A deterministic change to a hot 2 MiB area of a volume.
fn change(group: &GroupCapture, rng: &mut u64, max_write: u64) -> Change {
    let volume = (xorshift(rng) % 2) as usize;
    let offset = (xorshift(rng) % (2 << 20)) / 512 * 512;
    let len = 512 * (1 + xorshift(rng) % (max_write / 512));
    let (seq, op) = match xorshift(rng) % 12 {
        0 => (
            group
                .write_zeroes(volume, offset, len, false, false, false)
                .unwrap(),
            Op::WriteZeroes {
                offset,
                len,
                fua: false,
            },
        ),
        1 => (
            group.trim(volume, offset, len, true).unwrap(),
            Op::Trim {
                offset,
                len,
                fua: true,
            },
        ),
        2 => (group.flush(volume).unwrap(), Op::Flush),
        _ => {
            let data = vec![(xorshift(rng) % 251) as u8 + 1; len as usize];
            let seq = group.write(volume, offset, &data, false).unwrap();
            (
                seq,
                Op::Write {
                    offset,
                    data: data.into(),
                    fua: false,
                },
            )
        }
    };
    (seq, volume as u32, op)
}

fn change_bytes(changes: &[Change]) -> u64 {
    changes
        .iter()
        .map(|(_, _, op)| op.range().map_or(0, |(_, len)| len))
        .sum()
}

/// Bytes on disk (56-byte headers) and in memory (96 bytes of overhead)
/// are both below this per change plus its payload.
fn queue_bound(changes: &[Change]) -> u64 {
    changes
        .iter()
        .map(|(_, _, op)| {
            96 + match op {
                Op::Write { data, .. } => data.len() as u64,
                _ => 0,
            }
        })
        .sum()
}

#[test]
fn a_slow_replica_within_max_queue_gets_every_record_from_the_spill() {
    let dir = tempfile::tempdir().unwrap();
    let group = open_group(dir.path(), &["fast", "slow"], spilling(64 << 20));
    let (fast, slow) = (Copy::new(dir.path(), "fast"), Copy::new(dir.path(), "slow"));
    let mut rng = 0x5eed;
    let mut written = Vec::new();
    let mut fast_got = Vec::new();
    // The fast replica keeps up; the slow one reads nothing.
    for _ in 0..3000 {
        written.push(change(&group, &mut rng, 8 << 10));
        fast_got.extend(drain(&group, "fast", &fast, NOW, usize::MAX).records);
    }
    let bound = queue_bound(&written);
    assert!(bound > 4 * MEMORY && bound < 64 << 20, "{bound}");
    let stats = group.stats();
    assert!(stats.queued_bytes as u64 <= MEMORY, "{stats:?}");
    assert!(stats.spilled_bytes > 2 * SEGMENT, "{stats:?}");
    assert_eq!(stats.queued_records as u64 + stats.spilled_records, 3000);
    assert_eq!(stats.dropped_records, 0);
    assert!(spill_files(dir.path()).len() > 2);
    let lag = group.lag("slow").unwrap();
    assert_eq!(lag.bytes, change_bytes(&written));
    assert!(!lag.resyncing);
    assert_eq!(group.lag("fast").unwrap().bytes, 0);

    // Half of it, then the lag is exactly the other half.
    let first = drain(&group, "slow", &slow, NOW, 1500);
    assert_eq!(
        group.lag("slow").unwrap().bytes,
        change_bytes(&written[1500..])
    );
    assert!(
        group.stats().spilled_bytes < stats.spilled_bytes,
        "segments not deleted"
    );

    // Meanwhile the primary goes on, and the rest comes in order.
    for _ in 0..500 {
        written.push(change(&group, &mut rng, 8 << 10));
        fast_got.extend(drain(&group, "fast", &fast, NOW, usize::MAX).records);
    }
    let rest = drain(&group, "slow", &slow, NOW, usize::MAX);
    assert!(first.resyncs.is_empty() && rest.resyncs.is_empty());
    let slow_got: Vec<Change> = first.records.into_iter().chain(rest.records).collect();
    assert!(slow_got == written, "the slow replica's stream differs");
    assert!(fast_got == written, "the fast replica's stream differs");
    slow.assert_same_as_primary();
    fast.assert_same_as_primary();

    let stats = group.stats();
    assert_eq!((stats.spilled_bytes, stats.spilled_records), (0, 0));
    assert_eq!(stats.queued_records, 0);
    assert_eq!(stats.dropped_records, 0);
    assert!(spill_files(dir.path()).is_empty());
    assert_eq!(group.lag("slow").unwrap().bytes, 0);
    group.clear_replicated().unwrap();
    assert!(group.dirty_ranges().iter().all(Vec::is_empty));
}

#[test]
fn a_replica_rewound_into_the_spill_gets_the_records_again() {
    let dir = tempfile::tempdir().unwrap();
    let group = open_group(dir.path(), &["dr"], spilling(64 << 20));
    let copy = Copy::new(dir.path(), "dr");
    let mut rng = 7;
    let written: Vec<Change> = (0..1000)
        .map(|_| change(&group, &mut rng, 8 << 10))
        .collect();
    assert!(group.stats().spilled_records > 0);
    // Receives 600 records, but only 200 are durable when the link drops.
    let mut received = Vec::new();
    for _ in 0..600 {
        match group.next_event("dr", NOW).unwrap() {
            Some(Event::Record(r)) => received.push((r.seq, r.volume, r.op.clone())),
            other => panic!("expected a record, got {other:?}"),
        }
    }
    group.ack("dr", written[199].0).unwrap();
    group.rewind("dr").unwrap();
    assert_eq!(
        group.lag("dr").unwrap().bytes,
        change_bytes(&written[200..])
    );
    for (volume, op) in written[..200].iter().map(|(_, v, op)| (*v, op)) {
        copy.apply(volume, op);
    }
    let again = drain(&group, "dr", &copy, NOW, usize::MAX);
    assert!(again.resyncs.is_empty());
    assert!(
        again.records == written[200..],
        "the rewound stream differs"
    );
    assert!(received[..] == written[..600]);
    copy.assert_same_as_primary();
}

#[test]
fn concurrent_writers_and_a_slow_consumer_replay_through_the_spill() {
    let dir = tempfile::tempdir().unwrap();
    let group = open_group(dir.path(), &["dr"], spilling(256 << 20));
    let copy = Copy::new(dir.path(), "dr");
    let log = Arc::new(Mutex::new(Vec::new()));
    let write = |writers: u64, ops: u64| {
        let handles: Vec<_> = (0..writers)
            .map(|w| {
                let (group, log) = (Arc::clone(&group), Arc::clone(&log));
                thread::spawn(move || {
                    let mut rng = 0x1234_5678 + w * 7919;
                    for _ in 0..ops {
                        let c = change(&group, &mut rng, 16 << 10);
                        log.lock().unwrap().push(c);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    };
    // Far behind before it starts reading...
    write(4, 500);
    assert!(group.stats().spilled_bytes > 4 * MEMORY);
    // ...then reading while the writers go on.
    let done = Arc::new(AtomicBool::new(false));
    let consumer = {
        let (group, done) = (Arc::clone(&group), Arc::clone(&done));
        thread::spawn(move || {
            let mut all = Received::default();
            loop {
                // Read before draining: if the writers were done by then,
                // an idle drain means everything has arrived.
                let finished = done.load(Ordering::Acquire);
                let got = drain(&group, "dr", &copy, Duration::from_millis(20), 64);
                let idle = got.records.is_empty() && got.resyncs.is_empty();
                all.records.extend(got.records);
                all.resyncs.extend(got.resyncs);
                if idle && finished {
                    return (all, copy);
                }
            }
        })
    };
    write(4, 1500);
    done.store(true, Ordering::Release);
    let (got, copy) = consumer.join().unwrap();
    assert!(got.resyncs.is_empty(), "the queue overflowed");
    let mut written = log.lock().unwrap().clone();
    written.sort_by_key(|c| c.0);
    assert_eq!(got.records.len(), 8000);
    assert!(
        got.records == written,
        "the stream is not the primary's changes in order"
    );
    copy.assert_same_as_primary();
    assert_eq!(group.stats().dropped_records, 0);
    assert!(spill_files(dir.path()).is_empty());
}

/// The ranges a replica owes after missing `changes`, at 4 KiB granularity.
fn blocks_of(changes: &[Change]) -> Ranges {
    let mut blocks = vec![std::collections::BTreeSet::new(); 2];
    for (_, v, op) in changes {
        if let Some((offset, len)) = op.range() {
            for b in offset / 4096..(offset + len).div_ceil(4096) {
                blocks[*v as usize].insert(b);
            }
        }
    }
    blocks
        .iter()
        .map(|set| {
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            for &b in set {
                match ranges.last_mut() {
                    Some((o, l)) if *o + *l == b * 4096 => *l += 4096,
                    _ => ranges.push((b * 4096, 4096)),
                }
            }
            ranges
        })
        .collect()
}

#[test]
fn past_max_queue_the_laggard_overflows_to_dirty_ranges_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let group = open_group(dir.path(), &["fast", "slow"], spilling(2 << 20));
    let (fast, slow) = (Copy::new(dir.path(), "fast"), Copy::new(dir.path(), "slow"));
    let mut rng = 99;
    let mut written = Vec::new();
    let mut first_drop = None;
    for i in 0..2000 {
        written.push(change(&group, &mut rng, 8 << 10));
        let fast_got = drain(&group, "fast", &fast, NOW, usize::MAX);
        assert!(fast_got.resyncs.is_empty(), "the fast replica overflowed");
        let stats = group.stats();
        assert!(stats.queued_bytes as u64 + stats.spilled_bytes <= 2 << 20);
        if stats.dropped_records > 0 && first_drop.is_none() {
            first_drop = Some(i);
        }
    }
    // It spilled before it overflowed, at max_queue rather than memory.
    let first_drop = first_drop.expect("the slow replica never overflowed");
    assert!(queue_bound(&written[..first_drop]) > 3 * MEMORY);
    // Nobody else needs the records: nothing stays queued or on disk.
    let stats = group.stats();
    assert_eq!((stats.queued_records, stats.spilled_bytes), (0, 0));
    assert!(spill_files(dir.path()).is_empty());
    assert!(group.lag("slow").unwrap().resyncing);

    // One resync of exactly the blocks it lacks, then it streams again.
    match group.next_event("slow", NOW).unwrap() {
        Some(Event::Resync {
            ranges, resume_at, ..
        }) => {
            assert_eq!(ranges, blocks_of(&written));
            assert_eq!(resume_at, group.next_seq());
            slow.copy(&group, &ranges);
            group.resync_done("slow", resume_at).unwrap();
        }
        other => panic!("expected a resync, got {other:?}"),
    }
    let more: Vec<Change> = (0..50).map(|_| change(&group, &mut rng, 8 << 10)).collect();
    drain(&group, "fast", &fast, NOW, usize::MAX);
    let got = drain(&group, "slow", &slow, NOW, usize::MAX);
    assert!(got.resyncs.is_empty() && got.records == more);
    slow.assert_same_as_primary();
    fast.assert_same_as_primary();
}

#[test]
fn without_a_spill_the_queue_overflows_at_queue_memory() {
    let dir = tempfile::tempdir().unwrap();
    let group = open_group(dir.path(), &["dr"], QueueOptions::memory_only(MEMORY));
    let mut rng = 3;
    let written: Vec<Change> = (0..200)
        .map(|_| change(&group, &mut rng, 8 << 10))
        .collect();
    assert!(queue_bound(&written) > 2 * MEMORY);
    let stats = group.stats();
    assert!(stats.dropped_records > 0);
    assert_eq!((stats.spilled_records, stats.spilled_bytes), (0, 0));
    assert!(spill_files(dir.path()).is_empty());
}

#[test]
fn a_damaged_spill_frame_falls_back_to_dirty_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let group = open_group(dir.path(), &["dr", "other"], spilling(64 << 20));
    let copy = Copy::new(dir.path(), "dr");
    let mut rng = 11;
    let written: Vec<Change> = (0..2000)
        .map(|_| change(&group, &mut rng, 8 << 10))
        .collect();
    let files = spill_files(dir.path());
    assert!(files.len() > 2, "{files:?}");
    let good = drain(&group, "dr", &copy, NOW, 100);
    assert!(good.resyncs.is_empty() && good.records == written[..100]);
    // Damage the middle of the second segment (once the writer has put
    // its first block on disk: damage it would write over is no damage).
    on_disk(&files[1], SEGMENT);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&files[1])
        .unwrap();
    f.write_all_at(b"garbage!", SEGMENT / 2).unwrap();

    let marked = group.dirty_ranges();
    let mut got = drain(&group, "dr", &copy, NOW, usize::MAX);
    assert_eq!(got.resyncs.len(), 1, "expected one fallback resync");
    // The records before the damage came in order, then everything marked
    // in the persistent map was owed.
    let n = got.records.len();
    assert!(n > 0 && got.records[..] == written[100..100 + n]);
    assert!(100 + n < written.len());
    let (ranges, resume_at) = got.resyncs.remove(0);
    assert_eq!(ranges, marked);
    assert_eq!(resume_at, group.next_seq());
    copy.assert_same_as_primary();
    assert_eq!(group.lag("dr").unwrap().bytes, 0);

    // The other replica falls back the same way when it reaches the frame.
    let other = Copy::new(dir.path(), "other");
    let got = drain(&group, "other", &other, NOW, usize::MAX);
    assert_eq!(got.resyncs.len(), 1);
    other.assert_same_as_primary();
    assert!(spill_files(dir.path()).is_empty());
}

#[test]
fn a_damaged_frame_found_while_overflowing_owes_the_marked_regions() {
    let dir = tempfile::tempdir().unwrap();
    let group = open_group(dir.path(), &["fast", "slow"], spilling(4 << 20));
    let (fast, slow) = (Copy::new(dir.path(), "fast"), Copy::new(dir.path(), "slow"));
    let mut rng = 23;
    while spill_files(dir.path()).len() < 2 {
        change(&group, &mut rng, 8 << 10);
        drain(&group, "fast", &fast, NOW, usize::MAX);
    }
    // Damage the header of the first frame (an overflow reads headers
    // only: their ranges are what the replica owes).
    let files = spill_files(dir.path());
    on_disk(&files[0], SEGMENT);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&files[0])
        .unwrap();
    f.write_all_at(b"garbage!", 8).unwrap();
    // Past max_queue, the slow replica's spilled records cannot be listed.
    while group.stats().dropped_records == 0 {
        change(&group, &mut rng, 8 << 10);
        let got = drain(&group, "fast", &fast, NOW, usize::MAX);
        assert!(got.resyncs.is_empty(), "the fast replica overflowed");
    }
    let marked = group.dirty_ranges();
    match group.next_event("slow", NOW).unwrap() {
        Some(Event::Resync {
            ranges, resume_at, ..
        }) => {
            assert_eq!(ranges, marked);
            slow.copy(&group, &ranges);
            group.resync_done("slow", resume_at).unwrap();
        }
        other => panic!("expected a resync, got {other:?}"),
    }
    let got = drain(&group, "slow", &slow, NOW, usize::MAX);
    assert!(got.resyncs.is_empty() && got.records.is_empty());
    slow.assert_same_as_primary();
    fast.assert_same_as_primary();
}

#[test]
fn a_spill_that_cannot_be_written_falls_back_to_dirty_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let group = open_group(dir.path(), &["dr"], spilling(64 << 20));
    let copy = Copy::new(dir.path(), "dr");
    // Where the spill directory should go, a file: every append fails.
    std::fs::write(capture_dir(dir.path()).join("spill"), b"in the way").unwrap();
    let mut rng = 5;
    let written: Vec<Change> = (0..300)
        .map(|_| change(&group, &mut rng, 8 << 10))
        .collect();
    assert!(queue_bound(&written) > 2 * MEMORY);
    let stats = group.stats();
    assert!(stats.dropped_records > 0);
    assert_eq!(stats.spilled_bytes, 0);
    assert!(stats.queued_bytes as u64 <= MEMORY);
    let got = drain(&group, "dr", &copy, NOW, usize::MAX);
    assert_eq!(got.resyncs.len(), 1);
    copy.assert_same_as_primary();

    // Once the spill works again and has drained, it is used again.
    std::fs::remove_file(capture_dir(dir.path()).join("spill")).unwrap();
    let more: Vec<Change> = (0..300)
        .map(|_| change(&group, &mut rng, 8 << 10))
        .collect();
    assert!(group.stats().spilled_bytes > 0);
    let got = drain(&group, "dr", &copy, NOW, usize::MAX);
    assert!(got.resyncs.is_empty() && got.records == more);
    copy.assert_same_as_primary();
}

#[test]
fn a_restart_deletes_the_leftover_spill() {
    let dir = tempfile::tempdir().unwrap();
    {
        let group = open_group(dir.path(), &["dr"], spilling(64 << 20));
        let mut rng = 1;
        for _ in 0..500 {
            change(&group, &mut rng, 8 << 10);
        }
        assert!(group.stats().spilled_bytes > 0);
        // Dropped with the spill on disk, as by SIGKILL.
    }
    assert!(!spill_files(dir.path()).is_empty());
    // Reopened even without a spill limit, the files go.
    let group = open_group(dir.path(), &["dr"], QueueOptions::memory_only(MEMORY));
    assert!(!capture_dir(dir.path()).join("spill").exists());
    let stats = group.stats();
    assert_eq!((stats.spilled_records, stats.spilled_bytes), (0, 0));
    // The persistent map covers what was queued.
    let marked = group.dirty_ranges();
    assert!(marked.iter().any(|m| !m.is_empty()));
    match group.next_event("dr", NOW).unwrap() {
        Some(Event::Resync { ranges, .. }) => assert_eq!(ranges, marked),
        other => panic!("expected a resync of the marked regions, got {other:?}"),
    }
}

/// One step of the property test.
#[derive(Clone, Debug)]
enum Step {
    /// Changes with up to this many bytes each.
    Write(u8, u64),
    /// Replica reads up to n events, acknowledging them.
    Read(usize, usize),
    /// Replica reads n records without acknowledging, then reconnects.
    Reconnect(usize, usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (1u8..40, prop_oneof![Just(4096u64), Just(32 << 10)]).prop_map(|(n, w)| Step::Write(n, w)),
        (0usize..2, 1usize..80).prop_map(|(r, n)| Step::Read(r, n)),
        (0usize..2, 1usize..40).prop_map(|(r, n)| Step::Reconnect(r, n)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Whatever the interleaving, each replica's stream (records and
    /// resyncs) rebuilds the primary, its lag is exact while it streams,
    /// and it never needs a resync unless the queue went past `max_queue`.
    #[test]
    fn any_interleaving_rebuilds_the_primary(
        steps in proptest::collection::vec(step(), 1..40),
        seed in 1u64..u64::MAX,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let max_queue = 1 << 20;
        let group = open_group(
            dir.path(),
            &["a", "b"],
            QueueOptions { memory: 64 << 10, max_queue, segment_bytes: 96 << 10 },
        );
        let names = ["a", "b"];
        let copies = [Copy::new(dir.path(), "a"), Copy::new(dir.path(), "b")];
        let mut rng = seed;
        let mut written: Vec<Change> = Vec::new();
        let mut acked = [0usize; 2];
        for step in steps {
            match step {
                Step::Write(n, max) => {
                    for _ in 0..n {
                        written.push(change(&group, &mut rng, max));
                    }
                }
                Step::Read(r, n) => {
                    let got = drain(&group, names[r], &copies[r], NOW, n);
                    if got.resyncs.is_empty() {
                        prop_assert!(got.records[..] == written[acked[r]..acked[r] + got.records.len()]);
                        acked[r] += got.records.len();
                    } else {
                        let stats = group.stats();
                        prop_assert!(stats.dropped_records > 0, "a resync without overflow");
                        // After a resync, the replica streams from where it
                        // resumes.
                        let (_, resume_at) = got.resyncs[got.resyncs.len() - 1];
                        let tail: Vec<Change> =
                            got.records.iter().filter(|c| c.0 >= resume_at).cloned().collect();
                        let from = written.partition_point(|c| c.0 < resume_at);
                        prop_assert!(tail[..] == written[from..from + tail.len()]);
                        acked[r] = from + tail.len();
                    }
                }
                Step::Reconnect(r, n) => {
                    for _ in 0..n {
                        if group.next_event(names[r], NOW).unwrap().is_none() {
                            break;
                        }
                    }
                    group.rewind(names[r]).unwrap();
                }
            }
            for (r, name) in names.iter().enumerate() {
                let lag = group.lag(name).unwrap();
                if !lag.resyncing {
                    prop_assert_eq!(lag.bytes, change_bytes(&written[acked[r]..]));
                }
            }
            let stats = group.stats();
            prop_assert!(stats.queued_bytes as u64 + stats.spilled_bytes <= max_queue);
        }
        for (r, name) in names.iter().enumerate() {
            drain(&group, name, &copies[r], NOW, usize::MAX);
            copies[r].assert_same_as_primary();
        }
        let stats = group.stats();
        prop_assert_eq!((stats.spilled_bytes, stats.queued_records), (0, 0));
        prop_assert!(spill_files(dir.path()).is_empty());
        if queue_bound(&written) <= max_queue {
            prop_assert_eq!(stats.dropped_records, 0);
        }
    }
}
