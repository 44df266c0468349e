//! `qemu-nbd` serving an image on a Unix socket (a disk for a guest that
//! does not depend on Tandem).

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::guest::Disk;
use crate::Error;

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A `qemu-nbd` child process serving one raw image; killed when dropped.
#[derive(Debug)]
pub struct QemuNbd {
    child: Child,
    socket: PathBuf,
    export: String,
    log: PathBuf,
}

impl QemuNbd {
    /// Serves the raw image `image` as export `export` on the Unix socket
    /// `socket` (`--persistent`, up to 8 clients at once, writes flushed
    /// on FLUSH), and returns once the socket accepts connections. Its
    /// stderr goes to `<socket>.log`.
    pub fn serve(image: &Path, socket: &Path, export: &str) -> Result<QemuNbd, Error> {
        let log = PathBuf::from(format!("{}.log", socket.display()));
        let log_file = File::create(&log).map_err(|source| Error::Io {
            what: format!("cannot create {}", log.display()),
            source,
        })?;
        let _ = std::fs::remove_file(socket);
        let mut c = Command::new("qemu-nbd");
        c.args(["--format=raw", "--persistent", "--shared=8"])
            .arg(format!("--export-name={export}"))
            .arg(format!("--socket={}", socket.display()))
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        let command = crate::cmd::describe(&c);
        let child = c.spawn().map_err(|source| Error::Io {
            what: format!("cannot run {command}"),
            source,
        })?;
        let mut server = QemuNbd {
            child,
            socket: socket.to_path_buf(),
            export: export.to_string(),
            log,
        };
        let mut exited = None;
        let ready = tandem_testkit::poll(START_TIMEOUT, || {
            if let Ok(Some(status)) = server.child.try_wait() {
                exited = Some(status);
                return Some(false);
            }
            UnixStream::connect(socket).ok().map(|_| true)
        });
        match ready {
            Some(true) => Ok(server),
            Some(false) => Err(Error::Nbd {
                message: format!(
                    "{command} exited ({}): {}",
                    exited.map_or_else(String::new, |s| s.to_string()),
                    server.log_text()
                ),
            }),
            None => Err(Error::Timeout {
                what: format!("{command} to accept connections"),
                timeout: START_TIMEOUT,
                detail: format!("; its log: {}", server.log_text()),
            }),
        }
    }

    /// The guest disk for this export.
    pub fn disk(&self) -> Disk {
        Disk::Nbd {
            socket: self.socket.clone(),
            export: self.export.clone(),
        }
    }

    /// The Unix socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The export name.
    pub fn export(&self) -> &str {
        &self.export
    }

    /// The disk for this export attached the way Tandem attaches volumes
    /// ([`Disk::TandemNbd`]: `-blockdev` with `reconnect-delay`).
    pub fn tandem_disk(&self, reconnect_delay_secs: u32) -> Disk {
        Disk::TandemNbd {
            socket: self.socket.clone(),
            export: self.export.clone(),
            reconnect_delay_secs,
        }
    }

    /// What qemu-nbd wrote to stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills qemu-nbd (SIGKILL, as a crash would), waits for it and
    /// removes its socket file; [`QemuNbd::serve`] on the same socket is
    /// then a restarted server.
    pub fn stop(mut self) -> Result<(), Error> {
        self.kill()
    }

    fn kill(&mut self) -> Result<(), Error> {
        if let Ok(Some(_)) = self.child.try_wait() {
            return Ok(());
        }
        let _ = self.child.kill();
        self.child.wait().map(|_| ()).map_err(|source| Error::Io {
            what: "waiting for qemu-nbd".into(),
            source,
        })
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.kill();
        let _ = std::fs::remove_file(&self.socket);
    }
}
