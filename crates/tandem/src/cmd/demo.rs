//! `tandem demo [--vm] [--keep]`: the local multi-site demonstration, which lives
//! in `tandem-demo`. Here: the signals that stop it, and this executable,
//! which the demo runs as its witness and agents.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM};

pub fn run(keep: bool, vm: bool) -> Result<()> {
    // Ctrl-C (or SIGTERM) stops the children and cleans up; a second one
    // ends the demo at once (its children die with it, unless --keep).
    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(signal, 1, Arc::clone(&interrupted))?;
        signal_hook::flag::register(signal, Arc::clone(&interrupted))?;
    }
    let exe = std::env::current_exe().context("cannot find the tandem binary itself")?;
    let mut options = tandem_demo::Options::new(exe);
    options.keep = keep;
    options.vm = vm;
    options.interrupted = interrupted;
    tandem_demo::run(options)?;
    Ok(())
}
