//! The guest's ext4 data disk, seen from the host (e2fsprogs; no mount).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::cmd::{self, run, run_ok};
use crate::Error;

const TIMEOUT: Duration = Duration::from_secs(300);

/// Creates (or overwrites) `path` as a sparse raw image of `size` bytes
/// holding an empty ext4 file system (`mkfs.ext4 -F`).
pub fn make_ext4(path: &Path, size: u64) -> Result<(), Error> {
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(|source| Error::Io {
            what: format!("cannot create {}", path.display()),
            source,
        })?;
    file.set_len(size).map_err(|source| Error::Io {
        what: format!("cannot size {}", path.display()),
        source,
    })?;
    drop(file);
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-F", "-q", "-E", "nodiscard"])
            .arg(path),
        TIMEOUT,
    )?;
    Ok(())
}

/// Replays the journal of the file system in `path`, if it needs it (as
/// the kernel does at mount after a crash): `e2fsck -E journal_only -y`.
/// Nothing else is checked or repaired.
pub fn replay_journal(path: &Path) -> Result<(), Error> {
    let mut c = Command::new("e2fsck");
    c.args(["-E", "journal_only", "-y"]).arg(path);
    let out = run(&mut c, TIMEOUT)?;
    // 0: nothing to do, 1: the journal was replayed.
    match out.status.code() {
        Some(0 | 1) => Ok(()),
        _ => Err(cmd::failed(&c, &out)),
    }
}

/// Checks the file system in `path` without changing it: `e2fsck -n -f`.
/// Ok (with e2fsck's output) only when it finds nothing wrong. A file
/// system whose journal still needs replaying is not clean: call
/// [`replay_journal`] first after a crash.
pub fn fsck(path: &Path) -> Result<String, Error> {
    let mut c = Command::new("e2fsck");
    c.args(["-n", "-f"]).arg(path);
    let out = run(&mut c, TIMEOUT)?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(Error::Fsck {
            image: path.to_path_buf(),
            status: out.status.to_string(),
            output: text,
        })
    }
}

/// One entry of a directory, as `debugfs ls -p` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The name in the directory.
    pub name: String,
    /// The inode number.
    pub inode: u64,
    /// The mode, octal digits as debugfs prints them (`100644`).
    pub mode: String,
    /// The size in bytes.
    pub size: u64,
}

/// The entries of directory `dir` (e.g. `/`) in the file system in `path`,
/// read with `debugfs` (the image is not mounted, and not changed: a
/// journal that was not replayed is not looked at).
pub fn list_dir(path: &Path, dir: &str) -> Result<Vec<Entry>, Error> {
    let out = run_ok(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("ls -p {dir}"))
            .arg(path),
        TIMEOUT,
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut entries = Vec::new();
    for line in text.lines() {
        // /INODE/MODE/UID/GID/NAME/SIZE/
        let fields: Vec<&str> = line.trim().split('/').collect();
        if fields.len() < 8 {
            continue;
        }
        let (Ok(inode), Ok(size)) = (fields[1].parse(), fields[6].parse()) else {
            continue;
        };
        let name = fields[5].to_string();
        if name == "." || name == ".." {
            continue;
        }
        entries.push(Entry {
            name,
            inode,
            mode: fields[2].to_string(),
            size,
        });
    }
    Ok(entries)
}

/// The numbered files `/f<N>` the write workload made, as N -> size.
pub fn numbered_files(path: &Path) -> Result<BTreeMap<u64, u64>, Error> {
    Ok(list_dir(path, "/")?
        .into_iter()
        .filter_map(|e| Some((e.name.strip_prefix('f')?.parse().ok()?, e.size)))
        .collect())
}

/// The contents of the files `names` (absolute paths in the file system)
/// in the image `path`, read with one `debugfs` run.
pub fn read_files(path: &Path, names: &[String]) -> Result<BTreeMap<String, Vec<u8>>, Error> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp = std::env::temp_dir().join(format!(
        "tandem-vmkit-dump-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let result = read_files_via(path, names, &tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn read_files_via(
    path: &Path,
    names: &[String],
    tmp: &Path,
) -> Result<BTreeMap<String, Vec<u8>>, Error> {
    std::fs::create_dir_all(tmp).map_err(|source| Error::Io {
        what: format!("cannot create {}", tmp.display()),
        source,
    })?;
    let mut script = String::new();
    let mut outs: Vec<(String, PathBuf)> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let out = tmp.join(format!("{i}"));
        script.push_str(&format!("dump \"{name}\" \"{}\"\n", out.display()));
        outs.push((name.clone(), out));
    }
    let script_path = tmp.join("commands");
    std::fs::write(&script_path, script).map_err(|source| Error::Io {
        what: format!("cannot write {}", script_path.display()),
        source,
    })?;
    run_ok(
        Command::new("debugfs")
            .arg("-f")
            .arg(&script_path)
            .arg(path),
        TIMEOUT,
    )?;
    let mut files = BTreeMap::new();
    for (name, out) in outs {
        let bytes = std::fs::read(&out).map_err(|source| Error::Io {
            what: format!("debugfs did not dump {name} from {}", path.display()),
            source,
        })?;
        files.insert(name, bytes);
    }
    Ok(files)
}

/// Checks the contents of `/f<n>` as the write workload writes it: the
/// line `TANDEM-FILE <n> <crc32 hex> <len>`, then `len` bytes with that
/// CRC-32. Returns what is wrong.
pub fn verify_numbered_file(n: u64, bytes: &[u8]) -> Result<(), String> {
    let Some(nl) = bytes.iter().position(|&b| b == b'\n') else {
        return Err(format!("f{n}: no header line ({} bytes)", bytes.len()));
    };
    let header = String::from_utf8_lossy(&bytes[..nl]);
    let body = &bytes[nl + 1..];
    let fields: Vec<&str> = header.split_whitespace().collect();
    let [tag, num, crc, len] = fields[..] else {
        return Err(format!("f{n}: bad header {header:?}"));
    };
    if tag != "TANDEM-FILE" || num.parse::<u64>().ok() != Some(n) {
        return Err(format!("f{n}: bad header {header:?}"));
    }
    if len.parse::<usize>().ok() != Some(body.len()) {
        return Err(format!(
            "f{n}: header says {len} bytes, body has {}",
            body.len()
        ));
    }
    let actual = crc32(body);
    if u32::from_str_radix(crc, 16).ok() != Some(actual) {
        return Err(format!(
            "f{n}: header says crc32 {crc}, body has {actual:08x}"
        ));
    }
    Ok(())
}

/// The numbered files of the image `path` and what is wrong with each
/// (`Ok` for a good one).
pub fn verify_numbered_files(path: &Path) -> Result<BTreeMap<u64, Result<(), String>>, Error> {
    let numbers: Vec<u64> = numbered_files(path)?.into_keys().collect();
    let names: Vec<String> = numbers.iter().map(|n| format!("/f{n}")).collect();
    let contents = read_files(path, &names)?;
    Ok(numbers
        .into_iter()
        .map(|n| {
            let verdict = match contents.get(&format!("/f{n}")) {
                Some(bytes) => verify_numbered_file(n, bytes),
                None => Err(format!("f{n}: not read")),
            };
            (n, verdict)
        })
        .collect())
}

/// CRC-32 (IEEE 802.3, reflected; what zlib and busybox `crc32` compute).
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn a_numbered_file_verifies() {
        let body = b"hello\nworld\0\xff";
        let mut f = format!("TANDEM-FILE 7 {:08x} {}\n", crc32(body), body.len()).into_bytes();
        f.extend_from_slice(body);
        assert_eq!(verify_numbered_file(7, &f), Ok(()));
        assert!(verify_numbered_file(8, &f).is_err());
        let mut torn = f.clone();
        torn.pop();
        assert!(verify_numbered_file(7, &torn).is_err());
        let mut flipped = f.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(verify_numbered_file(7, &flipped).is_err());
    }
}
