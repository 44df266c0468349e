//! Groups defined at runtime (`tandem protect`, docs/VMS.md): one
//! `[[group]]` table in a file of its own, written by [`Group::to_toml`]
//! and read back by [`Config::add_group`] with the same checks as the
//! configuration file's groups, against this site's peers and the groups it
//! has already (errors name that file, its line and the key).

use std::fmt::Write as _;
use std::path::Path;

use serde::Deserialize;

use crate::error::{ConfigError, Location};
use crate::model::Group;
use crate::raw::{self, RawGroup};
use crate::units::{format_duration, format_size};
use crate::{one_line, serde_error, Config};

/// A runtime group's file: exactly one `[[group]]` table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroupFile {
    group: Vec<RawGroup>,
}

/// `s` as a TOML basic string (quoted and escaped), for writing group
/// tables.
pub fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl Group {
    /// This group as one `[[group]]` table, every value written out, so
    /// that [`Config::add_group`] reads back exactly this group.
    pub fn to_toml(&self) -> String {
        let mut t = String::from("[[group]]\n");
        let _ = writeln!(t, "name = {}", toml_string(&self.name));
        let _ = writeln!(t, "primary = {}", toml_string(&self.primary));
        let replicas: Vec<String> = self
            .replicas
            .iter()
            .map(|r| {
                format!(
                    "{{ site = {}, priority = {} }}",
                    toml_string(&r.site),
                    r.priority
                )
            })
            .collect();
        let _ = writeln!(t, "replicas = [ {} ]", replicas.join(", "));
        let _ = writeln!(t, "mode = {}", toml_string(self.mode.as_str()));
        let _ = writeln!(t, "sync_replicas = {}", self.sync_replicas);
        let _ = writeln!(t, "failover = {}", toml_string(self.failover.as_str()));
        let _ = writeln!(
            t,
            "max_lag_on_failover = {}",
            toml_string(&format_duration(self.max_lag_on_failover))
        );
        let volumes: Vec<String> = self
            .volumes
            .iter()
            .map(|v| {
                format!(
                    "{{ name = {}, size = {} }}",
                    toml_string(&v.name),
                    toml_string(&format_size(v.size))
                )
            })
            .collect();
        let _ = writeln!(t, "volumes = [ {} ]", volumes.join(", "));
        let files: Vec<String> = self
            .files
            .iter()
            .map(|f| toml_string(&f.display().to_string()))
            .collect();
        let _ = writeln!(t, "files = [ {} ]", files.join(", "));
        if let Some(h) = &self.on_promote {
            let _ = writeln!(t, "on_promote = {}", toml_string(h));
        }
        if let Some(h) = &self.on_demote {
            let _ = writeln!(t, "on_demote = {}", toml_string(h));
        }
        let _ = writeln!(
            t,
            "max_queue = {}",
            toml_string(&format_size(self.max_queue))
        );
        let _ = writeln!(
            t,
            "queue_memory = {}",
            toml_string(&format_size(self.queue_memory))
        );
        let _ = writeln!(
            t,
            "on_sync_loss = {}",
            toml_string(self.on_sync_loss.as_str())
        );
        let _ = writeln!(
            t,
            "on_lost_lease = {}",
            toml_string(self.on_lost_lease.as_str())
        );
        let _ = writeln!(
            t,
            "on_promote_failure = {}",
            toml_string(self.on_promote_failure.as_str())
        );
        let _ = writeln!(
            t,
            "retention = {}",
            toml_string(&format_duration(self.retention))
        );
        let _ = writeln!(
            t,
            "history_max = {}",
            toml_string(&format_size(self.history_max))
        );
        let _ = writeln!(
            t,
            "test_scratch_max = {}",
            toml_string(&format_size(self.test_scratch_max))
        );
        if let Some(vm) = &self.vm {
            let _ = writeln!(t, "vm = {}", toml_string(&format!("libvirt:{vm}")));
            let _ = writeln!(
                t,
                "vm_shutdown_timeout = {}",
                toml_string(&format_duration(self.vm_shutdown_timeout))
            );
        }
        t
    }
}

impl Config {
    /// Adds a group defined at runtime from `text` (one `[[group]]`
    /// table), read from `path`: checked like the file's groups, against
    /// this site's peers, and for names (group, volumes, VM) that no group
    /// of this site has yet.
    pub fn add_group(&mut self, text: &str, path: &Path) -> Result<&Group, ConfigError> {
        let entries = raw::index(text).map_err(|e| ConfigError::Syntax {
            file: path.to_path_buf(),
            location: e
                .span()
                .map_or(Location::START, |s| Location::of_offset(text, s.start)),
            message: one_line(e.message()),
        })?;
        let file: RawGroupFile =
            toml::from_str(text).map_err(|e| serde_error(&e, &entries, text, path))?;
        let groups = crate::validate::runtime_groups(
            &file.group,
            &entries,
            path,
            text,
            &self.peers,
            &self.groups,
        )?;
        let before = self.groups.len();
        self.groups.extend(groups);
        self.groups
            .get(before)
            .ok_or_else(|| ConfigError::invalid(path, text, &(0..0), "group", "no [[group]] table"))
    }

    /// Removes a group (`tandem unprotect`).
    pub fn remove_group(&mut self, name: &str) -> Option<Group> {
        let i = self.groups.iter().position(|g| g.name == name)?;
        Some(self.groups.remove(i))
    }
}
