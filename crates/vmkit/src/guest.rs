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
    /// An NBD export on a Unix socket attached the way Tandem attaches its
    /// volumes, so that QEMU rides out a restart of the NBD server: no
    /// `<disk>` element, but a `-blockdev` (raw over nbd, with
    /// `reconnect-delay`) and a `-device virtio-blk-pci` in
    /// `<qemu:commandline>` (see [`tandem_nbd_commandline`]); libvirt does
    /// not know this disk.
    TandemNbd {
        /// The server's Unix socket.
        socket: PathBuf,
        /// The export name.
        export: String,
        /// How long QEMU holds guest I/O while it reconnects before
        /// failing it (`reconnect-delay`), in seconds.
        reconnect_delay_secs: u32,
    },
}

impl Disk {
    /// The `<disk>` element for this disk as `vda` (empty for
    /// [`Disk::TandemNbd`], which is on the QEMU command line instead:
    /// [`Disk::qemu_commandline`]).
    pub fn xml(&self) -> String {
        match self {
            Disk::TandemNbd { .. } => String::new(),
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

    /// The `<qemu:commandline>` element this disk needs, if any (only
    /// [`Disk::TandemNbd`]'s). A domain using it must declare
    /// `xmlns:qemu='`[`QEMU_XMLNS`]`'`.
    pub fn qemu_commandline(&self) -> Option<String> {
        match self {
            Disk::TandemNbd {
                socket,
                export,
                reconnect_delay_secs,
            } => Some(tandem_nbd_commandline(
                socket,
                export,
                *reconnect_delay_secs,
            )),
            Disk::File(_) | Disk::Nbd { .. } => None,
        }
    }
}

/// The XML namespace of libvirt's QEMU extensions (`<qemu:commandline>`).
pub const QEMU_XMLNS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

/// The `<qemu:commandline>` element giving a guest the disk `vda` on an
/// NBD export at a Unix socket, the way Tandem attaches volumes:
///
/// ```text
/// -blockdev {"driver":"raw","node-name":"tandem-vda","file":{"driver":"nbd",
///            "node-name":"tandem-vda-nbd","server":{"type":"unix","path":SOCKET},
///            "export":EXPORT,"reconnect-delay":N}}
/// -device virtio-blk-pci,drive=tandem-vda,id=tandem-vda-dev,bus=pci.0,addr=0x9
/// ```
///
/// With `reconnect-delay`, QEMU holds the guest's I/O while the server is
/// gone (killed and restarted on the same socket) and reconnects, for up
/// to N seconds, instead of failing it. The guest sees `/dev/vda` (the
/// only virtio disk).
///
/// The device has a fixed PCI address (slot 9 of the `pc` machine's
/// bus), as a disk Tandem protected keeps the one libvirt gave it:
/// libvirt does not know the passthrough device, and would give its
/// lowest free slot to another device (an `<interface>`) lacking one.
pub fn tandem_nbd_commandline(socket: &Path, export: &str, reconnect_delay_secs: u32) -> String {
    let blockdev = format!(
        "{{\"driver\":\"raw\",\"node-name\":\"tandem-vda\",\"file\":{{\"driver\":\"nbd\",\
         \"node-name\":\"tandem-vda-nbd\",\"server\":{{\"type\":\"unix\",\"path\":{}}},\
         \"export\":{},\"reconnect-delay\":{reconnect_delay_secs}}}}}",
        json_string(&socket.to_string_lossy()),
        json_string(export),
    );
    format!(
        "<qemu:commandline>\n\
         \x20   <qemu:arg value='-blockdev'/>\n\
         \x20   <qemu:arg value='{}'/>\n\
         \x20   <qemu:arg value='-device'/>\n\
         \x20   <qemu:arg value='virtio-blk-pci,drive=tandem-vda,id=tandem-vda-dev,bus=pci.0,addr=0x9'/>\n\
         \x20 </qemu:commandline>",
        escape(&blockdev)
    )
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// What the guest's `/init` does once `/data` (the ext4 data disk) is
/// mounted. Every workload prints `MOUNTED` first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Prints `READY` and waits.
    Idle,
    /// Writes `/data/f1`, `/data/f2`, ... (1-4 KiB each, a header line
    /// `TANDEM-FILE <N> <crc32> <len>` then random bytes), fsync()s each
    /// file and `/data`, and only then prints `ACK <N>`; forever. On a disk
    /// that has numbered files already (a guest started again after a
    /// crash, or at another site), it prints `RESUME <M>` for the highest
    /// `/data/f<M>` there and goes on with `f<M+1>`.
    Write,
    /// [`Workload::Write`] for this many (more) files, then unmounts `/data`,
    /// prints `DONE <N>` and powers off (the domain then shuts off).
    WriteCount(u64),
    /// Mounts `/data` (replaying its journal), verifies every `/data/f<N>`
    /// (`CHECK f<N> ok|BAD`), prints `CHECKED <files> <bad>`, unmounts and
    /// powers off. After a crash the one file being written then (never
    /// ACKed) may count as bad. (fsck itself is done outside:
    /// [`crate::ext4::fsck`].)
    Check,
    /// Throughput: makes `mib` MiB of random data in RAM (prints
    /// `DD-READY <mib>`), then `rounds` times writes it to a fresh
    /// `/data/dd` with `dd bs=1M oflag=direct conv=fsync`, printing `RATE
    /// <bytes> <ns>` after each (guest clock, 10 ms steps: [`parse_rate`]);
    /// then `DONE <rounds>`, and powers off. Give the guest memory for the
    /// data ([`GuestConfig::memory_mib`]) and a disk with room for it.
    Dd {
        /// Size of each round's write, MiB.
        mib: u32,
        /// Rounds.
        rounds: u32,
    },
}

impl Workload {
    fn cmdline(self) -> String {
        match self {
            Workload::Idle => "tandem.workload=idle".into(),
            Workload::Write => "tandem.workload=write".into(),
            Workload::WriteCount(n) => format!("tandem.workload=write tandem.count={n}"),
            Workload::Check => "tandem.workload=check".into(),
            Workload::Dd { mib, rounds } => {
                format!("tandem.workload=dd tandem.dd_mib={mib} tandem.dd_rounds={rounds}")
            }
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
    /// The domain's name; `None` (the default): `tandem-test-<pid>-<n>-<label>`,
    /// unique per test process. A site daemon ([`crate::SiteLibvirt`]) may
    /// use fixed names like `web01`; on the shared system daemon a fixed
    /// name is not swept after a killed test run.
    pub name: Option<String>,
    /// The serial console's log file; `None` (the default):
    /// `<work_dir>/<name>.console`.
    pub console: Option<PathBuf>,
    /// QEMU appends to the console file (`append='on'`) instead of
    /// truncating it when it starts: a domain started again, or at another
    /// site with the same file, adds its lines after the earlier boots'
    /// (default: truncated at each start).
    pub console_append: bool,
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
            name: None,
            console: None,
            console_append: false,
        }
    }

    /// This config with the domain named `name` (see [`GuestConfig::name`]).
    pub fn with_name(mut self, name: &str) -> GuestConfig {
        self.name = Some(name.to_string());
        self
    }

    /// This config with the console going to `console`.
    pub fn with_console(mut self, console: &Path) -> GuestConfig {
        self.console = Some(console.to_path_buf());
        self
    }

    /// This config with QEMU appending to the console file at each start
    /// (see [`GuestConfig::console_append`]).
    pub fn with_console_appended(mut self) -> GuestConfig {
        self.console_append = true;
        self
    }
}

/// A running (or stopped) TCG guest: a persistent libvirt domain (by
/// default named `tandem-test-<pid>-<n>-<label>`) on the system daemon or
/// a site's ([`crate::SiteLibvirt::libvirt`]). Dropping one this crate
/// started destroys and undefines it; one [`Guest::attach`]ed to is left
/// alone.
#[derive(Debug)]
pub struct Guest {
    libvirt: Libvirt,
    name: String,
    console: PathBuf,
    xml: String,
    started: Instant,
    /// Destroyed and undefined when dropped (false: attached to).
    owned: bool,
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
        let name = match &config.name {
            Some(name) => name.clone(),
            None => {
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
                format!("{DOMAIN_PREFIX}{}-{seq}-{label}", std::process::id())
            }
        };
        create_dir(&config.work_dir)?;
        let console = config
            .console
            .clone()
            .unwrap_or_else(|| config.work_dir.join(format!("{name}.console")));
        let xml = domain_xml(&name, image, config, &console);
        let xml_path = config.work_dir.join(format!("{name}.xml"));
        Guest::define_and_start(libvirt, &name, xml, &xml_path, &console)
    }

    /// Defines the domain `name` from the caller's `xml` and starts it (a
    /// leftover domain of that name is destroyed and undefined first);
    /// `console` is the file the XML sends the serial console to (it is
    /// removed first, so waits see only this boot's lines). The XML is
    /// written beside it as `<name>.domain.xml`. Use this for domains
    /// made elsewhere (say by Tandem's rewrite of a domain), with
    /// [`domain_xml`] as a base or not; the console helpers need the
    /// guest image's `/init` on a serial console going to `console`.
    /// Dropping the guest destroys and undefines it.
    pub fn start_xml(
        libvirt: &Libvirt,
        name: &str,
        xml: &str,
        console: &Path,
    ) -> Result<Guest, Error> {
        let dir = console.parent().unwrap_or(Path::new("."));
        create_dir(dir)?;
        let xml_path = dir.join(format!("{name}.domain.xml"));
        Guest::define_and_start(libvirt, name, xml.to_string(), &xml_path, console)
    }

    /// A guest that something else (Tandem's agent, say) defines and
    /// starts as domain `name` on `libvirt`'s daemon, its serial console
    /// going to `console`: the wait and console helpers work on it;
    /// dropping it leaves the domain alone ([`Guest::remove`] still
    /// destroys and undefines it). Nothing is checked: the domain may not
    /// exist yet ([`Guest::wait_running`] waits for it). The console file
    /// is left as it is: remove an old one before the domain starts, or
    /// waits may see an earlier boot's lines. [`Guest::domain_xml`] is
    /// empty and [`Guest::started_at`] is now.
    pub fn attach(libvirt: &Libvirt, name: &str, console: &Path) -> Guest {
        Guest {
            libvirt: libvirt.clone(),
            name: name.to_string(),
            console: console.to_path_buf(),
            xml: String::new(),
            started: Instant::now(),
            owned: false,
            removed: false,
        }
    }

    fn define_and_start(
        libvirt: &Libvirt,
        name: &str,
        xml: String,
        xml_path: &Path,
        console: &Path,
    ) -> Result<Guest, Error> {
        match std::fs::remove_file(console) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(Error::Io {
                    what: format!("cannot remove {}", console.display()),
                    source,
                })
            }
        }
        std::fs::write(xml_path, &xml).map_err(|source| Error::Io {
            what: format!("cannot write {}", xml_path.display()),
            source,
        })?;
        libvirt.destroy_and_undefine(name)?;
        let mut guest = Guest {
            libvirt: libvirt.clone(),
            name: name.to_string(),
            console: console.to_path_buf(),
            xml,
            started: Instant::now(),
            owned: true,
            removed: false,
        };
        let xml_arg = xml_path.to_string_lossy().into_owned();
        libvirt.virsh(&["define", &xml_arg])?;
        guest.started = Instant::now();
        libvirt.virsh(&["start", &guest.name])?;
        Ok(guest)
    }

    /// The daemon the domain is on.
    pub fn libvirt(&self) -> &Libvirt {
        &self.libvirt
    }

    /// The domain's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The domain XML it was defined with (empty for a guest attached to).
    pub fn domain_xml(&self) -> &str {
        &self.xml
    }

    /// The serial console's log file.
    pub fn console_path(&self) -> &Path {
        &self.console
    }

    /// When `virsh start` was issued (for a guest attached to: when
    /// [`Guest::attach`] was called).
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
    /// stops (libvirt says it is neither running nor paused), and after
    /// `timeout`; the error carries the console's tail. While libvirt
    /// does not answer (a site daemon stopped) the wait goes on reading
    /// the console.
    pub fn wait_for_console<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&[String]) -> Option<T>,
    ) -> Result<T, Error> {
        let mut last_state_check = Instant::now();
        let mut failure: Option<String> = None;
        let mut io_error: Option<Error> = None;
        let mut state_error: Option<Error> = None;
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
                    // libvirt is down (a stopped site daemon): go on with
                    // the console alone.
                    Err(e) => state_error = Some(e),
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
                detail: format!(
                    "{}; console tail:\n{}",
                    state_error
                        .map_or_else(String::new, |e| format!("; libvirt did not answer: {e}")),
                    self.console_tail()
                ),
            }),
        }
    }

    /// Waits until libvirt lists the domain as running (it may not be
    /// defined yet, and the daemon may not answer yet, meanwhile).
    pub fn wait_running(&self, timeout: Duration) -> Result<(), Error> {
        let mut last = String::from("not asked");
        let got = tandem_testkit::poll(timeout, || match self.libvirt.domain_state(&self.name) {
            Ok(Some(s)) if s == "running" => Some(()),
            Ok(s) => {
                last = s.unwrap_or_else(|| "undefined".into());
                std::thread::sleep(Duration::from_millis(100));
                None
            }
            Err(e) => {
                last = e.to_string();
                std::thread::sleep(Duration::from_millis(100));
                None
            }
        });
        got.ok_or_else(|| Error::Timeout {
            what: format!("{} to run (last: {last})", self.name),
            timeout,
            detail: format!("; console tail:\n{}", self.console_tail()),
        })
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
        if self.owned && !self.removed {
            let _ = self.libvirt.destroy_and_undefine(&self.name);
        }
    }
}

/// `N` from a console line `ACK N`.
pub fn parse_ack(line: &str) -> Option<u64> {
    line.trim().strip_prefix("ACK ")?.trim().parse().ok()
}

/// `(bytes, nanoseconds)` from a console line `RATE <bytes> <ns>`
/// ([`Workload::Dd`]).
pub fn parse_rate(line: &str) -> Option<(u64, u64)> {
    let mut w = line.trim().strip_prefix("RATE ")?.split_whitespace();
    let bytes = w.next()?.parse().ok()?;
    let ns = w.next()?.parse().ok()?;
    w.next().is_none().then_some((bytes, ns))
}

/// The domain XML for a TCG guest booting `image` directly (no firmware
/// disk, no graphics), its serial console going to `console` (named
/// `name`; `config.name` and `config.console` are not looked at here).
/// With a [`Disk::TandemNbd`] the disk is in `<qemu:commandline>` and the
/// domain declares the `qemu` XML namespace.
pub fn domain_xml(name: &str, image: &GuestImage, config: &GuestConfig, console: &Path) -> String {
    let mut cmdline = format!(
        "console=ttyS0 panic=-1 loglevel=4 {}",
        config.workload.cmdline()
    );
    if !config.extra_cmdline.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(&config.extra_cmdline);
    }
    let append = if config.console_append {
        " append='on'"
    } else {
        ""
    };
    let (xmlns, commandline) = match config.disk.qemu_commandline() {
        Some(c) => (format!(" xmlns:qemu='{QEMU_XMLNS}'"), format!("\n  {c}")),
        None => (String::new(), String::new()),
    };
    format!(
        "<domain type='qemu'{xmlns}>\n\
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
         \x20   <serial type='file'><source path='{console}'{append}/><target port='0'/></serial>\n\
         \x20   <controller type='usb' model='none'/>\n\
         \x20   <memballoon model='none'/>\n\
         \x20 </devices>{commandline}\n\
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

fn create_dir(dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        what: format!("cannot create {}", dir.display()),
        source,
    })
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
    fn rate_lines_parse() {
        assert_eq!(
            parse_rate("RATE 1048576 250000000"),
            Some((1 << 20, 250_000_000))
        );
        assert_eq!(parse_rate("RATE 1 2 3"), None);
        assert_eq!(parse_rate("RATE x 2"), None);
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

    #[test]
    fn a_tandem_nbd_disk_is_a_blockdev_with_reconnect_delay_on_the_command_line() {
        let d = Disk::TandemNbd {
            socket: "/var/tmp/t/nbd/vda.sock".into(),
            export: "web01-vda".into(),
            reconnect_delay_secs: 30,
        };
        assert_eq!(d.xml(), "");
        let c = d.qemu_commandline().expect("a command line");
        let unescaped = c.replace("&quot;", "\"");
        let expected = [
            "<qemu:arg value='-blockdev'/>",
            "<qemu:arg value='{\"driver\":\"raw\",\"node-name\":\"tandem-vda\",\
             \"file\":{\"driver\":\"nbd\",\"node-name\":\"tandem-vda-nbd\",\
             \"server\":{\"type\":\"unix\",\"path\":\"/var/tmp/t/nbd/vda.sock\"},\
             \"export\":\"web01-vda\",\"reconnect-delay\":30}}'/>",
            "<qemu:arg value='-device'/>",
            "<qemu:arg value='virtio-blk-pci,drive=tandem-vda,id=tandem-vda-dev,bus=pci.0,addr=0x9'/>",
        ];
        let mut at = 0;
        for e in expected {
            let i = unescaped[at..]
                .find(e)
                .unwrap_or_else(|| panic!("{e} after {at} in {unescaped}"));
            at += i + e.len();
        }
        assert!(c.starts_with("<qemu:commandline>"), "{c}");
        assert!(c.ends_with("</qemu:commandline>"), "{c}");
    }

    #[test]
    fn json_strings_are_escaped_inside_the_blockdev() {
        assert_eq!(json_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
        let c = tandem_nbd_commandline(Path::new("/x'y.sock"), "e<1>", 5);
        assert!(c.contains("/x&apos;y.sock"), "{c}");
        assert!(c.contains("e&lt;1&gt;"), "{c}");
    }
}
