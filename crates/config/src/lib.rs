//! Tandem's configuration: one site's TOML file (SPEC §4.1) turned into typed,
//! validated structs.
//!
//! ```no_run
//! # fn main() -> Result<(), tandem_config::ConfigError> {
//! let config = tandem_config::load(std::path::Path::new("/etc/tandem/tandem.toml"))?;
//! config.check_data_dir()?;
//! for group in config.groups_primary_here() {
//!     println!("{} is primary here", group.name);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Parsing happens in three steps:
//!
//! 1. the text is parsed once into an index of every key with its byte span
//!    (`raw::index`), which also reports TOML syntax errors;
//! 2. serde (`deny_unknown_fields`) reads it into raw structs whose values
//!    carry their spans and check their own syntax (names, addresses, sizes,
//!    rates, durations, schedules); a serde error's span is looked up in the
//!    index to name its key;
//! 3. `validate` applies defaults and checks everything that involves more
//!    than one value (duplicates, references to sites, sync replica counts,
//!    TLS-off-only-on-loopback).
//!
//! Every error is a [`ConfigError`] that prints as
//! `file:line:column: key.path[0].x: message`. The first error found is
//! reported. See `docs/CONFIG.md` for the reference of every key.

// `unsafe` only in `sys` (the local time zone, from the C library).
#![deny(unsafe_code)]

mod error;
mod model;
mod raw;
mod runtime;
pub use runtime::toml_string;
mod schedule;
#[allow(unsafe_code)]
mod sys;
mod units;
mod validate;

use std::path::{Path, PathBuf};

pub use error::{ConfigError, Location};
pub use model::{
    Api, Coordinator, CoordinatorKind, EtcdAccess, FailoverPolicy, Group, Libvirt, MetricsAuth,
    Mode, OnLostLease, OnPromoteFailure, OnSyncLoss, Peer, ReplicaSpec, Site, Tls, TlsMode,
    VolumeSpec,
};
pub use schedule::{local_weekday_minute, ScheduleWindow};
pub use units::{
    format_duration, format_rate, format_size, format_size_approx, parse_duration, parse_rate,
    parse_size, Rate, UnitError, UnitKind,
};

/// One site's validated configuration.
///
/// The public fields may be read freely; a `Config` can only be made by
/// [`load`] or [`parse`], which guarantee the invariants documented on each
/// helper.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The file this was read from (used in error messages).
    pub path: PathBuf,
    /// `[site]`.
    pub site: Site,
    /// `[tls]`.
    pub tls: Tls,
    /// `[coordinator]`.
    pub coordinator: Coordinator,
    /// `[libvirt]`.
    pub libvirt: Libvirt,
    /// `[api]`.
    pub api: Api,
    /// `[[peer]]`, in file order; names are unique and include `site.name`.
    pub peers: Vec<Peer>,
    /// `[[group]]`, in file order; group names and volume names are unique.
    pub groups: Vec<Group>,
    /// Where `site.data_dir` is in the file, for [`Config::check_data_dir`].
    data_dir_location: Location,
    /// The `[[peer]]` for this site as validated (fallback for `local_peer`).
    local: Peer,
}

/// Reads and validates the configuration file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Validates configuration `text`; `path` names the file in errors and is
/// the base for relative `data_dir` and TLS paths.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let entries = raw::index(text).map_err(|e| ConfigError::Syntax {
        file: path.to_path_buf(),
        location: e
            .span()
            .map_or(Location::START, |s| Location::of_offset(text, s.start)),
        message: one_line(e.message()),
    })?;
    let raw: raw::RawConfig =
        toml::from_str(text).map_err(|e| serde_error(&e, &entries, text, path))?;
    validate::build(raw, &entries, path, text)
}

fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// A serde error (unknown key, missing key, wrong type, bad value) with the
/// key it concerns, found from its span.
fn serde_error(
    e: &toml::de::Error,
    entries: &[raw::Entry],
    text: &str,
    path: &Path,
) -> ConfigError {
    let message = one_line(e.message());
    let span = e.span();
    let mut location = span
        .as_ref()
        .map_or(Location::START, |s| Location::of_offset(text, s.start));
    let (key, message) = if message.ends_with("expected a borrowed string") {
        // A `Spanned` value met a table made by dotted keys (`name.x = 1`):
        // serde reports the table's first key; name the table instead.
        let inner = span
            .as_ref()
            .and_then(|s| raw::path_for_span(entries, s))
            .map_or("", |x| x.path.as_str());
        let key = inner.rsplit_once('.').map_or(inner, |(parent, _)| parent);
        if let Some(s) = raw::span_of_path(entries, key) {
            location = Location::of_offset(text, s.start);
        }
        (
            key.to_string(),
            "invalid type: table (made by dotted keys)".to_string(),
        )
    } else if let Some(field) = backticked(&message, "missing field ") {
        // The span is the table's (or, for a table made by dotted keys, its
        // key's). Only an exact match names it: the root table has no entry.
        let parent = span
            .as_ref()
            .and_then(|s| raw::by_key_span(entries, s).or_else(|| raw::by_value_span(entries, s)))
            .map_or("", |x| x.path.as_str());
        let key = if parent.is_empty() {
            field.to_string()
        } else {
            format!("{parent}.{field}")
        };
        (key, "missing required key".to_string())
    } else {
        let key = span
            .as_ref()
            .and_then(|s| raw::path_for_span(entries, s))
            .map_or_else(String::new, |x| x.path.clone());
        let message = message
            .replacen("unknown field", "unknown key", 1)
            .replacen("unknown variant", "unknown value", 1)
            .replacen("invalid type: sequence", "invalid type: array", 1)
            .replacen("invalid type: map", "invalid type: table", 1)
            .replacen(
                "expected u32",
                "expected a whole number from 0 to 4294967295",
                1,
            );
        (key, message)
    };
    let key = if key.is_empty() {
        "(top level)".to_string()
    } else {
        key
    };
    ConfigError::Invalid {
        file: path.to_path_buf(),
        location,
        key,
        message,
    }
}

/// `x` from "<prefix>`x`...".
fn backticked<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = message.strip_prefix(prefix)?.strip_prefix('`')?;
    rest.split_once('`').map(|(x, _)| x)
}

impl Config {
    /// The `[[peer]]` entry of this site (`site.name`); validation
    /// guarantees it exists.
    pub fn local_peer(&self) -> &Peer {
        self.peers
            .iter()
            .find(|p| p.name == self.site.name)
            .unwrap_or(&self.local)
    }

    /// The `[[peer]]` named `name`.
    pub fn peer(&self, name: &str) -> Option<&Peer> {
        self.peers.iter().find(|p| p.name == name)
    }

    /// Groups whose configured `primary` is this site.
    pub fn groups_primary_here(&self) -> impl Iterator<Item = &Group> + '_ {
        self.groups
            .iter()
            .filter(move |g| g.primary == self.site.name)
    }

    /// Groups that list this site as a replica.
    pub fn groups_replica_here(&self) -> impl Iterator<Item = &Group> + '_ {
        self.groups
            .iter()
            .filter(move |g| g.replica(&self.site.name).is_some())
    }

    /// The group named `name`.
    pub fn group(&self, name: &str) -> Option<&Group> {
        self.groups.iter().find(|g| g.name == name)
    }

    /// The volume named `name` (volume names are unique across groups), with
    /// its group.
    pub fn volume(&self, name: &str) -> Option<(&Group, &VolumeSpec)> {
        self.groups
            .iter()
            .find_map(|g| g.volume(name).map(|v| (g, v)))
    }

    /// Where `site.data_dir` is written in the file.
    pub fn data_dir_location(&self) -> Location {
        self.data_dir_location
    }

    /// `<data_dir>/volumes/<volume>.img` (SPEC §4.2).
    pub fn volume_image_path(&self, volume: &str) -> PathBuf {
        self.site
            .data_dir
            .join("volumes")
            .join(format!("{volume}.img"))
    }

    /// `<data_dir>/nbd/<volume>.sock` (SPEC §4.2).
    pub fn nbd_socket_path(&self, volume: &str) -> PathBuf {
        self.site
            .data_dir
            .join("nbd")
            .join(format!("{volume}.sock"))
    }

    /// `<data_dir>/files/<group>` (SPEC §4.2): replicated files live below it
    /// under their absolute path.
    pub fn group_files_dir(&self, group: &str) -> PathBuf {
        self.site.data_dir.join("files").join(group)
    }

    /// `<data_dir>/api.token` (SPEC §4.2).
    pub fn api_token_path(&self) -> PathBuf {
        self.site.data_dir.join("api.token")
    }

    /// Checks that `site.data_dir` is a writable directory, creating it (and
    /// missing parents) with mode 0700 if it does not exist. Writability is
    /// tested by creating and removing a temporary file in it. Errors point
    /// at the `site.data_dir` line and carry the OS error.
    pub fn check_data_dir(&self) -> Result<(), ConfigError> {
        let dir = &self.site.data_dir;
        let fail = |message: String| ConfigError::Invalid {
            file: self.path.clone(),
            location: self.data_dir_location,
            key: "site.data_dir".to_string(),
            message,
        };
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(fail(format!(
                    "{} exists but is not a directory",
                    dir.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                create_private_dir(dir).map_err(|e| {
                    fail(format!(
                        "cannot create data directory {}: {e}",
                        dir.display()
                    ))
                })?;
            }
            Err(e) => {
                return Err(fail(format!(
                    "cannot use data directory {}: {e}",
                    dir.display()
                )))
            }
        }
        let probe = tempfile::Builder::new()
            .prefix(".tandem-write-check-")
            .tempfile_in(dir)
            .map_err(|e| {
                fail(format!(
                    "data directory {} is not writable: {e}",
                    dir.display()
                ))
            })?;
        probe.close().map_err(|e| {
            fail(format!(
                "cannot remove a test file in data directory {}: {e}",
                dir.display()
            ))
        })
    }
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

#[cfg(test)]
mod tests;
