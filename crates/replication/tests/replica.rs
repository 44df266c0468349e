//! The replica group across crashes: durable records survive and are
//! replayed, undurable ones are not half-applied, and a resync makes the
//! replica inconsistent until the stream catches up (G3).
#![allow(clippy::unwrap_used)]
#![allow(clippy::cast_possible_truncation)] // small test images; pattern bytes keep the low bits on purpose

use std::path::Path;
use std::sync::Arc;

use tandem_replication::journal::{Entry, RecordOp};
use tandem_replication::replica::{ReplicaGroup, ReplicaVolume};
use tandem_volume::RawImage;

const SIZE: u64 = 1 << 20;

fn open(dir: &Path) -> ReplicaGroup {
    let image = Arc::new(RawImage::open_or_create(&dir.join("v.img"), SIZE).unwrap());
    ReplicaGroup::open(
        &dir.join("replica"),
        "g",
        vec![ReplicaVolume {
            name: "v".into(),
            image,
        }],
    )
    .unwrap()
}

fn write(seq: u64) -> Entry {
    Entry {
        epoch: 1,
        seq,
        volume: 0,
        op: RecordOp::Write,
        fua: false,
        offset: (seq % 8) * 4096,
        len: 4096,
        data: vec![seq as u8; 4096],
    }
}

/// The image after applying writes 1..=n.
fn prefix(n: u64) -> Vec<u8> {
    let mut img = vec![0u8; SIZE as usize];
    for seq in 1..=n {
        let off = ((seq % 8) * 4096) as usize;
        img[off..off + 4096].fill(seq as u8);
    }
    img
}

#[test]
fn durable_records_survive_a_crash_and_undurable_ones_are_not_applied() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut g = open(dir.path());
        assert!(g.position().new && !g.position().consistent);
        g.set_epoch(1).unwrap();
        for seq in 1..=10 {
            g.receive(&write(seq)).unwrap();
        }
        assert_eq!(g.commit().unwrap(), 10);
        for seq in 11..=15 {
            g.receive(&write(seq)).unwrap();
        }
        // Crash: dropped without commit or close.
    }
    let g = open(dir.path());
    let p = g.position();
    // Never resynced: not known to be a prefix of anything.
    assert_eq!(
        (p.durable, p.applied, p.consistent, p.new),
        (10, 10, false, false)
    );
    assert!(std::fs::read(dir.path().join("v.img")).unwrap() == prefix(10));
}

#[test]
fn journaled_records_are_replayed_into_the_image_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut g = open(dir.path());
        g.set_epoch(1).unwrap();
        for seq in 1..=20 {
            g.receive(&write(seq)).unwrap();
        }
        g.commit().unwrap();
    }
    // Damage the image where records 17..20 went: replay must restore it.
    let img = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("v.img"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&img, &[0xff; 4 * 4096], 0).unwrap();
    let g = open(dir.path());
    assert_eq!(g.position().applied, 20);
    // Replay starts after the last checkpoint, which was at open (0).
    assert!(std::fs::read(dir.path().join("v.img")).unwrap() == prefix(20));
}

#[test]
fn a_resync_is_inconsistent_until_the_stream_passes_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = open(dir.path());
    g.set_epoch(1).unwrap();
    g.begin_resync(1, 1).unwrap();
    g.end_resync(1).unwrap();
    assert!(
        g.position().consistent,
        "a completed first sync makes it consistent"
    );
    for seq in 1..=4 {
        g.receive(&write(seq)).unwrap();
    }
    g.commit().unwrap();
    g.begin_resync(1, 5).unwrap();
    let p = g.position();
    assert!(p.resyncing && !p.consistent);
    g.write_chunk(0, 65536, &[7u8; 4096]).unwrap();
    g.end_resync(8).unwrap();
    assert!(!g.position().consistent, "records below 8 still owed");
    for seq in 5..=7 {
        g.receive(&write(seq)).unwrap();
    }
    g.commit().unwrap();
    g.checkpoint().unwrap();
    assert!(g.position().consistent);
    drop(g);
    // And it stays so across a restart.
    assert!(open(dir.path()).position().consistent);
}

#[test]
fn records_for_unknown_volumes_or_out_of_range_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = open(dir.path());
    let mut e = write(1);
    e.volume = 3;
    assert!(g
        .receive(&e)
        .unwrap_err()
        .to_string()
        .contains("volume index 3"));
    let mut e = write(1);
    e.offset = SIZE - 100;
    assert!(g
        .receive(&e)
        .unwrap_err()
        .to_string()
        .contains("past the end"));
}

/// Hashes of `count` chunks from `offset`, one plain read per chunk.
fn hashes_by_reading(image: &RawImage, offset: u64, chunk: u32, count: usize) -> Vec<[u8; 32]> {
    let size = image.size();
    let mut out = Vec::new();
    let mut at = offset;
    while at < size && out.len() < count {
        let n = u64::from(chunk).min(size - at) as usize;
        let mut buf = vec![0u8; n];
        image.read(at, &mut buf).unwrap();
        out.push(*blake3::hash(&buf).as_bytes());
        at += n as u64;
    }
    out
}

#[test]
fn hashes_of_a_sparse_image_equal_hashes_of_its_bytes() {
    // Page cache reads (tmpfs) and direct reads (a disk file system).
    let disk = tempfile::tempdir_in("/var/tmp").unwrap();
    let mem = tempfile::tempdir_in("/dev/shm").unwrap();
    for dir in [&disk, &mem] {
        // 3 MiB + 3 KiB: the last 64 KiB chunk is short, and a compare
        // reads data in runs of up to 1 MiB.
        let size = (3 << 20) + 3072;
        let image = RawImage::open_or_create(&dir.path().join("s.img"), size).unwrap();
        image.write(70_000, &[7u8; 5000]).unwrap();
        image.write(size - 100, &[9u8; 100]).unwrap();
        image.write(300_000, &[0u8; 65536]).unwrap(); // allocated zeroes
        let long: Vec<u8> = (0..1_500_000u32).map(|i| (i % 253) as u8).collect();
        image.write(1 << 20, &long).unwrap();
        image.sync().unwrap();
        image.write(2_000_000, &[3u8; 10_000]).unwrap(); // dirty, not synced
        for chunk in [4096u32, 65536] {
            let all = size.div_ceil(u64::from(chunk)) as usize;
            for (offset, count) in [
                (0, all),
                (0, all + 5),
                (u64::from(chunk) * 3, 40),
                (size - 3072, 1),
                (size, 2),
            ] {
                let fast = tandem_replication::replica::chunk_hashes(&image, offset, chunk, count)
                    .unwrap();
                let slow = hashes_by_reading(&image, offset, chunk, count);
                assert_eq!(
                    fast,
                    slow,
                    "{:?}: chunk {chunk}, {count} from {offset}",
                    dir.path()
                );
            }
        }
    }
}

#[test]
fn a_failed_read_ends_a_compare_with_its_error() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("f.img");
    let size = 8u64 << 20;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    file.set_len(size).unwrap();
    let faults = tandem_volume::fault::Faults::default();
    let image = RawImage::with_file(
        Box::new(tandem_volume::fault::FaultyFile::new(file, faults.clone())),
        path,
        size,
    );
    image.write(0, &vec![1u8; 8 << 20]).unwrap();
    // Several runs of data: the reads run beside the hashing.
    let count = 128;
    assert_eq!(
        tandem_replication::replica::chunk_hashes(&image, 0, 65536, count)
            .unwrap()
            .len(),
        count
    );
    faults.set_fail_read(true);
    let err = tandem_replication::replica::chunk_hashes(&image, 0, 65536, count).unwrap_err();
    assert!(err.to_string().contains("Input/output error"), "{err}");
}

/// A former owner's replica state may hold higher sequence numbers of its
/// own history than the new owner's: a resync must reset the position, and
/// nothing of the old journal may be replayed after a crash.
#[test]
fn a_resync_resets_the_position_below_numbers_of_another_history() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = open(dir.path());
    for seq in 1..=1000 {
        g.receive(&write(seq)).unwrap();
    }
    g.commit().unwrap();
    assert_eq!(g.position().durable, 1000);
    // The new owner's history: epoch 2, resuming at 500.
    g.set_epoch(2).unwrap();
    g.begin_resync(2, 500).unwrap();
    g.write_chunk(0, 0, &[0x5a; 4096]).unwrap();
    g.end_resync(500).unwrap();
    let p = g.position();
    assert_eq!((p.durable, p.applied, p.tip_epoch), (499, 499, 2));
    drop(g);
    // After a crash and reopen nothing of the old history is replayed.
    let g = open(dir.path());
    let p = g.position();
    assert_eq!((p.durable, p.applied, p.tip_epoch), (499, 499, 2));
    let mut block = vec![0u8; 4096];
    g.volumes()[0].image.read(0, &mut block).unwrap();
    assert_eq!(block, vec![0x5a; 4096]);
}

/// A group's commits run on a shared pool: once the group is dropped,
/// nothing of the pool holds its images, so it opens again at once (an
/// image is locked while open).
#[test]
fn a_dropped_group_releases_its_images_at_once() {
    let dir = tempfile::tempdir().unwrap();
    for seq in 1..=1000 {
        let mut g = open(dir.path());
        g.set_epoch(1).unwrap();
        g.receive(&write(seq)).unwrap();
        assert_eq!(g.commit().unwrap(), seq);
    }
    let g = open(dir.path());
    assert_eq!(g.position().applied, 1000);
}
