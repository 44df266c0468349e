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
                .args(["status", "--json", "--config"])
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
