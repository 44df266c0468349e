//! Ordered change capture for a group's volumes, its replication queue and
//! the persistent dirty-region map (docs/CAPTURE.md).

pub mod dirty;
mod error;
pub mod fine;
mod group;
pub mod seq;

pub use error::CaptureError;
pub use group::{CaptureStats, CaptureVolume, Event, GroupCapture, Lag, Op, Record, SyncOutcome};
