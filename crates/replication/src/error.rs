use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    #[error("{path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(transparent)]
    Volume(#[from] tandem_volume::VolumeError),
    #[error("record {seq} for volume index {volume}, but the group has {volumes} volume(s)")]
    NoSuchVolume {
        seq: u64,
        volume: u32,
        volumes: usize,
    },
    #[error("record {seq} reaches past the end of volume {volume} ({size} bytes)")]
    OutOfRange { seq: u64, volume: String, size: u64 },
    #[error("record {seq}: {source}")]
    Payload {
        seq: u64,
        source: tandem_peer::PeerError,
    },
    #[error("{count} chunks of {chunk} bytes: a chunk is a power of two from 4096 to 1048576, at most 1024 of them at once")]
    BadChunks { chunk: u32, count: usize },
    #[error("cannot start the thread that reads the image for a compare: {0}")]
    Spawn(#[source] io::Error),
    #[error("the thread reading the image for a compare stopped without an answer")]
    ReaderGone,
}
