//! The tasks of replication: every group's sessions, on both sides, run as
//! tasks on one small runtime per process, so that threads do not grow
//! with the number of groups (docs/ARCHITECTURE.md, "Scale"). Work that
//! blocks (disk syncs, comparisons, waits for a lock) runs under
//! [`blocking`], which hands the worker's other tasks to another thread
//! meanwhile.

use std::sync::OnceLock;
use std::time::Duration;

use tokio::runtime::{Builder, Handle, Runtime};

/// Worker threads: enough for compression and hashing on a few cores.
const WORKERS: usize = 2;
/// Threads that stand in for workers busy in [`blocking`] work.
const MAX_BLOCKING: usize = 16;

/// The process's replication runtime, started on first use.
pub fn handle() -> &'static Handle {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            let workers =
                std::thread::available_parallelism().map_or(WORKERS, |n| n.get().clamp(WORKERS, 4));
            match Builder::new_multi_thread()
                .worker_threads(workers)
                .max_blocking_threads(MAX_BLOCKING)
                .thread_keep_alive(Duration::from_secs(2))
                .thread_name("repl")
                .enable_time()
                .build()
            {
                Ok(rt) => rt,
                // Without threads nothing replicates: there is no way on.
                Err(e) => panic!("cannot start the replication runtime: {e}"),
            }
        })
        .handle()
}

/// Runs `f`, which may block for a while (a disk sync, a wait), without
/// holding up the other tasks of the worker it runs on.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}
