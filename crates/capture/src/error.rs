use std::io;
use std::path::PathBuf;

use tandem_volume::VolumeError;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    #[error("{path}: {reason}; the file is damaged (move it aside to let the agent rebuild it conservatively)")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: made for a volume of {found} bytes in {region}-byte regions, but the volume is {expected} bytes")]
    Mismatch {
        path: PathBuf,
        found: u64,
        expected: u64,
        region: u64,
    },
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error("no replica named {0:?} in this group")]
    UnknownReplica(String),
}

impl CaptureError {
    pub(crate) fn io<'a>(
        path: &'a std::path::Path,
        op: &'static str,
    ) -> impl FnOnce(io::Error) -> CaptureError + 'a {
        move |source| CaptureError::Io {
            path: path.to_owned(),
            op,
            source,
        }
    }
}
