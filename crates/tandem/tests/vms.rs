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
