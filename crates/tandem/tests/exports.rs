//! No NBD export before ownership (real agents, a real `tandem witness`):
//! a starting agent offers a group's volumes only once the coordinator
//! confirms it as the owner. An old primary that comes back after it was
//! replaced never shows its socket (a VM that libvirt autostarts there
//! would attach to a disk that is about to go away); a primary restarted
//! in its own epoch opens it after the confirmation.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;

const VOLUME: &str = "v";

fn group(c: &Cluster, site: &str) -> serde_json::Value {
    c.status(site)["groups"][0].clone()
}

#[test]
fn a_returning_old_primary_never_opens_its_export_and_a_restarted_owner_opens_it_once_confirmed() {
    let mut c = Cluster::new("ny", &["chicago"], &[vol(VOLUME, "16MiB")], "");
    let witness = Witness::start(c.dir.path());
    c.set_coordinator(&witness.section("2s"));
    c.start("ny");
    c.start("chicago");
    wait_until(Duration::from_secs(30), "ny primary in epoch 1", || {
        let g = group(&c, "ny");
        g["role"] == "primary" && g["epoch"] == 1
    });
    c.wait_replicated(Duration::from_secs(60));
    let ny_socket = c.socket("ny", VOLUME);
    assert!(ny_socket.exists());

    // ny dies; chicago takes over in epoch 2.
    c.kill("ny");
    wait_until(
        Duration::from_secs(30),
        "chicago primary in epoch 2",
        || {
            let g = group(&c, "chicago");
            g["role"] == "primary" && g["epoch"] == 2
        },
    );
    // A crashed agent leaves its socket file; the next start removes it
    // only to listen again once it owns the group.
    let _ = std::fs::remove_file(&ny_socket);

    // ny returns with a role file saying "primary of epoch 1": its socket
    // path is watched (every millisecond) from before the start until ny
    // follows chicago.
    let seen = std::sync::atomic::AtomicBool::new(false);
    let done = std::sync::atomic::AtomicBool::new(false);
    let config = c.site("ny").config.clone();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                if ny_socket.exists() {
                    seen.store(true, std::sync::atomic::Ordering::Release);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        c.spawn("ny");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let following = status_json(&config).is_some_and(|s| {
                let g = &s["groups"][0];
                g["role"] == "replica" && g["primary"] == "chicago"
            });
            if following || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        done.store(true, std::sync::atomic::Ordering::Release);
    });
    let g = group(&c, "ny");
    assert!(
        g["role"] == "replica" && g["primary"] == "chicago",
        "ny never followed chicago: {g}"
    );
    assert!(
        !seen.load(std::sync::atomic::Ordering::Acquire),
        "ny offered its NBD export although chicago owns the group"
    );
    assert!(!ny_socket.exists());

    // chicago restarts within its lease: it keeps epoch 2 and opens its
    // export only after the coordinator confirmed it.
    c.stop("chicago");
    c.start("chicago");
    wait_until(
        Duration::from_secs(30),
        "chicago primary in epoch 2 again",
        || {
            let g = group(&c, "chicago");
            g["role"] == "primary" && g["epoch"] == 2
        },
    );
    let log = c.site("chicago").log();
    let tail = &log[log
        .rfind("NBD exports open once the coordinator confirms")
        .unwrap()..];
    let confirmed = tail
        .find("ownership confirmed: acknowledging writes")
        .unwrap();
    let ready = tail.find("NBD export ready").unwrap();
    assert!(
        confirmed < ready,
        "chicago's export opened before its ownership was confirmed"
    );
    assert!(c.socket("chicago", VOLUME).exists());
}
