//! Groups defined at runtime (docs/VMS.md): each in
//! `<data_dir>/groups/<group>.toml`, one `[[group]]` table, loaded at
//! start beside the configuration file's groups and checked the same way.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tandem_config::{Config, ConfigError};

use crate::group::GroupRuntime;
use crate::rolefile::RoleRecord;
use crate::view::StatusView;
use crate::{AgentError, Layout, INITIAL_EPOCH};

/// Why a group could not be defined at runtime.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DefineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("site {site} is not part of group {group} (neither its primary nor a replica)")]
    NotMember { site: String, group: String },
    #[error(transparent)]
    Agent(#[from] AgentError),
}

/// Where a runtime group's definition lives.
pub fn path(layout: &Layout, group: &str) -> PathBuf {
    layout.data_dir.join("groups").join(format!("{group}.toml"))
}

/// Writes a runtime group's definition durably: temporary file, sync,
/// rename, directory sync (a crash leaves the old file or the new one).
pub fn store(layout: &Layout, group: &tandem_config::Group) -> Result<PathBuf, AgentError> {
    let path = path(layout, &group.name);
    let dir = layout.data_dir.join("groups");
    let io = |what: &'static str| {
        let path = path.clone();
        move |source| AgentError::Io { path, what, source }
    };
    std::fs::create_dir_all(&dir).map_err(io("create directory"))?;
    let tmp = path.with_extension("toml.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io("create"))?;
    f.write_all(group.to_toml().as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io("write"))?;
    std::fs::rename(&tmp, &path).map_err(io("rename"))?;
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync directory"))?;
    Ok(path)
}

impl StatusView {
    /// Defines a group at runtime from `text` (one `[[group]]` table):
    /// checked against this site's peers and groups, written under
    /// `<data_dir>/groups/`, opened in its role and, with a coordinator,
    /// decided for like every other group. Returns its name.
    pub(crate) fn define_group(&self, text: &str) -> Result<String, DefineError> {
        let _one_at_a_time = self.defining.lock();
        let shared = &self.shared;
        let mut config = (*shared.config()).clone();
        config.groups = self.groups.all().iter().map(|g| g.cfg.clone()).collect();
        let group = config
            .add_group(text, Path::new("(group definition)"))?
            .clone();
        if !group.involves(&shared.site) {
            return Err(DefineError::NotMember {
                site: shared.site.clone(),
                group: group.name,
            });
        }
        let file = store(&shared.layout, &group)?;
        let record = RoleRecord {
            primary: group.primary == shared.site,
            epoch: INITIAL_EPOCH,
            fork_epoch: 0,
            fork_seq: 0,
        };
        let name = group.name.clone();
        let rt = Arc::new(GroupRuntime::new(group));
        rt.open(shared, &record)?;
        self.groups.push(Arc::clone(&rt));
        if let Some(o) = &self.ownership {
            o.add(rt, &record)?;
        }
        tracing::info!(group = %name, file = %file.display(), "group defined at runtime");
        Ok(name)
    }
}

/// Why a group could not be removed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RemoveError {
    #[error("no group named {0:?} on this site")]
    NoSuchGroup(String),
    #[error(
        "group {0} is defined in the configuration file: remove it there (only groups defined \
         at runtime, by tandem protect or POST /api/v1/groups, are removed here)"
    )]
    InFile(String),
    #[error(transparent)]
    Agent(#[from] AgentError),
}

/// How long a removed group's role has to stop.
const REMOVE_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

impl StatusView {
    /// Removes a runtime group from this site: its ownership actor ends,
    /// its role stops (exports close, replication ends), and its
    /// definition, role record, journal, volume images and replicated
    /// files are deleted. The VM, if any, is left alone.
    pub(crate) fn remove_group(&self, name: &str) -> Result<(), RemoveError> {
        let _one_at_a_time = self.defining.lock();
        let shared = &self.shared;
        let layout = &shared.layout;
        let Some(rt) = self.groups.find(name) else {
            return Err(RemoveError::NoSuchGroup(name.to_owned()));
        };
        let file = path(layout, name);
        if !file.exists() {
            return Err(RemoveError::InFile(name.to_owned()));
        }
        if let Some(o) = &self.ownership {
            o.remove(name);
        }
        self.groups.remove(name);
        rt.stop_graceful(shared, REMOVE_GRACE)?;
        let mut doomed = vec![
            file,
            crate::rolefile::path(&layout.data_dir, name),
            layout.vm_definition(name),
            shared.vms.onboarding_marker(name),
            shared.vms.unprotect_marker(name),
        ];
        doomed.extend(rt.cfg.volumes.iter().map(|v| layout.image(&v.name)));
        for f in doomed {
            remove_if_there(&f, |p| std::fs::remove_file(p))?;
        }
        for d in [
            layout.capture_dir(name),
            layout.replica_dir(name),
            shared.config().group_files_dir(name),
        ] {
            remove_if_there(&d, |p| std::fs::remove_dir_all(p))?;
        }
        shared.vms.forget(name);
        tracing::info!(group = %name, "group removed from this site");
        Ok(())
    }
}

/// Removes `path` with `remove`; one that is not there is fine.
fn remove_if_there(
    path: &Path,
    remove: fn(&Path) -> std::io::Result<()>,
) -> Result<(), AgentError> {
    match remove(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(AgentError::Io {
            path: path.to_owned(),
            what: "remove",
            source,
        }),
    }
}

/// Adds every runtime group under `<data_dir>/groups/` to `config`, in
/// name order; a file that does not check out stops the agent with its
/// name, line and key.
pub fn load(layout: &Layout, config: &mut Config) -> Result<(), AgentError> {
    read(layout, config, true)
}

/// [`load`], logging each group found when `log` (at start, not at every
/// reload's check).
pub(crate) fn read(layout: &Layout, config: &mut Config, log: bool) -> Result<(), AgentError> {
    let dir = layout.data_dir.join("groups");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(AgentError::Io {
                path: dir,
                what: "read the runtime groups",
                source,
            })
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|source| AgentError::Io {
            path: file.clone(),
            what: "read a runtime group",
            source,
        })?;
        let name = config.add_group(&text, &file)?.name.clone();
        if log {
            tracing::info!(group = %name, file = %file.display(), "group defined at runtime");
        }
    }
    Ok(())
}

/// Defines the groups primaries send in the peer protocol (`Define`).
pub(crate) struct PeerDefiner(pub Arc<StatusView>);

/// Why a primary's definition was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PeerDefineError {
    #[error(transparent)]
    Define(#[from] DefineError),
    #[error("group {0} exists on this site with another definition")]
    Differs(String),
    #[error("this site serves group {0} as its primary: it is not removed from here")]
    Serving(String),
    #[error("site {site} (its certificate) is not a site of group {group}")]
    Stranger { site: String, group: String },
}

impl tandem_replication::receiver::GroupDefiner for PeerDefiner {
    fn define(
        &self,
        group: &str,
        definition: &str,
        peer_site: Option<&str>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let view = &self.0;
        // The definition as this site reads it, checked against its other
        // groups.
        let mut config = (*view.shared.config()).clone();
        config.groups = view
            .groups
            .all()
            .iter()
            .filter(|g| g.name() != group)
            .map(|g| g.cfg.clone())
            .collect();
        let parsed = config
            .add_group(definition, Path::new("(group definition)"))
            .map_err(DefineError::from)?
            .clone();
        if let Some(site) = peer_site {
            if !parsed.involves(site) {
                return Err(Box::new(PeerDefineError::Stranger {
                    site: site.to_owned(),
                    group: parsed.name,
                }));
            }
        }
        if let Some(existing) = view.groups.find(group) {
            if existing.cfg.to_toml() == parsed.to_toml() {
                return Ok(());
            }
            return Err(Box::new(PeerDefineError::Differs(group.to_owned())));
        }
        view.define_group(definition)
            .map(|_| ())
            .map_err(|e| Box::new(PeerDefineError::from(e)) as _)
    }

    fn retire(
        &self,
        group: &str,
        peer_site: Option<&str>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let view = &self.0;
        let Some(rt) = view.groups.find(group) else {
            return Ok(());
        };
        if let Some(site) = peer_site {
            if !rt.cfg.involves(site) {
                return Err(Box::new(PeerDefineError::Stranger {
                    site: site.to_owned(),
                    group: group.to_owned(),
                }));
            }
        }
        if rt.gate().is_some() {
            return Err(Box::new(PeerDefineError::Serving(group.to_owned())));
        }
        match view.remove_group(group) {
            Ok(()) | Err(RemoveError::NoSuchGroup(_)) => Ok(()),
            Err(e) => Err(Box::new(e)),
        }
    }
}
