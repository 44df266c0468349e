//! A replica's undo history (docs/HISTORY.md): the old data every write
//! overwrote, kept beside the latest image, and the recovery points it
//! makes readable (test views) and restorable (rollback).

pub mod entry;

use std::sync::Arc;
use std::time::Duration;

use crate::error::ReplicaError;

/// How much history a group keeps (docs/HISTORY.md, "Retention").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Points younger than this are kept (`retention`).
    pub keep: Duration,
    /// Past this many bytes of log the oldest history goes (`history_max`).
    pub max_bytes: u64,
}

/// A recovery point: the images held exactly the group's records up to
/// `seq` (of `epoch`), captured by the primary by `time_ms` (ms since the
/// Unix epoch, the primary's clock).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Point {
    pub epoch: u64,
    pub seq: u64,
    pub time_ms: u64,
    /// Where in the log the point is (docs/HISTORY.md, H2).
    pub pos: u64,
}

/// Which point a command means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PointChoice {
    /// The newest point.
    Latest,
    /// The newest point at or before this time (ms since the Unix epoch).
    AtOrBefore(u64),
}

/// The window of a group's history, for status and `tandem points`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub count: usize,
    pub oldest: Option<Point>,
    pub newest: Option<Point>,
    /// Bytes of log kept.
    pub bytes: u64,
    /// Bytes of log dropped because of `history_max` since the agent
    /// started.
    pub dropped_bytes: u64,
    /// Test views hold the log past `history_max`.
    pub held_over_cap: bool,
}

/// Why a point cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("no recovery point at or before {0} (the history's oldest point is later, or there is none yet)")]
    NoPoint(String),
    #[error(transparent)]
    Replica(#[from] ReplicaError),
}

/// A group's history, shared by its committer, its views and status.
pub struct History {
    _private: (),
}

impl History {
    /// Every point still in the window, oldest first.
    pub fn points(&self) -> Vec<Point> {
        Vec::new()
    }

    /// The window in numbers.
    pub fn summary(&self) -> Summary {
        Summary::default()
    }

    /// The point `choice` names.
    pub fn choose(&self, choice: PointChoice) -> Result<Point, HistoryError> {
        Err(HistoryError::NoPoint(format!("{choice:?}")))
    }

    /// Opens a read-only view of `point` that does not move while
    /// replication goes on; it holds the log from the point on until it
    /// is dropped.
    pub fn open_view(self: &Arc<Self>, point: Point) -> Result<PointView, HistoryError> {
        Err(HistoryError::NoPoint(format!("{point:?}")))
    }
}

/// The volumes of a group as they were at a recovery point (G10).
pub struct PointView {
    point: Point,
    sizes: Vec<u64>,
}

impl PointView {
    pub fn point(&self) -> Point {
        self.point
    }

    /// The group's volumes' sizes, by volume index.
    pub fn sizes(&self) -> &[u64] {
        &self.sizes
    }

    /// Reads `buf.len()` bytes of volume `volume` at `offset` as they
    /// were at the point.
    pub fn read(&self, volume: u32, offset: u64, buf: &mut [u8]) -> Result<(), ReplicaError> {
        let _ = (volume, offset, buf);
        Ok(())
    }
}
