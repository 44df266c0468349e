//! One live agent per site name: the driver of
//! [`tandem_coordinator::instance`] (docs/FAILOVER.md, "One agent per
//! site name").
//!
//! * At start, and after every new lease, the lease keeper calls
//!   [`acquire`] before it lets anything act on the lease: the site's
//!   instance key is taken under it, or — held by another instance — waited
//!   for (a crashed run's key lasts until its lease ends), and if still
//!   held after the wait the agent refuses: an error log naming the holder,
//!   the status says so, and the agent exits non-zero.
//! * While running, the **instance-watch** thread reads the key at every
//!   change (and every TTL/3): gone while this agent's lease lives, or
//!   naming another instance, the agent fences every group at once and
//!   exits ([`fatal`]).
//! * A clean stop gives the key back ([`release`]), so the next start need
//!   not wait.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use tandem_coordinator::instance::{
    check, utc, Claim, Holder, Instance, Liveness, Next, Process, Verdict,
};
use tandem_coordinator::{lease, LeaseId, StoreError};
use tracing::{debug, error, info, warn};

use super::Handle;
use crate::group::Shared;
use crate::status::{InstanceState, InstanceStatus, OtherInstance};

/// How long to wait after a failed read or transaction.
const RETRY: Duration = Duration::from_millis(200);
/// How often a waiting agent says what it waits for.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// How long to wait while the agent has no lease.
const NO_LEASE_POLL: Duration = Duration::from_millis(50);

/// A callback run once when the agent must exit.
type OnFatal = Box<dyn FnOnce() + Send>;

/// This agent's instance: who it is, how its claim stands, and whether it
/// must exit.
pub(crate) struct Instances {
    pub me: Instance,
    status: Mutex<InstanceStatus>,
    fatal: Mutex<Option<String>>,
    on_fatal: Mutex<Vec<OnFatal>>,
}

impl Instances {
    pub fn new(me: Instance) -> Instances {
        let status = InstanceStatus {
            id: me.id.clone(),
            host: me.host.clone(),
            pid: me.pid,
            since: utc(me.since_ms),
            state: InstanceState::Claiming,
            other: None,
            message: None,
        };
        Instances {
            me,
            status: Mutex::new(status),
            fatal: Mutex::new(None),
            on_fatal: Mutex::new(Vec::new()),
        }
    }

    pub fn status(&self) -> InstanceStatus {
        self.status.lock().clone()
    }

    fn set(&self, state: InstanceState, holder: Option<&Holder>, message: Option<String>) {
        let mut s = self.status.lock();
        s.state = state;
        s.other = holder.and_then(other);
        s.message = message;
    }

    /// Why the agent must exit, once it must.
    pub fn fatal(&self) -> Option<String> {
        self.fatal.lock().clone()
    }

    /// Runs `f` once the agent must exit (at once if it must already).
    pub fn on_fatal(&self, f: OnFatal) {
        let fatal = self.fatal.lock();
        if fatal.is_some() {
            drop(fatal);
            f();
        } else {
            self.on_fatal.lock().push(f);
        }
    }
}

fn other(h: &Holder) -> Option<OtherInstance> {
    match h {
        Holder::Other { record, lease, .. } => Some(OtherInstance {
            id: record.as_ref().map(|r| r.id.clone()),
            host: record.as_ref().map(|r| r.host.clone()),
            pid: record.as_ref().map(|r| r.pid),
            since: record.as_ref().map(|r| utc(r.since_ms)),
            lease: format!("{lease:x}"),
        }),
        _ => None,
    }
}

/// Who this agent is: a new random id, the host, the pid, now, and the
/// fingerprint of its TLS certificate.
pub(super) fn identify(shared: &Shared) -> Instance {
    let mut id = [0u8; 16];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id).is_err() {
        // No system randomness: the time and pid still tell runs apart.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        id = (nanos ^ (u128::from(std::process::id()) << 64)).to_be_bytes();
    }
    let since_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let cert_sha256 = shared.config().tls.cert.as_ref().and_then(|path| {
        use tandem_tls::rustls::pki_types::pem::PemObject;
        use tandem_tls::rustls::pki_types::CertificateDer;
        // TLS off: no certificate is in use.
        shared.tls.as_ref()?;
        let first = CertificateDer::pem_file_iter(path)
            .ok()
            .and_then(|mut certs| certs.next())
            .and_then(Result::ok)?;
        Some(hex(
            ring::digest::digest(&ring::digest::SHA256, &first).as_ref()
        ))
    });
    Instance {
        id: hex(&id),
        site: shared.site.clone(),
        host: rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned(),
        pid: std::process::id(),
        since_ms,
        cert_sha256,
        lease_ttl_ms: u64::try_from(shared.config().coordinator.lease_ttl.as_millis())
            .unwrap_or(u64::MAX),
        process: this_process(),
    }
}

/// This process as the kernel names it (Linux `/proc`).
fn this_process() -> Option<Process> {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let pid_ns = std::fs::read_link("/proc/self/ns/pid").ok()?;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    Some(Process {
        boot_id: boot_id.trim().to_owned(),
        pid_ns: pid_ns.to_string_lossy().into_owned(),
        start_ticks: start_ticks(&stat)?,
    })
}

/// Field 22 (`starttime`) of a `/proc/PID/stat` text. The command name
/// (field 2) is in parentheses and may hold spaces and parentheses: the
/// fields after it are counted from its last `)`.
fn start_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // `rest` starts with field 3 (the state).
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the holder's process is certainly gone: it ran on this kernel
/// and pid namespace, and its pid now names no process, or one that
/// started at another time.
fn liveness(holder: &Holder, me: &Instance) -> Liveness {
    let Some((pid, process)) = holder.process(me) else {
        return Liveness::Unknown;
    };
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Liveness::Gone,
        Ok(stat) => match start_ticks(&stat) {
            Some(t) if t != process.start_ticks => Liveness::Gone,
            _ => Liveness::Unknown,
        },
        Err(_) => Liveness::Unknown,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How [`acquire`] ended.
pub(super) enum Acquired {
    /// The key is ours under the lease; `renewed` is when the last renewal
    /// the store granted was sent.
    Held { renewed: Instant },
    /// Another instance holds it: the agent exits ([`fatal`] was called).
    Refused,
    /// The lease ended meanwhile: grant a new one and try again.
    LeaseLost,
    /// The agent is stopping.
    Stopped,
}

/// Takes this site's instance key under `lease` (granted at `renewed`),
/// keeping the lease alive while it waits. `first`: this agent's first
/// lease (a key held by another may be a crashed run's, so it waits it
/// out); later, another holder took the name while this agent had lost
/// its lease, and it refuses at once.
pub(super) fn acquire(h: &Handle, lease: LeaseId, mut renewed: Instant, first: bool) -> Acquired {
    let every = lease::renew_every(h.ttl);
    let mut claim = Claim::new(&h.keys, h.instance.me.clone(), h.ttl);
    let key = claim.key().to_owned();
    let started = Instant::now();
    let mut told: Option<Instant> = None;
    let mut complained: Option<Instant> = None;
    // Not held under this lease yet: no primary role connects meanwhile.
    h.shared.name_held.store(false, Ordering::Release);
    h.instance.set(InstanceState::Claiming, None, None);
    loop {
        if !h.running() {
            return Acquired::Stopped;
        }
        if Instant::now() >= renewed + every {
            let sent = Instant::now();
            match h.store.keep_alive(lease) {
                Ok(_) => renewed = sent,
                Err(StoreError::LeaseNotFound(_)) => return Acquired::LeaseLost,
                Err(e) => warn!("cannot renew the coordinator lease: {e}"),
            }
        }
        let snap = match h.store.range(&key) {
            Ok(s) => s,
            Err(e) => {
                if complained.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY) {
                    warn!("cannot read this site's instance key {key} (retrying): {e}");
                    complained = Some(Instant::now());
                }
                std::thread::sleep(RETRY);
                continue;
            }
        };
        let now = Instant::now();
        let kv = snap.get(&key);
        let alive = liveness(&Holder::of(kv, claim.me()), claim.me());
        if alive == Liveness::Gone {
            info!(site = %h.shared.site, key,
                "site name {:?} is held by {}, a run of this agent on this host that is gone: \
                 taking the name over at once", h.shared.site, Holder::of(kv, claim.me()));
        }
        match claim.next(kv, lease, alive, now) {
            Next::Take { compares, ops } => match h.store.txn(&compares, &ops) {
                Ok(_) => {}
                Err(StoreError::Refused(_) | StoreError::LeaseNotFound(_)) => {
                    return Acquired::LeaseLost
                }
                Err(e) => {
                    if complained.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY) {
                        warn!("cannot take this site's instance key {key} (retrying): {e}");
                        complained = Some(Instant::now());
                    }
                    std::thread::sleep(RETRY);
                }
            },
            Next::Held => {
                info!(site = %h.shared.site, key, lease = format!("{lease:x}"), waited = ?started.elapsed(),
                    "this agent is the site's one running instance: {}", h.instance.me);
                h.instance.set(InstanceState::Held, None, None);
                h.shared.name_held.store(true, Ordering::Release);
                return Acquired::Held { renewed };
            }
            Next::Wait { holder, .. } if !first => {
                refuse(
                    h,
                    &holder,
                    started.elapsed(),
                    "while this agent had lost its lease",
                );
                return Acquired::Refused;
            }
            Next::Wait { holder, until } => {
                let left = until.saturating_duration_since(now);
                if told.is_none_or(|t| now >= t + PROGRESS_EVERY) {
                    warn!(site = %h.shared.site, key,
                        "site name {:?} is held by {holder}; waiting up to {:.1}s more for its lease to end \
                         (a crashed run of this agent leaves its key until then; a live agent keeps it)",
                        h.shared.site, left.as_secs_f64());
                    told = Some(now);
                }
                h.instance.set(
                    InstanceState::Waiting,
                    Some(&holder),
                    Some(format!(
                        "waiting for the site name to be free: held by {holder}"
                    )),
                );
                let next_renew = (renewed + every).saturating_duration_since(now);
                let wait = left.min(next_renew).max(Duration::from_millis(10));
                if let Err(e) = h.store.wait(&key, snap.revision, wait) {
                    warn!("cannot watch this site's instance key {key}: {e}");
                    std::thread::sleep(RETRY.min(wait));
                }
            }
            Next::Refuse { holder, waited } => {
                refuse(h, &holder, waited, "and it outlived a crashed run's lease");
                return Acquired::Refused;
            }
        }
    }
}

fn refuse(h: &Handle, holder: &Holder, waited: Duration, how: &str) {
    let why = format!(
        "another agent is running with site name {:?}: {holder} holds the coordinator's instance \
         key ({how}; waited {:.1}s). Two agents must never share a site name (a cloned host or a \
         copied configuration?): this one ({}) refuses ownership and exits",
        h.shared.site,
        waited.as_secs_f64(),
        h.instance.me
    );
    h.instance
        .set(InstanceState::Refused, Some(holder), Some(why.clone()));
    fatal(h, why);
}

/// The instance-watch thread: reads the key at every change and every
/// TTL/3 while the agent holds a lease.
pub(super) fn watch(h: &Handle) {
    let key = h.keys.instance(&h.shared.site);
    let every = lease::renew_every(h.ttl);
    while h.running() {
        let Some(current) = h.lease() else {
            std::thread::sleep(NO_LEASE_POLL);
            continue;
        };
        let snap = match h.store.range(&key) {
            Ok(s) => s,
            Err(e) => {
                // The store watcher warns of an unreachable coordinator.
                debug!("cannot read this site's instance key {key}: {e}");
                std::thread::sleep(RETRY);
                continue;
            }
        };
        // The keeper may have replaced the lease since it was read above.
        if h.lease().map(|l| l.id) != Some(current.id) {
            continue;
        }
        match check(snap.get(&key), &h.instance.me, current.id) {
            Verdict::Held => {}
            Verdict::Gone => match h.store.keep_alive(current.id) {
                // The lease ended (and the key with it): the keeper fences,
                // gets a new lease and takes the key again.
                Err(StoreError::LeaseNotFound(_)) => {
                    fence(h);
                    std::thread::sleep(NO_LEASE_POLL);
                    continue;
                }
                Ok(_) => {
                    let why = format!(
                        "this agent's instance key {key} was deleted while its lease lives: \
                         someone else may take site name {:?}; this agent ({}) stops \
                         acknowledging writes and exits",
                        h.shared.site, h.instance.me
                    );
                    h.instance.set(InstanceState::Lost, None, Some(why.clone()));
                    fatal(h, why);
                    return;
                }
                Err(e) => {
                    debug!("cannot check the coordinator lease: {e}");
                    std::thread::sleep(RETRY);
                    continue;
                }
            },
            Verdict::Replaced(holder) => {
                let why = format!(
                    "site name {:?} was taken over by {holder}: this agent ({}) stops \
                     acknowledging writes and exits (two agents must never share a site name)",
                    h.shared.site, h.instance.me
                );
                h.instance
                    .set(InstanceState::Lost, Some(&*holder), Some(why.clone()));
                fatal(h, why);
                return;
            }
        }
        let _ = h.store.wait(&key, snap.revision, every);
    }
}

/// Fences every group's gate at once.
fn fence(h: &Handle) {
    for m in h.members() {
        if let Some(gate) = m.runtime.gate() {
            gate.fence();
        }
    }
}

/// This agent must not act any more: every gate is fenced and closed
/// (nothing is acknowledged from here on), VMs it started are destroyed
/// (G9), decisions and renewals stop, and whoever waits for it (the
/// `tandem agent` command) is told to exit.
pub(super) fn fatal(h: &Handle, why: String) {
    error!(site = %h.shared.site, "{why}");
    h.shared.name_held.store(false, Ordering::Release);
    h.deciding_stopped.store(true, Ordering::Release);
    h.stopped.store(true, Ordering::Release);
    for m in h.members() {
        m.inbox.close();
        if let Some(gate) = m.runtime.gate() {
            gate.fence();
            gate.close();
        }
    }
    for m in h.members() {
        let rt = &m.runtime;
        if rt.cfg.vm.is_some() && rt.vm_started.load(Ordering::Acquire) {
            warn!(
                group = rt.name(),
                "destroying the VM here: this agent exits"
            );
            match h.shared.vms.destroy(&rt.cfg) {
                Ok(()) => rt.vm_started.store(false, Ordering::Release),
                Err(e) => error!(group = rt.name(), "the VM could not be destroyed: {e}"),
            }
        }
    }
    let hooks = {
        let mut fatal = h.instance.fatal.lock();
        if fatal.is_some() {
            return;
        }
        *fatal = Some(why);
        std::mem::take(&mut *h.instance.on_fatal.lock())
    };
    for f in hooks {
        f();
    }
}

/// A clean stop: gives the key back if it is still this agent's.
pub(super) fn release(h: &Handle) {
    if h.instance.fatal().is_some() || h.instance.status().state != InstanceState::Held {
        return;
    }
    let claim = Claim::new(&h.keys, h.instance.me.clone(), h.ttl);
    let (compares, ops) = claim.release();
    match h.store.txn(&compares, &ops) {
        Ok((true, _)) => info!("site name given back: the next start need not wait"),
        Ok((false, _)) => {}
        Err(e) => {
            warn!("cannot give the site name back (the next start waits for the lease to end): {e}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_time_is_read_after_the_command_name() {
        let stat = "4242 (tandem (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 9 0 123456 1000 10";
        assert_eq!(start_ticks(stat), Some(123_456));
        assert_eq!(start_ticks("4242 (short) S 1"), None);
        assert_eq!(start_ticks("no parenthesis"), None);
        let mine = this_process().map(|p| p.start_ticks);
        assert!(mine.is_some_and(|t| t > 0), "{mine:?}");
    }
}
