//! `tandem demo --vm`: the demo's story with a real guest. The same
//! witness and three sites (ny, chicago, seattle) as child processes, but
//! each site has a libvirt daemon of its own (`tandem_vmkit::SiteLibvirt`:
//! libvirtd and virtlogd in a private mount namespace) named in its
//! `[libvirt] uri`, and no group until `tandem protect` makes one.
//!
//! 1. the libvirt daemons, the witness and the agents start;
//! 2. `web01` boots at ny: a TCG guest (Debian kernel, busybox initramfs,
//!    `tandem_vmkit::GuestImage`) on a local raw file holding an ext4 file
//!    system; it writes numbered files `/data/fN`, and prints `ACK N` on
//!    its serial console once file and directory are fsync()ed;
//! 3. `tandem protect web01 --replica chicago:1 --replica seattle:2 --mode
//!    sync` (`POST /api/v1/protect` on ny) moves its disk onto a volume
//!    while it runs; the pause at the pivot is shown, then the replicas'
//!    initial sync;
//! 4. it writes on (sync mode: an ACK means the file is on a replica too);
//! 5. ny's host is lost: SIGKILL of its agent, then of its libvirt daemon
//!    and web01's QEMU (`crash_host`). chicago's agent takes the group and
//!    starts web01 from the replicated definition; measured: kill -> its
//!    QEMU running, kill -> the guest's first new ACK;
//! 6. the data: web01 is suspended at chicago for a moment while chicago's
//!    volume image is copied; on the copy the journal is replayed (as a
//!    mount would), `e2fsck -n -f` must find it clean, and every file
//!    acknowledged at ny before the kill must be intact.
//!
//! The console file is the same path at every site (the definition
//! travels with the group) and is opened with `append='on'`: it is the
//! guest's whole history, ny's boot and then chicago's. The guest at
//! chicago finds the files already there and goes on numbering after the
//! highest (`RESUME M`).
//!
//! Everything lives in `/var/tmp/tandem-demo-*` (the guest's raw file is
//! opened with O_DIRECT, which tmpfs refuses). Without the hypervisor and
//! the guest-image tools the demo stops before starting anything, naming
//! the Debian packages ([`preflight`]).

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tandem_agent::onboard::{ProtectRequest, ReplicaRequest};
use tandem_agent::status::{GroupStatus, OnboardingStage, ReplicaState, Role};
use tandem_config::format_size_approx as size;
use tandem_hypervisor::DomainState;
use tandem_vmkit::{ext4, Disk, Guest, GuestConfig, GuestImage, SiteLibvirt, Workload};

use crate::api;
use crate::cluster::{Cluster, SiteName, GROUP};
use crate::console::{say, Console};
use crate::error::{DemoError, VmAction, Wait};
use crate::scenario::{demo_dir, describe, roles, step_of, Options};

use SiteName::{Chicago, Ny, Seattle};

/// The guest, and the group `tandem protect` makes for it (named after it).
pub const VM: &str = GROUP;
/// The group's volume for the guest's disk `vda`.
pub const VM_VOLUME: &str = "web01-vda";
/// The guest's data disk.
pub const DISK_SIZE: u64 = 64 << 20;
const STEPS: u32 = 6;
/// A TCG boot takes 6-17 s on two cores (tandem-vmkit's measurements).
const BOOT: Duration = Duration::from_secs(120);
/// From the host loss until the VM's QEMU runs at chicago.
const FAILOVER: Duration = Duration::from_secs(60);
/// Files the guest writes at ny before `tandem protect`, and after it
/// before the host loss.
const ACKS_BEFORE_PROTECT: usize = 5;
const ACKS_BEFORE_KILL: usize = 10;
/// Files written at chicago before the data is checked.
const ACKS_AT_CHICAGO: usize = 3;

/// A command `tandem demo --vm` runs (itself or through tandem-vmkit, or
/// the agents through libvirt), and the Debian package that brings it.
const TOOLS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("virsh", "libvirt-clients"),
    ("libvirtd", "libvirt-daemon-system"),
    ("virtlogd", "libvirt-daemon-system"),
    ("mkfs.ext4", "e2fsprogs"),
    ("e2fsck", "e2fsprogs"),
    ("debugfs", "e2fsprogs"),
    ("cpio", "cpio"),
    ("depmod", "kmod"),
    ("modinfo", "kmod"),
    ("gzip", "gzip"),
    ("unshare", "util-linux"),
    ("dpkg-deb", "dpkg"),
    ("apt-get", "apt"),
];

/// What `tandem demo --vm` measured.
#[derive(Clone, Debug)]
pub struct VmSummary {
    /// The guest's pause when `tandem protect` switched its disk onto the
    /// volume, as the agent measured it.
    pub pivot_ms: Option<f64>,
    /// From `tandem protect` until both replicas streamed.
    pub protect: Duration,
    /// From the host loss at ny until web01's QEMU ran at chicago.
    pub vm_running: Duration,
    /// From the host loss at ny until the guest at chicago acknowledged a
    /// new file.
    pub first_write: Duration,
    /// chicago's epoch as the new owner.
    pub epoch: u64,
    /// Files the guest acknowledged at ny before the host loss.
    pub acked_at_ny: usize,
    /// Of those, intact in chicago's volume.
    pub intact: usize,
    /// Of those, missing or damaged (0 in sync mode).
    pub lost: usize,
    /// Files acknowledged at chicago (all intact).
    pub acked_at_chicago: usize,
    /// The whole story, from the start of the processes.
    pub total: Duration,
}

/// Checks that the hypervisor, libvirt and the guest-image tools are
/// installed and that this is root, before anything starts.
pub fn preflight() -> Result<(), DemoError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    let busybox_static = Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", "busybox-static"])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.starts_with(b"installed"));
    missing_tools(&dirs, &["/usr/sbin", "/sbin"], busybox_static)?;
    if !rustix::process::geteuid().is_root() {
        return Err(DemoError::VmNotRoot);
    }
    Ok(())
}

/// The error naming what is missing from `dirs` (PATH), if anything; a
/// command found in one of `elsewhere` only is named with that place.
fn missing_tools(
    dirs: &[PathBuf],
    elsewhere: &[&str],
    busybox_static: bool,
) -> Result<(), DemoError> {
    let mut missing = Vec::new();
    let mut packages: Vec<&'static str> = Vec::new();
    for (command, package) in TOOLS {
        if dirs.iter().any(|d| d.join(command).is_file()) {
            continue;
        }
        // libvirtd and virtlogd live in /usr/sbin, not on every PATH.
        match elsewhere
            .iter()
            .find(|d| Path::new(d).join(command).is_file())
        {
            Some(dir) => missing.push(format!("{command} (it is in {dir}: add {dir} to PATH)")),
            None => {
                missing.push((*command).to_owned());
                if !packages.contains(package) {
                    packages.push(package);
                }
            }
        }
    }
    if !busybox_static {
        missing.push("a static busybox (for the guest's initramfs)".to_owned());
        packages.push("busybox-static");
    }
    if packages.contains(&"qemu-system-x86") {
        packages.push("qemu-utils");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(DemoError::VmTools { missing, packages })
    }
}

/// Each site's libvirt daemon, by site.
struct Hosts {
    /// In the order of [`SiteName::ALL`].
    sites: Vec<SiteLibvirt>,
}

impl Hosts {
    fn start(out: &mut Console) -> Result<Hosts, DemoError> {
        let mut sites = Vec::new();
        for name in SiteName::ALL {
            let site =
                SiteLibvirt::start(&format!("demo-{name}")).map_err(|source| DemoError::Vm {
                    action: VmAction::StartLibvirt(name),
                    source,
                })?;
            say!(out, "  {name:<8} libvirt {}", site.uri());
            sites.push(site);
        }
        Ok(Hosts { sites })
    }

    fn get(&self, name: SiteName) -> &SiteLibvirt {
        let i = SiteName::ALL.iter().position(|s| *s == name).unwrap_or(0);
        &self.sites[i]
    }

    fn uris(&self) -> [&str; 3] {
        [
            self.get(Ny).uri(),
            self.get(Chicago).uri(),
            self.get(Seattle).uri(),
        ]
    }

    /// The sites where web01's QEMU runs now.
    fn running(&self) -> Vec<SiteName> {
        SiteName::ALL
            .into_iter()
            .filter(|s| self.get(*s).qemu_pid(VM).is_some())
            .collect()
    }
}

/// The guest's serial console: one file for every site's QEMU (appended
/// to), read as lines.
struct GuestConsole {
    path: PathBuf,
}

impl GuestConsole {
    /// The complete lines so far (`\r` removed); none while the file does
    /// not exist or cannot be read.
    fn lines(&self) -> Vec<String> {
        let bytes = std::fs::read(&self.path).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        let mut lines: Vec<String> = text.split('\n').map(|l| l.replace('\r', "")).collect();
        lines.pop(); // an unfinished line, or "" after the last '\n'
        lines
    }

    fn acks(lines: &[String]) -> Vec<u64> {
        lines
            .iter()
            .filter_map(|l| tandem_vmkit::parse_ack(l))
            .collect()
    }

    fn tail(&self) -> String {
        let lines = self.lines();
        let from = lines.len().saturating_sub(20);
        let mut out = format!(
            "--- last lines of {}'s console ({}) ---\n",
            VM,
            self.path.display()
        );
        for l in &lines[from..] {
            out.push_str(l);
            out.push('\n');
        }
        out
    }

    /// The first line after line `from` that says the guest failed.
    fn failure(&self, lines: &[String], from: usize) -> Option<DemoError> {
        let bad = lines.get(from..)?.iter().find(|l| is_error(l))?;
        Some(DemoError::GuestFailed {
            line: bad.clone(),
            tail: self.tail(),
        })
    }
}

/// What the guest prints when its disk or its init fails it.
fn is_error(line: &str) -> bool {
    line.contains("TANDEM-ERROR")
        || line.contains("I/O error")
        || line.contains("EXT4-fs error")
        || line.contains("Buffer I/O")
        || line.contains("Kernel panic")
        || line.contains("Remounting filesystem read-only")
}

/// Adds the guest's console to a wait that timed out.
fn with_console(e: DemoError, console: &GuestConsole) -> DemoError {
    match e {
        DemoError::Timeout {
            what,
            timeout,
            mut logs,
        } => {
            logs.push_str(&console.tail());
            DemoError::Timeout {
                what,
                timeout,
                logs,
            }
        }
        other => other,
    }
}

fn vmkit(action: VmAction) -> impl FnOnce(tandem_vmkit::Error) -> DemoError {
    move |source| DemoError::Vm { action, source }
}

/// Runs `tandem demo --vm` (see the module docs).
pub(crate) fn run(options: Options) -> Result<VmSummary, DemoError> {
    let Options {
        exe,
        keep,
        interrupted,
        mut console,
        vm: _,
    } = options;
    preflight()?;
    let tmp = demo_dir("/var/tmp")?;
    let dir = tmp.path().to_path_buf();
    let out = &mut console;
    let started = Instant::now();
    say!(
        out,
        "Tandem demo with a real VM: a witness and three sites on this machine (loopback), \
         each with its own libvirt daemon"
    );
    say!(out, "  directory {}", dir.display());
    step_of(
        out,
        1,
        STEPS,
        "starting a libvirt daemon per site, the witness and the three agents",
    )?;
    // Declared before the cluster, so dropped after it: the agents stop
    // before their hypervisors go.
    let hosts = match Hosts::start(out) {
        Ok(h) => h,
        Err(e) => return Err(failed(out, &dir, tmp, e)),
    };
    let mut cluster = match Cluster::with_libvirt(&dir, exe, keep, interrupted, hosts.uris()) {
        Ok(c) => c,
        Err(e) => return Err(failed(out, &dir, tmp, e)),
    };
    let mut guest = None;
    match flow(&mut cluster, &hosts, &mut guest, out, &dir) {
        Ok(mut summary) => {
            summary.total = started.elapsed();
            say!(out);
            say!(out, "{summary}");
            if keep {
                print_kept(out, &cluster, &hosts);
                cluster.detach();
                // The guest's handle is on ny's daemon, which is gone.
                std::mem::forget(guest);
                for site in hosts.sites {
                    site.leave_running();
                }
                let _ = tmp.keep();
            } else {
                let killed = cluster.stop_all(Duration::from_secs(15));
                if !killed.is_empty() {
                    let names: Vec<String> = killed.iter().map(ToString::to_string).collect();
                    say!(out, "(had to SIGKILL {} on the way out)", names.join(", "));
                }
                drop(guest);
                drop(hosts);
                drop(tmp);
                say!(
                    out,
                    "stopped everything (agents, witness, libvirt daemons, {VM}) and removed {}",
                    dir.display()
                );
            }
            out.check()?;
            Ok(summary)
        }
        Err(e) => {
            let _ = cluster.stop_all(Duration::from_secs(10));
            drop(guest);
            drop(hosts);
            Err(failed(out, &dir, tmp, e))
        }
    }
}

/// Keeps the directory of a demo that failed, for its logs.
fn failed(out: &mut Console, dir: &Path, tmp: tempfile::TempDir, e: DemoError) -> DemoError {
    let _ = tmp.keep();
    out.error_line(format_args!(
        "the demo failed; its logs and data are kept in {} (remove it with rm -rf)",
        dir.display()
    ));
    e
}

fn flow(
    c: &mut Cluster,
    hosts: &Hosts,
    guest_slot: &mut Option<Guest>,
    out: &mut Console,
    dir: &Path,
) -> Result<VmSummary, DemoError> {
    let t0 = Instant::now();
    c.start_witness()?;
    say!(
        out,
        "  witness  {}  pid {}",
        c.witness_addr(),
        c.witness().pid().unwrap_or(0)
    );
    for name in SiteName::ALL {
        c.start_site(name)?;
        let s = c.site(name);
        say!(
            out,
            "  {name:<8} API http://{}  pid {}  log {}",
            s.api,
            s.proc.pid().unwrap_or(0),
            s.proc.log.display()
        );
    }
    out.done(&format!(
        "everything runs ({:.1} s); no group yet",
        t0.elapsed().as_secs_f64()
    ));

    // 2. The guest at ny, on a local raw file.
    step_of(
        out,
        2,
        STEPS,
        &format!(
            "booting {VM} at ny: a TCG guest (Debian kernel, busybox) on a local {} ext4 disk; \
             it writes /data/f1, f2, ... and prints ACK N once each file is fsync()ed",
            size(DISK_SIZE)
        ),
    )?;
    let image = GuestImage::ensure().map_err(vmkit(VmAction::GuestImage))?;
    let work = dir.join("guest");
    let disk = work.join("web01.img");
    std::fs::create_dir_all(&work).map_err(|source| DemoError::CreateDir {
        base: work.clone(),
        source,
    })?;
    ext4::make_ext4(&disk, DISK_SIZE).map_err(vmkit(VmAction::MakeDisk))?;
    let console = GuestConsole {
        path: work.join("web01.console"),
    };
    let config = GuestConfig::new("demo", Disk::File(disk.clone()), Workload::Write, &work)
        .with_name(VM)
        .with_console(&console.path)
        .with_console_appended();
    let booted = Instant::now();
    let guest = guest_slot.insert(
        Guest::start(hosts.get(Ny).libvirt(), &image, &config)
            .map_err(vmkit(VmAction::StartGuest))?,
    );
    say!(
        out,
        "  disk {}; console {}",
        disk.display(),
        guest.console_path().display()
    );
    wait_acks(c, out, &console, Ny, ACKS_BEFORE_PROTECT, booted)?;
    let ny_qemu = hosts.get(Ny).qemu_pid(VM);
    out.done(&format!(
        "{VM} runs at ny (QEMU pid {}) and writes: {ACKS_BEFORE_PROTECT} files acknowledged \
         {:.1} s after it started",
        ny_qemu.unwrap_or(0),
        booted.elapsed().as_secs_f64()
    ));

    // 3. tandem protect, while it writes.
    step_of(
        out,
        3,
        STEPS,
        &format!(
            "tandem protect {VM} --replica chicago:1 --replica seattle:2 --mode sync \
             (on ny, while {VM} writes)"
        ),
    )?;
    let protect_started = Instant::now();
    let request = ProtectRequest {
        domain: VM.to_owned(),
        replicas: vec![
            ReplicaRequest {
                site: Chicago.as_str().to_owned(),
                priority: Some(1),
            },
            ReplicaRequest {
                site: Seattle.as_str().to_owned(),
                priority: Some(2),
            },
        ],
        mode: Some("sync".to_owned()),
        group: None,
    };
    let accepted = api::protect(&c.site(Ny).config, &request)
        .map_err(|source| DemoError::Protect { site: Ny, source })?;
    say!(
        out,
        "  group {} defined at ny (volume {VM_VOLUME}, {}); vda moves onto it while {VM} runs",
        accepted.group,
        size(DISK_SIZE)
    );
    let pivot_ms = wait_onboarded(c, out, &console)?;
    let pivot_text = pivot_ms.map_or_else(|| "not measured".to_owned(), |ms| format!("{ms:.0} ms"));
    out.done(&format!(
        "vda is on ny's volume {VM_VOLUME} (NBD); the guest's pause at the pivot: {pivot_text}"
    ));
    let now_qemu = hosts.get(Ny).qemu_pid(VM);
    match ny_qemu {
        Some(before) if now_qemu == Some(before) => say!(
            out,
            "  {VM} never stopped: the same QEMU (pid {before}), still writing"
        ),
        Some(before) => {
            return Err(DemoError::GuestRestarted {
                pid_before: before,
                pid_after: now_qemu,
            })
        }
        None => {}
    }
    wait_replicas(c, out)?;
    for site in [Chicago, Seattle] {
        let path = c
            .site(site)
            .data_dir
            .join("vms")
            .join(format!("{GROUP}.xml"));
        c.wait_for(
            Wait::Definition(site),
            Duration::from_secs(30),
            &[Ny, site],
            |_| {
                std::fs::read_to_string(&path)
                    .is_ok_and(|x| x.contains(&format!("<name>{VM}</name>")))
                    .then_some(())
            },
        )?;
    }
    let protect = protect_started.elapsed();
    out.done(&format!(
        "chicago and seattle stream {GROUP} ({:.1} s after tandem protect); {VM}'s definition \
         is at both",
        protect.as_secs_f64()
    ));

    // 4. It writes on.
    step_of(
        out,
        4,
        STEPS,
        &format!("{VM} writes on; sync mode: a file is acknowledged only once a replica has it"),
    )?;
    // Sync mode promotes the replica that holds the most of the stream
    // (priority breaks ties): with seattle's link paused, that is chicago.
    api::set_bandwidth(&c.site(Ny).config, Seattle.as_str(), "paused").map_err(|source| {
        DemoError::Bandwidth {
            site: Ny,
            peer: Seattle,
            source,
        }
    })?;
    say!(
        out,
        "  ny's link to seattle is paused (as if that WAN were down): chicago alone holds the \
         newest writes, so it is the one to take over"
    );
    let so_far = GuestConsole::acks(&console.lines()).len();
    wait_acks(
        c,
        out,
        &console,
        Ny,
        so_far + ACKS_BEFORE_KILL,
        Instant::now(),
    )?;
    let lines = console.lines();
    out.done(&format!(
        "{} files acknowledged in all (last: ACK {})",
        GuestConsole::acks(&lines).len(),
        GuestConsole::acks(&lines).last().copied().unwrap_or(0)
    ));

    // 5. Host loss at ny.
    step_of(
        out,
        5,
        STEPS,
        &format!(
            "host loss at ny: SIGKILL of its agent, then of its libvirt daemon and {VM}'s QEMU"
        ),
    )?;
    let agent_pid = c.site(Ny).proc.pid().unwrap_or(0);
    let qemu_pid = hosts.get(Ny).qemu_pid(VM).unwrap_or(0);
    let killed = Instant::now();
    c.kill_site(Ny)?;
    hosts
        .get(Ny)
        .crash_host()
        .map_err(vmkit(VmAction::CrashHost(Ny)))?;
    // ny's QEMU is dead: every ACK it printed is in the file now.
    let before_kill = console.lines();
    let acked_at_ny: BTreeSet<u64> = GuestConsole::acks(&before_kill).into_iter().collect();
    let last = acked_at_ny.last().copied().unwrap_or(0);
    say!(
        out,
        "  ny is gone (agent pid {agent_pid}, QEMU pid {qemu_pid}) after ACK {last}: \
         {} files acknowledged there",
        acked_at_ny.len()
    );
    let chicago_qemu = c
        .wait_for(
            Wait::VmRunning(Chicago),
            FAILOVER,
            &[Chicago, Seattle],
            |_| {
                let pid = hosts.get(Chicago).qemu_pid(VM);
                if pid.is_none() {
                    out.progress(
                        None,
                        "failover",
                        &format!(
                            "waiting for chicago to take over and start {VM}... {:.1} s",
                            killed.elapsed().as_secs_f64()
                        ),
                    );
                }
                pid
            },
        )
        .map_err(|e| with_console(e, &console))?;
    let vm_running = killed.elapsed();
    out.done(&format!(
        "{VM}'s QEMU runs at chicago {:.2} s after the host loss (pid {chicago_qemu})",
        vm_running.as_secs_f64()
    ));
    let g = c.wait_for(
        Wait::VmPrimary(Chicago),
        Duration::from_secs(30),
        &[Chicago],
        |c| {
            let g = c.site(Chicago).group().ok()?;
            (g.role == Role::Primary && vm_state(&g) == Some(DomainState::Running)).then_some(g)
        },
    )?;
    let epoch = g.epoch;
    say!(
        out,
        "  chicago is primary in epoch {epoch} (priority 1) and its agent started {VM} from the \
         replicated definition, its disk on chicago's volume"
    );
    let from = before_kill.len();
    let mut resumed = None;
    let first = c
        .wait_for(
            Wait::GuestWritesAgain {
                site: Chicago,
                after: last,
            },
            BOOT,
            &[Chicago],
            |_| {
                let lines = console.lines();
                if let Some(e) = console.failure(&lines, from) {
                    return Some(Err(e));
                }
                let new = lines.get(from..).unwrap_or_default();
                resumed = new
                    .iter()
                    .find_map(|l| l.strip_prefix("RESUME ")?.trim().parse::<u64>().ok())
                    .or(resumed);
                let ack = GuestConsole::acks(new).into_iter().find(|n| *n > last);
                if ack.is_none() {
                    let state = new.last().map_or("starting", String::as_str);
                    out.progress(
                        None,
                        "boot",
                        &format!(
                            "{VM} booting at chicago... {:.1} s after the host loss ({})",
                            killed.elapsed().as_secs_f64(),
                            shorten(state)
                        ),
                    );
                }
                ack.map(Ok)
            },
        )
        .map_err(|e| with_console(e, &console))??;
    let first_write = killed.elapsed();
    out.done(&format!(
        "{VM} at chicago found f{} as its last file and wrote f{first}: {:.1} s after the host \
         loss",
        resumed.unwrap_or(0),
        first_write.as_secs_f64()
    ));
    c.wait_for(
        Wait::Follows {
            replica: Seattle,
            owner: Chicago,
        },
        Duration::from_secs(30),
        &[Seattle, Chicago],
        |c| {
            let g = c.site(Seattle).group().ok()?;
            (g.role == Role::Replica
                && g.primary == Chicago.as_str()
                && g.replicas
                    .first()
                    .is_some_and(|r| r.state == ReplicaState::Streaming))
            .then_some(())
        },
    )?;
    say!(
        out,
        "  seattle follows chicago and is streaming; {VM} runs at {}",
        hosts
            .running()
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );

    // 6. The data at chicago.
    step_of(out, 6, STEPS, &format!("checking {VM}'s disk at chicago"))?;
    let written = GuestConsole::acks(&console.lines()).len();
    wait_acks(
        c,
        out,
        &console,
        Chicago,
        written + ACKS_AT_CHICAGO,
        Instant::now(),
    )?;
    let checked = check_data(c, hosts, out, &console, dir, &acked_at_ny, from)?;
    if !checked.lost.is_empty() {
        return Err(DemoError::LostAcked {
            files: checked.lost,
        });
    }
    Ok(VmSummary {
        pivot_ms,
        protect,
        vm_running,
        first_write,
        epoch,
        acked_at_ny: acked_at_ny.len(),
        intact: checked.intact,
        lost: 0,
        acked_at_chicago: checked.at_chicago,
        total: Duration::ZERO,
    })
}

/// The VM's state in a group's status.
fn vm_state(g: &GroupStatus) -> Option<DomainState> {
    g.vm.as_ref().map(|v| v.state)
}

/// A console line, cut for a progress line.
fn shorten(line: &str) -> String {
    let mut s: String = line.chars().take(40).collect();
    if s.len() < line.len() {
        s.push_str("...");
    }
    s
}

/// Waits until the console shows `count` ACK lines in all (the guest runs
/// at `site`); fails at once when the guest reports an error.
fn wait_acks(
    c: &mut Cluster,
    out: &mut Console,
    console: &GuestConsole,
    site: SiteName,
    count: usize,
    since: Instant,
) -> Result<(), DemoError> {
    c.wait_for(Wait::GuestAcks { site, count }, BOOT, &[site], |_| {
        let lines = console.lines();
        if let Some(e) = console.failure(&lines, 0) {
            return Some(Err(e));
        }
        let acks = GuestConsole::acks(&lines);
        if acks.len() >= count {
            return Some(Ok(()));
        }
        let text = match acks.last() {
            Some(n) => format!("{VM} at {site}: ACK {n}"),
            None => format!(
                "{VM} booting at {site}... {:.1} s ({})",
                since.elapsed().as_secs_f64(),
                shorten(lines.last().map_or("starting", String::as_str))
            ),
        };
        #[allow(clippy::cast_precision_loss)] // counts of a few dozen
        let fraction = acks.len() as f64 / count as f64;
        out.progress(Some(fraction), &format!("{}", acks.is_empty()), &text);
        None
    })
    .map_err(|e| with_console(e, console))?
}

/// Waits until ny's onboarding of the VM is done; returns the pivot pause.
fn wait_onboarded(
    c: &mut Cluster,
    out: &mut Console,
    console: &GuestConsole,
) -> Result<Option<f64>, DemoError> {
    c.wait_for(Wait::Onboarded, Duration::from_secs(180), &[Ny], |c| {
        let g = c.site(Ny).group().ok()?;
        let onboarding = g.vm.as_ref()?.onboarding.as_ref()?;
        let stage = onboarding.stage;
        let word = stage_word(stage);
        match stage {
            OnboardingStage::Done => {
                return Some(Ok(onboarding.disks.first().and_then(|d| d.pivot_ms)));
            }
            OnboardingStage::Failed | OnboardingStage::Interrupted => {
                return Some(Err(DemoError::Onboarding {
                    stage: word.to_owned(),
                    reason: onboarding
                        .error
                        .clone()
                        .unwrap_or_else(|| "no reason given".to_owned()),
                }));
            }
            OnboardingStage::Preparing | OnboardingStage::Copying | OnboardingStage::Defining => {}
        }
        let (copied, total) = onboarding
            .disks
            .iter()
            .fold((0, 0), |(c, t), d| (c + d.copied_bytes, t + d.total_bytes));
        #[allow(clippy::cast_precision_loss)] // a ratio for a bar
        let fraction = (total > 0).then(|| copied as f64 / total as f64);
        out.progress(
            fraction,
            word,
            &format!("{word}: vda {} of {}", size(copied), size(total)),
        );
        None
    })
    .map_err(|e| with_console(e, console))?
}

fn stage_word(stage: OnboardingStage) -> &'static str {
    match stage {
        OnboardingStage::Preparing => "preparing",
        OnboardingStage::Copying => "copying",
        OnboardingStage::Defining => "defining",
        OnboardingStage::Done => "done",
        OnboardingStage::Failed => "failed",
        OnboardingStage::Interrupted => "interrupted",
    }
}

/// Waits until ny's two replicas stream (their initial sync done).
fn wait_replicas(c: &mut Cluster, out: &mut Console) -> Result<(), DemoError> {
    let since = Instant::now();
    c.wait_for(
        Wait::ReplicasStreaming,
        Duration::from_secs(120),
        &[Ny, Chicago, Seattle],
        |c| {
            let g = c.site(Ny).group().ok()?;
            let done = g.replicas.len() == 2
                && g.replicas
                    .iter()
                    .all(|r| r.state == ReplicaState::Streaming && !r.resyncing);
            if !done {
                let (compared, total) = g
                    .replicas
                    .iter()
                    .filter_map(|r| r.resync.as_ref())
                    .fold((0, 0), |(c, t), p| {
                        (c + p.compared_bytes, t + p.total_bytes)
                    });
                #[allow(clippy::cast_precision_loss)] // a ratio for a bar
                let fraction = (total > 0).then(|| compared as f64 / total as f64);
                out.progress(
                    fraction,
                    &roles(&g),
                    &format!(
                        "initial sync: ny {} ({:.1} s)",
                        describe(&g),
                        since.elapsed().as_secs_f64()
                    ),
                );
            }
            done.then_some(())
        },
    )
}

/// Suspends the guest at chicago for the time of a copy of chicago's
/// volume image, then checks the copy: journal replayed, `e2fsck -n -f`
/// clean, and each acknowledged file intact.
fn check_data(
    c: &Cluster,
    hosts: &Hosts,
    out: &mut Console,
    console: &GuestConsole,
    dir: &Path,
    acked_at_ny: &BTreeSet<u64>,
    from: usize,
) -> Result<Checked, DemoError> {
    let libvirt = hosts.get(Chicago).libvirt();
    let image = c.site(Chicago).config.volume_image_path(VM_VOLUME);
    let copy = dir.join("chicago-copy.img");
    libvirt
        .virsh(&["suspend", VM])
        .map_err(vmkit(VmAction::Suspend(Chicago)))?;
    // Suspended: QEMU has finished its requests, and chicago, the primary,
    // wrote each to its image before answering.
    let lines = console.lines();
    let copied = std::fs::copy(&image, &copy);
    let resumed = libvirt.virsh(&["resume", VM]);
    copied.map_err(|source| DemoError::CopyImage {
        from: image.clone(),
        to: copy.clone(),
        source,
    })?;
    resumed.map_err(vmkit(VmAction::Resume(Chicago)))?;
    say!(
        out,
        "  {VM} suspended at chicago while its volume image was copied ({}), then resumed",
        image.display()
    );
    ext4::replay_journal(&copy).map_err(vmkit(VmAction::ReplayJournal))?;
    ext4::fsck(&copy).map_err(vmkit(VmAction::Fsck))?;
    let files = ext4::verify_numbered_files(&copy).map_err(vmkit(VmAction::ReadFiles))?;
    let _ = std::fs::remove_file(&copy);
    say!(
        out,
        "  on a copy: journal replayed (as a mount after a crash would), e2fsck -n -f finds \
         it clean, {} numbered files",
        files.len()
    );
    let check = |n: &u64| match files.get(n) {
        Some(Ok(())) => None,
        Some(Err(why)) => Some((*n, format!("damaged: {why}"))),
        None => Some((*n, "missing".to_owned())),
    };
    let lost: Vec<(u64, String)> = acked_at_ny.iter().filter_map(check).collect();
    let intact = acked_at_ny.len() - lost.len();
    say!(
        out,
        "  files acknowledged at ny before the host loss: {}; intact at chicago: {intact}; \
         lost: {}",
        acked_at_ny.len(),
        lost.len()
    );
    let at_chicago = GuestConsole::acks(lines.get(from..).unwrap_or_default());
    let bad: Vec<(u64, String)> = at_chicago.iter().filter_map(check).collect();
    say!(
        out,
        "  files acknowledged at chicago since: {}; intact: {}",
        at_chicago.len(),
        at_chicago.len() - bad.len()
    );
    if !bad.is_empty() {
        return Err(DemoError::LostAcked { files: bad });
    }
    Ok(Checked {
        intact,
        lost,
        at_chicago: at_chicago.len(),
    })
}

/// What [`check_data`] found.
struct Checked {
    /// Files acknowledged at ny that are intact at chicago.
    intact: usize,
    /// Those that are not, with why.
    lost: Vec<(u64, String)>,
    /// Files acknowledged at chicago (all intact, or it fails).
    at_chicago: usize,
}

impl fmt::Display for VmSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "Summary")?;
        {
            let mut row = |what: &str, value: String| writeln!(f, "  {what:<64} {value}");
            row(
                "tandem protect: the guest's pause at the pivot",
                self.pivot_ms
                    .map_or_else(|| "not measured".to_owned(), |ms| format!("{ms:.0} ms")),
            )?;
            row(
                "tandem protect -> both replicas streaming",
                format!("{:.1} s", self.protect.as_secs_f64()),
            )?;
            row(
                "RTO: host loss at ny -> web01 running at chicago",
                format!("{:.2} s", self.vm_running.as_secs_f64()),
            )?;
            row(
                "RTO: host loss at ny -> first write by web01 at chicago",
                format!(
                    "{:.1} s  (the guest's boot under TCG is most of it)",
                    self.first_write.as_secs_f64()
                ),
            )?;
            row(
                "files acknowledged at ny before the host loss",
                self.acked_at_ny.to_string(),
            )?;
            row(
                "of those, intact at chicago (journal replayed, e2fsck clean)",
                self.intact.to_string(),
            )?;
            row(
                "acknowledged files lost (sync mode: 0 expected)",
                self.lost.to_string(),
            )?;
            row(
                "files acknowledged at chicago, intact",
                self.acked_at_chicago.to_string(),
            )?;
        }
        writeln!(f, "  chicago owns web01 in epoch {}", self.epoch)?;
        write!(f, "  total time: {:.1} s", self.total.as_secs_f64())
    }
}

/// `--keep`: where everything is, and how to stop it.
fn print_kept(out: &mut Console, c: &Cluster, hosts: &Hosts) {
    say!(
        out,
        "\nEverything is still running (--keep); chicago is primary for {GROUP} and runs {VM}:"
    );
    say!(
        out,
        "  witness  {}  log {}",
        c.witness_addr(),
        c.witness().log.display()
    );
    for s in c.sites() {
        if s.proc.pid().is_none() {
            say!(
                out,
                "  {:<8} down (its host was lost)  config {}",
                s.name,
                s.config_path.display()
            );
            continue;
        }
        say!(
            out,
            "  {:<8} API http://{}/api/v1/status  config {}",
            s.name,
            s.api,
            s.config_path.display()
        );
    }
    let chicago = hosts.get(Chicago);
    say!(out, "  virsh    virsh -c '{}' list --all", chicago.uri());
    say!(
        out,
        "  try      tandem status --config {}",
        c.site(Chicago).config_path.display()
    );
    let mut pids: Vec<String> = c.pids().iter().map(|(_, p)| p.to_string()).collect();
    let mut roots = Vec::new();
    for site in &hosts.sites {
        for daemon in ["libvirtd", "virtlogd"] {
            if let Ok(text) = std::fs::read_to_string(site.root().join(format!("{daemon}.pid"))) {
                // ny's daemons died with its host; their pid files stay.
                let pid = text.trim();
                if !pid.is_empty()
                    && pid.chars().all(|ch| ch.is_ascii_digit())
                    && Path::new("/proc").join(pid).exists()
                {
                    pids.push(pid.to_owned());
                }
            }
        }
        if let Ok(qemus) = site.qemu_pids() {
            pids.extend(qemus.iter().map(ToString::to_string));
        }
        roots.push(site.root().display().to_string());
    }
    say!(
        out,
        "  stop     kill -9 {} && rm -rf {} {}",
        pids.join(" "),
        c.dir().display(),
        roots.join(" ")
    );
    say!(
        out,
        "           (the libvirt daemons' roots are also swept by the next tandem demo --vm)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tools_name_their_debian_packages() {
        let empty = tempfile::tempdir().expect("tempdir");
        let e =
            missing_tools(&[empty.path().to_path_buf()], &[], false).expect_err("nothing there");
        let text = e.to_string();
        for package in [
            "qemu-system-x86",
            "qemu-utils",
            "libvirt-daemon-system",
            "libvirt-clients",
            "busybox-static",
            "e2fsprogs",
            "cpio",
            "kmod",
        ] {
            assert!(text.contains(package), "{package} not named: {text}");
        }
        assert!(text.contains("qemu-system-x86_64"), "{text}");
        assert!(text.contains("scripts/test"), "{text}");
    }

    #[test]
    fn present_tools_are_not_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (command, _) in TOOLS {
            std::fs::write(dir.path().join(command), "").expect("write");
        }
        assert!(missing_tools(&[dir.path().to_path_buf()], &[], true).is_ok());
        std::fs::remove_file(dir.path().join("cpio")).expect("remove");
        match missing_tools(&[dir.path().to_path_buf()], &[], true) {
            Err(DemoError::VmTools { packages, .. }) => assert_eq!(packages, ["cpio"]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_summary_is_a_table_of_rows() {
        let s = VmSummary {
            pivot_ms: Some(42.4),
            protect: Duration::from_millis(3200),
            vm_running: Duration::from_millis(2810),
            first_write: Duration::from_millis(11_500),
            epoch: 2,
            acked_at_ny: 40,
            intact: 40,
            lost: 0,
            acked_at_chicago: 3,
            total: Duration::from_millis(58_300),
        };
        let text = s.to_string();
        assert!(text.starts_with("Summary\n"), "{text}");
        assert!(text.contains("  RTO: host loss at ny -> web01 running at chicago"));
        assert!(text.contains("  acknowledged files lost (sync mode: 0 expected)"));
        assert!(text.contains(" 42 ms\n"), "{text}");
        assert!(text.ends_with("  total time: 58.3 s"), "{text}");
    }

    #[test]
    fn console_errors_are_recognised() {
        assert!(is_error("[   12.3] blk_update_request: I/O error, dev vda"));
        assert!(is_error("TANDEM-ERROR mount /dev/vda"));
        assert!(!is_error("ACK 12"));
        assert_eq!(shorten("short"), "short");
        assert_eq!(shorten(&"x".repeat(50)), format!("{}...", "x".repeat(40)));
    }
}
