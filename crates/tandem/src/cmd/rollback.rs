//! `tandem rollback list|show|export|discard`: the rollback data a demoted
//! primary saved (docs/ROLLBACK.md), read from this site's data directory
//! directly (the agent may run or not).

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tandem_agent::rollback::{self, Entry};
use tandem_config::{format_size, format_size_approx};

fn data_dir(config_path: &Path) -> Result<std::path::PathBuf> {
    Ok(crate::load_config(config_path)?.site.data_dir)
}

fn created(e: &Entry) -> String {
    e.created
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_else(|| "-".into())
}

pub fn list(config_path: &Path, json: bool) -> Result<()> {
    let entries = rollback::list(&data_dir(config_path)?)?;
    if json {
        let items: Vec<serde_json::Value> = entries
            .iter()
            .map(|e| {
                let (ranges, bytes) = match &e.state {
                    Ok(i) => (i.ranges.len(), i.data_len()),
                    Err(_) => (0, e.data_bytes),
                };
                serde_json::json!({
                    "id": e.id,
                    "group": e.group,
                    "epoch": e.epoch,
                    "seq": e.seq,
                    "created": e.created.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                    "ranges": ranges,
                    "bytes": bytes,
                    "complete": e.state.is_ok(),
                    "problem": e.state.as_ref().err().map(ToString::to_string),
                    "path": e.data,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "rollbacks": items }))?
        );
        return Ok(());
    }
    if entries.is_empty() {
        println!("no rollback data");
        return Ok(());
    }
    println!(
        "{:<28} {:<12} {:>6} {:>10} {:<20} {:>7} {:>10}  STATE / PATH",
        "ID", "GROUP", "EPOCH", "SEQ", "CREATED", "RANGES", "BYTES"
    );
    for e in &entries {
        let (ranges, bytes, state) = match &e.state {
            Ok(i) => (
                i.ranges.len().to_string(),
                format_size_approx(i.data_len()),
                "complete".to_string(),
            ),
            Err(why) => (
                "-".into(),
                format_size_approx(e.data_bytes),
                format!("incomplete: {why}"),
            ),
        };
        println!(
            "{:<28} {:<12} {:>6} {:>10} {:<20} {:>7} {:>10}  {state}  {}",
            e.id,
            e.group,
            e.epoch,
            e.seq,
            created(e),
            ranges,
            bytes,
            e.data.display()
        );
    }
    Ok(())
}

pub fn show(config_path: &Path, id: &str) -> Result<()> {
    let e = rollback::open(&data_dir(config_path)?, id)?;
    println!(
        "{}: group {}, epoch {}, seq {}, created {}",
        e.id,
        e.group,
        e.epoch,
        e.seq,
        created(&e)
    );
    println!("data: {}", e.data.display());
    let index = match &e.state {
        Ok(i) => i,
        Err(why) => {
            println!("incomplete: {why} ({} bytes of data)", e.data_bytes);
            return Ok(());
        }
    };
    println!(
        "{:<20} {:>16} {:>16} {:>12}",
        "VOLUME", "OFFSET", "LENGTH", "SIZE"
    );
    for r in &index.ranges {
        println!(
            "{:<20} {:>16} {:>16} {:>12}",
            r.volume,
            r.offset,
            r.length,
            format_size(r.length)
        );
    }
    for v in index.volumes() {
        let (n, bytes) = index
            .ranges
            .iter()
            .filter(|r| r.volume == v)
            .fold((0, 0), |(n, b), r| (n + 1, b + r.length));
        println!(
            "volume {v}: {n} range(s), {} ({bytes} bytes)",
            format_size_approx(bytes)
        );
    }
    println!(
        "total: {} ({} bytes) in {} range(s)",
        format_size_approx(index.data_len()),
        index.data_len(),
        index.ranges.len()
    );
    Ok(())
}

pub fn export(
    config_path: &Path,
    id: &str,
    volume: &str,
    out: Option<PathBuf>,
    nbd: Option<PathBuf>,
) -> Result<()> {
    let data_dir = data_dir(config_path)?;
    let e = rollback::open(&data_dir, id)?;
    // The volume's full size, from its image on this site (a replica keeps
    // it); without one, the export ends with the last saved range.
    let image = tandem_agent::Layout::new(&data_dir).image(volume);
    let size = match std::fs::metadata(&image) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", image.display())),
    };
    match (out, nbd) {
        (Some(out), _) => {
            let copied = rollback::export(&e, volume, &out, size)?;
            let written = std::fs::metadata(&out)?.len();
            println!(
                "wrote {}: {} of volume {volume} from {id} at their original offsets, holes elsewhere ({} raw file)",
                out.display(),
                format_size_approx(copied),
                format_size_approx(written)
            );
            Ok(())
        }
        (None, Some(socket)) => serve(rollback::View::open(&e, volume, size)?, &socket, id),
        (None, None) => bail!("give --out FILE or --nbd SOCKET"),
    }
}

/// Serves a view read-only on a Unix socket until SIGINT or SIGTERM.
fn serve(view: rollback::View, socket: &Path, id: &str) -> Result<()> {
    use tandem_nbd::Export;
    if socket.exists() {
        bail!(
            "{} exists already: choose a new socket path",
            socket.display()
        );
    }
    let listener = UnixListener::bind(socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    let (name, size) = (view.name().to_owned(), view.size());
    let mut signals = Signals::new([SIGINT, SIGTERM]).context("cannot handle signals")?;
    let server = tandem_nbd::Server::new().context("cannot start the NBD server")?;
    let scope = server.scope();
    scope
        .serve_unix(listener, Arc::new(rollback::ViewCatalog(Arc::new(view))))
        .context("cannot serve")?;
    println!(
        "serving {id} volume {name} ({}) read-only on nbd+unix:///{name}?socket={} until Ctrl-C",
        format_size_approx(size),
        socket.display()
    );
    let _ = std::io::stdout().flush();
    let _ = signals.forever().next();
    scope.shutdown(Duration::from_secs(5));
    server.stop();
    let _ = std::fs::remove_file(socket);
    println!("stopped");
    Ok(())
}

pub fn discard(config_path: &Path, id: &str) -> Result<()> {
    rollback::discard(&data_dir(config_path)?, id)?;
    println!("discarded {id}");
    Ok(())
}
