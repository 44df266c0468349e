//! The persistent dirty-region map of one volume (docs/CAPTURE.md): one bit
//! per 4 MiB region, set durably before any write to a clean region.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::CaptureError;

const MAGIC: &[u8; 8] = b"TNDDIRTY";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 36;
const BITMAP_AT: u64 = 4096;
/// log2 of the region size: 4 MiB.
pub const REGION_SHIFT: u32 = 22;
pub const REGION_SIZE: u64 = 1 << REGION_SHIFT;

/// Regions `[first, last]` touched by `[offset, offset + len)`.
pub fn regions_of(offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
    let last = (offset + len.max(1) - 1) >> REGION_SHIFT;
    (offset >> REGION_SHIFT)..=last
}

#[derive(Debug)]
pub struct DirtyMap {
    file: File,
    path: PathBuf,
    bits: Vec<u64>,
    regions: u64,
}

impl DirtyMap {
    /// Opens the map for a volume of `volume_size` bytes. `image_existed`
    /// says whether the image was there before this start: a missing map
    /// for an existing image marks every region (nothing is known).
    pub fn open(
        path: &Path,
        volume_size: u64,
        image_existed: bool,
    ) -> Result<DirtyMap, CaptureError> {
        let regions = volume_size.div_ceil(REGION_SIZE);
        let words = usize::try_from(regions.div_ceil(64)).map_err(|_| CaptureError::Io {
            path: path.to_owned(),
            op: "size dirty map",
            source: io::Error::new(
                io::ErrorKind::OutOfMemory,
                "the volume is too large for this host's address space",
            ),
        })?;
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(CaptureError::io(path, "open dirty map"))?;
        let mut map = DirtyMap {
            file,
            path: path.to_owned(),
            bits: vec![0; words],
            regions,
        };
        let len = map
            .file
            .metadata()
            .map_err(CaptureError::io(path, "stat dirty map"))?
            .len();
        if existed && len > 0 {
            map.load(volume_size)?;
        } else {
            if image_existed {
                tracing::warn!(
                    map = %path.display(),
                    "no dirty map for an existing image: every region is marked for comparison"
                );
                map.mark_all();
            }
            map.write_header(volume_size)?;
            map.write_words(0, words)?;
            map.sync()?;
        }
        Ok(map)
    }

    fn load(&mut self, volume_size: u64) -> Result<(), CaptureError> {
        let mut header = [0u8; HEADER_LEN];
        self.file
            .read_exact_at(&mut header, 0)
            .map_err(CaptureError::io(&self.path, "read dirty map header"))?;
        let corrupt = |reason: &str| CaptureError::Corrupt {
            path: self.path.clone(),
            reason: reason.into(),
        };
        if &header[0..8] != MAGIC {
            return Err(corrupt("bad magic"));
        }
        let crc = u32::from_le_bytes(
            header[32..36]
                .try_into()
                .map_err(|_| corrupt("short header"))?,
        );
        if crc != crc32c::crc32c(&header[0..32]) {
            return Err(corrupt("header checksum mismatch"));
        }
        let field = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap_or([0; 8]));
        let version = u32::from_le_bytes(header[8..12].try_into().unwrap_or([0; 4]));
        let shift = u32::from_le_bytes(header[12..16].try_into().unwrap_or([0; 4]));
        if version != VERSION {
            return Err(corrupt(&format!("unknown version {version}")));
        }
        let (size, regions) = (field(16), field(24));
        if shift != REGION_SHIFT || size != volume_size || regions != self.regions {
            return Err(CaptureError::Mismatch {
                path: self.path.clone(),
                found: size,
                expected: volume_size,
                region: 1u64 << shift.min(63),
            });
        }
        let mut bytes = vec![0u8; self.bits.len() * 8];
        self.file
            .read_exact_at(&mut bytes, BITMAP_AT)
            .map_err(CaptureError::io(&self.path, "read dirty map bitmap"))?;
        for (word, chunk) in self.bits.iter_mut().zip(bytes.chunks_exact(8)) {
            *word = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
        }
        Ok(())
    }

    fn write_header(&self, volume_size: u64) -> Result<(), CaptureError> {
        let mut header = [0u8; HEADER_LEN];
        header[0..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&REGION_SHIFT.to_le_bytes());
        header[16..24].copy_from_slice(&volume_size.to_le_bytes());
        header[24..32].copy_from_slice(&self.regions.to_le_bytes());
        let crc = crc32c::crc32c(&header[0..32]);
        header[32..36].copy_from_slice(&crc.to_le_bytes());
        self.file
            .write_all_at(&header, 0)
            .map_err(CaptureError::io(&self.path, "write dirty map header"))
    }

    fn write_words(&self, first: usize, last_exclusive: usize) -> Result<(), CaptureError> {
        let bytes: Vec<u8> = self.bits[first..last_exclusive]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        self.file
            .write_all_at(&bytes, BITMAP_AT + first as u64 * 8)
            .map_err(CaptureError::io(&self.path, "write dirty map"))
    }

    fn sync(&self) -> Result<(), CaptureError> {
        self.file
            .sync_data()
            .map_err(CaptureError::io(&self.path, "fsync dirty map"))
    }

    fn mark_all(&mut self) {
        for r in 0..self.regions {
            self.bits[(r / 64) as usize] |= 1 << (r % 64);
        }
    }

    pub fn is_marked(&self, region: u64) -> bool {
        region < self.regions && self.bits[(region / 64) as usize] & (1 << (region % 64)) != 0
    }

    /// Marks the regions of `[offset, offset + len)`, durably if any was
    /// clean (invariant D1). Returns whether anything had to be written.
    pub fn mark(&mut self, offset: u64, len: u64) -> Result<bool, CaptureError> {
        let range = regions_of(offset, len);
        let (first, last) = (
            *range.start(),
            (*range.end()).min(self.regions.saturating_sub(1)),
        );
        if (first..=last).all(|r| self.is_marked(r)) {
            return Ok(false);
        }
        let (w0, w1) = ((first / 64) as usize, (last / 64) as usize + 1);
        let before: Vec<u64> = self.bits[w0..w1].to_vec();
        for r in first..=last {
            self.bits[(r / 64) as usize] |= 1 << (r % 64);
        }
        if let Err(e) = self.write_words(w0, w1).and_then(|()| self.sync()) {
            // Not durable: the write must not proceed, and memory must not
            // claim a mark the disk does not have.
            self.bits[w0..w1].copy_from_slice(&before);
            return Err(e);
        }
        Ok(true)
    }

    /// Clears one region (invariant D2 is the caller's to check). Written
    /// without fsync: a lost clear only costs a later comparison.
    pub fn clear(&mut self, region: u64) -> Result<(), CaptureError> {
        if !self.is_marked(region) {
            return Ok(());
        }
        let w = (region / 64) as usize;
        self.bits[w] &= !(1 << (region % 64));
        self.write_words(w, w + 1)
    }

    /// Marked regions as merged `(offset, len)` byte ranges, clipped to the
    /// volume size `volume_size`.
    pub fn ranges(&self, volume_size: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for r in 0..self.regions {
            if !self.is_marked(r) {
                continue;
            }
            let start = r << REGION_SHIFT;
            let end = ((r + 1) << REGION_SHIFT).min(volume_size);
            match out.last_mut() {
                Some(last) if last.0 + last.1 == start => last.1 = end - last.0,
                _ => out.push((start, end - start)),
            }
        }
        out
    }

    /// Any region marked.
    pub fn any_marked(&self) -> bool {
        self.bits.iter().any(|w| *w != 0)
    }

    pub fn marked_count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// Reads a map file without opening it for writing (for `tandem dirty`).
pub fn read_ranges(path: &Path, volume_size: u64) -> Result<Vec<(u64, u64)>, CaptureError> {
    if !path.exists() {
        return Err(CaptureError::Io {
            path: path.to_owned(),
            op: "open dirty map",
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    }
    let map = DirtyMap::open(path, volume_size, true)?;
    Ok(map.ranges(volume_size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_survive_reopen_and_clears_are_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.dirty");
        let size = 64 * REGION_SIZE + 4096;
        let mut map = DirtyMap::open(&path, size, false).unwrap();
        assert_eq!(map.marked_count(), 0);
        assert!(map.mark(REGION_SIZE - 1, 2).unwrap()); // straddles 0 and 1
        assert!(!map.mark(10, 10).unwrap()); // already marked: nothing written
        assert!(map.mark(64 * REGION_SIZE, 4096).unwrap()); // the short tail region
        map.clear(0).unwrap();
        drop(map);
        let map = DirtyMap::open(&path, size, true).unwrap();
        assert_eq!(
            map.ranges(size),
            vec![(REGION_SIZE, REGION_SIZE), (64 * REGION_SIZE, 4096)]
        );
    }

    #[test]
    fn a_missing_map_for_an_existing_image_marks_everything() {
        let dir = tempfile::tempdir().unwrap();
        let size = 3 * REGION_SIZE;
        let map = DirtyMap::open(&dir.path().join("v.dirty"), size, true).unwrap();
        assert_eq!(map.ranges(size), vec![(0, size)]);
    }

    #[test]
    fn a_map_for_another_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.dirty");
        DirtyMap::open(&path, 8 * REGION_SIZE, false).unwrap();
        let err = DirtyMap::open(&path, 16 * REGION_SIZE, true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("v.dirty") && err.contains("33554432"), "{err}");
    }

    #[test]
    fn a_damaged_header_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.dirty");
        DirtyMap::open(&path, 8 * REGION_SIZE, false).unwrap();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[9], 17).unwrap();
        let err = DirtyMap::open(&path, 8 * REGION_SIZE, true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("checksum"), "{err}");
    }
}
