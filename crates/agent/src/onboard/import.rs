//! A shut-off domain's disks copied with `qemu-img`: into a volume (the
//! guest-visible data, a qcow2 image read through its format; zeros
//! skipped so holes stay holes; progress from `qemu-img -p`), and back out
//! to a sparse raw file (`tandem unprotect`).

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

/// Why a disk could not be read or copied.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot run qemu-img: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("qemu-img {what} {path} failed ({status}): {stderr}")]
    Failed {
        what: &'static str,
        path: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("qemu-img info {path}: no virtual-size in its answer")]
    NoSize { path: String },
}

/// The guest-visible size of the image at `path` in `format`.
pub fn virtual_size(path: &str, format: &str) -> Result<u64, ImportError> {
    let out = Command::new("qemu-img")
        .args(["info", "--force-share", "--output=json", "-f", format, path])
        .stdin(Stdio::null())
        .output()
        .map_err(ImportError::Spawn)?;
    if !out.status.success() {
        return Err(ImportError::Failed {
            what: "info",
            path: path.to_owned(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v.get("virtual-size").and_then(serde_json::Value::as_u64))
        .ok_or_else(|| ImportError::NoSize {
            path: path.to_owned(),
        })
}

/// Copies the image at `path` (`format`) into the NBD export `volume` on
/// `socket` (a new, zeroed volume: zero areas are not written), calling
/// `progress` with the hundredths of a percent done.
pub fn copy(
    path: &str,
    format: &str,
    volume: &str,
    socket: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<(), ImportError> {
    let target = format!("nbd+unix:///{volume}?socket={}", socket.display());
    let mut child = Command::new("qemu-img")
        .args(["convert", "-p", "-n", "--target-is-zero", "-f", format])
        .args(["-O", "raw", path, &target])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(ImportError::Spawn)?;
    let stderr = child.stderr.take().map(|mut e| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = e.read_to_string(&mut s);
            s
        })
    });
    if let Some(mut out) = child.stdout.take() {
        let mut buf = [0u8; 4096];
        let mut line = Vec::new();
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            for &b in &buf[..n] {
                if b == b'\r' || b == b'\n' {
                    if let Some(p) = percent(&String::from_utf8_lossy(&line)) {
                        progress(p);
                    }
                    line.clear();
                } else {
                    line.push(b);
                }
            }
        }
    }
    let status = child.wait().map_err(ImportError::Spawn)?;
    let stderr = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
    if !status.success() {
        return Err(ImportError::Failed {
            what: "convert",
            path: path.to_owned(),
            status,
            stderr: stderr.trim().to_owned(),
        });
    }
    progress(10_000);
    Ok(())
}

/// A shut-off VM's volume (`volume` on `socket`) copied out to a new
/// sparse raw file (`tandem unprotect`).
pub fn copy_out(socket: &Path, volume: &str, file: &Path) -> Result<(), ImportError> {
    let source = format!("nbd+unix:///{volume}?socket={}", socket.display());
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", "-S", "4k", &source])
        .arg(file)
        .stdin(Stdio::null())
        .output()
        .map_err(ImportError::Spawn)?;
    if !out.status.success() {
        return Err(ImportError::Failed {
            what: "convert",
            path: source,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// `qemu-img -p`'s `    (12.34/100%)`, in hundredths of a percent.
fn percent(line: &str) -> Option<u64> {
    let inner = line.trim().strip_prefix('(')?;
    let (done, _) = inner.split_once('/')?;
    let (whole, frac) = done.trim().split_once('.').unwrap_or((done.trim(), "0"));
    let frac: String = frac.chars().chain("00".chars()).take(2).collect();
    let v = whole.parse::<u64>().ok()? * 100 + frac.parse::<u64>().ok()?;
    (v <= 10_000).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_are_read() {
        assert_eq!(percent("    (12.34/100%)"), Some(1234));
        assert_eq!(percent("(100.00/100%)"), Some(10_000));
        assert_eq!(percent("(5.5/100%)"), Some(550));
        assert_eq!(percent("(500/100%)"), None);
        assert_eq!(percent("something else"), None);
        assert_eq!(percent(""), None);
    }
}
