//! Configuration files of a group (its `files`), replicated beside its
//! volumes: watched on the primary, written atomically on replicas under
//! `<data_dir>/files/<group>/<absolute path>` (SPEC §4.2).
//!
//! A group that protects a VM also ships the VM's definition
//! (`<data_dir>/vms/<group>.xml` on every site) the same way, under the
//! reserved name [`VM_DEFINITION`] (not an absolute path, so no configured
//! file can take it).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;

/// Files larger than this are not replicated (they are configuration):
/// the peer protocol's bound on a `File` (docs/PEER.md, "Bounds").
pub const MAX_FILE: u64 = tandem_peer::MAX_FILE as u64;
/// How often the primary looks at its files.
pub const POLL: Duration = Duration::from_millis(250);
/// The name a VM's definition travels under (docs/PEER.md, `File`).
pub const VM_DEFINITION: &str = "tandem:vm-definition";

/// A file the primary watches: where it is here, and the name it is sent
/// under (its absolute path, or [`VM_DEFINITION`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watched {
    pub local: PathBuf,
    pub name: PathBuf,
}

impl Watched {
    /// A configured file: sent under its own path.
    pub fn file(path: &Path) -> Watched {
        Watched {
            local: path.to_owned(),
            name: path.to_owned(),
        }
    }

    /// A VM's definition kept at `local`.
    pub fn vm_definition(local: &Path) -> Watched {
        Watched {
            local: local.to_owned(),
            name: PathBuf::from(VM_DEFINITION),
        }
    }
}

/// The latest content of each watched file, with a version that grows on
/// every change.
#[derive(Default)]
pub struct FileSet {
    inner: Mutex<BTreeMap<PathBuf, FileVersion>>,
}

#[derive(Clone)]
pub struct FileVersion {
    pub version: u64,
    pub mode: u32,
    pub content: Arc<Vec<u8>>,
    /// (mtime, size, inode) last seen.
    stamp: (SystemTime, u64, u64),
}

impl FileSet {
    /// Files whose version is newer than in `sent`.
    pub fn changed_since(&self, sent: &BTreeMap<PathBuf, u64>) -> Vec<(PathBuf, FileVersion)> {
        self.inner
            .lock()
            .iter()
            .filter(|(p, v)| sent.get(*p).is_none_or(|s| *s < v.version))
            .map(|(p, v)| (p.clone(), v.clone()))
            .collect()
    }

    /// Reads each file whose metadata changed. Returns how many changed.
    pub fn poll(&self, files: &[Watched]) -> usize {
        let mut changed = 0;
        for Watched { local: path, name } in files {
            let Ok(meta) = std::fs::metadata(path) else {
                continue; // gone: the replicas keep the last copy
            };
            let stamp = (
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                meta.len(),
                meta.ino(),
            );
            if self
                .inner
                .lock()
                .get(name)
                .is_some_and(|v| v.stamp == stamp)
            {
                continue;
            }
            if meta.len() > MAX_FILE {
                tracing::warn!(file = %path.display(), size = meta.len(), "not replicating a file over 16 MiB");
                continue;
            }
            let mut content = Vec::new();
            if let Err(e) = File::open(path).and_then(|mut f| f.read_to_end(&mut content)) {
                tracing::warn!(file = %path.display(), "cannot read file to replicate: {e}");
                continue;
            }
            let mut inner = self.inner.lock();
            let version = inner.get(name).map_or(1, |v| v.version + 1);
            inner.insert(
                name.clone(),
                FileVersion {
                    version,
                    mode: meta.mode() & 0o7777,
                    content: Arc::new(content),
                    stamp,
                },
            );
            changed += 1;
        }
        changed
    }
}

/// Polls `paths` into `set` until `stop`.
pub fn watch(
    paths: Vec<Watched>,
    set: Arc<FileSet>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new().name("files".into()).spawn(move || {
        while !stop.load(Ordering::Acquire) {
            set.poll(&paths);
            thread::sleep(POLL);
        }
    })
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("file {0:?} is not one of the group's configured files")]
    NotConfigured(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where a replicated copy of `source` lives under `files_dir`.
pub fn copy_path(files_dir: &Path, source: &Path) -> Option<PathBuf> {
    let mut out = files_dir.to_path_buf();
    for c in source.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(part) => out.push(part),
            _ => return None, // relative, `..` or `.`: refused
        }
    }
    source.is_absolute().then_some(out)
}

/// Writes a replicated file atomically (temporary file, fsync, rename,
/// fsync of the directory). Only configured paths are accepted.
pub fn store(
    files_dir: &Path,
    allowed: &[PathBuf],
    path: &str,
    mode: u32,
    data: &[u8],
) -> Result<PathBuf, FileError> {
    let source = PathBuf::from(path);
    if !allowed.contains(&source) {
        return Err(FileError::NotConfigured(path.to_owned()));
    }
    let target =
        copy_path(files_dir, &source).ok_or_else(|| FileError::NotConfigured(path.to_owned()))?;
    store_at(&target, mode, data)?;
    Ok(target)
}

/// Writes `data` to `target` atomically (temporary file, fsync, rename,
/// fsync of the directory), creating its directory.
pub fn store_at(target: &Path, mode: u32, data: &[u8]) -> Result<(), FileError> {
    let io = |p: &Path| {
        let p = p.to_owned();
        move |source| FileError::Io { path: p, source }
    };
    let dir = target.parent().unwrap_or(Path::new("/")).to_owned();
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let tmp = dir.join(format!(
        ".{}.tandem-tmp",
        target
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode & 0o777)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(io(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, target).map_err(io(target))?;
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io(&dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_land_under_the_group_directory_and_only_configured_paths_are_taken() {
        let dir = tempfile::tempdir().unwrap();
        let allowed = vec![PathBuf::from("/etc/libvirt/qemu/web01.xml")];
        let at = store(
            dir.path(),
            &allowed,
            "/etc/libvirt/qemu/web01.xml",
            0o640,
            b"<domain/>",
        )
        .unwrap();
        assert_eq!(at, dir.path().join("etc/libvirt/qemu/web01.xml"));
        assert_eq!(std::fs::read(&at).unwrap(), b"<domain/>");
        assert_eq!(std::fs::metadata(&at).unwrap().mode() & 0o777, 0o640);
        for bad in [
            "/etc/passwd",
            "/etc/libvirt/qemu/../../passwd",
            "relative.xml",
        ] {
            assert!(
                store(dir.path(), &allowed, bad, 0o644, b"x").is_err(),
                "{bad} accepted"
            );
        }
        assert!(copy_path(dir.path(), Path::new("/a/../b")).is_none());
    }

    #[test]
    fn changes_get_new_versions() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("vm.xml");
        std::fs::write(&f, "one").unwrap();
        let set = FileSet::default();
        assert_eq!(set.poll(&[Watched::file(&f)]), 1);
        assert_eq!(set.poll(&[Watched::file(&f)]), 0);
        let sent: BTreeMap<PathBuf, u64> = set
            .changed_since(&BTreeMap::new())
            .into_iter()
            .map(|(p, v)| (p, v.version))
            .collect();
        assert!(set.changed_since(&sent).is_empty());
        // An editor's rename-replace: new inode.
        std::fs::write(dir.path().join("tmp"), "two!").unwrap();
        std::fs::rename(dir.path().join("tmp"), &f).unwrap();
        assert_eq!(set.poll(&[Watched::file(&f)]), 1);
        let changed = set.changed_since(&sent);
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].1.content.as_slice(), b"two!");
    }
}
