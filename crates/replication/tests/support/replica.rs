//! A replica site of the one-volume test group "g" (volume "v"): its
//! journal and image, and the receiver context a primary's session finds
//! it through.

#![allow(dead_code)]

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use parking_lot::Mutex;
use tandem_replication::owners::Owners;
use tandem_replication::receiver::{GroupPlan, Membership, ReceiverContext};
use tandem_replication::replica::{Position, ReplicaGroup, ReplicaOptions, ReplicaVolume};
use tandem_volume::RawImage;

pub struct ReplicaSite {
    pub ctx: Arc<ReceiverContext>,
    pub group: Arc<Mutex<ReplicaGroup>>,
    pub position: Arc<Mutex<Position>>,
    pub image: Arc<RawImage>,
}

/// Site `site` of a group of `sites`, its state (journal, state file,
/// replicated files) under `state`, its image at `image` (created if
/// absent) of `size` bytes.
pub fn replica_site(
    state: &Path,
    site: &str,
    sites: &[&str],
    image: &Path,
    size: u64,
) -> ReplicaSite {
    replica_site_with(state, site, sites, image, size, ReplicaOptions::default())
}

/// [`replica_site`] with `options` (e.g. an undo history).
pub fn replica_site_with(
    state: &Path,
    site: &str,
    sites: &[&str],
    image: &Path,
    size: u64,
    options: ReplicaOptions,
) -> ReplicaSite {
    let image = Arc::new(RawImage::open_or_create(image, size).expect("replica image"));
    let group = Arc::new(Mutex::new(
        ReplicaGroup::open_with(
            state,
            "g",
            vec![ReplicaVolume {
                name: "v".into(),
                image: Arc::clone(&image),
            }],
            options,
        )
        .expect("replica state"),
    ));
    let position = group.lock().published();
    let ctx = Arc::new(ReceiverContext {
        site: site.into(),
        groups: parking_lot::RwLock::new(vec![Arc::new(GroupPlan {
            membership: Membership {
                group: "g".into(),
                // The first site is the configured primary.
                primary: sites[0].to_string(),
                sites: sites.iter().map(|s| s.to_string()).collect(),
                volumes: vec![("v".into(), size)],
            },
            position: Arc::clone(&position),
            group: Arc::clone(&group),
            connected: Arc::new(AtomicBool::new(false)),
            files_dir: state.join("files"),
            files: Vec::new(),
            vm_definition: None,
            session: Mutex::new(None),
            marks: Default::default(),
        })]),
        definer: parking_lot::RwLock::new(None),
        grantor: parking_lot::RwLock::new(None),
        owners: Arc::new(Owners::configured()),
    });
    ReplicaSite {
        ctx,
        group,
        position,
        image,
    }
}

/// A connection to the replica site `ctx` over a socket pair, served by
/// the receiver on a thread of its own (what a primary's `Connect` does
/// over TCP). The primary's end is also kept in `live`, so that a test
/// can cut it.
pub fn pair_connection(
    ctx: &Arc<ReceiverContext>,
    live: &Mutex<Vec<std::os::unix::net::UnixStream>>,
) -> Result<tandem_replication::shipper::Connection, tandem_replication::shipper::ConnectError> {
    use tandem_replication::shipper::{ConnectError, Connection};
    let (a, b) = std::os::unix::net::UnixStream::pair().map_err(ConnectError::Socket)?;
    live.lock()
        .push(a.try_clone().map_err(ConnectError::Socket)?);
    let ctx = Arc::clone(ctx);
    std::thread::spawn(move || {
        if let Ok(r) = b.try_clone() {
            let _ = tandem_replication::receiver::serve(&ctx, r, b, None, None);
        }
    });
    let closer = a.try_clone().map_err(ConnectError::Socket)?;
    Ok(Connection {
        reader: Box::new(a.try_clone().map_err(ConnectError::Socket)?),
        writer: Box::new(a),
        close: Box::new(move || {
            let _ = closer.shutdown(std::net::Shutdown::Both);
        }),
    })
}
