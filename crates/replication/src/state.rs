//! The replica's durable state for one group (docs/REPLICA.md): two
//! checksummed slots written alternately, the newest valid one wins.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::ReplicaError;

/// Slots of this version (with `history_end`) and of the ones before
/// (`TNDRST03`: no `history_end`; `TNDRST02`: no `resync_epoch` either).
const MAGIC: &[u8; 8] = b"TNDRST04";
const MAGIC_V3: &[u8; 8] = b"TNDRST03";
const MAGIC_V2: &[u8; 8] = b"TNDRST02";
const SLOT_LEN: usize = 80;
const SLOT_LEN_V3: usize = 72;
const SLOT_LEN_V2: usize = 64;
const SLOT_STRIDE: u64 = 512;

/// What the replica's images hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplicaState {
    /// Ownership generation of the group as this replica knows it.
    pub epoch: u64,
    /// Every record up to here is applied to the images and synced.
    pub applied: u64,
    /// Non-zero after a resync: the images are a consistent prefix once
    /// every record below this is applied.
    pub consistent_at: u64,
    /// A resync is writing chunks: the images are not a prefix.
    pub inconsistent: bool,
    /// Epoch of the records up to `applied` (with `applied`, the replica's
    /// *tip*, matched against a new owner's fork point).
    pub tip_epoch: u64,
    /// The epoch of the primary whose resync last began here (0: none, or
    /// a state written before this field existed). While the images are
    /// inconsistent, that primary's dirty map covers every region they
    /// may still differ in (docs/REPLICA.md).
    pub resync_epoch: u64,
    /// With an undo history (docs/HISTORY.md, H5): the log's length when
    /// the images were last synced; entries from here on are rolled back
    /// at open. 0 without history.
    pub history_end: u64,
}

impl ReplicaState {
    /// Whether the images are exactly a prefix of the primary's sequence.
    pub fn is_consistent(&self) -> bool {
        !self.inconsistent && (self.consistent_at == 0 || self.applied + 1 >= self.consistent_at)
    }
}

#[derive(Debug)]
pub struct StateFile {
    file: File,
    path: PathBuf,
    generation: u64,
    current: ReplicaState,
    /// The file did not exist: a new replica (its images hold nothing
    /// known).
    pub created: bool,
}

impl StateFile {
    pub fn open(path: &Path) -> Result<StateFile, ReplicaError> {
        let io_err = |op| {
            let path = path.to_owned();
            move |source| ReplicaError::Io { path, op, source }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(io_err("open replica state"))?;
        let len = file.metadata().map_err(io_err("stat replica state"))?.len();
        let mut best: Option<(u64, ReplicaState)> = None;
        for slot in 0..2 {
            let mut buf = [0u8; SLOT_LEN];
            // A slot of the version before is shorter: the last one in
            // its file ends 8 bytes before a slot of this version.
            let mut have = 0;
            while have < SLOT_LEN {
                match file.read_at(&mut buf[have..], slot * SLOT_STRIDE + have as u64) {
                    Ok(0) => break,
                    Ok(n) => have += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io_err("read replica state")(e)),
                }
            }
            if let Some(found) = decode(&buf, have) {
                if best.is_none_or(|b| found.0 > b.0) {
                    best = Some(found);
                }
            }
        }
        if len > 0 && best.is_none() {
            return Err(ReplicaError::Corrupt {
                path: path.to_owned(),
                reason: "neither state slot is valid".into(),
            });
        }
        let (generation, current) = best.unwrap_or_default();
        Ok(StateFile {
            file,
            path: path.to_owned(),
            generation,
            current,
            created: len == 0,
        })
    }

    pub fn get(&self) -> ReplicaState {
        self.current
    }

    /// Writes `state` durably (the other slot, then fdatasync).
    pub fn set(&mut self, state: ReplicaState) -> Result<(), ReplicaError> {
        let generation = self.generation + 1;
        let slot = encode(generation, &state);
        self.file
            .write_all_at(&slot, (generation % 2) * SLOT_STRIDE)
            .and_then(|()| self.file.sync_data())
            .map_err(|source| ReplicaError::Io {
                path: self.path.clone(),
                op: "write replica state",
                source,
            })?;
        self.generation = generation;
        self.current = state;
        self.created = false;
        Ok(())
    }
}

fn encode(generation: u64, s: &ReplicaState) -> [u8; SLOT_LEN] {
    let mut buf = [0u8; SLOT_LEN];
    buf[0..8].copy_from_slice(MAGIC);
    buf[8..16].copy_from_slice(&generation.to_le_bytes());
    buf[16..24].copy_from_slice(&s.epoch.to_le_bytes());
    buf[24..32].copy_from_slice(&s.applied.to_le_bytes());
    buf[32..40].copy_from_slice(&s.consistent_at.to_le_bytes());
    buf[40] = u8::from(s.inconsistent);
    buf[48..56].copy_from_slice(&s.tip_epoch.to_le_bytes());
    buf[56..64].copy_from_slice(&s.resync_epoch.to_le_bytes());
    buf[64..72].copy_from_slice(&s.history_end.to_le_bytes());
    let crc = crc32c::crc32c(&buf[0..72]);
    buf[72..76].copy_from_slice(&crc.to_le_bytes());
    buf
}

/// A slot of `have` bytes read: this version's, or the one before (no
/// `resync_epoch`: 0).
fn decode(buf: &[u8; SLOT_LEN], have: usize) -> Option<(u64, ReplicaState)> {
    let word =
        |at: usize| -> Option<u64> { Some(u64::from_le_bytes(buf[at..at + 8].try_into().ok()?)) };
    let (crc_at, resync_epoch, history_end) = if &buf[0..8] == MAGIC && have >= SLOT_LEN {
        (72, word(56)?, word(64)?)
    } else if &buf[0..8] == MAGIC_V3 && have >= SLOT_LEN_V3 {
        (64, word(56)?, 0)
    } else if &buf[0..8] == MAGIC_V2 && have >= SLOT_LEN_V2 {
        (56, 0, 0)
    } else {
        return None;
    };
    let crc = u32::from_le_bytes(buf[crc_at..crc_at + 4].try_into().ok()?);
    if crc != crc32c::crc32c(&buf[0..crc_at]) || buf[40] > 1 {
        return None;
    }
    Some((
        word(8)?,
        ReplicaState {
            epoch: word(16)?,
            applied: word(24)?,
            consistent_at: word(32)?,
            inconsistent: buf[40] == 1,
            tip_epoch: word(48)?,
            resync_epoch,
            history_end,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_survives_reopen_and_a_torn_newest_slot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let mut f = StateFile::open(&path).unwrap();
        assert!(f.created);
        let a = ReplicaState {
            epoch: 1,
            applied: 10,
            consistent_at: 0,
            inconsistent: false,
            tip_epoch: 1,
            resync_epoch: 0,
            history_end: 0,
        };
        let b = ReplicaState {
            epoch: 1,
            applied: 20,
            consistent_at: 30,
            inconsistent: true,
            tip_epoch: 1,
            resync_epoch: 1,
            history_end: 123_456,
        };
        f.set(a).unwrap();
        f.set(b).unwrap();
        drop(f);
        let f = StateFile::open(&path).unwrap();
        assert_eq!(f.get(), b);
        assert!(!f.created);
        // Tear the newest slot (generation 2 is in slot 0).
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(&[0xee; 8], 20)
            .unwrap();
        assert_eq!(StateFile::open(&path).unwrap().get(), a);
    }

    /// A state file of the version before (64-byte `TNDRST02` slots, no
    /// resync epoch) is read, as of resync epoch 0, and the next write
    /// is of this version.
    #[test]
    fn a_state_of_the_version_before_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let mut slot = [0u8; SLOT_LEN_V2];
        slot[0..8].copy_from_slice(MAGIC_V2);
        slot[8..16].copy_from_slice(&3u64.to_le_bytes()); // generation 3: slot 1
        slot[16..24].copy_from_slice(&4u64.to_le_bytes());
        slot[24..32].copy_from_slice(&77u64.to_le_bytes());
        slot[40] = 1;
        slot[48..56].copy_from_slice(&4u64.to_le_bytes());
        let crc = crc32c::crc32c(&slot[0..56]);
        slot[56..60].copy_from_slice(&crc.to_le_bytes());
        let mut file = vec![0u8; 512];
        file.extend_from_slice(&slot);
        std::fs::write(&path, &file).unwrap();
        let mut f = StateFile::open(&path).unwrap();
        let old = ReplicaState {
            epoch: 4,
            applied: 77,
            consistent_at: 0,
            inconsistent: true,
            tip_epoch: 4,
            resync_epoch: 0,
            history_end: 0,
        };
        assert_eq!(f.get(), old);
        let new = ReplicaState {
            resync_epoch: 5,
            history_end: 0,
            ..old
        };
        f.set(new).unwrap();
        drop(f);
        assert_eq!(StateFile::open(&path).unwrap().get(), new);
    }

    #[test]
    fn consistency_follows_the_resync_point() {
        let s = ReplicaState {
            epoch: 1,
            applied: 5,
            consistent_at: 9,
            inconsistent: false,
            tip_epoch: 1,
            resync_epoch: 0,
            history_end: 0,
        };
        assert!(!s.is_consistent());
        assert!(ReplicaState { applied: 8, ..s }.is_consistent());
        assert!(!ReplicaState {
            inconsistent: true,
            applied: 100,
            ..s
        }
        .is_consistent());
    }
}
