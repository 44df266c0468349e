//! A volume as an NBD export: reads go to the image, changes go through
//! the group's change capture.

use std::sync::Arc;

use tandem_capture::{CaptureError, GroupCapture};
use tandem_nbd::{Completion, ErrorCode, Export, ExportError, Extent, ZeroFlags};
use tandem_volume::VolumeError;

/// Most extents returned for one block-status request.
const MAX_EXTENTS: usize = 4096;

pub struct VolumeExport {
    capture: Arc<GroupCapture>,
    index: usize,
    name: String,
    size: u64,
}

impl VolumeExport {
    pub fn new(capture: Arc<GroupCapture>, index: usize) -> VolumeExport {
        let volume = &capture.volumes()[index];
        let (name, size) = (volume.name.clone(), volume.image.size());
        VolumeExport {
            capture,
            index,
            name,
            size,
        }
    }

    /// Replies once the image is durable.
    fn durable(&self) -> Completion {
        let image = Arc::clone(self.capture.image(self.index));
        Completion::Deferred(Box::new(move || image.sync().map_err(volume_error)))
    }

    fn changed(
        &self,
        result: Result<u64, CaptureError>,
        fua: bool,
    ) -> Result<Completion, ExportError> {
        result.map_err(capture_error)?;
        Ok(if fua {
            self.durable()
        } else {
            Completion::Done
        })
    }
}

impl Export for VolumeExport {
    fn name(&self) -> &str {
        &self.name
    }

    fn description(&self) -> String {
        format!(
            "Tandem volume {} of group {}",
            self.name,
            self.capture.name()
        )
    }

    fn size(&self) -> u64 {
        self.size
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
        self.changed(self.capture.write(self.index, offset, data, fua), fua)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<Completion, ExportError> {
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
        self.changed(self.capture.trim(self.index, offset, len, fua), fua)
    }

    fn flush(&self) -> Result<Completion, ExportError> {
        self.capture.flush(self.index).map_err(capture_error)?;
        Ok(self.durable())
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
