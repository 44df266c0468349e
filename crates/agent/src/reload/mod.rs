//! Reloading the configuration file (SIGHUP, docs/CONFIG.md "Reload"):
//! [`plan`] compares the running configuration with the file as it reads
//! now and says what changes, without I/O; [`apply`] carries a plan out on
//! the running agent.
//!
//! What may change while the agent runs: peers (added, removed, their
//! `bandwidth` and `schedule`), groups (added, removed), the commands of
//! a group's `on_promote`/`on_demote`, and its history's `retention`,
//! `history_max` and `test_scratch_max` (not history on <-> off). Everything else is refused: the
//! site's name, data directory, listeners and TLS files, the coordinator,
//! libvirt and API settings, a peer's address, and every other key of an
//! existing group (its volumes and their sizes, sites, mode, failover
//! settings...). One refused change refuses the whole reload: the running
//! configuration stays as it is, and each refused change is reported.

pub(crate) mod apply;

use std::collections::BTreeSet;

use tandem_config::{Config, Group, Peer};

/// One difference between the running configuration and the new one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A new `[[peer]]`.
    AddPeer(Peer),
    /// A `[[peer]]` is gone (no group names it any more: validation).
    RemovePeer(String),
    /// A peer's `bandwidth` or `schedule` changed.
    ChangePeerBandwidth(Peer),
    /// A new group this site takes part in: opened in its configured role.
    AddGroup(Group),
    /// A group this site took part in is gone from the file: its role
    /// stops here (exports close, replication ends); its data stays.
    RemoveGroup(String),
    /// A group that does not involve this site came or went, or a group
    /// was renamed in a way that only the file records: nothing to run.
    Recorded(String),
    /// A group's hook commands changed (each `Some` -> `Some`).
    ChangeHooks {
        group: String,
        on_promote: Option<String>,
        on_demote: Option<String>,
    },
    /// A group's `retention`, `history_max` or `test_scratch_max` value
    /// changed (history stays on, or stays off): applied to the replica's
    /// history at once, to test views started from then on.
    ChangeHistory {
        group: String,
        retention: std::time::Duration,
        history_max: u64,
        test_scratch_max: u64,
    },
    /// A change the running agent cannot make.
    Refused { what: String, why: String },
}

/// The changes from one configuration to the next.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub changes: Vec<Change>,
}

impl Plan {
    /// The refused changes, as `(what, why)`.
    pub fn refused(&self) -> impl Iterator<Item = (&str, &str)> {
        self.changes.iter().filter_map(|c| match c {
            Change::Refused { what, why } => Some((what.as_str(), why.as_str())),
            _ => None,
        })
    }

    /// Whether the plan may be applied (nothing refused).
    pub fn acceptable(&self) -> bool {
        self.refused().next().is_none()
    }

    /// Nothing changes.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

const RESTART: &str = "needs a restart of the agent";

/// What changes from `old` (running) to `new` (the file now), both
/// validated configurations of the same file. Groups are compared by name,
/// peers by name.
pub fn plan(old: &Config, new: &Config) -> Plan {
    let mut out = Vec::new();
    let mut refuse = |what: String, why: &str| {
        out.push(Change::Refused {
            what,
            why: why.to_owned(),
        });
    };
    // The site itself.
    let (o, n) = (&old.site, &new.site);
    if o.name != n.name {
        refuse(
            format!("site.name {:?} -> {:?}", o.name, n.name),
            "a site's name is its identity (certificates, coordinator, peers); it changes only with a restart",
        );
    }
    if o.data_dir != n.data_dir {
        refuse(
            format!(
                "site.data_dir {} -> {}",
                o.data_dir.display(),
                n.data_dir.display()
            ),
            "the volumes and state live there; moving them needs a stopped agent",
        );
    }
    for (key, a, b) in [
        ("site.listen", Some(&o.listen), Some(&n.listen)),
        ("site.api", Some(&o.api), Some(&n.api)),
        (
            "site.nbd_listen",
            o.nbd_listen.as_ref(),
            n.nbd_listen.as_ref(),
        ),
    ] {
        if a != b {
            refuse(
                format!("{key} {} -> {}", show_opt(a), show_opt(b)),
                "listeners are bound at start; a new address needs a restart",
            );
        }
    }
    if (o.nbd_tls, o.nbd_insecure) != (n.nbd_tls, n.nbd_insecure) {
        refuse(
            "site.nbd_tls / site.nbd_insecure".to_owned(),
            "the TCP NBD listener's security is set at start; it needs a restart",
        );
    }
    if old.tls != new.tls {
        refuse(
            "[tls] (mode, ca, cert or key)".to_owned(),
            "the site's TLS identity is loaded at start and used by every link; it needs a restart",
        );
    }
    if old.coordinator != new.coordinator {
        refuse("[coordinator]".to_owned(), RESTART);
    }
    if old.libvirt != new.libvirt {
        refuse("[libvirt]".to_owned(), RESTART);
    }
    if old.api != new.api {
        refuse("[api]".to_owned(), RESTART);
    }
    // Peers.
    for p in &new.peers {
        match old.peer(&p.name) {
            None => out.push(Change::AddPeer(p.clone())),
            Some(was) if was.address != p.address => out.push(Change::Refused {
                what: format!("peer {} address {} -> {}", p.name, was.address, p.address),
                why:
                    "the link to a site keeps its address while the agent runs; it needs a restart"
                        .to_owned(),
            }),
            Some(was) if was.bandwidth != p.bandwidth || was.schedule != p.schedule => {
                out.push(Change::ChangePeerBandwidth(p.clone()));
            }
            Some(_) => {}
        }
    }
    for p in &old.peers {
        if new.peer(&p.name).is_none() {
            out.push(Change::RemovePeer(p.name.clone()));
        }
    }
    // Groups.
    let site = &new.site.name;
    for g in &new.groups {
        match old.group(&g.name) {
            None => {
                // A volume of a group being removed (or still running)
                // must not reappear under another group: its image would
                // change groups with its data.
                for v in &g.volumes {
                    if let Some((owner, _)) = old.volume(&v.name) {
                        if owner.name != g.name {
                            out.push(Change::Refused {
                                what: format!(
                                    "volume {} moves from group {} to group {}",
                                    v.name, owner.name, g.name
                                ),
                                why: "a volume keeps its group while the agent runs; remove the old group in one reload and add the new one in the next".to_owned(),
                            });
                        }
                    }
                }
                if g.involves(site) {
                    out.push(Change::AddGroup(g.clone()));
                } else {
                    out.push(Change::Recorded(g.name.clone()));
                }
            }
            Some(was) => group_changes(was, g, &mut out),
        }
    }
    for g in &old.groups {
        if new.group(&g.name).is_none() {
            if g.involves(&old.site.name) {
                out.push(Change::RemoveGroup(g.name.clone()));
            } else {
                out.push(Change::Recorded(g.name.clone()));
            }
        }
    }
    Plan { changes: out }
}

fn show_opt(s: Option<&String>) -> String {
    s.map_or_else(|| "(none)".to_owned(), Clone::clone)
}

/// The changes inside one group that stays.
fn group_changes(was: &Group, now: &Group, out: &mut Vec<Change>) {
    let name = &now.name;
    let mut refuse = |key: &str, detail: String, why: &str| {
        out.push(Change::Refused {
            what: format!("group {name} {key}{detail}"),
            why: why.to_owned(),
        });
    };
    // Volumes: sizes first (the common mistake), then the list.
    for v in &now.volumes {
        if let Some(w) = was.volume(&v.name) {
            if w.size != v.size {
                refuse(
                    &format!("volume {} size", v.name),
                    format!(
                        " {} -> {}",
                        tandem_config::format_size(w.size),
                        tandem_config::format_size(v.size)
                    ),
                    "a volume's size is fixed while it is served and replicated (every site's image has it); resizing is not supported by reload",
                );
            }
        }
    }
    let names =
        |g: &Group| -> BTreeSet<String> { g.volumes.iter().map(|v| v.name.clone()).collect() };
    let order = |g: &Group| -> Vec<String> { g.volumes.iter().map(|v| v.name.clone()).collect() };
    if names(was) != names(now) || order(was) != order(now) {
        refuse(
            "volumes",
            format!(" [{}] -> [{}]", order(was).join(", "), order(now).join(", ")),
            "a group's volumes are fixed while it runs (write order spans them all); it needs a restart on every site",
        );
    }
    let structural =
        "the group's sites and failover settings are fixed while it runs; it needs a restart";
    if was.primary != now.primary {
        refuse(
            "primary",
            format!(" {} -> {}", was.primary, now.primary),
            structural,
        );
    }
    if was.replicas != now.replicas {
        refuse("replicas", String::new(), structural);
    }
    for (key, changed) in [
        ("mode", was.mode != now.mode),
        ("sync_replicas", was.sync_replicas != now.sync_replicas),
        ("failover", was.failover != now.failover),
        (
            "max_lag_on_failover",
            was.max_lag_on_failover != now.max_lag_on_failover,
        ),
        ("files", was.files != now.files),
        ("max_queue", was.max_queue != now.max_queue),
        ("queue_memory", was.queue_memory != now.queue_memory),
        ("on_sync_loss", was.on_sync_loss != now.on_sync_loss),
        ("on_lost_lease", was.on_lost_lease != now.on_lost_lease),
        (
            "on_promote_failure",
            was.on_promote_failure != now.on_promote_failure,
        ),
        ("vm", was.vm != now.vm),
        (
            "vm_shutdown_timeout",
            was.vm_shutdown_timeout != now.vm_shutdown_timeout,
        ),
    ] {
        if changed {
            refuse(key, String::new(), structural);
        }
    }
    // Hooks: a command may change; a hook may not come or go (the group's
    // failover machine is set up knowing which hooks exist).
    let mut hooks_changed = false;
    for (key, a, b) in [
        ("on_promote", &was.on_promote, &now.on_promote),
        ("on_demote", &was.on_demote, &now.on_demote),
    ] {
        match (a, b) {
            (Some(a), Some(b)) if a != b => hooks_changed = true,
            (None, Some(_)) | (Some(_), None) => refuse(
                key,
                if a.is_none() { " added" } else { " removed" }.to_owned(),
                "the group's failover machine knows at start whether the hook exists; adding or removing one needs a restart (changing its command does not)",
            ),
            _ => {}
        }
    }
    if hooks_changed {
        out.push(Change::ChangeHooks {
            group: name.clone(),
            on_promote: now.on_promote.clone(),
            on_demote: now.on_demote.clone(),
        });
    }
    // History: its window and caps may change; switching it on or off
    // changes the replica's on-disk format (undo log or redo journal).
    if was.keeps_history() != now.keeps_history() {
        out.push(Change::Refused {
            what: format!(
                "group {name} retention {} -> {}",
                tandem_config::format_duration(was.retention),
                tandem_config::format_duration(now.retention)
            ),
            why: format!(
                "restart the agent to switch the history of group {name} on or off \
                 (the replica keeps an undo log with history, a redo journal without)"
            ),
        });
    } else if (was.retention, was.history_max, was.test_scratch_max)
        != (now.retention, now.history_max, now.test_scratch_max)
    {
        out.push(Change::ChangeHistory {
            group: name.clone(),
            retention: now.retention,
            history_max: now.history_max,
            test_scratch_max: now.test_scratch_max,
        });
    }
}

#[cfg(test)]
mod tests;
