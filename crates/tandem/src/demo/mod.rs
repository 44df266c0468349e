//! `tandem demo`'s parts: the processes it runs, a minimal NBD client, the
//! writer that plays the application, and progress output. The flow
//! itself is `cmd::demo`.

pub mod cluster;
pub mod nbd;
pub mod progress;
pub mod writer;
