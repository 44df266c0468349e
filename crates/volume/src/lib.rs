//! Volume storage: the plain raw sparse image at
//! `<data_dir>/volumes/<volume>.img` and the system calls it needs.

pub mod fault;
pub mod file;
pub mod image;

pub use file::{BlockFile, OsFile};
pub use image::{RawImage, VolumeError};
