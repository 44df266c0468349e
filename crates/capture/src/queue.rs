//! The replication queue of a group: one FIFO in sequence order, its oldest
//! records on disk (the spill) and its newest in memory (docs/CAPTURE.md).
//! Which replica overflows, and when, is decided by the caller.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::group::Record;
use crate::spill::{Cursor, Spill, SpillError};

/// Segment size when the caller does not choose: `max_queue` / 16, within
/// these bounds.
const MIN_SEGMENT: u64 = 1 << 20;
const MAX_SEGMENT: u64 = 64 << 20;

/// Limits of a group's replication queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueOptions {
    /// `queue_memory`: records (payload plus a fixed overhead each) kept in
    /// memory.
    pub memory: u64,
    /// `max_queue`: memory plus spill files; past it the replica furthest
    /// behind overflows into dirty ranges. No larger than `memory`: no
    /// spill.
    pub max_queue: u64,
    /// A spill segment is closed at this size (0: `max_queue` / 16, within
    /// 1 to 64 MiB).
    pub segment_bytes: u64,
}

impl QueueOptions {
    /// Memory only: a replica more than `memory` behind overflows.
    pub fn memory_only(memory: u64) -> QueueOptions {
        QueueOptions {
            memory,
            max_queue: 0,
            segment_bytes: 0,
        }
    }

    /// `memory` in memory, then spill files up to `max_queue` in all.
    pub fn with_spill(memory: u64, max_queue: u64) -> QueueOptions {
        QueueOptions {
            memory,
            max_queue,
            segment_bytes: 0,
        }
    }

    fn spills(&self) -> bool {
        self.max_queue > self.memory
    }

    fn segment_bytes(&self) -> u64 {
        if self.segment_bytes > 0 {
            self.segment_bytes
        } else {
            (self.max_queue / 16).clamp(MIN_SEGMENT, MAX_SEGMENT)
        }
    }
}

/// What the queue needs after a record was added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pressure {
    Fits,
    /// Memory is full: move the oldest record to disk.
    Spill,
    /// Over the whole limit (or the spill cannot be written): the replica
    /// furthest behind must stop holding records.
    Overflow,
}

pub struct Queue {
    options: QueueOptions,
    memory: VecDeque<Arc<Record>>,
    memory_bytes: usize,
    spill: Spill,
    /// Appending failed: no spilling until the spill has drained.
    spill_failed: bool,
}

impl Queue {
    /// `dir`: where spill segments go; `base`: the instant capture times are
    /// stored relative to.
    pub fn new(dir: PathBuf, options: QueueOptions, base: Instant) -> Queue {
        Queue {
            options,
            memory: VecDeque::new(),
            memory_bytes: 0,
            spill: Spill::new(dir, options.segment_bytes(), base),
            spill_failed: false,
        }
    }

    pub fn push(&mut self, record: Arc<Record>) {
        self.memory_bytes += record.op.cost();
        self.memory.push_back(record);
    }

    pub fn pressure(&self) -> Pressure {
        let memory_limit = usize::try_from(self.options.memory).unwrap_or(usize::MAX);
        let over_memory = self.memory_bytes > memory_limit;
        if !self.options.spills() {
            return if over_memory {
                Pressure::Overflow
            } else {
                Pressure::Fits
            };
        }
        let total = (self.memory_bytes as u64).saturating_add(self.spill.bytes());
        if total > self.options.max_queue || (over_memory && self.spill_failed) {
            Pressure::Overflow
        } else if over_memory {
            Pressure::Spill
        } else {
            Pressure::Fits
        }
    }

    /// Moves the oldest record in memory to the spill. On error it stays in
    /// memory and the spill is not used again until it has drained.
    pub fn spill_oldest(&mut self) -> Result<(), SpillError> {
        let Some(record) = self.memory.front() else {
            return Ok(());
        };
        if let Err(e) = self.spill.append(record) {
            self.spill_failed = true;
            return Err(e);
        }
        if let Some(record) = self.memory.pop_front() {
            self.memory_bytes -= record.op.cost();
        }
        Ok(())
    }

    /// Drops every record below `floor` (whole spill segments); returns how
    /// many went. Released records from memory go to `released`, for the
    /// caller to free after it lets go of the queue's lock.
    pub fn trim_below_into(&mut self, floor: u64, released: &mut Vec<Arc<Record>>) -> u64 {
        let mut dropped = self.spill.trim_below(floor);
        if self.spill.is_empty() {
            self.spill_failed = false;
            while self.memory.front().is_some_and(|f| f.seq < floor) {
                if let Some(old) = self.memory.pop_front() {
                    self.memory_bytes -= old.op.cost();
                    released.push(old);
                    dropped += 1;
                }
            }
        }
        dropped
    }

    /// The first record with a sequence number of at least `seq`, from
    /// whichever tier holds it. `cursor` is the reader's place in the
    /// spill.
    pub fn next_from(
        &self,
        seq: u64,
        cursor: &mut Option<Cursor>,
    ) -> Result<Option<Arc<Record>>, SpillError> {
        if let Some(record) = self.spill.read_next(seq, cursor)? {
            return Ok(Some(Arc::new(record)));
        }
        let idx = self.memory.partition_point(|x| x.seq < seq);
        Ok(self.memory.get(idx).cloned())
    }

    /// Calls `f(volume, range)` for every record from `seq` on, oldest
    /// first (spilled records by their headers only).
    pub fn visit_from(
        &self,
        seq: u64,
        mut f: impl FnMut(u32, Option<(u64, u64)>),
    ) -> Result<(), SpillError> {
        self.spill.visit_from(seq, |h| f(h.volume, h.range()))?;
        for record in self.memory.iter().filter(|r| r.seq >= seq) {
            f(record.volume, record.op.range());
        }
        Ok(())
    }

    /// Bytes of changes queued after `acked`, and the capture time of the
    /// oldest of them.
    pub fn changes_after(&self, acked: u64) -> (u64, Option<Instant>) {
        let (mut bytes, mut oldest) = match self.spill.changes_after(acked) {
            Ok(found) => found,
            Err(e) => {
                tracing::debug!(error = %e, "spill unreadable: lag counted by whole segments");
                self.spill.changes_after_approx(acked)
            }
        };
        for record in self.memory.iter().filter(|r| r.seq > acked) {
            bytes += record.op.range().map_or(0, |(_, len)| len);
            oldest = oldest.or(Some(record.at));
        }
        (bytes, oldest)
    }

    pub fn memory_records(&self) -> usize {
        self.memory.len()
    }

    pub fn memory_bytes(&self) -> usize {
        self.memory_bytes
    }

    pub fn spilled_records(&self) -> u64 {
        self.spill.records()
    }

    pub fn spilled_bytes(&self) -> u64 {
        self.spill.bytes()
    }
}
