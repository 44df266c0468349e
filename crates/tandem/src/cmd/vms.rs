//! `tandem vms [--json]`: this host's libvirt domains, their disks (path,
//! format, size, bus), state, and which group protects each.

use std::path::Path;

use anyhow::{Context, Result};
use tandem_agent::vms::VmList;
use tandem_hypervisor::DiskSource;

pub fn run(config_path: &Path, json: bool) -> Result<()> {
    let config = crate::load_config(config_path)?;
    let body = super::status::api_get(&config, "/api/v1/vms")?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let list: VmList =
        serde_json::from_str(&body).context("the agent's answer is not valid JSON")?;
    print!("{}", table(&list));
    Ok(())
}

fn table(list: &VmList) -> String {
    let mut out = String::new();
    if list.vms.is_empty() {
        out.push_str(&format!("no libvirt domains on {}\n", list.site));
        return out;
    }
    out.push_str(&format!(
        "{:<20} {:<12} {:<14} DISKS\n",
        "DOMAIN", "STATE", "PROTECTED BY"
    ));
    for vm in &list.vms {
        let disks: Vec<String> = vm
            .domain
            .disks
            .iter()
            .map(|d| {
                let source = match &d.disk.source {
                    DiskSource::File { path } => path.clone(),
                    DiskSource::Block { dev } => dev.clone(),
                    DiskSource::Nbd { socket, .. } => format!("nbd:{socket}"),
                    DiskSource::Other { kind } => format!("({kind})"),
                };
                let size = d
                    .size
                    .map(tandem_config::format_size_approx)
                    .unwrap_or_else(|| "?".into());
                format!(
                    "{} {} {} {} {}{}",
                    d.disk.target,
                    source,
                    d.disk.format.as_deref().unwrap_or("raw"),
                    size,
                    d.disk.bus.as_deref().unwrap_or("-"),
                    if d.disk.device == "disk" {
                        String::new()
                    } else {
                        format!(" ({})", d.disk.device)
                    }
                )
            })
            .collect();
        out.push_str(&format!(
            "{:<20} {:<12} {:<14} {}\n",
            vm.domain.name,
            vm.domain.state.as_str(),
            vm.group.as_deref().unwrap_or("-"),
            disks.join("; ")
        ));
    }
    out
}
