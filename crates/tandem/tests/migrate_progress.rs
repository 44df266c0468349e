//! `tandem migrate` shows how far the target has to go, at what rate and
//! when it should be there (real agents, a real `tandem witness`): the
//! target is made to lag behind a 32 Mbit link, and the command's progress
//! lines (plain lines: stderr is not a terminal) carry the bytes left, the
//! rate and an ETA before it reports the new owner.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const VOLUME: &str = "v";

fn tandem(args: &[&str], config: &std::path::Path) -> std::process::Output {
    run_with_timeout(
        Command::new(TANDEM).args(args).arg("--config").arg(config),
        Duration::from_secs(120),
    )
}

#[test]
fn migrate_shows_the_drain_with_rate_and_eta() {
    let mut c = Cluster::new("ny", &["chicago"], &[vol(VOLUME, "64MiB")], "");
    let witness = Witness::start(c.dir.path());
    c.set_coordinator(&witness.section("3s"));
    c.start("ny");
    c.start("chicago");
    c.wait_replicated(Duration::from_secs(60));
    let ny = c.site("ny").config.clone();
    // chicago falls 24 MiB behind, then catches up at 32 Mbit (~6 s).
    assert!(tandem(&["bandwidth", "chicago", "paused"], &ny)
        .status
        .success());
    // Incompressible data (a pattern would travel compressed at once).
    let random = c.dir.path().join("random.img");
    std::fs::write(&random, pattern(7, 24 << 20)).unwrap();
    let out = run_with_timeout(
        Command::new(tool("nbdcopy"))
            .arg(&random)
            .arg(c.uri("ny", VOLUME)),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{out:?}");
    assert!(tandem(&["bandwidth", "chicago", "32Mbit"], &ny)
        .status
        .success());
    let out = tandem(&["migrate", "g", "--to", "chicago"], &ny);
    let err = String::from_utf8_lossy(&out.stderr);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{err}{said}");
    assert!(said.contains("owned by chicago in epoch 2"), "{said}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("migrate g: chicago catching up"))
        .collect();
    assert!(!lines.is_empty(), "no progress line:\n{err}");
    assert!(
        lines.iter().any(|l| l.contains("/s") && l.contains("ETA")),
        "progress lines carry a rate and an ETA:\n{err}"
    );
    assert!(
        err.contains("migrate g: chicago holds every write"),
        "{err}"
    );
}
