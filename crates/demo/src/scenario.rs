//! The demo's story in seven steps: start everything, write bulk data and
//! watch it replicate, SIGKILL the primary while an application writes and
//! measure the failover, check what the new primary has, bring the old
//! primary back, migrate home, check everything; then a summary.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tandem_agent::status::{GroupStatus, ReplicaState, Role};
use tandem_config::format_size_approx as size;

use crate::api;
use crate::cluster::{Cluster, SiteName, GROUP, VOLUME, VOLUME_SIZE};
use crate::console::{say, Console};
use crate::error::{chain, short, DemoError, NbdAction, Wait};
use crate::nbd::NbdClient;
use crate::vm::VmSummary;
use crate::writer::{self, Ack, Writer};

use SiteName::{Chicago, Ny, Seattle};

/// The pseudo-random data written first, and checked after each move.
const DATA_LEN: u64 = 64 << 20;
const DATA_SEED: u64 = 0x7a6e_6465_6d6f;
const CHUNK: usize = 1 << 20;
const NBD_TIMEOUT: Duration = Duration::from_secs(10);
const STEPS: u32 = 7;

/// How to run the demo.
pub struct Options {
    /// The `tandem` executable, run as `tandem witness` and `tandem agent`
    /// (the binary passes its own).
    pub exe: PathBuf,
    /// Leave everything running at the end and print how to reach it.
    pub keep: bool,
    /// Set when the user asks the demo to stop (Ctrl-C): every wait ends,
    /// the processes are stopped, and [`run`] returns
    /// [`DemoError::Interrupted`].
    pub interrupted: Arc<AtomicBool>,
    /// Where the story is told.
    pub console: Console,
    /// `tandem demo --vm`: the story with a real guest (a libvirt daemon
    /// per site, `tandem protect`, host loss, the VM up at chicago); see
    /// [`crate::vm`].
    pub vm: bool,
}

impl Options {
    /// Runs `exe`, cleans up at the end, tells the story on stdout.
    pub fn new(exe: PathBuf) -> Options {
        Options {
            exe,
            keep: false,
            interrupted: Arc::default(),
            console: Console::stdio(),
            vm: false,
        }
    }
}

/// What the demo measured.
#[derive(Clone, Debug)]
pub struct Summary {
    /// From the SIGKILL of ny to the first write chicago acknowledged.
    pub rto: Duration,
    /// Records ny acknowledged before it was killed.
    pub acked_on_ny: usize,
    /// Of those, how many chicago lacks (async mode allows some).
    pub lost_at_failover: usize,
    /// ny's resync when it came back: bytes compared and sent.
    pub resync_compared: u64,
    pub resync_sent: u64,
    /// Bytes sent to ny since it came back.
    pub rejoin_wire: u64,
    /// From the last write chicago acknowledged to the first ny did.
    pub pause: Duration,
    /// The hand-over as the agent measured it.
    pub migrate_ms: Option<u64>,
    /// Records chicago acknowledged, and how many of them ny lacks (0).
    pub acked_on_chicago: usize,
    pub lost_at_migration: usize,
    /// BLAKE3 of the bulk data (hex).
    pub checksum: String,
    /// The whole story, from the start of the processes.
    pub total: Duration,
}

/// What a demo measured: the disks' story, or (`--vm`) the guest's.
#[derive(Clone, Debug)]
pub enum Report {
    Disks(Summary),
    Vm(VmSummary),
}

/// Runs the demo in a new directory under /tmp (`--vm`: /var/tmp): every
/// step on the console, then the summary; cleans up unless `keep`. When
/// it fails, its processes are stopped and the directory is kept for its
/// logs.
pub fn run(options: Options) -> Result<Report, DemoError> {
    if options.vm {
        return crate::vm::run(options).map(Report::Vm);
    }
    run_disks(options).map(Report::Disks)
}

/// A new directory `tandem-demo-*` under `base`, or else the system's
/// temporary directory. Keep paths short: Unix socket paths are limited
/// to 107 bytes.
pub(crate) fn demo_dir(base: &str) -> Result<tempfile::TempDir, DemoError> {
    let base = if Path::new(base).is_dir() {
        PathBuf::from(base)
    } else {
        std::env::temp_dir()
    };
    tempfile::Builder::new()
        .prefix("tandem-demo-")
        .tempdir_in(&base)
        .map_err(|source| DemoError::CreateDir {
            base: base.clone(),
            source,
        })
}

fn run_disks(options: Options) -> Result<Summary, DemoError> {
    let Options {
        exe,
        keep,
        interrupted,
        mut console,
        vm: _,
    } = options;
    let tmp = demo_dir("/tmp")?;
    let dir = tmp.path().to_path_buf();
    let mut cluster = Cluster::new(&dir, exe, keep, interrupted)?;
    let started = Instant::now();
    match flow(&mut cluster, &mut console) {
        Ok(mut summary) => {
            summary.total = started.elapsed();
            say!(console);
            say!(console, "{summary}");
            if keep {
                print_kept(&mut console, &cluster);
                cluster.detach();
                let _ = tmp.keep();
            } else {
                let killed = cluster.stop_all(Duration::from_secs(15));
                if !killed.is_empty() {
                    let names: Vec<String> = killed.iter().map(ToString::to_string).collect();
                    say!(
                        console,
                        "(had to SIGKILL {} on the way out)",
                        names.join(", ")
                    );
                }
                drop(tmp);
                say!(console, "stopped everything and removed {}", dir.display());
            }
            console.check()?;
            Ok(summary)
        }
        Err(e) => {
            let _ = cluster.stop_all(Duration::from_secs(10));
            let _ = tmp.keep();
            console.error_line(format_args!(
                "the demo failed; its logs and data are kept in {} (remove it with rm -rf)",
                dir.display()
            ));
            Err(e)
        }
    }
}

fn flow(c: &mut Cluster, out: &mut Console) -> Result<Summary, DemoError> {
    let t0 = Instant::now();
    say!(
        out,
        "Tandem demo: a witness and three sites on this machine (loopback)"
    );
    say!(out, "  directory {}", c.dir().display());
    say!(
        out,
        "  group {GROUP}: primary ny, replicas chicago (priority 1) and seattle (priority 2), async, lease 3 s"
    );
    say!(out, "  volume {VOLUME}: {}", size(VOLUME_SIZE));

    // 1. Processes.
    step(out, 1, "starting the witness and the three agents")?;
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
    let since = Instant::now();
    c.wait_for(
        Wait::FirstPrimary,
        Duration::from_secs(60),
        &[Ny, Chicago, Seattle],
        |c| {
            let g = c.site(Ny).group().ok()?;
            let ready = g.role == Role::Primary
                && g.epoch == 1
                && g.replicas.len() == 2
                && g.replicas
                    .iter()
                    .all(|r| r.state == ReplicaState::Streaming && !r.resyncing)
                && NbdClient::connect(&c.site(Ny).socket(), VOLUME, NBD_TIMEOUT).is_ok();
            if !ready {
                out.progress(
                    None,
                    &roles(&g),
                    &format!(
                        "ny: {} ({:.1} s)",
                        describe(&g),
                        since.elapsed().as_secs_f64()
                    ),
                );
            }
            ready.then_some(())
        },
    )?;
    out.done(&format!(
        "ny is primary in epoch 1; chicago and seattle are streaming ({:.1} s after start)",
        t0.elapsed().as_secs_f64()
    ));

    // 2. Bulk data through NBD, and its replication.
    step(
        out,
        2,
        &format!(
            "writing {} of pseudo-random data to ny over NBD (1 MiB writes, then a flush)",
            size(DATA_LEN)
        ),
    )?;
    let checksum = write_bulk(c, out)?;
    wait_caught_up(c, Ny, out, Duration::from_secs(60))?;
    say!(
        out,
        "  blake3 of the {} written: {checksum}",
        size(DATA_LEN)
    );

    // 3. SIGKILL of the primary while an application writes.
    step(
        out,
        3,
        "SIGKILL of ny while the application appends a 4 KiB record every 10 ms (write + flush)",
    )?;
    let writer = Writer::start(vec![(Ny, c.site(Ny).socket())])?;
    wait_records(c, &writer, Ny, 50)?;
    writer.set_targets(vec![(Chicago, c.site(Chicago).socket())]);
    let ny_pid = c.site(Ny).proc.pid().unwrap_or(0);
    let killed = Instant::now();
    c.kill_site(Ny)?;
    say!(
        out,
        "  ny killed (pid {ny_pid}) after it acknowledged {} records; the application now retries on chicago",
        writer.count_on(Ny)
    );
    let first = c
        .wait_for(
            Wait::Failover,
            Duration::from_secs(20),
            &[Chicago, Seattle],
            |_| {
                let ack = writer.first_ack_on(Chicago, killed);
                if ack.is_none() {
                    out.progress(
                        None,
                        "failover",
                        &format!(
                            "waiting for the failover... {:.1} s",
                            killed.elapsed().as_secs_f64()
                        ),
                    );
                }
                ack
            },
        )
        .map_err(|e| stuck(c, e, &writer))?;
    let rto = first.at.duration_since(killed);
    out.done(&format!(
        "chicago acknowledged a write {:.2} s after the SIGKILL (RTO)",
        rto.as_secs_f64()
    ));
    let g = group(c, Chicago)?;
    if g.role != Role::Primary || g.epoch != 2 {
        return Err(DemoError::NotPromoted {
            site: Chicago,
            role: g.role,
            epoch: g.epoch,
            expected_epoch: 2,
        });
    }
    say!(out, "  chicago is primary in epoch 2 (priority 1 won)");
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
    say!(out, "  seattle follows chicago and is streaming");

    // 4. What chicago has.
    step(out, 4, "checking the data on chicago")?;
    let acks = writer.acks();
    let on_ny: Vec<Ack> = acks.iter().filter(|a| a.site == Ny).cloned().collect();
    let mut client = connect(c, Chicago)?;
    let lost = writer::missing(&mut client, Chicago, &on_ny)?;
    say!(
        out,
        "  records acknowledged by ny before the kill: {}; on chicago: {}; lost: {}",
        on_ny.len(),
        on_ny.len() - lost.len(),
        lost.len()
    );
    if let (Some(first_lost), Some(last)) =
        (on_ny.iter().find(|a| lost.contains(&a.seq)), on_ny.last())
    {
        say!(
            out,
            "  (async mode: the lost ones were acknowledged in the last {} ms before the kill, not yet replicated)",
            killed
                .saturating_duration_since(first_lost.at)
                .max(last.at.saturating_duration_since(first_lost.at))
                .as_millis()
        );
    }
    check_checksum(out, &mut client, &checksum, Chicago)?;
    client.disconnect();

    // 5. The old primary comes back.
    step(out, 5, "restarting ny")?;
    c.start_site(Ny)?;
    say!(
        out,
        "  ny restarted: pid {}",
        c.site(Ny).proc.pid().unwrap_or(0)
    );
    let since = Instant::now();
    c.wait_for(
        Wait::Rejoined,
        Duration::from_secs(60),
        &[Ny, Chicago],
        |c| {
            let g = c.site(Ny).group().ok()?;
            let owner = c.site(Chicago).group().ok()?;
            let link = owner.replicas.iter().find(|r| r.site == Ny.as_str())?;
            let ready = g.role == Role::Replica
                && g.primary == Chicago.as_str()
                && g.replicas
                    .first()
                    .is_some_and(|r| r.state == ReplicaState::Streaming)
                && link.state == ReplicaState::Streaming
                && !link.resyncing;
            if !ready {
                let fraction = link
                    .resync
                    .as_ref()
                    .filter(|p| p.total_bytes > 0)
                    .map(|p| p.compared_bytes as f64 / p.total_bytes as f64);
                out.progress(
                    fraction,
                    &format!("{} {}", roles(&g), link.state),
                    &format!(
                        "ny: {}; chicago -> ny: {} ({:.1} s)",
                        describe(&g),
                        link.state,
                        since.elapsed().as_secs_f64()
                    ),
                );
            }
            ready.then_some(())
        },
    )?;
    let owner = group(c, Chicago)?;
    let link = owner
        .replicas
        .iter()
        .find(|r| r.site == Ny.as_str())
        .ok_or(DemoError::MissingReplica {
            owner: Chicago,
            replica: Ny,
        })?;
    let (resync_compared, resync_sent) = link
        .resync
        .as_ref()
        .map_or((0, 0), |p| (p.compared_bytes, p.sent_bytes));
    out.done(&format!(
        "ny is back as a replica of chicago in epoch {} ({:.1} s)",
        owner.epoch,
        since.elapsed().as_secs_f64()
    ));
    if link.resync.is_some() {
        say!(
            out,
            "  delta resync: compared {} by hash, sent {} of differing chunks (the volume is {})",
            size(resync_compared),
            size(resync_sent),
            size(VOLUME_SIZE)
        );
    } else {
        say!(
            out,
            "  no resync was needed: ny's history was a prefix of chicago's"
        );
    }
    say!(
        out,
        "  {} on the wire to ny since it reconnected (resync and new records)",
        size(link.wire_bytes)
    );
    show_rollback(out, c);

    // 6. Planned migration home.
    step(
        out,
        6,
        "migrating web01 back to ny (tandem migrate), the application writing all along",
    )?;
    c.wait_for(
        Wait::SentEverything {
            from: Chicago,
            to: Ny,
        },
        Duration::from_secs(30),
        &[Chicago, Ny],
        |c| {
            let g = c.site(Chicago).group().ok()?;
            g.replicas
                .iter()
                .find(|r| r.site == Ny.as_str())
                .is_some_and(|r| r.state == ReplicaState::Streaming && r.lag_seconds < 1.0)
                .then_some(())
        },
    )?;
    writer.set_targets(vec![
        (Ny, c.site(Ny).socket()),
        (Chicago, c.site(Chicago).socket()),
    ]);
    let (tx, rx) = mpsc::channel();
    let config = c.site(Chicago).config.clone();
    std::thread::Builder::new()
        .name("demo-migrate".into())
        .spawn(move || {
            let _ = tx.send(api::migrate(&config, GROUP, Ny));
        })
        .map_err(|source| DemoError::Thread {
            name: "migration",
            source,
        })?;
    let asked = Instant::now();
    let answer = c.wait_for(
        Wait::Migration,
        Duration::from_secs(30),
        &[Chicago, Ny],
        |_| rx.try_recv().ok(),
    )?;
    let done = answer.map_err(|source| DemoError::Migrate {
        site: Chicago,
        source,
    })?;
    if done.owner != Ny.as_str() || done.epoch != 3 {
        return Err(DemoError::MigrationEnded {
            owner: done.owner,
            epoch: done.epoch,
            expected_owner: Ny,
            expected_epoch: 3,
        });
    }
    let migrate_ms = done.elapsed_ms;
    let first_on_ny = c
        .wait_for(
            Wait::WriteAfterMigration,
            Duration::from_secs(15),
            &[Ny, Chicago],
            |_| writer.first_ack_on(Ny, asked),
        )
        .map_err(|e| stuck(c, e, &writer))?;
    std::thread::sleep(Duration::from_millis(300));
    if writer.gave_up() {
        return Err(DemoError::OutOfRecordSlots {
            slots: writer::MAX_RECORDS,
        });
    }
    let acks = writer.stop();
    let last_on_chicago = acks
        .iter()
        .rev()
        .find(|a| a.site == Chicago && a.at <= first_on_ny.at)
        .ok_or(DemoError::NoAcks { site: Chicago })?;
    let pause = first_on_ny.at.saturating_duration_since(last_on_chicago.at);
    say!(
        out,
        "  ny is primary in epoch 3{}; writes paused {:.0} ms (last on chicago -> first on ny)",
        migrate_ms.map_or(String::new(), |ms| format!(" (hand-over took {ms} ms)")),
        pause.as_secs_f64() * 1000.0
    );

    // 7. Everything on ny.
    step(out, 7, "checking the data on ny")?;
    let on_chicago: Vec<Ack> = acks.iter().filter(|a| a.site == Chicago).cloned().collect();
    let after: Vec<Ack> = acks
        .iter()
        .filter(|a| a.site == Ny && a.at >= asked)
        .cloned()
        .collect();
    let mut client = connect(c, Ny)?;
    let lost_migration = writer::missing(&mut client, Ny, &on_chicago)?;
    let lost_after = writer::missing(&mut client, Ny, &after)?;
    say!(
        out,
        "  records acknowledged by chicago: {}; on ny: {}; lost: {}",
        on_chicago.len(),
        on_chicago.len() - lost_migration.len(),
        lost_migration.len()
    );
    if !lost_after.is_empty() {
        return Err(DemoError::LostAfterMigration {
            site: Ny,
            records: lost_after,
        });
    }
    if !lost_migration.is_empty() {
        return Err(DemoError::LostInMigration {
            records: lost_migration,
        });
    }
    check_checksum(out, &mut client, &checksum, Ny)?;
    client.disconnect();
    wait_caught_up(c, Ny, out, Duration::from_secs(30))?;
    compare_images(out, c)?;

    Ok(Summary {
        rto,
        acked_on_ny: on_ny.len(),
        lost_at_failover: lost.len(),
        resync_compared,
        resync_sent,
        rejoin_wire: link.wire_bytes,
        pause,
        migrate_ms,
        acked_on_chicago: on_chicago.len(),
        lost_at_migration: lost_migration.len(),
        checksum,
        total: Duration::ZERO,
    })
}

/// Announces step `n`; stops the demo if its output is gone.
fn step(out: &mut Console, n: u32, what: &str) -> Result<(), DemoError> {
    step_of(out, n, STEPS, what)
}

/// Announces step `n` of `steps`; stops the demo if its output is gone.
pub(crate) fn step_of(out: &mut Console, n: u32, steps: u32, what: &str) -> Result<(), DemoError> {
    say!(out, "\n[{n}/{steps}] {what}");
    out.check()
}

/// The demo group's status on `site`.
fn group(c: &Cluster, site: SiteName) -> Result<GroupStatus, DemoError> {
    c.site(site)
        .group()
        .map_err(|source| DemoError::Status { site, source })
}

/// A group's state in a few words.
pub(crate) fn describe(g: &GroupStatus) -> String {
    let links: Vec<String> = g
        .replicas
        .iter()
        .map(|r| {
            if r.resyncing {
                match &r.resync {
                    Some(p) if p.total_bytes > 0 => format!(
                        "{} resyncing {}/{}",
                        r.site,
                        size(p.compared_bytes),
                        size(p.total_bytes)
                    ),
                    _ => format!("{} resyncing", r.site),
                }
            } else {
                format!("{} {}", r.site, r.state)
            }
        })
        .collect();
    if links.is_empty() {
        format!("{} in epoch {}", g.role, g.epoch)
    } else {
        format!("{} in epoch {}, {}", g.role, g.epoch, links.join(", "))
    }
}

/// A group's role and its replicas' states, without numbers that change
/// all the time.
pub(crate) fn roles(g: &GroupStatus) -> String {
    let states: Vec<String> = g
        .replicas
        .iter()
        .map(|r| format!("{} {}", r.site, r.state))
        .collect();
    format!("{} {} {}", g.role, g.epoch, states.join(" "))
}

/// Adds each site's view and the application's last error to a failed
/// wait.
fn stuck(c: &Cluster, cause: DemoError, writer: &Writer) -> DemoError {
    let views = c
        .sites()
        .iter()
        .map(|s| {
            let view = match s.status() {
                Ok(st) => st
                    .groups
                    .iter()
                    .find(|g| g.name == GROUP)
                    .map_or_else(|| "no such group".into(), describe),
                Err(err) => chain(&err),
            };
            (s.name, view)
        })
        .collect();
    DemoError::Stuck {
        cause: Box::new(cause),
        views,
        last_error: writer.last_error(),
    }
}

fn connect(c: &Cluster, site: SiteName) -> Result<NbdClient, DemoError> {
    NbdClient::connect(&c.site(site).socket(), VOLUME, NBD_TIMEOUT).map_err(|source| {
        DemoError::Nbd {
            site,
            action: NbdAction::Open,
            source,
        }
    })
}

/// Deterministic pseudo-random bytes (xorshift64).
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// Writes the bulk data to ny, showing the replicas' lag; returns its
/// BLAKE3 hash.
fn write_bulk(c: &mut Cluster, out: &mut Console) -> Result<String, DemoError> {
    let mut client = connect(c, Ny)?;
    if client.size() != VOLUME_SIZE {
        return Err(DemoError::ExportSize {
            site: Ny,
            size: client.size(),
            expected: VOLUME_SIZE,
        });
    }
    let mut pattern = Pattern(DATA_SEED);
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let started = Instant::now();
    let mut polled: Option<Instant> = None;
    let mut lag = String::new();
    let total = DATA_LEN / CHUNK as u64;
    for i in 0..total {
        c.check()?;
        pattern.fill(&mut buf);
        hasher.update(&buf);
        client
            .write(i * CHUNK as u64, &buf)
            .map_err(|source| DemoError::Nbd {
                site: Ny,
                action: NbdAction::WriteMiB(i),
                source,
            })?;
        if polled.is_none_or(|t| t.elapsed() >= Duration::from_millis(200)) {
            polled = Some(Instant::now());
            if let Ok(g) = c.site(Ny).group() {
                lag = lag_text(&g);
            }
        }
        let quarter = (4 * (i + 1) / total).to_string();
        out.progress(
            Some((i + 1) as f64 / total as f64),
            &quarter,
            &format!("{} written   {lag}", size((i + 1) * CHUNK as u64)),
        );
    }
    client.flush().map_err(|source| DemoError::Nbd {
        site: Ny,
        action: NbdAction::Flush,
        source,
    })?;
    client.disconnect();
    let secs = started.elapsed().as_secs_f64();
    out.done(&format!(
        "{} written and flushed in {secs:.2} s ({:.0} MiB/s)",
        size(DATA_LEN),
        DATA_LEN as f64 / (1 << 20) as f64 / secs.max(1e-6)
    ));
    Ok(hasher.finalize().to_hex().to_string())
}

fn lag_text(g: &GroupStatus) -> String {
    let parts: Vec<String> = g
        .replicas
        .iter()
        .map(|r| format!("{} lag {} ({})", r.site, size(r.lag_bytes), r.state))
        .collect();
    parts.join(", ")
}

/// Waits until `owner` reports every replica streaming with nothing owed.
fn wait_caught_up(
    c: &mut Cluster,
    owner: SiteName,
    out: &mut Console,
    timeout: Duration,
) -> Result<(), DemoError> {
    let since = Instant::now();
    c.wait_for(Wait::CaughtUp(owner), timeout, &SiteName::ALL, |c| {
        let g = c.site(owner).group().ok()?;
        let next = g.next_seq.unwrap_or(0);
        let done = g.replicas.len() == 2
            && g.replicas.iter().all(|r| {
                r.state == ReplicaState::Streaming
                    && !r.resyncing
                    && r.lag_bytes == 0
                    && r.applied_seq + 1 >= next
                    && r.durable_seq + 1 >= next
            });
        if !done {
            out.progress(None, &roles(&g), &format!("replicating: {}", lag_text(&g)));
        }
        done.then_some(())
    })?;
    out.done(&format!(
        "both replicas of {owner} caught up: everything applied ({:.2} s)",
        since.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Waits until `site` acknowledged `n` records.
fn wait_records(
    c: &mut Cluster,
    writer: &Writer,
    site: SiteName,
    n: usize,
) -> Result<(), DemoError> {
    c.wait_for(
        Wait::Records { site, count: n },
        Duration::from_secs(15),
        &[site],
        |_| (writer.count_on(site) >= n).then_some(()),
    )
    .map_err(|e| stuck(c, e, writer))
}

fn hash_range(client: &mut NbdClient, len: u64) -> Result<String, crate::nbd::NbdError> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0;
    while at < len {
        let n = CHUNK.min(usize::try_from(len - at).unwrap_or(CHUNK));
        client.read(at, &mut buf[..n])?;
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    Ok(hasher.finalize().to_hex().to_string())
}

fn check_checksum(
    out: &mut Console,
    client: &mut NbdClient,
    expected: &str,
    site: SiteName,
) -> Result<(), DemoError> {
    let found = hash_range(client, DATA_LEN).map_err(|source| DemoError::Nbd {
        site,
        action: NbdAction::ReadBack(DATA_LEN),
        source,
    })?;
    if found != expected {
        return Err(DemoError::Checksum {
            site,
            len: DATA_LEN,
            found,
            expected: expected.to_owned(),
        });
    }
    say!(
        out,
        "  blake3 of the first {} on {site}: {} (matches)",
        size(DATA_LEN),
        short(&found)
    );
    Ok(())
}

/// ny kept what chicago never got, before it followed chicago.
fn show_rollback(out: &mut Console, c: &Cluster) {
    let dir = c.site(Ny).data_dir.join("rollback");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".img") {
            say!(
                out,
                "  ny saved the regions chicago may lack before following it: {}",
                e.path().display()
            );
        }
    }
}

/// The three images, byte for byte (every replica has applied everything).
fn compare_images(out: &mut Console, c: &Cluster) -> Result<(), DemoError> {
    let mut hashes = Vec::new();
    for s in c.sites() {
        let path = s.image();
        let read = |source| DemoError::ReadImage {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::File::open(&path).map_err(read)?;
        let mut hasher = blake3::Hasher::new();
        std::io::copy(&mut file, &mut hasher).map_err(read)?;
        hashes.push((s.name, hasher.finalize().to_hex().to_string()));
    }
    let first = hashes.first().map(|(_, h)| h.clone()).unwrap_or_default();
    if hashes.iter().any(|(_, h)| *h != first) {
        return Err(DemoError::ImagesDiffer { hashes });
    }
    say!(
        out,
        "  the {} images on ny, chicago and seattle are identical (blake3 {})",
        size(VOLUME_SIZE),
        short(&first)
    );
    Ok(())
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "Summary")?;
        {
            let mut row = |what: &str, value: String| writeln!(f, "  {what:<62} {value}");
            row(
                "failover RTO (SIGKILL of ny -> first write acked by chicago)",
                format!(
                    "{:.2} s  (target: median <= 3 s, max <= 5 s)",
                    self.rto.as_secs_f64()
                ),
            )?;
            row(
                "failover RPO (writes acked by ny, missing on chicago)",
                format!("{} of {} (async)", self.lost_at_failover, self.acked_on_ny),
            )?;
            row(
                "checksum of the 64 MiB on chicago after failover",
                "ok".into(),
            )?;
            row(
                "ny's delta resync: compared / sent / volume",
                format!(
                    "{} / {} / {}",
                    size(self.resync_compared),
                    size(self.resync_sent),
                    size(VOLUME_SIZE)
                ),
            )?;
            row(
                "bytes on the wire to ny after it came back",
                size(self.rejoin_wire),
            )?;
            row(
                "migration pause (last write acked on chicago -> first on ny)",
                format!(
                    "{:.0} ms  (target <= 1 s){}",
                    self.pause.as_secs_f64() * 1000.0,
                    self.migrate_ms
                        .map_or(String::new(), |ms| format!(", hand-over {ms} ms"))
                ),
            )?;
            row(
                "migration data loss (writes acked by chicago, missing on ny)",
                format!("{} of {}", self.lost_at_migration, self.acked_on_chicago),
            )?;
            row("checksum of the 64 MiB on ny after migration", "ok".into())?;
            row("images identical on ny, chicago and seattle", "ok".into())?;
        }
        writeln!(f, "  blake3 of the 64 MiB: {}", self.checksum)?;
        write!(f, "  total time: {:.1} s", self.total.as_secs_f64())
    }
}

fn print_kept(out: &mut Console, c: &Cluster) {
    say!(
        out,
        "\nEverything is still running (--keep); ny is primary for {GROUP}:"
    );
    say!(
        out,
        "  witness  {}  log {}",
        c.witness_addr(),
        c.witness().log.display()
    );
    for s in c.sites() {
        say!(
            out,
            "  {:<8} API http://{}/api/v1/status  token {}  config {}",
            s.name,
            s.api,
            s.config.api_token_path().display(),
            s.config_path.display()
        );
    }
    let ny = c.site(Ny);
    say!(
        out,
        "  NBD      nbd+unix:///{VOLUME}?socket={}",
        ny.socket().display()
    );
    say!(
        out,
        "  try      tandem status --config {}",
        ny.config_path.display()
    );
    let pids: Vec<String> = c.pids().iter().map(|(_, p)| p.to_string()).collect();
    say!(
        out,
        "  stop     kill {} && rm -rf {}",
        pids.join(" "),
        c.dir().display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_is_a_table_of_rows() {
        let s = Summary {
            rto: Duration::from_millis(2330),
            acked_on_ny: 50,
            lost_at_failover: 0,
            resync_compared: 256 << 20,
            resync_sent: 160 << 10,
            rejoin_wire: 196 << 10,
            pause: Duration::from_millis(18),
            migrate_ms: Some(4),
            acked_on_chicago: 40,
            lost_at_migration: 0,
            checksum: "00".into(),
            total: Duration::from_millis(6600),
        };
        let text = s.to_string();
        assert!(text.starts_with("Summary\n"), "{text}");
        assert!(text.contains(
            "  failover RTO (SIGKILL of ny -> first write acked by chicago)   2.33 s  (target"
        ));
        assert!(text.contains(
            "  migration pause (last write acked on chicago -> first on ny)   18 ms  (target <= 1 s), hand-over 4 ms\n"
        ));
        assert!(text.ends_with("  total time: 6.6 s"), "{text}");
    }
}
