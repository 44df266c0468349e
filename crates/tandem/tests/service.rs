//! Running Tandem as a service (docs/SERVICE.md): SIGHUP reloads the
//! configuration under a live NBD client without losing a request, adds
//! and removes groups, changes bandwidth and hooks, refuses unsafe changes;
//! `tandem check`; the Debian package installed in a clean Debian 12
//! chroot, started from its unit's ExecStart line.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use rustix::process::{kill_process, Pid, Signal};

fn sighup(pid: u32) {
    let pid = Pid::from_raw(i32::try_from(pid).expect("pid")).expect("pid");
    kill_process(pid, Signal::HUP).expect("SIGHUP");
}

/// How many times `needle` is in the site's log.
fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

fn edit(config: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(config).expect("read config");
    assert!(
        text.contains(from),
        "{from:?} not in {}:\n{text}",
        config.display()
    );
    std::fs::write(config, text.replacen(from, to, 1)).expect("write config");
}

fn append(config: &Path, text: &str) {
    let mut all = std::fs::read_to_string(config).expect("read config");
    all.push_str(text);
    std::fs::write(config, all).expect("write config");
}

/// SIGHUP to a site, then waits until its log shows one more reload
/// outcome (applied, refused or not reloaded) than before.
fn reload(c: &Cluster, site: &str) -> String {
    let s = c.site(site);
    let outcome =
        |log: &str| count(log, "configuration reloaded") + count(log, "configuration not reloaded");
    let before = outcome(&s.log());
    sighup(s.pid().expect("running"));
    wait_until(Duration::from_secs(30), &format!("{site} reloads"), || {
        outcome(&s.log()) > before
    });
    s.log()
}

fn group<'a>(status: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    status["groups"]
        .as_array()?
        .iter()
        .find(|g| g["name"] == name)
}

/// Waits until `owner` reports group `name`'s replicas streaming with
/// nothing owed.
fn wait_caught_up(c: &Cluster, owner: &str, name: &str, timeout: Duration) {
    wait_until(timeout, &format!("{owner}: group {name} caught up"), || {
        let s = c.status(owner);
        let Some(g) = group(&s, name) else {
            return false;
        };
        let next = g["next_seq"].as_u64().unwrap_or(0);
        g["role"] == "primary"
            && g["replicas"].as_array().is_some_and(|rs| {
                !rs.is_empty()
                    && rs.iter().all(|r| {
                        r["state"] == "streaming"
                            && r["lag_bytes"] == 0
                            && r["applied_seq"].as_u64().unwrap_or(0) + 1 >= next
                    })
            })
    });
}

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new(tool("qemu-io"));
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run_ok(c.arg(uri), Duration::from_secs(120));
    assert!(!out.contains("failed"), "qemu-io: {out}");
    out
}

/// (a) SIGHUP, again and again, while a qemu-io client writes and flushes:
/// every request completes, the data is all there, the agent keeps running
/// and replicates everything.
#[test]
fn sighup_under_a_writing_client_loses_no_request() {
    let mut c = Cluster::new("ny", &["dr"], &[vol("v0", "64MiB")], "");
    c.start("dr");
    c.start("ny");
    // 1,200 writes of 32 KiB with distinct patterns, a flush every 8.
    let mut script = Vec::new();
    for i in 0..1200u32 {
        let off = (u64::from(i) * 7919 % 2000) * 32 * 1024;
        script.push(format!("write -P {} {off} 32k", i % 251));
        if i % 8 == 7 {
            script.push("flush".to_owned());
        }
    }
    // The same writes on a plain file: what the volume must hold.
    let reference = c.dir.path().join("reference.img");
    std::fs::File::create(&reference)
        .and_then(|f| f.set_len(64 << 20))
        .expect("reference image");
    let run = |target: &str| {
        let mut cmd = Command::new(tool("qemu-io"));
        cmd.args(["-f", "raw"]);
        for s in &script {
            cmd.args(["-c", s]);
        }
        cmd.arg(target);
        cmd
    };
    run_ok(
        &mut run(&reference.display().to_string()),
        Duration::from_secs(120),
    );
    let config = c.site("ny").config.clone();
    let pid = c.site("ny").pid().expect("running");
    // Its output goes to a file: 1,200 writes' lines would fill a pipe
    // nobody reads before it ends.
    let output = c.dir.path().join("qemu-io.out");
    let mut client = run(&c.uri("ny", "v0"))
        .stdout(std::fs::File::create(&output).expect("output"))
        .stderr(Stdio::from(
            std::fs::File::options()
                .append(true)
                .open(&output)
                .expect("output"),
        ))
        .spawn()
        .expect("qemu-io");
    // SIGHUP every 20 ms while the client runs; every third one changes
    // the replica's bandwidth, so reloads apply something under load.
    let mut sent = 0u32;
    let status = loop {
        if let Some(status) = client.try_wait().expect("qemu-io") {
            break status;
        }
        if sent % 3 == 2 {
            let rate = if sent.is_multiple_of(2) {
                "900Mbit"
            } else {
                "800Mbit"
            };
            let text = std::fs::read_to_string(&config).expect("config");
            let text = match text.find("bandwidth = ") {
                Some(_) => text
                    .lines()
                    .map(|l| {
                        if l.starts_with("bandwidth = ") {
                            format!("bandwidth = \"{rate}\"")
                        } else {
                            l.to_owned()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("\n"),
                None => text.replacen(
                    "name = \"dr\"\n",
                    &format!("name = \"dr\"\nbandwidth = \"{rate}\"\n"),
                    1,
                ),
            };
            // Atomically: a reload never reads half a file.
            let tmp = config.with_extension("toml.tmp");
            std::fs::write(&tmp, text).expect("config");
            std::fs::rename(&tmp, &config).expect("config");
        }
        sighup(pid);
        sent += 1;
        std::thread::sleep(Duration::from_millis(20));
        assert!(sent < 50_000, "qemu-io never ended");
    };
    let text = std::fs::read_to_string(&output).expect("qemu-io output");
    assert!(status.success(), "qemu-io failed ({status}): {text}");
    assert!(!text.contains("fail") && !text.contains("error"), "{text}");
    assert_eq!(count(&text, "wrote 32768/32768"), 1200, "every write done");
    let log = c.site("ny").log();
    let reloads = count(&log, "configuration reloaded");
    assert!(
        // Signals that arrive during a reload coalesce into one more
        // reload: a loaded machine may log only a few.
        reloads >= 1 && sent >= 3,
        "{sent} SIGHUPs sent, {reloads} reloads logged while the client ran:\n{log}"
    );
    assert!(log.contains("reload: peer bandwidth changed"), "{log}");
    assert!(!log.contains("configuration not reloaded"), "{log}");
    // Still running, still serving the data written.
    assert!(
        c.status("ny")["groups"][0]["role"] == "primary",
        "agent still up"
    );
    run_ok(
        Command::new(tool("qemu-img"))
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&reference)
            .arg(c.uri("ny", "v0")),
        Duration::from_secs(60),
    );
    // And replicated: the replica's image equals the reference.
    wait_caught_up(&c, "ny", "g", Duration::from_secs(60));
    assert_eq!(c.stop("ny").code(), Some(0), "clean stop after reloads");
    assert_eq!(c.stop("dr").code(), Some(0));
    assert!(files_equal(&reference, &c.image("dr", "v0")));
    assert!(files_equal(&reference, &c.image("ny", "v0")));
}

/// (b) A reload adds a group (its export appears and it replicates),
/// changes a peer's bandwidth (the API shows it) and a hook command (the
/// next promotion runs the new one), and removes the group again (its
/// export goes, the other group's client is undisturbed).
#[test]
fn reload_adds_and_removes_a_group_and_changes_bandwidth_and_hooks() {
    let hooks = tempfile::tempdir().expect("tempdir");
    let mark = |name: &str| hooks.path().join(name);
    let hook = |name: &str| {
        format!(
            "on_promote = \"echo $TANDEM_SITE >> {}\"",
            mark(name).display()
        )
    };
    let mut c = Cluster::new("ny", &["dr"], &[vol("v0", "32MiB")], &hook("old"));
    let witness = Witness::start(c.dir.path());
    c.set_coordinator(&witness.section("3s"));
    c.start("dr");
    c.start("ny");
    // A client on g stays attached through every reload: an interactive
    // qemu-io (one NBD connection), fed commands on its stdin.
    let client_out = c.dir.path().join("client.out");
    let mut client = Command::new(tool("qemu-io"))
        .args(["-f", "raw"])
        .arg(c.uri("ny", "v0"))
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&client_out).expect("output"))
        .stderr(Stdio::from(
            std::fs::File::options()
                .append(true)
                .open(&client_out)
                .expect("output"),
        ))
        .spawn()
        .expect("qemu-io");
    // One command at a time, each awaited (its next prompt): qemu-io
    // reads its input a line per wake-up.
    let prompts =
        |path: &Path| std::fs::read_to_string(path).map_or(0, |t| t.matches("qemu-io> ").count());
    let mut say = |cmd: &str| {
        let before = prompts(&client_out);
        let stdin = client.stdin.as_mut().expect("stdin");
        std::io::Write::write_all(stdin, format!("{cmd}\n").as_bytes()).expect("qemu-io stdin");
        if cmd != "quit" {
            wait_until(Duration::from_secs(30), &format!("client: {cmd}"), || {
                prompts(&client_out) > before.max(1)
            });
        }
    };
    wait_until(Duration::from_secs(30), "client's prompt", || {
        prompts(&client_out) >= 1
    });
    say("write -P 0x61 0 64k");
    // Add group h on both sites, a bandwidth to dr on ny, a new hook.
    let h = "\n[[group]]\nname = \"h\"\nprimary = \"ny\"\nreplicas = [ { site = \"dr\", priority = 1 } ]\nvolumes = [ { name = \"h0\", size = \"16MiB\" } ]\n";
    for site in ["ny", "dr"] {
        let config = c.site(site).config.clone();
        append(&config, h);
        edit(&config, &hook("old"), &hook("new"));
    }
    edit(
        &c.site("ny").config,
        "name = \"dr\"\n",
        "name = \"dr\"\nbandwidth = \"80Mbit\"\n",
    );
    let log = reload(&c, "dr");
    assert!(log.contains("reload: group added"), "{log}");
    let log = reload(&c, "ny");
    assert!(log.contains("reload: group added"), "{log}");
    assert!(log.contains("reload: hooks changed"), "{log}");
    let socket = c.socket("ny", "h0");
    wait_until(Duration::from_secs(20), "h0's export", || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    qemu_io(&c.uri("ny", "h0"), &["write -P 0x77 1M 2M", "flush"]);
    wait_caught_up(&c, "ny", "h", Duration::from_secs(60));
    qemu_io(&c.uri("ny", "h0"), &["read -P 0x77 1M 2M"]);
    assert!(
        files_equal(&c.image("ny", "h0"), &c.image("dr", "h0")),
        "h replicated to dr"
    );
    // The bandwidth, as the API reports it.
    let (code, body) = api_call(c.site("ny"), "GET", "/api/v1/peers", "");
    assert_eq!(code, 200, "{body}");
    let peers: serde_json::Value = serde_json::from_str(&body).expect("json");
    let dr = peers
        .as_array()
        .and_then(|a| a.iter().find(|p| p["site"] == "dr"))
        .or_else(|| {
            peers["peers"]
                .as_array()
                .and_then(|a| a.iter().find(|p| p["site"] == "dr"))
        })
        .unwrap_or_else(|| panic!("dr in {body}"));
    assert_eq!(dr["bandwidth_bps"], 80_000_000, "{body}");
    assert_eq!(dr["effective_bps"], 80_000_000, "{body}");

    // g's client, after the reloads that added h.
    say("write -P 0x63 128k 64k");
    say("flush");

    // Remove h again: its export goes, g's client is untouched.
    for site in ["ny", "dr"] {
        let config = c.site(site).config.clone();
        edit(&config, h, "");
    }
    let log = reload(&c, "ny");
    assert!(log.contains("reload: group removed"), "{log}");
    reload(&c, "dr");
    wait_until(Duration::from_secs(20), "h0's export gone", || {
        !socket.exists()
    });
    let s = c.status("ny");
    assert!(group(&s, "h").is_none(), "h gone: {s:#}");
    assert!(group(&s, "g").is_some());
    // A fresh client of g works after the removal too.
    qemu_io(
        &c.uri("ny", "v0"),
        &["write -P 0x64 1M 64k", "flush", "read -P 0x64 1M 64k"],
    );
    say("write -P 0x62 64k 64k");
    say("flush");
    say("read -P 0x61 0 64k");
    say("read -P 0x62 64k 64k");
    say("read -P 0x63 128k 64k");
    say("quit");
    let status = poll(Duration::from_secs(30), || client.try_wait().ok().flatten());
    let out = std::fs::read_to_string(&client_out).expect("client output");
    let status = status.unwrap_or_else(|| panic!("the client on g did not finish: {out}"));
    assert!(status.success(), "client on g ({status}): {out}");
    assert!(!out.contains("fail") && !out.contains("error"), "{out}");
    assert_eq!(count(&out, "read 65536/65536"), 3, "{out}");

    // The new hook runs at the next promotion (a planned migration).
    wait_caught_up(&c, "ny", "g", Duration::from_secs(60));
    run_ok(
        Command::new(TANDEM)
            .args(["migrate", "g", "--to", "dr", "--config"])
            .arg(&c.site("ny").config),
        Duration::from_secs(60),
    );
    wait_until(Duration::from_secs(30), "new on_promote ran", || {
        std::fs::read_to_string(mark("new")).is_ok_and(|t| t.contains("dr"))
    });
    assert!(
        !std::fs::read_to_string(mark("old")).is_ok_and(|t| t.contains("dr")),
        "the old hook command did not run at dr"
    );
    drop(witness);
}

/// (c) A volume's new size is refused with one clear line, the running
/// configuration stays (the export keeps its size), and a file that does
/// not parse changes nothing either.
#[test]
fn a_changed_volume_size_is_refused_and_the_running_configuration_stays() {
    let mut c = Cluster::new("ny", &["dr"], &[vol("v0", "32MiB")], "");
    c.start("ny");
    let config = c.site("ny").config.clone();
    edit(&config, "size = \"32MiB\"", "size = \"64MiB\"");
    append(
        &config,
        "\n[[peer]]\nname = \"extra\"\naddress = \"127.0.0.1:9\"\n",
    );
    let log = reload(&c, "ny");
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("reload refused"))
        .collect();
    assert_eq!(refused.len(), 1, "one line per refused change:\n{log}");
    assert!(
        refused[0].contains("group g volume v0 size 32MiB -> 64MiB"),
        "{}",
        refused[0]
    );
    assert!(log.contains("the running configuration is kept"), "{log}");
    assert!(
        !log.contains("reload: peer added"),
        "nothing applied:\n{log}"
    );
    let size = run_ok(
        Command::new(tool("nbdinfo"))
            .arg("--size")
            .arg(c.uri("ny", "v0")),
        Duration::from_secs(20),
    );
    assert_eq!(size.trim(), (32u64 << 20).to_string());
    // A broken file: named with its line, nothing changes.
    let good = std::fs::read_to_string(&config).expect("read");
    std::fs::write(&config, "[site\n").expect("write");
    let log = reload(&c, "ny");
    assert!(
        log.contains(&format!("{}:1:", config.display())),
        "the error names the file and line:\n{log}"
    );
    // (status finds the API through the file)
    std::fs::write(&config, good).expect("write");
    assert_eq!(c.status("ny")["groups"][0]["role"], "primary");
    assert_eq!(c.stop("ny").code(), Some(0));
}

/// (d) `tandem check`: "ok" and exit 0 for a good file (without creating
/// the data directory); exit 1 with file, line and key for a bad one and
/// for a certificate of another site.
#[test]
fn check_says_ok_or_names_the_file_line_and_key() {
    let c = Cluster::new("ny", &["dr"], &[vol("v0", "32MiB")], "");
    let config = c.site("ny").config.clone();
    let check = |config: &Path| {
        run_with_timeout(
            Command::new(TANDEM).args(["check", "--config"]).arg(config),
            Duration::from_secs(20),
        )
    };
    let out = check(&config);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    assert!(!c.site("ny").data_dir.exists(), "check creates nothing");

    edit(&config, "size = \"32MiB\"", "size = \"32XB\"");
    let out = check(&config);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let line = std::fs::read_to_string(&config)
        .expect("config")
        .lines()
        .position(|l| l.contains("32XB"))
        .expect("line")
        + 1;
    assert!(
        err.contains(&format!("{}:{line}:", config.display()))
            && err.contains("group[0].volumes[0].size"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty());

    // TLS on, with the certificate of another site.
    let pki = c.dir.path().join("pki");
    run_ok(
        Command::new(TANDEM)
            .args(["certs", "create", "--out"])
            .arg(&pki)
            .args(["ny", "dr"]),
        Duration::from_secs(30),
    );
    edit(&config, "size = \"32XB\"", "size = \"32MiB\"");
    edit(
        &config,
        "[tls]\nmode = \"off\"\n",
        &format!(
            "[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/dr.pem\"\nkey = \"{0}/dr.key\"\n",
            pki.display()
        ),
    );
    let out = check(&config);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let line = std::fs::read_to_string(&config)
        .expect("config")
        .lines()
        .position(|l| l.starts_with("cert = "))
        .expect("line")
        + 1;
    assert!(
        err.contains(&format!("{}:{line}: tls.cert:", config.display()))
            && err.contains("site \"dr\""),
        "{err}"
    );
    edit(&config, "dr.pem", "ny.pem");
    edit(&config, "dr.key", "ny.key");
    let out = check(&config);
    assert!(out.status.success(), "{out:?}");
}

// ---------------------------------------------------------------------------
// (e) The Debian package in a clean Debian 12 chroot.

/// Where the finished minbase chroot is kept between runs.
const BASE_CACHE: &str = "/var/cache/tandem/debian-bookworm-minbase.tar";

/// The Debian mirror this machine's apt uses.
fn debian_mirror() -> String {
    // What apt reads: sources.list and sources.list.d/*.list|*.sources
    // (other names, e.g. a disabled source, are ignored, as apt does).
    let mut texts = vec![std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default()];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<PathBuf> = dir
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "list" || x == "sources"))
            .collect();
        paths.sort();
        for p in paths {
            texts.push(std::fs::read_to_string(p).unwrap_or_default());
        }
    }
    let usable = |uri: &str, suites: &[&str]| {
        uri.starts_with("http") && !uri.contains("security") && suites.contains(&"bookworm")
    };
    for text in &texts {
        // One-line entries: `deb [options] URI SUITE COMPONENTS...`.
        for l in text.lines().map(str::trim) {
            if let Some(rest) = l.strip_prefix("deb ") {
                let words: Vec<&str> = rest.split_whitespace().collect();
                if let Some(i) = words.iter().position(|w| w.starts_with("http")) {
                    if usable(words[i], &words[i + 1..]) {
                        return words[i].to_owned();
                    }
                }
            }
        }
        // deb822 stanzas: `URIs:` and `Suites:` of one paragraph.
        for stanza in text.split("\n\n") {
            let field = |name: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.trim().strip_prefix(name))
                    .map(|v| v.split_whitespace().collect::<Vec<_>>())
                    .unwrap_or_default()
            };
            let suites = field("Suites:");
            if let Some(uri) = field("URIs:").into_iter().find(|u| usable(u, &suites)) {
                return uri.to_owned();
            }
        }
    }
    panic!("no Debian mirror in /etc/apt/sources.list(.d)");
}

/// The cached minbase tree, made once with debootstrap.
fn base_tarball() -> PathBuf {
    let cache = PathBuf::from(BASE_CACHE);
    if cache.exists() {
        return cache;
    }
    let work = tempfile::Builder::new()
        .prefix("bootstrap")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    let root = work.path().join("root");
    run_ok(
        Command::new(tool("debootstrap"))
            .args(["--variant=minbase", "bookworm"])
            .arg(&root)
            .arg(debian_mirror()),
        Duration::from_secs(900),
    );
    std::fs::create_dir_all(cache.parent().expect("parent")).expect("cache dir");
    let part = cache.with_extension("tar.part");
    run_ok(
        Command::new(tool("tar"))
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&part)
            .arg("."),
        Duration::from_secs(300),
    );
    std::fs::rename(&part, &cache).expect("cache the base");
    cache
}

/// A child killed if the test ends early.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// /proc mounted in the chroot while it lives.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn the_debian_package_installs_in_a_clean_chroot_and_its_unit_starts_the_agent() {
    let base = base_tarball();
    let work = tempfile::Builder::new()
        .prefix("tdeb")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    let root = work.path().join("root");
    std::fs::create_dir_all(&root).expect("root");
    run_ok(
        Command::new(tool("tar"))
            .arg("-C")
            .arg(&root)
            .arg("-xf")
            .arg(&base),
        Duration::from_secs(300),
    );
    // The package, from the binary under test (scripts/package: man pages,
    // then cargo deb --no-build).
    let bin = Path::new(TANDEM);
    let profile_dir = bin.parent().expect("profile dir");
    let target = profile_dir.parent().expect("target dir");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(other) => other,
        None => panic!("binary path {}", bin.display()),
    };
    tool("cargo-deb");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let debs = work.path().join("debs");
    let out = run_ok(
        Command::new(repo.join("scripts/package"))
            .args(["--profile", profile, "--no-build", "--out"])
            .arg(&debs)
            .env("CARGO_TARGET_DIR", target),
        Duration::from_secs(300),
    );
    let deb = PathBuf::from(out.lines().last().expect("deb path").trim());
    assert!(deb.is_file(), "{out}");
    std::fs::copy(&deb, root.join("tmp/tandem.deb")).expect("copy deb");
    let _proc = {
        let p = root.join("proc");
        run_ok(
            Command::new("mount").args(["-t", "proc", "proc"]).arg(&p),
            Duration::from_secs(10),
        );
        Mounted(p)
    };
    run_ok(
        Command::new(tool("chroot"))
            .arg(&root)
            .args(["dpkg", "-i", "/tmp/tandem.deb"]),
        Duration::from_secs(120),
    );
    for f in [
        "usr/bin/tandem",
        "lib/systemd/system/tandem-agent.service",
        "lib/systemd/system/tandem-witness.service",
        "etc/tandem/tandem.toml.example",
        "usr/share/man/man1/tandem.1.gz",
        "usr/share/man/man1/tandem-agent.1.gz",
        "usr/share/man/man1/tandem-check.1.gz",
    ] {
        assert!(root.join(f).is_file(), "{f} installed");
    }
    let page = run_ok(
        Command::new(tool("man"))
            .arg("-l")
            .arg(root.join("usr/share/man/man1/tandem-agent.1.gz"))
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100"),
        Duration::from_secs(30),
    );
    assert!(
        page.contains("tandem-agent") && page.contains("--config"),
        "{page}"
    );
    let raw = run_ok(
        Command::new(tool("zcat")).arg(root.join("usr/share/man/man1/tandem-check.1.gz")),
        Duration::from_secs(30),
    );
    assert!(raw.contains(".TH tandem-check"), "{raw}");

    // The unit's ExecStart, its ${VARIABLES} from its Environment= lines.
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/tandem-agent.service"))
        .expect("unit");
    let mut env = Vec::new();
    for l in unit.lines() {
        if let Some(kv) = l.strip_prefix("Environment=") {
            if let Some((k, v)) = kv.split_once('=') {
                env.push((k.to_owned(), v.to_owned()));
            }
        }
    }
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let mut exec = exec.to_owned();
    for (k, v) in &env {
        exec = exec.replace(&format!("${{{k}}}"), v);
    }
    let argv: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(argv[..2], ["/usr/bin/tandem", "agent"], "{exec}");
    let config = argv
        .iter()
        .skip_while(|a| **a != "--config")
        .nth(1)
        .expect("--config FILE");

    // The example configuration, on ports of this test, as the config.
    let example =
        std::fs::read_to_string(root.join("etc/tandem/tandem.toml.example")).expect("example");
    let (listen, api) = (free_port(), free_port());
    let text = example
        .replace("127.0.0.1:7450", &format!("127.0.0.1:{listen}"))
        .replace("127.0.0.1:7451", &format!("127.0.0.1:{api}"));
    assert!(text.contains("kind = \"none\"") && text.contains("mode = \"off\""));
    std::fs::write(root.join(config.trim_start_matches('/')), text).expect("config");
    let ok = run_ok(
        Command::new(tool("chroot")).arg(&root).args([
            "/usr/bin/tandem",
            "check",
            "--config",
            config,
        ]),
        Duration::from_secs(30),
    );
    assert_eq!(ok.trim(), "ok");
    let log = work.path().join("agent.log");
    let mut agent = KillOnDrop(
        Command::new(tool("chroot"))
            .arg(&root)
            .args(&argv)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("chroot agent"),
    );
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until(Duration::from_secs(30), "the agent's API answers", || {
        if let Ok(Some(s)) = agent.0.try_wait() {
            panic!("agent exited ({s}):\n{}", read_log());
        }
        let out = run_with_timeout(
            Command::new(tool("chroot")).arg(&root).args([
                "/usr/bin/tandem",
                "status",
                "--json",
                "--config",
                config,
            ]),
            Duration::from_secs(10),
        );
        out.status.success()
            && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .is_ok_and(|s| s["site"] == "ny")
    });
    assert!(root.join("var/lib/tandem/api.token").exists());
    sigterm(&agent.0);
    let status = wait_child(&mut agent.0, Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{}", read_log());
    assert!(
        read_log().contains("agent stopped cleanly"),
        "{}",
        read_log()
    );
}
