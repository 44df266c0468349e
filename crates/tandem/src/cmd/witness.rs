//! `tandem witness --listen ADDR --data-dir DIR`: the coordinator witness
//! at a third place (SPEC §2, §4.3). Sites renew their ownership leases
//! with it and claim groups through it; docs/WITNESS.md.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM};
use tandem_coordinator::witness;
use tracing::{error, info};

/// How often the main thread looks for a signal or a failed witness.
const CHECK: Duration = Duration::from_millis(100);

/// Serves the witness until SIGTERM or SIGINT (exit 0), or until it can no
/// longer write its state (exit 1: restart it; it serves what is on disk).
pub fn run(listen: &str, data_dir: &Path) -> Result<()> {
    // Signals are taken before any thread starts, so none is lost. A
    // second signal while stopping ends the process at once.
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [SIGTERM, SIGINT] {
        signal_hook::flag::register_conditional_shutdown(signal, 1, Arc::clone(&stop))?;
        signal_hook::flag::register(signal, Arc::clone(&stop))?;
    }
    let handle = witness::serve(listen, data_dir, Arc::clone(&stop))
        .with_context(|| format!("cannot start the witness on {listen}"))?;
    info!(
        listen = %handle.local_addr(),
        data_dir = %data_dir.display(),
        witness_id = handle.witness_id(),
        "witness running"
    );
    while !stop.load(Ordering::Acquire) {
        if let Some(reason) = handle.failure() {
            error!("witness failed: {reason}");
            handle.shutdown();
            bail!("witness failed: {reason}");
        }
        std::thread::sleep(CHECK);
    }
    info!("stopping: answering no more requests");
    handle.shutdown();
    info!("witness stopped cleanly");
    Ok(())
}
