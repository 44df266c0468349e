//! Several groups over one link (docs/PEER.md, "Links"): the sessions of
//! every group between two sites share one connection; a session that
//! ends (the replica ends it, as on a promotion) comes back on the same
//! link without disturbing the others; a cut link brings every group
//! back over one new link.
#![allow(clippy::unwrap_used)]
#![allow(clippy::cast_possible_truncation)] // pattern bytes keep the low bits on purpose

mod support;

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use support::replica::pair_connection;
use tandem_capture::{CaptureVolume, GroupCapture};
use tandem_replication::owners::Owners;
use tandem_replication::receiver::{GroupPlan, Membership, ReceiverContext};
use tandem_replication::replica::{ReplicaGroup, ReplicaVolume};
use tandem_replication::shipper::{Link, LinkState, Shipper, ShipperTask, SiteLink};
use tandem_volume::RawImage;

const SIZE: u64 = 8 << 20;
const GROUPS: [&str; 3] = ["a", "b", "c"];

struct Group {
    capture: Arc<GroupCapture>,
    link: Arc<Link>,
    plan: Arc<GroupPlan>,
}

struct Sites {
    groups: Vec<Group>,
    stop: Arc<AtomicBool>,
    /// Connections the primary made to the replica site.
    connections: Arc<AtomicU64>,
    live: Arc<Mutex<Vec<UnixStream>>>,
    shippers: Vec<ShipperTask>,
}

fn image(path: &Path) -> Arc<RawImage> {
    Arc::new(RawImage::open_or_create(path, SIZE).unwrap())
}

fn start(dir: &Path) -> Sites {
    let mut plans = Vec::new();
    for g in GROUPS {
        let group = Arc::new(Mutex::new(
            ReplicaGroup::open(
                &dir.join(format!("replica-{g}")),
                g,
                vec![ReplicaVolume {
                    name: format!("{g}-v"),
                    image: image(&dir.join(format!("{g}-r.img"))),
                }],
            )
            .unwrap(),
        ));
        let position = group.lock().published();
        plans.push(Arc::new(GroupPlan {
            membership: Membership {
                group: g.into(),
                primary: "ny".into(),
                sites: vec!["ny".into(), "dr".into()],
                volumes: vec![(format!("{g}-v"), SIZE)],
            },
            position,
            group,
            connected: Arc::new(AtomicBool::new(false)),
            files_dir: dir.join(format!("files-{g}")),
            files: Vec::new(),
            vm_definition: None,
            session: Mutex::new(None),
            marks: Default::default(),
        }));
    }
    let ctx = Arc::new(ReceiverContext {
        site: "dr".into(),
        groups: parking_lot::RwLock::new(plans.clone()),
        definer: parking_lot::RwLock::new(None),
        grantor: parking_lot::RwLock::new(None),
        owners: Arc::new(Owners::configured()),
    });
    let connections = Arc::new(AtomicU64::new(0));
    let live: Arc<Mutex<Vec<UnixStream>>> = Arc::new(Mutex::new(Vec::new()));
    let connect = {
        let (connections, live) = (Arc::clone(&connections), Arc::clone(&live));
        Box::new(move || {
            connections.fetch_add(1, Ordering::Relaxed);
            pair_connection(&ctx, &live)
        })
    };
    let site = SiteLink::new("ny", "dr", connect);
    let stop = Arc::new(AtomicBool::new(false));
    let mut groups = Vec::new();
    let mut shippers = Vec::new();
    for (g, plan) in GROUPS.iter().zip(plans) {
        let capture = Arc::new(
            GroupCapture::open(
                &dir.join(format!("capture-{g}")),
                g,
                vec![CaptureVolume {
                    name: format!("{g}-v"),
                    image: image(&dir.join(format!("{g}-p.img"))),
                }],
                &[false],
                &["dr".into()],
                64 << 20,
            )
            .unwrap(),
        );
        let link = Arc::new(Link::new(1, (0, 0)));
        shippers.push(
            Shipper {
                capture: Arc::clone(&capture),
                local_site: "ny".into(),
                replica_site: "dr".into(),
                epoch: 1,
                fork: (0, 0),
                site: Arc::clone(&site),
                link: Arc::clone(&link),
                stop: Arc::clone(&stop),
                files: None,
                verify: crossbeam_channel::never(),
                definition: None,
                gather: Duration::ZERO,
            }
            .spawn(),
        );
        groups.push(Group {
            capture,
            link,
            plan,
        });
    }
    Sites {
        groups,
        stop,
        connections,
        live,
        shippers,
    }
}

fn write_burst(capture: &GroupCapture, seed: u64, n: u64) {
    let mut x = seed | 1;
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % (SIZE / 4096)) * 4096;
        capture
            .write(0, off, &vec![(x >> 8) as u8 | 1; 4096], false)
            .unwrap();
    }
    capture.flush(0).unwrap();
}

impl Sites {
    /// Waits until every group streams and its replica holds every change.
    fn wait_caught_up(&self, dir: &Path) {
        for (g, group) in GROUPS.iter().zip(&self.groups) {
            let mut last = String::new();
            let done = tandem_testkit::poll(Duration::from_secs(60), || {
                let lag = group.capture.lag("dr").unwrap();
                let link = group.link.info();
                let next = group.capture.next_seq();
                last = format!("{lag:?} {link:?}");
                (link.state == LinkState::Streaming
                    && link.replica_consistent
                    && lag.acked + 1 >= next
                    && link.applied + 1 >= next)
                    .then_some(())
            });
            assert!(done.is_some(), "group {g} did not catch up: {last}");
            let (p, r) = (
                std::fs::read(dir.join(format!("{g}-p.img"))).unwrap(),
                std::fs::read(dir.join(format!("{g}-r.img"))).unwrap(),
            );
            // Applied is acknowledged before the images are synced, but
            // the replica's writes are in the page cache: equal.
            assert!(p == r, "group {g}: replica differs from primary");
        }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Release);
        for g in &self.groups {
            g.capture.close();
        }
        for s in self.shippers {
            s.join();
        }
        for s in self.live.lock().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[test]
fn groups_share_one_link_and_a_session_ended_by_the_replica_comes_back_alone() {
    let dir = tempfile::tempdir().unwrap();
    let sites = start(dir.path());
    for (i, g) in sites.groups.iter().enumerate() {
        write_burst(&g.capture, 11 + i as u64, 200);
    }
    sites.wait_caught_up(dir.path());
    assert_eq!(
        sites.connections.load(Ordering::Relaxed),
        1,
        "three groups, one connection"
    );
    for g in &sites.groups {
        assert_eq!(g.link.info().connects, 1);
    }

    // The replica ends group a's session (as a promotion does): a comes
    // back on the same link; b and c are not disturbed.
    sites.groups[0].plan.end_session();
    let back = tandem_testkit::poll(Duration::from_secs(30), || {
        (sites.groups[0].link.info().connects >= 2).then_some(())
    });
    assert!(back.is_some(), "group a did not open a new session");
    for (i, g) in sites.groups.iter().enumerate() {
        write_burst(&g.capture, 31 + i as u64, 200);
    }
    sites.wait_caught_up(dir.path());
    assert_eq!(sites.connections.load(Ordering::Relaxed), 1);
    for g in &sites.groups[1..] {
        assert_eq!(
            g.link.info().connects,
            1,
            "another group's session was disturbed"
        );
    }

    // The connection breaks: every group comes back over one new link
    // and resumes where it was.
    for s in sites.live.lock().drain(..) {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    for (i, g) in sites.groups.iter().enumerate() {
        write_burst(&g.capture, 51 + i as u64, 200);
    }
    let all_back = tandem_testkit::poll(Duration::from_secs(30), || {
        sites.groups[1..]
            .iter()
            .all(|g| g.link.info().connects >= 2)
            .then_some(())
    });
    assert!(all_back.is_some(), "the groups did not reconnect");
    sites.wait_caught_up(dir.path());
    assert_eq!(
        sites.connections.load(Ordering::Relaxed),
        2,
        "one new link for every group"
    );
    sites.stop();
}
