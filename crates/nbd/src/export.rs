//! What the server serves: an [`Export`] is one block device, and a
//! [`Catalog`] finds exports by name during the handshake.

use std::sync::Arc;

use crate::error::ExportError;
use crate::stats::ExportStats;

/// Work that finishes an operation off the connection's reader thread
/// (making data durable, waiting for replicas). The reply is sent when it
/// returns.
pub type Deferred = Box<dyn FnOnce() -> Result<(), ExportError> + Send>;

/// How an operation that changed the export completes.
pub enum Completion {
    /// Finished: reply now.
    Done,
    /// Applied in order, but the reply must wait for this to finish.
    Deferred(Deferred),
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Completion::Done => f.write_str("Done"),
            Completion::Deferred(_) => f.write_str("Deferred"),
        }
    }
}

/// Flags of `NBD_CMD_WRITE_ZEROES`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    pub fua: bool,
    /// The area must stay allocated (no hole may be punched).
    pub no_hole: bool,
    /// Fail with ENOTSUP unless zeroing is faster than writing zeroes.
    pub fast: bool,
}

/// One run of blocks with the same `base:allocation` state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub length: u32,
    /// Bit 0: hole (unallocated); bit 1: reads as zeroes.
    pub flags: u32,
}

/// A block device served over NBD. Methods are called from several
/// connection threads at once. Offsets and lengths are validated against
/// [`Export::size`] before any method is called.
pub trait Export: Send + Sync {
    fn name(&self) -> &str;
    fn description(&self) -> String {
        String::new()
    }
    fn size(&self) -> u64;
    fn read_only(&self) -> bool {
        false
    }
    /// True when a flush on any connection makes durable the writes
    /// completed on every connection (NBD_FLAG_CAN_MULTI_CONN).
    fn multi_conn(&self) -> bool;

    /// Reads `buf.len()` bytes at `offset`, blocking on storage if needed.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError>;
    /// Reads without blocking on storage; `Ok(false)` means "not cached,
    /// call [`Export::read`] from a thread that may block".
    fn read_cached(&self, _offset: u64, _buf: &mut [u8]) -> Result<bool, ExportError> {
        Ok(false)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<Completion, ExportError>;
    /// [`Export::write`] of a payload the server read into a buffer of
    /// its own: an export that keeps a copy (a capture queue) may keep
    /// this buffer instead of copying it.
    fn write_owned(
        &self,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> Result<Completion, ExportError> {
        self.write(offset, &data, fua)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<Completion, ExportError>;
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<Completion, ExportError>;
    /// Orders a flush after every write completed so far; the returned
    /// completion makes them durable.
    fn flush(&self) -> Result<Completion, ExportError>;
    /// Prefetch hint (NBD_CMD_CACHE).
    fn cache(&self, offset: u64, len: u64) -> Result<(), ExportError>;
    /// Allocation status of `[offset, offset + len)`: at least one extent,
    /// consecutive from `offset`.
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError>;
    /// Where the requests served on this export are counted (shared by
    /// every connection to it); `None`: not counted anywhere.
    fn stats(&self) -> Option<Arc<ExportStats>> {
        None
    }
}

/// Finds exports by name during the handshake.
pub trait Catalog: Send + Sync {
    /// The export named `name`; the empty name asks for the default export.
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>>;
    /// Every export a client may list.
    fn list(&self) -> Vec<Arc<dyn Export>>;
}
