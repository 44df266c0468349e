//! A view of a recovery point (docs/HISTORY.md, H2 and "Test views").

use std::sync::Arc;

use parking_lot::Mutex;

use super::ranges::RangeMap;
use super::{History, Point};
use crate::error::ReplicaError;

/// Where a range's content at the point is: zeroes, or the payload of an
/// undo entry that starts at log position `payload` and holds the volume
/// from offset `origin`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Src {
    pub zero: bool,
    pub payload: u64,
    pub origin: u64,
}

/// What a view shares with the committer: its point and, per volume,
/// where the point's content differs from the image.
pub(super) struct Overlay {
    pub point: Point,
    pub volumes: Vec<Mutex<RangeMap<Src>>>,
}

/// The volumes of a group as they were at a recovery point (G10).
pub struct PointView {
    pub(super) history: Arc<History>,
    pub(super) overlay: Arc<Overlay>,
    pub(super) sizes: Vec<u64>,
}

impl PointView {
    pub fn point(&self) -> Point {
        self.overlay.point
    }

    /// The group's volumes' sizes, by volume index.
    pub fn sizes(&self) -> &[u64] {
        &self.sizes
    }

    /// Reads `buf.len()` bytes of volume `volume` at `offset` as they
    /// were at the point.
    // Offsets within `buf` fit a usize.
    #[allow(clippy::cast_possible_truncation)]
    pub fn read(&self, volume: u32, offset: u64, buf: &mut [u8]) -> Result<(), ReplicaError> {
        let v = volume as usize;
        let (Some(map), Some(size), Some(image)) = (
            self.overlay.volumes.get(v),
            self.sizes.get(v),
            self.history.volumes.get(v),
        ) else {
            return Err(ReplicaError::NoSuchVolume {
                seq: 0,
                volume,
                volumes: self.sizes.len(),
            });
        };
        let end = offset.saturating_add(buf.len() as u64);
        if end > *size {
            return Err(ReplicaError::OutOfRange {
                seq: 0,
                volume: image.name.clone(),
                size: *size,
            });
        }
        let (covered, gaps) = {
            let m = map.lock();
            (m.covered(offset, end), m.gaps(offset, end))
        };
        for (s, e, src, _) in covered {
            self.fill(buf, offset, s, e, src)?;
        }
        if gaps.is_empty() {
            return Ok(());
        }
        for &(s, e) in &gaps {
            image
                .image
                .read(s, &mut buf[(s - offset) as usize..(e - offset) as usize])?;
        }
        // A commit adds its entries to the overlay before it writes the
        // images: whatever became covered while the image was read may
        // have been overwritten, and is read from the log instead.
        let late: Vec<_> = {
            let m = map.lock();
            gaps.iter().flat_map(|&(s, e)| m.covered(s, e)).collect()
        };
        for (s, e, src, _) in late {
            self.fill(buf, offset, s, e, src)?;
        }
        Ok(())
    }

    #[allow(clippy::cast_possible_truncation)] // offsets within `buf`
    fn fill(
        &self,
        buf: &mut [u8],
        offset: u64,
        s: u64,
        e: u64,
        src: Src,
    ) -> Result<(), ReplicaError> {
        let part = &mut buf[(s - offset) as usize..(e - offset) as usize];
        if src.zero {
            part.fill(0);
            return Ok(());
        }
        let at = src.payload + (s - src.origin);
        if !self.history.log.read().read_at(at, part)? {
            return Err(ReplicaError::Corrupt {
                path: self.history.dir.clone(),
                reason: format!(
                    "the history no longer holds position {at}, which the view of point {} needs",
                    self.overlay.point.seq
                ),
            });
        }
        Ok(())
    }
}
