//! The primary's side of replication to one replica site, as a machine
//! over decoded messages and the shipper's own steps (docs/PEER.md): how
//! a welcome is judged (stream on, resume what is still owed, compare
//! what either side knows may differ, or compare everything), what an
//! acknowledgement advances, which `Diff` answers which `Hashes`, when a
//! resynced replica is a consistent prefix again, and how the link is
//! doing for status. No I/O: the shipper (`crate::shipper`) moves bytes
//! and carries the outcomes out on the capture.
//!
//! The shipper's two threads (sending, and reading acknowledgements) step
//! one machine under one lock, so whatever order their inputs arrive in,
//! the outcome is the same: a replica whose `ResyncDone` and next `Ack`
//! arrive before the sender has registered the resync's end is still
//! judged consistent once both are known.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tandem_peer::{Ack, Diverged, Message, ReplicaState, Welcome};

use super::Tip;

/// How a replication link is doing, for status and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LinkState {
    #[default]
    Disconnected,
    Resyncing,
    Streaming,
}

/// Why a session with a replica ended.
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error("cannot connect: {0}")]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Peer(#[from] tandem_peer::PeerError),
    #[error("no welcome: {0}")]
    NoWelcome(tandem_peer::PeerError),
    #[error("replica refused: {0}")]
    Refused(String),
    #[error("unexpected {0} from the replica")]
    Unexpected(&'static str),
    #[error("diff for volume {got_volume} offset {got_offset}, expected volume {volume} offset {offset}")]
    DiffMismatch {
        got_volume: u32,
        got_offset: u64,
        volume: u32,
        offset: u64,
    },
    #[error("a diff for volume {volume} offset {offset} that no hashes asked for")]
    UnaskedDiff { volume: u32, offset: u64 },
    #[error("replica acknowledged record {acked}, but only records up to {sent} were sent")]
    AckBeyondSent { acked: u64, sent: u64 },
    #[error("replica silent for {0:?}")]
    Silent(Duration),
    #[error(transparent)]
    Capture(#[from] tandem_capture::CaptureError),
    #[error(transparent)]
    Volume(#[from] tandem_volume::VolumeError),
    #[error(transparent)]
    Replica(#[from] crate::ReplicaError),
    #[error("the replica did not catch up within {0:?}; verify again later")]
    CatchUp(Duration),
    #[error("cannot start the acknowledgement reader: {0}")]
    Thread(std::io::Error),
    #[error("the acknowledgement reader ended")]
    ReaderEnded,
    #[error("the acknowledgement reader panicked")]
    ReaderPanicked,
    #[error("stopping")]
    Stopping,
    #[error("verify failed: {0}")]
    Verify(std::sync::Arc<ShipError>),
    #[error("link to the replica site: {0}")]
    Link(std::sync::Arc<ShipError>),
    #[error("the link to the replica site closed")]
    LinkClosed,
    #[error("the replica ended the session: {0}")]
    Ended(String),
    #[error("the replica says volume index {volume} may differ at offset {offset} ({len} bytes), outside the group's volumes")]
    DivergedOutside { volume: u32, offset: u64, len: u64 },
}

/// Why a connection to a replica could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot resolve {address}: {source}")]
    Resolve {
        address: String,
        source: std::io::Error,
    },
    #[error("no address for {0}")]
    NoAddress(String),
    #[error("connect to {site} at {addr}: {source}")]
    Connect {
        site: String,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tandem_tls::TlsError),
    #[error("socket: {0}")]
    Socket(std::io::Error),
}

/// How a welcome is followed up (docs/PEER.md, "Divergence").
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Opening {
    /// The replica is on this primary's history: it holds every record up
    /// to `durable`; the stream goes on from there.
    Stream { durable: u64 },
    /// The replica is inconsistent because of a resync of this epoch:
    /// what the capture still owes it (kept in the persistent dirty map
    /// until the replica confirms it durably) is all that may differ.
    /// With `durable`, the replica's records up to there are of this
    /// history (it is past the resync's end).
    Resume { durable: Option<u64> },
    /// The replica served the epoch this primary forked from and holds
    /// writes this primary may lack, all inside `ranges` (per volume):
    /// those ranges and this primary's own dirty map are compared.
    CompareKnown { ranges: Vec<Vec<(u64, u64)>> },
    /// Every region must be compared (only differing chunks move).
    CompareAll(Mismatch),
}

/// Why a replica is compared in full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mismatch {
    /// Its records are of another history than this primary's.
    OtherHistory { tip: Tip, fork: Tip },
    /// It holds records this primary never issued.
    Ahead { durable: u64, next: u64 },
    /// It is new, or was interrupted in a resync this primary cannot
    /// account for (of another epoch, or with nothing owed here).
    NotConsistent(ReplicaState),
}

/// What an incoming message asks of the capture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    Nothing,
    /// The replica has received up to `received`, holds up to `durable`.
    Acked {
        received: u64,
        durable: u64,
    },
    /// Hand this diff, which answers `asked`, to the sender's comparison.
    Diff {
        asked: Asked,
        bitmap: Vec<u8>,
    },
    /// The resync resuming at `resume_at` is durable on the replica.
    ResyncDone {
        resume_at: u64,
    },
}

/// A resync in progress, as far as its end is known.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Resync {
    resume_at: u64,
    /// Registered once every chunk was read: consistent once the replica
    /// has applied every record below this.
    consistent_at: Option<u64>,
    /// The replica said it is done (`ResyncDone`): acknowledgements from
    /// here on reflect the resynced images.
    done: bool,
    /// `applied` of the first acknowledgement after `done`.
    applied_after: Option<u64>,
}

/// Hashes sent and not yet answered: (volume, offset, chunk, count).
pub type Asked = (u32, u64, u32, usize);

/// The primary's side of the link to one replica, across reconnects.
#[derive(Clone, Debug)]
pub struct ShipperSession {
    epoch: u64,
    fork: Tip,
    state: LinkState,
    connected_since: Option<Instant>,
    /// Latest acknowledgement (monotone within a connection).
    acked: Ack,
    /// The highest record sent on this connection, or the welcome's
    /// durable: nothing above may be acknowledged.
    sent: u64,
    replica_state: Option<ReplicaState>,
    replica_consistent: bool,
    /// The replica keeps history (its welcome said so).
    replica_history: bool,
    /// It holds a recovery point: its welcome said so, or a mark sent on
    /// this connection is durable there.
    replica_point: bool,
    /// The last mark sent on this connection to a replica that keeps
    /// history, not yet known durable there.
    mark_pending: Option<u64>,
    resync: Option<Resync>,
    asked: VecDeque<Asked>,
    resync_total: u64,
    resync_done: u64,
    resync_sent: u64,
    /// Bytes owed after the current resync part (0: its last part).
    resync_more: u64,
    rtt: Option<Duration>,
    connects: u64,
    last_error: Option<String>,
}

/// What status shows of a link.
#[derive(Clone, Debug, Default)]
pub struct LinkInfo {
    pub state: LinkState,
    pub connected_since: Option<Instant>,
    pub received: u64,
    pub durable: u64,
    pub applied: u64,
    pub replica_state: Option<&'static str>,
    pub rtt: Option<Duration>,
    pub resync_total: u64,
    pub resync_done: u64,
    pub resync_sent: u64,
    pub raw_bytes: u64,
    pub wire_bytes: u64,
    /// Bytes of the primary's images hashed to compare them with this
    /// replica's (filled in by the shipper).
    pub compare_bytes: u64,
    pub last_error: Option<String>,
    pub connects: u64,
    /// The replica's images are a prefix of the stream (as last reported,
    /// or once it has applied everything below the resync's end).
    pub replica_consistent: bool,
    /// The replica can be promoted at a consistent point: its images are
    /// a prefix, or it keeps history and holds a recovery point (a resync
    /// in progress would be undone: docs/HISTORY.md, "Always promotable").
    pub replica_promotable: bool,
}

impl ShipperSession {
    pub fn new(epoch: u64, fork: Tip) -> ShipperSession {
        ShipperSession {
            epoch,
            fork,
            state: LinkState::Disconnected,
            connected_since: None,
            acked: Ack {
                received: 0,
                durable: 0,
                applied: 0,
            },
            sent: 0,
            replica_state: None,
            replica_consistent: false,
            replica_history: false,
            replica_point: false,
            mark_pending: None,
            resync: None,
            asked: VecDeque::new(),
            resync_total: 0,
            resync_done: 0,
            resync_sent: 0,
            resync_more: 0,
            rtt: None,
            connects: 0,
            last_error: None,
        }
    }

    /// The replica's welcome and what it knows of where it may differ
    /// (`Diverged`), with the capture's next sequence number, whether the
    /// capture still owes this replica ranges (`owed`: a resync handed
    /// out and not confirmed, or dirty ranges) and the group's volume
    /// sizes: how the session goes on. Also the start of a connection.
    ///
    /// What may differ after an outage is the union of what each side
    /// knows: this primary's dirty map (every write since it began its
    /// epoch that some replica has not durably confirmed, and every range
    /// it owes a replica) and, for a demoted primary of the epoch this one
    /// forked from, that site's own dirty map at its demotion. A new
    /// replica, or one whose divergence neither side can name, is compared
    /// in full.
    pub fn welcome(
        &mut self,
        w: &Welcome,
        d: &Diverged,
        next: u64,
        owed: bool,
        sizes: &[u64],
        now: Instant,
    ) -> Result<Opening, ShipError> {
        let opening = self.judge(w, d, next, owed, sizes)?;
        let durable = match opening {
            Opening::Stream { durable }
            | Opening::Resume {
                durable: Some(durable),
            } => durable,
            _ => 0,
        };
        self.state = LinkState::Streaming;
        self.connected_since = Some(now);
        self.acked = Ack {
            received: durable,
            durable,
            applied: w.applied.min(durable),
        };
        self.sent = durable;
        self.replica_state = Some(w.state);
        self.replica_consistent = w.state == ReplicaState::Consistent;
        self.replica_history = w.history;
        self.replica_point = w.history && w.point;
        self.mark_pending = None;
        self.resync = None;
        self.resync_more = 0;
        self.asked.clear();
        self.connects += 1;
        self.last_error = None;
        Ok(opening)
    }

    /// The decision of [`ShipperSession::welcome`].
    fn judge(
        &self,
        w: &Welcome,
        d: &Diverged,
        next: u64,
        owed: bool,
        sizes: &[u64],
    ) -> Result<Opening, ShipError> {
        let tip = (w.epoch, w.durable);
        let on_history = w.epoch == self.epoch || tip == self.fork;
        // A resync of this epoch began there: this primary's capture owes
        // it every range that resync has not yet confirmed.
        let ours = d.resync_epoch == self.epoch;
        // A new replica whose first resync (of this epoch) was
        // interrupted is resumed like any other; otherwise it is compared
        // in full.
        if w.state == ReplicaState::New && !(ours && owed) {
            return Ok(Opening::CompareAll(Mismatch::NotConsistent(w.state)));
        }
        if on_history {
            return Ok(if w.durable >= next {
                Opening::CompareAll(Mismatch::Ahead {
                    durable: w.durable,
                    next,
                })
            } else if w.state == ReplicaState::Consistent {
                Opening::Stream { durable: w.durable }
            } else if ours {
                Opening::Resume {
                    durable: Some(w.durable),
                }
            } else {
                Opening::CompareAll(Mismatch::NotConsistent(w.state))
            });
        }
        if w.state != ReplicaState::Consistent {
            // Before its first part ended there: its tip is still of the
            // history it had. Only what this capture owes may differ.
            return Ok(if ours && owed {
                Opening::Resume { durable: None }
            } else {
                Opening::CompareAll(Mismatch::NotConsistent(w.state))
            });
        }
        // Consistent, off this history: a former owner of the epoch this
        // primary forked from, at or past the fork, can name its writes
        // beyond it; anything else cannot.
        if d.known && w.epoch == self.fork.0 && w.durable >= self.fork.1 {
            let mut ranges = vec![Vec::new(); sizes.len()];
            for &(volume, offset, len) in &d.ranges {
                let size = sizes.get(volume as usize).copied();
                match (ranges.get_mut(volume as usize), size) {
                    (Some(list), Some(size))
                        if offset.checked_add(len).is_some_and(|e| e <= size) =>
                    {
                        if len > 0 {
                            list.push((offset, len));
                        }
                    }
                    _ => {
                        return Err(ShipError::DivergedOutside {
                            volume,
                            offset,
                            len,
                        })
                    }
                }
            }
            return Ok(Opening::CompareKnown { ranges });
        }
        Ok(Opening::CompareAll(Mismatch::OtherHistory {
            tip,
            fork: self.fork,
        }))
    }

    /// The connection ended.
    pub fn disconnected(&mut self, error: &ShipError) {
        self.state = LinkState::Disconnected;
        self.connected_since = None;
        self.resync = None;
        self.asked.clear();
        self.last_error = Some(error.to_string());
    }

    /// Whether `error` is news (the first of its kind in a row), for the
    /// log.
    pub fn is_new_error(&self, error: &ShipError) -> bool {
        self.last_error.as_deref() != Some(&error.to_string())
    }

    /// Record `seq` is about to be sent (before it is written: an
    /// acknowledgement cannot overtake this).
    pub fn sending(&mut self, seq: u64) {
        self.sent = self.sent.max(seq);
    }

    /// Whether the replica holds, durably and applied, everything sent,
    /// with no resync in progress: the link has nothing left to hurry.
    pub fn settled(&self) -> bool {
        self.resync.is_none() && self.acked.durable >= self.sent && self.acked.applied >= self.sent
    }

    /// A message from the replica.
    pub fn receive(&mut self, msg: Message, now_nanos: u64) -> Result<Incoming, ShipError> {
        Ok(match msg {
            Message::Ack(a) => {
                let limit = self.sent.max(self.acked.received);
                if a.received > limit || a.durable > limit {
                    return Err(ShipError::AckBeyondSent {
                        acked: a.received.max(a.durable),
                        sent: limit,
                    });
                }
                let before = self.acked;
                if self.mark_pending.is_some_and(|m| a.durable >= m) {
                    self.mark_pending = None;
                    self.replica_point = true;
                }
                self.acked = Ack {
                    received: before.received.max(a.received),
                    durable: before.durable.max(a.durable),
                    applied: before.applied.max(a.applied),
                };
                if let Some(r) = self.resync.as_mut() {
                    if r.done {
                        r.applied_after = Some(r.applied_after.unwrap_or(0).max(a.applied));
                    }
                }
                self.judge_consistency();
                if self.acked.received > before.received || self.acked.durable > before.durable {
                    Incoming::Acked {
                        received: self.acked.received,
                        durable: self.acked.durable,
                    }
                } else {
                    Incoming::Nothing
                }
            }
            Message::Diff {
                volume,
                offset,
                bitmap,
                ..
            } => Incoming::Diff {
                asked: self.answer(volume, offset)?,
                bitmap,
            },
            Message::ResyncDone { resume_at } => {
                match self.resync.as_mut() {
                    Some(r) if r.resume_at == resume_at => {
                        r.done = true;
                        r.applied_after = None;
                    }
                    _ => {}
                }
                // Everything below resume_at is durable there.
                Incoming::ResyncDone { resume_at }
            }
            Message::Pong(sent) => {
                self.rtt = Some(Duration::from_nanos(now_nanos.saturating_sub(sent)));
                Incoming::Nothing
            }
            Message::Ping(_) => Incoming::Nothing,
            Message::Refuse { reason } => return Err(ShipError::Refused(reason)),
            Message::End { reason } => return Err(ShipError::Ended(reason)),
            other => return Err(ShipError::Unexpected(other.kind())),
        })
    }

    /// A resync (part) starts: `total` bytes to compare, `more` owed after
    /// it, records resume at `resume_at`. The replica is not a prefix
    /// until its last part ends. Progress counts across the parts.
    pub fn resync_begins(&mut self, resume_at: u64, total: u64, more: u64) {
        self.state = LinkState::Resyncing;
        self.replica_consistent = false;
        self.resync = Some(Resync {
            resume_at,
            ..Resync::default()
        });
        self.asked.clear();
        if self.resync_more == 0 {
            self.resync_done = 0;
            self.resync_sent = 0;
        }
        self.resync_total = self.resync_done + total + more;
        self.resync_more = more;
        // The resync covers every record below resume_at (docs/PEER.md).
        self.sent = self.sent.max(resume_at.saturating_sub(1));
    }

    /// Every chunk was read and sent: consistent once the replica has
    /// applied every record below `consistent_at`.
    pub fn resync_ends(&mut self, consistent_at: u64) {
        if let Some(r) = self.resync.as_mut() {
            r.consistent_at = Some(consistent_at);
        }
        self.state = LinkState::Streaming;
        self.judge_consistency();
    }

    fn judge_consistency(&mut self) {
        let Some(r) = self.resync else { return };
        if let (Some(at), true, Some(applied)) = (r.consistent_at, r.done, r.applied_after) {
            if applied + 1 >= at {
                self.replica_consistent = true;
                self.resync = None;
            }
        }
    }

    /// Hashes are about to be sent: their `Diff` is expected in order.
    pub fn asking(&mut self, asked: Asked) {
        self.asked.push_back(asked);
    }

    /// A diff arrived: it must answer the oldest hashes outstanding.
    /// Returns what they asked about.
    fn answer(&mut self, volume: u32, offset: u64) -> Result<Asked, ShipError> {
        let Some(&asked) = self.asked.front() else {
            return Err(ShipError::UnaskedDiff { volume, offset });
        };
        if (asked.0, asked.1) != (volume, offset) {
            return Err(ShipError::DiffMismatch {
                got_volume: volume,
                got_offset: offset,
                volume: asked.0,
                offset: asked.1,
            });
        }
        self.asked.pop_front();
        Ok(asked)
    }

    /// Progress of the comparison.
    pub fn compared(&mut self, bytes: u64, sent: u64) {
        self.resync_done += bytes;
        self.resync_sent += sent;
    }

    pub fn state(&self) -> LinkState {
        self.state
    }

    pub fn acked(&self) -> Ack {
        self.acked
    }

    pub fn replica_consistent(&self) -> bool {
        self.replica_consistent
    }

    /// A mark naming record `seq` was sent: a replica that keeps history
    /// makes it a recovery point, held once `seq` is durable there.
    pub fn marked(&mut self, seq: u64) {
        if self.replica_history && !self.replica_point {
            self.mark_pending = Some(seq);
        }
    }

    /// What status shows; `(raw, wire)` are the link's byte counters.
    pub fn info(&self, bytes: (u64, u64)) -> LinkInfo {
        LinkInfo {
            state: self.state,
            connected_since: self.connected_since,
            received: self.acked.received,
            durable: self.acked.durable,
            applied: self.acked.applied,
            replica_state: self.replica_state.map(ReplicaState::as_str),
            rtt: self.rtt,
            resync_total: self.resync_total,
            resync_done: self.resync_done,
            resync_sent: self.resync_sent,
            raw_bytes: bytes.0,
            wire_bytes: bytes.1,
            compare_bytes: 0,
            last_error: self.last_error.clone(),
            connects: self.connects,
            replica_consistent: self.replica_consistent,
            replica_promotable: self.replica_consistent || self.replica_point,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn welcome(durable: u64) -> Welcome {
        Welcome {
            replica: "dr".into(),
            epoch: 1,
            applied: durable,
            durable,
            state: ReplicaState::Consistent,
            history: false,
            point: false,
        }
    }

    const NONE: Diverged = Diverged {
        resync_epoch: 0,
        known: false,
        ranges: Vec::new(),
    };

    fn ack(received: u64, durable: u64, applied: u64) -> Message {
        Message::Ack(Ack {
            received,
            durable,
            applied,
        })
    }

    /// What can reach the session while a resync ends: the sender's own
    /// registration of the end, and the replica's answers in their stream
    /// order (`ResyncDone`, then acknowledgements), with stale
    /// acknowledgements of before the resync mixed in.
    #[derive(Clone, Debug)]
    enum Step {
        Registered,
        Done,
        Ack { applied: u64 },
        Stale { applied: u64 },
    }

    proptest! {
        /// Whatever order the sender's bookkeeping and the replica's
        /// answers arrive in, a replica that has applied everything below
        /// the resync's end is judged consistent, and never before its
        /// `ResyncDone` (acknowledgements from before say nothing about
        /// the resynced images).
        #[test]
        fn a_caught_up_replica_is_never_left_inconsistent(
            resume_at in 1u64..1000,
            writes_meanwhile in 0u64..50,
            registered_at in 0usize..4,
            stale in proptest::collection::vec(0u64..5000, 0..4),
            acks_after in 1usize..4,
        ) {
            let now = Instant::now();
            let consistent_at = resume_at + writes_meanwhile;
            let mut s = ShipperSession::new(1, (0, 0));
            s.welcome(&welcome(resume_at - 1), &NONE, consistent_at + 10, false, &[], now).unwrap();
            s.resync_begins(resume_at, 1 << 20, 0);
            s.sending(consistent_at + 10);
            // The replica's stream: stale acks, ResyncDone, then acks that
            // climb to consistent_at - 1.
            let mut stream: Vec<Step> = stale.iter().map(|&a| Step::Stale { applied: a }).collect();
            stream.push(Step::Done);
            for i in 1..=acks_after {
                let applied = resume_at - 1 + writes_meanwhile * i as u64 / acks_after as u64;
                stream.push(Step::Ack { applied });
            }
            let at = registered_at.min(stream.len());
            stream.insert(at, Step::Registered);
            let mut done = false;
            for step in stream {
                match step {
                    Step::Registered => s.resync_ends(consistent_at),
                    Step::Done => {
                        done = true;
                        s.receive(Message::ResyncDone { resume_at }, 0).unwrap();
                    }
                    Step::Ack { applied } | Step::Stale { applied } => {
                        let applied = applied.min(consistent_at + 10);
                        s.receive(ack(applied, applied, applied), 0).unwrap();
                    }
                }
                prop_assert!(done || !s.replica_consistent(), "consistent before ResyncDone");
            }
            prop_assert!(s.replica_consistent(), "left inconsistent after catching up");
        }

        /// Acknowledgements duplicated, reordered or stale never move the
        /// primary's view backwards, and one beyond what was sent is a
        /// protocol error.
        #[test]
        fn acknowledgements_are_monotone_and_never_beyond_what_was_sent(
            sent in 1u64..10_000,
            acks in proptest::collection::vec((0u64..12_000, 0u64..12_000), 1..40),
        ) {
            let now = Instant::now();
            let mut s = ShipperSession::new(1, (0, 0));
            s.welcome(&welcome(0), &NONE, sent + 1, false, &[], now).unwrap();
            s.sending(sent);
            let mut last = (0, 0);
            for (received, durable) in acks {
                let durable = durable.min(received);
                match s.receive(ack(received, durable, durable), 0) {
                    Ok(Incoming::Acked { received, durable }) => {
                        prop_assert!(received >= last.0 && durable >= last.1);
                        prop_assert!(received > last.0 || durable > last.1, "reported without advancing");
                        last = (received, durable);
                    }
                    Ok(_) => {}
                    Err(ShipError::AckBeyondSent { .. }) => {
                        prop_assert!(received > sent || durable > sent);
                        continue;
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("{e}"))),
                }
                prop_assert!(received <= sent && durable <= sent);
                let a = s.acked();
                prop_assert!(a.received >= last.0 && a.durable >= last.1);
                prop_assert!(a.received <= sent && a.durable <= sent);
            }
        }

        /// A diff must answer the oldest hashes outstanding.
        #[test]
        fn diffs_answer_hashes_in_order(asks in proptest::collection::vec((0u32..3, 0u64..1000), 1..20), skip in 0usize..20) {
            let now = Instant::now();
            let mut s = ShipperSession::new(1, (0, 0));
            s.welcome(&welcome(0), &NONE, 1, false, &[], now).unwrap();
            for &(v, o) in &asks {
                s.asking((v, o * 65536, 65536, 4));
            }
            let skip = skip % asks.len();
            let (v, o) = asks[skip];
            let got = s.receive(Message::Diff { volume: v, offset: o * 65536, chunk: 65536, bitmap: vec![0] }, 0);
            if asks[0] == (v, o) {
                let answered = matches!(got, Ok(Incoming::Diff { asked, .. }) if asked == (v, o * 65536, 65536, 4));
                prop_assert!(answered);
            } else {
                let mismatch = matches!(got, Err(ShipError::DiffMismatch { .. }));
                prop_assert!(mismatch);
            }
        }
    }

    #[test]
    fn a_link_settles_once_everything_sent_is_durable_and_applied() {
        let now = Instant::now();
        let mut s = ShipperSession::new(1, (0, 0));
        s.welcome(&welcome(10), &NONE, 11, false, &[], now).unwrap();
        assert!(s.settled(), "nothing sent yet");
        s.sending(12);
        assert!(!s.settled(), "12 in flight");
        s.receive(ack(12, 11, 11), 0).expect("ack");
        assert!(!s.settled(), "12 received, not durable");
        s.receive(ack(12, 12, 11), 0).expect("ack");
        assert!(!s.settled(), "12 durable, not applied");
        s.receive(ack(12, 12, 12), 0).expect("ack");
        assert!(s.settled());
        s.resync_begins(13, 4096, 0);
        assert!(!s.settled(), "a resync is in progress");
    }

    #[test]
    fn a_replica_with_a_recovery_point_stays_promotable_through_a_resync() {
        let now = Instant::now();
        let promotable = |s: &ShipperSession| s.info((0, 0)).replica_promotable;
        // Mid-resync, and it says it holds a point: promotable at once.
        let mut s = ShipperSession::new(1, (0, 0));
        let holding = Welcome {
            state: ReplicaState::Inconsistent,
            history: true,
            point: true,
            ..welcome(10)
        };
        s.welcome(&holding, &NONE, 11, false, &[1 << 20], now)
            .unwrap();
        s.resync_begins(11, 1 << 20, 0);
        assert!(!s.replica_consistent());
        assert!(promotable(&s));

        // No history: a resync leaves it inconsistent, marks or not.
        let mut s = ShipperSession::new(1, (0, 0));
        s.welcome(&welcome(10), &NONE, 11, false, &[], now).unwrap();
        s.sending(11);
        s.marked(11);
        s.receive(ack(11, 11, 11), 0).expect("ack");
        s.resync_begins(12, 4096, 0);
        assert!(!promotable(&s));

        // History, no point yet: a mark makes one once durable there.
        let mut s = ShipperSession::new(1, (0, 0));
        let keeping = Welcome {
            history: true,
            ..welcome(10)
        };
        s.welcome(&keeping, &NONE, 11, false, &[], now).unwrap();
        s.sending(12);
        s.marked(12);
        s.receive(ack(12, 11, 11), 0).expect("ack");
        s.resync_begins(13, 4096, 0);
        assert!(!promotable(&s), "the mark's record is not durable there");
        s.receive(ack(12, 12, 12), 0).expect("ack");
        assert!(promotable(&s));
        // A new connection believes the replica's welcome again.
        s.welcome(
            &Welcome {
                state: ReplicaState::Inconsistent,
                ..keeping
            },
            &NONE,
            13,
            false,
            &[4096],
            now,
        )
        .unwrap();
        assert!(!promotable(&s));
    }

    #[test]
    fn an_unasked_diff_is_a_protocol_error() {
        let now = Instant::now();
        let mut s = ShipperSession::new(1, (0, 0));
        s.welcome(&welcome(0), &NONE, 1, false, &[], now).unwrap();
        let got = s.receive(
            Message::Diff {
                volume: 0,
                offset: 0,
                chunk: 4096,
                bitmap: vec![],
            },
            0,
        );
        assert!(matches!(got, Err(ShipError::UnaskedDiff { .. })));
    }

    #[test]
    fn a_welcome_off_this_primarys_history_compares_everything() {
        let now = Instant::now();
        let mut s = ShipperSession::new(3, (2, 100));
        let at_fork = Welcome {
            epoch: 2,
            durable: 100,
            ..welcome(100)
        };
        assert_eq!(
            s.welcome(&at_fork, &NONE, 150, false, &[], now).unwrap(),
            Opening::Stream { durable: 100 }
        );
        let past_fork = Welcome {
            epoch: 2,
            durable: 101,
            ..welcome(101)
        };
        assert!(matches!(
            s.welcome(&past_fork, &NONE, 150, false, &[], now).unwrap(),
            Opening::CompareAll(Mismatch::OtherHistory { .. })
        ));
        let ahead = Welcome {
            epoch: 3,
            durable: 200,
            ..welcome(200)
        };
        assert!(matches!(
            s.welcome(&ahead, &NONE, 150, false, &[], now).unwrap(),
            Opening::CompareAll(Mismatch::Ahead { .. })
        ));
        let new = Welcome {
            epoch: 3,
            durable: 0,
            state: ReplicaState::New,
            ..welcome(0)
        };
        assert!(matches!(
            s.welcome(&new, &NONE, 150, false, &[], now).unwrap(),
            Opening::CompareAll(Mismatch::NotConsistent(ReplicaState::New))
        ));
    }

    fn told(resync_epoch: u64, ranges: Option<Vec<(u32, u64, u64)>>) -> Diverged {
        Diverged {
            resync_epoch,
            known: ranges.is_some(),
            ranges: ranges.unwrap_or_default(),
        }
    }

    const GIB: u64 = 1 << 30;

    /// The cases of docs/PEER.md, "Divergence".
    #[test]
    fn only_what_either_side_knows_may_differ_is_compared() {
        let now = Instant::now();
        // Epoch 3 forked from (2, 100).
        let mut s = ShipperSession::new(3, (2, 100));
        let sizes = [8 * GIB];
        let w = |epoch, durable, state| Welcome {
            epoch,
            durable,
            applied: durable,
            state,
            ..welcome(durable)
        };
        let mut open = |w: Welcome, d: Diverged, owed: bool| {
            s.welcome(&w, &d, 500, owed, &sizes, now).unwrap()
        };
        use ReplicaState::{Consistent, Inconsistent, New};
        // A new replica: everything, unless a resync of this epoch began
        // there and is still owed (interrupted before its first part
        // ended).
        for d in [told(3, None), told(0, None)] {
            assert!(matches!(
                open(w(0, 0, New), d, false),
                Opening::CompareAll(Mismatch::NotConsistent(New))
            ));
        }
        assert!(matches!(
            open(w(0, 0, New), told(2, None), true),
            Opening::CompareAll(Mismatch::NotConsistent(New))
        ));
        assert_eq!(
            open(w(0, 0, New), told(3, None), true),
            Opening::Resume { durable: None }
        );
        // Interrupted in a resync of this epoch, past a part's end (tip of
        // this epoch) or before (tip of its old history): what is owed.
        assert_eq!(
            open(w(3, 200, Inconsistent), told(3, None), false),
            Opening::Resume { durable: Some(200) }
        );
        assert_eq!(
            open(w(1, 50, Inconsistent), told(3, None), true),
            Opening::Resume { durable: None }
        );
        // ... unless nothing is owed here (the capture cannot account for
        // it) or the resync was another epoch's.
        for (tip, d, owed) in [
            ((1, 50), told(3, None), false),
            ((3, 200), told(2, None), true),
            ((1, 50), told(2, Some(vec![(0, 0, 4 << 20)])), true),
        ] {
            assert!(matches!(
                open(w(tip.0, tip.1, Inconsistent), d, owed),
                Opening::CompareAll(_)
            ));
        }
        // The former owner of epoch 2, past the fork, with its map.
        let ranges = vec![(0, 64 << 20, 8 << 20)];
        assert_eq!(
            open(w(2, 130, Consistent), told(0, Some(ranges.clone())), false),
            Opening::CompareKnown {
                ranges: vec![vec![(64 << 20, 8 << 20)]]
            }
        );
        // Not known, of another epoch than the fork's, or behind the
        // fork: everything.
        for (tip, d) in [
            ((2, 130), told(0, None)),
            ((1, 130), told(0, Some(ranges.clone()))),
            ((2, 90), told(0, Some(ranges.clone()))),
        ] {
            assert!(matches!(
                open(w(tip.0, tip.1, Consistent), d, true),
                Opening::CompareAll(Mismatch::OtherHistory { .. })
            ));
        }
        // Ranges outside the volumes end the session.
        let outside = told(0, Some(vec![(0, 8 * GIB - 4096, 8192)]));
        assert!(matches!(
            s.welcome(&w(2, 130, Consistent), &outside, 500, false, &sizes, now),
            Err(ShipError::DivergedOutside { .. })
        ));
        let no_volume = told(0, Some(vec![(1, 0, 4096)]));
        assert!(s
            .welcome(&w(2, 130, Consistent), &no_volume, 500, false, &sizes, now)
            .is_err());
    }

    proptest! {
        /// Whatever a replica says, a stream without any comparison is
        /// chosen only for a consistent replica on this primary's history
        /// and behind its next record; a comparison of known ranges only
        /// for the former owner of the fork's epoch past the fork; a
        /// resume only for a resync of this epoch.
        #[test]
        fn the_opening_never_trusts_what_cannot_be_known(
            epoch in 1u64..5,
            tip_epoch in 0u64..5,
            durable in 0u64..300,
            state in 0u8..3,
            resync_epoch in 0u64..5,
            known in any::<bool>(),
            owed in any::<bool>(),
        ) {
            let fork = (epoch - 1, 100);
            let mut s = ShipperSession::new(epoch, fork);
            let state = ReplicaState::from_u8(state).unwrap();
            let w = Welcome { epoch: tip_epoch, durable, applied: durable, state, ..welcome(durable) };
            let d = told(resync_epoch, known.then(|| vec![(0, 0, 4096)]));
            let next = 200;
            let on_history = tip_epoch == epoch || (tip_epoch, durable) == fork;
            match s.welcome(&w, &d, next, owed, &[1 << 30], Instant::now()).unwrap() {
                Opening::Stream { durable: at } => {
                    prop_assert!(on_history && state == ReplicaState::Consistent && durable < next);
                    prop_assert_eq!(at, durable);
                }
                Opening::Resume { durable: at } => {
                    prop_assert!(state != ReplicaState::Consistent);
                    prop_assert!(state != ReplicaState::New || owed);
                    prop_assert_eq!(resync_epoch, epoch);
                    prop_assert!(at.is_some() == on_history);
                    prop_assert!(on_history || owed);
                }
                Opening::CompareKnown { .. } => {
                    prop_assert!(known && !on_history && state == ReplicaState::Consistent);
                    prop_assert!(tip_epoch == fork.0 && durable >= fork.1);
                }
                Opening::CompareAll(_) => {}
            }
        }
    }
}
