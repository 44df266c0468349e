//! The libvirt backend: `virsh -c URI ...`, bounded in time, its output
//! read as libvirt documents it (domain names one per line, `domstate`
//! words, domain XML, `domblkinfo`'s `Capacity:` line). Chosen over
//! binding libvirt's C library (the `virt` crate) so that building Tandem
//! needs no libvirt headers and a host without VMs needs no libvirt at
//! all; every call here is on the control path (a few ms of process start
//! per call), never on the data path (docs/VMS.md).

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::xml;
use crate::{CopyOutcome, DiskInfo, DomainInfo, DomainState, Hypervisor, HypervisorError};

/// Most calls answer in milliseconds; libvirt may wait on a busy domain.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// A live disk copy moves the whole disk.
const COPY_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
/// Output kept per stream.
const OUTPUT_MAX: u64 = 16 << 20;

pub struct Virsh {
    uri: String,
    program: String,
}

/// What a finished `virsh` said.
struct Output {
    stdout: String,
}

impl Virsh {
    /// libvirt at `uri` (e.g. `qemu:///system`) through `virsh` on PATH.
    pub fn new(uri: &str) -> Virsh {
        Virsh {
            uri: uri.to_owned(),
            program: "virsh".to_owned(),
        }
    }

    /// Runs `virsh -c URI args...`, with `input` on stdin, within
    /// `timeout`.
    fn run(
        &self,
        args: &[&str],
        input: Option<&str>,
        timeout: Duration,
    ) -> Result<Output, HypervisorError> {
        let what = format!("virsh {}", args.first().copied().unwrap_or_default());
        let mut child = Command::new(&self.program)
            .arg("-q")
            .arg("-c")
            .arg(&self.uri)
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| HypervisorError::Spawn {
                program: self.program.clone(),
                source,
            })?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            // virsh reads all of it before answering; a failure shows in
            // its exit status.
            let _ = stdin.write_all(text.as_bytes());
        }
        fn drain<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<String> {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                if let Some(r) = r {
                    let _ = r.take(OUTPUT_MAX).read_to_end(&mut bytes);
                }
                String::from_utf8_lossy(&bytes).into_owned()
            })
        }
        let (out, err) = (drain(child.stdout.take()), drain(child.stderr.take()));
        let started = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if started.elapsed() >= timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(HypervisorError::Timeout { what, timeout });
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(source) => {
                    return Err(HypervisorError::Spawn {
                        program: self.program.clone(),
                        source,
                    })
                }
            }
        };
        let stdout = out.join().unwrap_or_default();
        let stderr = err.join().unwrap_or_default();
        if !status.success() {
            return Err(HypervisorError::Failed {
                what,
                status,
                stderr: stderr.trim().to_owned(),
            });
        }
        Ok(Output { stdout })
    }

    fn names(&self) -> Result<Vec<String>, HypervisorError> {
        Ok(self
            .run(&["list", "--all", "--name"], None, CALL_TIMEOUT)?
            .stdout
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect())
    }

    /// Guest-visible size of a disk (`domblkinfo`'s `Capacity:`).
    fn capacity(&self, name: &str, target: &str) -> Option<u64> {
        let out = self
            .run(&["domblkinfo", name, target], None, CALL_TIMEOUT)
            .ok()?;
        parse_capacity(&out.stdout)
    }

    /// Writes `text` to a temporary file for virsh commands that take a
    /// file argument; removed when dropped.
    fn temp_file(text: &str) -> Result<TempFile, HypervisorError> {
        let path = std::env::temp_dir().join(format!(
            "tandem-virsh-{}-{}.xml",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::write(&path, text).map_err(|source| HypervisorError::Spawn {
            program: format!("write {}", path.display()),
            source,
        })?;
        Ok(TempFile(path))
    }
}

static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The `Capacity:` of `virsh domblkinfo`.
pub fn parse_capacity(out: &str) -> Option<u64> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix("Capacity:"))
        .and_then(|v| v.trim().parse().ok())
}

impl Hypervisor for Virsh {
    fn domains(&self) -> Result<Vec<DomainInfo>, HypervisorError> {
        let mut out = Vec::new();
        for name in self.names()? {
            // A domain undefined between the two calls is skipped.
            let Ok(x) = self.xml(&name, false) else {
                continue;
            };
            let parsed = xml::read(&x)?;
            let state = self.state(&name)?;
            let disks = parsed
                .disks
                .into_iter()
                .map(|disk| {
                    let size = if state.is_active() {
                        self.capacity(&name, &disk.target)
                    } else {
                        None
                    };
                    DiskInfo { disk, size }
                })
                .collect();
            out.push(DomainInfo { name, state, disks });
        }
        Ok(out)
    }

    fn state(&self, name: &str) -> Result<DomainState, HypervisorError> {
        if !self.names()?.iter().any(|n| n == name) {
            return Ok(DomainState::Absent);
        }
        let out = self.run(&["domstate", name], None, CALL_TIMEOUT)?;
        DomainState::parse(&out.stdout).ok_or(HypervisorError::Output {
            what: "virsh domstate".into(),
            output: out.stdout,
        })
    }

    fn xml(&self, name: &str, inactive: bool) -> Result<String, HypervisorError> {
        let mut args = vec!["dumpxml", name];
        if inactive {
            args.push("--inactive");
        }
        match self.run(&args, None, CALL_TIMEOUT) {
            Ok(out) => Ok(out.stdout),
            Err(e) => match self.names() {
                Ok(names) if !names.iter().any(|n| n == name) => {
                    Err(HypervisorError::NoSuchDomain(name.to_owned()))
                }
                _ => Err(e),
            },
        }
    }

    fn define(&self, xml_text: &str) -> Result<String, HypervisorError> {
        let name = xml::read(xml_text)?.name;
        let file = Self::temp_file(xml_text)?;
        let path = file.0.display().to_string();
        self.run(&["define", &path], None, CALL_TIMEOUT)?;
        Ok(name)
    }

    fn undefine(&self, name: &str) -> Result<(), HypervisorError> {
        self.run(&["undefine", name], None, CALL_TIMEOUT)
            .map(|_| ())
    }

    fn start(&self, name: &str) -> Result<(), HypervisorError> {
        self.run(&["start", name], None, CALL_TIMEOUT).map(|_| ())
    }

    fn destroy(&self, name: &str) -> Result<(), HypervisorError> {
        match self.run(&["destroy", name], None, CALL_TIMEOUT) {
            Ok(_) => Ok(()),
            // Not running (or not defined): nothing to stop.
            Err(e) => match self.state(name) {
                Ok(s) if !s.is_active() => Ok(()),
                _ => Err(e),
            },
        }
    }

    fn shutdown(&self, name: &str, timeout: Duration) -> Result<(), HypervisorError> {
        self.run(&["shutdown", name], None, CALL_TIMEOUT)?;
        let deadline = Instant::now() + timeout;
        while self.state(name)?.is_active() {
            if Instant::now() >= deadline {
                return Err(HypervisorError::Timeout {
                    what: format!("shutdown of {name}"),
                    timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    fn copy_disk(
        &self,
        name: &str,
        target: &str,
        disk_xml: &str,
    ) -> Result<CopyOutcome, HypervisorError> {
        let file = Self::temp_file(disk_xml)?;
        let path = file.0.display().to_string();
        let started = Instant::now();
        self.run(
            &[
                "blockcopy",
                name,
                target,
                "--xml",
                &path,
                "--reuse-external",
                "--transient-job",
                "--wait",
                "--pivot",
            ],
            None,
            COPY_TIMEOUT,
        )?;
        Ok(CopyOutcome {
            elapsed: started.elapsed(),
        })
    }

    fn monitor(
        &self,
        name: &str,
        command: &serde_json::Value,
    ) -> Result<serde_json::Value, HypervisorError> {
        let text = command.to_string();
        let out = self.run(&["qemu-monitor-command", name, &text], None, CALL_TIMEOUT)?;
        serde_json::from_str(&out.stdout).map_err(|_| HypervisorError::Monitor(out.stdout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domblkinfo_capacity_is_read() {
        let out =
            "Capacity:       21474836480\nAllocation:     1073741824\nPhysical:       1073741824\n";
        assert_eq!(parse_capacity(out), Some(21_474_836_480));
        assert_eq!(parse_capacity("garbage"), None);
    }

    #[test]
    fn a_missing_virsh_is_a_clear_error() {
        let v = Virsh {
            uri: "qemu:///system".into(),
            program: "/nonexistent/virsh".into(),
        };
        assert!(matches!(v.names(), Err(HypervisorError::Spawn { .. })));
    }
}
