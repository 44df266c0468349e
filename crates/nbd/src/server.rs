//! The NBD server of an agent: one accept thread for all listening sockets,
//! one worker pool, one memory budget; a thread per client connection.
//!
//! Threads: the accept thread waits in `poll(2)` on every listening socket
//! (Unix sockets of the volumes, the TCP listener) and on an eventfd that
//! says the set changed. Each accepted client gets its own thread, which
//! runs the handshake and the transmission phase (see `session`): it
//! decodes requests and runs what cannot block for long inline (writes and
//! trims, applied in arrival order; reads that hit the page cache); the
//! rest (reads from disk, flushes, FUA, waits for replicas) goes to the
//! agent's [`Pool`], whose workers hand finished replies back to the
//! connection's thread, the only one that writes its socket.
//!
//! Listeners and connections belong to a [`Scope`] (a group's volumes, or
//! the TCP listener), which can be shut down on its own when the group
//! stops or is demoted.

use std::collections::HashMap;
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags};
use tracing::{debug, warn};

use crate::budget::{Budget, AGENT_BUDGET};
use crate::conn::Mailbox;
use crate::export::Catalog;
use crate::pool::Pool;
use crate::stats::Stats;

/// Connections served at once by the whole agent; more are refused with a
/// log line.
pub const MAX_CONNECTIONS: usize = 4096;
/// Connections accepted from one listener before the others get a turn.
const ACCEPT_BATCH: usize = 16;
/// Pause after an accept error such as EMFILE, so the accept thread does
/// not spin on a listener that stays readable.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// How a listener's clients must talk.
#[derive(Clone, Default)]
pub struct ListenOptions {
    /// TLS required (NBD_OPT_STARTTLS) with this server configuration,
    /// which decides which client certificates are accepted.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

enum Listening {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listening {
    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Listening::Unix(l) => l.as_fd(),
            Listening::Tcp(l) => l.as_fd(),
        }
    }

    /// Accepts one client: its socket and a name for logs.
    fn accept(&self, label: &str, n: u64) -> io::Result<(OwnedFd, String)> {
        match self {
            Listening::Unix(l) => {
                let (stream, _) = l.accept()?;
                Ok((stream.into(), format!("{label}#{n}")))
            }
            Listening::Tcp(l) => {
                let (stream, peer) = l.accept()?;
                let _ = stream.set_nodelay(true);
                Ok((stream.into(), peer.to_string()))
            }
        }
    }
}

/// One listening socket, registered with the accept thread.
struct Entry {
    socket: Listening,
    label: String,
    scope: Weak<Scope>,
    catalog: Arc<dyn Catalog>,
    options: ListenOptions,
    closed: AtomicBool,
    accepted: AtomicU64,
}

/// The accept thread's set of listeners.
struct Acceptor {
    entries: Mutex<Vec<Arc<Entry>>>,
    /// Says the set changed (or the server stops).
    event: OwnedFd,
    stopping: AtomicBool,
    thread: Mutex<Option<thread::JoinHandle<()>>>,
}

impl Acceptor {
    fn signal(&self) {
        let _ = rustix::io::write(&self.event, &1u64.to_ne_bytes());
    }

    fn run(&self) {
        let mut backoff = false;
        while !self.stopping.load(Ordering::Acquire) {
            if backoff {
                thread::sleep(ACCEPT_BACKOFF);
                backoff = false;
            }
            let entries: Vec<Arc<Entry>> = self.entries.lock().clone();
            let mut fds = Vec::with_capacity(entries.len() + 1);
            fds.push(PollFd::new(&self.event, PollFlags::IN));
            for e in &entries {
                fds.push(PollFd::from_borrowed_fd(e.socket.fd(), PollFlags::IN));
            }
            match poll(&mut fds, None) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    warn!("NBD accept poll failed: {e}");
                    backoff = true;
                    continue;
                }
            }
            let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
            drop(fds);
            if ready[0] {
                let mut counter = [0u8; 8];
                let _ = rustix::io::read(&self.event, &mut counter);
            }
            for (entry, _) in entries.iter().zip(&ready[1..]).filter(|(_, r)| **r) {
                backoff |= accept_some(entry);
            }
        }
    }
}

/// Accepts up to [`ACCEPT_BATCH`] clients of one listener. True after an
/// error worth a pause.
fn accept_some(entry: &Entry) -> bool {
    for _ in 0..ACCEPT_BATCH {
        if entry.closed.load(Ordering::Acquire) {
            return false;
        }
        let n = entry.accepted.fetch_add(1, Ordering::Relaxed) + 1;
        match entry.socket.accept(&entry.label, n) {
            Ok((socket, peer)) => {
                let Some(scope) = entry.scope.upgrade() else {
                    return false;
                };
                scope.connect(
                    socket,
                    peer,
                    Arc::clone(&entry.catalog),
                    entry.options.clone(),
                );
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                if entry.closed.load(Ordering::Acquire) {
                    return false;
                }
                warn!(listener = %entry.label, "NBD accept failed: {e}");
                return true;
            }
        }
    }
    false
}

/// What every connection of the agent shares.
pub struct Server {
    pub(crate) pool: Arc<Pool>,
    pub(crate) budget: Arc<Budget>,
    acceptor: Arc<Acceptor>,
    connections: AtomicUsize,
    next_id: AtomicU64,
    /// A client that reads none of its waiting replies for this long is
    /// disconnected.
    pub(crate) reply_timeout: Duration,
    pub stats: Arc<Stats>,
}

impl Server {
    /// Starts the accept thread and the worker pool.
    pub fn new() -> io::Result<Arc<Server>> {
        Server::with_limits(AGENT_BUDGET, crate::session::REPLY_TIMEOUT)
    }

    /// With an agent-wide budget of `budget` bytes (see [`crate::budget`])
    /// and clients dropped after `reply_timeout` without reading replies.
    pub fn with_limits(budget: usize, reply_timeout: Duration) -> io::Result<Arc<Server>> {
        let acceptor = Arc::new(Acceptor {
            entries: Mutex::new(Vec::new()),
            event: eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?,
            stopping: AtomicBool::new(false),
            thread: Mutex::new(None),
        });
        let running = Arc::clone(&acceptor);
        let handle = thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || running.run())?;
        *acceptor.thread.lock() = Some(handle);
        Ok(Arc::new(Server {
            pool: Pool::new(),
            budget: Budget::new(budget),
            acceptor,
            connections: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            reply_timeout,
            stats: Arc::new(Stats::default()),
        }))
    }

    /// A new set of listeners and connections that stops together.
    pub fn scope(self: &Arc<Self>) -> Arc<Scope> {
        Arc::new(Scope {
            server: Arc::clone(self),
            stopping: AtomicBool::new(false),
            connections: Mutex::new(HashMap::new()),
            idle: Condvar::new(),
            listeners: Mutex::new(Vec::new()),
        })
    }

    /// Bytes of requests and replies held now, agent-wide.
    pub fn memory_in_use(&self) -> usize {
        self.budget.used()
    }

    /// Worker threads running now.
    pub fn workers(&self) -> usize {
        self.pool.workers()
    }

    /// Ends the accept thread and lets the pool's workers end. Scopes
    /// should be shut down first.
    pub fn stop(&self) {
        self.acceptor.stopping.store(true, Ordering::Release);
        self.acceptor.signal();
        if let Some(handle) = self.acceptor.thread.lock().take() {
            let _ = handle.join();
        }
        self.pool.stop();
    }

    fn register(&self, entry: Arc<Entry>) {
        self.acceptor.entries.lock().push(entry);
        self.acceptor.signal();
    }

    fn unregister(&self, entry: &Arc<Entry>) {
        entry.closed.store(true, Ordering::Release);
        self.acceptor
            .entries
            .lock()
            .retain(|e| !Arc::ptr_eq(e, entry));
        self.acceptor.signal();
        // As with `AcceptWaker`: the socket refuses queued and new clients
        // from now on, whoever still holds a descriptor of it.
        let _ = rustix::net::shutdown(entry.socket.fd(), rustix::net::Shutdown::Both);
    }
}

impl Drop for Scope {
    /// A scope dropped without [`Scope::shutdown`] (a role that failed to
    /// start) still closes its listeners.
    fn drop(&mut self) {
        self.close_listeners();
    }
}

/// A connection as its scope sees it: a way to end its reading.
struct Handle {
    socket: OwnedFd,
    mailbox: Arc<Mailbox>,
}

/// Listeners and connections that stop together (a group's volumes).
pub struct Scope {
    pub(crate) server: Arc<Server>,
    stopping: AtomicBool,
    connections: Mutex<HashMap<u64, Handle>>,
    idle: Condvar,
    listeners: Mutex<Vec<Arc<Entry>>>,
}

impl Scope {
    /// Serves `catalog` on a Unix socket listener until [`Scope::shutdown`].
    pub fn serve_unix(
        self: &Arc<Self>,
        listener: UnixListener,
        catalog: Arc<dyn Catalog>,
    ) -> io::Result<()> {
        let label = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
            .unwrap_or_else(|| "unix".into());
        listener.set_nonblocking(true)?;
        self.listen(
            Listening::Unix(listener),
            label,
            catalog,
            ListenOptions::default(),
        );
        Ok(())
    }

    /// Serves `catalog` on a TCP listener until [`Scope::shutdown`].
    pub fn serve_tcp(
        self: &Arc<Self>,
        listener: TcpListener,
        catalog: Arc<dyn Catalog>,
        options: ListenOptions,
    ) -> io::Result<()> {
        let label = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "tcp".into());
        listener.set_nonblocking(true)?;
        self.listen(Listening::Tcp(listener), label, catalog, options);
        Ok(())
    }

    fn listen(
        self: &Arc<Self>,
        socket: Listening,
        label: String,
        catalog: Arc<dyn Catalog>,
        options: ListenOptions,
    ) {
        let entry = Arc::new(Entry {
            socket,
            label,
            scope: Arc::downgrade(self),
            catalog,
            options,
            closed: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
        });
        self.listeners.lock().push(Arc::clone(&entry));
        self.server.register(entry);
        if self.is_stopping() {
            self.close_listeners();
        }
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Starts serving an accepted client on a thread of its own.
    fn connect(
        self: &Arc<Self>,
        socket: OwnedFd,
        peer: String,
        catalog: Arc<dyn Catalog>,
        options: ListenOptions,
    ) {
        let server = &self.server;
        if server.connections.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            server.connections.fetch_sub(1, Ordering::AcqRel);
            warn!(peer = %peer, "refusing NBD connection: {MAX_CONNECTIONS} connections already open");
            return;
        }
        let id = server.next_id.fetch_add(1, Ordering::Relaxed);
        let registered = (|| -> io::Result<Arc<Mailbox>> {
            let mailbox = Mailbox::new()?;
            let handle = Handle {
                socket: socket.try_clone()?,
                mailbox: Arc::clone(&mailbox),
            };
            let mut conns = self.connections.lock();
            if self.is_stopping() {
                return Err(io::Error::other("scope stopping"));
            }
            conns.insert(id, handle);
            Ok(mailbox)
        })();
        let mailbox = match registered {
            Ok(mailbox) => mailbox,
            Err(e) => {
                debug!(peer = %peer, "not serving NBD connection: {e}");
                server.connections.fetch_sub(1, Ordering::AcqRel);
                return;
            }
        };
        let scope = Arc::clone(self);
        let spawned = thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                scope
                    .server
                    .stats
                    .connections
                    .fetch_add(1, Ordering::Relaxed);
                crate::session::serve(
                    &scope,
                    id,
                    socket,
                    mailbox,
                    &peer,
                    catalog.as_ref(),
                    &options,
                );
                scope
                    .server
                    .stats
                    .connections
                    .fetch_sub(1, Ordering::Relaxed);
                scope.forget(id);
            });
        if let Err(e) = spawned {
            warn!("cannot start a thread for an NBD connection: {e}");
            self.forget(id);
        }
    }

    fn forget(&self, id: u64) {
        self.server.connections.fetch_sub(1, Ordering::AcqRel);
        let mut conns = self.connections.lock();
        conns.remove(&id);
        if conns.is_empty() {
            self.idle.notify_all();
        }
    }

    fn close_listeners(&self) {
        for entry in self.listeners.lock().drain(..) {
            self.server.unregister(&entry);
        }
    }

    /// Stops accepting, lets every connection finish the requests it has
    /// received, and waits up to `grace` for them to close. Returns the
    /// number of connections still open after the wait.
    pub fn shutdown(&self, grace: Duration) -> usize {
        {
            let _conns = self.connections.lock();
            self.stopping.store(true, Ordering::Release);
        }
        self.close_listeners();
        let deadline = Instant::now() + grace;
        let mut conns = self.connections.lock();
        for handle in conns.values() {
            let _ = rustix::net::shutdown(&handle.socket, rustix::net::Shutdown::Read);
            crate::budget::Wake::wake(handle.mailbox.as_ref());
        }
        while !conns.is_empty() {
            if self.idle.wait_until(&mut conns, deadline).timed_out() {
                break;
            }
        }
        conns.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::Read;
    use std::net::TcpStream;
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc;

    use super::*;
    use crate::export::Export;

    struct NoExports;

    impl Catalog for NoExports {
        fn lookup(&self, _: &str) -> Option<Arc<dyn Export>> {
            None
        }
        fn list(&self) -> Vec<Arc<dyn Export>> {
            Vec::new()
        }
    }

    #[test]
    fn shutdown_closes_every_listener_of_the_scope_only() {
        let server = Server::new().unwrap();
        let scope = server.scope();
        let other = server.scope();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd.sock");
        scope
            .serve_unix(UnixListener::bind(&path).unwrap(), Arc::new(NoExports))
            .unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        scope
            .serve_tcp(tcp, Arc::new(NoExports), ListenOptions::default())
            .unwrap();
        let other_path = dir.path().join("other.sock");
        other
            .serve_unix(
                UnixListener::bind(&other_path).unwrap(),
                Arc::new(NoExports),
            )
            .unwrap();
        // Clients get their greeting; one stays connected, mid-handshake,
        // during the shutdown.
        let mut greeting = [0u8; 18];
        let mut client = UnixStream::connect(&path).unwrap();
        client.read_exact(&mut greeting).unwrap();
        TcpStream::connect(addr)
            .unwrap()
            .read_exact(&mut greeting)
            .unwrap();

        let (done, left) = mpsc::channel();
        let stopping = Arc::clone(&scope);
        thread::spawn(move || done.send(stopping.shutdown(Duration::from_secs(5))));
        let left = left
            .recv_timeout(Duration::from_secs(10))
            .expect("shutdown did not finish");
        assert_eq!(left, 0);
        assert!(TcpStream::connect(addr).is_err());
        assert!(UnixStream::connect(&path).is_err());
        // The other scope still serves.
        UnixStream::connect(&other_path)
            .unwrap()
            .read_exact(&mut greeting)
            .unwrap();
        assert_eq!(other.shutdown(Duration::from_secs(5)), 0);
        server.stop();
    }
}
