//! Ordered change capture for a group's volumes, its replication queue and
//! the persistent dirty-region map (docs/CAPTURE.md).

#![forbid(unsafe_code)]

pub mod dirty;
mod error;
pub mod fine;
mod frame;
mod group;
mod queue;
mod segfile;
pub mod seq;
mod spill;

pub use error::CaptureError;
pub use group::{
    CaptureStats, CaptureVolume, Event, GroupCapture, Lag, Listener, Op, Record, SyncOutcome,
};
pub use queue::QueueOptions;
