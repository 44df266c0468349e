//! A primary and two replicas in one process: the real capture, shippers,
//! receivers, journals and images, over the in-process network of
//! `support/link.rs` with partitions, delays and resets. Writes go on
//! through every fault; once healed, both replicas hold exactly the
//! primary's images, consistent, and a replica that was cut off got only
//! what it lacked.

#![allow(clippy::unwrap_used)]
// Test sizes are small constants.
#![allow(clippy::cast_possible_truncation)]

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use parking_lot::Mutex;
use support::link::{Filter, Network};
use support::replica::replica_site;
use tandem_capture::{CaptureVolume, GroupCapture};
use tandem_replication::receiver;
use tandem_replication::replica::Position;
use tandem_replication::shipper::{ConnectError, Connection, Link, LinkState, Shipper, SiteLink};
use tandem_testkit::poll;
use tandem_volume::RawImage;

const SIZE: u64 = 16 << 20;
const REPLICAS: [&str; 2] = ["r1", "r2"];

struct Replica {
    position: Arc<Mutex<Position>>,
    link: Arc<Link>,
    image: std::path::PathBuf,
}

struct Cluster {
    net: Arc<Network>,
    capture: Arc<GroupCapture>,
    replicas: Vec<Replica>,
    stop: Arc<AtomicBool>,
    shippers: Vec<thread::JoinHandle<()>>,
    primary_image: std::path::PathBuf,
}

fn image(path: &Path) -> Arc<RawImage> {
    Arc::new(RawImage::open_or_create(path, SIZE).unwrap())
}

fn start(dir: &Path) -> Cluster {
    let net = Network::new();
    let primary_image = dir.join("ny.img");
    let capture = Arc::new(
        GroupCapture::open(
            &dir.join("capture"),
            "g",
            vec![CaptureVolume {
                name: "v".into(),
                image: image(&primary_image),
            }],
            &[false],
            &["r1".into(), "r2".into()],
            // A small queue: a partitioned replica overflows into dirty
            // ranges and gets a delta resync.
            4 << 20,
        )
        .unwrap(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let mut replicas = Vec::new();
    let mut shippers = Vec::new();
    for site in REPLICAS {
        let img_path = dir.join(format!("{site}.img"));
        let replica = replica_site(&dir.join(site), site, &["ny", "r1", "r2"], &img_path, SIZE);
        let (ctx, position) = (replica.ctx, replica.position);
        let link = Arc::new(Link::new(1, (0, 0)));
        let connect = {
            let net = Arc::clone(&net);
            Box::new(move || {
                let c = net.connect("ny", site).map_err(ConnectError::Socket)?;
                let (reader, writer) = c.server;
                let ctx = Arc::clone(&ctx);
                thread::spawn(move || {
                    let _ = receiver::serve(&ctx, reader, writer, None, None);
                });
                let reset = Arc::clone(&c.reset);
                let (reader, writer) = c.client;
                Ok(Connection {
                    reader: Box::new(reader),
                    writer: Box::new(writer),
                    close: Box::new(move || reset.store(true, Ordering::Release)),
                })
            })
        };
        let shipper = Shipper {
            capture: Arc::clone(&capture),
            local_site: "ny".into(),
            replica_site: site.into(),
            epoch: 1,
            fork: (0, 0),
            site: SiteLink::new("ny", site, connect),
            link: Arc::clone(&link),
            stop: Arc::clone(&stop),
            files: None,
            verify: crossbeam_channel::never(),
            definition: None,
            gather: Duration::from_millis(1),
        };
        shippers.push(thread::spawn(move || shipper.run()));
        replicas.push(Replica {
            position,
            link,
            image: img_path,
        });
    }
    Cluster {
        net,
        capture,
        replicas,
        stop,
        shippers,
        primary_image,
    }
}

impl Cluster {
    /// Waits until replica `i` is streaming, consistent and holds every
    /// change made so far.
    fn caught_up(&self, i: usize) {
        let r = &self.replicas[i];
        let site = REPLICAS[i];
        let done = poll(Duration::from_secs(60), || {
            let next = self.capture.next_seq();
            let lag = self.capture.lag(site).unwrap();
            let link = r.link.info();
            let p = *r.position.lock();
            (link.state == LinkState::Streaming
                && link.replica_consistent
                && lag.bytes == 0
                && !lag.resyncing
                && lag.acked + 1 >= next
                && p.consistent
                && p.applied + 1 >= next)
                .then_some(())
        });
        assert!(
            done.is_some(),
            "{site} did not catch up: {:?} {:?} {:?}",
            self.capture.lag(site),
            r.link.info(),
            r.position.lock()
        );
    }

    fn identical(&self, i: usize) -> bool {
        std::fs::read(&self.primary_image).unwrap()
            == std::fs::read(&self.replicas[i].image).unwrap()
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        self.net.heal();
        for s in self.shippers.drain(..) {
            s.join().unwrap();
        }
    }
}

/// Writes `n` records of 4–16 KiB at pseudo-random places.
fn writes(capture: &GroupCapture, seed: u64, n: u64) -> u64 {
    let mut x = seed | 1;
    let mut bytes = 0;
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % (SIZE / 4096)) * 4096;
        let len = (4096 * (1 + (x >> 20) % 4)).min(SIZE - off);
        capture
            .write(0, off, &vec![(x >> 8) as u8 | 1; len as usize], false)
            .unwrap();
        bytes += len;
    }
    capture.flush(0).unwrap();
    bytes
}

#[test]
fn two_replicas_converge_through_partitions_delays_and_resets() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path());
    writes(&c.capture, 1, 300);
    c.caught_up(0);
    c.caught_up(1);
    assert!(c.identical(0) && c.identical(1));

    // r2 is cut off while r1 is slow: writes go on; r1 keeps up through
    // its delay, r2's changes overflow into dirty ranges.
    c.net.set(
        "ny",
        "r2",
        Filter {
            partitioned: true,
            ..Filter::default()
        },
    );
    c.net.set(
        "ny",
        "r1",
        Filter {
            delay: Duration::from_millis(20),
            ..Filter::default()
        },
    );
    c.net.reset_between("ny", "r1");
    let changed = writes(&c.capture, 2, 2000);
    c.caught_up(0);
    assert!(c.identical(0));
    assert!(c.capture.lag("r2").unwrap().resyncing, "r2 overflowed");

    // r1's connections reset every few hundred KiB while writes go on.
    c.net.set(
        "ny",
        "r1",
        Filter {
            reset_after: Some(300 << 10),
            ..Filter::default()
        },
    );
    writes(&c.capture, 3, 500);

    // Healed: both converge; r2 got its changes, not the volume.
    c.net.heal();
    c.net.reset_between("ny", "r1");
    c.caught_up(0);
    c.caught_up(1);
    assert!(c.identical(0), "r1 differs from the primary");
    assert!(c.identical(1), "r2 differs from the primary");
    let r2 = c.replicas[1].link.info();
    assert!(
        r2.resync_sent < changed + (4 << 20),
        "r2 got {} bytes for {changed} changed",
        r2.resync_sent
    );
    assert!(r2.resync_sent < SIZE, "r2 got a full copy");
    assert!(c.replicas[0].link.info().connects >= 3, "r1 was reset");
    c.stop();
}
