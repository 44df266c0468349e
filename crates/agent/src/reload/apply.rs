//! Carries a reload [`Plan`] out on the running agent: peers into the
//! bandwidth planner, the new configuration into `Shared`, groups stopped
//! and opened the way `tandem unprotect` and `tandem protect` do it (their
//! data stays on disk), hook commands swapped. NBD clients of groups that
//! stay are never touched.

use std::sync::Arc;
use std::time::Duration;

use tandem_config::Config;
use tracing::{info, warn};

use super::{plan, Change, Plan};
use crate::view::StatusView;
use crate::AgentError;

/// How long a group removed by a reload has to stop.
const REMOVE_GRACE: Duration = Duration::from_secs(10);

/// Why a reload did not take effect (as a whole).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// One change or more cannot be made while the agent runs; each was
    /// logged. Nothing was applied.
    #[error("{0} change(s) refused; the running configuration is kept")]
    Refused(usize),
    /// The new file does not fit with the groups defined at runtime (under
    /// `<data_dir>/groups/`).
    #[error("the new configuration does not fit the groups defined at runtime: {0}")]
    Runtime(#[source] AgentError),
    /// The agent is stopping.
    #[error("the agent is stopping")]
    Stopping,
}

/// What a reload did.
#[derive(Debug, Default)]
pub struct Applied {
    /// The changes made.
    pub changes: usize,
    /// Changes that failed while being applied (logged); the others stand.
    pub failed: usize,
}

impl StatusView {
    /// Reloads from `running` (the file's configuration the agent runs
    /// with) to `new` (the file's configuration now). Returns the file
    /// configuration the agent now runs with, and what happened.
    pub(crate) fn reload(
        &self,
        running: &Config,
        new: Config,
    ) -> (Config, Result<Applied, ReloadError>) {
        let shared = &self.shared;
        let _one_at_a_time = self.defining.lock();
        if shared.stop.load(std::sync::atomic::Ordering::Acquire) {
            return (running.clone(), Err(ReloadError::Stopping));
        }
        let plan = plan(running, &new);
        let refused = plan.refused().count();
        if refused > 0 {
            for (what, why) in plan.refused() {
                warn!(change = what, "reload refused: {what}: {why}");
            }
            warn!(
                refused,
                "configuration not reloaded: the running configuration is kept"
            );
            return (running.clone(), Err(ReloadError::Refused(refused)));
        }
        // The new file with the runtime groups, checked together.
        let mut full = new.clone();
        if let Err(e) = crate::runtime_groups::read(&shared.layout, &mut full, false) {
            warn!("configuration not reloaded: {e}");
            return (running.clone(), Err(ReloadError::Runtime(e)));
        }
        if plan.is_empty() {
            info!("configuration reloaded: nothing changed");
            return (new, Ok(Applied::default()));
        }
        let mut now = new;
        let applied = self.carry_out(&plan, full, &mut now);
        info!(
            changes = applied.changes,
            failed = applied.failed,
            "configuration reloaded"
        );
        (now, Ok(applied))
    }

    /// Applies an accepted plan; `recorded` (the file's configuration)
    /// loses the groups that failed to open, so the next reload tries
    /// again.
    fn carry_out(&self, plan: &Plan, full: Config, recorded: &mut Config) -> Applied {
        let shared = &self.shared;
        let mut applied = Applied::default();
        // Peers first (a new group may ship to a new peer), then the
        // configuration that shippers and definitions read.
        for change in &plan.changes {
            match change {
                Change::AddPeer(p) => {
                    shared.bandwidth.upsert(p);
                    info!(peer = %p.name, address = %p.address, "reload: peer added");
                }
                Change::ChangePeerBandwidth(p) => {
                    shared.bandwidth.upsert(p);
                    info!(
                        peer = %p.name,
                        bandwidth = %p.bandwidth.map_or_else(|| "unlimited".to_owned(), |r| r.to_string()),
                        schedule = p.schedule.len(),
                        "reload: peer bandwidth changed"
                    );
                }
                Change::RemovePeer(name) => {
                    shared.bandwidth.remove(name);
                    info!(peer = %name, "reload: peer removed");
                }
                _ => continue,
            }
            applied.changes += 1;
        }
        *shared.config.write() = Arc::new(full);
        for change in &plan.changes {
            match change {
                Change::RemoveGroup(name) => {
                    if let Err(e) = self.stop_group(name) {
                        warn!(group = %name, "reload: removing the group: {e}");
                        applied.failed += 1;
                        continue;
                    }
                    info!(group = %name, "reload: group removed from this site (its data stays under data_dir)");
                }
                Change::AddGroup(group) => {
                    let opened = crate::startup::open_groups(
                        shared,
                        &self.groups,
                        self.ownership.clone(),
                        &[group],
                    );
                    if let Err(e) = opened {
                        warn!(group = %group.name, "reload: the new group did not open: {e}");
                        // Not running: the next reload tries again.
                        let _ = self.stop_group(&group.name);
                        recorded.remove_group(&group.name);
                        applied.failed += 1;
                        continue;
                    }
                    info!(group = %group.name, "reload: group added");
                }
                Change::ChangeHooks {
                    group,
                    on_promote,
                    on_demote,
                } => {
                    let Some(rt) = self.groups.find(group) else {
                        continue;
                    };
                    *rt.hooks.write() = crate::hooks::GroupHooks {
                        on_promote: on_promote.clone(),
                        on_demote: on_demote.clone(),
                    };
                    info!(group = %group, on_promote = ?on_promote, on_demote = ?on_demote, "reload: hooks changed");
                }
                Change::ChangeHistory {
                    group,
                    retention,
                    history_max,
                    test_scratch_max,
                } => {
                    // The new configuration is in `Shared` already: a
                    // replica role opened later and test views started
                    // from now on read it there.
                    if let Some(history) = self.groups.find(group).and_then(|rt| rt.history()) {
                        crate::history::set_retention(
                            &history,
                            tandem_replication::history::Retention {
                                keep: *retention,
                                max_bytes: *history_max,
                            },
                        );
                    }
                    info!(
                        group = %group,
                        retention = %tandem_config::format_duration(*retention),
                        history_max = %tandem_config::format_size(*history_max),
                        test_scratch_max = %tandem_config::format_size(*test_scratch_max),
                        "reload: history limits changed"
                    );
                }
                Change::Recorded(name) => {
                    info!(group = %name, "reload: group of other sites recorded");
                }
                _ => continue,
            }
            applied.changes += 1;
        }
        applied
    }

    /// Stops a group's ownership actor and role here, keeping its files.
    fn stop_group(&self, name: &str) -> Result<(), AgentError> {
        if let Some(o) = &self.ownership {
            o.remove(name);
        }
        match self.groups.remove(name) {
            Some(rt) => rt.stop_graceful(&self.shared, REMOVE_GRACE),
            None => Ok(()),
        }
    }
}
