//! Volume storage: the plain raw sparse image at
//! `<data_dir>/volumes/<volume>.img` and the system calls it needs.

#![forbid(unsafe_code)]

pub mod aligned;
pub mod fault;
pub mod file;
pub mod image;

pub use aligned::AlignedBuf;
pub use file::{BlockFile, Fallocate, OsFile, Seek, DIRECT_ALIGN};
pub use image::{RawImage, VolumeError};
