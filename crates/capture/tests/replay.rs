//! The captured stream, applied in order to blank images, reproduces the
//! primary byte for byte — under concurrent writers on several volumes,
//! with and without the queue overflowing into dirty ranges.
#![allow(clippy::unwrap_used)]
#![allow(clippy::cast_possible_truncation)] // test write lengths of a few MiB

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use tandem_capture::{CaptureVolume, Event, GroupCapture, Op};
use tandem_volume::RawImage;

const SIZE: u64 = 16 << 20;

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn open_group(dir: &Path, queue_limit: u64) -> Arc<GroupCapture> {
    let volumes = (0..2)
        .map(|i| CaptureVolume {
            name: format!("v{i}"),
            image: Arc::new(
                RawImage::open_or_create(&dir.join(format!("v{i}.img")), SIZE).unwrap(),
            ),
        })
        .collect();
    let group = GroupCapture::open(
        &dir.join("capture"),
        "g",
        volumes,
        &[false, false],
        &["dr".to_string()],
        queue_limit,
    )
    .unwrap();
    Arc::new(group)
}

/// Applies events for replica "dr" to `replicas` until `done` and the
/// queue is drained. Returns (records applied, resyncs).
fn consume(group: &GroupCapture, replicas: &[File], done: &AtomicBool) -> (u64, u64) {
    let (mut records, mut resyncs) = (0, 0);
    let mut last_seq = 0;
    loop {
        match group.next_event("dr", Duration::from_millis(50)).unwrap() {
            Some(Event::Record(r)) => {
                assert!(
                    r.seq > last_seq,
                    "sequence went backwards: {} after {last_seq}",
                    r.seq
                );
                last_seq = r.seq;
                let f = &replicas[r.volume as usize];
                match &r.op {
                    Op::Write { offset, data, .. } => f.write_all_at(data, *offset).unwrap(),
                    Op::WriteZeroes { offset, len, .. } | Op::Trim { offset, len, .. } => {
                        f.write_all_at(&vec![0u8; *len as usize], *offset).unwrap()
                    }
                    Op::Flush => {}
                }
                group.ack("dr", r.seq).unwrap();
                records += 1;
            }
            Some(Event::Resync {
                ranges, resume_at, ..
            }) => {
                // Copy the owed ranges from the primary, as a resync does.
                for (v, list) in ranges.iter().enumerate() {
                    for &(offset, len) in list {
                        let mut buf = vec![0u8; len as usize];
                        group.image(v).read(offset, &mut buf).unwrap();
                        replicas[v].write_all_at(&buf, offset).unwrap();
                    }
                }
                last_seq = last_seq.max(resume_at - 1);
                group.resync_done("dr", resume_at).unwrap();
                resyncs += 1;
            }
            None if done.load(Ordering::Acquire) => return (records, resyncs),
            None => {}
        }
    }
}

fn run(queue_limit: u64, writers: u64, ops_per_writer: u64) -> (u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let group = open_group(dir.path(), queue_limit);
    let replicas: Vec<File> = (0..2)
        .map(|i| {
            let f = File::create(dir.path().join(format!("r{i}.img"))).unwrap();
            f.set_len(SIZE).unwrap();
            f
        })
        .collect();
    let done = Arc::new(AtomicBool::new(false));
    let consumer = {
        let (group, done) = (Arc::clone(&group), Arc::clone(&done));
        thread::spawn(move || consume(&group, &replicas, &done))
    };
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let group = Arc::clone(&group);
            thread::spawn(move || {
                let mut rng = 0x1234_5678 + w * 7919;
                for _ in 0..ops_per_writer {
                    let v = (xorshift(&mut rng) % 2) as usize;
                    // Writers collide on a small hot area on purpose.
                    let offset = (xorshift(&mut rng) % (SIZE / 512 - 256)) * 512 % (2 << 20);
                    let len = 512 * (1 + xorshift(&mut rng) % 128);
                    match xorshift(&mut rng) % 10 {
                        0 => group
                            .write_zeroes(v, offset, len, false, false, false)
                            .map(drop),
                        1 => group.trim(v, offset, len, false).map(drop),
                        2 => group.flush(v).map(drop),
                        3 => {
                            // A buffer handed over (NBD's large writes).
                            let byte = (xorshift(&mut rng) % 251) as u8 + 1;
                            group
                                .write_owned(v, offset, vec![byte; len as usize], false)
                                .map(drop)
                        }
                        _ => {
                            let byte = (xorshift(&mut rng) % 251) as u8 + 1;
                            group
                                .write(v, offset, &vec![byte; len as usize], false)
                                .map(drop)
                        }
                    }
                    .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    done.store(true, Ordering::Release);
    let counts = consumer.join().unwrap();
    for v in 0..2 {
        let primary = std::fs::read(dir.path().join(format!("v{v}.img"))).unwrap();
        let replica = std::fs::read(dir.path().join(format!("r{v}.img"))).unwrap();
        assert!(
            primary == replica,
            "volume {v}: replica differs from primary"
        );
    }
    // Everything replicated: the persistent map can be cleared entirely.
    group.clear_replicated().unwrap();
    assert!(
        group.dirty_ranges().iter().all(Vec::is_empty),
        "{:?}",
        group.dirty_ranges()
    );
    counts
}

#[test]
fn the_captured_stream_replays_to_an_identical_copy() {
    let (records, resyncs) = run(256 << 20, 4, 2000);
    assert_eq!(records, 8000);
    assert_eq!(resyncs, 0);
}

#[test]
fn a_slow_consumer_gets_dirty_ranges_and_still_converges() {
    // 256 KiB of queue: most records are dropped while writers run.
    let (records, resyncs) = run(256 << 10, 4, 2000);
    assert!(resyncs > 0, "the queue never overflowed");
    assert!(records < 8000);
}

#[test]
fn after_a_crash_every_marked_region_is_owed_again() {
    let dir = tempfile::tempdir().unwrap();
    {
        let group = open_group(dir.path(), 64 << 20);
        group.write(0, 5 << 20, &[1u8; 4096], false).unwrap();
        group.write(1, 0, &[2u8; 512], false).unwrap();
        // Dropped without acknowledgement, as by SIGKILL.
    }
    let group = open_group(dir.path(), 64 << 20);
    match group.next_event("dr", Duration::from_secs(1)).unwrap() {
        Some(Event::Resync { ranges, .. }) => {
            assert_eq!(ranges[0], vec![(4 << 20, 4 << 20)]);
            assert_eq!(ranges[1], vec![(0, 4 << 20)]);
        }
        other => panic!("expected a resync of the marked regions, got {other:?}"),
    }
}

/// The periodic clear keeps a working set marked (its writes pay no map
/// update after every pass) and clears what went idle within two passes;
/// the explicit clear (clean stop) clears everything replicated.
#[test]
fn periodic_clears_keep_the_working_set_and_release_idle_regions() {
    let dir = tempfile::tempdir().unwrap();
    let group = open_group(dir.path(), 64 << 20);
    let mib = 1u64 << 20;
    let write_and_ack = |offset: u64| {
        let seq = group.write(0, offset, &[7u8; 4096], false).unwrap();
        group.ack("dr", seq).unwrap();
    };
    let marked = || group.dirty_ranges()[0].clone();
    // Region 0 is written before every pass; region 2 only once.
    write_and_ack(0);
    write_and_ack(8 * mib);
    for pass in 0..3 {
        write_and_ack(mib);
        group.clear_cold().unwrap();
        let m = marked();
        assert!(
            m.contains(&(0, 4 * mib)),
            "pass {pass}: the working set was cleared: {m:?}"
        );
        if pass == 2 {
            assert!(
                !m.iter().any(|&(o, l)| o <= 8 * mib && 8 * mib < o + l),
                "pass {pass}: an idle region is still marked: {m:?}"
            );
        }
    }
    // Not acknowledged: never cleared, by either form.
    group.write(0, 12 * mib, &[9u8; 4096], false).unwrap();
    group.clear_replicated().unwrap();
    assert_eq!(marked(), vec![(12 * mib, 4 * mib)]);
}

/// A shipper waiting elsewhere than in `next_events` is told of every
/// write (and of the close), and no longer once it has gone.
#[test]
fn listeners_hear_writes_until_removed() {
    let dir = tempfile::tempdir().unwrap();
    let group = open_group(dir.path(), 64 << 20);
    let heard = [
        Arc::new(std::sync::atomic::AtomicU64::new(0)),
        Arc::new(std::sync::atomic::AtomicU64::new(0)),
    ];
    let ids: Vec<u64> = heard
        .iter()
        .map(|h| {
            let h = Arc::clone(h);
            group.on_arrival(Box::new(move || {
                h.fetch_add(1, Ordering::Relaxed);
            }))
        })
        .collect();
    group.write(0, 0, &[1u8; 4096], false).unwrap();
    group.remove_listener(ids[0]);
    group.write(1, 4096, &[2u8; 4096], false).unwrap();
    group.close();
    assert_eq!(heard[0].load(Ordering::Relaxed), 1);
    assert_eq!(
        heard[1].load(Ordering::Relaxed),
        3,
        "two writes and the close"
    );
}

/// A buffer handed to a group without replicas is written where it is.
#[test]
fn an_owned_buffer_reaches_the_image_with_or_without_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let image = Arc::new(RawImage::open_or_create(&dir.path().join("v.img"), SIZE).unwrap());
    let volumes = vec![CaptureVolume {
        name: "v".into(),
        image: Arc::clone(&image),
    }];
    let alone = GroupCapture::open(
        &dir.path().join("capture"),
        "g",
        volumes,
        &[false],
        &[],
        1 << 20,
    )
    .unwrap();
    alone.write_owned(0, 4096, vec![0x5a; 8192], false).unwrap();
    let mut got = vec![0u8; 8192];
    image.read(4096, &mut got).unwrap();
    assert!(got.iter().all(|b| *b == 0x5a));

    std::fs::create_dir_all(dir.path().join("t")).unwrap();
    let tracked = open_group(&dir.path().join("t"), 1 << 20);
    tracked.write_owned(1, 512, vec![0x77; 4096], true).unwrap();
    match tracked.next_event("dr", Duration::from_secs(1)).unwrap() {
        Some(Event::Record(r)) => match &r.op {
            Op::Write { offset, data, fua } => {
                assert_eq!((*offset, data.len(), *fua), (512, 4096, true));
                assert!(data.iter().all(|b| *b == 0x77));
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    let v1 = std::fs::read(dir.path().join("t/v1.img")).unwrap();
    assert!(v1[512..4608].iter().all(|b| *b == 0x77));
}
