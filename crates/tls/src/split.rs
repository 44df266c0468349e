//! A peer stream split into a reading half and a writing half, for one
//! thread that reads acknowledgements while another streams records.
//!
//! Plain TCP splits with `try_clone`. For TLS, both halves share the
//! connection's state machine under a mutex; the reader never holds it while
//! blocked on the socket. Every byte of TLS output is produced and written
//! while holding the socket-writer lock (taken before the state lock), so
//! records reach the wire in the order rustls produced them.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use parking_lot::Mutex;
use rustls::Connection;

use crate::PeerStream;

struct Shared {
    conn: Mutex<Connection>,
    sock_w: Mutex<TcpStream>,
}

impl Shared {
    /// Writes out whatever TLS output is pending. Caller holds `sock_w`.
    fn flush_tls(&self, sock: &mut TcpStream) -> io::Result<()> {
        let mut out = Vec::new();
        {
            let mut conn = self.conn.lock();
            while conn.wants_write() {
                conn.write_tls(&mut out)?;
            }
        }
        if !out.is_empty() {
            sock.write_all(&out)?;
        }
        Ok(())
    }
}

/// The reading half.
pub struct PeerReader(ReaderInner);

enum ReaderInner {
    Plain(TcpStream),
    Tls {
        shared: Arc<Shared>,
        sock: TcpStream,
        /// TLS bytes read from the socket; `start..end` not yet fed to
        /// rustls (it takes more only as its plaintext is consumed).
        buf: Box<[u8]>,
        start: usize,
        end: usize,
    },
}

/// The writing half.
pub struct PeerWriter(WriterInner);

enum WriterInner {
    Plain(TcpStream),
    Tls(Arc<Shared>),
}

impl PeerStream {
    /// Splits the stream into halves usable from two threads.
    pub fn split(self) -> io::Result<(PeerReader, PeerWriter)> {
        let (conn, sock): (Connection, TcpStream) = match self {
            PeerStream::Plain(tcp) => {
                let r = tcp.try_clone()?;
                return Ok((
                    PeerReader(ReaderInner::Plain(r)),
                    PeerWriter(WriterInner::Plain(tcp)),
                ));
            }
            PeerStream::Server(s) => {
                let s = *s;
                (Connection::Server(s.conn), s.sock)
            }
            PeerStream::Client(s) => {
                let s = *s;
                (Connection::Client(s.conn), s.sock)
            }
        };
        let reader_sock = sock.try_clone()?;
        let shared = Arc::new(Shared {
            conn: Mutex::new(conn),
            sock_w: Mutex::new(sock),
        });
        Ok((
            PeerReader(ReaderInner::Tls {
                shared: Arc::clone(&shared),
                sock: reader_sock,
                buf: vec![0u8; 64 << 10].into_boxed_slice(),
                start: 0,
                end: 0,
            }),
            PeerWriter(WriterInner::Tls(shared)),
        ))
    }
}

impl PeerReader {
    /// The socket underneath (for timeouts and shutdown).
    pub fn tcp(&self) -> &TcpStream {
        match &self.0 {
            ReaderInner::Plain(s) => s,
            ReaderInner::Tls { sock, .. } => sock,
        }
    }
}

impl Read for PeerReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let (shared, sock, buf, start, end) = match &mut self.0 {
            ReaderInner::Plain(s) => return s.read(out),
            ReaderInner::Tls {
                shared,
                sock,
                buf,
                start,
                end,
            } => (shared, sock, buf, start, end),
        };
        loop {
            let wants_write = {
                let mut conn = shared.conn.lock();
                match conn.reader().read(out) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if *start == *end {
                    None
                } else {
                    // Feed what rustls will take, then look for plaintext.
                    let fed = conn.read_tls(&mut &buf[*start..*end])?;
                    if fed == 0 {
                        return Err(io::Error::other("TLS input stalled"));
                    }
                    *start += fed;
                    conn.process_new_packets()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    Some(conn.wants_write())
                }
            };
            match wants_write {
                // Only if no writer is busy: one that is sends this output
                // with its own, and waiting for it here could deadlock (it
                // may be blocked on a full socket only our reading drains).
                Some(true) => {
                    if let Some(mut sock_w) = shared.sock_w.try_lock() {
                        shared.flush_tls(&mut sock_w)?;
                    }
                }
                Some(false) => {}
                None => {
                    // Nothing buffered: wait for TLS bytes without the lock.
                    let n = sock.read(buf)?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "peer closed the connection without a TLS close_notify",
                        ));
                    }
                    (*start, *end) = (0, n);
                }
            }
        }
    }
}

impl PeerWriter {
    pub fn tcp_clone(&self) -> io::Result<TcpStream> {
        match &self.0 {
            WriterInner::Plain(s) => s.try_clone(),
            WriterInner::Tls(shared) => shared.sock_w.lock().try_clone(),
        }
    }
}

impl Write for PeerWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match &mut self.0 {
            WriterInner::Plain(s) => s.write(data),
            WriterInner::Tls(_) => self.write_vectored(&[io::IoSlice::new(data)]),
        }
    }

    /// Several pieces with one socket write (plain) or as one run of TLS
    /// records, sent when rustls's buffer fills and at the end.
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match &mut self.0 {
            WriterInner::Plain(s) => s.write_vectored(bufs),
            WriterInner::Tls(shared) => {
                let mut sock = shared.sock_w.lock();
                let mut total = 0;
                // rustls buffers a limited amount: hand it what it takes,
                // send the records when it takes nothing, repeat.
                for data in bufs {
                    let mut done = 0;
                    let mut flushed = false;
                    while done < data.len() {
                        let n = shared.conn.lock().writer().write(&data[done..])?;
                        if n > 0 {
                            done += n;
                            flushed = false;
                        } else if flushed {
                            return Err(io::Error::new(
                                io::ErrorKind::WriteZero,
                                "TLS connection takes no more data",
                            ));
                        } else {
                            shared.flush_tls(&mut sock)?;
                            flushed = true;
                        }
                    }
                    total += data.len();
                }
                shared.flush_tls(&mut sock)?;
                Ok(total)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.0 {
            WriterInner::Plain(s) => s.flush(),
            WriterInner::Tls(shared) => {
                let mut sock = shared.sock_w.lock();
                shared.flush_tls(&mut sock)?;
                sock.flush()
            }
        }
    }
}
