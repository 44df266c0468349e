//! `tandem demo`: the README's first command runs the whole story (three
//! sites and a witness, failover after SIGKILL, resync, migration home)
//! with nothing but the binary, and cleans up after itself, also when
//! interrupted. `tandem demo --vm` runs it with a real guest (libvirt and
//! QEMU, installed by scripts/test), and without them says what to
//! install.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");

/// One demo at a time: each runs four processes and measures timings.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs `tandem demo ARGS`, returning (exit code, stdout, stderr) or
/// failing after `timeout`. `on_line` sees each stdout line as it comes
/// and may return a signal to send to the demo.
fn run_demo(
    args: &[&str],
    timeout: Duration,
    on_line: impl FnMut(&str) -> Option<Signal>,
) -> (Option<i32>, String, String) {
    run_demo_with(
        Command::new(TANDEM).arg("demo").args(args),
        timeout,
        on_line,
    )
}

/// [`run_demo`] of a command made by the caller (its environment, say).
fn run_demo_with(
    command: &mut Command,
    timeout: Duration,
    mut on_line: impl FnMut(&str) -> Option<Signal>,
) -> (Option<i32>, String, String) {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tandem demo");
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut out = String::new();
    let status = tandem_testkit::poll(timeout, || {
        while let Ok(line) = rx.try_recv() {
            eprintln!("demo| {line}");
            if let Some(signal) = on_line(&line) {
                // Our own child; if it already exited, its status tells.
                let _ = kill_process(Pid::from_child(&child), signal);
            }
            out.push_str(&line);
            out.push('\n');
        }
        child.try_wait().unwrap()
    });
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("tandem demo did not finish within {timeout:?}; output so far:\n{out}");
    };
    // The rest of stdout.
    let reader_done = Instant::now() + Duration::from_secs(10);
    while let Ok(line) = rx.recv_timeout(reader_done.saturating_duration_since(Instant::now())) {
        eprintln!("demo| {line}");
        out.push_str(&line);
        out.push('\n');
    }
    let err = err_reader.join().unwrap_or_default();
    (status.code(), out, err)
}

/// The value column of a summary row: the text after the label.
fn row<'a>(out: &'a str, label: &str) -> &'a str {
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no summary row {label:?} in:\n{out}"));
    line.trim_start()[label.len()..].trim()
}

/// The directory the demo announced.
fn demo_dir(out: &str) -> PathBuf {
    let line = out
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("directory "))
        .unwrap_or_else(|| panic!("the demo did not name its directory:\n{out}"));
    PathBuf::from(line.trim())
}

/// The process ids the demo printed for its witness and agents.
fn pids(out: &str) -> Vec<i32> {
    out.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            while let Some(w) = words.next() {
                if w == "pid" {
                    return words.next().and_then(|p| p.parse().ok());
                }
            }
            None
        })
        .collect()
}

fn alive(pid: i32) -> bool {
    // A zombie is not alive; only our own children could be reaped by us,
    // and the demo reaps its own.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

#[test]
fn demo_runs_failover_resync_and_migration_and_cleans_up() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (code, out, err) = run_demo(&[], Duration::from_secs(180), |_| None);
    assert_eq!(code, Some(0), "tandem demo failed:\n{out}\nstderr:\n{err}");

    let rto = row(
        &out,
        "failover RTO (SIGKILL of ny -> first write acked by chicago)",
    );
    let seconds: f64 = rto
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the RTO from {rto:?}"));
    eprintln!("RTO measured by the demo: {seconds} s");
    assert!(
        seconds > 0.0 && seconds < 10.0,
        "RTO {seconds} s is out of bounds"
    );

    let rpo = row(
        &out,
        "failover RPO (writes acked by ny, missing on chicago)",
    );
    assert!(rpo.contains(" of "), "{rpo}");
    let loss = row(
        &out,
        "migration data loss (writes acked by chicago, missing on ny)",
    );
    assert!(loss.starts_with("0 of "), "migration lost data: {loss}");
    let acked: u64 = loss
        .trim_start_matches("0 of ")
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(acked > 0, "no write was acknowledged by chicago: {loss}");
    for label in [
        "checksum of the 64 MiB on chicago after failover",
        "checksum of the 64 MiB on ny after migration",
        "images identical on ny, chicago and seattle",
    ] {
        assert_eq!(row(&out, label), "ok", "{label}");
    }
    assert!(out.contains("chicago is primary in epoch 2"), "{out}");
    assert!(out.contains("ny is primary in epoch 3"), "{out}");
    row(
        &out,
        "migration pause (last write acked on chicago -> first on ny)",
    );

    // Everything stopped and removed.
    let dir = demo_dir(&out);
    assert!(!dir.exists(), "{} was not removed", dir.display());
    for pid in pids(&out) {
        assert!(!alive(pid), "process {pid} is still running");
    }
}

#[test]
fn interrupted_demo_stops_its_processes_and_exits_1() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut sent = false;
    let (code, out, err) = run_demo(&[], Duration::from_secs(120), |line| {
        // Once the sites run and data flows, Ctrl-C.
        if !sent && line.starts_with("[2/7]") {
            sent = true;
            return Some(Signal::INT);
        }
        None
    });
    assert!(
        sent,
        "the demo never reached its second step:\n{out}\n{err}"
    );
    assert_eq!(code, Some(1), "stdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains("interrupted"), "{err}");
    let pids = pids(&out);
    assert_eq!(pids.len(), 4, "witness and three agents: {out}");
    for pid in pids {
        assert!(!alive(pid), "process {pid} is still running");
    }
    // A failed demo keeps its logs for the user to read.
    let dir = demo_dir(&out);
    assert!(dir.join("ny.log").exists(), "{}", dir.display());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn demo_vm_loses_a_host_and_brings_the_guest_up_at_chicago_with_every_acknowledged_file() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let (code, out, err) = run_demo(&["--vm"], Duration::from_secs(600), |_| None);
    assert_eq!(
        code,
        Some(0),
        "tandem demo --vm failed:\n{out}\nstderr:\n{err}"
    );
    eprintln!("tandem demo --vm took {:?}", started.elapsed());

    // The story's lines say some of the same words: read the table.
    let summary = out
        .find("\nSummary\n")
        .map(|at| &out[at..])
        .unwrap_or_else(|| panic!("no summary in:\n{out}"));
    let seconds = |label: &str| -> f64 {
        let value = row(summary, label);
        value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("cannot read seconds from {value:?} ({label})"))
    };
    let running = seconds("RTO: host loss at ny -> web01 running at chicago");
    let first_write = seconds("RTO: host loss at ny -> first write by web01 at chicago");
    assert!(
        running > 0.0 && running < 60.0,
        "web01 running at chicago {running} s after the host loss"
    );
    assert!(first_write >= running, "{first_write} < {running}");
    assert!(
        row(summary, "tandem protect: the guest's pause at the pivot").ends_with(" ms"),
        "{out}"
    );
    let acked: u64 = row(summary, "files acknowledged at ny before the host loss")
        .parse()
        .unwrap();
    assert!(acked >= 15, "only {acked} files acknowledged at ny");
    let intact: u64 = row(
        summary,
        "of those, intact at chicago (journal replayed, e2fsck clean)",
    )
    .parse()
    .unwrap();
    assert_eq!(intact, acked, "{out}");
    assert_eq!(
        row(summary, "acknowledged files lost (sync mode: 0 expected)"),
        "0"
    );
    assert!(out.contains("chicago owns web01 in epoch 2"), "{out}");
    assert!(out.contains("web01 never stopped: the same QEMU"), "{out}");

    // Everything stopped and removed: the demo's directory, its
    // processes, each site's libvirt daemon root (and so its QEMUs).
    let dir = demo_dir(&out);
    assert!(!dir.exists(), "{} was not removed", dir.display());
    for pid in pids(&out) {
        assert!(!alive(pid), "process {pid} is still running");
    }
    let roots: Vec<PathBuf> = out
        .lines()
        .filter_map(|l| l.split_once("socket=")?.1.strip_suffix("/run/libvirt-sock"))
        .map(PathBuf::from)
        .collect();
    assert_eq!(roots.len(), 3, "three site daemons: {out}");
    for root in roots {
        assert!(!root.exists(), "{} was not removed", root.display());
    }
}

#[test]
fn demo_vm_without_a_hypervisor_says_which_packages_to_install() {
    let empty = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let (code, out, err) = run_demo_with(
        Command::new(TANDEM)
            .args(["demo", "--vm"])
            .env("PATH", empty.path()),
        Duration::from_secs(30),
        |_| None,
    );
    assert_eq!(code, Some(1), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    for word in [
        "qemu-system-x86_64",
        "qemu-system-x86",
        "libvirt-clients",
        "busybox-static",
        "scripts/test",
    ] {
        assert!(err.contains(word), "{word} not named:\n{err}");
    }
    // Nothing started.
    assert!(!out.contains("directory "), "{out}");
}
