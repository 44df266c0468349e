//! Rollback data: before a demoted primary's images are overwritten by the
//! new owner's (resync), what its persistent dirty map marks — a superset
//! of the writes the new owner may never have got — is saved to
//! `<data_dir>/rollback/<group>-e<epoch>-s<seq>.img`, with a tab-separated
//! index beside it (`.index`: volume, offset, length, offset in the file).
//! Written once, synced, never read by Tandem: forensics for an operator.

use std::io::Write;
use std::path::{Path, PathBuf};

use tandem_capture::GroupCapture;
use tandem_coordinator::machine::Tip;

/// Saves the marked regions; None when nothing is marked.
pub fn save(
    data_dir: &Path,
    group: &str,
    capture: &GroupCapture,
    tip: Tip,
) -> Result<Option<PathBuf>, std::io::Error> {
    let ranges = capture.dirty_ranges();
    if ranges.iter().all(Vec::is_empty) {
        return Ok(None);
    }
    let dir = data_dir.join("rollback");
    std::fs::create_dir_all(&dir)?;
    let base = dir.join(format!("{group}-e{}-s{}", tip.0, tip.1));
    let data_path = base.with_extension("img");
    let mut data = std::fs::File::create(&data_path)?;
    let mut index = String::from("volume\toffset\tlength\tfile_offset\n");
    let mut at = 0u64;
    let mut buf = Vec::new();
    for (v, volume_ranges) in capture.volumes().iter().zip(ranges) {
        for (offset, len) in volume_ranges {
            let n = usize::try_from(len).map_err(std::io::Error::other)?;
            buf.resize(n, 0);
            v.image
                .read(offset, &mut buf)
                .map_err(std::io::Error::other)?;
            data.write_all(&buf)?;
            index.push_str(&format!("{}\t{offset}\t{len}\t{at}\n", v.name));
            at += len;
        }
    }
    data.sync_all()?;
    let mut index_file = std::fs::File::create(base.with_extension("index"))?;
    index_file.write_all(index.as_bytes())?;
    index_file.sync_all()?;
    std::fs::File::open(&dir)?.sync_all()?;
    Ok(Some(data_path))
}
