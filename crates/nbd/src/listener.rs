//! Waking a thread blocked in `accept()` when its server stops, without
//! touching a descriptor that thread owns.
//!
//! The accept thread owns its listener and closes it when it ends. Keeping
//! only the listener's raw descriptor number for a later `shutdown(2)` from
//! another thread is unsound: once the accept thread has closed it, the
//! number may be reused by any file or socket the process opens next, and
//! the shutdown would hit that instead.
//!
//! An [`AcceptWaker`] holds its own descriptor instead: a duplicate
//! (`F_DUPFD_CLOEXEC`) of the listener, owned by the waker and closed when
//! it is dropped. Both descriptors name the same socket, and `shutdown(2)`
//! acts on the socket, not the descriptor: on Linux, shutting a listening
//! TCP or Unix socket down makes a blocked `accept()` on it (through any
//! descriptor) return at once with `EINVAL`, and every later one too. The
//! socket itself lives until both descriptors are closed, so the waker can
//! never reach a stranger's socket.
//!
//! Compared with a non-blocking accept loop that polls a stop flag with a
//! timeout, this wakes the thread at once, costs no periodic wake-ups and
//! leaves the accept loop a plain blocking one; it costs one descriptor per
//! listener. The accept loop must check its stop flag when `accept()`
//! fails, before treating the failure as an error worth a retry.
//!
//! Not NBD-specific: any accept thread (the agent's peer listener, for
//! one) can be stopped this way.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use rustix::net::Shutdown;

/// Stops a blocking accept loop on one listening socket from another
/// thread.
#[derive(Debug)]
pub struct AcceptWaker {
    /// Our own descriptor of the listening socket.
    socket: OwnedFd,
}

impl AcceptWaker {
    /// A waker for `listener` (a `TcpListener` or `UnixListener`), taken
    /// before the listener moves to its accept thread.
    pub fn new(listener: &impl AsFd) -> io::Result<AcceptWaker> {
        Ok(AcceptWaker {
            socket: listener.as_fd().try_clone_to_owned()?,
        })
    }

    /// Shuts the listening socket down: `accept()` on it fails from now
    /// on, waking a thread blocked in it; connections queued but not yet
    /// accepted are refused. Calling it again does nothing more.
    pub fn wake(&self) {
        // A second call fails with ENOTCONN; nothing else can fail on a
        // socket we hold a descriptor of.
        let _ = rustix::net::shutdown(&self.socket, Shutdown::Both);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::TcpListener;
    use std::os::unix::net::UnixListener;
    use std::sync::mpsc;
    use std::thread;
    use std::time::Duration;

    use super::*;

    /// Runs `accept` on a thread, wakes it, and checks that it returned
    /// an error promptly.
    fn wakes<L: AsFd + Send + 'static>(listener: L, accept: fn(&L) -> io::Result<()>) -> io::Error {
        let waker = AcceptWaker::new(&listener).unwrap();
        let (done, result) = mpsc::channel();
        let thread = thread::spawn(move || {
            let _ = done.send(accept(&listener));
            // The listener (the accept thread's descriptor) closes here.
        });
        // Let the thread block in accept() (waking earlier works too).
        thread::sleep(Duration::from_millis(50));
        waker.wake();
        let outcome = result
            .recv_timeout(Duration::from_secs(5))
            .expect("accept() still blocked after wake()");
        thread.join().unwrap();
        waker.wake();
        outcome.unwrap_err()
    }

    #[test]
    fn wake_ends_a_blocked_tcp_accept() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let err = wakes(listener, |l| l.accept().map(drop));
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
    }

    #[test]
    fn wake_ends_a_blocked_unix_accept() {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("s.sock")).unwrap();
        let err = wakes(listener, |l| l.accept().map(drop));
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
    }
}
