//! One client connection's socket, driven by the connection's own thread.
//!
//! The thread does all the socket's I/O, reads and writes alike, without
//! ever blocking in a `read` or `write`: it waits in `poll(2)` on the
//! socket and on its [`Mailbox`], an eventfd through which pool workers
//! hand over finished replies (and the agent-wide budget says bytes came
//! back). Workers therefore never wait for a slow client, and a client
//! that stops reading its replies only stops its own thread: once its
//! unsent replies pass the connection's budget, the thread stops reading
//! new requests and only offers the replies to the socket.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags, Timespec};
use rustix::net::{RecvFlags, SendFlags};

use crate::budget::{Budget, Wake};

/// A reply (or a batch of them) ready for the socket, holding the budget
/// charged for the requests it answers until it is dropped.
pub(crate) struct Outgoing {
    pub bytes: Vec<u8>,
    pub charge: Charge,
    /// Requests this answers.
    pub requests: usize,
}

/// Bytes taken from the agent-wide budget, given back when dropped.
pub(crate) struct Charge {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Charge {
    /// Takes nothing yet.
    pub fn none(budget: &Arc<Budget>) -> Charge {
        Charge {
            budget: Arc::clone(budget),
            bytes: 0,
        }
    }

    /// Records `bytes` already acquired from the budget.
    pub fn add(&mut self, bytes: usize) {
        self.bytes += bytes;
    }

    /// Gives back `bytes` of it now.
    pub fn give_back(&mut self, bytes: usize) {
        let bytes = bytes.min(self.bytes);
        self.bytes -= bytes;
        self.budget.release(bytes);
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Moves all of `other` into this charge.
    pub fn absorb(&mut self, mut other: Charge) {
        self.bytes += other.bytes;
        other.bytes = 0;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.release(self.bytes);
        }
    }
}

/// Where workers leave finished replies for the connection's thread.
pub(crate) struct Mailbox {
    finished: Mutex<(Vec<Outgoing>, bool)>,
    event: OwnedFd,
}

impl Mailbox {
    pub fn new() -> io::Result<Arc<Mailbox>> {
        let event = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        Ok(Arc::new(Mailbox {
            finished: Mutex::new((Vec::new(), false)),
            event,
        }))
    }

    pub fn post(&self, reply: Outgoing) {
        let mut finished = self.finished.lock();
        finished.0.push(reply);
        Mailbox::signal(&self.event, &mut finished.1);
    }

    /// Makes the eventfd readable, once until the next collect.
    fn signal(event: &OwnedFd, signalled: &mut bool) {
        if !*signalled {
            *signalled = true;
            // Fails only if the counter would overflow: it is set anyway.
            let _ = rustix::io::write(event, &1u64.to_ne_bytes());
        }
    }

    /// Moves posted replies to `into` and clears the signal (the
    /// eventfd is read only when it was signalled: no system call on the
    /// fast path).
    fn collect(&self, into: &mut VecDeque<Outgoing>) {
        let mut finished = self.finished.lock();
        if finished.1 {
            let mut counter = [0u8; 8];
            let _ = rustix::io::read(&self.event, &mut counter);
            finished.1 = false;
        }
        into.extend(finished.0.drain(..));
    }
}

impl Wake for Mailbox {
    fn wake(&self) {
        let mut finished = self.finished.lock();
        Mailbox::signal(&self.event, &mut finished.1);
    }
}

/// The byte stream under the protocol: a socket, or TLS over one.
pub(crate) enum Transport {
    Plain(OwnedFd),
    Tls(Box<crate::tls::TlsStream>),
}

impl Transport {
    pub fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Transport::Plain(fd) => fd.as_fd(),
            Transport::Tls(tls) => tls.fd(),
        }
    }

    /// Reads what is available; `WouldBlock` when nothing is.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(fd) => Ok(rustix::net::recv(fd, buf, RecvFlags::DONTWAIT)?.0),
            Transport::Tls(tls) => tls.read(buf),
        }
    }

    /// Reads what is available into `out`'s spare capacity (not zeroed
    /// first); `WouldBlock` when nothing is.
    fn read_spare(&mut self, out: &mut Vec<u8>) -> io::Result<usize> {
        match self {
            Transport::Plain(fd) => Ok(rustix::net::recv(
                fd,
                rustix::buffer::spare_capacity(out),
                RecvFlags::DONTWAIT,
            )?
            .0),
            Transport::Tls(tls) => {
                let at = out.len();
                out.resize(out.capacity(), 0);
                let read = tls.read(&mut out[at..]);
                out.truncate(at + read.as_ref().map_or(0, |n| *n));
                read
            }
        }
    }

    /// Writes what the socket takes now; `WouldBlock` when nothing.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(fd) => Ok(rustix::net::send(
                fd,
                buf,
                SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
            )?),
            Transport::Tls(tls) => tls.write(buf),
        }
    }

    /// Bytes accepted by [`Transport::write`] but not yet on the socket.
    fn pending(&self) -> bool {
        match self {
            Transport::Plain(_) => false,
            Transport::Tls(tls) => tls.pending(),
        }
    }

    /// Pushes pending bytes out as far as the socket takes them.
    fn push(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(_) => Ok(()),
            Transport::Tls(tls) => tls.push(),
        }
    }
}

/// Why waiting on the socket ended the connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WaitError {
    #[error("client did not read its replies for {0:?}")]
    RepliesStalled(Duration),
    #[error("timed out")]
    Deadline,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The connection's socket and the replies waiting for it.
pub(crate) struct Conn {
    pub transport: Transport,
    pub mailbox: Arc<Mailbox>,
    out: VecDeque<Outgoing>,
    /// Bytes of the front reply already written.
    written: usize,
    /// Requests answered in `out`, and the bytes charged for them, plus
    /// requests still with the workers (counted by the caller).
    pub requests: usize,
    pub charged: usize,
    /// Since when replies are waiting and the socket takes nothing.
    stalled: Option<Instant>,
    reply_timeout: Duration,
    /// The socket failed or the client stopped reading: replies are
    /// dropped from now on.
    pub broken: bool,
}

impl Conn {
    pub fn new(transport: Transport, mailbox: Arc<Mailbox>, reply_timeout: Duration) -> Conn {
        Conn {
            transport,
            mailbox,
            out: VecDeque::new(),
            written: 0,
            requests: 0,
            charged: 0,
            stalled: None,
            reply_timeout,
            broken: false,
        }
    }

    /// Queues replies for the socket (they go out at the next wait or
    /// [`Conn::send`]).
    pub fn queue(&mut self, reply: Outgoing) {
        if self.broken {
            self.finish(&reply);
        } else {
            self.out.push_back(reply);
        }
    }

    fn finish(&mut self, reply: &Outgoing) {
        self.requests -= reply.requests;
        self.charged -= reply.charge.bytes();
    }

    /// Writes queued replies until the socket takes no more.
    pub fn send(&mut self) -> Result<(), WaitError> {
        self.mailbox.collect(&mut self.out);
        if self.broken {
            while let Some(reply) = self.out.pop_front() {
                self.finish(&reply);
            }
            return Ok(());
        }
        let mut progress = false;
        loop {
            if self.transport.pending() {
                match self.transport.push() {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(self.fail(e)),
                }
                if self.transport.pending() {
                    break;
                }
            }
            let Some(front) = self.out.front() else {
                break;
            };
            if self.written == front.bytes.len() {
                let reply = self.out.pop_front().expect("front exists");
                self.written = 0;
                self.finish(&reply);
                progress = true;
                continue;
            }
            match self.transport.write(&front.bytes[self.written..]) {
                Ok(n) => {
                    self.written += n;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.fail(e)),
            }
        }
        let waiting = !self.out.is_empty() || self.transport.pending();
        if progress || !waiting {
            self.stalled = None;
        } else if self.stalled.is_none() {
            self.stalled = Some(Instant::now());
        }
        Ok(())
    }

    fn fail(&mut self, e: io::Error) -> WaitError {
        self.broken = true;
        while let Some(reply) = self.out.pop_front() {
            self.finish(&reply);
        }
        self.written = 0;
        WaitError::Io(e)
    }

    /// Sends what it can, then waits until the socket is readable (if
    /// `read`), writable (if replies wait), the mailbox is signalled, or
    /// `deadline` passes. Fails when replies have waited for the client
    /// longer than the reply timeout.
    pub fn wait(&mut self, read: bool, deadline: Option<Instant>) -> Result<(), WaitError> {
        self.send()?;
        self.poll(read, deadline)
    }

    /// [`Conn::wait`] without sending first: for a caller that has just
    /// sent (and so cleared the mailbox's signal) and then looked at
    /// something a signal would announce (the budget), so that a signal
    /// given since is not lost.
    pub fn poll(&mut self, read: bool, deadline: Option<Instant>) -> Result<(), WaitError> {
        let writing = !self.broken && (!self.out.is_empty() || self.transport.pending());
        let mut until = deadline;
        if let (true, Some(since)) = (writing, self.stalled) {
            let limit = since + self.reply_timeout;
            if Instant::now() >= limit {
                let stalled = WaitError::RepliesStalled(self.reply_timeout);
                self.broken = true;
                let _ = self.send();
                return Err(stalled);
            }
            until = Some(until.map_or(limit, |d| d.min(limit)));
        }
        if let Some(d) = deadline {
            if Instant::now() >= d {
                return Err(WaitError::Deadline);
            }
        }
        let mut flags = PollFlags::empty();
        if read {
            flags |= PollFlags::IN;
        }
        if writing {
            flags |= PollFlags::OUT;
        }
        let timeout = until.map(|u| {
            let left = u.saturating_duration_since(Instant::now());
            Timespec {
                tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: i64::from(left.subsec_nanos()),
            }
        });
        let fd = self.transport.fd();
        let mut fds = [
            PollFd::from_borrowed_fd(fd, flags),
            PollFd::new(&self.mailbox.event, PollFlags::IN),
        ];
        match poll(&mut fds, timeout.as_ref()) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(WaitError::Io(e.into())),
        }
        // Hung up or failed: reported even when not asked for, so a caller
        // not reading would wake again at once; the replies cannot be
        // delivered any more.
        if !read && fds[0].revents().intersects(PollFlags::HUP | PollFlags::ERR) {
            self.broken = true;
            while let Some(reply) = self.out.pop_front() {
                self.finish(&reply);
            }
            self.written = 0;
        }
        Ok(())
    }

    /// Reads some bytes, waiting (and sending replies) until there are
    /// some; `Ok(0)` at the end of the stream.
    pub fn read(&mut self, buf: &mut [u8], deadline: Option<Instant>) -> Result<usize, WaitError> {
        loop {
            match self.transport.read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait(true, deadline)?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(WaitError::Io(e)),
            }
        }
    }

    /// Fills `buf`; `UnexpectedEof` if the stream ends first.
    pub fn read_exact(
        &mut self,
        buf: &mut [u8],
        deadline: Option<Instant>,
    ) -> Result<(), WaitError> {
        let mut at = 0;
        while at < buf.len() {
            match self.read(&mut buf[at..], deadline)? {
                0 => return Err(WaitError::Io(io::ErrorKind::UnexpectedEof.into())),
                n => at += n,
            }
        }
        Ok(())
    }

    /// Fills `out` up to its capacity, reading into memory nobody zeroed
    /// first (a write's payload: a fresh buffer would otherwise be
    /// written twice); `UnexpectedEof` if the stream ends first.
    pub fn read_to_capacity(
        &mut self,
        out: &mut Vec<u8>,
        deadline: Option<Instant>,
    ) -> Result<(), WaitError> {
        while out.len() < out.capacity() {
            match self.transport.read_spare(out) {
                Ok(0) => return Err(WaitError::Io(io::ErrorKind::UnexpectedEof.into())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait(true, deadline)?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(WaitError::Io(e)),
            }
        }
        Ok(())
    }

    /// Writes `bytes` completely before `deadline` (handshake replies,
    /// which are small and not charged).
    pub fn write_all(&mut self, bytes: &[u8], deadline: Option<Instant>) -> Result<(), WaitError> {
        let mut at = 0;
        loop {
            if self.transport.pending() {
                match self.transport.push() {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(WaitError::Io(e)),
                }
            }
            if at == bytes.len() && !self.transport.pending() {
                return Ok(());
            }
            if at < bytes.len() {
                match self.transport.write(&bytes[at..]) {
                    Ok(n) => {
                        at += n;
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(WaitError::Io(e)),
                }
            }
            if let Some(d) = deadline {
                if Instant::now() >= d {
                    return Err(WaitError::Deadline);
                }
            }
            let timeout = deadline.map(|d| {
                let left = d.saturating_duration_since(Instant::now());
                Timespec {
                    tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
                    tv_nsec: i64::from(left.subsec_nanos()),
                }
            });
            let mut fds = [PollFd::from_borrowed_fd(
                self.transport.fd(),
                PollFlags::OUT,
            )];
            match poll(&mut fds, timeout.as_ref()) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(WaitError::Io(e.into())),
            }
        }
    }
}
