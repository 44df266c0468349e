//! The replica side of the peer protocol — the receiver driving its
//! `ReplicaSession` over a real journal and image — fed random sequences
//! of sessions by a scripted primary: sessions cut after any message
//! (also in the middle of a resync), sessions of an older epoch, records
//! sent twice, resyncs from any point. After every session the replica's
//! image must be exactly the primary's sequence applied up to what the
//! replica says it applied (when it says it is consistent), its
//! acknowledgements must never go backwards nor beyond what was sent, an
//! older epoch must be refused, and a final session that runs to the end
//! must leave it consistent and identical.

#![allow(clippy::unwrap_used)]
// Test constants (a 4 KiB block, 32 of them) fit every integer type.
#![allow(clippy::cast_possible_truncation)]

mod support;

use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use parking_lot::Mutex;
use proptest::prelude::*;
use support::replica::replica_site;
use tandem_peer::{read_message, write_message, Ack, Hello, Message, Payload, Record, RecordOp};
use tandem_replication::receiver::{self, ReceiverContext};
use tandem_replication::replica::ReplicaGroup;
use tandem_volume::RawImage;

const BLOCK: usize = 4096;
const BLOCKS: usize = 32;
const SIZE: u64 = (BLOCK * BLOCKS) as u64;

/// The primary's history: record `seq` (1-based) writes `fill` to block
/// `block`.
#[derive(Clone, Debug)]
struct Write1 {
    block: usize,
    fill: u8,
}

/// The volume after records 1..=upto.
fn image_after(history: &[Write1], upto: u64) -> Vec<u8> {
    let mut img = vec![0u8; BLOCK * BLOCKS];
    for w in history.iter().take(usize::try_from(upto).unwrap()) {
        img[w.block * BLOCK..(w.block + 1) * BLOCK].fill(w.fill);
    }
    img
}

/// How a session goes.
#[derive(Clone, Debug)]
struct Session {
    /// 0: the current epoch; 1: one older (must be refused).
    older: bool,
    /// Resync from the replica's position even when it could stream.
    force_resync: bool,
    /// Records to send after the starting point.
    records: u64,
    /// Send this many messages at most, then cut the connection.
    cut_after: Option<usize>,
    /// Send one record twice (the second must end the session).
    duplicate: bool,
}

fn session() -> impl Strategy<Value = Session> {
    (
        prop::bool::weighted(0.15),
        prop::bool::weighted(0.2),
        0u64..12,
        prop::option::weighted(0.5, 0usize..30),
        prop::bool::weighted(0.1),
    )
        .prop_map(
            |(older, force_resync, records, cut_after, duplicate)| Session {
                older,
                force_resync,
                records,
                cut_after,
                duplicate,
            },
        )
}

struct Replica {
    _dir: tempfile::TempDir,
    ctx: Arc<ReceiverContext>,
    group: Arc<Mutex<ReplicaGroup>>,
    image: Arc<RawImage>,
}

fn replica() -> Replica {
    let dir = tempfile::tempdir().unwrap();
    let site = replica_site(
        &dir.path().join("replica"),
        "dr",
        &["ny", "dr"],
        &dir.path().join("r.img"),
        SIZE,
    );
    Replica {
        _dir: dir,
        ctx: site.ctx,
        group: site.group,
        image: site.image,
    }
}

/// What one session showed.
struct Outcome {
    refused: bool,
    acks: Vec<Ack>,
    /// The highest record sent (or covered by a resync).
    sent: u64,
}

/// Plays one session as the primary of `epoch` would, at history
/// position `known` (records 1..=known exist).
fn play(r: &Replica, epoch: u64, history: &[Write1], known: u64, s: &Session) -> Outcome {
    let (mine, theirs) = UnixStream::pair().unwrap();
    theirs
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let ctx = Arc::clone(&r.ctx);
    let server = thread::spawn(move || {
        let reader = theirs.try_clone().unwrap();
        let _ = receiver::serve(&ctx, reader, theirs, None, None);
    });
    let mut w = mine.try_clone().unwrap();
    let mut scratch = Vec::new();
    let mut sent_messages = 0usize;
    let mut send = |w: &mut UnixStream, msg: Message| -> bool {
        if s.cut_after.is_some_and(|c| sent_messages >= c) {
            return false;
        }
        sent_messages += 1;
        write_message(w, &msg, &mut scratch).is_ok() && w.flush().is_ok()
    };
    // Everything the replica says goes to a channel (diffs are not
    // needed: every chunk is sent).
    let (tx, rx) = crossbeam_channel::unbounded();
    let reader = {
        let mine = mine.try_clone().unwrap();
        thread::spawn(move || {
            let mut r = BufReader::new(mine);
            let mut buf = Vec::new();
            while let Ok(m) = read_message(&mut r, &mut buf) {
                if tx.send(m).is_err() {
                    break;
                }
            }
        })
    };
    let hello = Message::Hello(Hello {
        version: tandem_peer::VERSION,
        primary: "ny".into(),
        replica: "dr".into(),
        group: "g".into(),
        epoch,
        fork_epoch: 0,
        fork_seq: 0,
        volumes: vec![("v".into(), SIZE)],
    });
    let mut outcome = Outcome {
        refused: false,
        acks: Vec::new(),
        sent: 0,
    };
    let welcome = if send(&mut w, hello) {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Message::Welcome(welcome)) => {
                // Then what the replica knows of where it may differ.
                match rx.recv_timeout(Duration::from_secs(20)) {
                    Ok(Message::Diverged(_)) => {}
                    other => panic!("expected diverged after the welcome, got {other:?}"),
                }
                Some(welcome)
            }
            Ok(Message::Refuse { .. }) => {
                outcome.refused = true;
                None
            }
            other => panic!("expected a welcome or a refusal, got {other:?}"),
        }
    } else {
        None
    };
    if let Some(welcome) = welcome {
        let streamable = welcome.state == tandem_peer::ReplicaState::Consistent
            && welcome.durable <= known
            && !s.force_resync;
        let mut next = if streamable {
            outcome.sent = welcome.durable;
            welcome.durable + 1
        } else {
            // Resync: every chunk of the image as of `known`, then the
            // stream from known + 1.
            let resume_at = known + 1;
            outcome.sent = known;
            let img = image_after(history, known);
            let mut ok = send(
                &mut w,
                Message::ResyncBegin {
                    epoch,
                    resume_at,
                    bytes: SIZE,
                },
            );
            let hashes = (0..BLOCKS)
                .map(|b| *blake3::hash(&img[b * BLOCK..(b + 1) * BLOCK]).as_bytes())
                .collect();
            ok = ok
                && send(
                    &mut w,
                    Message::Hashes {
                        volume: 0,
                        offset: 0,
                        chunk: BLOCK as u32,
                        hashes,
                    },
                );
            for b in 0..BLOCKS {
                ok = ok
                    && send(
                        &mut w,
                        Message::Chunk {
                            volume: 0,
                            offset: (b * BLOCK) as u64,
                            data: Payload::raw(img[b * BLOCK..(b + 1) * BLOCK].to_vec()),
                        },
                    );
            }
            ok = ok
                && send(
                    &mut w,
                    Message::ResyncEnd {
                        consistent_at: resume_at,
                    },
                );
            if ok {
                resume_at
            } else {
                u64::MAX
            }
        };
        let last = (known + s.records).min(history.len() as u64);
        while next <= last {
            let h = &history[usize::try_from(next - 1).unwrap()];
            let record = Message::Record(Record {
                epoch,
                seq: next,
                volume: 0,
                op: RecordOp::Write,
                fua: next == last,
                offset: (h.block * BLOCK) as u64,
                len: BLOCK as u64,
                data: Payload::raw(vec![h.fill; BLOCK]),
            });
            if !send(&mut w, record.clone()) {
                break;
            }
            outcome.sent = next;
            if s.duplicate && next == last {
                let _ = send(&mut w, record);
            }
            next += 1;
        }
    }
    // The session ends (or is cut): the primary stops sending; the
    // replica reads what was sent, commits it and closes.
    let _ = mine.shutdown(std::net::Shutdown::Write);
    server.join().unwrap();
    reader.join().unwrap();
    outcome.acks = rx
        .try_iter()
        .filter_map(|m| match m {
            Message::Ack(a) => Some(a),
            _ => None,
        })
        .collect();
    outcome
}

/// The replica's image is the history up to what it applied, when it
/// says it is consistent.
fn check_prefix(r: &Replica, history: &[Write1]) -> Result<(), TestCaseError> {
    let p = r.group.lock().position();
    if p.consistent && !p.new {
        let mut img = vec![0u8; BLOCK * BLOCKS];
        r.image.read(0, &mut img).unwrap();
        prop_assert!(
            img == image_after(history, p.applied),
            "consistent replica at {} is not that prefix",
            p.applied
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn a_replica_only_ever_holds_a_prefix_and_acknowledges_monotonically(
        writes in prop::collection::vec((0..BLOCKS, 1u8..=255), 20..60),
        sessions in prop::collection::vec(session(), 1..8),
    ) {
        let history: Vec<Write1> = writes.iter().map(|&(block, fill)| Write1 { block, fill }).collect();
        let r = replica();
        let epoch = 5;
        let mut known = 0u64;
        for s in &sessions {
            // The primary's history grows between sessions.
            known = (known + 4).min(history.len() as u64);
            let e = if s.older { epoch - 1 } else { epoch };
            let was = r.group.lock().position();
            let out = play(&r, e, &history, known, s);
            // A session cut before its hello was sent never asked.
            let asked = s.cut_after != Some(0);
            if s.older && was.epoch >= epoch {
                prop_assert!(out.refused || !asked, "an older epoch was accepted");
                prop_assert!(out.acks.is_empty());
                let now = r.group.lock().position();
                prop_assert_eq!(now.applied, was.applied, "an older epoch was applied");
            }
            for pair in out.acks.windows(2) {
                prop_assert!(pair[1].received >= pair[0].received && pair[1].durable >= pair[0].durable,
                    "acknowledgements went backwards: {:?}", out.acks);
            }
            for a in &out.acks {
                prop_assert!(a.received <= out.sent.max(was.received) && a.durable <= a.received,
                    "acknowledged {:?} beyond what was sent ({})", a, out.sent);
            }
            check_prefix(&r, &history)?;
        }
        // A session that runs to the end leaves the replica caught up.
        let all = history.len() as u64;
        let finish = Session { older: false, force_resync: false, records: all, cut_after: None, duplicate: false };
        let out = play(&r, epoch, &history, all, &finish);
        prop_assert!(!out.refused);
        let p = r.group.lock().position();
        prop_assert!(p.consistent, "caught up but inconsistent: {:?}", p);
        prop_assert_eq!(p.applied, all);
        check_prefix(&r, &history)?;
    }
}
