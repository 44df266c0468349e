//! The libvirt backend: `virsh -c URI ...`, bounded in time, its output
//! read as libvirt documents it (domain names one per line, `domstate`
//! words, domain XML, `domblkinfo`'s `Capacity:` line). Chosen over
//! binding libvirt's C library (the `virt` crate) so that building Tandem
//! needs no libvirt headers and a host without VMs needs no libvirt at
//! all; every call here is on the control path (a few ms of process start
//! per call), never on the data path (docs/VMS.md).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::qemu;
use crate::xml;
use crate::{
    Destination, DiskInfo, DomainInfo, DomainState, Hypervisor, HypervisorError, KillError,
    MoveError, MoveFailure, MoveOutcome, Progress,
};

/// Most calls answer in milliseconds; libvirt may wait on a busy domain.
/// Every monitor (QMP) command is one such call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// `virsh destroy`, and the state check after it, before the fallback
/// kills QEMU itself (libvirt's own destroy waits up to ~15 s for QEMU).
pub const DESTROY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a SIGKILLed QEMU may take to go.
pub const KILL_WAIT: Duration = Duration::from_secs(10);
/// A live move's copy may take [`MOVE_BASE`] plus the disk's size at
/// [`MOVE_MIN_RATE`] ([`copy_timeout`]).
pub const MOVE_BASE: Duration = Duration::from_secs(60);
/// Bytes per second a live move must average (4 MiB/s: a 100 GiB disk
/// gets 7 h 6 min; a local copy runs at hundreds of MB/s).
pub const MOVE_MIN_RATE: u64 = 4 << 20;
/// From `block-job-complete` until the job concluded (the pivot drains
/// the guest's in-flight requests).
pub const PIVOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Until a cancelled job is gone (QEMU fails in-flight NBD requests at a
/// forced cancel instead of waiting out `reconnect-delay`).
pub const CANCEL_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the copy's progress is asked for.
const COPY_POLL: Duration = Duration::from_millis(250);
/// Output kept per stream.
const OUTPUT_MAX: u64 = 16 << 20;

/// How long a live move may copy a disk of `size` bytes before it is
/// cancelled: [`MOVE_BASE`] + `size` / [`MOVE_MIN_RATE`].
pub fn copy_timeout(size: u64) -> Duration {
    MOVE_BASE + Duration::from_secs(size / MOVE_MIN_RATE)
}

/// Where libvirt's QEMU driver keeps `<domain>.pid` for the connection
/// `uri`, when it is a local one:
///
/// * `qemu:///system` (also `qemu+unix:///system`): `/run/libvirt/qemu`
///   (libvirt's `LOCALSTATEDIR/run/libvirt/qemu`; `/var/run` is `/run`
///   on Debian).
/// * `qemu:///session`: `$XDG_RUNTIME_DIR/libvirt/qemu/run`, or
///   `$HOME/.cache/libvirt/qemu/run` without `XDG_RUNTIME_DIR`.
/// * With a `socket=PATH` parameter (a daemon listening elsewhere than
///   the default, e.g. one with its own state directories): the directory
///   of the socket stands for libvirt's run directory, which holds both
///   the daemon's socket (`/run/libvirt/libvirt-sock`) and the QEMU
///   driver's state (`/run/libvirt/qemu`): `DIR/qemu` for `system`,
///   `DIR/qemu/run` for `session`. (Mapping such a URI to the default
///   directory would read another daemon's pid files: a missing pid file
///   there means "no QEMU runs", and destroy would report success while
///   the guest lives on.)
/// * Anything else (a host in the URI, `+ssh`/`+tls`/`+tcp`, another
///   driver, `qemu:///embed`): `None` — there is no local pid file to
///   read; [`Virsh::with_pid_dir`] can name one.
pub fn qemu_pid_dir(uri: &str) -> Option<PathBuf> {
    let (scheme, rest) = uri.split_once("://")?;
    let (driver, transport) = scheme.split_once('+').unwrap_or((scheme, ""));
    if driver != "qemu" || !matches!(transport, "" | "unix") {
        return None;
    }
    // No host: "qemu:///system" leaves "/system".
    let rest = rest.strip_prefix('/')?;
    let rest = rest.split('#').next().unwrap_or_default();
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let socket_dir = match query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "socket")
    {
        Some((_, v)) => Some(
            PathBuf::from(percent_decode(v)?)
                .parent()
                .filter(|d| d.is_absolute())?
                .to_path_buf(),
        ),
        None => None,
    };
    match (path.trim_end_matches('/'), socket_dir) {
        ("system", Some(dir)) => Some(dir.join("qemu")),
        ("session", Some(dir)) => Some(dir.join("qemu/run")),
        ("system", None) => Some(PathBuf::from("/run/libvirt/qemu")),
        ("session", None) => match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(dir) if !dir.is_empty() => Some(PathBuf::from(dir).join("libvirt/qemu/run")),
            _ => std::env::var_os("HOME")
                .map(|home| PathBuf::from(home).join(".cache/libvirt/qemu/run")),
        },
        _ => None,
    }
}

/// A URI query value with its `%XX` escapes decoded (`None` if one is
/// malformed or the result is not UTF-8).
fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

pub struct Virsh {
    uri: String,
    program: String,
    pid_dir: Option<PathBuf>,
    /// [`DESTROY_TIMEOUT`] (shorter in unit tests).
    destroy_timeout: Duration,
}

/// A block job as `query-block-jobs` shows it.
#[derive(Debug)]
struct Job {
    status: String,
    offset: u64,
    len: u64,
    ready: bool,
    error: Option<String>,
}

/// A guest block device as `query-block` shows it.
#[derive(Debug)]
struct BlockDevice {
    node: String,
    size: Option<u64>,
}

/// Whether `query-block`'s `qdev` (`virtio-disk0`, or a QOM path
/// `/machine/peripheral/virtio-disk0/virtio-backend`) is the device `id`.
fn is_device(qdev: &str, id: &str) -> bool {
    qdev == id
        || qdev
            .strip_prefix("/machine/peripheral/")
            .and_then(|rest| rest.strip_prefix(id))
            .is_some_and(|tail| tail.is_empty() || tail.starts_with('/'))
}

/// Whether a process's command line (`/proc/PID/cmdline`) is the QEMU of
/// domain `name`: libvirt starts it with `-name guest=NAME,...` (commas in
/// NAME doubled).
pub fn is_qemu_of(cmdline: &[u8], name: &str) -> bool {
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    args.windows(2).any(|w| {
        w[0] == "-name"
            && qemu::split_opts(&w[1])
                .first()
                .is_some_and(|first| first.strip_prefix("guest=").unwrap_or(first) == name)
    })
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
            pid_dir: qemu_pid_dir(uri),
            destroy_timeout: DESTROY_TIMEOUT,
        }
    }

    /// Where libvirt keeps its QEMU pid files, for [`Hypervisor::destroy`]'s
    /// fallback, when [`qemu_pid_dir`] does not know (a libvirt built with
    /// another state directory).
    pub fn with_pid_dir(mut self, dir: impl Into<PathBuf>) -> Virsh {
        self.pid_dir = Some(dir.into());
        self
    }

    /// The connection URI.
    pub fn uri(&self) -> &str {
        &self.uri
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
        self.names_within(CALL_TIMEOUT)
    }

    fn names_within(&self, timeout: Duration) -> Result<Vec<String>, HypervisorError> {
        Ok(self
            .run(&["list", "--all", "--name"], None, timeout)?
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

    fn state_within(&self, name: &str, timeout: Duration) -> Result<DomainState, HypervisorError> {
        if !self.names_within(timeout)?.iter().any(|n| n == name) {
            return Ok(DomainState::Absent);
        }
        let out = self.run(&["domstate", name], None, timeout)?;
        DomainState::parse(&out.stdout).ok_or(HypervisorError::Output {
            what: "virsh domstate".into(),
            output: out.stdout,
        })
    }

    /// A QMP command `execute` (with `arguments`) to the domain's QEMU;
    /// its `return`, or QEMU's error as [`HypervisorError::Qmp`].
    fn qmp(
        &self,
        name: &str,
        execute: &str,
        arguments: Option<Value>,
    ) -> Result<Value, HypervisorError> {
        let mut command = json!({ "execute": execute });
        if let Some(a) = arguments {
            command["arguments"] = a;
        }
        let mut reply = self.monitor(name, &command)?;
        if let Some(e) = reply.get("error") {
            let field = |k: &str| {
                e.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            return Err(HypervisorError::Qmp {
                command: execute.to_owned(),
                class: field("class"),
                desc: field("desc"),
            });
        }
        match reply.get_mut("return") {
            Some(r) => Ok(r.take()),
            None => Err(HypervisorError::Output {
                what: format!("QMP {execute}"),
                output: reply.to_string(),
            }),
        }
    }

    /// The guest device `id` as `query-block` shows it (`None` when there
    /// is no such device or it has no medium).
    fn block_device(&self, name: &str, id: &str) -> Result<Option<BlockDevice>, HypervisorError> {
        let devices = self.qmp(name, "query-block", None)?;
        let Some(devices) = devices.as_array() else {
            return Err(HypervisorError::Output {
                what: "QMP query-block".into(),
                output: devices.to_string(),
            });
        };
        Ok(devices
            .iter()
            .find(|d| {
                d.get("qdev")
                    .and_then(Value::as_str)
                    .is_some_and(|q| is_device(q, id))
            })
            .and_then(|d| d.get("inserted"))
            .and_then(|i| {
                Some(BlockDevice {
                    node: i.get("node-name")?.as_str()?.to_owned(),
                    size: i
                        .get("image")
                        .and_then(|im| im.get("virtual-size"))
                        .and_then(Value::as_u64),
                })
            }))
    }

    /// The size of the block node `node` (`query-named-block-nodes`).
    fn node_size(&self, name: &str, node: &str) -> Result<Option<u64>, HypervisorError> {
        let nodes = self.qmp(
            name,
            "query-named-block-nodes",
            Some(json!({ "flat": true })),
        )?;
        Ok(nodes.as_array().and_then(|nodes| {
            nodes
                .iter()
                .find(|n| n.get("node-name").and_then(Value::as_str) == Some(node))
                .and_then(|n| n.get("image"))
                .and_then(|im| im.get("virtual-size"))
                .and_then(Value::as_u64)
        }))
    }

    /// The block job `id` (`query-block-jobs`), `None` when there is none.
    fn job(&self, name: &str, id: &str) -> Result<Option<Job>, HypervisorError> {
        let jobs = self.qmp(name, "query-block-jobs", None)?;
        let Some(jobs) = jobs.as_array() else {
            return Err(HypervisorError::Output {
                what: "QMP query-block-jobs".into(),
                output: jobs.to_string(),
            });
        };
        Ok(jobs
            .iter()
            .find(|j| j.get("device").and_then(Value::as_str) == Some(id))
            .map(|j| Job {
                status: j
                    .get("status")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                offset: j.get("offset").and_then(Value::as_u64).unwrap_or(0),
                len: j.get("len").and_then(Value::as_u64).unwrap_or(0),
                ready: j.get("ready").and_then(Value::as_bool).unwrap_or(false),
                error: j.get("error").and_then(Value::as_str).map(str::to_owned),
            }))
    }

    /// The copy and pivot of a live move, after `blockdev-add` of `new`.
    /// `started` is set once `blockdev-mirror` was accepted.
    #[allow(clippy::too_many_arguments)]
    fn mirror(
        &self,
        name: &str,
        job: &str,
        source: &str,
        new: &str,
        size: u64,
        progress: &mut dyn FnMut(Progress),
        started: &mut bool,
    ) -> Result<Duration, MoveError> {
        let call = |e: HypervisorError| MoveError::Call(Box::new(e));
        match self.node_size(name, new).map_err(call)? {
            Some(s) if s == size => {}
            other => {
                return Err(MoveError::SizeMismatch {
                    disk: size,
                    destination: other.unwrap_or(0),
                })
            }
        }
        self.qmp(
            name,
            "blockdev-mirror",
            Some(json!({
                "job-id": job,
                "device": source,
                "target": new,
                "sync": "full",
                "copy-mode": "write-blocking",
                "auto-dismiss": false,
            })),
        )
        .map_err(call)?;
        *started = true;
        let timeout = copy_timeout(size);
        let deadline = Instant::now() + timeout;
        loop {
            let Some(j) = self.job(name, job).map_err(call)? else {
                return Err(MoveError::JobVanished);
            };
            if j.status == "concluded" || j.status == "null" || j.status == "aborting" {
                return Err(MoveError::JobFailed(j.error.unwrap_or_else(|| {
                    format!("it ended ({}) before it was ready", j.status)
                })));
            }
            progress(Progress {
                copied: j.offset,
                total: j.len,
                ready: j.ready,
            });
            if j.ready {
                break;
            }
            if Instant::now() >= deadline {
                return Err(MoveError::Timeout {
                    stage: "the copy",
                    timeout,
                });
            }
            std::thread::sleep(COPY_POLL);
        }
        let pivot_started = Instant::now();
        self.qmp(name, "block-job-complete", Some(json!({ "device": job })))
            .map_err(call)?;
        // As fast as virsh answers: this is the pause being measured.
        loop {
            match self.job(name, job).map_err(call)? {
                None => break,
                Some(j) if j.status == "concluded" || j.status == "null" => {
                    if let Some(e) = j.error {
                        return Err(MoveError::JobFailed(e));
                    }
                    break;
                }
                Some(_) => {}
            }
            if pivot_started.elapsed() >= PIVOT_TIMEOUT {
                return Err(MoveError::Timeout {
                    stage: "the pivot",
                    timeout: PIVOT_TIMEOUT,
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let pivot = pivot_started.elapsed();
        *started = false;
        if let Err(e) = self.qmp(name, "job-dismiss", Some(json!({ "id": job }))) {
            tracing::warn!(domain = name, job, error = %e, "cannot dismiss the concluded mirror job");
        }
        Ok(pivot)
    }

    /// After a failed move: the job cancelled (forced: QEMU abandons the
    /// copy, and fails in-flight requests to a dead NBD server at once) and
    /// dismissed, and the new node deleted unless the device reads from it.
    fn abort_move(
        &self,
        name: &str,
        job: &str,
        new: &str,
        device: &str,
        job_started: bool,
    ) -> Result<(), HypervisorError> {
        if job_started {
            let live = |j: &Job| j.status != "concluded" && j.status != "null";
            if self.job(name, job)?.as_ref().is_some_and(live) {
                // It may conclude between the two calls: what counts is
                // that it is gone below.
                let _ = self.qmp(
                    name,
                    "block-job-cancel",
                    Some(json!({ "device": job, "force": true })),
                );
            }
            let started = Instant::now();
            loop {
                match self.job(name, job)? {
                    None => break,
                    Some(j) if !live(&j) => {
                        self.qmp(name, "job-dismiss", Some(json!({ "id": job })))?;
                        break;
                    }
                    Some(_) if started.elapsed() >= CANCEL_TIMEOUT => {
                        return Err(HypervisorError::Timeout {
                            what: format!("cancelling the mirror job {job}"),
                            timeout: CANCEL_TIMEOUT,
                        })
                    }
                    Some(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        if self
            .block_device(name, device)?
            .is_some_and(|d| d.node == new)
        {
            // The pivot happened after all: the new node is the disk now.
            return Ok(());
        }
        self.qmp(name, "blockdev-del", Some(json!({ "node-name": new })))
            .map(|_| ())
    }

    /// Kills domain `name`'s QEMU without libvirt: the process named by
    /// libvirt's pid file, if its command line is that domain's QEMU
    /// (checked through a pidfd, so a reused pid is never signalled), with
    /// SIGKILL; then waits up to [`KILL_WAIT`] for it to go. No pid file:
    /// no QEMU runs for the domain.
    fn kill_qemu(&self, name: &str) -> Result<(), KillError> {
        use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal};
        let dir = self
            .pid_dir
            .as_ref()
            .ok_or_else(|| KillError::NoPidDir(self.uri.clone()))?;
        if name.is_empty() || name.contains('/') {
            return Err(KillError::InvalidName(name.to_owned()));
        }
        if let Err(source) = std::fs::metadata(dir) {
            return Err(KillError::PidFile {
                path: dir.clone(),
                source,
            });
        }
        let path = dir.join(format!("{name}.pid"));
        let content = match std::fs::read_to_string(&path) {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(KillError::PidFile { path, source }),
        };
        let bad = || KillError::BadPid {
            path: path.clone(),
            content: content.clone(),
        };
        let raw: i32 = content.trim().parse().map_err(|_| bad())?;
        let pid = Pid::from_raw(raw).filter(|_| raw > 0).ok_or_else(bad)?;
        let pidfd = match pidfd_open(pid, PidfdFlags::empty()) {
            Ok(fd) => fd,
            // A stale pid file: the process is gone.
            Err(rustix::io::Errno::SRCH) => return Ok(()),
            Err(e) => {
                return Err(KillError::Signal {
                    pid: raw,
                    source: e.into(),
                })
            }
        };
        let cmdline = match std::fs::read(format!("/proc/{raw}/cmdline")) {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(KillError::PidFile {
                    path: PathBuf::from(format!("/proc/{raw}/cmdline")),
                    source,
                })
            }
        };
        if cmdline.is_empty() {
            // A zombie: it has exited already.
            return Ok(());
        }
        if !is_qemu_of(&cmdline, name) {
            return Err(KillError::NotItsQemu { pid: raw });
        }
        match pidfd_send_signal(&pidfd, Signal::KILL) {
            Ok(()) | Err(rustix::io::Errno::SRCH) => {}
            Err(e) => {
                return Err(KillError::Signal {
                    pid: raw,
                    source: e.into(),
                })
            }
        }
        tracing::warn!(
            domain = name,
            pid = raw,
            "libvirt did not destroy the domain: its QEMU was sent SIGKILL"
        );
        wait_exit(&pidfd, KILL_WAIT)
            .then_some(())
            .ok_or(KillError::StillAlive {
                pid: raw,
                timeout: KILL_WAIT,
            })
    }

    /// Prepares a local destination file: created at `size` bytes (sparse)
    /// when absent (`true`), else checked to be a regular file of `size`.
    fn prepare_file(path: &str, size: u64) -> Result<bool, MoveError> {
        let io = |source| MoveError::File {
            path: path.to_owned(),
            source,
        };
        match std::fs::metadata(path) {
            Ok(m) if !m.is_file() => Err(io(std::io::Error::other("not a regular file"))),
            Ok(m) if m.len() != size => Err(MoveError::SizeMismatch {
                disk: size,
                destination: m.len(),
            }),
            Ok(_) => Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .map_err(io)?;
                if let Err(e) = f.set_len(size) {
                    let _ = std::fs::remove_file(path);
                    return Err(io(e));
                }
                Ok(true)
            }
            Err(e) => Err(io(e)),
        }
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

/// Waits until the process of `pidfd` has exited (its pidfd turns
/// readable), up to `timeout`.
fn wait_exit(pidfd: &impl rustix::fd::AsFd, timeout: Duration) -> bool {
    use rustix::event::{poll, PollFd, PollFlags};
    let deadline = Instant::now() + timeout;
    loop {
        let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
        let slice = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 100_000_000,
        };
        if let Ok(n) = poll(&mut fds, Some(&slice)) {
            if n > 0 {
                return true;
            }
        }
        if Instant::now() >= deadline {
            return false;
        }
    }
}

static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The size of the Tandem disk `target` in a `query-block` answer (its
/// device `tandem-<target>-dev`).
fn tandem_size(blocks: &Value, target: &str) -> Option<u64> {
    let id = qemu::names(target).ok()?.device;
    blocks
        .as_array()?
        .iter()
        .find(|d| {
            d.get("qdev")
                .and_then(Value::as_str)
                .is_some_and(|q| is_device(q, &id))
        })?
        .get("inserted")?
        .get("image")?
        .get("virtual-size")?
        .as_u64()
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
            // libvirt does not know disks in Tandem's form: QEMU does.
            let blocks = if state.is_active() && parsed.disks.iter().any(|d| d.tandem) {
                self.qmp(&name, "query-block", None).ok()
            } else {
                None
            };
            let disks = parsed
                .disks
                .into_iter()
                .map(|disk| {
                    let size = match (state.is_active(), disk.tandem) {
                        (false, _) => None,
                        (true, false) => self.capacity(&name, &disk.target),
                        (true, true) => blocks.as_ref().and_then(|b| tandem_size(b, &disk.target)),
                    };
                    DiskInfo { disk, size }
                })
                .collect();
            out.push(DomainInfo { name, state, disks });
        }
        Ok(out)
    }

    fn state(&self, name: &str) -> Result<DomainState, HypervisorError> {
        self.state_within(name, CALL_TIMEOUT)
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

    /// `virsh destroy`; if that fails and libvirt cannot say that the
    /// domain is inactive (libvirtd down or hung, or refusing), the QEMU
    /// process named by libvirt's pid file is killed directly (G9: a demoted
    /// site's VM must stop even when libvirt is down; see [`qemu_pid_dir`]).
    fn destroy(&self, name: &str) -> Result<(), HypervisorError> {
        let libvirt = match self.run(&["destroy", name], None, self.destroy_timeout) {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        // A libvirtd that let destroy time out would let this time out
        // too: then straight to the kill (fencing waits on it).
        if !matches!(libvirt, HypervisorError::Timeout { .. }) {
            if let Ok(s) = self.state_within(name, self.destroy_timeout) {
                if !s.is_active() {
                    // Not running (or not defined): nothing to stop.
                    return Ok(());
                }
            }
        }
        self.kill_qemu(name).map_err(|error| HypervisorError::Kill {
            name: name.to_owned(),
            error: Box::new(error),
            libvirt: Box::new(libvirt),
        })
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

    fn move_disk(
        &self,
        name: &str,
        target: &str,
        to: &Destination,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<MoveOutcome, HypervisorError> {
        let started = Instant::now();
        let names = qemu::names(target)?;
        let failed = |error: MoveError| HypervisorError::moving(name, target, error);
        let state = self.state(name)?;
        if !state.is_active() {
            return Err(failed(MoveError::NotRunning(state)));
        }
        let running = self.xml(name, false)?;
        let device = xml::device_id(&running, target)?
            .ok_or_else(|| failed(MoveError::NoSuchDisk(target.to_owned())))?;
        let current = self.block_device(name, &device)?.ok_or_else(|| {
            failed(MoveError::NoBlockDevice {
                target: target.to_owned(),
                device: device.clone(),
            })
        })?;
        let size = match current.size {
            Some(s) => s,
            None => {
                self.node_size(name, &current.node)?
                    .ok_or_else(|| HypervisorError::Output {
                        what: "QMP query-block".into(),
                        output: format!("no size for node {}", current.node),
                    })?
            }
        };
        let (new, blockdev, mut created) = match to {
            Destination::Nbd {
                volume,
                socket,
                reconnect_delay_secs,
            } => (
                names.nbd_format.clone(),
                qemu::nbd_blockdev(target, volume, socket, *reconnect_delay_secs)?,
                None,
            ),
            Destination::File { path } => (
                names.file_format.clone(),
                qemu::file_blockdev(target, path)?,
                Some(path.as_str()),
            ),
        };
        // Before the mirror job starts the disk reads from where it did.
        let unchanged = |error: MoveError| {
            HypervisorError::Move(Box::new(MoveFailure {
                name: name.to_owned(),
                target: target.to_owned(),
                error,
                guest_on: Some(current.node.clone()),
                cleanup: None,
            }))
        };
        if current.node == new {
            return Err(unchanged(MoveError::AlreadyThere(new)));
        }
        if let Some(path) = created {
            // Keep the path only when this call made the file.
            created = Self::prepare_file(path, size)
                .map_err(&unchanged)?
                .then_some(path);
        }
        let remove_created = || {
            if let Some(path) = created {
                let _ = std::fs::remove_file(path);
            }
        };
        let arguments: Value =
            serde_json::from_str(&blockdev).map_err(|_| HypervisorError::Output {
                what: "the blockdev JSON".into(),
                output: blockdev.clone(),
            })?;
        if let Err(e) = self.qmp(name, "blockdev-add", Some(arguments)) {
            remove_created();
            return Err(unchanged(MoveError::Call(Box::new(e))));
        }
        let mut job_started = false;
        match self.mirror(
            name,
            &names.job,
            &current.node,
            &new,
            size,
            progress,
            &mut job_started,
        ) {
            Ok(pivot) => {
                let now = self.block_device(name, &device)?.map(|d| d.node);
                if now.as_deref() != Some(new.as_str()) {
                    return Err(HypervisorError::Move(Box::new(MoveFailure {
                        name: name.to_owned(),
                        target: target.to_owned(),
                        error: MoveError::NotPivoted {
                            expected: new,
                            actual: now.clone(),
                        },
                        guest_on: now,
                        cleanup: None,
                    })));
                }
                // A node Tandem added earlier (moving back and forth) goes;
                // libvirt's own nodes stay: libvirt owns them (QEMU keeps
                // the old file open until the guest stops).
                if current.node.starts_with(qemu::PREFIX) {
                    if let Err(e) = self.qmp(
                        name,
                        "blockdev-del",
                        Some(json!({ "node-name": current.node })),
                    ) {
                        tracing::warn!(domain = name, node = current.node, error = %e, "cannot delete the node the disk left");
                    }
                }
                Ok(MoveOutcome {
                    elapsed: started.elapsed(),
                    pivot,
                    node: new,
                    previous: current.node,
                    size,
                })
            }
            Err(error) => {
                let cleanup = self
                    .abort_move(name, &names.job, &new, &device, job_started)
                    .err()
                    .map(Box::new);
                let guest_on = self
                    .block_device(name, &device)
                    .ok()
                    .flatten()
                    .map(|d| d.node);
                if cleanup.is_none() && guest_on.as_deref() != Some(new.as_str()) {
                    remove_created();
                }
                Err(HypervisorError::Move(Box::new(MoveFailure {
                    name: name.to_owned(),
                    target: target.to_owned(),
                    error,
                    guest_on,
                    cleanup,
                })))
            }
        }
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
            pid_dir: None,
            destroy_timeout: DESTROY_TIMEOUT,
        };
        assert!(matches!(v.names(), Err(HypervisorError::Spawn { .. })));
        // destroy: virsh cannot run, and without a pid directory there is
        // no fallback: a typed error naming both.
        match v.destroy("web01") {
            Err(HypervisorError::Kill { error, libvirt, .. }) => {
                assert!(matches!(*error, KillError::NoPidDir(_)));
                assert!(matches!(*libvirt, HypervisorError::Spawn { .. }));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_hung_libvirt_is_asked_once_before_the_kill() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        // A virsh that never answers, counting its calls.
        let calls = dir.path().join("calls");
        let program = dir.path().join("virsh");
        std::fs::write(
            &program,
            format!(
                "#!/bin/sh\necho x >> '{}'\nexec sleep 30\n",
                calls.display()
            ),
        )
        .expect("write the fake virsh");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let v = Virsh {
            uri: "qemu:///system".into(),
            program: program.display().to_string(),
            // No pid file there: no QEMU runs.
            pid_dir: Some(dir.path().to_path_buf()),
            destroy_timeout: Duration::from_secs(1),
        };
        let started = Instant::now();
        v.destroy("web01").expect("no pid file: nothing to kill");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        let calls = std::fs::read_to_string(&calls).unwrap_or_default();
        assert_eq!(calls.lines().count(), 1, "virsh ran {calls:?}");
    }

    #[test]
    fn pid_files_are_found_for_local_qemu_connections_only() {
        let system = Some(PathBuf::from("/run/libvirt/qemu"));
        assert_eq!(qemu_pid_dir("qemu:///system"), system);
        assert_eq!(qemu_pid_dir("qemu+unix:///system"), system);
        // A daemon on its own socket keeps its state beside it (a
        // tandem-vmkit site daemon: <root>/run/libvirt-sock and
        // <root>/run/qemu/NAME.pid).
        assert_eq!(
            qemu_pid_dir("qemu+unix:///system?socket=/run/sites/a/run/libvirt-sock"),
            Some(PathBuf::from("/run/sites/a/run/qemu"))
        );
        assert_eq!(
            qemu_pid_dir("qemu:///system?socket=/run/libvirt/libvirt-sock"),
            system
        );
        assert_eq!(
            qemu_pid_dir("qemu+unix:///system?mode=legacy&socket=/x%20y/libvirt-sock"),
            Some(PathBuf::from("/x y/qemu"))
        );
        assert_eq!(
            qemu_pid_dir("qemu+unix:///session?socket=/run/user/0/libvirt/libvirt-sock"),
            Some(PathBuf::from("/run/user/0/libvirt/qemu/run"))
        );
        assert_eq!(qemu_pid_dir("qemu+unix:///system?socket=%zz"), None);
        assert_eq!(qemu_pid_dir("qemu+unix:///system?socket="), None);
        assert!(qemu_pid_dir("qemu:///session").is_some_and(|p| p.ends_with("libvirt/qemu/run")));
        assert_eq!(qemu_pid_dir("qemu+ssh://host/system"), None);
        assert_eq!(qemu_pid_dir("qemu://host/system"), None);
        assert_eq!(qemu_pid_dir("qemu+tls://host/system"), None);
        assert_eq!(qemu_pid_dir("xen:///system"), None);
        assert_eq!(qemu_pid_dir("test:///default"), None);
        assert_eq!(qemu_pid_dir("qemu:///embed?root=/x"), None);
        assert_eq!(qemu_pid_dir("nonsense"), None);
    }

    #[test]
    fn a_qemu_is_recognised_by_its_guest_name() {
        let cmd = b"/usr/bin/qemu-system-x86_64\0-name\0guest=web,,01,debug-threads=on\0-S\0";
        assert!(is_qemu_of(cmd, "web,01"));
        assert!(!is_qemu_of(cmd, "web"));
        assert!(is_qemu_of(b"qemu\0-name\0web01\0", "web01"));
        assert!(!is_qemu_of(b"bash\0-c\0guest=web01\0", "web01"));
        assert!(!is_qemu_of(b"", "web01"));
    }

    #[test]
    fn query_block_devices_are_matched_by_id() {
        assert!(is_device("virtio-disk0", "virtio-disk0"));
        assert!(is_device(
            "/machine/peripheral/virtio-disk0/virtio-backend",
            "virtio-disk0"
        ));
        assert!(is_device(
            "/machine/peripheral/tandem-vda-dev",
            "tandem-vda-dev"
        ));
        assert!(!is_device(
            "/machine/peripheral/virtio-disk01/virtio-backend",
            "virtio-disk0"
        ));
        assert!(!is_device("", "virtio-disk0"));
        let blocks = json!([
            {"qdev": "/machine/peripheral/virtio-disk0/virtio-backend", "inserted": {"image": {"virtual-size": 1}}},
            {"qdev": "/machine/peripheral/tandem-vdb-dev/virtio-backend", "inserted": {"node-name": "tandem-vdb", "image": {"virtual-size": 67108864}}}
        ]);
        assert_eq!(tandem_size(&blocks, "vdb"), Some(67_108_864));
        assert_eq!(tandem_size(&blocks, "vdc"), None);
    }

    #[test]
    fn the_copy_timeout_scales_with_the_disk() {
        assert_eq!(copy_timeout(0), MOVE_BASE);
        assert_eq!(
            copy_timeout(100 << 30),
            MOVE_BASE + Duration::from_secs(25_600)
        );
    }
}
