//! `Virsh` against a real libvirt (a private daemon per test,
//! `tandem_vmkit::SiteLibvirt`) and real TCG guests writing fsync()ed,
//! numbered files: a disk moves live from a file onto an NBD export and
//! back without the guest noticing, a failed move leaves the guest on its
//! disk, the Tandem form of a definition boots over NBD, and a domain is
//! destroyed while libvirt is down.
//!
//! Every tool used here is installed by `scripts/test`; a missing one
//! fails these tests.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tandem_hypervisor::virsh::Virsh;
use tandem_hypervisor::{
    xml, Destination, DiskSource, DomainState, Hypervisor, HypervisorError, MoveError, MoveOutcome,
    Progress, ProtectedDisk,
};
use tandem_vmkit::{ext4, Disk, Guest, GuestConfig, GuestImage, QemuNbd, SiteLibvirt, Workload};

/// Boot takes about 6 s under TCG on an idle machine; other tests share
/// the two cores.
const BOOT: Duration = Duration::from_secs(120);
/// A bound for "the guest goes on writing".
const WRITING: Duration = Duration::from_secs(60);
const DISK_SIZE: u64 = 64 << 20;
const VOLUME: &str = "web01-vda";
/// A generous sanity bound on the pause at the pivot (measured: see the
/// printed figures; it is not a timing test).
const PIVOT_BOUND: Duration = Duration::from_secs(10);

#[track_caller]
fn ok<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn site(label: &str) -> SiteLibvirt {
    let t = Instant::now();
    let site = ok(SiteLibvirt::start(label), "site daemon");
    eprintln!("site {label} ready in {:?}", t.elapsed());
    site
}

fn image() -> GuestImage {
    ok(GuestImage::ensure(), "guest image")
}

fn work_dir() -> tempfile::TempDir {
    // Not tmpfs: QEMU opens `cache='none'` files with O_DIRECT.
    tempfile::Builder::new()
        .prefix("tandem-hv-live-")
        .tempdir_in("/var/tmp")
        .expect("a temporary directory")
}

/// An empty (sparse) raw image of `size` bytes.
fn blank_image(path: &Path, size: u64) {
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(size).expect("size image");
}

/// The guest's console shows `MOUNTED` and then `acks` ACK lines.
fn boot_and_write(guest: &Guest, acks: u64) {
    ok(
        guest.wait_for_line("MOUNTED", BOOT, |l| l == "MOUNTED"),
        "boot",
    );
    eprintln!(
        "{}: mounted {:?} after start",
        guest.name(),
        guest.started_at().elapsed()
    );
    ok(guest.wait_for_acks(acks, BOOT), "first ACKs");
}

/// Waits for `more` ACKs beyond those printed so far; returns them all.
fn more_acks(guest: &Guest, more: u64) -> Vec<u64> {
    let now = ok(guest.acks(), "console").len() as u64;
    ok(guest.wait_for_acks(now + more, WRITING), "more ACKs")
}

/// Console lines that show the guest saw an I/O error.
fn io_errors(guest: &Guest) -> Vec<String> {
    ok(guest.console_lines(), "console")
        .into_iter()
        .filter(|l| {
            l.contains("TANDEM-ERROR")
                || l.contains("I/O error")
                || l.contains("EXT4-fs error")
                || l.contains("Buffer I/O")
                || l.contains("blk_update_request")
        })
        .collect()
}

/// The node the guest device `qdev_id` reads from (`query-block`).
fn device_node(virsh: &Virsh, name: &str, qdev_id: &str) -> String {
    let blocks = ok(
        virsh.monitor(name, &json!({"execute": "query-block"})),
        "query-block",
    );
    blocks["return"]
        .as_array()
        .expect("query-block returns a list")
        .iter()
        .find(|d| {
            d["qdev"].as_str().is_some_and(|q| {
                q == qdev_id || q.starts_with(&format!("/machine/peripheral/{qdev_id}/"))
            })
        })
        .and_then(|d| d["inserted"]["node-name"].as_str())
        .unwrap_or_else(|| panic!("no device {qdev_id} with a medium in {blocks}"))
        .to_owned()
}

/// The names of QEMU's named block nodes.
fn node_names(virsh: &Virsh, name: &str) -> Vec<String> {
    let nodes = ok(
        virsh.monitor(
            name,
            &json!({"execute": "query-named-block-nodes", "arguments": {"flat": true}}),
        ),
        "query-named-block-nodes",
    );
    nodes["return"]
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|n| n["node-name"].as_str().map(str::to_owned))
        .collect()
}

/// The block jobs QEMU has.
fn jobs(virsh: &Virsh, name: &str) -> Vec<Value> {
    let jobs = ok(
        virsh.monitor(name, &json!({"execute": "query-block-jobs"})),
        "query-block-jobs",
    );
    jobs["return"].as_array().expect("a list").clone()
}

fn file_digest(path: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let bytes = std::fs::read(path).expect("read image");
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Records when each ACK line appears on a console, so a test can see how
/// long the guest's writes stalled around a pivot.
struct AckClock {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Instant, usize)>>,
}

impl AckClock {
    fn start(console: &Path) -> AckClock {
        let stop = Arc::new(AtomicBool::new(false));
        let console = console.to_path_buf();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut last = usize::MAX;
            // Bounded: the test stops it, or it gives up after 10 minutes.
            let deadline = Instant::now() + Duration::from_secs(600);
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                let text = std::fs::read(&console).unwrap_or_default();
                let n = String::from_utf8_lossy(&text)
                    .lines()
                    .filter(|l| tandem_vmkit::parse_ack(l).is_some())
                    .count();
                if n != last {
                    seen.push((Instant::now(), n));
                    last = n;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            seen
        });
        AckClock { stop, thread }
    }

    /// The ACKs printed between `from` and `to`, and the longest time the
    /// console went without a new ACK in that span.
    fn stop(self, from: Instant, to: Instant) -> (usize, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        let seen = self.thread.join().expect("the ACK clock");
        let before = seen
            .iter()
            .filter(|(t, _)| *t <= from)
            .map(|(_, n)| *n)
            .next_back()
            .unwrap_or(0);
        let after = seen
            .iter()
            .filter(|(t, _)| *t <= to)
            .map(|(_, n)| *n)
            .next_back()
            .unwrap_or(0);
        let mut times: Vec<Instant> = vec![from];
        times.extend(
            seen.iter()
                .map(|(t, _)| *t)
                .filter(|t| *t > from && *t < to),
        );
        times.push(to);
        let gap = times
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default();
        (after.saturating_sub(before), gap)
    }
}

/// A live move with its progress reports, timed.
fn move_disk(
    virsh: &Virsh,
    name: &str,
    to: &Destination,
) -> (Result<MoveOutcome, HypervisorError>, Vec<Progress>) {
    let mut reports = Vec::new();
    let result = virsh.move_disk(name, "vda", to, &mut |p| reports.push(p));
    (result, reports)
}

/// Checks that a move's progress was reported and reached `ready`, with
/// at least the whole disk copied (the guest's writes during the copy
/// add to both counts; at `ready` some may still be in flight).
fn assert_progress(reports: &[Progress], size: u64) {
    let last = reports.last().expect("progress was reported");
    assert!(last.ready, "the last report is not ready: {reports:?}");
    assert!(last.copied >= size, "{reports:?}");
    assert!(last.copied <= last.total, "{reports:?}");
    assert!(
        reports.windows(2).all(|w| w[0].copied <= w[1].copied),
        "copied went backwards: {reports:?}"
    );
}

/// After the guest writing on `image` was killed: the journal replays,
/// `e2fsck -n -f` is clean, and every ACKed file is there and intact.
/// Returns the image's numbered files.
fn assert_acked_files_intact(image: &Path, acks: &[u64]) -> Vec<u64> {
    let expected: Vec<u64> = (1..=acks.len() as u64).collect();
    assert_eq!(acks, &expected[..], "ACKs are 1, 2, 3, ... in order");
    ok(ext4::replay_journal(image), "journal replay");
    ok(ext4::fsck(image), "e2fsck -n -f");
    let files = ok(ext4::verify_numbered_files(image), "reading the files");
    for n in acks {
        match files.get(n) {
            Some(Ok(())) => {}
            Some(Err(e)) => panic!("ACKed file f{n} is damaged in {}: {e}", image.display()),
            None => panic!(
                "ACKed file f{n} is missing from {} (files: {:?})",
                image.display(),
                files.keys()
            ),
        }
    }
    files.into_keys().collect()
}

/// Whether `pid` is a QEMU process that is not a zombie.
fn qemu_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
        return false;
    };
    let comm = &stat[open + 1..close];
    let state = stat[close + 1..].split_whitespace().next().unwrap_or("");
    comm.starts_with("qemu") && state != "Z"
}

#[test]
fn a_writing_guest_moves_from_its_file_onto_nbd_without_noticing_and_a_failed_move_changes_nothing()
{
    let image = image();
    let site = site("move");
    let virsh = Virsh::new(site.uri());
    let dir = work_dir();
    let data = dir.path().join("data.img");
    ok(ext4::make_ext4(&data, DISK_SIZE), "mkfs");
    let console = dir.path().join("web01.console");
    let config = GuestConfig::new(
        "move",
        Disk::File(data.clone()),
        Workload::Write,
        dir.path(),
    )
    .with_name("web01")
    .with_console(&console);
    let guest = ok(Guest::start(site.libvirt(), &image, &config), "start web01");
    boot_and_write(&guest, 3);
    let libvirt_node = device_node(&virsh, "web01", "virtio-disk0");
    assert!(libvirt_node.starts_with("libvirt-"), "{libvirt_node}");

    // Nobody serves the socket: the move fails, says why, and the guest
    // goes on with its own disk.
    let nobody = dir.path().join("nobody.sock");
    let (result, _) = move_disk(
        &virsh,
        "web01",
        &Destination::Nbd {
            volume: VOLUME.into(),
            socket: nobody.to_string_lossy().into_owned(),
            reconnect_delay_secs: 30,
        },
    );
    let error = result.expect_err("a move to a socket nobody serves");
    eprintln!("move to an unserved socket: {error}");
    let HypervisorError::Move(failure) = &error else {
        panic!("not a Move error: {error:?}");
    };
    assert_eq!(failure.target, "vda");
    assert_eq!(failure.guest_on.as_deref(), Some(libvirt_node.as_str()));
    assert!(failure.cleanup.is_none(), "{error}");
    assert!(
        error.to_string().contains("nobody.sock"),
        "the error does not name the socket: {error}"
    );
    more_acks(&guest, 3);

    // A served export of the wrong size: refused before any copy, and the
    // node added for it is gone again.
    let small = dir.path().join("small.img");
    blank_image(&small, DISK_SIZE / 2);
    let small_socket = dir.path().join("small.sock");
    let small_server = ok(QemuNbd::serve(&small, &small_socket, VOLUME), "qemu-nbd");
    let (result, reports) = move_disk(
        &virsh,
        "web01",
        &Destination::Nbd {
            volume: VOLUME.into(),
            socket: small_socket.to_string_lossy().into_owned(),
            reconnect_delay_secs: 30,
        },
    );
    let error = result.expect_err("a move to an export of another size");
    eprintln!("move to a smaller export: {error}");
    assert!(
        matches!(
            error.move_error(),
            Some(MoveError::SizeMismatch { disk, destination })
                if *disk == DISK_SIZE && *destination == DISK_SIZE / 2
        ),
        "{error:?}"
    );
    assert!(reports.is_empty(), "nothing was copied: {reports:?}");
    assert_eq!(device_node(&virsh, "web01", "virtio-disk0"), libvirt_node);
    let nodes = node_names(&virsh, "web01");
    assert!(
        !nodes.iter().any(|n| n.starts_with("tandem-")),
        "left behind: {nodes:?}"
    );
    assert!(jobs(&virsh, "web01").is_empty());
    ok(small_server.stop(), "stop qemu-nbd");
    more_acks(&guest, 3);

    // The export dies during the move (the agent crashed): the move fails
    // once QEMU gives up reconnecting (reconnect-delay, 2 s here), and the
    // guest goes on with its own disk, without an I/O error.
    let dying = dir.path().join("dying.img");
    blank_image(&dying, DISK_SIZE);
    let dying_socket = dir.path().join("dying.sock");
    let mut dying_server = Some(ok(
        QemuNbd::serve(&dying, &dying_socket, VOLUME),
        "qemu-nbd",
    ));
    let mut reports = Vec::new();
    let clock = AckClock::start(&console);
    more_acks(&guest, 1);
    let started = Instant::now();
    let result = virsh.move_disk(
        "web01",
        "vda",
        &Destination::Nbd {
            volume: VOLUME.into(),
            socket: dying_socket.to_string_lossy().into_owned(),
            reconnect_delay_secs: 2,
        },
        &mut |p| {
            reports.push(p);
            if let Some(server) = dying_server.take() {
                ok(server.stop(), "kill qemu-nbd");
            }
        },
    );
    let error = result.expect_err("a move whose export died");
    let failed = Instant::now();
    more_acks(&guest, 1);
    let (_, stall) = clock.stop(started, failed);
    eprintln!(
        "move whose export died at the first progress report {:?}: failed after {:?} \
         (longest time without an ACK {stall:?}): {error}",
        reports.first(),
        failed - started
    );
    let HypervisorError::Move(failure) = &error else {
        panic!("not a Move error: {error:?}");
    };
    assert_eq!(failure.guest_on.as_deref(), Some(libvirt_node.as_str()));
    assert!(failure.cleanup.is_none(), "{error}");
    assert_eq!(device_node(&virsh, "web01", "virtio-disk0"), libvirt_node);
    let nodes = node_names(&virsh, "web01");
    assert!(
        !nodes.iter().any(|n| n.starts_with("tandem-")),
        "left behind: {nodes:?}"
    );
    assert!(jobs(&virsh, "web01").is_empty());
    more_acks(&guest, 3);
    assert!(io_errors(&guest).is_empty(), "{:?}", io_errors(&guest));

    // The real move, onto an export of the same size, while the guest
    // writes.
    let volume = dir.path().join("volume.img");
    blank_image(&volume, DISK_SIZE);
    let socket = dir.path().join("volume.sock");
    let server = ok(QemuNbd::serve(&volume, &socket, VOLUME), "qemu-nbd");
    let clock = AckClock::start(&console);
    more_acks(&guest, 1);
    let started = Instant::now();
    let (result, reports) = move_disk(
        &virsh,
        "web01",
        &Destination::Nbd {
            volume: VOLUME.into(),
            socket: socket.to_string_lossy().into_owned(),
            reconnect_delay_secs: 30,
        },
    );
    let outcome = ok(result, "move onto NBD");
    let done = Instant::now();
    more_acks(&guest, 1);
    let (during, stall) = clock.stop(started, done);
    eprintln!(
        "moved onto NBD in {:?} (call {:?}); pivot pause {:?}; {} progress reports; \
         {during} ACKs during the move; longest time without an ACK {stall:?}",
        outcome.elapsed,
        done - started,
        outcome.pivot,
        reports.len()
    );
    assert_eq!(outcome.node, "tandem-vda");
    assert_eq!(outcome.previous, libvirt_node);
    assert_eq!(outcome.size, DISK_SIZE);
    assert!(outcome.pivot < PIVOT_BOUND, "{:?}", outcome.pivot);
    assert_progress(&reports, DISK_SIZE);
    assert_eq!(device_node(&virsh, "web01", "virtio-disk0"), "tandem-vda");
    assert!(
        jobs(&virsh, "web01").is_empty(),
        "the job was not dismissed"
    );
    assert_eq!(ok(guest.state(), "state"), "running");

    // The guest writes on, to the export and no longer to its old file.
    more_acks(&guest, 3);
    let old = file_digest(&data);
    more_acks(&guest, 10);
    assert_eq!(
        file_digest(&data),
        old,
        "the old file still receives writes"
    );
    assert!(io_errors(&guest).is_empty(), "{:?}", io_errors(&guest));

    // The node added live has the reconnect-delay: the export gone for 3 s
    // (an agent restart) holds the guest's writes instead of failing them.
    ok(server.stop(), "kill qemu-nbd");
    let at_kill = ok(guest.acks(), "console").len();
    std::thread::sleep(Duration::from_secs(3)); // the outage, not a wait
    let during = ok(guest.acks(), "console").len();
    let server = ok(QemuNbd::serve(&volume, &socket, VOLUME), "restart qemu-nbd");
    eprintln!("export down 3 s: ACKs {at_kill} at the kill, {during} at the restart");
    more_acks(&guest, 10);
    assert!(io_errors(&guest).is_empty(), "{:?}", io_errors(&guest));

    // Back onto a file and onto the export again, while the guest writes:
    // each move leaves no node of the one before.
    let back = dir.path().join("back.img");
    let (result, _) = move_disk(
        &virsh,
        "web01",
        &Destination::File {
            path: back.to_string_lossy().into_owned(),
        },
    );
    let outcome = ok(result, "move back onto a file");
    eprintln!("moved back onto a file: pivot pause {:?}", outcome.pivot);
    assert_eq!(
        (outcome.previous.as_str(), outcome.node.as_str()),
        ("tandem-vda", "tandem-vda-local")
    );
    more_acks(&guest, 3);
    let (result, _) = move_disk(
        &virsh,
        "web01",
        &Destination::Nbd {
            volume: VOLUME.into(),
            socket: socket.to_string_lossy().into_owned(),
            reconnect_delay_secs: 30,
        },
    );
    let outcome = ok(result, "move onto NBD again");
    eprintln!("moved onto NBD again: pivot pause {:?}", outcome.pivot);
    assert_eq!(
        (outcome.previous.as_str(), outcome.node.as_str()),
        ("tandem-vda-local", "tandem-vda")
    );
    let nodes = node_names(&virsh, "web01");
    assert!(
        !nodes
            .iter()
            .any(|n| n.starts_with("tandem-vda-l") || n == "tandem-vda-file"),
        "the file node was not deleted: {nodes:?}"
    );
    more_acks(&guest, 3);
    assert!(io_errors(&guest).is_empty(), "{:?}", io_errors(&guest));

    // Everything the guest ACKed, before and after the moves, is in the
    // volume.
    ok(guest.destroy(), "destroy");
    let acks = ok(guest.acks(), "console");
    ok(server.stop(), "stop qemu-nbd");
    let files = assert_acked_files_intact(&volume, &acks);
    eprintln!("{} files in the volume, {} ACKed", files.len(), acks.len());
    ok(guest.remove(), "undefine");
}

#[test]
fn the_tandem_form_boots_over_nbd_moves_back_to_a_file_and_dies_without_libvirt() {
    let image = image();
    let site = site("form");
    let virsh = Virsh::new(site.uri());
    let dir = work_dir();
    let volume = dir.path().join("volume.img");
    ok(ext4::make_ext4(&volume, DISK_SIZE), "mkfs");
    let socket = dir.path().join("volume.sock");
    let server = ok(QemuNbd::serve(&volume, &socket, VOLUME), "qemu-nbd");
    let console = dir.path().join("web01.console");

    // The domain as its owner defined it, on a local file; libvirt's own
    // persistent definition is what Tandem rewrites.
    let original = dir.path().join("original.img");
    let config = GuestConfig::new(
        "form",
        Disk::File(original.clone()),
        Workload::Write,
        dir.path(),
    )
    .with_name("web01")
    .with_console(&console);
    let plain = tandem_vmkit::domain_xml("web01", &image, &config, &console);
    assert_eq!(ok(virsh.define(&plain), "define"), "web01");
    let defined = ok(virsh.xml("web01", true), "dumpxml --inactive");
    let protected = ok(
        xml::protect(
            &defined,
            &[ProtectedDisk {
                target: "vda".into(),
                volume: VOLUME.into(),
                socket: socket.to_string_lossy().into_owned(),
            }],
            30,
        ),
        "protect",
    );
    ok(virsh.define(&protected), "define the Tandem form");
    let stored = ok(virsh.xml("web01", true), "dumpxml --inactive");
    assert!(
        stored.contains("reconnect-delay"),
        "libvirt dropped the command line: {stored}"
    );
    ok(virsh.start("web01"), "start");
    let guest = Guest::attach(site.libvirt(), "web01", &console);
    boot_and_write(&guest, 3);

    // libvirt does not know the disk; Tandem reads it from the command
    // line, and QEMU knows its size.
    let running = ok(virsh.xml("web01", false), "dumpxml");
    let read = ok(xml::read(&running), "read the running XML");
    assert_eq!(read.disks.len(), 1, "{:?}", read.disks);
    let disk = &read.disks[0];
    assert!(disk.tandem);
    assert_eq!(disk.target, "vda");
    assert_eq!(
        disk.source,
        DiskSource::Nbd {
            export: VOLUME.into(),
            socket: socket.to_string_lossy().into_owned()
        }
    );
    let domains = ok(virsh.domains(), "domains");
    let web01 = domains
        .iter()
        .find(|d| d.name == "web01")
        .unwrap_or_else(|| panic!("web01 not listed: {domains:?}"));
    assert_eq!(web01.state, DomainState::Running);
    assert_eq!(web01.disks.len(), 1, "{web01:?}");
    assert!(web01.disks[0].disk.tandem);
    assert_eq!(web01.disks[0].size, Some(DISK_SIZE));
    assert_eq!(device_node(&virsh, "web01", "tandem-vda-dev"), "tandem-vda");

    // Unprotecting: the disk moves live off the export onto a local file.
    let back = dir.path().join("back.img");
    let clock = AckClock::start(&console);
    more_acks(&guest, 1);
    let acked_before = ok(guest.acks(), "console");
    let started = Instant::now();
    let (result, reports) = move_disk(
        &virsh,
        "web01",
        &Destination::File {
            path: back.to_string_lossy().into_owned(),
        },
    );
    let outcome = ok(result, "move onto a file");
    let done = Instant::now();
    more_acks(&guest, 1);
    let (during, stall) = clock.stop(started, done);
    eprintln!(
        "moved onto a file in {:?}; pivot pause {:?}; {during} ACKs during the move; \
         longest time without an ACK {stall:?}",
        outcome.elapsed, outcome.pivot
    );
    assert_eq!(outcome.node, "tandem-vda-local");
    assert_eq!(outcome.previous, "tandem-vda");
    assert_eq!(outcome.size, DISK_SIZE);
    assert!(outcome.pivot < PIVOT_BOUND, "{:?}", outcome.pivot);
    assert_progress(&reports, DISK_SIZE);
    assert_eq!(
        std::fs::metadata(&back).expect("the file was made").len(),
        DISK_SIZE
    );
    assert_eq!(
        device_node(&virsh, "web01", "tandem-vda-dev"),
        "tandem-vda-local"
    );
    let nodes = node_names(&virsh, "web01");
    assert!(
        !nodes
            .iter()
            .any(|n| n == "tandem-vda" || n == "tandem-vda-nbd"),
        "the NBD node was not deleted: {nodes:?}"
    );

    // The guest no longer needs the export: it writes on with the NBD
    // server gone.
    ok(server.stop(), "stop qemu-nbd");
    let frozen = file_digest(&volume);
    more_acks(&guest, 10);
    assert_eq!(file_digest(&volume), frozen);
    assert!(io_errors(&guest).is_empty(), "{:?}", io_errors(&guest));

    // The persistent definition goes back to a plain file disk.
    let unprotected = ok(
        xml::unprotect(
            &ok(virsh.xml("web01", true), "dumpxml --inactive"),
            &[("vda".into(), back.to_string_lossy().into_owned())],
        ),
        "unprotect",
    );
    ok(virsh.define(&unprotected), "define the plain form");
    let read = ok(
        xml::read(&ok(virsh.xml("web01", true), "dumpxml --inactive")),
        "read",
    );
    assert_eq!(read.disks.len(), 1, "{:?}", read.disks);
    assert!(!read.disks[0].tandem);
    assert_eq!(
        read.disks[0].source,
        DiskSource::File {
            path: back.to_string_lossy().into_owned()
        }
    );

    // libvirt is down: destroy kills the QEMU itself (its pid file).
    let pid = site.qemu_pid("web01").expect("web01's QEMU");
    ok(site.stop_daemon(), "stop libvirtd");
    let t = Instant::now();
    ok(virsh.destroy("web01"), "destroy without libvirt");
    eprintln!("destroyed without libvirt in {:?}", t.elapsed());
    assert!(!qemu_alive(pid), "QEMU {pid} survived destroy");
    let acks = ok(guest.acks(), "console");
    ok(site.restart_daemon(), "restart libvirtd");
    assert_eq!(ok(virsh.state("web01"), "state"), DomainState::ShutOff);

    // The volume holds what the guest wrote until the move; the file holds
    // all of it, the same bytes.
    let in_volume = assert_acked_files_intact(&volume, &acked_before);
    let in_file = assert_acked_files_intact(&back, &acks);
    let names: Vec<String> = in_volume.iter().map(|n| format!("/f{n}")).collect();
    let a = ok(ext4::read_files(&volume, &names), "read the volume");
    let b = ok(ext4::read_files(&back, &names), "read the file");
    // Only files complete in the volume are compared (the one being
    // written at the pivot may be torn there).
    let complete: Vec<&String> = names
        .iter()
        .zip(&in_volume)
        .filter(|(name, n)| ext4::verify_numbered_file(**n, &a[*name]).is_ok())
        .map(|(name, _)| name)
        .collect();
    for name in &complete {
        assert_eq!(a[*name], b[*name], "{name} differs between volume and file");
    }
    eprintln!(
        "{} files in the volume, {} in the file, {} ACKed",
        in_volume.len(),
        in_file.len(),
        acks.len()
    );

    // The plain definition boots from the file.
    let _ = std::fs::remove_file(&console);
    ok(virsh.start("web01"), "start the plain form");
    boot_and_write(&guest, 2);
    ok(virsh.destroy("web01"), "destroy");
    ok(virsh.undefine("web01"), "undefine");
    assert!(ok(virsh.domains(), "domains").is_empty());
}
