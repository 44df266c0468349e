//! `tandem witness --listen ADDR --data-dir DIR`: the coordinator witness
//! at a third place (SPEC §2, §4.3). Sites renew their ownership leases
//! with it and claim groups through it; docs/WITNESS.md.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM};
use tandem_coordinator::witness;
use tracing::{error, info};

/// The witness's TLS: HTTPS with the sites' client certificates, from the
/// files `tandem certs create` writes (by default in the data directory).
#[derive(clap::Args, Debug)]
pub struct TlsArgs {
    /// "on" (HTTPS, sites prove their names with their certificates) or
    /// "off" (plain HTTP, accepted only on a loopback address)
    #[arg(long, value_name = "on|off", default_value = "on")]
    tls: TlsMode,
    /// The sites' CA certificate [default: DIR/ca.pem]
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// The witness's certificate [default: DIR/witness.pem]
    #[arg(long, value_name = "FILE")]
    cert: Option<PathBuf>,
    /// The witness's private key [default: DIR/witness.key]
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum TlsMode {
    On,
    Off,
}

/// How often the main thread looks for a signal or a failed witness.
const CHECK: Duration = Duration::from_millis(100);

/// Serves the witness until SIGTERM or SIGINT (exit 0), or until it can no
/// longer write its state (exit 1: restart it; it serves what is on disk).
pub fn run(listen: &str, data_dir: &Path, args: &TlsArgs) -> Result<()> {
    let tls = match args.tls {
        TlsMode::Off => {
            if args.ca.is_some() || args.cert.is_some() || args.key.is_some() {
                bail!("--tls off takes no --ca, --cert or --key");
            }
            None
        }
        TlsMode::On => {
            let file = |given: &Option<PathBuf>, name: &str| {
                given.clone().unwrap_or_else(|| data_dir.join(name))
            };
            let ca = file(&args.ca, tandem_tls::certs::CA_CERT);
            let cert = file(&args.cert, tandem_tls::certs::WITNESS_CERT);
            let key = file(&args.key, tandem_tls::certs::WITNESS_KEY);
            let tls = tandem_tls::https::WitnessTls::load(&ca, &cert, &key).with_context(|| {
                format!(
                    "the witness speaks HTTPS with the sites' certificates: it needs the CA ({}), \
                     its certificate ({}) and key ({}) from `tandem certs create` (or --ca, \
                     --cert, --key); plain HTTP is --tls off, on a loopback address only",
                    ca.display(),
                    cert.display(),
                    key.display()
                )
            })?;
            Some(tls)
        }
    };
    // Signals are taken before any thread starts, so none is lost. A
    // second signal while stopping ends the process at once.
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [SIGTERM, SIGINT] {
        signal_hook::flag::register_conditional_shutdown(signal, 1, Arc::clone(&stop))?;
        signal_hook::flag::register(signal, Arc::clone(&stop))?;
    }
    let options = witness::ServeOptions {
        tls,
        ..witness::ServeOptions::default()
    };
    let handle = witness::serve_options(listen, data_dir, Arc::clone(&stop), options)
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
