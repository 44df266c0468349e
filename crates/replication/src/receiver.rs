//! The replica side of replication (docs/PEER.md), as a driver of
//! [`ReplicaSession`]: takes the primary's messages, carries out what the
//! session says on the group's journal and images
//! ([`crate::replica::ReplicaGroup`]), and sends the answers. A primary's
//! connection is a link carrying every group's session on its own channel
//! ([`crate::link`]); each session is a task on the replication runtime.
//! The group's lock is held for the whole session, so one primary at a
//! time. A connection that opens with a `Hello` (or `Define`) instead of
//! `Link` carries that one session, served on the calling thread.

use std::collections::VecDeque;
use std::io::{BufReader, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tandem_peer::{read_message, read_message_within, write_message, Message, PeerError};

use crate::link::{ChannelOut, Mailbox, SessionStart};
use crate::runtime;

use crate::error::ReplicaError;
use crate::owners::Owners;
use crate::replica::ReplicaGroup;
use crate::session::replica::{self as rs, Action, Commit, OwnerVerdict, Progress, ReplicaSession};
pub use crate::session::replica::{Membership, Owner, ProtocolError, Refusal};

/// How long a new session waits for the previous one of the same group.
const TAKEOVER_WAIT: Duration = Duration::from_secs(15);
/// How long a hello for an epoch newer than the coordinator's last
/// reading waits for a reading that confirms it (the new owner claimed
/// before it connected: the store watcher sees it within a round trip).
pub const OWNER_WAIT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("definition of group {group} refused: {source}")]
    Define {
        group: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("removal of group {group} refused: {source}")]
    Retire {
        group: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("protocol: {0}")]
    Peer(#[from] PeerError),
    #[error("{0}")]
    Replica(#[from] ReplicaError),
    #[error("the link closed")]
    LinkClosed,
    #[error("link refused: {0}")]
    Link(Refusal),
}

impl From<crate::link::LinkDown> for SessionError {
    fn from(_: crate::link::LinkDown) -> SessionError {
        SessionError::LinkClosed
    }
}

impl From<Refusal> for SessionError {
    fn from(r: Refusal) -> SessionError {
        SessionError::Protocol(ProtocolError::Refused(r))
    }
}

/// What this site knows of a group it replicates.
pub struct GroupPlan {
    pub membership: Membership,
    pub group: Arc<Mutex<ReplicaGroup>>,
    /// The group's published position, readable while a session holds
    /// the group (so an older epoch is refused without waiting for it).
    pub position: Arc<Mutex<crate::replica::Position>>,
    /// A primary's session is running.
    pub connected: Arc<AtomicBool>,
    /// `<data_dir>/files/<group>`, and the group's configured `files`.
    pub files_dir: std::path::PathBuf,
    pub files: Vec<std::path::PathBuf>,
    /// Where the group's VM definition is kept (`<data_dir>/vms/<group>.xml`)
    /// when the group protects a VM.
    pub vm_definition: Option<std::path::PathBuf>,
    /// Ends the running session's connection (set while one runs), so a
    /// promotion need not wait for a silent old primary to time out.
    pub session: Mutex<Option<SessionCloser>>,
    /// The recovery-point marks the group's sessions received.
    pub marks: MarkLog,
}

/// How many of the latest marks a [`MarkLog`] keeps.
pub const RECENT_MARKS: usize = 4096;

/// The `Mark`s a group's sessions received (docs/PEER.md, "Marks"): how
/// many, and the latest [`RECENT_MARKS`] as (seq, time_ms), oldest first.
#[derive(Debug, Default)]
pub struct MarkLog {
    total: AtomicU64,
    recent: Mutex<VecDeque<(u64, u64)>>,
}

impl MarkLog {
    fn note(&self, seq: u64, time_ms: u64) {
        let mut recent = self.recent.lock();
        if recent.len() == RECENT_MARKS {
            recent.pop_front();
        }
        recent.push_back((seq, time_ms));
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    /// Marks received since the group was set up here.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// The latest marks, oldest first.
    pub fn recent(&self) -> Vec<(u64, u64)> {
        self.recent.lock().iter().copied().collect()
    }
}

/// Shuts a session's connection down.
pub type SessionCloser = Box<dyn Fn() + Send + Sync>;

impl GroupPlan {
    pub fn name(&self) -> &str {
        &self.membership.group
    }

    /// Ends the running session, if any.
    pub fn end_session(&self) {
        if let Some(close) = self.session.lock().as_ref() {
            close();
        }
    }
}

/// Failsafe ownership on a replica site (docs/FAILOVER.md, "Failsafe"):
/// answers a primary site's `LeaseAsk` with a `LeaseAnswer`, each group
/// granted or refused by its ownership machine.
pub trait LeaseGrantor: Send + Sync {
    /// `primary` (as its `Link` and certificate name it) asks, in ask
    /// `id`, for peer leases of `duration_ms` for each (group, epoch).
    fn answer(
        &self,
        primary: &str,
        id: u64,
        duration_ms: u32,
        groups: Vec<(String, u64)>,
    ) -> Message;
}

/// Defines groups that primaries send (`Define`, groups defined at
/// runtime), on behalf of the agent.
pub trait GroupDefiner: Send + Sync {
    /// Has `group` defined from `definition` (sent by `peer_site`, the
    /// site its TLS certificate names, if any): Ok once this site has the
    /// group with this definition, now or already.
    fn define(
        &self,
        group: &str,
        definition: &str,
        peer_site: Option<&str>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;

    /// Removes `group` (`Retire`, sent by `peer_site`): Ok once this site
    /// does not have it, now or already.
    fn retire(
        &self,
        group: &str,
        peer_site: Option<&str>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
}

/// Every group this site replicates now; groups come and go as this site
/// is promoted or demoted.
pub struct ReceiverContext {
    pub site: String,
    pub groups: parking_lot::RwLock<Vec<Arc<GroupPlan>>>,
    /// Defines groups that primaries send; None refuses them.
    pub definer: parking_lot::RwLock<Option<Arc<dyn GroupDefiner>>>,
    /// Answers primaries' peer lease asks (failsafe ownership); without
    /// one every ask is refused.
    pub grantor: parking_lot::RwLock<Option<Arc<dyn LeaseGrantor>>>,
    /// Who owns each group: only a group's owner in an epoch may open a
    /// session in it.
    pub owners: Arc<Owners>,
}

/// Tells the primary why, best effort: the session ends either way.
fn send_refusal<W: Write>(writer: &mut W, reason: &str, out: &mut Vec<u8>) {
    let refusal = Message::Refuse {
        reason: reason.to_owned(),
    };
    let _ = write_message(writer, &refusal, out);
    let _ = writer.flush();
}

/// Reads the first message of a connection: what it may send before it
/// is authenticated, so at most [`tandem_peer::MAX_PREAUTH_PAYLOAD`] bytes
/// (a larger frame is refused from its header).
pub fn read_opening<R: Read + ?Sized>(reader: &mut R) -> Result<Message, PeerError> {
    read_message_within(reader, &mut Vec::new(), tandem_peer::MAX_PREAUTH_PAYLOAD)
}

/// Serves one connection from a primary. `peer_site` is the site name in
/// the peer's TLS certificate (None without TLS).
pub fn serve<R: Read, W: Write + Send + 'static>(
    ctx: &Arc<ReceiverContext>,
    mut reader: R,
    writer: W,
    peer_site: Option<&str>,
    closer: Option<SessionCloser>,
) -> Result<(), SessionError> {
    let first = read_opening(&mut reader)?;
    serve_from(ctx, first, reader, writer, peer_site, closer)
}

/// [`serve`] for a connection whose first message was read already
/// ([`read_opening`]).
pub fn serve_from<R: Read, W: Write + Send + 'static>(
    ctx: &Arc<ReceiverContext>,
    first: Message,
    reader: R,
    mut writer: W,
    peer_site: Option<&str>,
    closer: Option<SessionCloser>,
) -> Result<(), SessionError> {
    let mut out = Vec::new();
    match first {
        Message::Link {
            version,
            primary,
            replica,
        } => {
            let refusal = if version != tandem_peer::VERSION {
                Some(Refusal::Version {
                    theirs: version,
                    ours: tandem_peer::VERSION,
                })
            } else if replica != ctx.site {
                Some(Refusal::WrongSite {
                    this: ctx.site.clone(),
                    named: replica,
                })
            } else {
                peer_site
                    .filter(|s| *s != primary)
                    .map(|cert| Refusal::Certificate {
                        cert: cert.to_owned(),
                        claimed: primary.clone(),
                    })
            };
            if let Some(refusal) = refusal {
                send_refusal(&mut writer, &refusal.to_string(), &mut out);
                return Err(SessionError::Link(refusal));
            }
            write_message(
                &mut writer,
                &Message::Linked {
                    version: tandem_peer::VERSION,
                },
                &mut out,
            )?;
            let close: SessionCloser = closer.unwrap_or_else(|| Box::new(|| {}));
            let start = |s: SessionStart| {
                let ctx = Arc::clone(ctx);
                let peer_site = peer_site.map(str::to_owned);
                runtime::handle().spawn(async move {
                    link_session(ctx, s, peer_site).await;
                })
            };
            let reader = BufReader::with_capacity(1 << 20, reader);
            let grants = |primary: &str, id: u64, duration_ms: u32, groups: Vec<(String, u64)>| {
                let grantor = ctx.grantor.read().clone();
                match grantor {
                    Some(g) => g.answer(primary, id, duration_ms, groups),
                    None => Message::LeaseAnswer {
                        id,
                        duration_ms: 0,
                        answers: groups
                            .into_iter()
                            .map(|(g, _)| (g, "disabled: failsafe is off there".to_owned()))
                            .collect(),
                    },
                }
            };
            crate::link::serve_replica(reader, Box::new(writer), close, &primary, &start, &grants)?;
            Ok(())
        }
        Message::Retire { group } => {
            let definer = ctx.definer.read().clone();
            let retired = match definer {
                Some(d) => d.retire(&group, peer_site),
                None => Err(Box::new(Refusal::UnknownGroup(group.clone())) as _),
            };
            match retired {
                Ok(()) => {
                    write_message(&mut writer, &Message::Retired { group }, &mut out)?;
                    writer.flush().map_err(PeerError::Io)?;
                    Ok(())
                }
                Err(source) => {
                    send_refusal(&mut writer, &source.to_string(), &mut out);
                    Err(SessionError::Retire { group, source })
                }
            }
        }
        first => {
            // One session on this connection, served on this thread.
            let mut inbox = StreamInbox {
                reader: BufReader::with_capacity(1 << 20, reader),
                buf: Vec::new(),
            };
            let mut outbox = StreamOutbox {
                writer,
                scratch: Vec::new(),
            };
            let result = runtime::handle().block_on(session(
                ctx,
                first,
                &mut inbox,
                &mut outbox,
                peer_site,
                closer,
            ));
            if let Err(e) = &result {
                if !matches!(e, SessionError::Peer(_)) {
                    send_refusal(&mut outbox.writer, &e.to_string(), &mut out);
                }
            }
            result
        }
    }
}

/// One session on a link's channel, to its end; the primary is told why
/// it ended.
async fn link_session(ctx: Arc<ReceiverContext>, s: SessionStart, peer_site: Option<String>) {
    let SessionStart {
        first,
        inbox,
        mut out,
        guard,
    } = s;
    let mut inbox = LinkInbox(inbox);
    let closer = guard.closer();
    let result = {
        let mut outbox = LinkOutbox(&mut out);
        session(
            &ctx,
            first,
            &mut inbox,
            &mut outbox,
            peer_site.as_deref(),
            Some(closer),
        )
        .await
    };
    drop(guard);
    let end = match &result {
        Ok(()) => Message::End {
            reason: "session ended".into(),
        },
        Err(e) => Message::Refuse {
            reason: e.to_string(),
        },
    };
    let _ = out.send(&end).await;
    let _ = out.flush().await;
    let site = peer_site.as_deref().unwrap_or("(no TLS)");
    match result {
        Ok(()) => tracing::info!(%site, "replication session ended"),
        Err(SessionError::LinkClosed) => {}
        Err(e) => tracing::warn!(%site, "replication session closed: {e}"),
    }
}

/// Where a session's messages come from.
trait Inbox {
    /// The next message; `Closed` at the end.
    async fn next(&mut self) -> Result<Message, PeerError>;
    /// The message after a `Define`, still before authentication on a
    /// connection of its own.
    async fn next_opening(&mut self) -> Result<Message, PeerError>;
    /// Nothing more has arrived yet.
    fn is_idle(&self) -> bool;
}

/// Where a session's answers go.
trait Outbox {
    async fn send(&mut self, msg: &Message) -> Result<(), SessionError>;
    async fn flush(&mut self) -> Result<(), SessionError>;
}

struct StreamInbox<R> {
    reader: BufReader<R>,
    buf: Vec<u8>,
}

impl<R: Read> Inbox for StreamInbox<R> {
    async fn next(&mut self) -> Result<Message, PeerError> {
        read_message(&mut self.reader, &mut self.buf)
    }

    async fn next_opening(&mut self) -> Result<Message, PeerError> {
        read_message_within(
            &mut self.reader,
            &mut self.buf,
            tandem_peer::MAX_PREAUTH_PAYLOAD,
        )
    }

    fn is_idle(&self) -> bool {
        self.reader.buffer().is_empty()
    }
}

struct StreamOutbox<W> {
    writer: W,
    scratch: Vec<u8>,
}

impl<W: Write> Outbox for StreamOutbox<W> {
    async fn send(&mut self, msg: &Message) -> Result<(), SessionError> {
        self.scratch.clear();
        tandem_peer::try_encode(msg, &mut self.scratch)?;
        self.writer
            .write_all(&self.scratch)
            .map_err(PeerError::Io)?;
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), SessionError> {
        Ok(self.writer.flush().map_err(PeerError::Io)?)
    }
}

struct LinkInbox(Mailbox);

impl Inbox for LinkInbox {
    async fn next(&mut self) -> Result<Message, PeerError> {
        match self.0.recv().await {
            // The primary ends its session: as the end of a connection.
            Some(Message::End { .. }) | None => Err(PeerError::Closed),
            Some(msg) => Ok(msg),
        }
    }

    async fn next_opening(&mut self) -> Result<Message, PeerError> {
        self.next().await
    }

    fn is_idle(&self) -> bool {
        self.0.is_empty()
    }
}

struct LinkOutbox<'a>(&'a mut ChannelOut);

impl Outbox for LinkOutbox<'_> {
    async fn send(&mut self, msg: &Message) -> Result<(), SessionError> {
        self.0.send(msg).await.map_err(|e| match e {
            crate::session::shipper::ShipError::Peer(p) => SessionError::Peer(p),
            _ => SessionError::LinkClosed,
        })
    }

    async fn flush(&mut self) -> Result<(), SessionError> {
        Ok(self.0.flush().await?)
    }
}

/// A session from its first message (`Hello`, or `Define` then `Hello`)
/// to its end.
// The group's lock is held for the whole session, across its waits for
// messages, by design (one primary at a time): whoever else wants it ends
// the session first (`GroupPlan::end_session`) or tries with a bound.
#[allow(clippy::await_holding_lock)]
async fn session<I: Inbox, O: Outbox>(
    ctx: &ReceiverContext,
    mut first: Message,
    inbox: &mut I,
    writer: &mut O,
    peer_site: Option<&str>,
    closer: Option<SessionCloser>,
) -> Result<(), SessionError> {
    if let Message::Define { group, definition } = first {
        let definer = ctx.definer.read().clone();
        let defined = match definer {
            Some(d) => runtime::blocking(|| d.define(&group, &definition, peer_site)),
            None => Err(Box::new(Refusal::UnknownGroup(group.clone())) as _),
        };
        match defined {
            Ok(()) => {
                writer.send(&Message::Defined { group }).await?;
                writer.flush().await?;
            }
            Err(source) => return Err(SessionError::Define { group, source }),
        }
        first = inbox.next_opening().await?;
    }
    let hello = match first {
        Message::Hello(h) => h,
        other => return Err(ProtocolError::Unexpected(other.kind()).into()),
    };
    let plan = ctx
        .groups
        .read()
        .iter()
        .find(|g| g.name() == hello.group)
        .cloned();
    rs::check_hello(
        &hello,
        &ctx.site,
        peer_site,
        plan.as_ref().map(|p| &p.membership),
    )?;
    let Some(plan) = plan else {
        return Err(Refusal::UnknownGroup(hello.group).into());
    };
    // Checked before waiting for a running session (a stale primary, or
    // one the coordinator does not name owner, is turned away without
    // disturbing it) and again under the group's lock.
    rs::check_epoch(hello.epoch, plan.position.lock().epoch)?;
    let owner = runtime::blocking(|| ctx.owners.settle(&hello, &plan.membership, OWNER_WAIT));
    if let OwnerVerdict::Refused(refusal) | OwnerVerdict::Unconfirmed(refusal) =
        rs::judge_owner(&hello, &owner)
    {
        return Err(refusal.into());
    }
    let Some(mut group) = runtime::blocking(|| plan.group.try_lock_for(TAKEOVER_WAIT)) else {
        return Err(Refusal::Busy(plan.name().to_owned()).into());
    };
    // A replica past the new owner's fork that holds the fork as a
    // recovery point follows the new history by rolling back to it
    // (docs/HISTORY.md): no comparison at all.
    if let Some(point) = fork_point(&group, &hello) {
        let from = group.tip();
        runtime::blocking(|| group.roll_back_to(point))?;
        tracing::info!(group = %plan.name(), from_epoch = from.0, from_seq = from.1, fork_epoch = point.epoch, fork_seq = point.seq, "rolled back to the new owner's fork, a recovery point here");
    }
    let (mut session, welcome) = ReplicaSession::start(
        &ctx.site,
        &hello,
        &ctx.owners.owner(&plan.membership),
        &group.position(),
        Instant::now(),
    )?;
    group.set_epoch(hello.epoch)?;
    *plan.session.lock() = closer;
    struct EndSession<'a>(&'a GroupPlan);
    impl Drop for EndSession<'_> {
        fn drop(&mut self) {
            *self.0.session.lock() = None;
            self.0.connected.store(false, Ordering::Release);
        }
    }
    let _session = EndSession(&plan);
    tracing::info!(group = %plan.name(), primary = %hello.primary, epoch = hello.epoch, durable = welcome.durable, state = welcome.state.as_str(), "replication session started");
    let divergence = group.divergence();
    tracing::info!(group = %plan.name(), resync_epoch = divergence.resync_epoch, known = divergence.known, ranges = divergence.ranges.len(), "told the primary where this replica may differ");
    writer.send(&Message::Welcome(welcome)).await?;
    writer.send(&Message::Diverged(divergence)).await?;
    writer.flush().await?;
    plan.connected.store(true, Ordering::Release);
    let mut data = Vec::new();
    // Whatever arrived before the session ends is kept: made durable
    // before leaving, so the next session's welcome starts from it.
    let keep = |group: &mut ReplicaGroup| {
        runtime::blocking(|| {
            if group.has_uncommitted() {
                group.commit()?;
            }
            group.checkpoint()
        })
    };
    loop {
        let msg = match inbox.next().await {
            Ok(m) => m,
            Err(e) => {
                keep(&mut group)?;
                return match e {
                    PeerError::Closed => Ok(()),
                    e => Err(e.into()),
                };
            }
        };
        // A message the session refuses ends it; what came before stays
        // (a journal with records received but not committed would make
        // the next session refuse the records it resends).
        let action = match session.step(msg) {
            Ok(action) => action,
            Err(e) => {
                keep(&mut group)?;
                return Err(e.into());
            }
        };
        match action {
            Action::Receive(r) => group.receive_record(&r)?,
            Action::BeginResync { resume_at } => {
                tracing::info!(group = %plan.name(), resume_at, "resync started: replica is inconsistent until it completes");
                runtime::blocking(|| group.begin_resync(session.epoch(), resume_at))?;
            }
            Action::Compare {
                volume,
                offset,
                chunk,
                hashes,
            } => {
                let mine = runtime::blocking(|| group.hashes(volume, offset, chunk, hashes.len()))?;
                let mut bitmap = vec![0u8; tandem_peer::diff_bitmap_len(hashes.len())];
                for (i, theirs) in hashes.iter().enumerate() {
                    if mine.get(i) != Some(theirs) {
                        tandem_peer::set_diff_bit(&mut bitmap, i);
                    }
                }
                writer
                    .send(&Message::Diff {
                        volume,
                        offset,
                        chunk,
                        bitmap,
                    })
                    .await?;
            }
            Action::WriteChunk {
                volume,
                offset,
                data: payload,
            } => {
                payload.decode_into(&mut data)?;
                runtime::blocking(|| group.write_chunk(volume, offset, &data))?;
            }
            Action::EndResync {
                consistent_at,
                resume_at,
            } => {
                runtime::blocking(|| group.end_resync(consistent_at))?;
                tracing::info!(group = %plan.name(), consistent_at, "resync data complete");
                writer.send(&Message::ResyncDone { resume_at }).await?;
            }
            Action::StoreFile {
                path,
                mode,
                data: payload,
            } => {
                payload.decode_into(&mut data)?;
                let stored = runtime::blocking(|| {
                    if path == crate::files::VM_DEFINITION {
                        match &plan.vm_definition {
                            Some(at) => {
                                crate::files::store_at(at, mode, &data).map(|()| at.clone())
                            }
                            None => Err(crate::files::FileError::NotConfigured(path.clone())),
                        }
                    } else {
                        crate::files::store(&plan.files_dir, &plan.files, &path, mode, &data)
                    }
                });
                match stored {
                    Ok(at) => {
                        tracing::info!(group = %plan.name(), file = %path, copy = %at.display(), "configuration file replicated")
                    }
                    Err(e) => {
                        tracing::warn!(group = %plan.name(), "refused a replicated file: {e}")
                    }
                }
            }
            Action::Mark { seq, time_ms } => {
                group.mark(seq, time_ms);
                plan.marks.note(seq, time_ms);
            }
            Action::Pong(n) => writer.send(&Message::Pong(n)).await?,
            Action::None => {}
        }
        // Idle: nothing more has arrived for this session. Whatever it
        // has to say is then flushed below — a session never waits for
        // its next message with answers (a `Diff`, an `Ack`) unsent.
        let idle = inbox.is_idle();
        let committed = match session.plan_commit(
            Instant::now(),
            group.has_uncommitted(),
            group.has_batch(),
            idle,
        ) {
            Commit::Now => Some(runtime::blocking(|| group.commit())?),
            Commit::Background => {
                // Waits (off the worker) only when the committer is
                // far behind.
                if !group.try_commit_in_background()? {
                    runtime::blocking(|| group.commit_in_background())?;
                }
                None
            }
            Commit::Later => None,
        };
        let p = group.progress();
        let progress = Progress {
            committed,
            durable: p.durable,
            applied: p.applied,
        };
        if let Some(ack) = session.acknowledge(idle, progress) {
            writer.send(&Message::Ack(ack)).await?;
        }
        if committed.is_some() || idle {
            writer.flush().await?;
        }
    }
}

/// The recovery point of this replica's history that is the new owner's
/// fork, when the replica's images went past it on another history.
fn fork_point(group: &ReplicaGroup, hello: &tandem_peer::Hello) -> Option<crate::history::Point> {
    let history = group.history()?;
    let fork = (hello.fork_epoch, hello.fork_seq);
    if !off_the_owners_history(group.tip(), fork, hello.epoch) {
        return None;
    }
    history.find(fork.0, fork.1)
}

/// Whether images holding records up to `tip` went past `fork` on a
/// history other than that of the owner of `epoch`, whose history is the
/// fork's prefix and then its own records (epoch `epoch`): records of
/// `epoch` come from that owner alone, and a tip at or before the fork in
/// the fork's epoch is a prefix of it.
pub(crate) fn off_the_owners_history(tip: (u64, u64), fork: (u64, u64), epoch: u64) -> bool {
    if fork.1 == 0 || tip.0 == epoch {
        return false;
    }
    tip.0 > fork.0 || (tip.0 == fork.0 && tip.1 > fork.1)
}

#[cfg(test)]
mod fork_tests {
    use super::off_the_owners_history as off;

    #[test]
    fn only_a_tip_past_the_fork_on_another_history_is_off_it() {
        // The owner of epoch 3 forked at (2, 100).
        assert!(!off((3, 500), (2, 100), 3), "its own records");
        assert!(!off((2, 100), (2, 100), 3), "exactly at the fork");
        assert!(!off((2, 50), (2, 100), 3), "behind the fork, on it");
        assert!(
            off((2, 150), (2, 100), 3),
            "the old owner's records past the fork"
        );
        assert!(
            off((4, 10), (2, 100), 5),
            "a later epoch that is not the owner's"
        );
        assert!(
            !off((1, 10), (2, 100), 3),
            "an older epoch: not known, compared"
        );
        assert!(!off((2, 150), (0, 0), 3), "no fork");
    }
}
