//! A machine-wide exclusive lock on a file (`flock`), taken with a bound.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::time::Duration;

use rustix::fs::{flock, FlockOperation};

use crate::Error;

/// Holds an exclusive `flock` on a file until dropped. The file is opened
/// close-on-exec (as std opens every file), so daemons started while it is
/// held do not inherit it.
pub(crate) struct FileLock {
    file: File,
}

impl FileLock {
    /// Takes the lock on `path` (created if needed), waiting at most
    /// `timeout` for another holder to let go.
    pub(crate) fn acquire(path: &Path, timeout: Duration) -> Result<FileLock, Error> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|source| Error::Io {
                what: format!("cannot open lock file {}", path.display()),
                source,
            })?;
        let mut last = None;
        let got = tandem_testkit::poll(timeout, || {
            match flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => Some(()),
                Err(e) => {
                    last = Some(e);
                    None
                }
            }
        });
        match got {
            Some(()) => Ok(FileLock { file }),
            None => Err(Error::Timeout {
                what: format!(
                    "the lock on {} (last error: {})",
                    path.display(),
                    last.map_or_else(|| "none".to_string(), |e| e.to_string())
                ),
                timeout,
                detail: String::new(),
            }),
        }
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        let _ = flock(&self.file, FlockOperation::Unlock);
    }
}
