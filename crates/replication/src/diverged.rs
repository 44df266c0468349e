//! A demoted primary's record of where its images may differ from the
//! site that took the group over (docs/REPLICA.md, "Divergence"): the
//! regions its dirty map marked when it stopped serving, with the tip
//! (epoch, seq) its images held then. Written once when the site becomes
//! a replica, read when a primary's session opens, removed when a resync
//! has ended here (the primary that ran it keeps those regions in its own
//! dirty map until they are compared).

use std::fs::File;
use std::io::Write;
use std::path::Path;

use crate::error::ReplicaError;

const MAGIC: &[u8; 8] = b"TNDDIV01";
const HEADER_LEN: usize = 28;
const RANGE_LEN: usize = 20;

/// What a demoted primary's images hold beyond the common history.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Divergence {
    /// (epoch, seq) the images held when the site stopped serving.
    pub tip: (u64, u64),
    /// (volume index, offset, length) of every region that may hold
    /// writes another site lacks.
    pub ranges: Vec<(u32, u64, u64)>,
}

/// Writes `d` to `path` durably (a temporary file, synced, renamed over
/// `path`, the directory synced).
pub fn store(path: &Path, d: &Divergence) -> Result<(), ReplicaError> {
    let io = |op: &'static str| {
        let path = path.to_owned();
        move |source| ReplicaError::Io { path, op, source }
    };
    let mut buf = Vec::with_capacity(HEADER_LEN + RANGE_LEN * d.ranges.len() + 4);
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&d.tip.0.to_le_bytes());
    buf.extend_from_slice(&d.tip.1.to_le_bytes());
    let count = u32::try_from(d.ranges.len()).map_err(|_| ReplicaError::Corrupt {
        path: path.to_owned(),
        reason: format!("{} ranges do not fit the file", d.ranges.len()),
    })?;
    buf.extend_from_slice(&count.to_le_bytes());
    for &(volume, offset, len) in &d.ranges {
        buf.extend_from_slice(&volume.to_le_bytes());
        buf.extend_from_slice(&offset.to_le_bytes());
        buf.extend_from_slice(&len.to_le_bytes());
    }
    let crc = crc32c::crc32c(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io("create divergence file"))?;
    f.write_all(&buf).map_err(io("write divergence file"))?;
    f.sync_all().map_err(io("sync divergence file"))?;
    std::fs::rename(&tmp, path).map_err(io("rename divergence file"))?;
    sync_dir(path).map_err(io("sync the replica directory"))
}

/// Reads the file at `path`: `Ok(None)` when there is none.
pub fn load(path: &Path) -> Result<Option<Divergence>, ReplicaError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ReplicaError::Io {
                path: path.to_owned(),
                op: "read divergence file",
                source,
            })
        }
    };
    let corrupt = |reason: &str| ReplicaError::Corrupt {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    if bytes.len() < HEADER_LEN + 4 || &bytes[0..8] != MAGIC {
        return Err(corrupt("not a divergence file"));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    let crc = u32::from_le_bytes(crc.try_into().map_err(|_| corrupt("short"))?);
    if crc != crc32c::crc32c(body) {
        return Err(corrupt("checksum mismatch"));
    }
    let u64_at = |at: usize| {
        body.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let u32_at = |at: usize| {
        body.get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    };
    let (Some(epoch), Some(seq), Some(count)) = (u64_at(8), u64_at(16), u32_at(24)) else {
        return Err(corrupt("short header"));
    };
    if (body.len() - HEADER_LEN) as u64 != u64::from(count) * RANGE_LEN as u64 {
        return Err(corrupt("length does not match the range count"));
    }
    let ranges = body[HEADER_LEN..]
        .chunks_exact(RANGE_LEN)
        .map(|r| {
            let volume = u32::from_le_bytes([r[0], r[1], r[2], r[3]]);
            let mut o = [0u8; 8];
            o.copy_from_slice(&r[4..12]);
            let mut l = [0u8; 8];
            l.copy_from_slice(&r[12..20]);
            (volume, u64::from_le_bytes(o), u64::from_le_bytes(l))
        })
        .collect();
    Ok(Some(Divergence {
        tip: (epoch, seq),
        ranges,
    }))
}

/// Removes the file at `path` durably, if there is one.
pub fn remove(path: &Path) -> Result<(), ReplicaError> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_dir(path).map_err(|source| ReplicaError::Io {
            path: path.to_owned(),
            op: "sync the replica directory",
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ReplicaError::Io {
            path: path.to_owned(),
            op: "remove divergence file",
            source,
        }),
    }
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_divergence_survives_reopen_and_damage_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("diverged");
        assert_eq!(load(&path).unwrap(), None);
        let d = Divergence {
            tip: (3, 1234),
            ranges: vec![(0, 0, 4 << 20), (1, 8 << 20, 12 << 20)],
        };
        store(&path, &d).unwrap();
        assert_eq!(load(&path).unwrap(), Some(d));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[30] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(
            err.contains("checksum") && err.contains("diverged"),
            "{err}"
        );
        remove(&path).unwrap();
        remove(&path).unwrap();
        assert_eq!(load(&path).unwrap(), None);
    }
}
