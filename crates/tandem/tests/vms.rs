//! `tandem vms` and protected VMs (docs/VMS.md).
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn vms_with_libvirt_unreachable_is_a_clear_error_and_the_agent_goes_on() {
    let mut site = Site::with_extra(
        &[vol("v0", "16MiB")],
        "\n[libvirt]\nuri = \"qemu+unix:///system?socket=/nonexistent/libvirt-sock\"",
        "vm = \"libvirt:web01\"",
    );
    site.start();
    // The API comes up after the exports Site::start waits for.
    let status = || {
        run_with_timeout(
            Command::new(TANDEM)
                .args(["status", "--json", "--local", "--config"])
                .arg(&site.config),
            Duration::from_secs(30),
        )
    };
    assert!(
        poll(Duration::from_secs(30), || status()
            .status
            .success()
            .then_some(()))
        .is_some(),
        "the agent's API did not come up"
    );
    let out = run_with_timeout(
        Command::new(TANDEM)
            .args(["vms", "--config"])
            .arg(&site.config),
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("503") && err.contains("hypervisor is not available"),
        "{err}"
    );
    // The agent still serves.
    let out = status();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\"role\": \"primary\""), "{text}");
}

#[test]
fn groups_defined_at_runtime_are_served_after_a_start_and_bad_ones_are_named() {
    let mut site = Site::new(&[vol("v0", "16MiB")]);
    let groups = site.data_dir.join("groups");
    std::fs::create_dir_all(&groups).unwrap();
    let bad = groups.join("bad.toml");
    std::fs::write(
        &bad,
        "[[group]]\nname = \"extra\"\nprimary = \"ny\"\nvolumes = [ { name = \"v0\", size = \"16MiB\" } ]\n",
    )
    .unwrap();
    let out = run_with_timeout(
        Command::new(TANDEM)
            .args(["agent", "--config"])
            .arg(&site.config),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:4:", bad.display())) && err.contains("belongs to group \"g\""),
        "{err}"
    );
    std::fs::remove_file(&bad).unwrap();
    std::fs::write(
        groups.join("extra.toml"),
        "[[group]]\nname = \"extra\"\nprimary = \"ny\"\nreplicas = [ { site = \"dr\" } ]\nvolumes = [ { name = \"x0\", size = \"8MiB\" } ]\n",
    )
    .unwrap();
    site.start();
    wait_until(
        Duration::from_secs(30),
        "the runtime group's export",
        || site.socket("x0").exists(),
    );
    let out = run_with_timeout(
        Command::new(tool("qemu-io"))
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 0x5a 0 64k",
                "-c",
                "read -P 0x5a 0 64k",
            ])
            .arg(site.uri("x0")),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_group_defined_through_the_api_is_served_at_once_and_after_a_restart() {
    let mut site = Site::new(&[vol("v0", "16MiB")]);
    site.start();
    let bad = "[[group]]\nname = \"extra\"\nprimary = \"ny\"\nreplicas = [ { site = \"boston\" } ]\nvolumes = [ { name = \"x0\", size = \"8MiB\" } ]\n";
    let (status, body) = api_call(&site, "POST", "/api/v1/groups", bad);
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains(":4:") && body.contains("replicas[0].site") && body.contains("boston"),
        "{body}"
    );
    let good = "[[group]]\nname = \"extra\"\nprimary = \"ny\"\nreplicas = [ { site = \"dr\" } ]\nvolumes = [ { name = \"x0\", size = \"8MiB\" } ]\n";
    let (status, body) = api_call(&site, "POST", "/api/v1/groups", good);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"group\": \"extra\""), "{body}");
    let write = |pattern: &str| {
        run_with_timeout(
            Command::new(tool("qemu-io"))
                .args(["-f", "raw", "-c", &format!("write -P {pattern} 0 64k")])
                .arg(site.uri("x0")),
            Duration::from_secs(30),
        )
    };
    assert!(write("0x61").status.success(), "served without a restart");
    let (status, body) = api_call(&site, "POST", "/api/v1/groups", good);
    assert_eq!(status, 400, "defined twice: {body}");
    assert!(body.contains("exists on this site already"), "{body}");
    let (_, status_body) = api_call(&site, "GET", "/api/v1/status", "");
    assert!(status_body.contains("\"name\": \"extra\""), "{status_body}");
    assert!(site.stop().success());
    site.start();
    wait_until(
        Duration::from_secs(30),
        "the runtime group's export after a restart",
        || site.socket("x0").exists(),
    );
    let out = run_with_timeout(
        Command::new(tool("qemu-io"))
            .args(["-f", "raw", "-c", "read -P 0x61 0 64k"])
            .arg(site.uri("x0")),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_group_defined_at_runtime_reaches_its_replica_site_with_its_stream() {
    let mut c = Cluster::new("ny", &["dr"], &[vol("v0", "16MiB")], "");
    c.start("dr");
    c.start("ny");
    let def = "[[group]]\nname = \"extra\"\nprimary = \"ny\"\nreplicas = [ { site = \"dr\" } ]\nvolumes = [ { name = \"x0\", size = \"8MiB\" } ]\n";
    let (status, body) = api_call(c.site("ny"), "POST", "/api/v1/groups", def);
    assert_eq!(status, 200, "{body}");
    let out = run_with_timeout(
        Command::new(tool("qemu-io"))
            .args(["-f", "raw", "-c", "write -P 0x71 0 1M", "-c", "flush"])
            .arg(c.uri("ny", "x0")),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // dr learns the group from ny's stream, keeps it and holds its data.
    wait_until(
        Duration::from_secs(60),
        "dr to hold the runtime group's data",
        || {
            c.site("dr")
                .data_dir
                .join("groups")
                .join("extra.toml")
                .exists()
                && files_equal(&c.image("ny", "x0"), &c.image("dr", "x0"))
        },
    );
    let (_, dr_status) = api_call(c.site("dr"), "GET", "/api/v1/status", "");
    assert!(dr_status.contains("\"name\": \"extra\""), "{dr_status}");
    // A restarted dr still has it.
    assert!(c.stop("dr").success());
    c.start("dr");
    let (_, dr_status) = api_call(c.site("dr"), "GET", "/api/v1/status", "");
    assert!(dr_status.contains("\"name\": \"extra\""), "{dr_status}");
}
