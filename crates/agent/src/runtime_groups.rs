//! Groups defined at runtime (docs/VMS.md): each in
//! `<data_dir>/groups/<group>.toml`, one `[[group]]` table, loaded at
//! start beside the configuration file's groups and checked the same way.

use std::path::PathBuf;

use tandem_config::Config;

use crate::{AgentError, Layout};

/// Adds every runtime group under `<data_dir>/groups/` to `config`, in
/// name order; a file that does not check out stops the agent with its
/// name, line and key.
pub fn load(layout: &Layout, config: &mut Config) -> Result<(), AgentError> {
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
        tracing::info!(group = %name, file = %file.display(), "group defined at runtime");
    }
    Ok(())
}
