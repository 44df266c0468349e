//! What this site last was for a group, kept across restarts in
//! `<data_dir>/groups/<group>.role` (JSON, replaced atomically): whether
//! it serves the group, the epoch, and where that epoch began. The
//! coordinator has the last word; this only says where to start.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleRecord {
    pub primary: bool,
    pub epoch: u64,
    pub fork_epoch: u64,
    pub fork_seq: u64,
}

pub fn path(data_dir: &Path, group: &str) -> PathBuf {
    data_dir.join("groups").join(format!("{group}.role"))
}

pub fn load(data_dir: &Path, group: &str) -> Result<Option<RoleRecord>, String> {
    let p = path(data_dir, group);
    match std::fs::read(&p) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: {e}", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", p.display())),
    }
}

pub fn store(data_dir: &Path, group: &str, record: &RoleRecord) -> Result<(), String> {
    let p = path(data_dir, group);
    let dir = p.parent().unwrap_or(data_dir).to_owned();
    let fail = |what: &str, e: std::io::Error| format!("{}: {what}: {e}", p.display());
    std::fs::create_dir_all(&dir).map_err(|e| fail("create directory", e))?;
    let tmp = p.with_extension("role.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| fail("create", e))?;
    f.write_all(&serde_json::to_vec(record).unwrap_or_default())
        .and_then(|()| f.sync_all())
        .map_err(|e| fail("write", e))?;
    std::fs::rename(&tmp, &p).map_err(|e| fail("rename", e))?;
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| fail("sync directory", e))
}
