//! TLS after NBD_OPT_STARTTLS: a rustls server connection over the
//! client's socket, driven without blocking (the connection's thread waits
//! in `poll(2)`, see `conn`).
//!
//! The server configuration decides who may connect; the agent passes one
//! that requires a client certificate signed by the site CA.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::net::{RecvFlags, SendFlags};

/// Plaintext the TLS layer buffers for the socket, at most.
const SEND_BUFFER: usize = 1 << 20;

/// Non-blocking reads and writes on a borrowed socket, for rustls.
struct Socket<'a>(BorrowedFd<'a>);

impl Read for Socket<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Ok(rustix::net::recv(self.0, buf, RecvFlags::DONTWAIT)?.0)
    }
}

impl Write for Socket<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(rustix::net::send(
            self.0,
            buf,
            SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
        )?)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Why a TLS session could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS handshake failed: {0}")]
    Handshake(#[from] rustls::Error),
    #[error("TLS handshake not finished in time")]
    Timeout,
    #[error("i/o during the TLS handshake: {0}")]
    Io(#[from] io::Error),
}

pub(crate) struct TlsStream {
    fd: OwnedFd,
    tls: rustls::ServerConnection,
}

impl TlsStream {
    /// Runs the server side of the TLS handshake on `fd` until it is done,
    /// `deadline` passes, or the client fails it (no certificate, one the
    /// CA did not sign...).
    pub fn accept(
        fd: OwnedFd,
        config: Arc<rustls::ServerConfig>,
        deadline: Instant,
    ) -> Result<TlsStream, TlsError> {
        let mut tls = rustls::ServerConnection::new(config)?;
        tls.set_buffer_limit(Some(SEND_BUFFER));
        let mut stream = TlsStream { fd, tls };
        while stream.tls.is_handshaking() {
            match stream.push() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
            if !stream.tls.wants_read() && !stream.tls.wants_write() {
                break;
            }
            let got = stream.tls.read_tls(&mut Socket(stream.fd.as_fd()));
            match got {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
                Ok(_) => {
                    if let Err(e) = stream.tls.process_new_packets() {
                        // Tell the client why (the alert), then give up.
                        let _ = stream.push();
                        return Err(e.into());
                    }
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TlsError::Timeout);
            }
            let mut flags = PollFlags::IN;
            if stream.tls.wants_write() {
                flags |= PollFlags::OUT;
            }
            let timeout = Timespec {
                tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: i64::from(left.subsec_nanos()),
            };
            let mut fds = [PollFd::new(&stream.fd, flags)];
            match poll(&mut fds, Some(&timeout)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(io::Error::from(e).into()),
            }
        }
        Ok(stream)
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Plaintext from the client; `WouldBlock` when none is available.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            match self.tls.read_tls(&mut Socket(self.fd.as_fd()))? {
                0 => return Ok(0),
                _ => {
                    self.tls
                        .process_new_packets()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                }
            }
        }
    }

    /// Takes plaintext for the client, as much as the send buffer holds;
    /// `WouldBlock` when it is full.
    pub fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.tls.writer().write(buf)?;
        match self.push() {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        if n == 0 && !buf.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    /// Encrypted bytes waiting for the socket.
    pub fn pending(&self) -> bool {
        self.tls.wants_write()
    }

    /// Writes encrypted bytes until none are left (`WouldBlock` if the
    /// socket is full first).
    pub fn push(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            self.tls.write_tls(&mut Socket(self.fd.as_fd()))?;
        }
        Ok(())
    }
}
