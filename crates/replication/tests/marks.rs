//! Recovery-point marks end to end (docs/PEER.md, "Marks"; docs/HISTORY.md,
//! "Points"): a real capture and shipper on the primary, a real receiver
//! on the replica, over a socket pair. Every FLUSH and FUA write is marked
//! right after it; a write stream without flushes is marked at least once
//! per second of capture time; an idle stream's last record is marked
//! within about a second; each mark names a record that was sent, with
//! the primary's wall-clock time of its capture. Marks follow the records
//! of a new session after a cut link, and of the catch-up after a resync,
//! without ever naming a record the replica's images are no prefix at
//! (the replica's session would end on it). A peer of protocol version 4
//! is refused with both versions named.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use support::replica::{pair_connection, replica_site, replica_site_with};
use tandem_capture::{CaptureVolume, GroupCapture};
use tandem_peer::{read_message, write_message, Message};
use tandem_replication::history::{History, Retention};
use tandem_replication::receiver::{GroupPlan, ReceiverContext};
use tandem_replication::replica::{Position, ReplicaOptions};
use tandem_replication::shipper::{ConnectError, Link, LinkState, Shipper, SiteLink};
use tandem_volume::RawImage;

const SIZE: u64 = 16 << 20;
/// Slack for mapping capture instants to wall-clock time (one reading of
/// both clocks per session) and for rounding to milliseconds.
const CLOCK_SLACK_MS: u64 = 20;

struct Pair {
    capture: Arc<GroupCapture>,
    plan: Arc<GroupPlan>,
    /// The replica's undo history: its points come from the marks.
    history: Arc<History>,
    replica: Arc<Mutex<Position>>,
    link: Arc<Link>,
    stop: Arc<AtomicBool>,
    cut: Arc<AtomicBool>,
    sessions: Arc<AtomicU64>,
    shipper: Option<thread::JoinHandle<()>>,
    live: Arc<Mutex<Vec<UnixStream>>>,
}

/// The wall-clock window of one captured record: it was captured no
/// earlier than `before` and no later than `after` (ms since the epoch).
#[derive(Clone, Copy, Debug)]
struct Written {
    before: u64,
    after: u64,
}

fn wall_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// Records captured in the test, by seq, with their wall-clock windows.
#[derive(Default)]
struct Log(BTreeMap<u64, Written>);

impl Log {
    fn record(&mut self, op: impl FnOnce() -> u64) -> u64 {
        let before = wall_ms();
        let seq = op();
        let after = wall_ms() + 1;
        self.0.insert(seq, Written { before, after });
        seq
    }

    fn write(&mut self, capture: &GroupCapture, i: u64, fua: bool) -> u64 {
        let offset = (i * 7919 % (SIZE / 4096)) * 4096;
        let byte = u8::try_from(i % 251).unwrap() | 1;
        self.record(|| capture.write(0, offset, &[byte; 4096], fua).unwrap())
    }

    fn flush(&mut self, capture: &GroupCapture) -> u64 {
        self.record(|| capture.flush(0).unwrap())
    }
}

fn start(dir: &Path, before_shipping: impl FnOnce(&GroupCapture)) -> Pair {
    let capture = Arc::new(
        GroupCapture::open(
            &dir.join("capture"),
            "g",
            vec![CaptureVolume {
                name: "v".into(),
                image: Arc::new(RawImage::open_or_create(&dir.join("p.img"), SIZE).unwrap()),
            }],
            &[false],
            &["dr".into()],
            64 << 20,
        )
        .unwrap(),
    );
    before_shipping(&capture);
    let site = replica_site_with(
        &dir.join("replica"),
        "dr",
        &["ny", "dr"],
        &dir.join("r.img"),
        SIZE,
        ReplicaOptions {
            history: Some(Retention {
                keep: Duration::from_secs(3600),
                max_bytes: 1 << 30,
            }),
        },
    );
    let plan = first_plan(&site.ctx);
    let history = site.group.lock().history().expect("a replica with history");
    let (ctx, replica) = (site.ctx, site.group);
    let stop = Arc::new(AtomicBool::new(false));
    let cut = Arc::new(AtomicBool::new(false));
    let sessions = Arc::new(AtomicU64::new(0));
    let live: Arc<Mutex<Vec<UnixStream>>> = Arc::new(Mutex::new(Vec::new()));
    let link = Arc::new(Link::new(1, (0, 0)));
    let connect = {
        let (cut, sessions, live) = (Arc::clone(&cut), Arc::clone(&sessions), Arc::clone(&live));
        Box::new(move || {
            if cut.load(Ordering::Acquire) {
                return Err(ConnectError::NoAddress("link cut".into()));
            }
            sessions.fetch_add(1, Ordering::Relaxed);
            pair_connection(&ctx, &live)
        })
    };
    let shipper = Shipper {
        capture: Arc::clone(&capture),
        local_site: "ny".into(),
        replica_site: "dr".into(),
        epoch: 1,
        fork: (0, 0),
        site: SiteLink::new("ny", "dr", connect),
        link: Arc::clone(&link),
        stop: Arc::clone(&stop),
        files: None,
        verify: crossbeam_channel::never(),
        definition: None,
        gather: Duration::ZERO,
    };
    let position = replica.lock().published();
    let handle = thread::spawn(move || shipper.run());
    Pair {
        capture,
        plan,
        history,
        replica: position,
        link,
        stop,
        cut,
        sessions,
        shipper: Some(handle),
        live,
    }
}

fn first_plan(ctx: &ReceiverContext) -> Arc<GroupPlan> {
    Arc::clone(&ctx.groups.read()[0])
}

impl Pair {
    fn cut_link(&self) {
        self.cut.store(true, Ordering::Release);
        for s in self.live.lock().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Waits until the replica is consistent and holds every change.
    fn wait_caught_up(&self) {
        let mut last = String::new();
        let done = tandem_testkit::poll(Duration::from_secs(60), || {
            let lag = self.capture.lag("dr").unwrap();
            let link = self.link.info();
            let next = self.capture.next_seq();
            let replica = *self.replica.lock();
            last = format!("{lag:?} {link:?} {replica:?}");
            (link.state == LinkState::Streaming
                && link.replica_consistent
                && !lag.resyncing
                && lag.acked + 1 >= next
                && replica.applied + 1 >= next
                && replica.consistent)
                .then_some(())
        });
        assert!(done.is_some(), "replica did not catch up in 60 s: {last}");
    }

    /// The marks the replica received, by seq (each seq at most once in a
    /// session; the latest time if a later session marked it again).
    fn marks(&self) -> BTreeMap<u64, u64> {
        self.plan.marks.recent().into_iter().collect()
    }

    /// Waits (at most `within`) until the replica received a mark of
    /// `seq`; returns its time and how long the wait took.
    fn wait_mark(&self, seq: u64, within: Duration) -> (u64, Duration) {
        let started = Instant::now();
        let time = tandem_testkit::poll_every(Duration::from_millis(5), within, || {
            self.marks().get(&seq).copied()
        });
        let time = time.unwrap_or_else(|| {
            panic!(
                "no mark of record {seq} within {within:?}; marks: {:?}",
                self.marks()
            )
        });
        (time, started.elapsed())
    }

    /// Waits (at most 10 s) until the replica's history has a point of
    /// record `seq` at `time_ms`.
    fn wait_point(&self, seq: u64, time_ms: u64) {
        let found = tandem_testkit::poll(Duration::from_secs(10), || {
            self.history
                .points()
                .iter()
                .any(|p| p.seq == seq && p.time_ms == time_ms)
                .then_some(())
        });
        assert!(
            found.is_some(),
            "no point of record {seq} at {time_ms}: {:?}",
            self.history.points()
        );
    }

    /// Every point of the history was made of a mark received (of those
    /// the log still holds).
    fn check_points(&self) {
        let marks = self.marks();
        let oldest = marks.keys().next().copied().unwrap_or(0);
        for p in self
            .history
            .points()
            .into_iter()
            .filter(|p| p.seq >= oldest)
        {
            assert_eq!(
                marks.get(&p.seq),
                Some(&p.time_ms),
                "point {p:?} of no mark received"
            );
        }
    }

    /// Every mark names a record the test captured, with a time within
    /// that record's wall-clock window.
    fn check_marks(&self, log: &Log) {
        for (seq, time) in self.marks() {
            let w = log
                .0
                .get(&seq)
                .unwrap_or_else(|| panic!("mark of record {seq}, which was never captured"));
            assert!(
                time + CLOCK_SLACK_MS >= w.before && time <= w.after + CLOCK_SLACK_MS,
                "mark of record {seq} at {time}, captured within {w:?}"
            );
        }
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        self.capture.close();
        self.cut_link();
        if let Some(h) = self.shipper.take() {
            h.join().unwrap();
        }
    }
}

#[test]
fn flushes_fua_writes_and_a_flush_free_stream_are_marked() {
    let dir = tempfile::tempdir().unwrap();
    let pair = start(dir.path(), |_| {});
    pair.wait_caught_up();
    let mut log = Log::default();

    // FLUSH: marked right after it.
    for i in 0..5 {
        log.write(&pair.capture, i, false);
        let flush = log.flush(&pair.capture);
        let (time, _) = pair.wait_mark(flush, Duration::from_secs(10));
        let w = log.0[&flush];
        assert!(time + CLOCK_SLACK_MS >= w.before && time <= w.after + CLOCK_SLACK_MS);
        // A recovery point, without waiting for more writes.
        pair.wait_point(flush, time);
    }
    // FUA: the same.
    let fua = log.write(&pair.capture, 100, true);
    pair.wait_mark(fua, Duration::from_secs(10));

    // A stream of writes without flushes for 3.5 s, one every 20 ms.
    let until = Instant::now() + Duration::from_millis(3500);
    let mut i = 1000;
    while Instant::now() < until {
        log.write(&pair.capture, i, false);
        i += 1;
        thread::sleep(Duration::from_millis(20));
    }
    let last = pair.capture.next_seq() - 1;
    // Idle now: the last record is marked about a second after its
    // capture.
    let (time, waited) = pair.wait_mark(last, Duration::from_secs(5));
    assert!(
        waited < Duration::from_millis(2500),
        "the idle stream's last record was marked {waited:?} after it was written"
    );
    pair.wait_point(last, time);
    pair.check_marks(&log);
    pair.check_points();

    // At least one mark per second of capture time: between two marks
    // (from the FUA write's on), no record was captured a second or more
    // after the first of them.
    let marks = pair.marks();
    let stream: Vec<(u64, u64)> = marks.range(fua..=last).map(|(s, t)| (*s, *t)).collect();
    assert!(
        stream.len() >= 4,
        "{} marks for the FUA write and 3.5 s of writes: {stream:?}",
        stream.len()
    );
    for pair_of_marks in stream.windows(2) {
        let ((a, a_time), (b, _)) = (pair_of_marks[0], pair_of_marks[1]);
        for (seq, w) in log.0.range(a + 1..b) {
            assert!(
                w.before < a_time + 1000 + CLOCK_SLACK_MS,
                "record {seq} (captured from {}) is unmarked more than a second after the mark of {a} ({a_time})",
                w.before
            );
        }
    }
    // The times of the marks go forward with their records.
    for w in stream.windows(2) {
        assert!(w[0].1 <= w[1].1, "{stream:?}");
    }
    // Nothing made the replica end a session (a mark it refuses would).
    assert_eq!(pair.sessions.load(Ordering::Relaxed), 1);
    assert_eq!(pair.plan.marks.total(), u64::try_from(marks.len()).unwrap());
    pair.stop();
}

#[test]
fn marks_follow_a_resync_catch_up_and_a_new_session() {
    let dir = tempfile::tempdir().unwrap();
    // The primary's image is full of data, so the new replica's first
    // resync takes a while; a writer keeps writing and flushing all
    // along: records captured during the resync follow it (its catch-up),
    // and only those from its consistent point on may be marked — the
    // replica ends the session on any other.
    let data: Vec<u8> = (0..SIZE).map(|i| (i / 4096 % 253) as u8 | 1).collect();
    std::fs::write(dir.path().join("p.img"), &data).unwrap();
    let pair = start(dir.path(), |_| {});
    let log = Arc::new(Mutex::new(Log::default()));
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let (capture, log, writing) = (
            Arc::clone(&pair.capture),
            Arc::clone(&log),
            Arc::clone(&writing),
        );
        thread::spawn(move || {
            let mut i = 0;
            while writing.load(Ordering::Acquire) {
                log.lock().write(&capture, i, false);
                if i % 4 == 0 {
                    log.lock().flush(&capture);
                }
                i += 1;
                thread::sleep(Duration::from_millis(1));
            }
        })
    };
    // Consistent again: the resync and its catch-up are over (the writer
    // goes on, so the replica need not hold every record yet).
    let consistent = tandem_testkit::poll(Duration::from_secs(60), || {
        (pair.link.info().replica_consistent && pair.replica.lock().consistent).then_some(())
    });
    assert!(
        consistent.is_some(),
        "the replica did not become consistent: {:?}",
        pair.link.info()
    );
    assert!(
        pair.link.info().resync_total >= SIZE,
        "the replica was filled by a resync"
    );
    // A flush after the catch-up is marked.
    let flush = log.lock().flush(&pair.capture);
    pair.wait_mark(flush, Duration::from_secs(10));

    // A cut link while writes go on: what is written meanwhile (and
    // what was sent but not acknowledged) goes on a new session, and its
    // flushes are marked there.
    pair.cut_link();
    thread::sleep(Duration::from_millis(300)); // writes pile up meanwhile
    let during = log.lock().flush(&pair.capture);
    pair.cut.store(false, Ordering::Release);
    pair.wait_mark(during, Duration::from_secs(10));
    writing.store(false, Ordering::Release);
    writer.join().unwrap();
    let last = log.lock().flush(&pair.capture);
    pair.wait_caught_up();
    let (time, _) = pair.wait_mark(last, Duration::from_secs(10));
    pair.wait_point(last, time);
    pair.check_marks(&log.lock());
    pair.check_points();
    // One session before the cut, one after: the replica never refused a
    // mark.
    assert_eq!(pair.sessions.load(Ordering::Relaxed), 2);
    assert_eq!(
        std::fs::read(dir.path().join("p.img")).unwrap(),
        std::fs::read(dir.path().join("r.img")).unwrap()
    );
    pair.stop();
}

#[test]
fn a_link_of_another_protocol_version_is_refused_with_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let site = replica_site(
        &dir.path().join("replica"),
        "dr",
        &["ny", "dr"],
        &dir.path().join("r.img"),
        SIZE,
    );
    for version in [4, 5, 7] {
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        let ctx = Arc::clone(&site.ctx);
        let served = thread::spawn(move || {
            let r = theirs.try_clone().unwrap();
            tandem_replication::receiver::serve(&ctx, r, theirs, None, None)
        });
        let mut scratch = Vec::new();
        let link = Message::Link {
            version,
            primary: "ny".into(),
            replica: "dr".into(),
        };
        write_message(&mut ours, &link, &mut scratch).unwrap();
        ours.flush().unwrap();
        let mut reader = BufReader::new(ours.try_clone().unwrap());
        let answer = read_message(&mut reader, &mut Vec::new()).unwrap();
        assert_eq!(
            answer,
            Message::Refuse {
                reason: format!(
                    "protocol version {version} is not supported (this site speaks {})",
                    tandem_peer::VERSION
                )
            }
        );
        let end = served.join().unwrap().unwrap_err();
        assert!(end.to_string().contains("protocol version"), "{end}");
    }
}
