//! `tandem agent --config FILE`

use std::path::Path;

use anyhow::Result;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tandem_agent::Agent;
use tracing::info;

pub fn run(config_path: &Path) -> Result<()> {
    let config = crate::load_config(config_path)?;
    // Signals are taken before any thread starts, so none is lost.
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    let agent = Agent::start(&config)?;
    // Another agent with this site name ends this one (it fenced itself
    // already): the wait for a signal ends too.
    let waiting = signals.handle();
    agent.on_fatal(Box::new(move || waiting.close()));
    info!(site = %config.site.name, config = %config_path.display(), "agent running");
    if let Some(signal) = signals.forever().next() {
        info!(
            signal,
            "stopping: finishing requests in flight, then flushing"
        );
    }
    let fatal = agent.fatal();
    agent.shutdown()?;
    if let Some(why) = fatal {
        anyhow::bail!("{why}");
    }
    info!("agent stopped cleanly");
    Ok(())
}
