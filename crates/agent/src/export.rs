//! A volume as an NBD export: reads go to the image, changes go through
//! the group's change capture.

use std::sync::Arc;

use tandem_capture::{CaptureError, GroupCapture, SyncOutcome};
use tandem_nbd::{Completion, ErrorCode, Export, ExportError, Extent, ZeroFlags};
use tandem_volume::VolumeError;

/// Most extents returned for one block-status request.
const MAX_EXTENTS: usize = 4096;

pub struct VolumeExport {
    capture: Arc<GroupCapture>,
    index: usize,
    name: String,
    size: u64,
    sync: Option<SyncPolicy>,
    gate: Arc<crate::gate::Gate>,
    /// The ownership epoch this export serves (told to clients in the
    /// export description, so a client can attribute every acknowledged
    /// write to an epoch).
    epoch: u64,
    /// Where its requests are counted (the metrics).
    stats: Option<Arc<tandem_nbd::stats::ExportStats>>,
}

/// Sync mode (SPEC G4): how many replicas must have each change before the
/// client hears back, and what to do when too few are connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncPolicy {
    pub replicas: usize,
    /// `on_sync_loss = "degrade"`: carry on asynchronously, loudly.
    pub degrade: bool,
}

/// Logged at most this often while a sync group waits or degrades.
const SYNC_WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

impl VolumeExport {
    pub fn new(capture: Arc<GroupCapture>, index: usize) -> VolumeExport {
        VolumeExport::with_sync(capture, index, None, Arc::new(crate::gate::Gate::open()))
    }

    pub fn with_sync(
        capture: Arc<GroupCapture>,
        index: usize,
        sync: Option<SyncPolicy>,
        gate: Arc<crate::gate::Gate>,
    ) -> VolumeExport {
        let volume = &capture.volumes()[index];
        let (name, size) = (volume.name.clone(), volume.image.size());
        VolumeExport {
            capture,
            index,
            name,
            size,
            sync,
            gate,
            epoch: 0,
            stats: None,
        }
    }

    /// Names the epoch in the export description.
    pub fn in_epoch(mut self, epoch: u64) -> VolumeExport {
        self.epoch = epoch;
        self
    }

    /// Counts its requests in the server's counters of this volume.
    pub fn counted_in(mut self, stats: &tandem_nbd::stats::Stats) -> VolumeExport {
        self.stats = Some(stats.export(&self.name));
        self
    }

    /// How the reply to change `seq` completes: at once, after the image
    /// is durable (`durable`: FLUSH or FUA), and in sync mode after enough
    /// replicas have it (durably, for FLUSH and FUA).
    fn completion(&self, seq: u64, durable: bool) -> Completion {
        if !durable && self.sync.is_none() {
            return Completion::Done;
        }
        let image = Arc::clone(self.capture.image(self.index));
        let capture = Arc::clone(&self.capture);
        let sync = self.sync;
        let gate = Arc::clone(&self.gate);
        Completion::Deferred(Box::new(move || {
            if durable {
                image.sync().map_err(volume_error)?;
            }
            let Some(policy) = sync else {
                return gate.pass();
            };
            match capture.wait_replicated(
                seq,
                policy.replicas,
                durable,
                policy.degrade,
                SYNC_WARN_EVERY,
            ) {
                SyncOutcome::Replicated => gate.pass(),
                SyncOutcome::Degraded => {
                    warn_degraded(&capture);
                    gate.pass()
                }
                SyncOutcome::Closing => Err(ExportError::new(
                    ErrorCode::Shutdown,
                    "agent stopping before the replicas confirmed this change",
                )),
            }
        }))
    }

    fn changed(
        &self,
        result: Result<u64, CaptureError>,
        fua: bool,
    ) -> Result<Completion, ExportError> {
        let seq = result.map_err(capture_error)?;
        // Checked again after the change: the acknowledgement is what
        // fencing must stop.
        self.gate.pass()?;
        Ok(self.completion(seq, fua))
    }
}

/// Says loudly, at most every few seconds, that a sync group runs async.
fn warn_degraded(capture: &GroupCapture) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if now >= LAST.load(Ordering::Relaxed) + SYNC_WARN_EVERY.as_secs() {
        LAST.store(now, Ordering::Relaxed);
        tracing::error!(
            group = capture.name(),
            connected = capture.connected_replicas(),
            "sync mode DEGRADED: too few replicas connected, writes are acknowledged without them (on_sync_loss = \"degrade\")"
        );
    }
}

impl Export for VolumeExport {
    fn name(&self) -> &str {
        &self.name
    }

    fn description(&self) -> String {
        format!(
            "Tandem volume {} of group {}, epoch {}",
            self.name,
            self.capture.name(),
            self.epoch
        )
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn stats(&self) -> Option<Arc<tandem_nbd::stats::ExportStats>> {
        self.stats.clone()
    }

    fn multi_conn(&self) -> bool {
        // Every connection writes the same file; fdatasync covers them all.
        true
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        self.capture
            .image(self.index)
            .read(offset, buf)
            .map_err(volume_error)
    }

    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> Result<bool, ExportError> {
        self.capture
            .image(self.index)
            .read_cached(offset, buf)
            .map_err(volume_error)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<Completion, ExportError> {
        self.gate.pass()?;
        self.changed(self.capture.write(self.index, offset, data, fua), fua)
    }

    fn write_owned(
        &self,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> Result<Completion, ExportError> {
        self.gate.pass()?;
        self.changed(self.capture.write_owned(self.index, offset, data, fua), fua)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<Completion, ExportError> {
        self.gate.pass()?;
        let result = self.capture.write_zeroes(
            self.index,
            offset,
            len,
            flags.no_hole,
            flags.fast,
            flags.fua,
        );
        self.changed(result, flags.fua)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<Completion, ExportError> {
        self.gate.pass()?;
        self.changed(self.capture.trim(self.index, offset, len, fua), fua)
    }

    fn flush(&self) -> Result<Completion, ExportError> {
        self.gate.pass()?;
        let seq = self.capture.flush(self.index).map_err(capture_error)?;
        Ok(self.completion(seq, true))
    }

    fn cache(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        self.capture.image(self.index).cache(offset, len);
        Ok(())
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        let runs = self
            .capture
            .image(self.index)
            .extents(offset, len, MAX_EXTENTS)
            .map_err(volume_error)?;
        Ok(runs
            .into_iter()
            .map(|(length, hole)| Extent {
                // Runs lie within one request, whose length is a u32.
                length: u32::try_from(length).unwrap_or(0xFFFF_FE00),
                flags: if hole {
                    tandem_nbd::proto::STATE_HOLE | tandem_nbd::proto::STATE_ZERO
                } else {
                    0
                },
            })
            .collect())
    }
}

fn volume_error(e: VolumeError) -> ExportError {
    let code = match &e {
        VolumeError::NoSpace { .. } => ErrorCode::NoSpace,
        VolumeError::SlowZero { .. } => ErrorCode::NotSupported,
        _ => ErrorCode::Io,
    };
    if code != ErrorCode::NotSupported {
        tracing::warn!("{e}");
    }
    ExportError::new(code, e.to_string())
}

fn capture_error(e: CaptureError) -> ExportError {
    match e {
        CaptureError::Volume(v) => volume_error(v),
        other => {
            tracing::error!("change capture failed: {other}");
            ExportError::new(ErrorCode::Io, other.to_string())
        }
    }
}
