//! Who may open a session on a replica (docs/PEER.md, "Session"): only the
//! site the coordinator names owner of the group in the hello's epoch —
//! or, without a coordinator, the configured primary. A forged primary (a
//! member site that does not own the group) is refused whatever epoch it
//! claims, with or without a session running, and leaves the replica's
//! image and epoch as they were while the owner's session goes on. Also
//! the bounds a session checks against the volumes (docs/PEER.md,
//! "Bounds"): the 60-byte `Hashes` probe with a 4 GiB chunk ends the
//! session without the replica allocating for it.
#![allow(clippy::unwrap_used)]
#![allow(clippy::cast_possible_truncation)] // small test images

mod support;

use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use support::replica::{replica_site, ReplicaSite};
use tandem_peer::{
    read_message, write_message, Hello, Message, Payload, PeerError, Record, RecordOp,
};
use tandem_replication::owners::Owners;
use tandem_replication::receiver::{
    self, Membership, Owner, ProtocolError, ReceiverContext, Refusal, SessionError, OWNER_WAIT,
};
use tandem_replication::replica::Position;
use tandem_replication::session::replica::{judge_owner, OwnerVerdict, ReplicaSession};

const SIZE: u64 = 1 << 20;

fn hello(primary: &str, epoch: u64) -> Hello {
    Hello {
        version: tandem_peer::VERSION,
        primary: primary.into(),
        replica: "dr".into(),
        group: "g".into(),
        epoch,
        fork_epoch: 0,
        fork_seq: 0,
        volumes: vec![("v".into(), SIZE)],
    }
}

fn recorded(site: &str, epoch: u64) -> Owner {
    Owner::Recorded {
        site: site.into(),
        epoch,
    }
}

#[test]
fn only_the_owner_of_the_hellos_epoch_is_confirmed() {
    let h = hello("ny", 5);
    assert_eq!(judge_owner(&h, &recorded("ny", 5)), OwnerVerdict::Confirmed);
    assert_eq!(
        judge_owner(&h, &Owner::Configured("ny".into())),
        OwnerVerdict::Confirmed
    );
    // Another site owns this epoch, or a newer one is known: refused now.
    for owner in [
        recorded("r2", 5),
        recorded("ny", 6),
        recorded("r2", 6),
        Owner::Configured("r2".into()),
    ] {
        assert!(
            matches!(
                judge_owner(&h, &owner),
                OwnerVerdict::Refused(Refusal::NotOwner { .. })
            ),
            "{owner:?}"
        );
    }
    // Known only up to an older epoch, or no owner: a newer reading may
    // confirm it.
    for owner in [recorded("ny", 4), recorded("r2", 4), Owner::Unknown] {
        assert!(
            matches!(
                judge_owner(&h, &owner),
                OwnerVerdict::Unconfirmed(Refusal::NotOwner { .. })
            ),
            "{owner:?}"
        );
    }
    // The forged newer epoch of the probe.
    let forged = hello("r2", 51);
    assert!(matches!(
        judge_owner(&forged, &recorded("ny", 50)),
        OwnerVerdict::Unconfirmed(_)
    ));
}

fn held(epoch: u64) -> Position {
    Position {
        received: 0,
        durable: 0,
        applied: 0,
        epoch,
        tip_epoch: 0,
        consistent: false,
        new: true,
        resyncing: false,
        resync_epoch: 0,
        compared: 0,
        history: false,
        point: false,
    }
}

#[test]
fn a_session_starts_only_for_the_confirmed_owner() {
    let now = Instant::now();
    let owner = recorded("ny", 5);
    assert!(ReplicaSession::start("dr", &hello("ny", 5), &owner, &held(3), now).is_ok());
    for (h, o) in [
        (hello("r2", 51), owner.clone()),
        (hello("r2", 5), owner.clone()),
        (hello("ny", 5), Owner::Unknown),
    ] {
        let e = ReplicaSession::start("dr", &h, &o, &held(3), now).unwrap_err();
        assert!(matches!(e, Refusal::NotOwner { .. }), "{e}");
        assert!(e.to_string().contains("is not the owner of group g"), "{e}");
    }
    // The epoch rule still comes first.
    let e = ReplicaSession::start("dr", &hello("ny", 5), &owner, &held(6), now).unwrap_err();
    assert!(matches!(e, Refusal::OlderEpoch { .. }), "{e}");
}

#[test]
fn messages_must_stay_within_the_volumes() {
    let now = Instant::now();
    let (mut s, _) =
        ReplicaSession::start("dr", &hello("ny", 5), &recorded("ny", 5), &held(0), now).unwrap();
    let hashes = |volume, offset, chunk, n| Message::Hashes {
        volume,
        offset,
        chunk,
        hashes: vec![[0; 32]; n],
    };
    // What the primary sends: within the volume, the last chunk starting
    // inside it.
    assert!(s.step(hashes(0, 0, 65536, 16)).is_ok());
    assert!(s.step(hashes(0, SIZE - 4096, 4096, 1)).is_ok());
    for chunk in [0, 1, 4095, 3 << 12, 2 << 20, u32::MAX] {
        let e = s.step(hashes(0, 0, chunk, 1)).unwrap_err();
        assert!(matches!(e, ProtocolError::Chunks { .. }), "{e}");
    }
    let e = s
        .step(hashes(0, 0, 4096, tandem_peer::MAX_HASHES + 1))
        .unwrap_err();
    assert!(matches!(e, ProtocolError::Chunks { .. }), "{e}");
    for (offset, n) in [(SIZE, 1), (0, 257), (u64::MAX, 1), (u64::MAX - 4095, 2)] {
        let e = s.step(hashes(0, offset, 4096, n)).unwrap_err();
        assert!(matches!(e, ProtocolError::OutOfRange { .. }), "{e}");
    }
    let e = s.step(hashes(1, 0, 4096, 1)).unwrap_err();
    assert!(matches!(e, ProtocolError::NoSuchVolume { .. }), "{e}");
    let chunk = |volume, offset, len| Message::Chunk {
        volume,
        offset,
        data: Payload::zeroes(len),
    };
    assert!(s.step(chunk(0, SIZE - 4096, 4096)).is_ok());
    for (v, offset, len) in [(0, SIZE - 4095, 4096), (0, u64::MAX, 1), (u32::MAX, 0, 1)] {
        assert!(s.step(chunk(v, offset, len)).is_err());
    }
    let e = s.step(chunk(0, 0, tandem_peer::MAX_CHUNK + 1)).unwrap_err();
    assert!(matches!(e, ProtocolError::Chunks { .. }), "{e}");
    let record = |seq, volume, op, offset, len| {
        Message::Record(Record {
            epoch: 5,
            seq,
            volume,
            op,
            fua: false,
            offset,
            len,
            data: Payload::empty(),
        })
    };
    assert!(s.step(record(1, 0, RecordOp::Trim, 0, SIZE)).is_ok());
    assert!(s.step(record(2, 0, RecordOp::Trim, 1, SIZE)).is_err());
    assert!(s
        .step(record(3, 0, RecordOp::WriteZeroes, u64::MAX, 1))
        .is_err());
    assert!(s.step(record(4, 9, RecordOp::Flush, 0, 0)).is_err());
}

/// The replica "dr" of group "g" (sites ny, dr, r2), with a coordinator
/// whose owner record the test publishes.
struct Site {
    _dir: tempfile::TempDir,
    site: ReplicaSite,
    ctx: Arc<ReceiverContext>,
    owners: Arc<Owners>,
}

fn coordinated_replica() -> Site {
    let dir = tempfile::tempdir().unwrap();
    let site = replica_site(
        &dir.path().join("replica"),
        "dr",
        &["ny", "dr", "r2"],
        &dir.path().join("dr.img"),
        SIZE,
    );
    let owners = Arc::new(Owners::coordinated());
    let ctx = Arc::new(ReceiverContext {
        site: "dr".into(),
        groups: parking_lot::RwLock::new(site.ctx.groups.read().clone()),
        definer: parking_lot::RwLock::new(None),
        grantor: parking_lot::RwLock::new(None),
        owners: Arc::clone(&owners),
    });
    Site {
        _dir: dir,
        site,
        ctx,
        owners,
    }
}

/// A primary's end of a connection to the replica's receiver.
struct Peer {
    w: UnixStream,
    rx: Receiver<Message>,
    scratch: Vec<u8>,
    served: thread::JoinHandle<Result<(), SessionError>>,
}

impl Peer {
    fn connect(ctx: &Arc<ReceiverContext>) -> Peer {
        let (mine, theirs) = UnixStream::pair().unwrap();
        let ctx = Arc::clone(ctx);
        let served = thread::spawn(move || {
            let reader = theirs.try_clone().unwrap();
            receiver::serve(&ctx, reader, theirs, None, None)
        });
        let (tx, rx) = crossbeam_channel::unbounded();
        let r = mine.try_clone().unwrap();
        thread::spawn(move || {
            let mut r = BufReader::new(r);
            let mut buf = Vec::new();
            while let Ok(m) = read_message(&mut r, &mut buf) {
                if tx.send(m).is_err() {
                    break;
                }
            }
        });
        Peer {
            w: mine,
            rx,
            scratch: Vec::new(),
            served,
        }
    }

    /// Sends; whether the replica still took it.
    fn send(&mut self, msg: &Message) -> bool {
        write_message(&mut self.w, msg, &mut self.scratch).is_ok() && self.w.flush().is_ok()
    }

    fn answer(&self) -> Message {
        self.rx
            .recv_timeout(Duration::from_secs(20))
            .expect("an answer from the replica")
    }

    fn write(&mut self, epoch: u64, seq: u64, fill: u8) -> bool {
        self.send(&Message::Record(Record {
            epoch,
            seq,
            volume: 0,
            op: RecordOp::Write,
            fua: true,
            offset: (seq % 8) * 4096,
            len: 4096,
            data: Payload::raw(vec![fill; 4096]),
        }))
    }

    /// Waits for an acknowledgement making `seq` durable.
    fn durable(&self, seq: u64) {
        loop {
            match self.answer() {
                Message::Ack(a) if a.durable >= seq => return,
                Message::Ack(_) | Message::Pong(_) => {}
                other => panic!("expected an ack, got {other:?}"),
            }
        }
    }
}

fn image(site: &Site) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE as usize];
    site.site.image.read(0, &mut buf).unwrap();
    buf
}

fn refused(peer: Peer) -> String {
    let reason = match peer.answer() {
        Message::Refuse { reason } => reason,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let e = peer.served.join().unwrap().unwrap_err();
    assert!(
        matches!(
            e,
            SessionError::Protocol(ProtocolError::Refused(Refusal::NotOwner { .. }))
        ),
        "{e}"
    );
    reason
}

#[test]
fn a_forged_primary_is_refused_and_the_owners_session_goes_on() {
    let site = coordinated_replica();
    site.owners.publish("g", Some(("ny", 5)));
    let mut ny = Peer::connect(&site.ctx);
    assert!(ny.send(&Message::Hello(hello("ny", 5))));
    assert!(matches!(ny.answer(), Message::Welcome(_)));
    assert!(matches!(ny.answer(), Message::Diverged(_)));
    assert!(ny.write(5, 1, 0x11));
    ny.durable(1);
    let before = image(&site);

    // While ny streams: r2 (a member, not the owner) claims epoch 51, and
    // writes anyway.
    let started = Instant::now();
    let mut forged = Peer::connect(&site.ctx);
    assert!(forged.send(&Message::Hello(hello("r2", 51))));
    for seq in 2..10 {
        let _ = forged.write(51, seq, 0xEE);
    }
    let reason = refused(forged);
    assert!(
        reason.contains("r2 is not the owner of group g in epoch 51")
            && reason.contains("names ny owner in epoch 5"),
        "{reason}"
    );
    // It waited for a newer reading of the coordinator, boundedly.
    let waited = started.elapsed();
    assert!(
        waited >= OWNER_WAIT && waited < OWNER_WAIT + Duration::from_secs(5),
        "{waited:?}"
    );
    assert_eq!(site.site.position.lock().epoch, 5);
    assert_eq!(image(&site), before);

    // ny's session goes on.
    assert!(ny.write(5, 2, 0x22));
    ny.durable(2);
    ny.w.shutdown(std::net::Shutdown::Write).unwrap();
    ny.served.join().unwrap().unwrap();
    let after = image(&site);
    assert_eq!(&after[2 * 4096..3 * 4096], &[0x22; 4096][..]);

    // With no session running: the forged hello of the same epoch is
    // refused at once, a newer one after the wait; neither changes the
    // epoch or the image, and ny is welcome again.
    for (epoch, quick) in [(5, true), (51, false)] {
        let started = Instant::now();
        let mut forged = Peer::connect(&site.ctx);
        assert!(forged.send(&Message::Hello(hello("r2", epoch))));
        let _ = forged.write(epoch, 3, 0xEE);
        refused(forged);
        assert_eq!(started.elapsed() < OWNER_WAIT, quick, "epoch {epoch}");
        assert_eq!(site.site.position.lock().epoch, 5);
        assert_eq!(image(&site), after);
    }
    let mut ny = Peer::connect(&site.ctx);
    assert!(ny.send(&Message::Hello(hello("ny", 5))));
    assert!(matches!(ny.answer(), Message::Welcome(_)));
    assert!(matches!(ny.answer(), Message::Diverged(_)));
    assert!(ny.write(5, 3, 0x33));
    ny.durable(3);
}

#[test]
fn a_new_owners_hello_waits_for_the_reading_that_names_it() {
    let site = coordinated_replica();
    site.owners.publish("g", Some(("ny", 5)));
    // r2 took over in epoch 6; this replica's last reading is older.
    let owners = Arc::clone(&site.owners);
    let publisher = thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        owners.publish("g", Some(("r2", 6)));
    });
    let started = Instant::now();
    let mut r2 = Peer::connect(&site.ctx);
    assert!(r2.send(&Message::Hello(hello("r2", 6))));
    assert!(matches!(r2.answer(), Message::Welcome(_)));
    assert!(matches!(r2.answer(), Message::Diverged(_)));
    assert!(started.elapsed() >= Duration::from_millis(300));
    publisher.join().unwrap();
    assert_eq!(site.site.position.lock().epoch, 6);
    // The former owner is turned away at once.
    let started = Instant::now();
    let mut ny = Peer::connect(&site.ctx);
    assert!(ny.send(&Message::Hello(hello("ny", 5))));
    assert!(matches!(ny.answer(), Message::Refuse { .. }));
    assert!(started.elapsed() < OWNER_WAIT);
    // Without a coordinator, only the configured primary.
    let none = Membership {
        group: "g".into(),
        primary: "ny".into(),
        sites: vec!["ny".into(), "dr".into()],
        volumes: vec![("v".into(), SIZE)],
    };
    assert_eq!(
        Owners::configured().owner(&none),
        Owner::Configured("ny".into())
    );
}

#[test]
fn the_60_byte_hashes_probe_ends_the_session_without_allocating() {
    let site = coordinated_replica();
    site.owners.publish("g", Some(("ny", 5)));
    let mut ny = Peer::connect(&site.ctx);
    assert!(ny.send(&Message::Hello(hello("ny", 5))));
    assert!(matches!(ny.answer(), Message::Welcome(_)));
    assert!(matches!(ny.answer(), Message::Diverged(_)));
    // Hashes: volume 0, offset 0, chunk 0xFFFFFFFF, one hash.
    let mut payload = Vec::new();
    payload.extend_from_slice(&0u32.to_le_bytes());
    payload.extend_from_slice(&0u64.to_le_bytes());
    payload.extend_from_slice(&u32::MAX.to_le_bytes());
    payload.extend_from_slice(&1u32.to_le_bytes());
    payload.extend_from_slice(&[9; 32]);
    let mut frame = Vec::new();
    frame.extend_from_slice(&tandem_peer::MAGIC.to_le_bytes());
    frame.extend_from_slice(&[7, 0, 0, 0]);
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    frame.extend_from_slice(&payload);
    assert_eq!(frame.len(), 68);
    ny.w.write_all(&frame).unwrap();
    let e = ny.served.join().unwrap().unwrap_err();
    assert!(
        matches!(
            e,
            SessionError::Peer(PeerError::OutOfBounds { field: "chunk", .. })
        ),
        "{e}"
    );
}
