//! The replica side of a replication session (docs/PEER.md): checks the
//! primary's hello, then journals and applies its records, answers hash
//! comparisons and writes resync chunks. One thread per session; the
//! group's lock is held for the whole session, so one primary at a time.

use std::io::{BufReader, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tandem_peer::{
    read_message, write_message, Ack, Hello, Message, PeerError, RecordOp, ReplicaState, Welcome,
};

use crate::error::ReplicaError;
use crate::journal::{Entry, EntryOp};
use crate::replica::ReplicaGroup;

/// Journal syncs (and acks) at least this often while records arrive.
const COMMIT_EVERY: Duration = Duration::from_millis(20);
/// ...or after this many bytes.
const COMMIT_BYTES: usize = 8 << 20;
/// How long a new session waits for the previous one of the same group.
const TAKEOVER_WAIT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("refused: {0}")]
    Refused(String),
    #[error("protocol: {0}")]
    Peer(#[from] PeerError),
    #[error("{0}")]
    Replica(#[from] ReplicaError),
    #[error("unexpected {0} message")]
    Unexpected(&'static str),
}

/// What this site knows of a group it replicates.
pub struct GroupPlan {
    pub name: String,
    pub primary: String,
    pub replicas: Vec<String>,
    pub volumes: Vec<(String, u64)>,
    pub group: Arc<Mutex<ReplicaGroup>>,
    /// The group's published position, readable while a session holds
    /// the group (so an older epoch is refused without waiting for it).
    pub position: Arc<Mutex<crate::replica::Position>>,
    /// A primary's session is running.
    pub connected: Arc<std::sync::atomic::AtomicBool>,
    /// `<data_dir>/files/<group>`, and the group's configured `files`.
    pub files_dir: std::path::PathBuf,
    pub files: Vec<std::path::PathBuf>,
    /// Ends the running session's connection (set while one runs), so a
    /// promotion need not wait for a silent old primary to time out.
    pub session: Mutex<Option<SessionCloser>>,
}

/// Shuts a session's connection down.
pub type SessionCloser = Box<dyn Fn() + Send + Sync>;

impl GroupPlan {
    /// Ends the running session, if any.
    pub fn end_session(&self) {
        if let Some(close) = self.session.lock().as_ref() {
            close();
        }
    }
}

/// Every group this site replicates now; groups come and go as this site
/// is promoted or demoted.
pub struct ReceiverContext {
    pub site: String,
    pub groups: parking_lot::RwLock<Vec<Arc<GroupPlan>>>,
}

/// Serves one connection from a primary. `peer_site` is the site name in
/// the peer's TLS certificate (None without TLS).
pub fn serve<R: Read, W: Write>(
    ctx: &ReceiverContext,
    reader: R,
    mut writer: W,
    peer_site: Option<&str>,
    closer: Option<SessionCloser>,
) -> Result<(), SessionError> {
    let mut reader = BufReader::with_capacity(1 << 20, reader);
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let hello = match read_message(&mut reader, &mut buf)? {
        Message::Hello(h) => h,
        other => return Err(SessionError::Unexpected(other.kind())),
    };
    let plan = match check_hello(ctx, &hello, peer_site) {
        Ok(plan) => plan,
        Err(reason) => return Err(refuse(&mut writer, reason)),
    };
    // Checked before waiting for a running session (a stale primary is
    // turned away at once) and again under the group's lock.
    let seen = plan.position.lock().epoch;
    if let Some(reason) = older_epoch(hello.epoch, seen) {
        return Err(refuse(&mut writer, reason));
    }
    let Some(mut group) = plan.group.try_lock_for(TAKEOVER_WAIT) else {
        let reason = format!("group {} already has a replication session", plan.name);
        return Err(refuse(&mut writer, reason));
    };
    if let Some(reason) = older_epoch(hello.epoch, group.position().epoch) {
        return Err(refuse(&mut writer, reason));
    }
    let p = group.position();
    group.set_epoch(hello.epoch)?;
    *plan.session.lock() = closer;
    struct EndSession<'a>(&'a GroupPlan);
    impl Drop for EndSession<'_> {
        fn drop(&mut self) {
            *self.0.session.lock() = None;
        }
    }
    let _session = EndSession(&plan);
    let state = if p.new {
        ReplicaState::New
    } else if p.consistent {
        ReplicaState::Consistent
    } else {
        ReplicaState::Inconsistent
    };
    write_message(
        &mut writer,
        &Message::Welcome(Welcome {
            replica: ctx.site.clone(),
            epoch: p.tip_epoch,
            applied: p.applied,
            durable: p.durable,
            state,
        }),
        &mut out,
    )?;
    tracing::info!(group = %plan.name, primary = %hello.primary, epoch = hello.epoch, durable = p.durable, state = state.as_str(), "replication session started");
    plan.connected
        .store(true, std::sync::atomic::Ordering::Release);
    struct Disconnect<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for Disconnect<'_> {
        fn drop(&mut self) {
            self.0.store(false, std::sync::atomic::Ordering::Release);
        }
    }
    let _connected = Disconnect(&plan.connected);
    let epoch = hello.epoch;
    let mut last_seq = p.received;
    let mut since_commit = Instant::now();
    let mut bytes_since_commit = 0usize;
    let mut data = Vec::new();
    // One record at a time, its data buffer reused.
    let mut entry = Entry {
        epoch: 0,
        seq: 0,
        volume: 0,
        op: EntryOp::Flush,
        fua: false,
        offset: 0,
        len: 0,
        data: Vec::new(),
    };
    let mut resync_from: Option<u64> = None;
    // (received, durable) last acknowledged.
    let mut acked = (last_seq, p.durable);
    loop {
        let mut pinged = false;
        let msg = read_message(&mut reader, &mut buf);
        let msg = match msg {
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
        let mut ack_now = false;
        match msg {
            Message::Record(r) => {
                if r.epoch != epoch {
                    return Err(SessionError::Refused(format!(
                        "record {} carries epoch {}, the session's is {epoch}",
                        r.seq, r.epoch
                    )));
                }
                if r.seq <= last_seq {
                    return Err(PeerError::Malformed(format!(
                        "record {} after {last_seq}: sequence went backwards",
                        r.seq
                    ))
                    .into());
                }
                last_seq = r.seq;
                entry.data.clear();
                if r.op == RecordOp::Write {
                    r.data.decode_into(&mut entry.data)?;
                    if entry.data.len() as u64 != r.len {
                        return Err(PeerError::Malformed(format!(
                            "record {}: {} data bytes for length {}",
                            r.seq,
                            entry.data.len(),
                            r.len
                        ))
                        .into());
                    }
                }
                bytes_since_commit += entry.data.len();
                ack_now = r.fua || r.op == RecordOp::Flush;
                entry.epoch = r.epoch;
                entry.seq = r.seq;
                entry.volume = r.volume;
                entry.op = match r.op {
                    RecordOp::Write => EntryOp::Write,
                    RecordOp::WriteZeroes => EntryOp::WriteZeroes,
                    RecordOp::Trim => EntryOp::Trim,
                    RecordOp::Flush => EntryOp::Flush,
                };
                entry.fua = r.fua;
                entry.offset = r.offset;
                entry.len = r.len;
                group.receive(&entry)?;
            }
            Message::ResyncBegin {
                epoch: e,
                resume_at,
                bytes,
            } => {
                if e != epoch {
                    return Err(SessionError::Refused(format!(
                        "resync with epoch {e}, the session's is {epoch}"
                    )));
                }
                tracing::info!(group = %plan.name, resume_at, bytes, "resync started: replica is inconsistent until it completes");
                group.begin_resync(epoch, resume_at)?;
                resync_from = Some(resume_at);
                // The resync redefines the position: records from
                // resume_at on follow, whatever this replica held before.
                last_seq = resume_at.saturating_sub(1);
                acked = (acked.0.min(last_seq), acked.1.min(last_seq));
            }
            Message::Hashes {
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
            Message::Chunk {
                volume,
                offset,
                data: payload,
            } => {
                payload.decode_into(&mut data)?;
                group.write_chunk(volume, offset, &data)?;
            }
            Message::ResyncEnd { consistent_at } => {
                let Some(resume_at) = resync_from.take() else {
                    return Err(SessionError::Unexpected("resync_end without resync_begin"));
                };
                group.end_resync(consistent_at)?;
                tracing::info!(group = %plan.name, consistent_at, "resync data complete");
                write_message(&mut writer, &Message::ResyncDone { resume_at }, &mut out)?;
                ack_now = true;
            }
            Message::File {
                path,
                mode,
                data: payload,
            } => {
                payload.decode_into(&mut data)?;
                match crate::files::store(&plan.files_dir, &plan.files, &path, mode, &data) {
                    Ok(at) => {
                        tracing::info!(group = %plan.name, file = %path, copy = %at.display(), "configuration file replicated")
                    }
                    Err(e) => tracing::warn!(group = %plan.name, "refused a replicated file: {e}"),
                }
            }
            Message::Ping(n) => {
                pinged = true;
                write_message(&mut writer, &Message::Pong(n), &mut out)?;
            }
            Message::Pong(_) => {}
            other => return Err(SessionError::Unexpected(other.kind())),
        }
        let idle = reader.buffer().is_empty();
        let due = since_commit.elapsed() >= COMMIT_EVERY || bytes_since_commit >= COMMIT_BYTES;
        // A FLUSH or FUA (or an idle primary's ping) is synced and applied
        // now and acknowledged at once; otherwise the committer syncs and
        // applies while reading goes on, and what it made durable is
        // reported with the next acknowledgement when the link is idle
        // (received at once: sync mode acknowledges writes on it).
        let committed = if ack_now || (pinged && group.has_uncommitted()) {
            Some(group.commit()?)
        } else {
            if due && group.has_batch() {
                group.commit_in_background()?;
            }
            None
        };
        if committed.is_some() || due {
            since_commit = Instant::now();
            bytes_since_commit = 0;
        }
        if committed.is_some() || idle {
            let p = group.progress();
            let durable = committed.unwrap_or(p.durable);
            if committed.is_some() || last_seq > acked.0 || durable > acked.1 {
                write_message(
                    &mut writer,
                    &Message::Ack(Ack {
                        received: last_seq,
                        durable,
                        applied: p.applied,
                    }),
                    &mut out,
                )?;
                writer.flush().map_err(PeerError::Io)?;
                acked = (last_seq, durable);
            }
        }
    }
}

/// Tells the primary why its session is refused (best effort) and returns
/// the error to log.
fn refuse<W: Write>(writer: &mut W, reason: String) -> SessionError {
    let mut out = Vec::new();
    let _ = write_message(
        writer,
        &Message::Refuse {
            reason: reason.clone(),
        },
        &mut out,
    );
    SessionError::Refused(reason)
}

/// Why a hello of `epoch` is refused by a replica that holds `held`.
fn older_epoch(epoch: u64, held: u64) -> Option<String> {
    (epoch < held).then(|| format!("epoch {epoch} is older than {held}, which this replica holds"))
}

/// Why this replica refuses the hello, if it does.
fn check_hello(
    ctx: &ReceiverContext,
    hello: &Hello,
    peer_site: Option<&str>,
) -> Result<Arc<GroupPlan>, String> {
    if hello.version != tandem_peer::VERSION {
        return Err(format!(
            "protocol version {} is not supported (this site speaks {})",
            hello.version,
            tandem_peer::VERSION
        ));
    }
    if hello.replica != ctx.site {
        return Err(format!("this is site {}, not {}", ctx.site, hello.replica));
    }
    if let Some(cert_site) = peer_site {
        if cert_site != hello.primary {
            return Err(format!(
                "certificate is for site {cert_site} but the hello claims {}",
                hello.primary
            ));
        }
    }
    let Some(plan) = ctx
        .groups
        .read()
        .iter()
        .find(|g| g.name == hello.group)
        .cloned()
    else {
        return Err(format!(
            "group {} is not replicated to this site",
            hello.group
        ));
    };
    if !plan.replicas.contains(&ctx.site) {
        return Err(format!(
            "site {} is not a replica of group {}",
            ctx.site, plan.name
        ));
    }
    if hello.primary != plan.primary && !plan.replicas.contains(&hello.primary) {
        return Err(format!(
            "site {} is not part of group {}",
            hello.primary, plan.name
        ));
    }
    if hello.volumes != plan.volumes {
        return Err(format!(
            "volumes differ: primary has {:?}, this site is configured with {:?}",
            hello.volumes, plan.volumes
        ));
    }
    Ok(plan)
}
