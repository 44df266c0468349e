//! One TCG guest as a libvirt domain.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::image::GuestImage;
use crate::libvirt::Libvirt;
use crate::{Error, DOMAIN_PREFIX};

/// The guest's one data disk, `vda` (virtio, raw, `cache='none'`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disk {
    /// A raw image file on this host. `cache='none'` makes QEMU open it
    /// with O_DIRECT, which tmpfs refuses: keep it on a disk file system
    /// (the tests use `/var/tmp`).
    File(PathBuf),
    /// An NBD export on a Unix socket (Tandem's `<data_dir>/nbd/<volume>.sock`,
    /// or [`crate::QemuNbd`]).
    Nbd {
        /// The server's Unix socket.
        socket: PathBuf,
        /// The export name.
        export: String,
    },
}

impl Disk {
    /// The `<disk>` element for this disk as `vda`.
    pub fn xml(&self) -> String {
        match self {
            Disk::File(path) => format!(
                "<disk type='file' device='disk'>\
                 <driver name='qemu' type='raw' cache='none'/>\
                 <source file='{}'/>\
                 <target dev='vda' bus='virtio'/></disk>",
                escape(&path.to_string_lossy())
            ),
            Disk::Nbd { socket, export } => format!(
                "<disk type='network' device='disk'>\
                 <driver name='qemu' type='raw' cache='none'/>\
                 <source protocol='nbd' name='{}'>\
                 <host transport='unix' socket='{}'/></source>\
                 <target dev='vda' bus='virtio'/></disk>",
                escape(export),
                escape(&socket.to_string_lossy())
            ),
        }
    }
}

/// What the guest's `/init` does once `/data` (the ext4 data disk) is
/// mounted. Every workload prints `MOUNTED` first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Prints `READY` and waits.
    Idle,
    /// Writes `/data/f1`, `/data/f2`, ... (1-4 KiB each, a header line
    /// `TANDEM-FILE <N> <crc32> <len>` then random bytes), fsync()s each
    /// file and `/data`, and only then prints `ACK <N>`; forever.
    Write,
    /// [`Workload::Write`] for this many files, then unmounts `/data`,
    /// prints `DONE <N>` and powers off (the domain then shuts off).
    WriteCount(u64),
    /// Mounts `/data` (replaying its journal), verifies every `/data/f<N>`
    /// (`CHECK f<N> ok|BAD`), prints `CHECKED <files> <bad>`, unmounts and
    /// powers off. After a crash the one file being written then (never
    /// ACKed) may count as bad. (fsck itself is done outside:
    /// [`crate::ext4::fsck`].)
    Check,
}

impl Workload {
    fn cmdline(self) -> String {
        match self {
            Workload::Idle => "tandem.workload=idle".into(),
            Workload::Write => "tandem.workload=write".into(),
            Workload::WriteCount(n) => format!("tandem.workload=write tandem.count={n}"),
            Workload::Check => "tandem.workload=check".into(),
        }
    }
}

/// How to start a [`Guest`].
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// A short word naming the test; part of the domain name.
    pub label: String,
    /// The data disk.
    pub disk: Disk,
    /// What `/init` does.
    pub workload: Workload,
    /// Guest memory (default 256 MiB).
    pub memory_mib: u32,
    /// Where the domain XML and the console log go.
    pub work_dir: PathBuf,
    /// Added to the kernel command line.
    pub extra_cmdline: String,
}

impl GuestConfig {
    /// A guest named after `label`, with `disk`, running `workload`,
    /// keeping its files in `work_dir`.
    pub fn new(label: &str, disk: Disk, workload: Workload, work_dir: &Path) -> GuestConfig {
        GuestConfig {
            label: label.to_string(),
            disk,
            workload,
            memory_mib: 256,
            work_dir: work_dir.to_path_buf(),
            extra_cmdline: String::new(),
        }
    }
}

/// A running (or stopped) TCG guest: a persistent libvirt domain named
/// `tandem-test-<pid>-<n>-<label>`. Dropping it destroys and undefines it.
#[derive(Debug)]
pub struct Guest {
    libvirt: Libvirt,
    name: String,
    console: PathBuf,
    xml: String,
    started: Instant,
    removed: bool,
}

/// How often a wait on the console also asks libvirt whether the guest
/// still runs.
const STATE_EVERY: Duration = Duration::from_secs(1);

impl Guest {
    /// Defines and starts the domain (a leftover domain of the same name
    /// is destroyed and undefined first).
    pub fn start(
        libvirt: &Libvirt,
        image: &GuestImage,
        config: &GuestConfig,
    ) -> Result<Guest, Error> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let label: String = config
            .label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(40)
            .collect();
        let name = format!("{DOMAIN_PREFIX}{}-{seq}-{label}", std::process::id());
        std::fs::create_dir_all(&config.work_dir).map_err(|source| Error::Io {
            what: format!("cannot create {}", config.work_dir.display()),
            source,
        })?;
        let console = config.work_dir.join(format!("{name}.console"));
        match std::fs::remove_file(&console) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(Error::Io {
                    what: format!("cannot remove {}", console.display()),
                    source,
                })
            }
        }
        let xml = domain_xml(&name, image, config, &console);
        let xml_path = config.work_dir.join(format!("{name}.xml"));
        std::fs::write(&xml_path, &xml).map_err(|source| Error::Io {
            what: format!("cannot write {}", xml_path.display()),
            source,
        })?;
        libvirt.destroy_and_undefine(&name)?;
        let mut guest = Guest {
            libvirt: libvirt.clone(),
            name,
            console,
            xml,
            started: Instant::now(),
            removed: false,
        };
        let xml_arg = xml_path.to_string_lossy().into_owned();
        libvirt.virsh(&["define", &xml_arg])?;
        guest.started = Instant::now();
        libvirt.virsh(&["start", &guest.name])?;
        Ok(guest)
    }

    /// The domain's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The domain XML it was defined with.
    pub fn domain_xml(&self) -> &str {
        &self.xml
    }

    /// The serial console's log file.
    pub fn console_path(&self) -> &Path {
        &self.console
    }

    /// When `virsh start` was issued.
    pub fn started_at(&self) -> Instant {
        self.started
    }

    /// The complete lines the console has printed so far (`\r` removed).
    pub fn console_lines(&self) -> Result<Vec<String>, Error> {
        let bytes = match std::fs::read(&self.console) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(Error::Io {
                    what: format!("cannot read {}", self.console.display()),
                    source,
                })
            }
        };
        let text = String::from_utf8_lossy(&bytes);
        let mut lines: Vec<String> = text.split('\n').map(|l| l.replace('\r', "")).collect();
        lines.pop(); // an unfinished line, or "" after the last '\n'
        Ok(lines)
    }

    /// The numbers of the `ACK <N>` lines printed so far, in order.
    pub fn acks(&self) -> Result<Vec<u64>, Error> {
        Ok(self
            .console_lines()?
            .iter()
            .filter_map(|l| parse_ack(l))
            .collect())
    }

    /// Waits until the console shows a line for which `matches` holds and
    /// returns it. Fails early if the guest prints `TANDEM-ERROR`, panics
    /// or stops, and after `timeout`; the error carries the console's tail.
    pub fn wait_for_line(
        &self,
        what: &str,
        timeout: Duration,
        mut matches: impl FnMut(&str) -> bool,
    ) -> Result<String, Error> {
        self.wait_for_console(what, timeout, |lines| {
            lines.iter().find(|l| matches(l)).cloned()
        })
    }

    /// Waits until at least `n` `ACK` lines were printed; returns all ACKs.
    pub fn wait_for_acks(&self, n: u64, timeout: Duration) -> Result<Vec<u64>, Error> {
        self.wait_for_console(&format!("{n} ACK lines"), timeout, |lines| {
            let acks: Vec<u64> = lines.iter().filter_map(|l| parse_ack(l)).collect();
            (acks.len() as u64 >= n).then_some(acks)
        })
    }

    /// Waits until `f`, given the console's complete lines, returns a
    /// value. Fails early if the guest prints `TANDEM-ERROR`, panics or
    /// stops, and after `timeout`; the error carries the console's tail.
    pub fn wait_for_console<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&[String]) -> Option<T>,
    ) -> Result<T, Error> {
        let mut last_state_check = Instant::now();
        let mut failure: Option<String> = None;
        let mut io_error: Option<Error> = None;
        let found = tandem_testkit::poll(timeout, || {
            let lines = match self.console_lines() {
                Ok(l) => l,
                Err(e) => {
                    io_error = Some(e);
                    return Some(None);
                }
            };
            if let Some(v) = f(&lines) {
                return Some(Some(v));
            }
            if let Some(l) = lines
                .iter()
                .find(|l| l.starts_with("TANDEM-ERROR") || l.contains("Kernel panic"))
            {
                failure = Some(format!("the guest failed: {l}"));
                return Some(None);
            }
            if last_state_check.elapsed() >= STATE_EVERY {
                last_state_check = Instant::now();
                match self.libvirt.domain_state(&self.name) {
                    Ok(Some(s)) if s == "running" || s == "paused" => {}
                    Ok(state) => {
                        // The console may have been written just before it stopped.
                        let lines = self.console_lines().unwrap_or_default();
                        if let Some(v) = f(&lines) {
                            return Some(Some(v));
                        }
                        failure = Some(format!(
                            "the guest is no longer running (state: {})",
                            state.as_deref().unwrap_or("undefined")
                        ));
                        return Some(None);
                    }
                    Err(e) => {
                        io_error = Some(e);
                        return Some(None);
                    }
                }
            }
            None
        });
        if let Some(e) = io_error {
            return Err(e);
        }
        match found {
            Some(Some(v)) => Ok(v),
            Some(None) => Err(Error::Guest {
                name: self.name.clone(),
                message: format!(
                    "{} while waiting for {what}",
                    failure.unwrap_or_else(|| "failed".into())
                ),
                console_tail: self.console_tail(),
            }),
            None => Err(Error::Timeout {
                what: format!("{what} on {}'s console", self.name),
                timeout,
                detail: format!("; console tail:\n{}", self.console_tail()),
            }),
        }
    }

    /// The domain's state in libvirt's words (`running`, `shut off`, ...).
    pub fn state(&self) -> Result<String, Error> {
        Ok(self
            .libvirt
            .domain_state(&self.name)?
            .unwrap_or_else(|| "undefined".into()))
    }

    /// Waits until the domain is shut off (e.g. after `poweroff -f`).
    pub fn wait_shut_off(&self, timeout: Duration) -> Result<(), Error> {
        let mut last = String::new();
        let mut error = None;
        let got = tandem_testkit::poll(timeout, || match self.state() {
            Ok(s) if s == "shut off" || s == "undefined" => Some(()),
            Ok(s) => {
                last = s;
                std::thread::sleep(Duration::from_millis(100));
                None
            }
            Err(e) => {
                error = Some(e);
                Some(())
            }
        });
        if let Some(e) = error {
            return Err(e);
        }
        got.ok_or_else(|| Error::Timeout {
            what: format!("{} to shut off (state: {last})", self.name),
            timeout,
            detail: format!("; console tail:\n{}", self.console_tail()),
        })
    }

    /// Kills the guest's QEMU at once (`virsh destroy`), as a host crash
    /// would; the domain stays defined. Fine if it is not running.
    pub fn destroy(&self) -> Result<(), Error> {
        self.libvirt.destroy(&self.name)
    }

    /// Destroys and undefines the domain (what dropping it does, with the
    /// error reported). This is how a test simulates losing the guest's host.
    pub fn remove(mut self) -> Result<(), Error> {
        self.removed = true;
        self.libvirt.destroy_and_undefine(&self.name)
    }

    /// The console's last lines, for messages.
    pub fn console_tail(&self) -> String {
        let lines = self.console_lines().unwrap_or_default();
        let start = lines.len().saturating_sub(30);
        lines[start..].join("\n")
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if !self.removed {
            let _ = self.libvirt.destroy_and_undefine(&self.name);
        }
    }
}

/// `N` from a console line `ACK N`.
pub fn parse_ack(line: &str) -> Option<u64> {
    line.trim().strip_prefix("ACK ")?.trim().parse().ok()
}

/// The domain XML for a TCG guest booting `image` directly (no firmware
/// disk, no graphics), its serial console going to `console`.
pub fn domain_xml(name: &str, image: &GuestImage, config: &GuestConfig, console: &Path) -> String {
    let mut cmdline = format!(
        "console=ttyS0 panic=-1 loglevel=4 {}",
        config.workload.cmdline()
    );
    if !config.extra_cmdline.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(&config.extra_cmdline);
    }
    format!(
        "<domain type='qemu'>\n\
         \x20 <name>{name}</name>\n\
         \x20 <memory unit='MiB'>{mem}</memory>\n\
         \x20 <vcpu>1</vcpu>\n\
         \x20 <os>\n\
         \x20   <type arch='x86_64' machine='pc'>hvm</type>\n\
         \x20   <kernel>{kernel}</kernel>\n\
         \x20   <initrd>{initrd}</initrd>\n\
         \x20   <cmdline>{cmdline}</cmdline>\n\
         \x20 </os>\n\
         \x20 <features><acpi/></features>\n\
         \x20 <clock offset='utc'/>\n\
         \x20 <on_poweroff>destroy</on_poweroff>\n\
         \x20 <on_reboot>destroy</on_reboot>\n\
         \x20 <on_crash>destroy</on_crash>\n\
         \x20 <devices>\n\
         \x20   {disk}\n\
         \x20   <serial type='file'><source path='{console}'/><target port='0'/></serial>\n\
         \x20   <controller type='usb' model='none'/>\n\
         \x20   <memballoon model='none'/>\n\
         \x20 </devices>\n\
         </domain>\n",
        name = escape(name),
        mem = config.memory_mib,
        kernel = escape(&image.kernel().to_string_lossy()),
        initrd = escape(&image.initrd().to_string_lossy()),
        cmdline = escape(&cmdline),
        disk = config.disk.xml(),
        console = escape(&console.to_string_lossy()),
    )
}

/// `s` escaped for XML text and attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_lines_parse() {
        assert_eq!(parse_ack("ACK 12"), Some(12));
        assert_eq!(parse_ack("ACK 12 "), Some(12));
        assert_eq!(parse_ack("BACK 12"), None);
        assert_eq!(parse_ack("ACK x"), None);
    }

    #[test]
    fn an_nbd_disk_names_its_socket_and_export() {
        let d = Disk::Nbd {
            socket: "/run/a'b.sock".into(),
            export: "web01-root".into(),
        };
        let xml = d.xml();
        assert!(xml.contains("protocol='nbd' name='web01-root'"), "{xml}");
        assert!(
            xml.contains("transport='unix' socket='/run/a&apos;b.sock'"),
            "{xml}"
        );
        assert!(xml.contains("cache='none'"), "{xml}");
    }
}
