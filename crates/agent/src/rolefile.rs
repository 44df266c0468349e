//! What this site last was for a group, kept across restarts in
//! `<data_dir>/groups/<group>.role` (JSON, replaced atomically: written to
//! `.role.tmp`, synced, renamed, directory synced): whether it serves the
//! group, the epoch, and where that epoch began. The coordinator has the
//! last word; this only says where to start. A crash leaves either the old
//! or the new file (a stray `.role.tmp` is ignored and replaced).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tandem_coordinator::machine::Start;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleRecord {
    pub primary: bool,
    pub epoch: u64,
    pub fork_epoch: u64,
    pub fork_seq: u64,
}

impl RoleRecord {
    /// Where the group's ownership machine starts.
    pub fn start(&self) -> Start {
        if self.primary {
            Start::Primary {
                epoch: self.epoch,
                fork: (self.fork_epoch, self.fork_seq),
            }
        } else {
            Start::Replica { epoch: self.epoch }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RoleFileError {
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{path}: not a role record ({source}); remove it to start from the configuration")]
    Decode {
        path: PathBuf,
        source: serde_json::Error,
    },
}

pub fn path(data_dir: &Path, group: &str) -> PathBuf {
    data_dir.join("groups").join(format!("{group}.role"))
}

pub fn load(data_dir: &Path, group: &str) -> Result<Option<RoleRecord>, RoleFileError> {
    let path = path(data_dir, group);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| RoleFileError::Decode { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(RoleFileError::Io {
            path,
            what: "read",
            source,
        }),
    }
}

pub fn store(data_dir: &Path, group: &str, record: &RoleRecord) -> Result<(), RoleFileError> {
    let p = path(data_dir, group);
    let dir = p.parent().unwrap_or(data_dir).to_owned();
    let fail = |what: &'static str| {
        let path = p.clone();
        move |source| RoleFileError::Io { path, what, source }
    };
    std::fs::create_dir_all(&dir).map_err(fail("create directory"))?;
    let tmp = p.with_extension("role.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(fail("create"))?;
    f.write_all(&serde_json::to_vec(record).unwrap_or_default())
        .and_then(|()| f.sync_all())
        .map_err(fail("write"))?;
    std::fs::rename(&tmp, &p).map_err(fail("rename"))?;
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(fail("sync directory"))
}
