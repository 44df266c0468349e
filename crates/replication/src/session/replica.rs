//! The replica's side of a session, as a machine over decoded messages
//! (docs/PEER.md): whether a primary's hello is accepted, what each
//! message asks of the replica's journal and images, when to commit, and
//! what to acknowledge. No I/O: the receiver (`crate::receiver`) reads
//! frames, carries the actions out on the [`crate::replica::ReplicaGroup`]
//! and writes the answers.
//!
//! Per message the driver calls [`ReplicaSession::step`] (what to do with
//! it), carries the action out, then [`ReplicaSession::plan_commit`]
//! (whether to commit now, in the background, or not yet) and
//! [`ReplicaSession::acknowledge`] (what to acknowledge, if anything).

use std::time::{Duration, Instant};

use tandem_peer::{Ack, Hello, Message, Payload, Record, RecordOp, ReplicaState, Welcome};

use crate::replica::Position;
use crate::session::marks::MarkRule;

/// Journal syncs (and acks) at least this often while records arrive.
pub const COMMIT_EVERY: Duration = Duration::from_millis(20);
/// With history, records become durable only at a checkpoint (every
/// `HISTORY_SYNC_EVERY`, docs/HISTORY.md): committing more often would
/// only sync the undo log more often (a page and the file's metadata per
/// sync) and make nothing durable sooner.
pub const HISTORY_COMMIT_EVERY: Duration = crate::replica::HISTORY_SYNC_EVERY;
/// ...or after this many bytes.
pub const COMMIT_BYTES: usize = 8 << 20;

/// What this site knows of a group it replicates, for checking hellos.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    pub group: String,
    /// The group's configured primary: without a coordinator, the only
    /// site that may open a session ([`Owner::Configured`]).
    pub primary: String,
    /// Every site of the group.
    pub sites: Vec<String>,
    /// Volume names and sizes, in order.
    pub volumes: Vec<(String, u64)>,
}

/// Why a replica turns a primary's session away (sent in `Refuse`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("protocol version {theirs} is not supported (this site speaks {ours})")]
    Version { theirs: u16, ours: u16 },
    #[error("this is site {this}, not {named}")]
    WrongSite { this: String, named: String },
    #[error("certificate is for site {cert} but the hello claims {claimed}")]
    Certificate { cert: String, claimed: String },
    #[error("group {0} is not replicated to this site")]
    UnknownGroup(String),
    #[error("site {site} is not part of group {group}")]
    NotMember { site: String, group: String },
    #[error("volumes differ: primary has {primary:?}, this site is configured with {here:?}")]
    Volumes {
        primary: Vec<(String, u64)>,
        here: Vec<(String, u64)>,
    },
    #[error("epoch {epoch} is older than {held}, which this replica holds")]
    OlderEpoch { epoch: u64, held: u64 },
    #[error("group {0} already has a replication session")]
    Busy(String),
    #[error("{claimed} is not the owner of group {group} in epoch {epoch}: {owner}")]
    NotOwner {
        group: String,
        claimed: String,
        epoch: u64,
        owner: Owner,
    },
}

/// Who owns a group as this replica knows it: what a primary's hello is
/// checked against (only the owner of an epoch may open a session in it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owner {
    /// No coordinator (`kind = "none"`): the group's configured primary
    /// is its only primary, in every epoch.
    Configured(String),
    /// The coordinator's owner record as last read: `site` owns the group
    /// in `epoch`.
    Recorded { site: String, epoch: u64 },
    /// The coordinator names no owner (none yet, or the key was deleted
    /// by a forced failover or a release), or has not been read yet.
    Unknown,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Configured(site) => write!(
                f,
                "without a coordinator only the configured primary {site} is"
            ),
            Owner::Recorded { site, epoch } => {
                write!(f, "the coordinator names {site} owner in epoch {epoch}")
            }
            Owner::Unknown => f.write_str("the coordinator names no owner of it"),
        }
    }
}

/// What the ownership check says of a hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnerVerdict {
    /// The hello's site owns the group in the hello's epoch.
    Confirmed,
    /// The owner known here is older than the hello (or none is known):
    /// a newer reading of the coordinator may confirm it. Refused once
    /// the driver has waited long enough.
    Unconfirmed(Refusal),
    /// Another site owns that epoch, or a newer one is known: refused.
    Refused(Refusal),
}

/// Judges a primary's hello against the owner known here: accepted only
/// when `owner` says the hello's site owns the group in the hello's epoch
/// (or, without a coordinator, that it is the configured primary).
pub fn judge_owner(hello: &Hello, owner: &Owner) -> OwnerVerdict {
    let refusal = || Refusal::NotOwner {
        group: hello.group.clone(),
        claimed: hello.primary.clone(),
        epoch: hello.epoch,
        owner: owner.clone(),
    };
    match owner {
        Owner::Configured(site) if *site == hello.primary => OwnerVerdict::Confirmed,
        Owner::Configured(_) => OwnerVerdict::Refused(refusal()),
        Owner::Recorded { site, epoch } if *epoch == hello.epoch && *site == hello.primary => {
            OwnerVerdict::Confirmed
        }
        Owner::Recorded { epoch, .. } if *epoch >= hello.epoch => OwnerVerdict::Refused(refusal()),
        Owner::Recorded { .. } | Owner::Unknown => OwnerVerdict::Unconfirmed(refusal()),
    }
}

/// Why a session ends (besides the primary closing it).
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("refused: {0}")]
    Refused(#[from] Refusal),
    #[error("record {seq} carries epoch {epoch}, the session's is {session}")]
    RecordEpoch { seq: u64, epoch: u64, session: u64 },
    #[error("resync with epoch {epoch}, the session's is {session}")]
    ResyncEpoch { epoch: u64, session: u64 },
    #[error("record {seq} after {last}: sequence went backwards")]
    Backwards { seq: u64, last: u64 },
    #[error("record {seq}: {data} data bytes for length {len}")]
    Length { seq: u64, data: u64, len: u64 },
    #[error("resync_end without resync_begin")]
    EndWithoutBegin,
    #[error("unexpected {0} message from a primary")]
    Unexpected(&'static str),
    #[error("{what} for volume index {volume}, but the group has {volumes} volume(s)")]
    NoSuchVolume {
        what: &'static str,
        volume: u32,
        volumes: usize,
    },
    #[error("{what} at offset {offset} of {len} bytes reaches past the end of volume index {volume} ({size} bytes)")]
    OutOfRange {
        what: &'static str,
        volume: u32,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("hashes of {count} chunks of {chunk} bytes: the chunk must be a power of two from 4096 to 1048576, at most 1024 of them")]
    Chunks { chunk: u32, count: usize },
    #[error("mark of record {seq}, but the last record received is {last}")]
    MarkAhead { seq: u64, last: u64 },
    #[error("mark of record {seq} after a mark of record {last}: marks went backwards")]
    MarkBackwards { seq: u64, last: u64 },
    #[error("mark of record {seq} while the images are no consistent prefix (no resync has ended at a consistent point)")]
    MarkInResync { seq: u64 },
    #[error("mark of record {seq}, before record {from}, the first one the last resync leaves consistent")]
    MarkBeforeConsistent { seq: u64, from: u64 },
}

/// What the replica does with one message.
#[derive(Debug, PartialEq)]
pub enum Action {
    /// Journal the record (it joins the batch being filled).
    Receive(Record),
    /// A resync starts: the images stop being a prefix; records from
    /// `resume_at` on follow.
    BeginResync { resume_at: u64 },
    /// Compare these hashes with the replica's chunks and answer a `Diff`.
    Compare {
        volume: u32,
        offset: u64,
        chunk: u32,
        hashes: Vec<[u8; 32]>,
    },
    /// Write a resync chunk straight to the image.
    WriteChunk {
        volume: u32,
        offset: u64,
        data: Payload,
    },
    /// The resync is over: record `consistent_at`, then answer
    /// `ResyncDone { resume_at }`.
    EndResync { consistent_at: u64, resume_at: u64 },
    /// The primary captured every record up to `seq` (received) by
    /// `time_ms`: a recovery point ([`crate::replica::ReplicaGroup::mark`]).
    Mark { seq: u64, time_ms: u64 },
    /// Store a replicated configuration file.
    StoreFile {
        path: String,
        mode: u32,
        data: Payload,
    },
    /// Answer a ping.
    Pong(u64),
    /// Nothing to do.
    None,
}

/// When to commit what was received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Commit {
    /// Not yet.
    Later,
    /// Hand the batch to the committer without waiting.
    Background,
    /// Sync and apply now, then acknowledge (FLUSH, FUA, the end of a
    /// resync, an idle primary's ping).
    Now,
}

/// What the committer has done, as the driver sees it after the commit
/// decision was carried out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Durable by the commit just made (`Commit::Now`), if one was made.
    pub committed: Option<u64>,
    /// Durable as last published by the committer.
    pub durable: u64,
    pub applied: u64,
}

/// Checks a primary's hello against what this site knows of the group;
/// `cert_site` is the site named by the peer's TLS certificate.
pub fn check_hello(
    hello: &Hello,
    site: &str,
    cert_site: Option<&str>,
    group: Option<&Membership>,
) -> Result<(), Refusal> {
    if hello.version != tandem_peer::VERSION {
        return Err(Refusal::Version {
            theirs: hello.version,
            ours: tandem_peer::VERSION,
        });
    }
    if hello.replica != site {
        return Err(Refusal::WrongSite {
            this: site.to_owned(),
            named: hello.replica.clone(),
        });
    }
    if let Some(cert) = cert_site {
        if cert != hello.primary {
            return Err(Refusal::Certificate {
                cert: cert.to_owned(),
                claimed: hello.primary.clone(),
            });
        }
    }
    let Some(group) = group else {
        return Err(Refusal::UnknownGroup(hello.group.clone()));
    };
    for s in [site, hello.primary.as_str()] {
        if !group.sites.iter().any(|m| m == s) {
            return Err(Refusal::NotMember {
                site: s.to_owned(),
                group: group.group.clone(),
            });
        }
    }
    if hello.volumes != group.volumes {
        return Err(Refusal::Volumes {
            primary: hello.volumes.clone(),
            here: group.volumes.clone(),
        });
    }
    Ok(())
}

/// Refuses a hello of an epoch older than the replica holds (F3).
pub fn check_epoch(epoch: u64, held: u64) -> Result<(), Refusal> {
    if epoch < held {
        return Err(Refusal::OlderEpoch { epoch, held });
    }
    Ok(())
}

/// The replica's side of one session.
#[derive(Clone, Debug)]
pub struct ReplicaSession {
    epoch: u64,
    /// The size of each volume, in order: every range a message names
    /// must lie within one.
    volumes: Vec<u64>,
    /// The last record received in this session (or where a resync puts
    /// the stream).
    last_seq: u64,
    /// (received, durable) last acknowledged.
    acked: (u64, u64),
    /// The resync in progress resumes the stream here.
    resync: Option<u64>,
    /// Which records a mark may name, and the last one marked.
    marks: MarkRule,
    last_mark: u64,
    since_commit: Instant,
    bytes_since_commit: u64,
    /// [`COMMIT_EVERY`], or [`HISTORY_COMMIT_EVERY`] for a group that
    /// keeps history.
    commit_every: Duration,
    /// The message just stepped asks for a commit and acknowledgement now.
    ack_now: bool,
    pinged: bool,
    /// A FLUSH or FUA record awaits its commit (and acknowledgement).
    flush_owed: bool,
    /// ...and may wait for one more message already buffered: the mark
    /// right behind it joins its commit.
    flush_defer: bool,
    /// The message just stepped is a mark.
    marked: bool,
}

impl ReplicaSession {
    /// Accepts `hello` (already checked by [`check_hello`]) on a replica
    /// at `held` (its position under the group's lock) when `owner` — who
    /// owns the group as known here — confirms that the hello's site owns
    /// the group in its epoch ([`judge_owner`]; an unconfirmed hello is
    /// refused: the driver waits for a newer reading first); returns the
    /// session and the welcome to send.
    pub fn start(
        site: &str,
        hello: &Hello,
        owner: &Owner,
        held: &Position,
        now: Instant,
    ) -> Result<(ReplicaSession, Welcome), Refusal> {
        let epoch = hello.epoch;
        check_epoch(epoch, held.epoch)?;
        match judge_owner(hello, owner) {
            OwnerVerdict::Confirmed => {}
            OwnerVerdict::Unconfirmed(refusal) | OwnerVerdict::Refused(refusal) => {
                return Err(refusal)
            }
        }
        let state = if held.new {
            ReplicaState::New
        } else if held.consistent {
            ReplicaState::Consistent
        } else {
            ReplicaState::Inconsistent
        };
        let welcome = Welcome {
            replica: site.to_owned(),
            epoch: held.tip_epoch,
            applied: held.applied,
            durable: held.durable,
            state,
            history: held.history,
            point: held.point,
        };
        Ok((
            ReplicaSession {
                epoch,
                volumes: hello.volumes.iter().map(|(_, size)| *size).collect(),
                last_seq: held.received,
                acked: (held.received, held.durable),
                resync: None,
                marks: MarkRule::opening(held.consistent && !held.new),
                last_mark: 0,
                since_commit: now,
                bytes_since_commit: 0,
                commit_every: if held.history {
                    HISTORY_COMMIT_EVERY
                } else {
                    COMMIT_EVERY
                },
                ack_now: false,
                pinged: false,
                flush_owed: false,
                flush_defer: false,
                marked: false,
            },
            welcome,
        ))
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// What to do with one message from the primary.
    pub fn step(&mut self, msg: Message) -> Result<Action, ProtocolError> {
        self.ack_now = false;
        self.pinged = false;
        self.flush_defer = false;
        self.marked = false;
        Ok(match msg {
            Message::Record(r) => {
                if r.epoch != self.epoch {
                    return Err(ProtocolError::RecordEpoch {
                        seq: r.seq,
                        epoch: r.epoch,
                        session: self.epoch,
                    });
                }
                if r.seq <= self.last_seq {
                    return Err(ProtocolError::Backwards {
                        seq: r.seq,
                        last: self.last_seq,
                    });
                }
                let data = u64::from(r.data.raw_len);
                let expected = if r.op == tandem_peer::RecordOp::Write {
                    r.len
                } else {
                    0
                };
                if data != expected {
                    return Err(ProtocolError::Length {
                        seq: r.seq,
                        data,
                        len: r.len,
                    });
                }
                if r.op != RecordOp::Flush {
                    self.within("record", r.volume, r.offset, r.len)?;
                } else {
                    self.size("record", r.volume)?;
                }
                self.last_seq = r.seq;
                self.bytes_since_commit += data;
                if r.fua || r.op == RecordOp::Flush {
                    // Committed after this message, or after the next one
                    // if it is already here (the primary sends the
                    // record's mark right behind it): never later.
                    self.flush_defer = !self.flush_owed;
                    self.flush_owed = true;
                }
                Action::Receive(r)
            }
            Message::ResyncBegin {
                epoch, resume_at, ..
            } => {
                if epoch != self.epoch {
                    return Err(ProtocolError::ResyncEpoch {
                        epoch,
                        session: self.epoch,
                    });
                }
                self.resync = Some(resume_at);
                self.marks.resync_begins();
                self.last_mark = 0;
                // The resync redefines the position: records from
                // resume_at on follow, whatever this replica held before.
                self.last_seq = resume_at.saturating_sub(1);
                self.acked = (
                    self.acked.0.min(self.last_seq),
                    self.acked.1.min(self.last_seq),
                );
                Action::BeginResync { resume_at }
            }
            Message::Hashes {
                volume,
                offset,
                chunk,
                hashes,
            } => {
                if !tandem_peer::chunk_ok(chunk) || hashes.len() > tandem_peer::MAX_HASHES {
                    return Err(ProtocolError::Chunks {
                        chunk,
                        count: hashes.len(),
                    });
                }
                // Every chunk hashed starts inside the volume (the last
                // one may be short).
                let size = self.size("hashes", volume)?;
                let chunks = hashes.len() as u64;
                if let Some(last) = chunks.checked_sub(1) {
                    let last_start = offset.checked_add(last * u64::from(chunk));
                    if last_start.is_none_or(|start| start >= size) {
                        return Err(ProtocolError::OutOfRange {
                            what: "hashes",
                            volume,
                            offset,
                            len: chunks * u64::from(chunk),
                            size,
                        });
                    }
                }
                Action::Compare {
                    volume,
                    offset,
                    chunk,
                    hashes,
                }
            }
            Message::Chunk {
                volume,
                offset,
                data,
            } => {
                if data.raw_len > tandem_peer::MAX_CHUNK {
                    return Err(ProtocolError::Chunks {
                        chunk: data.raw_len,
                        count: 1,
                    });
                }
                self.within("chunk", volume, offset, u64::from(data.raw_len))?;
                Action::WriteChunk {
                    volume,
                    offset,
                    data,
                }
            }
            Message::ResyncEnd { consistent_at } => {
                let Some(resume_at) = self.resync.take() else {
                    return Err(ProtocolError::EndWithoutBegin);
                };
                self.ack_now = true;
                self.marks.resync_ends(consistent_at);
                Action::EndResync {
                    consistent_at,
                    resume_at,
                }
            }
            Message::Mark { seq, time_ms } => {
                if seq > self.last_seq {
                    return Err(ProtocolError::MarkAhead {
                        seq,
                        last: self.last_seq,
                    });
                }
                if self.resync.is_some() || self.marks.from() == u64::MAX {
                    return Err(ProtocolError::MarkInResync { seq });
                }
                if !self.marks.allows(seq) {
                    return Err(ProtocolError::MarkBeforeConsistent {
                        seq,
                        from: self.marks.from(),
                    });
                }
                if seq <= self.last_mark {
                    return Err(ProtocolError::MarkBackwards {
                        seq,
                        last: self.last_mark,
                    });
                }
                self.last_mark = seq;
                self.marked = true;
                Action::Mark { seq, time_ms }
            }
            Message::File { path, mode, data } => Action::StoreFile { path, mode, data },
            Message::Ping(n) => {
                self.pinged = true;
                Action::Pong(n)
            }
            Message::Pong(_) => Action::None,
            other => return Err(ProtocolError::Unexpected(other.kind())),
        })
    }

    /// The size of volume index `volume`.
    fn size(&self, what: &'static str, volume: u32) -> Result<u64, ProtocolError> {
        self.volumes
            .get(volume as usize)
            .copied()
            .ok_or(ProtocolError::NoSuchVolume {
                what,
                volume,
                volumes: self.volumes.len(),
            })
    }

    /// Checks that `[offset, offset + len)` lies within volume `volume`.
    fn within(
        &self,
        what: &'static str,
        volume: u32,
        offset: u64,
        len: u64,
    ) -> Result<(), ProtocolError> {
        let size = self.size(what, volume)?;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(ProtocolError::OutOfRange {
                what,
                volume,
                offset,
                len,
                size,
            });
        }
        Ok(())
    }

    /// When to commit, after the action was carried out. `idle`: nothing
    /// more is buffered from the primary; `uncommitted`: records (or
    /// marks) were received and not yet made durable; `batch`: some are
    /// not yet handed to the committer.
    pub fn plan_commit(
        &mut self,
        now: Instant,
        uncommitted: bool,
        batch: bool,
        idle: bool,
    ) -> Commit {
        let due = now.saturating_duration_since(self.since_commit) >= self.commit_every
            || self.bytes_since_commit >= COMMIT_BYTES as u64;
        // A FLUSH or FUA (or an idle primary's ping) is synced and applied
        // now and acknowledged at once — after the message behind it, if
        // that one is here already (its mark); otherwise the committer
        // syncs and applies while reading goes on. A mark with nothing
        // behind it goes to the committer at once: its point does not
        // wait for the next records.
        let flush = self.flush_owed && (idle || !self.flush_defer);
        let commit = if self.ack_now || flush || (self.pinged && uncommitted) {
            Commit::Now
        } else if batch && (due || (self.marked && idle)) {
            Commit::Background
        } else {
            Commit::Later
        };
        if commit == Commit::Now {
            self.flush_owed = false;
        }
        if commit == Commit::Now || due {
            self.since_commit = now;
            self.bytes_since_commit = 0;
        }
        commit
    }

    /// What to acknowledge after the commit decision was carried out:
    /// after a commit at once; otherwise when the link is idle (what the
    /// committer made durable meanwhile, and what was received — sync mode
    /// acknowledges writes on it). Acknowledgements never go backwards.
    pub fn acknowledge(&mut self, idle: bool, progress: Progress) -> Option<Ack> {
        if progress.committed.is_none() && !idle {
            return None;
        }
        let durable = progress
            .committed
            .unwrap_or(progress.durable)
            .min(self.last_seq)
            .max(self.acked.1);
        let received = self.last_seq.max(self.acked.0);
        if progress.committed.is_none() && received <= self.acked.0 && durable <= self.acked.1 {
            return None;
        }
        self.acked = (received, durable);
        Some(Ack {
            received,
            durable,
            applied: progress.applied.min(durable),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            version: tandem_peer::VERSION,
            primary: "ny".into(),
            replica: "dr".into(),
            group: "g".into(),
            epoch: 3,
            fork_epoch: 0,
            fork_seq: 0,
            volumes: vec![("v".into(), 1 << 20)],
        }
    }

    fn held(received: u64, consistent: bool) -> Position {
        Position {
            received,
            durable: received,
            applied: received,
            epoch: 3,
            tip_epoch: 3,
            consistent,
            new: false,
            resyncing: !consistent,
            resync_epoch: 0,
            compared: 0,
            history: false,
            point: false,
        }
    }

    fn session(held: &Position) -> ReplicaSession {
        let owner = Owner::Configured("ny".into());
        ReplicaSession::start("dr", &hello(), &owner, held, Instant::now())
            .unwrap()
            .0
    }

    fn flush(seq: u64) -> Message {
        Message::Record(Record {
            epoch: 3,
            seq,
            volume: 0,
            op: RecordOp::Flush,
            fua: false,
            offset: 0,
            len: 0,
            data: Payload::empty(),
        })
    }

    fn mark(seq: u64) -> Message {
        Message::Mark {
            seq,
            time_ms: 1_700_000_000_000 + seq,
        }
    }

    #[test]
    fn marks_name_received_records_in_order() {
        let mut s = session(&held(10, true));
        // A record the replica held before the session may be marked.
        assert_eq!(
            s.step(mark(10)).unwrap(),
            Action::Mark {
                seq: 10,
                time_ms: 1_700_000_000_010
            }
        );
        // One not received yet may not.
        let e = s.step(mark(11)).unwrap_err();
        assert!(matches!(e, ProtocolError::MarkAhead { seq: 11, last: 10 }));
        assert_eq!(
            e.to_string(),
            "mark of record 11, but the last record received is 10"
        );
        assert!(matches!(s.step(flush(11)).unwrap(), Action::Receive(_)));
        assert!(matches!(
            s.step(mark(11)).unwrap(),
            Action::Mark { seq: 11, .. }
        ));
        for seq in [11, 4] {
            let e = s.step(mark(seq)).unwrap_err();
            assert!(
                matches!(e, ProtocolError::MarkBackwards { last: 11, .. }),
                "{e}"
            );
        }
    }

    fn write(seq: u64) -> Message {
        Message::Record(Record {
            epoch: 3,
            seq,
            volume: 0,
            op: RecordOp::Write,
            fua: false,
            offset: 0,
            len: 512,
            data: Payload::raw(vec![7; 512]),
        })
    }

    #[test]
    fn a_flush_and_its_mark_share_one_commit() {
        let mut s = session(&held(10, true));
        let now = s.since_commit;
        let step = |s: &mut ReplicaSession, msg, idle| {
            s.step(msg).unwrap();
            s.plan_commit(now, true, true, idle)
        };
        // The mark already buffered behind the flush joins its commit.
        assert_eq!(step(&mut s, flush(11), false), Commit::Later);
        assert_eq!(step(&mut s, mark(11), false), Commit::Now);
        // A flush with nothing behind it commits at once; its mark, when
        // it comes alone, goes to the committer without waiting for more
        // records.
        assert_eq!(step(&mut s, flush(12), true), Commit::Now);
        assert_eq!(step(&mut s, mark(12), true), Commit::Background);
        // A mark with more behind it (and a write) just joins the batch.
        assert_eq!(step(&mut s, write(13), false), Commit::Later);
        assert_eq!(step(&mut s, mark(13), false), Commit::Later);
        // A flush waits for one message at most, whatever it is.
        assert_eq!(step(&mut s, flush(14), false), Commit::Later);
        assert_eq!(step(&mut s, flush(15), false), Commit::Now);
        assert_eq!(step(&mut s, flush(16), false), Commit::Later);
        assert_eq!(step(&mut s, write(17), false), Commit::Now);
        assert_eq!(step(&mut s, write(18), false), Commit::Later);
        // A FUA write is a flush.
        let Message::Record(mut fua) = write(19) else {
            unreachable!()
        };
        fua.fua = true;
        assert_eq!(step(&mut s, Message::Record(fua), true), Commit::Now);
        // Without history a mark leaves no batch: nothing to commit.
        s.step(mark(19)).unwrap();
        assert_eq!(s.plan_commit(now, false, false, true), Commit::Later);
    }

    #[test]
    fn no_marks_where_the_images_are_no_prefix() {
        // An inconsistent replica: none until a resync ends.
        let mut s = session(&held(10, false));
        let e = s.step(mark(10)).unwrap_err();
        assert!(matches!(e, ProtocolError::MarkInResync { seq: 10 }), "{e}");
        assert!(e.to_string().contains("no consistent prefix"), "{e}");
        let begin = Message::ResyncBegin {
            epoch: 3,
            resume_at: 11,
            bytes: 1 << 20,
        };
        assert_eq!(
            s.step(begin.clone()).unwrap(),
            Action::BeginResync { resume_at: 11 }
        );
        assert!(matches!(
            s.step(mark(10)),
            Err(ProtocolError::MarkInResync { .. })
        ));
        // A part that more parts follow leaves it inconsistent.
        s.step(Message::ResyncEnd {
            consistent_at: tandem_peer::NOT_YET_CONSISTENT,
        })
        .unwrap();
        s.step(flush(11)).unwrap();
        assert!(matches!(
            s.step(mark(11)),
            Err(ProtocolError::MarkInResync { .. })
        ));
        // The last part: consistent once record 13 is applied.
        s.step(Message::ResyncBegin {
            epoch: 3,
            resume_at: 12,
            bytes: 1 << 20,
        })
        .unwrap();
        s.step(Message::ResyncEnd { consistent_at: 14 }).unwrap();
        s.step(flush(12)).unwrap();
        let e = s.step(mark(12)).unwrap_err();
        assert!(
            matches!(e, ProtocolError::MarkBeforeConsistent { seq: 12, from: 13 }),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "mark of record 12, before record 13, the first one the last resync leaves consistent"
        );
        s.step(flush(13)).unwrap();
        assert!(matches!(
            s.step(mark(13)).unwrap(),
            Action::Mark { seq: 13, .. }
        ));
        // A new resync starts the order of marks again.
        s.step(begin).unwrap();
        s.step(Message::ResyncEnd { consistent_at: 11 }).unwrap();
        s.step(flush(11)).unwrap();
        assert!(matches!(
            s.step(mark(10)).unwrap(),
            Action::Mark { seq: 10, .. }
        ));
    }

    #[test]
    fn an_older_protocol_version_is_refused_with_both_versions() {
        let mut h = hello();
        h.version = 4;
        let membership = Membership {
            group: "g".into(),
            primary: "ny".into(),
            sites: vec!["ny".into(), "dr".into()],
            volumes: h.volumes.clone(),
        };
        let e = check_hello(&h, "dr", None, Some(&membership)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "protocol version 4 is not supported (this site speaks 6)"
        );
    }
}
