//! One client's session, on the connection's own thread: the handshake
//! (with STARTTLS where the listener requires TLS), then the transmission
//! phase.
//!
//! Every request is admitted against the connection's budget and the
//! agent-wide one before it is read any further (see `budget`); while it
//! is not admitted the thread reads nothing more and only writes replies.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::budget::{self, Wake, REQUEST_OVERHEAD};
use crate::conn::{Charge, Conn, Mailbox, Outgoing, Transport, WaitError};
use crate::error::{ErrorCode, ExportError, ProtocolError};
use crate::export::{Catalog, Completion, Export};
use crate::handshake::{self, Agreement, Negotiation, Step};
use crate::proto::*;
use crate::server::{ListenOptions, Scope};
use crate::stats::{ExportStats, Op};
use crate::tls::TlsStream;
use crate::transmission::{self as tx, Command, RequestHeader, Session};

/// Reader buffer: many pipelined 4 KiB writes fit in one read.
const INBUF: usize = 256 << 10;
/// Batched replies are handed to the socket beyond this size.
const BATCH_FLUSH: usize = 256 << 10;
/// A client must finish the handshake within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// A client that reads none of its waiting replies for this long is
/// disconnected.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// Serves one accepted client until it leaves or its scope stops.
pub(crate) fn serve(
    scope: &Arc<Scope>,
    id: u64,
    socket: OwnedFd,
    mailbox: Arc<Mailbox>,
    peer: &str,
    catalog: &dyn Catalog,
    options: &ListenOptions,
) {
    debug!(peer = %peer, "NBD client connected");
    let mut conn = Conn::new(
        Transport::Plain(socket),
        mailbox,
        scope.server.reply_timeout,
    );
    let result = match negotiate(scope, &mut conn, catalog, options) {
        Ok(Some(agreement)) => {
            info!(
                peer = %peer,
                export = agreement.export.name(),
                structured = agreement.structured,
                block_status = agreement.base_allocation,
                tls = matches!(conn.transport, Transport::Tls(_)),
                "NBD client attached"
            );
            Transmission::new(scope, id, conn, agreement).run()
        }
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => debug!(peer = %peer, "NBD client disconnected"),
        Err(Ended::Wait(WaitError::RepliesStalled(after))) => warn!(
            peer = %peer,
            "NBD client did not read its replies within {after:?}: disconnecting it"
        ),
        Err(Ended::Wait(WaitError::Deadline)) => warn!(
            peer = %peer,
            "closing NBD connection: {}",
            ProtocolError::HandshakeTimeout(HANDSHAKE_TIMEOUT)
        ),
        Err(Ended::Wait(WaitError::Io(e))) if is_disconnect(&e) => {
            debug!(peer = %peer, "NBD client went away: {e}");
        }
        Err(Ended::Wait(WaitError::Io(e))) => warn!(peer = %peer, "closing NBD connection: {e}"),
        Err(Ended::Protocol(e)) => warn!(peer = %peer, "closing NBD connection: {e}"),
    }
}

fn is_disconnect(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::UnexpectedEof
    )
}

/// Why a session ended early.
#[derive(Debug)]
enum Ended {
    Wait(WaitError),
    Protocol(ProtocolError),
}

impl From<WaitError> for Ended {
    fn from(e: WaitError) -> Self {
        Ended::Wait(e)
    }
}

impl From<ProtocolError> for Ended {
    fn from(e: ProtocolError) -> Self {
        Ended::Protocol(e)
    }
}

fn negotiate(
    scope: &Scope,
    conn: &mut Conn,
    catalog: &dyn Catalog,
    options: &ListenOptions,
) -> Result<Option<Agreement>, Ended> {
    let until = Instant::now() + HANDSHAKE_TIMEOUT;
    let deadline = Some(until);
    conn.write_all(&handshake::greeting(), deadline)?;
    let mut flags = [0u8; 4];
    conn.read_exact(&mut flags, deadline)?;
    let mut negotiation = Negotiation::new(catalog);
    if options.tls.is_some() {
        negotiation.require_tls();
    }
    negotiation.client_flags(u32::from_be_bytes(flags))?;
    let mut out = Vec::new();
    let mut data = Vec::new();
    loop {
        let mut header = [0u8; OPTION_HEADER_LEN];
        conn.read_exact(&mut header, deadline)?;
        let header = handshake::decode_option_header(&header)?;
        data.resize(header.len as usize, 0);
        conn.read_exact(&mut data, deadline)?;
        if scope.is_stopping() {
            negotiation.set_shutting_down();
        }
        out.clear();
        let step = negotiation.option(header.option, &data, &mut out)?;
        conn.write_all(&out, deadline)?;
        match step {
            Step::Continue => {}
            Step::Transmit(agreement) => return Ok(Some(agreement)),
            Step::Close => return Ok(None),
            Step::StartTls => {
                let Some(config) = options.tls.clone() else {
                    return Err(ProtocolError::TlsRequired.into());
                };
                let socket = conn
                    .transport
                    .fd()
                    .try_clone_to_owned()
                    .map_err(|e| Ended::Wait(WaitError::Io(e)))?;
                let tls = TlsStream::accept(socket, config, until)
                    .map_err(|e| Ended::Protocol(ProtocolError::Tls(e)))?;
                conn.transport = Transport::Tls(Box::new(tls));
                negotiation.tls_started();
            }
        }
    }
}

/// The transmission phase of one connection.
struct Transmission {
    scope: Arc<Scope>,
    /// The connection's number (its queue in the pool).
    id: u64,
    conn: Conn,
    waker: Arc<dyn Wake>,
    export: Arc<dyn Export>,
    /// The export's counters (or this connection's own, uncounted).
    stats: Arc<ExportStats>,
    session: Session,
    inbuf: Vec<u8>,
    start: usize,
    end: usize,
    /// Replies made on this thread, not yet handed to the socket.
    batch: Vec<u8>,
    batch_charge: Charge,
    batch_requests: usize,
}

impl Transmission {
    fn new(scope: &Arc<Scope>, id: u64, conn: Conn, agreement: Agreement) -> Self {
        let session = Session {
            export_size: agreement.export.size(),
            read_only: agreement.export.read_only(),
            structured: agreement.structured,
            base_allocation: agreement.base_allocation,
        };
        let waker: Arc<dyn Wake> = Arc::clone(&conn.mailbox) as Arc<dyn Wake>;
        let stats = agreement.export.stats().unwrap_or_default();
        Transmission {
            stats,
            scope: Arc::clone(scope),
            id,
            conn,
            waker,
            export: agreement.export,
            session,
            inbuf: vec![0u8; INBUF],
            start: 0,
            end: 0,
            batch: Vec::with_capacity(64 << 10),
            batch_charge: Charge::none(&scope.server.budget),
            batch_requests: 0,
        }
    }

    fn run(mut self) -> Result<(), Ended> {
        let result = self.serve();
        self.flush_batch();
        if result.is_err() {
            // The stream failed or is out of step with the client: the
            // replies still due cannot be delivered (the pool's jobs finish
            // on their own and give their budget back).
            let _ = rustix::net::shutdown(self.conn.transport.fd(), rustix::net::Shutdown::Both);
            return result;
        }
        // The client left between requests, disconnected or the scope
        // stops: answer everything already received.
        while self.conn.requests > 0 && !self.conn.broken {
            if let Err(e) = self.conn.wait(false, None) {
                return Err(e.into());
            }
        }
        result
    }

    fn serve(&mut self) -> Result<(), Ended> {
        loop {
            if self.conn.broken {
                return Ok(());
            }
            if self.buffered() < REQUEST_LEN {
                if self.scope.is_stopping() {
                    return Ok(());
                }
                if !self.fill(REQUEST_LEN)? {
                    if self.buffered() == 0 {
                        return Ok(()); // clean end between requests
                    }
                    return Err(ProtocolError::Truncated("request header").into());
                }
            }
            let Some(header) = tx::decode_request(&self.inbuf[self.start..self.end])? else {
                continue;
            };
            let checked = tx::validate(&header, &self.session);
            let cost = REQUEST_OVERHEAD
                + match &checked {
                    // The payload, and the copy the export may keep of
                    // it while applying it (the change capture's record).
                    Ok(Command::Write { len, .. }) => 2 * *len as usize,
                    Ok(Command::Read { len, .. }) => {
                        tx::read_reply_header_len(self.session.structured) + *len as usize
                    }
                    _ => 0,
                };
            let charge = self.admit(cost)?;
            self.start += REQUEST_LEN;
            if !self.handle(header, checked, charge)? {
                return Ok(());
            }
            if self.batch.len() >= BATCH_FLUSH {
                self.flush_batch();
            }
        }
    }

    /// Waits until the connection's budget and the agent's admit a
    /// request of `cost` bytes, writing replies meanwhile.
    fn admit(&mut self, cost: usize) -> Result<Charge, Ended> {
        let budget = Arc::clone(&self.scope.server.budget);
        if budget::admits(self.conn.charged, self.conn.requests, cost)
            && budget.try_acquire(cost, &self.waker)
        {
            return Ok(self.charged(&budget, cost));
        }
        loop {
            // Sends (which collects finished replies and clears the
            // mailbox's signal), then looks at the budgets: a release
            // after this point signals the mailbox, and the poll below
            // returns at once.
            self.flush_batch();
            if self.conn.broken {
                return Err(WaitError::Io(std::io::ErrorKind::BrokenPipe.into()).into());
            }
            if budget::admits(self.conn.charged, self.conn.requests, cost)
                && budget.try_acquire(cost, &self.waker)
            {
                return Ok(self.charged(&budget, cost));
            }
            self.conn.poll(false, None)?;
        }
    }

    fn charged(&mut self, budget: &Arc<crate::budget::Budget>, cost: usize) -> Charge {
        self.conn.charged += cost;
        self.conn.requests += 1;
        let mut charge = Charge::none(budget);
        charge.add(cost);
        charge
    }

    /// Gives back the part of a request's charge no longer held.
    fn give_back(&mut self, charge: &mut Charge, bytes: usize) {
        charge.give_back(bytes);
        self.conn.charged -= bytes;
    }

    fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Reads until at least `want` bytes are buffered (`want` <= INBUF).
    /// Pending replies go out first. `Ok(false)` at end of stream.
    fn fill(&mut self, want: usize) -> Result<bool, Ended> {
        if self.start > 0 && self.inbuf.len() - self.start < want {
            self.inbuf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        while self.buffered() < want {
            self.flush_batch();
            match self.conn.read(&mut self.inbuf[self.end..], None)? {
                0 => return Ok(false),
                n => self.end += n,
            }
        }
        Ok(true)
    }

    /// Hands the batched replies to the socket.
    fn flush_batch(&mut self) {
        if !self.batch.is_empty() || self.batch_requests > 0 {
            let charge = std::mem::replace(
                &mut self.batch_charge,
                Charge::none(&self.scope.server.budget),
            );
            self.conn.queue(Outgoing {
                bytes: std::mem::replace(&mut self.batch, Vec::with_capacity(64 << 10)),
                charge,
                requests: std::mem::take(&mut self.batch_requests),
            });
        }
        // A failure marks the connection broken; the loop sees it.
        let _ = self.conn.send();
    }

    /// A reply made on this thread: into the batch.
    fn reply_here(&mut self, charge: Charge) {
        self.batch_charge.absorb(charge);
        self.batch_requests += 1;
    }

    /// Handles one request; `Ok(false)` ends the session (DISC).
    fn handle(
        &mut self,
        header: RequestHeader,
        checked: Result<Command, ExportError>,
        mut charge: Charge,
    ) -> Result<bool, Ended> {
        let started = Instant::now();
        let command = match checked {
            Ok(command) => command,
            Err(err) => {
                self.skip_payload(header.payload_len() as usize)?;
                debug!(
                    export = self.export.name(),
                    "refused request {header:?}: {err}"
                );
                self.stats.error();
                tx::error_reply(
                    &mut self.batch,
                    self.session.structured,
                    header.cookie,
                    &err,
                );
                self.reply_here(charge);
                return Ok(true);
            }
        };
        let cookie = header.cookie;
        match command {
            Command::Read { offset, len } => {
                self.stats.read_bytes(u64::from(len));
                self.read(cookie, offset, len, charge, started);
            }
            Command::Write { offset, len, fua } => {
                let len = len as usize;
                let result = if len <= INBUF {
                    if !self.fill(len)? {
                        return Err(ProtocolError::Truncated("write payload").into());
                    }
                    let data = &self.inbuf[self.start..self.start + len];
                    self.start += len;
                    self.export.write(offset, data, fua)
                } else {
                    let payload = self.read_large_payload(len)?;
                    self.export.write_owned(offset, payload, fua)
                };
                // The payload (and any copy made while applying it) is no
                // longer held by this request.
                self.give_back(&mut charge, 2 * len);
                self.stats.written_bytes(len as u64);
                self.complete(cookie, result, charge, Op::Write, started);
            }
            Command::Trim { offset, len, fua } => {
                let result = if len == 0 {
                    Ok(Completion::Done)
                } else {
                    self.export.trim(offset, u64::from(len), fua)
                };
                self.complete(cookie, result, charge, Op::Trim, started);
            }
            Command::WriteZeroes { offset, len, flags } => {
                let result = if len == 0 {
                    Ok(Completion::Done)
                } else {
                    self.export.write_zeroes(offset, u64::from(len), flags)
                };
                self.complete(cookie, result, charge, Op::WriteZeroes, started);
            }
            Command::Flush => {
                let result = self.export.flush();
                self.complete(cookie, result, charge, Op::Flush, started);
            }
            Command::Cache { offset, len } => {
                let result = self
                    .export
                    .cache(offset, u64::from(len))
                    .map(|()| Completion::Done);
                self.complete(cookie, result, charge, Op::Cache, started);
            }
            Command::BlockStatus {
                offset,
                len,
                req_one,
            } => {
                self.block_status(cookie, offset, len, req_one);
                self.stats.served(Op::BlockStatus, started);
                self.reply_here(charge);
            }
            Command::Disconnect => {
                self.reply_here(charge);
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn skip_payload(&mut self, mut len: usize) -> Result<(), Ended> {
        while len > 0 {
            if self.buffered() == 0 && !self.fill(1)? {
                return Err(ProtocolError::Truncated("refused write payload").into());
            }
            let n = len.min(self.buffered());
            self.start += n;
            len -= n;
        }
        Ok(())
    }

    /// A write payload larger than the input buffer, in a buffer of its
    /// own (charged to the budgets before it was allocated).
    fn read_large_payload(&mut self, len: usize) -> Result<Vec<u8>, Ended> {
        // `Vec::with_capacity` gives exactly `len` of capacity: read into
        // it without zeroing it first.
        let mut payload = Vec::with_capacity(len);
        let have = self.buffered().min(len);
        payload.extend_from_slice(&self.inbuf[self.start..self.start + have]);
        self.start += have;
        if have < len {
            self.flush_batch();
            let read = if payload.capacity() == len {
                self.conn.read_to_capacity(&mut payload, None)
            } else {
                payload.resize(len, 0);
                self.conn.read_exact(&mut payload[have..], None)
            };
            read.map_err(|e| match e {
                WaitError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    Ended::Protocol(ProtocolError::Truncated("write payload"))
                }
                e => Ended::Wait(e),
            })?;
        }
        Ok(payload)
    }

    /// Replies now, or hands the rest of the operation to the pool; the
    /// request is counted (and timed) once its reply is made.
    fn complete(
        &mut self,
        cookie: u64,
        result: Result<Completion, ExportError>,
        charge: Charge,
        op: Op,
        started: Instant,
    ) {
        match result {
            Ok(Completion::Done) => {
                tx::ok_reply(&mut self.batch, cookie);
                self.stats.served(op, started);
                self.reply_here(charge);
            }
            Ok(Completion::Deferred(rest)) => {
                let mailbox = Arc::clone(&self.conn.mailbox);
                let structured = self.session.structured;
                let stats = Arc::clone(&self.stats);
                self.submit(Box::new(move || {
                    let mut reply = Vec::with_capacity(32);
                    match rest() {
                        Ok(()) => tx::ok_reply(&mut reply, cookie),
                        Err(err) => {
                            stats.error();
                            tx::error_reply(&mut reply, structured, cookie, &err);
                        }
                    }
                    stats.served(op, started);
                    mailbox.post(Outgoing {
                        bytes: reply,
                        charge,
                        requests: 1,
                    });
                }));
            }
            Err(err) => {
                self.stats.error();
                self.stats.served(op, started);
                debug!(export = self.export.name(), "request failed: {err}");
                tx::error_reply(&mut self.batch, self.session.structured, cookie, &err);
                self.reply_here(charge);
            }
        }
    }

    fn submit(&self, job: crate::pool::Job) {
        self.scope.server.pool.submit(self.id, job);
    }

    fn read(&mut self, cookie: u64, offset: u64, len: u32, charge: Charge, started: Instant) {
        let structured = self.session.structured;
        if len == 0 {
            self.stats.served(Op::Read, started);
            if structured {
                tx::chunk_header(&mut self.batch, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
            } else {
                tx::ok_reply(&mut self.batch, cookie);
            }
            self.reply_here(charge);
            return;
        }
        let header_len = tx::read_reply_header_len(structured);
        let at = self.batch.len();
        self.batch.resize(at + header_len + len as usize, 0);
        match self
            .export
            .read_cached(offset, &mut self.batch[at + header_len..])
        {
            Ok(true) => {
                let mut header = Vec::with_capacity(header_len);
                tx::read_reply_header(&mut header, structured, cookie, offset, len);
                self.batch[at..at + header_len].copy_from_slice(&header);
                self.stats.served(Op::Read, started);
                self.reply_here(charge);
                return;
            }
            Ok(false) => self.batch.truncate(at),
            Err(err) => {
                self.batch.truncate(at);
                tx::error_reply(&mut self.batch, structured, cookie, &err);
                self.stats.error();
                self.stats.served(Op::Read, started);
                self.reply_here(charge);
                return;
            }
        }
        // Not cached: read on a worker so this connection keeps going.
        let export = Arc::clone(&self.export);
        let mailbox = Arc::clone(&self.conn.mailbox);
        let bytes = header_len + len as usize;
        let stats = Arc::clone(&self.stats);
        self.submit(Box::new(move || {
            let mut reply = vec![0u8; bytes];
            match export.read(offset, &mut reply[header_len..]) {
                Ok(()) => {
                    let mut header = Vec::with_capacity(header_len);
                    tx::read_reply_header(&mut header, structured, cookie, offset, len);
                    reply[..header_len].copy_from_slice(&header);
                }
                Err(err) => {
                    reply.clear();
                    tx::error_reply(&mut reply, structured, cookie, &err);
                    stats.error();
                }
            }
            stats.served(Op::Read, started);
            mailbox.post(Outgoing {
                bytes: reply,
                charge,
                requests: 1,
            });
        }));
    }

    fn block_status(&mut self, cookie: u64, offset: u64, len: u32, req_one: bool) {
        let result = if len == 0 {
            Err(ExportError::new(
                ErrorCode::Invalid,
                "block status of zero length",
            ))
        } else {
            self.export.extents(offset, u64::from(len))
        };
        match result {
            Ok(mut extents) if !extents.is_empty() => {
                if req_one {
                    extents.truncate(1);
                    extents[0].length = extents[0].length.min(len);
                }
                extents.truncate(tx::MAX_REPLY_EXTENTS);
                tx::block_status_reply(&mut self.batch, cookie, &extents);
            }
            Ok(_) => {
                let err = ExportError::new(ErrorCode::Io, "no allocation information");
                tx::error_reply(&mut self.batch, true, cookie, &err);
            }
            Err(err) => tx::error_reply(&mut self.batch, true, cookie, &err),
        }
    }
}
