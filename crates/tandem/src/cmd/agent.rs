//! `tandem agent --config FILE`

use std::path::Path;

use anyhow::Result;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tandem_agent::Agent;
use tracing::{info, warn};

pub fn run(config_path: &Path) -> Result<()> {
    let config = crate::load_config(config_path)?;
    // Signals are taken before any thread starts, so none is lost (and
    // SIGHUP never ends the agent: it reloads the configuration).
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let agent = Agent::start(&config)?;
    // Another agent with this site name ends this one (it fenced itself
    // already): the wait for a signal ends too.
    let waiting = signals.handle();
    agent.on_fatal(Box::new(move || waiting.close()));
    info!(site = %config.site.name, config = %config_path.display(), "agent running");
    for signal in signals.forever() {
        if signal == SIGHUP {
            reload(&agent, config_path);
            continue;
        }
        info!(
            signal,
            "stopping: finishing requests in flight, then flushing"
        );
        break;
    }
    let fatal = agent.fatal();
    agent.shutdown()?;
    if let Some(why) = fatal {
        anyhow::bail!("{why}");
    }
    info!("agent stopped cleanly");
    Ok(())
}

/// SIGHUP: reads the file again and applies what may change while the
/// agent runs; a file that does not check out changes nothing.
fn reload(agent: &Agent, config_path: &Path) {
    info!(config = %config_path.display(), "SIGHUP: reloading the configuration");
    match tandem_config::load(config_path) {
        Ok(new) => {
            // The agent logs what it did, and each refused change.
            let _ = agent.reload(new);
        }
        Err(e) => warn!("configuration not reloaded (the running configuration is kept): {e}"),
    }
}
