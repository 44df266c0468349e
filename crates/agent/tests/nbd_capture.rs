//! The agent in-process, driven by real NBD clients: the captured stream
//! replays to an identical copy under concurrent clients (G1), and a failed
//! fsync latches the volume as clients see it (EIO).
#![allow(clippy::unwrap_used)]
#![allow(clippy::cast_possible_truncation)] // test write lengths of a few MiB

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use tandem_agent::{Agent, VolumeExport};
use tandem_capture::{CaptureVolume, Event, GroupCapture, Op};
use tandem_nbd::Server;
use tandem_testkit::{poll, run_with_timeout, wait_child};
use tandem_volume::fault::{Faults, FaultyFile};
use tandem_volume::RawImage;

fn tool(name: &str) -> String {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .any(|d| d.join(name).is_file());
    assert!(
        found,
        "required tool `{name}` is not installed; run scripts/test"
    );
    name.to_owned()
}

fn free_port() -> u16 {
    tandem_ports::loopback_port().expect("free loopback port")
}

fn config(dir: &Path, queue_memory: &str) -> tandem_config::Config {
    let text = format!(
        r#"
[site]
name = "ny"
data_dir = "{}"
listen = "127.0.0.1:{listen}"
api = "127.0.0.1:{api}"
[tls]
mode = "off"
[[peer]]
name = "ny"
address = "127.0.0.1:{listen}"
[[peer]]
name = "dr"
address = "127.0.0.1:3"
[[group]]
name = "g"
primary = "ny"
replicas = [ {{ site = "dr" }} ]
queue_memory = "{queue_memory}"
max_queue = "{queue_memory}"
volumes = [ {{ name = "a", size = "64MiB" }}, {{ name = "b", size = "32MiB" }} ]
"#,
        dir.join("d").display(),
        listen = free_port(),
        api = free_port(),
    );
    tandem_config::parse(&text, &dir.join("t.toml")).unwrap()
}

/// Applies the "dr" stream to copies until `stop` and idle.
/// Consumes the capture's events for replica "dr" into `copies` until
/// `stop`. With `hold`, it first waits until the queue has overflowed
/// (the capture tracks dirty ranges for "dr"), so that a slow replica is
/// what the test sees however fast this thread would be.
fn replicate(capture: &GroupCapture, copies: &[File], stop: &AtomicBool, hold: bool) -> (u64, u64) {
    if hold {
        let overflowed = poll(Duration::from_secs(120), || {
            (capture.lag("dr").unwrap().resyncing || stop.load(Ordering::Acquire)).then_some(())
        });
        assert!(
            overflowed.is_some(),
            "neither an overflow nor the end of the writes"
        );
    }
    let (mut records, mut resyncs) = (0, 0);
    loop {
        match capture
            .next_event("dr", Duration::from_millis(100))
            .unwrap()
        {
            Some(Event::Record(r)) => {
                let f = &copies[r.volume as usize];
                match &r.op {
                    Op::Write { offset, data, .. } => f.write_all_at(data, *offset).unwrap(),
                    Op::WriteZeroes { offset, len, .. } | Op::Trim { offset, len, .. } => {
                        f.write_all_at(&vec![0; *len as usize], *offset).unwrap()
                    }
                    Op::Flush => {}
                }
                capture.ack("dr", r.seq).unwrap();
                records += 1;
            }
            Some(Event::Resync {
                ranges, resume_at, ..
            }) => {
                for (v, list) in ranges.iter().enumerate() {
                    for &(offset, len) in list {
                        let mut buf = vec![0; len as usize];
                        capture.image(v).read(offset, &mut buf).unwrap();
                        copies[v].write_all_at(&buf, offset).unwrap();
                    }
                }
                capture.resync_done("dr", resume_at).unwrap();
                resyncs += 1;
            }
            None if stop.load(Ordering::Acquire) => return (records, resyncs),
            None => {}
        }
    }
}

fn replay_under_concurrent_clients(queue_memory: &str, hold: bool) -> (u64, u64) {
    let dir = tempfile::Builder::new()
        .prefix("tr")
        .tempdir_in("/tmp")
        .unwrap();
    let config = config(dir.path(), queue_memory);
    let agent = Agent::start(&config).unwrap();
    let capture = agent.capture("g").unwrap();
    let copies: Vec<File> = [("a", 64u64 << 20), ("b", 32 << 20)]
        .iter()
        .map(|(name, size)| {
            let f = File::create(dir.path().join(format!("{name}.copy"))).unwrap();
            f.set_len(*size).unwrap();
            f
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = {
        let (capture, stop) = (Arc::clone(&capture), Arc::clone(&stop));
        thread::spawn(move || replicate(&capture, &copies, &stop, hold))
    };
    let sock = |v: &str| config.site.data_dir.join("nbd").join(format!("{v}.sock"));
    let fio = tool("fio");
    let qemu_io = tool("qemu-io");
    // Three fio clients write overlapping random data to both volumes at
    // once, while qemu-io zeroes and discards in the same area.
    let mut clients = Vec::new();
    for (i, vol) in ["a", "a", "b"].iter().enumerate() {
        let uri = format!("nbd+unix:///{vol}?socket={}", sock(vol).display());
        clients.push(
            Command::new(&fio)
                .args([
                    "--name=w",
                    "--ioengine=nbd",
                    "--rw=randwrite",
                    "--bssplit=4k/50:16k/30:64k/20",
                ])
                .args([
                    "--iodepth=8",
                    "--size=8M",
                    "--io_size=12M",
                    "--randrepeat=0",
                    "--output=/dev/null",
                ])
                .arg(format!("--uri={uri}"))
                .arg(format!("--randseed={}", 17 + i))
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    let uri_a = format!("nbd+unix:///a?socket={}", sock("a").display());
    let mut args = Vec::new();
    for i in 0..40u64 {
        let off = (i * 196_608) % (8 << 20);
        args.push("-c".to_string());
        args.push(if i % 2 == 0 {
            format!("write -z {off} 64k")
        } else {
            format!("discard {off} 32k")
        });
    }
    let out = run_with_timeout(
        Command::new(&qemu_io)
            .args(["-f", "raw"])
            .args(&args)
            .arg(&uri_a),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "qemu-io: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for mut c in clients {
        assert!(
            wait_child(&mut c, Duration::from_secs(120)).success(),
            "fio failed"
        );
    }
    stop.store(true, Ordering::Release);
    let counts = consumer.join().unwrap();
    agent.shutdown().unwrap();
    for vol in ["a", "b"] {
        let primary = std::fs::read(
            config
                .site
                .data_dir
                .join("volumes")
                .join(format!("{vol}.img")),
        )
        .unwrap();
        let copy = std::fs::read(dir.path().join(format!("{vol}.copy"))).unwrap();
        assert!(
            primary == copy,
            "volume {vol}: the replayed copy differs from the primary"
        );
        assert!(
            primary.iter().any(|b| *b != 0),
            "nothing was written to {vol}"
        );
    }
    counts
}

#[test]
fn captured_stream_replays_to_identical_copy_under_concurrent_nbd_clients() {
    let (records, resyncs) = replay_under_concurrent_clients("256MiB", false);
    assert!(records > 1000, "only {records} records");
    assert_eq!(resyncs, 0);
}

#[test]
fn with_a_tiny_queue_dirty_ranges_take_over_and_the_copy_still_converges() {
    let (_, resyncs) = replay_under_concurrent_clients("1MiB", true);
    assert!(resyncs > 0, "the queue never overflowed");
}

#[test]
fn after_a_failed_fsync_clients_get_eio_for_writes_and_flushes() {
    let dir = tempfile::Builder::new()
        .prefix("tl")
        .tempdir_in("/tmp")
        .unwrap();
    let path: PathBuf = dir.path().join("v.img");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    file.set_len(8 << 20).unwrap();
    let faults = Faults::default();
    let image = RawImage::with_file(
        Box::new(FaultyFile::new(file, faults.clone())),
        path,
        8 << 20,
    );
    let capture = GroupCapture::open(
        &dir.path().join("capture"),
        "g",
        vec![CaptureVolume {
            name: "v".into(),
            image: Arc::new(image),
        }],
        &[false],
        &[],
        1 << 20,
    )
    .unwrap();
    let export = Arc::new(VolumeExport::new(Arc::new(capture), 0));
    let server = Server::new().unwrap().scope();
    let sock = dir.path().join("v.sock");
    struct One(Arc<VolumeExport>);
    impl tandem_nbd::Catalog for One {
        fn lookup(&self, _: &str) -> Option<Arc<dyn tandem_nbd::Export>> {
            Some(Arc::clone(&self.0) as Arc<dyn tandem_nbd::Export>)
        }
        fn list(&self) -> Vec<Arc<dyn tandem_nbd::Export>> {
            vec![Arc::clone(&self.0) as Arc<dyn tandem_nbd::Export>]
        }
    }
    server
        .serve_unix(UnixListener::bind(&sock).unwrap(), Arc::new(One(export)))
        .unwrap();
    let uri = format!("nbd+unix:///v?socket={}", sock.display());
    let qemu_io = |cmds: &[&str]| {
        let mut c = Command::new(tool("qemu-io"));
        c.args(["-f", "raw"]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        let out = run_with_timeout(c.arg(&uri), Duration::from_secs(30));
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let ok = qemu_io(&["write -P 0x11 0 64k", "flush", "read -P 0x11 0 64k"]);
    assert!(!ok.contains("failed"), "{ok}");
    faults.set_fail_sync(true);
    // qemu-io is writethrough by default: its writes carry FUA, so the
    // write itself reports the failed fsync.
    let first = qemu_io(&["write -P 0x22 64k 64k"]);
    assert!(
        first.contains("write failed: Input/output error"),
        "{first}"
    );
    // The device "recovers"; the volume must stay latched.
    faults.set_fail_sync(false);
    // (qemu-io stops at the first failing command: one command per run.)
    let write = qemu_io(&["write -P 0x33 128k 4k"]);
    assert!(
        write.contains("write failed: Input/output error"),
        "{write}"
    );
    // QEMU skips a flush with nothing written since the last; nbdsh sends
    // NBD_CMD_FLUSH as asked.
    // (nbdsh is `python3 -m nbd` with Debian's python3-libnbd; another
    // python3 earlier in PATH would not have the module.)
    tool("nbdsh");
    let mut nbdsh = Command::new("/usr/bin/python3");
    let out = run_with_timeout(
        nbdsh.args(["-m", "nbd", "-u", &uri, "-c", "h.flush()"]),
        Duration::from_secs(30),
    );
    let flush = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && flush.contains("Input/output error"),
        "{flush}"
    );
    let read = qemu_io(&["read -P 0x11 0 64k"]);
    assert!(
        read.contains("read 65536/65536"),
        "reads must keep working: {read}"
    );
    assert_eq!(server.shutdown(Duration::from_secs(5)), 0);
}
