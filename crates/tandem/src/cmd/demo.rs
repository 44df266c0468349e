//! `tandem demo [--keep]`: on this machine, a witness and three sites (ny,
//! chicago, seattle) as local processes on loopback, in a temporary
//! directory. It writes through NBD while showing replication, SIGKILLs
//! the primary and measures the automatic failover (RTO, data loss),
//! verifies the data by checksum, brings the old primary back (delta
//! resync), migrates the group home with zero loss, and prints a summary.
//! Needs nothing but this binary.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM};
use tandem_agent::status::{GroupStatus, ReplicaState, Role};
use tandem_config::format_size_approx as size;

use crate::demo::cluster::{Cluster, GROUP, SITES, VOLUME, VOLUME_SIZE};
use crate::demo::nbd::NbdClient;
use crate::demo::progress::Progress;
use crate::demo::writer::{self, Ack, Writer};

/// The pseudo-random data written first, and checked after each move.
const DATA_LEN: u64 = 64 << 20;
const DATA_SEED: u64 = 0x7a6e_6465_6d6f;
const CHUNK: usize = 1 << 20;
const NBD_TIMEOUT: Duration = Duration::from_secs(10);

/// What the demo measured.
struct Summary {
    rto: Duration,
    acked_on_ny: usize,
    lost_at_failover: usize,
    resync_compared: u64,
    resync_sent: u64,
    rejoin_wire: u64,
    pause: Duration,
    migrate_ms: Option<u64>,
    acked_on_chicago: usize,
    lost_at_migration: usize,
    checksum: String,
}

pub fn run(keep: bool) -> Result<()> {
    // Ctrl-C (or SIGTERM) stops the children and cleans up; a second one
    // ends the demo at once (its children die with it, unless --keep).
    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(signal, 1, Arc::clone(&interrupted))?;
        signal_hook::flag::register(signal, Arc::clone(&interrupted))?;
    }
    // Short paths: Unix socket paths are limited to 107 bytes.
    let base = if Path::new("/tmp").is_dir() {
        PathBuf::from("/tmp")
    } else {
        std::env::temp_dir()
    };
    let tmp = tempfile::Builder::new()
        .prefix("tandem-demo-")
        .tempdir_in(&base)
        .with_context(|| format!("cannot create a directory in {}", base.display()))?;
    let dir = tmp.path().to_path_buf();
    let mut cluster = Cluster::new(&dir, keep, interrupted)?;
    let started = Instant::now();
    match flow(&mut cluster) {
        Ok(summary) => {
            print_summary(&summary, started.elapsed());
            if keep {
                print_kept(&cluster);
                cluster.detach();
                let _ = tmp.keep();
            } else {
                let killed = cluster.stop_all(Duration::from_secs(15));
                if !killed.is_empty() {
                    println!("(had to SIGKILL {} on the way out)", killed.join(", "));
                }
                drop(tmp);
                println!("stopped everything and removed {}", dir.display());
            }
            Ok(())
        }
        Err(e) => {
            let _ = cluster.stop_all(Duration::from_secs(10));
            let _ = tmp.keep();
            eprintln!(
                "the demo failed; its logs and data are kept in {} (remove it with rm -rf)",
                dir.display()
            );
            Err(e)
        }
    }
}

fn flow(c: &mut Cluster) -> Result<Summary> {
    let t0 = Instant::now();
    println!("Tandem demo: a witness and three sites on this machine (loopback)");
    println!("  directory {}", c.dir.display());
    println!(
        "  group {GROUP}: primary ny, replicas chicago (priority 1) and seattle (priority 2), async, lease 3 s"
    );
    println!("  volume {VOLUME}: {}", size(VOLUME_SIZE));

    // 1. Processes.
    step(1, "starting the witness and the three agents");
    c.start_witness()?;
    println!(
        "  witness  {}  pid {}",
        c.witness_addr,
        c.witness.pid().unwrap_or(0)
    );
    for name in SITES {
        c.start_site(name)?;
        let s = c.site(name);
        println!(
            "  {name:<8} API http://{}  pid {}  log {}",
            s.api,
            s.proc.pid().unwrap_or(0),
            s.proc.log.display()
        );
    }
    let mut progress = Progress::new();
    let since = Instant::now();
    c.wait_for(
        "ny to be primary in epoch 1 with chicago and seattle streaming",
        Duration::from_secs(60),
        &["ny", "chicago", "seattle"],
        |c| {
            let g = c.site("ny").group()?;
            let ready = g.role == Role::Primary
                && g.epoch == 1
                && g.replicas.len() == 2
                && g.replicas
                    .iter()
                    .all(|r| r.state == ReplicaState::Streaming && !r.resyncing)
                && NbdClient::connect(&c.site("ny").socket(), VOLUME, NBD_TIMEOUT).is_ok();
            if !ready {
                progress.update(
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
    progress.done(&format!(
        "ny is primary in epoch 1; chicago and seattle are streaming ({:.1} s after start)",
        t0.elapsed().as_secs_f64()
    ));

    // 2. Bulk data through NBD, and its replication.
    step(
        2,
        &format!(
            "writing {} of pseudo-random data to ny over NBD (1 MiB writes, then a flush)",
            size(DATA_LEN)
        ),
    );
    let checksum = write_bulk(c, &mut progress)?;
    wait_caught_up(c, "ny", &mut progress, Duration::from_secs(60))?;
    println!("  blake3 of the {} written: {checksum}", size(DATA_LEN));

    // 3. SIGKILL of the primary while an application writes.
    step(
        3,
        "SIGKILL of ny while the application appends a 4 KiB record every 10 ms (write + flush)",
    );
    let writer = Writer::start(vec![("ny".into(), c.site("ny").socket())])?;
    wait_records(c, &writer, "ny", 50)?;
    writer.set_targets(vec![("chicago".into(), c.site("chicago").socket())]);
    let ny_pid = c.site("ny").proc.pid().unwrap_or(0);
    let killed = Instant::now();
    c.kill_site("ny")?;
    println!(
        "  ny killed (pid {ny_pid}) after it acknowledged {} records; the application now retries on chicago",
        writer.count_on("ny")
    );
    let first = c
        .wait_for(
            "a write acknowledged by chicago (automatic failover)",
            Duration::from_secs(20),
            &["chicago", "seattle"],
            |_| {
                let ack = writer.first_ack_on("chicago", killed);
                if ack.is_none() {
                    progress.update(
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
        .map_err(|e| with_roles(c, e, &writer))?;
    let rto = first.at.duration_since(killed);
    progress.done(&format!(
        "chicago acknowledged a write {:.2} s after the SIGKILL (RTO)",
        rto.as_secs_f64()
    ));
    let g = c
        .site("chicago")
        .group()
        .ok_or_else(|| anyhow!("chicago's API does not answer after the failover"))?;
    if g.role != Role::Primary || g.epoch != 2 {
        bail!(
            "chicago acknowledged writes but reports role {} in epoch {} (expected primary in epoch 2)",
            g.role,
            g.epoch
        );
    }
    println!("  chicago is primary in epoch 2 (priority 1 won)");
    c.wait_for(
        "seattle to stream from chicago",
        Duration::from_secs(30),
        &["seattle", "chicago"],
        |c| {
            let g = c.site("seattle").group()?;
            (g.role == Role::Replica
                && g.primary == "chicago"
                && g.replicas
                    .first()
                    .is_some_and(|r| r.state == ReplicaState::Streaming))
            .then_some(())
        },
    )?;
    println!("  seattle follows chicago and is streaming");

    // 4. What chicago has.
    step(4, "checking the data on chicago");
    let acks = writer.acks();
    let on_ny: Vec<Ack> = acks.iter().filter(|a| a.site == "ny").cloned().collect();
    let mut client = connect(c, "chicago")?;
    let lost = writer::missing(&mut client, &on_ny)?;
    println!(
        "  records acknowledged by ny before the kill: {}; on chicago: {}; lost: {}",
        on_ny.len(),
        on_ny.len() - lost.len(),
        lost.len()
    );
    if let (Some(first_lost), Some(last)) =
        (on_ny.iter().find(|a| lost.contains(&a.seq)), on_ny.last())
    {
        println!(
            "  (async mode: the lost ones were acknowledged in the last {} ms before the kill, not yet replicated)",
            killed
                .saturating_duration_since(first_lost.at)
                .max(last.at.saturating_duration_since(first_lost.at))
                .as_millis()
        );
    }
    check_checksum(&mut client, &checksum, "chicago")?;
    client.disconnect();

    // 5. The old primary comes back.
    step(5, "restarting ny");
    c.start_site("ny")?;
    println!(
        "  ny restarted: pid {}",
        c.site("ny").proc.pid().unwrap_or(0)
    );
    let since = Instant::now();
    c.wait_for(
        "ny to come back as chicago's replica, streaming",
        Duration::from_secs(60),
        &["ny", "chicago"],
        |c| {
            let g = c.site("ny").group()?;
            let owner = c.site("chicago").group()?;
            let link = owner.replicas.iter().find(|r| r.site == "ny")?;
            let ready = g.role == Role::Replica
                && g.primary == "chicago"
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
                progress.update(
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
    let owner = c
        .site("chicago")
        .group()
        .ok_or_else(|| anyhow!("chicago's API does not answer"))?;
    let link = owner
        .replicas
        .iter()
        .find(|r| r.site == "ny")
        .ok_or_else(|| anyhow!("chicago does not list ny as a replica"))?;
    let (resync_compared, resync_sent) = link
        .resync
        .as_ref()
        .map_or((0, 0), |p| (p.compared_bytes, p.sent_bytes));
    progress.done(&format!(
        "ny is back as a replica of chicago in epoch {} ({:.1} s)",
        owner.epoch,
        since.elapsed().as_secs_f64()
    ));
    if link.resync.is_some() {
        println!(
            "  delta resync: compared {} by hash, sent {} of differing chunks (the volume is {})",
            size(resync_compared),
            size(resync_sent),
            size(VOLUME_SIZE)
        );
    } else {
        println!("  no resync was needed: ny's history was a prefix of chicago's");
    }
    println!(
        "  {} on the wire to ny since it reconnected (resync and new records)",
        size(link.wire_bytes)
    );
    show_rollback(c);

    // 6. Planned migration home.
    step(
        6,
        "migrating web01 back to ny (tandem migrate), the application writing all along",
    );
    c.wait_for(
        "chicago to have sent ny everything",
        Duration::from_secs(30),
        &["chicago", "ny"],
        |c| {
            let g = c.site("chicago").group()?;
            g.replicas
                .iter()
                .find(|r| r.site == "ny")
                .is_some_and(|r| r.state == ReplicaState::Streaming && r.lag_seconds < 1.0)
                .then_some(())
        },
    )?;
    writer.set_targets(vec![
        ("ny".into(), c.site("ny").socket()),
        ("chicago".into(), c.site("chicago").socket()),
    ]);
    let (tx, rx) = mpsc::channel();
    let config = c.site("chicago").config.clone();
    std::thread::Builder::new()
        .name("demo-migrate".into())
        .spawn(move || {
            let answer = super::status::api_request(
                &config,
                "POST",
                &format!("/api/v1/groups/{GROUP}/migrate"),
                Some(r#"{"to":"ny"}"#),
            );
            let _ = tx.send(answer);
        })
        .context("cannot start the migration thread")?;
    let asked = Instant::now();
    let answer = c.wait_for(
        "the migration to finish (POST /api/v1/groups/web01/migrate on chicago)",
        Duration::from_secs(30),
        &["chicago", "ny"],
        |_| rx.try_recv().ok(),
    )?;
    let answer = answer.context("chicago refused the migration")?;
    let done: serde_json::Value =
        serde_json::from_str(&answer).context("the migration's answer is not valid JSON")?;
    if done["owner"] != "ny" || done["epoch"] != 3 {
        bail!(
            "the migration ended with owner {} in epoch {} (expected ny in epoch 3)",
            done["owner"],
            done["epoch"]
        );
    }
    let migrate_ms = done["elapsed_ms"].as_u64();
    let first_on_ny = c
        .wait_for(
            "a write acknowledged by ny after the migration",
            Duration::from_secs(15),
            &["ny", "chicago"],
            |_| writer.first_ack_on("ny", asked),
        )
        .map_err(|e| with_roles(c, e, &writer))?;
    std::thread::sleep(Duration::from_millis(300));
    if let Some(why) = writer.gave_up() {
        bail!("the application stopped writing: {why}");
    }
    let acks = writer.stop();
    let last_on_chicago = acks
        .iter()
        .rev()
        .find(|a| a.site == "chicago" && a.at <= first_on_ny.at)
        .ok_or_else(|| anyhow!("chicago acknowledged no write"))?;
    let pause = first_on_ny.at.saturating_duration_since(last_on_chicago.at);
    println!(
        "  ny is primary in epoch 3{}; writes paused {:.0} ms (last on chicago -> first on ny)",
        migrate_ms.map_or(String::new(), |ms| format!(" (hand-over took {ms} ms)")),
        pause.as_secs_f64() * 1000.0
    );

    // 7. Everything on ny.
    step(7, "checking the data on ny");
    let on_chicago: Vec<Ack> = acks
        .iter()
        .filter(|a| a.site == "chicago")
        .cloned()
        .collect();
    let after: Vec<Ack> = acks
        .iter()
        .filter(|a| a.site == "ny" && a.at >= asked)
        .cloned()
        .collect();
    let mut client = connect(c, "ny")?;
    let lost_migration = writer::missing(&mut client, &on_chicago)?;
    let lost_after = writer::missing(&mut client, &after)?;
    println!(
        "  records acknowledged by chicago: {}; on ny: {}; lost: {}",
        on_chicago.len(),
        on_chicago.len() - lost_migration.len(),
        lost_migration.len()
    );
    if !lost_after.is_empty() {
        bail!(
            "{} records acknowledged by ny after the migration are not on ny: {:?}",
            lost_after.len(),
            lost_after
        );
    }
    if !lost_migration.is_empty() {
        bail!(
            "the migration lost {} acknowledged writes (records {:?}): a planned migration must lose nothing",
            lost_migration.len(),
            lost_migration
        );
    }
    check_checksum(&mut client, &checksum, "ny")?;
    client.disconnect();
    wait_caught_up(c, "ny", &mut progress, Duration::from_secs(30))?;
    compare_images(c)?;

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
    })
}

fn step(n: u32, what: &str) {
    println!("\n[{n}/7] {what}");
}

/// A group's state in a few words.
fn describe(g: &GroupStatus) -> String {
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
fn roles(g: &GroupStatus) -> String {
    let states: Vec<String> = g
        .replicas
        .iter()
        .map(|r| format!("{} {}", r.site, r.state))
        .collect();
    format!("{} {} {}", g.role, g.epoch, states.join(" "))
}

/// Adds each site's view and the application's last error to a failure.
fn with_roles(c: &Cluster, e: anyhow::Error, writer: &Writer) -> anyhow::Error {
    let mut views = String::new();
    for s in &c.sites {
        let view = match s.status() {
            Ok(st) => st
                .groups
                .iter()
                .find(|g| g.name == GROUP)
                .map_or_else(|| "no such group".into(), describe),
            Err(err) => format!("{err:#}"),
        };
        views.push_str(&format!("  {}: {view}\n", s.name));
    }
    let last = writer.last_error().unwrap_or_else(|| "none".into());
    anyhow!("{e:#}\nwhat the sites say:\n{views}the application's last error: {last}")
}

fn connect(c: &Cluster, site: &str) -> Result<NbdClient> {
    NbdClient::connect(&c.site(site).socket(), VOLUME, NBD_TIMEOUT)
        .with_context(|| format!("cannot open {VOLUME} on {site} over NBD"))
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
fn write_bulk(c: &mut Cluster, progress: &mut Progress) -> Result<String> {
    let mut client = connect(c, "ny")?;
    if client.size() != VOLUME_SIZE {
        bail!(
            "ny's export is {} bytes, expected {VOLUME_SIZE}",
            client.size()
        );
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
            .with_context(|| format!("writing MiB {i} to ny"))?;
        if polled.is_none_or(|t| t.elapsed() >= Duration::from_millis(200)) {
            polled = Some(Instant::now());
            if let Some(g) = c.site("ny").group() {
                lag = lag_text(&g);
            }
        }
        let quarter = (4 * (i + 1) / total).to_string();
        progress.update(
            Some((i + 1) as f64 / total as f64),
            &quarter,
            &format!("{} written   {lag}", size((i + 1) * CHUNK as u64)),
        );
    }
    client.flush().context("flushing ny")?;
    client.disconnect();
    let secs = started.elapsed().as_secs_f64();
    progress.done(&format!(
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
    owner: &str,
    progress: &mut Progress,
    timeout: Duration,
) -> Result<()> {
    let since = Instant::now();
    let others = SITES.to_vec();
    c.wait_for(
        &format!("{owner}'s replicas to catch up"),
        timeout,
        &others,
        |c| {
            let g = c.site(owner).group()?;
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
                progress.update(None, &roles(&g), &format!("replicating: {}", lag_text(&g)));
            }
            done.then_some(())
        },
    )?;
    progress.done(&format!(
        "both replicas of {owner} caught up: everything applied ({:.2} s)",
        since.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Waits until `site` acknowledged `n` records.
fn wait_records(c: &mut Cluster, writer: &Writer, site: &str, n: usize) -> Result<()> {
    c.wait_for(
        &format!("{n} records acknowledged by {site}"),
        Duration::from_secs(15),
        &[site],
        |_| (writer.count_on(site) >= n).then_some(()),
    )
    .map_err(|e| with_roles(c, e, writer))
}

fn hash_range(client: &mut NbdClient, len: u64) -> Result<String> {
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

fn check_checksum(client: &mut NbdClient, expected: &str, site: &str) -> Result<()> {
    let found = hash_range(client, DATA_LEN)
        .with_context(|| format!("reading the {} back from {site}", size(DATA_LEN)))?;
    if found != expected {
        bail!(
            "the {} read back from {site} differ: blake3 {found}, written {expected}",
            size(DATA_LEN)
        );
    }
    println!(
        "  blake3 of the first {} on {site}: {} (matches)",
        size(DATA_LEN),
        short(&found)
    );
    Ok(())
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(16)]
}

/// ny kept what chicago never got, before it followed chicago.
fn show_rollback(c: &Cluster) {
    let dir = c.site("ny").data_dir.join("rollback");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".img") {
            println!(
                "  ny saved the regions chicago may lack before following it: {}",
                e.path().display()
            );
        }
    }
}

/// The three images, byte for byte (every replica has applied everything).
fn compare_images(c: &mut Cluster) -> Result<()> {
    let mut hashes = Vec::new();
    for s in &c.sites {
        let path = s.image();
        let mut file = std::fs::File::open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let mut hasher = blake3::Hasher::new();
        std::io::copy(&mut file, &mut hasher)
            .with_context(|| format!("cannot read {}", path.display()))?;
        hashes.push((s.name.clone(), hasher.finalize().to_hex().to_string()));
    }
    let first = &hashes[0].1;
    if hashes.iter().any(|(_, h)| h != first) {
        let list: Vec<String> = hashes
            .iter()
            .map(|(n, h)| format!("{n} {}", short(h)))
            .collect();
        bail!(
            "the three images differ after everything was replicated: {}",
            list.join(", ")
        );
    }
    println!(
        "  the {} images on ny, chicago and seattle are identical (blake3 {})",
        size(VOLUME_SIZE),
        short(first)
    );
    Ok(())
}

fn print_summary(s: &Summary, total: Duration) {
    let row = |what: &str, value: String| println!("  {what:<62} {value}");
    println!("\nSummary");
    row(
        "failover RTO (SIGKILL of ny -> first write acked by chicago)",
        format!(
            "{:.2} s  (target: median <= 3 s, max <= 5 s)",
            s.rto.as_secs_f64()
        ),
    );
    row(
        "failover RPO (writes acked by ny, missing on chicago)",
        format!("{} of {} (async)", s.lost_at_failover, s.acked_on_ny),
    );
    row(
        "checksum of the 64 MiB on chicago after failover",
        "ok".into(),
    );
    row(
        "ny's delta resync: compared / sent / volume",
        format!(
            "{} / {} / {}",
            size(s.resync_compared),
            size(s.resync_sent),
            size(VOLUME_SIZE)
        ),
    );
    row(
        "bytes on the wire to ny after it came back",
        size(s.rejoin_wire),
    );
    row(
        "migration pause (last write acked on chicago -> first on ny)",
        format!(
            "{:.0} ms  (target <= 1 s){}",
            s.pause.as_secs_f64() * 1000.0,
            s.migrate_ms
                .map_or(String::new(), |ms| format!(", hand-over {ms} ms"))
        ),
    );
    row(
        "migration data loss (writes acked by chicago, missing on ny)",
        format!("{} of {}", s.lost_at_migration, s.acked_on_chicago),
    );
    row("checksum of the 64 MiB on ny after migration", "ok".into());
    row("images identical on ny, chicago and seattle", "ok".into());
    println!("  blake3 of the 64 MiB: {}", s.checksum);
    println!("  total time: {:.1} s", total.as_secs_f64());
}

fn print_kept(c: &Cluster) {
    println!("\nEverything is still running (--keep); ny is primary for {GROUP}:");
    println!(
        "  witness  {}  log {}",
        c.witness_addr,
        c.witness.log.display()
    );
    for s in &c.sites {
        println!(
            "  {:<8} API http://{}/api/v1/status  token {}  config {}",
            s.name,
            s.api,
            s.config.api_token_path().display(),
            s.config_path.display()
        );
    }
    let ny = c.site("ny");
    println!(
        "  NBD      nbd+unix:///{VOLUME}?socket={}",
        ny.socket().display()
    );
    println!(
        "  try      tandem status --config {}",
        ny.config_path.display()
    );
    let pids: Vec<String> = c.pids().iter().map(|(_, p)| p.to_string()).collect();
    println!(
        "  stop     kill {} && rm -rf {}",
        pids.join(" "),
        c.dir.display()
    );
}
