//! The witness's data directory: `witness.json` (the whole store, rewritten
//! atomically after every change) and `witness.lock` (held with `flock` for
//! as long as a witness serves the directory). Format and crash behaviour:
//! docs/WITNESS.md.

use std::collections::hash_map::RandomState;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;
use rustix::io::Errno;
use serde::{Deserialize, Serialize};

use super::WitnessError;
use crate::memory::State;

pub const STATE_FILE: &str = "witness.json";
pub const STATE_TEMP: &str = "witness.json.tmp";
pub const LOCK_FILE: &str = "witness.lock";
/// The version of `witness.json` this code writes and reads.
pub const FORMAT: u32 = 1;

/// What `witness.json` holds.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    format: u32,
    witness_id: String,
    state: State,
}

/// A data directory this process holds the lock of.
pub struct DataDir {
    dir: PathBuf,
    witness_id: String,
    /// Holds the `flock`; released when dropped (or when the process dies).
    _lock: File,
}

impl DataDir {
    /// Locks `dir` (creating it if needed) and reads its state: a fresh
    /// store (written at once, with a new witness id) if there is no state
    /// file yet, an error naming the file if it cannot be read.
    pub fn open(dir: &Path) -> Result<(DataDir, State), WitnessError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let lock = lock(dir)?;
        remove_stale_temp(dir)?;
        let path = dir.join(STATE_FILE);
        let (witness_id, state, fresh) = match fs::read(&path) {
            Ok(bytes) => {
                let file = parse(&bytes).map_err(|reason| WitnessError::Corrupt {
                    path: path.clone(),
                    reason,
                })?;
                (file.witness_id, file.state, false)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => (new_witness_id(), fresh(), true),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let data = DataDir {
            dir: dir.to_owned(),
            witness_id,
            _lock: lock,
        };
        if fresh {
            data.save(&state).map_err(io_err(&path))?;
            tracing::info!(path = %path.display(), "witness: new state file");
        }
        Ok((data, state))
    }

    pub fn witness_id(&self) -> &str {
        &self.witness_id
    }

    pub fn state_path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// Replaces `witness.json` with `state`, durably: write a temporary
    /// file, fsync it, rename it over the old one, fsync the directory. A
    /// crash at any point leaves either the old or the new file whole.
    pub fn save(&self, state: &State) -> io::Result<()> {
        let file = StateFile {
            format: FORMAT,
            witness_id: self.witness_id.clone(),
            state: state.clone(),
        };
        let bytes = serde_json::to_vec(&file).map_err(io::Error::other)?;
        let temp = self.dir.join(STATE_TEMP);
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&temp, self.dir.join(STATE_FILE))?;
        File::open(&self.dir)?.sync_all()
    }
}

fn fresh() -> State {
    State {
        revision: 1,
        next_lease: 1,
        ..State::default()
    }
}

/// What is wrong with a state file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("not a witness state file: {0}")]
    Json(#[from] serde_json::Error),
    #[error("format {0} is not the one this witness reads ({FORMAT})")]
    Format(u32),
    #[error("empty witness_id")]
    NoWitnessId,
    #[error("revision {0} is below 1")]
    Revision(i64),
    #[error("lease {id} is not below next_lease {next}")]
    LeaseAhead { id: i64, next: i64 },
    #[error("lease {0} has a bad id or a zero TTL")]
    BadLease(i64),
    #[error("key {key:?}: revisions {create}..{modified} do not fit the store's revision {store}")]
    KeyRevisions {
        key: String,
        create: i64,
        modified: i64,
        store: i64,
    },
    #[error("key {key:?} names lease {lease} which is absent")]
    KeyLease { key: String, lease: i64 },
}

/// Reads a state file, checking what the store relies on.
fn parse(bytes: &[u8]) -> Result<StateFile, StateError> {
    let file: StateFile = serde_json::from_slice(bytes)?;
    if file.format != FORMAT {
        return Err(StateError::Format(file.format));
    }
    if file.witness_id.is_empty() {
        return Err(StateError::NoWitnessId);
    }
    check(&file.state)?;
    Ok(file)
}

/// The invariants of a store's state: revisions never ahead of the store,
/// lease ids never handed out twice, every leased key's lease present.
fn check(state: &State) -> Result<(), StateError> {
    if state.revision < 1 {
        return Err(StateError::Revision(state.revision));
    }
    if let Some((&id, _)) = state.leases.iter().next_back() {
        if id >= state.next_lease {
            return Err(StateError::LeaseAhead {
                id,
                next: state.next_lease,
            });
        }
    }
    if let Some((&id, _)) = state.leases.iter().find(|(&id, &ttl)| id < 1 || ttl == 0) {
        return Err(StateError::BadLease(id));
    }
    for (key, k) in &state.keys {
        if k.create_revision < 1
            || k.create_revision > k.mod_revision
            || k.mod_revision > state.revision
        {
            return Err(StateError::KeyRevisions {
                key: key.clone(),
                create: k.create_revision,
                modified: k.mod_revision,
                store: state.revision,
            });
        }
        if k.lease != 0 && !state.leases.contains_key(&k.lease) {
            return Err(StateError::KeyLease {
                key: key.clone(),
                lease: k.lease,
            });
        }
    }
    Ok(())
}

/// Takes the directory's lock file, or says which witness holds it.
fn lock(dir: &Path) -> Result<File, WitnessError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err(&path))?;
    // The lock goes away when the file is closed.
    match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(Errno::WOULDBLOCK) => Err(WitnessError::Locked { path }),
        Err(e) => Err(io_err(&path)(e.into())),
    }
}

/// A temporary file left by a crash mid-write was never renamed, so no
/// answer depended on it.
fn remove_stale_temp(dir: &Path) -> Result<(), WitnessError> {
    let temp = dir.join(STATE_TEMP);
    match fs::remove_file(&temp) {
        Ok(()) => {
            tracing::info!(path = %temp.display(), "witness: removed an unfinished state write");
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(&temp)(e)),
    }
}

/// 128 random bits in hex: `RandomState` is seeded from the OS.
fn new_witness_id() -> String {
    let half = || {
        let mut h = RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.write_u32(std::process::id());
        h.finish()
    };
    format!("{:016x}{:016x}", half(), half())
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> WitnessError + '_ {
    move |source| WitnessError::Io {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::StoredKey;

    fn state_with_key(lease: i64) -> State {
        let mut state = fresh();
        state.revision = 3;
        state.keys.insert(
            "g/owner".into(),
            StoredKey {
                value: b"ny".to_vec(),
                mod_revision: 3,
                create_revision: 2,
                lease,
                by: String::new(),
            },
        );
        state
    }

    #[test]
    fn a_consistent_state_passes() {
        let mut state = state_with_key(1);
        state.leases.insert(1, 3000);
        state.next_lease = 2;
        check(&state).expect("consistent");
    }

    #[test]
    fn a_key_on_a_missing_lease_is_caught() {
        let err = check(&state_with_key(5)).expect_err("lease 5 absent");
        assert!(
            matches!(err, StateError::KeyLease { lease: 5, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_lease_id_that_could_be_handed_out_again_is_caught() {
        let mut state = fresh();
        state.leases.insert(4, 3000);
        state.next_lease = 4;
        assert!(check(&state).is_err());
    }

    #[test]
    fn a_key_newer_than_the_store_is_caught() {
        let mut state = state_with_key(0);
        state.revision = 2;
        assert!(check(&state).is_err());
    }

    #[test]
    fn witness_ids_differ() {
        assert_ne!(new_witness_id(), new_witness_id());
    }
}
