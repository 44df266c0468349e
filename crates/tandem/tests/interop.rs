//! Interoperability: real NBD clients written by others (qemu-io, qemu-img,
//! nbdinfo, nbdcopy, fio) against a real `tandem agent`, checking what users
//! rely on — the data is exactly what was written, the advertised flags are
//! right, the image on disk is a plain raw file, and QEMU survives an agent
//! restart (SPEC §3 G1, G2, G7; §4.2; docs/NBD.md).
#![allow(clippy::cast_possible_truncation)] // test images of at most 64 MiB; qemu-img map kinds are small

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use common::{pattern, run_ok, run_with_timeout, tool, vol, wait_child, wait_until, Site};

const MIB: u64 = 1 << 20;
/// Bound for a quick client command (one connection, a few MiB).
const QUICK: Duration = Duration::from_secs(60);
/// Bound for a bulk transfer (hundreds of MiB).
const BULK: Duration = Duration::from_secs(150);

// ---------------------------------------------------------------------------
// Helpers.

/// Runs `qemu-io` with one `-c` per command against `target` (extra
/// arguments such as `-f raw URI` or `--image-opts ...`); asserts exit 0 and
/// that no command failed. Returns stdout.
fn qemu_io(target: &[&str], cmds: &[&str]) -> String {
    let mut cmd = Command::new(tool("qemu-io"));
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    cmd.args(target);
    let description = format!("{cmd:?}");
    let out = run_with_timeout(&mut cmd, QUICK);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success() && !stdout.contains("failed") && !stderr.contains("failed"),
        "{description} failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    stdout
}

/// Asserts that `output` has `line` as one of its lines.
fn assert_has_line(output: &str, line: &str) {
    assert!(
        output.lines().any(|l| l.trim() == line),
        "expected the line {line:?} in:\n{output}"
    );
}

/// Writes `len` bytes of deterministic pseudo-random data (xorshift64,
/// 8 bytes per step, so hundreds of MiB take well under a second).
fn write_random_file(path: &Path, seed: u64, len: u64) {
    let mut out = BufWriter::new(File::create(path).expect("create random file"));
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut buf = vec![0u8; MIB as usize];
    let mut left = len;
    while left > 0 {
        for word in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(MIB) as usize;
        out.write_all(&buf[..n]).expect("write random file");
        left -= n as u64;
    }
    out.flush().expect("flush random file");
}

/// Streams two files; `None` when byte-identical, else where they differ.
fn first_difference(a: &Path, b: &Path) -> Option<String> {
    let len_a = std::fs::metadata(a).expect("stat a").len();
    let len_b = std::fs::metadata(b).expect("stat b").len();
    if len_a != len_b {
        return Some(format!(
            "{} is {len_a} bytes but {} is {len_b} bytes",
            a.display(),
            b.display()
        ));
    }
    let mut fa = BufReader::with_capacity(MIB as usize, File::open(a).expect("open a"));
    let mut fb = BufReader::with_capacity(MIB as usize, File::open(b).expect("open b"));
    let (mut ba, mut bb) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    let mut offset = 0u64;
    while offset < len_a {
        let n = (len_a - offset).min(MIB) as usize;
        fa.read_exact(&mut ba[..n]).expect("read a");
        fb.read_exact(&mut bb[..n]).expect("read b");
        if let Some(i) = (0..n).find(|&i| ba[i] != bb[i]) {
            return Some(format!(
                "{} and {} differ first at byte {} ({:#04x} vs {:#04x})",
                a.display(),
                b.display(),
                offset + i as u64,
                ba[i],
                bb[i]
            ));
        }
        offset += n as u64;
    }
    None
}

fn assert_files_identical(a: &Path, b: &Path) {
    if let Some(diff) = first_difference(a, b) {
        panic!("{diff}");
    }
}

/// Asserts that `image` (the agent's raw image) has exactly `expected` as
/// its content, naming the first differing byte.
fn assert_image_is(image: &Path, expected: &[u8]) {
    let actual = std::fs::read(image).expect("read raw image");
    assert_eq!(
        actual.len(),
        expected.len(),
        "raw image {} has the wrong length",
        image.display()
    );
    if let Some(i) = (0..actual.len()).find(|&i| actual[i] != expected[i]) {
        panic!(
            "raw image {} differs first at byte {i}: {:#04x}, expected {:#04x}",
            image.display(),
            actual[i],
            expected[i]
        );
    }
}

/// `nbdinfo --map` output as (offset, length, type), adjacent extents of
/// one type merged (a file system may split extents as it likes).
fn parse_map(output: &str) -> Vec<(u64, u64, u32)> {
    let mut extents: Vec<(u64, u64, u32)> = Vec::new();
    for line in output.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert!(fields.len() >= 3, "unexpected nbdinfo --map line {line:?}");
        let num = |s: &str| -> u64 {
            s.parse()
                .unwrap_or_else(|e| panic!("bad number {s:?} in {line:?}: {e}"))
        };
        let (offset, length, kind) = (num(fields[0]), num(fields[1]), num(fields[2]) as u32);
        match extents.last_mut() {
            Some(last) if last.2 == kind && last.0 + last.1 == offset => last.1 += length,
            _ => extents.push((offset, length, kind)),
        }
    }
    extents
}

fn free_tcp_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// `--image-opts` text for the Unix-socket export of `volume`.
fn image_opts(site: &Site, volume: &str, extra: &str) -> String {
    format!(
        "driver=nbd,server.type=unix,server.path={},export={volume}{extra}",
        site.socket(volume).display()
    )
}

/// One fio job line in terse (v3) output: (jobname, error, read KiB, write KiB).
fn fio_terse(output: &str) -> Vec<(String, i64, u64, u64)> {
    output
        .lines()
        .filter(|l| l.starts_with("3;"))
        .map(|l| {
            let f: Vec<&str> = l.split(';').collect();
            assert!(f.len() > 47, "short fio terse line {l:?}");
            let num = |s: &str| -> i64 {
                s.parse()
                    .unwrap_or_else(|e| panic!("bad fio field {s:?} in {l:?}: {e}"))
            };
            // v3: 3 jobname, 5 error, 6 read_kb, 47 write_kb (1-based).
            (
                f[2].to_string(),
                num(f[4]),
                num(f[5]) as u64,
                num(f[46]) as u64,
            )
        })
        .collect()
}

/// Runs fio with `args` (terse output to a file in `dir`); asserts exit 0,
/// `jobs` job lines, none with an error, and each job moved `read_kib` /
/// `write_kib`.
fn run_fio(dir: &Path, tag: &str, args: &[String], jobs: usize, read_kib: u64, write_kib: u64) {
    let out_path = dir.join(format!("fio-{tag}.terse"));
    let mut cmd = Command::new(tool("fio"));
    // fio leaves verify state files in its working directory.
    cmd.current_dir(dir)
        .args(args)
        .arg("--output-format=terse")
        .arg(format!("--output={}", out_path.display()));
    let description = format!("{cmd:?}");
    let out = run_with_timeout(&mut cmd, BULK);
    let terse = std::fs::read_to_string(&out_path).unwrap_or_default();
    let context = format!(
        "{description} ({}):\nterse: {terse}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "fio failed: {context}");
    let lines = fio_terse(&terse);
    assert_eq!(lines.len(), jobs, "fio job count: {context}");
    for (name, error, read, write) in lines {
        assert_eq!(error, 0, "fio job {name} reported an error: {context}");
        assert_eq!(
            read, read_kib,
            "fio job {name} read KiB (verification): {context}"
        );
        assert_eq!(write, write_kib, "fio job {name} written KiB: {context}");
    }
}

/// An interactive `qemu-io` (stdout and stderr on one pipe, in order), for
/// tests that need one client connection to live across agent restarts.
///
/// One command at a time: qemu-io may read (and run) the next stdin line
/// while a request is in flight, so pipelining would mix up the outputs.
struct QemuIo {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    transcript: Vec<String>,
}

impl QemuIo {
    fn spawn(image_opts: &str) -> QemuIo {
        let qemu_io = tool("qemu-io");
        let mut child = Command::new(tool("sh"))
            .arg("-c")
            .arg("exec \"$0\" \"$@\" 2>&1")
            .arg(&qemu_io)
            .args(["--image-opts", image_opts])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn qemu-io");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("qemu-io stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // The prompt has no newline: it prefixes the next output line.
                let line = line.replace("qemu-io> ", "").trim().to_string();
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        QemuIo {
            child,
            stdin,
            lines,
            transcript: Vec::new(),
        }
    }

    fn fail(&self, what: &str) -> ! {
        panic!(
            "qemu-io: {what}; transcript:\n{}",
            self.transcript.join("\n")
        )
    }

    /// Sends `command` without waiting for its result.
    fn send(&mut self, command: &str) {
        self.transcript.push(format!("> {command}"));
        let stdin = self.stdin.as_mut().expect("qemu-io stdin open");
        if let Err(e) = writeln!(stdin, "{command}").and_then(|_| stdin.flush()) {
            self.fail(&format!("stdin closed ({e})"));
        }
    }

    /// Waits (bounded) for the result line `expected` of the command just
    /// sent and the statistics line qemu-io prints after it. Any line
    /// saying a request failed (an I/O error, "Pattern verification
    /// failed") fails the test.
    fn wait_result(&mut self, command: &str, expected: &str) {
        let deadline = Instant::now() + QUICK;
        let mut result_seen = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.lines.recv_timeout(left) {
                Ok(line) => line,
                Err(RecvTimeoutError::Timeout) => {
                    self.fail(&format!("no answer to {command:?} within {QUICK:?}"))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.fail(&format!("exited during {command:?}"))
                }
            };
            self.transcript.push(line.clone());
            if line.contains("failed") || line.contains("rror") {
                self.fail(&format!("{command:?} failed"));
            }
            if result_seen {
                if !line.contains(" ops; ") {
                    self.fail(&format!("unexpected line after the result of {command:?}"));
                }
                return;
            }
            result_seen = line == expected;
        }
    }

    /// Sends `command` and waits for its result (see `wait_result`).
    fn expect(&mut self, command: &str, expected: &str) {
        self.send(command);
        self.wait_result(command, expected);
    }

    /// `quit`, then asserts qemu-io exits 0 within a bounded time.
    fn quit(mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "quit");
        }
        let status = wait_child(&mut self.child, QUICK);
        if !status.success() {
            self.fail(&format!("exited with {status}"));
        }
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        // Only after a failed assertion: quit() has already reaped it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// 1. qemu-io.

#[test]
fn qemu_io_writes_zeroes_discards_and_aio_read_back_exactly_and_land_in_raw_image() {
    let mut site = Site::new(&[vol("v0", "64MiB")]);
    site.start();
    let uri = site.uri("v0");
    let mut model = vec![0u8; (64 * MIB) as usize];
    let fill = |m: &mut Vec<u8>, off: u64, len: u64, byte: u8| {
        m[off as usize..(off + len) as usize].fill(byte);
    };
    let unaligned = 13 * MIB + 123;

    let out = qemu_io(
        &["-f", "raw", &uri],
        &[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            // FUA write.
            "write -f -P 0xcd 1M 1M",
            // Data that is then zeroed (no unmap), discarded, and zeroed
            // with unmap allowed (hole punch): all must read back as zeroes.
            "write -P 0xee 2M 3M",
            "write -z 2M 1M",
            "discard 3M 1M",
            "write -z -u 4M 1M",
            // Several writes in flight at once.
            "aio_write -P 0x11 8M 256k",
            "aio_write -P 0x22 9M 256k",
            "aio_write -P 0x33 10M 256k",
            "aio_write -P 0x44 11M 256k",
            "aio_write -f -P 0x55 12M 64k",
            "aio_flush",
            // An unaligned, sub-sector write (minimum block size is 1).
            &format!("write -P 0x5a {unaligned} 3000"),
            "flush",
            "read -P 0xab 0 1M",
            "read -P 0xcd 1M 1M",
            "read -P 0 2M 3M",
            "read -P 0x11 8M 256k",
            "read -P 0x22 9M 256k",
            "read -P 0x33 10M 256k",
            "read -P 0x44 11M 256k",
            "read -P 0x55 12M 64k",
            "read -P 0 13M 123",
            &format!("read -P 0x5a {unaligned} 3000"),
            // A read bigger than the 32 MiB request limit (qemu splits it).
            "read -P 0 14M 50M",
        ],
    );
    fill(&mut model, 0, MIB, 0xab);
    fill(&mut model, MIB, MIB, 0xcd);
    fill(&mut model, 8 * MIB, 256 << 10, 0x11);
    fill(&mut model, 9 * MIB, 256 << 10, 0x22);
    fill(&mut model, 10 * MIB, 256 << 10, 0x33);
    fill(&mut model, 11 * MIB, 256 << 10, 0x44);
    fill(&mut model, 12 * MIB, 64 << 10, 0x55);
    fill(&mut model, unaligned, 3000, 0x5a);

    for line in [
        "wrote 1048576/1048576 bytes at offset 0",
        "wrote 1048576/1048576 bytes at offset 1048576",
        "wrote 3145728/3145728 bytes at offset 2097152",
        "wrote 1048576/1048576 bytes at offset 2097152",
        "discard 1048576/1048576 bytes at offset 3145728",
        "wrote 1048576/1048576 bytes at offset 4194304",
        "wrote 262144/262144 bytes at offset 8388608",
        "wrote 262144/262144 bytes at offset 9437184",
        "wrote 262144/262144 bytes at offset 10485760",
        "wrote 262144/262144 bytes at offset 11534336",
        "wrote 65536/65536 bytes at offset 12582912",
        &format!("wrote 3000/3000 bytes at offset {unaligned}"),
        "read 3145728/3145728 bytes at offset 2097152",
        &format!("read 3000/3000 bytes at offset {unaligned}"),
        "read 52428800/52428800 bytes at offset 14680064",
    ] {
        assert_has_line(&out, line);
    }
    assert!(!out.contains("Pattern verification failed"), "{out}");

    let status = site.stop();
    assert!(status.success(), "agent stop: {status}\n{}", site.log());
    assert_image_is(&site.image("v0"), &model);
}

// ---------------------------------------------------------------------------
// 2. qemu-img.

#[test]
fn qemu_img_convert_into_and_out_of_export_is_identical_and_info_reports_size() {
    let size = 128 * MIB;
    let mut site = Site::new(&[vol("v0", "128MiB")]);
    site.start();
    let uri = site.uri("v0");
    let qemu_img = tool("qemu-img");

    // A sparse source: data in three places, holes elsewhere.
    let src = site.dir.path().join("src.raw");
    {
        let f = File::create(&src).expect("create source");
        f.set_len(size).expect("size source");
        f.write_all_at(&pattern(1, (8 * MIB) as usize), 0)
            .expect("write source");
        f.write_all_at(&pattern(2, MIB as usize), 40 * MIB)
            .expect("write source");
        f.write_all_at(&pattern(3, MIB as usize), size - MIB)
            .expect("write source");
    }
    // Old contents where the source has holes (and partly over its data):
    // converting must zero them, not skip them.
    qemu_io(
        &["-f", "raw", &uri],
        &[
            "write -P 0xee 6M 4M",
            "write -P 0xee 16M 8M",
            "write -P 0xee 100M 4M",
        ],
    );

    run_ok(
        Command::new(&qemu_img)
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&uri),
        BULK,
    );
    let compare = run_ok(
        Command::new(&qemu_img)
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&uri),
        BULK,
    );
    assert!(compare.contains("Images are identical"), "{compare}");

    // The same export through --image-opts (no format layer).
    let compare = run_ok(
        Command::new(&qemu_img)
            .args(["compare", "--image-opts"])
            .arg(format!(
                "driver=raw,file.driver=file,file.filename={}",
                src.display()
            ))
            .arg(image_opts(&site, "v0", "")),
        BULK,
    );
    assert!(compare.contains("Images are identical"), "{compare}");

    let out = site.dir.path().join("out.raw");
    run_ok(
        Command::new(&qemu_img)
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(&uri)
            .arg(&out),
        BULK,
    );
    assert_files_identical(&src, &out);

    let info = run_ok(
        Command::new(&qemu_img)
            .args(["info", "--output=json"])
            .arg(&uri),
        QUICK,
    );
    assert!(
        info.contains(&format!("\"virtual-size\": {size}")),
        "qemu-img info does not report the virtual size {size}:\n{info}"
    );
    let info = run_ok(Command::new(&qemu_img).arg("info").arg(&uri), QUICK);
    assert!(
        info.contains(&format!("virtual size: 128 MiB ({size} bytes)")),
        "{info}"
    );

    let status = site.stop();
    assert!(status.success(), "agent stop: {status}\n{}", site.log());
    assert_files_identical(&src, &site.image("v0"));
}

// ---------------------------------------------------------------------------
// 3. nbdinfo.

#[test]
fn nbdinfo_reports_size_flags_exports_and_allocation_map() {
    let size: u64 = 256 * MIB;
    let mut site = Site::new(&[vol("v0", "256MiB")]);
    site.start();
    let uri = site.uri("v0");
    let nbdinfo = tool("nbdinfo");

    let reported = run_ok(Command::new(&nbdinfo).arg("--size").arg(&uri), QUICK);
    assert_eq!(reported.trim(), size.to_string(), "nbdinfo --size");
    // The empty export name selects the volume too (SPEC §4.2).
    let default_uri = format!("nbd+unix:///?socket={}", site.socket("v0").display());
    let reported = run_ok(
        Command::new(&nbdinfo).arg("--size").arg(&default_uri),
        QUICK,
    );
    assert_eq!(
        reported.trim(),
        size.to_string(),
        "nbdinfo --size, default export"
    );

    let listed = run_ok(
        Command::new(&nbdinfo).arg("--list").arg(&default_uri),
        QUICK,
    );
    assert!(
        listed.contains("export=\"v0\""),
        "nbdinfo --list:\n{listed}"
    );

    // `--can X` / `--is X`: exit 0 = true, 2 = false, other = error.
    for flag in [
        "flush",
        "fua",
        "trim",
        "zero",
        "fast-zero",
        "multi-conn",
        "cache",
        "df",
        "read",
        "write",
        "structured-reply",
    ] {
        let out = run_with_timeout(
            Command::new(&nbdinfo).args(["--can", flag]).arg(&uri),
            QUICK,
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "nbdinfo --can {flag} should be true: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = run_with_timeout(
        Command::new(&nbdinfo).args(["--is", "read-only"]).arg(&uri),
        QUICK,
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "nbdinfo --is read-only should be false (exit 2): {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A fresh volume is all hole.
    let map = run_ok(Command::new(&nbdinfo).arg("--map").arg(&uri), QUICK);
    assert_eq!(
        parse_map(&map),
        vec![(0, size, 3)],
        "fresh volume map:\n{map}"
    );

    // One region written: data there, hole/zero everywhere else, so tools
    // that read block status skip the rest.
    qemu_io(&["-f", "raw", &uri], &["write -P 0x77 8M 1M"]);
    let map = run_ok(Command::new(&nbdinfo).arg("--map").arg(&uri), QUICK);
    assert_eq!(
        parse_map(&map),
        vec![
            (0, 8 * MIB, 3),
            (8 * MIB, MIB, 0),
            (9 * MIB, size - 9 * MIB, 3)
        ],
        "map after writing [8 MiB, 9 MiB):\n{map}"
    );
    assert!(map.contains("hole,zero") && map.contains("data"), "{map}");

    // Trimming it makes it a hole again.
    qemu_io(&["-f", "raw", &uri], &["discard 8M 1M"]);
    let map = run_ok(Command::new(&nbdinfo).arg("--map").arg(&uri), QUICK);
    assert_eq!(
        parse_map(&map),
        vec![(0, size, 3)],
        "map after discard:\n{map}"
    );
}

// ---------------------------------------------------------------------------
// 4. nbdcopy.

#[test]
fn nbdcopy_multi_conn_copy_in_and_out_is_byte_identical() {
    let size = 256 * MIB;
    let mut site = Site::new(&[vol("v0", "256MiB")]);
    site.start();
    let uri = site.uri("v0");
    let nbdcopy = tool("nbdcopy");

    let src = site.dir.path().join("src.raw");
    write_random_file(&src, 42, size);

    // In: four connections writing at once, flushed at the end.
    run_ok(
        Command::new(&nbdcopy)
            .args(["--connections", "4", "--flush"])
            .arg(&src)
            .arg(&uri),
        BULK,
    );
    // Out: four connections reading at once.
    let out = site.dir.path().join("out.raw");
    run_ok(
        Command::new(&nbdcopy)
            .args(["--connections", "4"])
            .arg(&uri)
            .arg(&out),
        BULK,
    );
    assert_files_identical(&src, &out);
    std::fs::remove_file(&out).expect("remove copy");

    let status = site.stop();
    assert!(status.success(), "agent stop: {status}\n{}", site.log());
    assert_files_identical(&src, &site.image("v0"));
}

// ---------------------------------------------------------------------------
// 5. fio.

#[test]
fn fio_random_writes_verify_and_still_verify_after_restart() {
    let mut site = Site::new(&[vol("v0", "64MiB")]);
    site.start();
    let uri = site.uri("v0");
    let dir = site.dir.path().to_path_buf();
    // Four jobs, each with its own 16 MiB region, QD16, 4 KiB random writes,
    // each block carrying a crc32c header that fio checks when reading back.
    let job = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = [
            "--name=randwrite",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=16M",
            "--numjobs=4",
            "--offset_increment=16M",
            "--verify=crc32c",
            "--verify_fatal=1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("--uri={uri}"));
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    run_fio(&dir, "write", &job(&["--do_verify=1"]), 4, 16384, 16384);

    let status = site.stop();
    assert!(status.success(), "agent stop: {status}\n{}", site.log());
    site.start();
    // Same jobs, verify only: the data survived a restart. (fio counts the
    // writes it skips in this mode as written.)
    run_fio(&dir, "verify", &job(&["--verify_only"]), 4, 16384, 16384);
}

#[test]
fn fio_mixed_block_size_writes_verify() {
    let mut site = Site::new(&[vol("v0", "64MiB")]);
    site.start();
    let args: Vec<String> = vec![
        "--name=mixed".into(),
        "--ioengine=nbd".into(),
        format!("--uri={}", site.uri("v0")),
        "--rw=randwrite".into(),
        "--bssplit=4k/40:8k/20:16k/20:64k/20".into(),
        "--iodepth=16".into(),
        "--size=32M".into(),
        "--numjobs=2".into(),
        "--offset_increment=32M".into(),
        "--verify=crc32c".into(),
        "--do_verify=1".into(),
        "--verify_fatal=1".into(),
    ];
    run_fio(site.dir.path(), "mixed", &args, 2, 32768, 32768);
}

// ---------------------------------------------------------------------------
// 6. QEMU reconnect across an agent restart (G7).

/// One qemu-io process (one block node, as a VM's disk) across an agent
/// going down (`down`) and starting again: a write issued while the agent
/// is down waits and completes once it is back, and everything written
/// before and after reads back.
fn qemu_survives_agent_restart(down: impl FnOnce(&mut Site)) {
    let mut site = Site::new(&[vol("v0", "64MiB")]);
    site.start();
    let mut q = QemuIo::spawn(&image_opts(&site, "v0", ",reconnect-delay=20"));
    q.expect(
        "write -P 0xa1 0 1M",
        "wrote 1048576/1048576 bytes at offset 0",
    );
    q.expect(
        "write -f -P 0xa2 1M 64k",
        "wrote 65536/65536 bytes at offset 1048576",
    );
    q.expect(
        "read -P 0xa1 0 1M",
        "read 1048576/1048576 bytes at offset 0",
    );

    down(&mut site);
    let during = "write -P 0xc3 2M 64k";
    q.send(during);
    site.start();
    q.wait_result(during, "wrote 65536/65536 bytes at offset 2097152");

    q.expect(
        "write -P 0xb2 4M 1M",
        "wrote 1048576/1048576 bytes at offset 4194304",
    );
    q.expect(
        "read -P 0xa1 0 1M",
        "read 1048576/1048576 bytes at offset 0",
    );
    q.expect(
        "read -P 0xa2 1M 64k",
        "read 65536/65536 bytes at offset 1048576",
    );
    q.expect(
        "read -P 0xc3 2M 64k",
        "read 65536/65536 bytes at offset 2097152",
    );
    q.expect(
        "read -P 0xb2 4M 1M",
        "read 1048576/1048576 bytes at offset 4194304",
    );
    q.expect(
        "write -f -P 0xb3 5M 64k",
        "wrote 65536/65536 bytes at offset 5242880",
    );
    q.quit();

    let status = site.stop();
    assert!(status.success(), "agent stop: {status}\n{}", site.log());
    let mut model = vec![0u8; (64 * MIB) as usize];
    let mut fill =
        |off: u64, len: u64, byte: u8| model[off as usize..(off + len) as usize].fill(byte);
    fill(0, MIB, 0xa1);
    fill(MIB, 64 << 10, 0xa2);
    fill(2 * MIB, 64 << 10, 0xc3);
    fill(4 * MIB, MIB, 0xb2);
    fill(5 * MIB, 64 << 10, 0xb3);
    assert_image_is(&site.image("v0"), &model);
}

#[test]
fn qemu_with_reconnect_delay_survives_agent_sigkill_and_restart() {
    qemu_survives_agent_restart(|site| site.kill());
}

#[test]
fn qemu_with_reconnect_delay_survives_agent_sigterm_and_restart() {
    qemu_survives_agent_restart(|site| {
        let status = site.stop();
        assert!(status.success(), "agent stop: {status}\n{}", site.log());
    });
}
// ---------------------------------------------------------------------------
// 7. TCP listener.

#[test]
fn tcp_listener_serves_nbdinfo_and_qemu_io() {
    let port = free_tcp_port();
    let mut site = Site::with_extra(
        &[vol("v0", "64MiB")],
        &format!("nbd_listen = \"127.0.0.1:{port}\""),
        "",
    );
    site.start();
    let addr = format!("127.0.0.1:{port}");
    wait_until(
        Duration::from_secs(20),
        &format!("NBD TCP listener {addr}"),
        || std::net::TcpStream::connect(&addr).is_ok(),
    );
    let uri = format!("nbd://{addr}/v0");

    let size = run_ok(Command::new(tool("nbdinfo")).arg("--size").arg(&uri), QUICK);
    assert_eq!(
        size.trim(),
        (64 * MIB).to_string(),
        "nbdinfo --size over TCP"
    );

    let out = qemu_io(
        &["-f", "raw", &uri],
        &["write -P 0x42 1M 1M", "flush", "read -P 0x42 1M 1M"],
    );
    assert_has_line(&out, "wrote 1048576/1048576 bytes at offset 1048576");
    assert_has_line(&out, "read 1048576/1048576 bytes at offset 1048576");

    // The same volume as over the Unix socket.
    let out = qemu_io(
        &["-f", "raw", &site.uri("v0")],
        &["read -P 0x42 1M 1M", "read -P 0 0 1M"],
    );
    assert_has_line(&out, "read 1048576/1048576 bytes at offset 1048576");
}
