//! The local multi-site demonstration behind `tandem demo`: a witness and
//! three sites (ny, chicago, seattle) as child processes on loopback, in a
//! temporary directory. It writes through NBD while showing replication,
//! SIGKILLs the primary and measures the automatic failover (RTO, data
//! loss), verifies the data by checksum, brings the old primary back
//! (delta resync), migrates the group home with zero loss, and prints a
//! summary.
//!
//! The `tandem` binary only parses the command line, installs the signal
//! handlers, hands over its own executable (which the demo runs as
//! `tandem witness` and `tandem agent`) and prints the error. The parts:
//!
//! * [`run`] — the scenario, seven steps, returning a [`Summary`] (or,
//!   with [`Options::vm`], six steps and a [`VmSummary`]);
//! * [`cluster`] — the processes: start, SIGKILL, restart, stop, each
//!   site's status, bounded waits that name what did not happen;
//! * [`nbd`] — a minimal NBD client whose decoding of server replies
//!   never panics;
//! * [`writer`] — the application: a thread appending acknowledged records;
//! * [`Console`] — where the story is told, with progress redrawn in place
//!   on a terminal;
//! * [`vm`] — `tandem demo --vm`: the story with a real guest, a libvirt
//!   daemon per site (tandem-vmkit), `tandem protect`, host loss, the VM
//!   up at chicago with every acknowledged file.

#![forbid(unsafe_code)]

mod api;
pub mod cluster;
mod console;
mod error;
pub mod nbd;
mod scenario;
pub mod vm;
pub mod writer;

pub use api::ApiError;
pub use cluster::{bind_to_demo, Cluster, ProcName, SiteName, GROUP, VOLUME, VOLUME_SIZE};
pub use console::Console;
pub use error::{DemoError, NbdAction, VmAction, Wait};
pub use scenario::{run, Options, Report, Summary};
pub use vm::VmSummary;
