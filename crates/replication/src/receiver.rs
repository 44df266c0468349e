//! The replica side of a replication session (docs/PEER.md), as a driver
//! of [`ReplicaSession`]: reads the primary's frames, carries out what the
//! session says on the group's journal and images
//! ([`crate::replica::ReplicaGroup`]), and writes the answers. One thread
//! per session; the group's lock is held for the whole session, so one
//! primary at a time.

use std::io::{BufReader, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tandem_peer::{read_message, read_message_within, write_message, Message, PeerError};

use crate::error::ReplicaError;
use crate::journal::Entry;
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
pub fn serve<R: Read, W: Write>(
    ctx: &ReceiverContext,
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
pub fn serve_from<R: Read, W: Write>(
    ctx: &ReceiverContext,
    mut first: Message,
    reader: R,
    mut writer: W,
    peer_site: Option<&str>,
    closer: Option<SessionCloser>,
) -> Result<(), SessionError> {
    let mut reader = BufReader::with_capacity(1 << 20, reader);
    let mut buf = Vec::new();
    let mut out = Vec::new();
    if let Message::Retire { group } = first {
        let definer = ctx.definer.read().clone();
        let retired = match definer {
            Some(d) => d.retire(&group, peer_site),
            None => Err(Box::new(Refusal::UnknownGroup(group.clone())) as _),
        };
        return match retired {
            Ok(()) => {
                write_message(&mut writer, &Message::Retired { group }, &mut out)?;
                writer.flush().map_err(PeerError::Io)?;
                Ok(())
            }
            Err(source) => {
                send_refusal(&mut writer, &source.to_string(), &mut out);
                Err(SessionError::Retire { group, source })
            }
        };
    }
    if let Message::Define { group, definition } = first {
        let definer = ctx.definer.read().clone();
        let defined = match definer {
            Some(d) => d.define(&group, &definition, peer_site),
            None => Err(Box::new(Refusal::UnknownGroup(group.clone())) as _),
        };
        match defined {
            Ok(()) => {
                write_message(&mut writer, &Message::Defined { group }, &mut out)?;
                writer.flush().map_err(PeerError::Io)?;
            }
            Err(source) => {
                send_refusal(&mut writer, &source.to_string(), &mut out);
                return Err(SessionError::Define { group, source });
            }
        }
        // The hello, still before the session is authenticated.
        first = read_message_within(&mut reader, &mut buf, tandem_peer::MAX_PREAUTH_PAYLOAD)?;
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
    if let Err(refusal) = rs::check_hello(
        &hello,
        &ctx.site,
        peer_site,
        plan.as_ref().map(|p| &p.membership),
    ) {
        return Err(refuse(&mut writer, refusal));
    }
    let Some(plan) = plan else {
        return Err(refuse(&mut writer, Refusal::UnknownGroup(hello.group)));
    };
    // Checked before waiting for a running session (a stale primary, or
    // one the coordinator does not name owner, is turned away without
    // disturbing it) and again under the group's lock.
    if let Err(refusal) = rs::check_epoch(hello.epoch, plan.position.lock().epoch) {
        return Err(refuse(&mut writer, refusal));
    }
    let owner = ctx.owners.settle(&hello, &plan.membership, OWNER_WAIT);
    if let OwnerVerdict::Refused(refusal) | OwnerVerdict::Unconfirmed(refusal) =
        rs::judge_owner(&hello, &owner)
    {
        return Err(refuse(&mut writer, refusal));
    }
    let Some(mut group) = plan.group.try_lock_for(TAKEOVER_WAIT) else {
        return Err(refuse(&mut writer, Refusal::Busy(plan.name().to_owned())));
    };
    let (mut session, welcome) = match ReplicaSession::start(
        &ctx.site,
        &hello,
        &ctx.owners.owner(&plan.membership),
        &group.position(),
        Instant::now(),
    ) {
        Ok(started) => started,
        Err(refusal) => return Err(refuse(&mut writer, refusal)),
    };
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
    write_message(&mut writer, &Message::Welcome(welcome), &mut out)?;
    plan.connected.store(true, Ordering::Release);
    let mut data = Vec::new();
    // One record at a time, its data buffer reused.
    let mut entry = Entry {
        epoch: 0,
        seq: 0,
        volume: 0,
        op: tandem_peer::RecordOp::Flush,
        fua: false,
        offset: 0,
        len: 0,
        data: Vec::new(),
    };
    loop {
        let msg = match read_message(&mut reader, &mut buf) {
            Ok(m) => m,
            Err(e) => {
                // Whatever arrived is kept: make it durable before leaving.
                if group.has_uncommitted() {
                    group.commit()?;
                }
                group.checkpoint()?;
                return match e {
                    PeerError::Closed => Ok(()),
                    e => Err(e.into()),
                };
            }
        };
        match session.step(msg)? {
            Action::Receive(r) => {
                entry.data.clear();
                if r.op == tandem_peer::RecordOp::Write {
                    r.data.decode_into(&mut entry.data)?;
                }
                entry.epoch = r.epoch;
                entry.seq = r.seq;
                entry.volume = r.volume;
                entry.op = r.op;
                entry.fua = r.fua;
                entry.offset = r.offset;
                entry.len = r.len;
                group.receive(&entry)?;
            }
            Action::BeginResync { resume_at } => {
                tracing::info!(group = %plan.name(), resume_at, "resync started: replica is inconsistent until it completes");
                group.begin_resync(session.epoch(), resume_at)?;
            }
            Action::Compare {
                volume,
                offset,
                chunk,
                hashes,
            } => {
                let mine = group.hashes(volume, offset, chunk, hashes.len())?;
                let mut bitmap = vec![0u8; tandem_peer::diff_bitmap_len(hashes.len())];
                for (i, theirs) in hashes.iter().enumerate() {
                    if mine.get(i) != Some(theirs) {
                        tandem_peer::set_diff_bit(&mut bitmap, i);
                    }
                }
                write_message(
                    &mut writer,
                    &Message::Diff {
                        volume,
                        offset,
                        chunk,
                        bitmap,
                    },
                    &mut out,
                )?;
            }
            Action::WriteChunk {
                volume,
                offset,
                data: payload,
            } => {
                payload.decode_into(&mut data)?;
                group.write_chunk(volume, offset, &data)?;
            }
            Action::EndResync {
                consistent_at,
                resume_at,
            } => {
                group.end_resync(consistent_at)?;
                tracing::info!(group = %plan.name(), consistent_at, "resync data complete");
                write_message(&mut writer, &Message::ResyncDone { resume_at }, &mut out)?;
            }
            Action::StoreFile {
                path,
                mode,
                data: payload,
            } => {
                payload.decode_into(&mut data)?;
                let stored = if path == crate::files::VM_DEFINITION {
                    match &plan.vm_definition {
                        Some(at) => crate::files::store_at(at, mode, &data).map(|()| at.clone()),
                        None => Err(crate::files::FileError::NotConfigured(path.clone())),
                    }
                } else {
                    crate::files::store(&plan.files_dir, &plan.files, &path, mode, &data)
                };
                match stored {
                    Ok(at) => {
                        tracing::info!(group = %plan.name(), file = %path, copy = %at.display(), "configuration file replicated")
                    }
                    Err(e) => {
                        tracing::warn!(group = %plan.name(), "refused a replicated file: {e}")
                    }
                }
            }
            Action::Pong(n) => write_message(&mut writer, &Message::Pong(n), &mut out)?,
            Action::None => {}
        }
        let idle = reader.buffer().is_empty();
        let committed =
            match session.plan_commit(Instant::now(), group.has_uncommitted(), group.has_batch()) {
                Commit::Now => Some(group.commit()?),
                Commit::Background => {
                    group.commit_in_background()?;
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
            write_message(&mut writer, &Message::Ack(ack), &mut out)?;
        }
        if committed.is_some() || idle {
            writer.flush().map_err(PeerError::Io)?;
        }
    }
}

/// Tells the primary why its session is refused (best effort) and returns
/// the error to log.
fn refuse<W: Write>(writer: &mut W, refusal: Refusal) -> SessionError {
    send_refusal(writer, &refusal.to_string(), &mut Vec::new());
    refusal.into()
}
