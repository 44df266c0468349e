//! `tandem check --config FILE`: everything the agent checks at start that
//! needs no start — the file (syntax, keys, values, references, with
//! file:line:column and key), the groups defined at runtime under
//! `data_dir`, the data directory (usable, without creating it), the TLS
//! files (readable, a key that matches, a certificate naming this site),
//! etcd's credential files, and the listen addresses. Nothing is written.

use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};

use tandem_config::{Config, TlsMode};

/// One problem found, with where in the file it is.
#[derive(Debug, PartialEq, Eq)]
pub struct Finding {
    /// `file:line:column` or `file` when the key is not written in it.
    pub at: String,
    /// The dotted key (`tls.cert`).
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}: {}", self.at, self.key, self.message)
    }
}

/// Runs the checks; prints `ok` (stdout) or every problem (stderr).
/// Whether the configuration is fine.
pub fn run(path: &Path) -> bool {
    match check(path) {
        Ok(()) => {
            println!("ok");
            true
        }
        Err(findings) => {
            for f in &findings {
                eprintln!("error: {f}");
            }
            false
        }
    }
}

fn check(path: &Path) -> Result<(), Vec<String>> {
    // The file itself: the first error, with file:line:column and key.
    let config = tandem_config::load(path).map_err(|e| vec![e.to_string()])?;
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let at = |section: &str, key: &str| match key_line(&text, section, key) {
        Some(line) => format!("{}:{line}", path.display()),
        None => path.display().to_string(),
    };
    let mut found: Vec<Finding> = Vec::new();
    let mut report = |section: &str, key: &str, message: String| {
        let dotted = if section.is_empty() {
            key.to_owned()
        } else {
            format!("{section}.{key}")
        };
        found.push(Finding {
            at: at(section, key),
            key: dotted,
            message,
        });
    };
    if let Err(message) = data_dir_usable(&config.site.data_dir) {
        report("site", "data_dir", message);
    } else {
        // The groups `tandem protect` defined, as the agent loads them.
        let mut with_runtime = config.clone();
        if let Err(e) = tandem_agent::load_runtime_groups(
            &tandem_agent::Layout::new(&config.site.data_dir),
            &mut with_runtime,
        ) {
            report(
                "site",
                "data_dir",
                format!("a group defined at runtime: {e}"),
            );
        }
    }
    tls(&config, &mut report);
    etcd_files(&config, &mut report);
    let mut listeners = vec![
        ("listen", Some(config.site.listen.clone())),
        ("api", Some(config.site.api.clone())),
        ("nbd_listen", config.site.nbd_listen.clone()),
    ];
    for (key, addr) in listeners.drain(..) {
        let Some(addr) = addr else { continue };
        match addr.to_socket_addrs().map(|mut a| a.next()) {
            Ok(Some(_)) => {}
            Ok(None) => report("site", key, format!("{addr} resolves to no address")),
            Err(e) => report("site", key, format!("{addr}: {e}")),
        }
    }
    if found.is_empty() {
        Ok(())
    } else {
        Err(found.iter().map(ToString::to_string).collect())
    }
}

/// The data directory exists as a writable directory, or can be created
/// (its nearest existing parent is a writable directory). Nothing is
/// created or written.
fn data_dir_usable(dir: &Path) -> Result<(), String> {
    let writable = |d: &Path| {
        rustix::fs::access(
            d,
            rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK,
        )
        .map_err(|e| format!("{} is not writable: {e}", d.display()))
    };
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => writable(dir),
        Ok(_) => Err(format!("{} exists but is not a directory", dir.display())),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            let mut parent: Option<PathBuf> = dir.parent().map(Path::to_path_buf);
            while let Some(p) = parent {
                match std::fs::metadata(&p) {
                    Ok(m) if m.is_dir() => {
                        return writable(&p).map_err(|e| {
                            format!(
                                "{} does not exist and cannot be created: {e}",
                                dir.display()
                            )
                        })
                    }
                    Ok(_) => return Err(format!("{} is not a directory", p.display())),
                    Err(_) => parent = p.parent().map(Path::to_path_buf),
                }
            }
            Err(format!("{} cannot be created", dir.display()))
        }
        Err(e) => Err(format!("cannot use {}: {e}", dir.display())),
    }
}

fn tls(config: &Config, report: &mut impl FnMut(&str, &str, String)) {
    if config.tls.mode == TlsMode::Off {
        return;
    }
    let t = &config.tls;
    let mut all = true;
    for (key, file) in [("ca", &t.ca), ("cert", &t.cert), ("key", &t.key)] {
        match file {
            None => {
                report("tls", key, "missing (TLS is on)".to_owned());
                all = false;
            }
            Some(f) => {
                if let Err(e) = std::fs::File::open(f) {
                    report("tls", key, format!("cannot read {}: {e}", f.display()));
                    all = false;
                }
            }
        }
    }
    let (Some(ca), Some(cert), Some(key), true) = (&t.ca, &t.cert, &t.key, all) else {
        return;
    };
    match tandem_tls::TlsIdentity::load(ca, cert, key) {
        Ok(id) if id.site() != config.site.name => report(
            "tls",
            "cert",
            format!(
                "{} is the certificate of site {:?}, not of this site {:?}",
                cert.display(),
                id.site(),
                config.site.name
            ),
        ),
        Ok(_) => {}
        Err(e) => report("tls", "cert", e.to_string()),
    }
}

fn etcd_files(config: &Config, report: &mut impl FnMut(&str, &str, String)) {
    if config.coordinator.kind != tandem_config::CoordinatorKind::Etcd {
        return;
    }
    let e = &config.coordinator.etcd;
    for (key, file) in [
        ("etcd_ca", &e.ca),
        ("etcd_cert", &e.cert),
        ("etcd_key", &e.key),
        ("etcd_password_file", &e.password_file),
    ] {
        if let Some(f) = file {
            if let Err(err) = std::fs::File::open(f) {
                report(
                    "coordinator",
                    key,
                    format!("cannot read {}: {err}", f.display()),
                );
            }
        }
    }
}

/// The 1-based line where `key` is set in table `[section]` of `text`
/// (`section` empty: the top level).
fn key_line(text: &str, section: &str, key: &str) -> Option<usize> {
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if let Some(header) = l.strip_prefix('[') {
            current = header
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim()
                .to_owned();
            continue;
        }
        if current == section {
            if let Some(rest) = l.strip_prefix(key) {
                if rest.trim_start().starts_with('=') {
                    return Some(i + 1);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_line_finds_a_key_in_its_table() {
        let text = "[site]\nname = \"ny\"\n\n[tls]\n# cert = \"x\"\nca = \"a\"\ncert = \"b\"\n[[peer]]\ncert = 1\n";
        assert_eq!(key_line(text, "tls", "cert"), Some(7));
        assert_eq!(key_line(text, "tls", "ca"), Some(6));
        assert_eq!(key_line(text, "site", "name"), Some(2));
        assert_eq!(key_line(text, "site", "cert"), None);
        assert_eq!(key_line(text, "tls", "certificate"), None);
    }

    #[test]
    fn a_missing_data_dir_under_a_writable_parent_is_usable_and_not_created() {
        let d = tempfile::tempdir().expect("tempdir");
        let dir = d.path().join("a/b/c");
        assert_eq!(data_dir_usable(&dir), Ok(()));
        assert!(!d.path().join("a").exists(), "nothing created");
        let file = d.path().join("f");
        std::fs::write(&file, b"").expect("write");
        assert!(data_dir_usable(&file).is_err_and(|e| e.contains("not a directory")));
        assert!(data_dir_usable(&file.join("sub")).is_err_and(|e| e.contains("not a directory")));
    }
}
