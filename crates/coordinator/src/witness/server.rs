//! The `tandem witness` server: one [`MemStore`] on the real clock, its
//! state rewritten to the data directory after every change, served over
//! HTTP/1.1 JSON to the sites' coordinator clients.
//!
//! HTTP comes from `tandem-http`: each connection has its own thread (at
//! most [`Limits::max_connections`]), so a long poll (`/v1/wait`) never
//! delays another site's lease renewal.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::Serialize;

use tandem_http::{
    shorten, Handler, Limits, Options, Problem, Refusal, Request, Response, Secure, Transport,
};
use tandem_tls::https::{ServerStream, WitnessTls};

use super::persist::DataDir;
use super::policy::{self, Action};
use super::wire::{self, ErrorCode, ErrorReply};
use super::WitnessError;
use crate::keys::OwnerRecord;
use crate::memory::{MemStore, Persist, PersistError, RealClock, State};
use crate::{Compare, Op, Store, StoreError};

/// The header naming the site of a plain-HTTP request (TLS off, loopback
/// only); with TLS the site is the one in the client certificate.
pub const SITE_HEADER: &str = "Tandem-Site";

/// The longest a `/v1/wait` is held before it is answered.
pub const MAX_WAIT: Duration = Duration::from_secs(10);
/// The longest lease TTL granted (a day).
pub const MAX_TTL_MS: u64 = 24 * 3600 * 1000;
/// How long shutting down waits for connections to finish.
const DRAIN: Duration = Duration::from_secs(5);
/// Stack of a connection thread.
const CONN_STACK: usize = 512 * 1024;
/// How often a held `/v1/wait` looks at the stop flag.
const WAIT_SLICE: Duration = Duration::from_millis(250);

/// What every connection thread shares.
struct Shared {
    store: MemStore,
    stop: Arc<AtomicBool>,
    witness_id: String,
    /// Set when the witness must not answer any more: its state could not
    /// be written (memory is ahead of the disk), or it is stopping.
    failure: Arc<Mutex<Option<PersistError>>>,
    /// The data directory while this witness serves it; `None` once it
    /// stopped, so a straggling thread can never write it again.
    data: Arc<Mutex<Option<DataDir>>>,
    /// `/v1/wait` requests being held now (observability).
    waiting: AtomicUsize,
    /// Sites are known by their certificates (else by [`SITE_HEADER`]).
    tls: bool,
    policy: policy::Limits,
}

/// How a witness serves.
#[derive(Clone, Debug, Default)]
pub struct ServeOptions {
    /// HTTPS with the sites' client certificates; `None` is plain HTTP,
    /// accepted only on a loopback address.
    pub tls: Option<WitnessTls>,
    pub limits: Limits,
    pub policy: policy::Limits,
}

impl Shared {
    fn failure(&self) -> Option<PersistError> {
        self.failure.lock().clone()
    }
}

/// A running witness. Dropping it (or [`WitnessHandle::shutdown`]) stops
/// it and releases its data directory.
pub struct WitnessHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

/// Starts a witness serving `data_dir` on `listen` (`host:port`; port 0
/// picks a free one). It runs until `stop` is set or the handle is
/// dropped.
pub fn serve(
    listen: &str,
    data_dir: &Path,
    stop: Arc<AtomicBool>,
) -> Result<WitnessHandle, WitnessError> {
    serve_with(listen, data_dir, stop, Limits::default())
}

/// [`serve`] with explicit limits on what peers may send.
pub fn serve_with(
    listen: &str,
    data_dir: &Path,
    stop: Arc<AtomicBool>,
    limits: Limits,
) -> Result<WitnessHandle, WitnessError> {
    serve_options(
        listen,
        data_dir,
        stop,
        ServeOptions {
            limits,
            ..ServeOptions::default()
        },
    )
}

/// A witness with every option: TLS, connection limits, the policy's
/// limits. Plain HTTP is refused on an address that is not loopback.
pub fn serve_options(
    listen: &str,
    data_dir: &Path,
    stop: Arc<AtomicBool>,
    options: ServeOptions,
) -> Result<WitnessHandle, WitnessError> {
    let ServeOptions {
        tls,
        limits,
        policy,
    } = options;
    let (data, mut state) = DataDir::open(data_dir)?;
    remember_epoch_holders(&mut state);
    let witness_id = data.witness_id().to_owned();
    let listen_err = |source| WitnessError::Listen {
        addr: listen.to_owned(),
        source,
    };
    let listener = TcpListener::bind(listen).map_err(listen_err)?;
    let addr = listener.local_addr().map_err(listen_err)?;
    if tls.is_none() && !addr.ip().is_loopback() {
        return Err(WitnessError::PlainNotLoopback {
            addr: listen.to_owned(),
        });
    }
    tracing::info!(
        %addr,
        tls = tls.is_some(),
        data_dir = %data_dir.display(),
        revision = state.revision,
        leases = state.leases.len(),
        keys = state.keys.len(),
        witness_id,
        "witness serving"
    );
    let failure = Arc::new(Mutex::new(None));
    let data = Arc::new(Mutex::new(Some(data)));
    let persist = persister(Arc::clone(&data), Arc::clone(&failure));
    let shared = Arc::new(Shared {
        store: MemStore::restore(state, Arc::new(RealClock::new()), Some(persist)),
        stop,
        witness_id,
        failure,
        data,
        waiting: AtomicUsize::new(0),
        tls: tls.is_some(),
        policy,
    });
    let options = Options {
        name: "witness".into(),
        limits,
        stack_size: Some(CONN_STACK),
        drain: DRAIN,
        secure: tls.map(|t| Arc::new(Https(t)) as Arc<dyn Secure>),
    };
    let handler: Arc<dyn Handler> = Arc::<Shared>::clone(&shared);
    let accept = tandem_http::spawn(listener, options, Arc::clone(&shared.stop), handler).map_err(
        |source| WitnessError::Io {
            path: data_dir.to_owned(),
            source,
        },
    )?;
    Ok(WitnessHandle {
        addr,
        shared,
        accept: Some(accept),
    })
}

impl WitnessHandle {
    /// The address the witness listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The identity of the data directory served (`Tandem-Witness`).
    pub fn witness_id(&self) -> &str {
        &self.shared.witness_id
    }

    /// Why the witness stopped answering, if it did: its state could not
    /// be written. It must then be restarted; it serves what is on disk.
    pub fn failure(&self) -> Option<PersistError> {
        self.shared.failure()
    }

    /// How many `/v1/wait` long polls the witness holds right now. For
    /// observability: a test waits until a poll is parked before making
    /// the change that must wake it, instead of sleeping.
    pub fn waiting(&self) -> usize {
        self.shared.waiting.load(Ordering::Acquire)
    }

    /// Whether the witness is still serving (not stopped, not failed).
    pub fn is_serving(&self) -> bool {
        !self.shared.stop.load(Ordering::Acquire) && self.failure().is_none()
    }

    /// Stops serving, waits (a bounded time) for connections to end, and
    /// releases the data directory.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(accept) = self.accept.take() {
            if accept.join().is_err() {
                tracing::error!("witness accept thread panicked");
            }
        }
        release(&self.shared);
    }
}

impl Drop for WitnessHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Ends this witness's hold on its data directory: no write can happen
/// after this returns, and every later request is answered 503.
fn release(shared: &Shared) {
    let mut failure = shared.failure.lock();
    if failure.is_none() {
        *failure = Some(PersistError::Stopping);
    }
    drop(failure);
    if shared.data.lock().take().is_some() {
        tracing::info!("witness stopped; data directory released");
    }
}

/// The store's persist callback: writes the state file, or marks the
/// witness failed (memory is then ahead of the disk, so nothing more may
/// be answered until a restart reads the disk again).
fn persister(
    data: Arc<Mutex<Option<DataDir>>>,
    failure: Arc<Mutex<Option<PersistError>>>,
) -> Persist {
    Box::new(move |state: &State| {
        let data = data.lock();
        let Some(dir) = data.as_ref() else {
            return Err(PersistError::Stopping);
        };
        if let Some(failed) = failure.lock().clone() {
            return Err(failed);
        }
        dir.save(state).map_err(|e| {
            let failed = PersistError::Write {
                path: dir.state_path(),
                source: Arc::new(e),
            };
            tracing::error!("{failed}");
            *failure.lock() = Some(failed.clone());
            failed
        })
    })
}

/// A witness started before sites had identities kept no epoch holders:
/// the site named in each group's owner record holds its epoch.
fn remember_epoch_holders(state: &mut State) {
    let owners: Vec<(String, String)> = state
        .keys
        .iter()
        .filter_map(|(key, k)| {
            let policy::KeyKind::Owner { group } = policy::parse_key(key)? else {
                return None;
            };
            let owner: OwnerRecord = serde_json::from_slice(&k.value).ok()?;
            Some((format!("{group}epoch"), owner.site))
        })
        .collect();
    for (epoch_key, site) in owners {
        state.epoch_holders.entry(epoch_key).or_insert(site);
    }
}

/// The witness's TLS for the HTTP server.
#[derive(Debug)]
struct Https(WitnessTls);

/// An accepted HTTPS connection.
struct TlsConn(ServerStream);

impl std::io::Read for TlsConn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl std::io::Write for TlsConn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl Transport for TlsConn {
    fn tcp(&self) -> &std::net::TcpStream {
        &self.0.sock
    }
}

impl Secure for Https {
    fn accept(
        &self,
        tcp: std::net::TcpStream,
        deadline: Instant,
    ) -> Result<(Box<dyn Transport>, String), String> {
        let (stream, site) = self.0.accept(tcp, deadline).map_err(|e| e.to_string())?;
        Ok((Box::new(TlsConn(stream)), site))
    }
}

impl Handler for Shared {
    fn handle(&self, request: Request, peer: SocketAddr) -> Response {
        let site = match self.site(&request) {
            Ok(site) => site,
            Err(answer) => {
                tracing::warn!(%peer, path = %request.path, "witness: refused: {}", answer.body);
                return self.response(answer);
            }
        };
        let answer = route(self, &request, &site);
        if matches!(answer.status, 403 | 409 | 413) {
            tracing::warn!(%site, %peer, path = %request.path, status = answer.status, "witness: refused: {}", answer.body);
        } else if answer.status >= 400 {
            tracing::debug!(%site, %peer, path = %request.path, status = answer.status, body = %answer.body, "witness: refused");
        }
        let response = self.response(answer);
        if self.tls || site.is_empty() {
            response
        } else {
            // Plain HTTP (loopback): a request naming its site keeps its
            // connection slot.
            response.authenticated_as(&site)
        }
    }

    fn refused(&self, refusal: &Refusal) -> Response {
        let code = match refusal.problem {
            Problem::BadRequest => ErrorCode::BadRequest,
            Problem::Timeout => ErrorCode::Timeout,
            Problem::TooLarge => ErrorCode::TooLarge,
            Problem::HeadTooLarge => ErrorCode::HeadTooLarge,
            Problem::Unavailable => ErrorCode::Unavailable,
        };
        self.response(error(code, &refusal.message))
    }
}

impl Shared {
    /// The site a request acts for: its certificate's name, or with TLS
    /// off its [`SITE_HEADER`]. Health needs none.
    fn site(&self, request: &Request) -> Result<String, Answer> {
        if let Some(site) = &request.identity {
            return Ok(site.clone());
        }
        if self.tls {
            return Err(error(ErrorCode::NoIdentity, "no client certificate"));
        }
        match request.header(SITE_HEADER) {
            Some(site) if tandem_tls::certs::check_site_name(site).is_ok() => Ok(site.to_owned()),
            Some(site) => Err(error(
                ErrorCode::NoIdentity,
                format!("{SITE_HEADER}: {} is not a site name", shorten(site)),
            )),
            None if request.path == wire::HEALTH => Ok(String::new()),
            None => Err(error(
                ErrorCode::NoIdentity,
                format!("a request names its site in the {SITE_HEADER} header"),
            )),
        }
    }

    /// Every answer is JSON and names the witness.
    fn response(&self, answer: Answer) -> Response {
        Response::json(answer.status, answer.body)
            .with_header(wire::WITNESS_HEADER, &self.witness_id)
    }
}

/// An answer: a status and a JSON body.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: String,
}

/// Answers one request.
fn route(shared: &Shared, request: &Request, site: &str) -> Answer {
    let post = request.method == "POST";
    let answer = match request.path.as_str() {
        wire::GRANT if post => call(shared, request, site, grant),
        wire::KEEPALIVE if post => call(shared, request, site, keep_alive),
        wire::REVOKE if post => call(shared, request, site, revoke),
        wire::RANGE if post => call(shared, request, site, range),
        wire::TXN if post => call(shared, request, site, txn),
        wire::WAIT if post => call(shared, request, site, wait),
        wire::HEALTH if request.method == "GET" => call_health(shared),
        wire::GRANT | wire::KEEPALIVE | wire::REVOKE | wire::RANGE | wire::TXN | wire::WAIT => {
            error(
                ErrorCode::MethodNotAllowed,
                format!("{} takes POST", request.path),
            )
        }
        wire::HEALTH => error(ErrorCode::MethodNotAllowed, "/v1/health takes GET"),
        other => error(
            ErrorCode::NotFound,
            format!("no such endpoint: {}", shorten(other)),
        ),
    };
    // A persist that failed while this request ran means memory may hold
    // a change the disk does not: nothing read from it may be answered.
    match (answer.status, shared.failure()) {
        (200, Some(reason)) => error(ErrorCode::Unavailable, reason.to_string()),
        _ => answer,
    }
}

type Endpoint<Q, A> = fn(&Shared, &str, Q) -> Result<A, Answer>;

/// Parses the body as `Q`, runs `handler` for `site`, and renders its
/// answer.
fn call<Q: DeserializeOwned, A: Serialize>(
    shared: &Shared,
    request: &Request,
    site: &str,
    handler: Endpoint<Q, A>,
) -> Answer {
    if let Some(reason) = shared.failure() {
        return error(ErrorCode::Unavailable, reason.to_string());
    }
    let query: Q = match serde_json::from_slice(&request.body) {
        Ok(q) => q,
        Err(e) => {
            return error(
                ErrorCode::BadRequest,
                format!("bad JSON body for {}: {e}", request.path),
            )
        }
    };
    match handler(shared, site, query) {
        Ok(reply) => ok(&reply),
        Err(answer) => answer,
    }
}

fn call_health(shared: &Shared) -> Answer {
    if let Some(reason) = shared.failure() {
        return error(ErrorCode::Unavailable, reason.to_string());
    }
    match shared.store.range("") {
        Ok(snapshot) => ok(&wire::HealthReply {
            witness_id: shared.witness_id.clone(),
            revision: snapshot.revision,
            keys: snapshot.kvs.len(),
        }),
        Err(e) => store_error(e),
    }
}

fn grant(shared: &Shared, site: &str, q: wire::GrantRequest) -> Result<wire::GrantReply, Answer> {
    if q.ttl_ms == 0 || q.ttl_ms > MAX_TTL_MS {
        return Err(error(
            ErrorCode::BadRequest,
            format!("ttl_ms must be 1..={MAX_TTL_MS}, not {}", q.ttl_ms),
        ));
    }
    let id = shared
        .store
        .grant_to(Duration::from_millis(q.ttl_ms), site, |s| {
            policy::check(site, s, &Action::Grant, &shared.policy).map(|_| ())
        })
        .map_err(store_error)?
        .map_err(refused)?;
    Ok(wire::GrantReply {
        id,
        ttl_ms: q.ttl_ms,
    })
}

fn keep_alive(
    shared: &Shared,
    site: &str,
    q: wire::LeaseRequest,
) -> Result<wire::KeepAliveReply, Answer> {
    let ttl = shared
        .store
        .keep_alive_checked(q.id, |s| {
            policy::check(site, s, &Action::KeepAlive(q.id), &shared.policy).map(|_| ())
        })
        .map_err(store_error)?
        .map_err(refused)?;
    Ok(wire::KeepAliveReply {
        ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
    })
}

fn revoke(shared: &Shared, site: &str, q: wire::LeaseRequest) -> Result<wire::Empty, Answer> {
    shared
        .store
        .revoke_checked(q.id, |s| {
            policy::check(site, s, &Action::Revoke(q.id), &shared.policy).map(|_| ())
        })
        .map_err(store_error)?
        .map_err(refused)?;
    Ok(wire::Empty {})
}

fn range(shared: &Shared, _site: &str, q: wire::RangeRequest) -> Result<wire::RangeReply, Answer> {
    let snapshot = shared.store.range(&q.prefix).map_err(store_error)?;
    Ok(snapshot.into())
}

fn txn(shared: &Shared, site: &str, q: wire::TxnRequest) -> Result<wire::TxnReply, Answer> {
    let compares: Vec<Compare> = q.compares.into_iter().map(Compare::from).collect();
    let ops: Vec<Op> = q.ops.into_iter().map(Op::from).collect();
    let action = Action::Txn {
        compares: &compares,
        ops: &ops,
    };
    let (succeeded, revision) = shared
        .store
        .txn_checked(&compares, &ops, site, |s| {
            policy::check(site, s, &action, &shared.policy)
        })
        .map_err(store_error)?
        .map_err(refused)?;
    Ok(wire::TxnReply {
        succeeded,
        revision,
    })
}

/// Holds the request until the store's revision passes `after_revision`,
/// the (capped) timeout runs out, or the witness stops.
fn wait(shared: &Shared, _site: &str, q: wire::WaitRequest) -> Result<wire::WaitReply, Answer> {
    shared.waiting.fetch_add(1, Ordering::AcqRel);
    let _held = Held(&shared.waiting);
    let until = Instant::now() + Duration::from_millis(q.timeout_ms).min(MAX_WAIT);
    loop {
        let revision = shared.store.range(&q.prefix).map_err(store_error)?.revision;
        let now = Instant::now();
        if revision > q.after_revision || now >= until || shared.stop.load(Ordering::Acquire) {
            return Ok(wire::WaitReply { revision });
        }
        let slice = (until - now).min(WAIT_SLICE);
        shared
            .store
            .wait(&q.prefix, q.after_revision, slice)
            .map_err(store_error)?;
    }
}

/// A held `/v1/wait`, uncounted however it ends.
struct Held<'a>(&'a AtomicUsize);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The policy's refusal as an answer (403, 409 or 413 with its code).
fn refused(r: policy::Refusal) -> Answer {
    use policy::Refusal as R;
    let code = match &r {
        R::NotYourLease { .. } => ErrorCode::NotYourLease,
        R::UnknownKey { .. } => ErrorCode::UnknownKey,
        R::NotYourKey { .. } => ErrorCode::NotYourKey,
        R::BadValue { .. } => ErrorCode::BadValue,
        R::OwnerNotCaller { .. } => ErrorCode::OwnerNotCaller,
        R::NotOwner { .. } => ErrorCode::NotOwner,
        R::EpochNotNext { .. } => ErrorCode::EpochNotNext,
        R::EpochExhausted { .. } => ErrorCode::EpochExhausted,
        R::EpochKey { .. } => ErrorCode::EpochKey,
        R::Duplicate { .. } => ErrorCode::DuplicateKey,
        R::TooLarge { .. } => ErrorCode::ValueTooLarge,
        R::SiteQuota { .. } => ErrorCode::SiteQuota,
        R::StoreFull { .. } => ErrorCode::StoreFull,
    };
    error(code, r.to_string())
}

fn store_error(e: StoreError) -> Answer {
    match e {
        StoreError::LeaseNotFound(_) => error(ErrorCode::LeaseNotFound, e.to_string()),
        StoreError::Refused(reason) => error(ErrorCode::Refused, reason),
        StoreError::Unreachable(reason) | StoreError::Protocol(reason) => {
            error(ErrorCode::Unavailable, reason)
        }
    }
}

fn ok<T: Serialize>(reply: &T) -> Answer {
    match serde_json::to_string(reply) {
        Ok(body) => Answer { status: 200, body },
        Err(e) => error(ErrorCode::Unavailable, format!("cannot encode answer: {e}")),
    }
}

fn error(code: ErrorCode, message: impl Into<String>) -> Answer {
    let reply = ErrorReply {
        code,
        error: message.into(),
    };
    Answer {
        status: code.status(),
        body: serde_json::to_string(&reply)
            .unwrap_or_else(|_| r#"{"code":"other","error":"unencodable error"}"#.into()),
    }
}
