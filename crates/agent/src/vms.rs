//! `tandem vms`: the domains on this host, their disks and state, and
//! which group protects each (docs/VMS.md).

use tandem_hypervisor::{DomainInfo, Hypervisor, HypervisorError};

/// A domain as `GET /api/v1/vms` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmEntry {
    #[serde(flatten)]
    pub domain: DomainInfo,
    /// The group whose `vm` names this domain, if any.
    pub group: Option<String>,
}

/// This site's answer to `GET /api/v1/vms`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmList {
    pub site: String,
    pub vms: Vec<VmEntry>,
}

/// Every domain of `hypervisor`, with the group (of `groups`) protecting
/// it.
pub fn list(
    hypervisor: &dyn Hypervisor,
    groups: &[tandem_config::Group],
) -> Result<Vec<VmEntry>, HypervisorError> {
    let mut domains = hypervisor.domains()?;
    domains.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(domains
        .into_iter()
        .map(|domain| VmEntry {
            group: groups
                .iter()
                .find(|g| g.vm.as_deref() == Some(domain.name.as_str()))
                .map(|g| g.name.clone()),
            domain,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_hypervisor::fake::Fake;

    fn domain(name: &str) -> String {
        format!(
            "<domain type='qemu'><name>{name}</name><devices>\
             <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='/images/{name}.qcow2'/><target dev='vda' bus='virtio'/></disk>\
             </devices></domain>"
        )
    }

    #[test]
    fn domains_are_listed_with_their_protecting_group() {
        let h = Fake::new();
        h.define(&domain("web02")).unwrap_or_default();
        h.define(&domain("web01")).unwrap_or_default();
        let mut g = tandem_config::parse(
            "[site]\nname = \"a\"\ndata_dir = \"/tmp/x\"\nlisten = \"127.0.0.1:1\"\napi = \"127.0.0.1:2\"\n\
             [tls]\nmode = \"off\"\n[[peer]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n\
             [[group]]\nname = \"g1\"\nprimary = \"a\"\nvolumes = [ { name = \"v\", size = \"1M\" } ]\nvm = \"libvirt:web01\"\n",
            std::path::Path::new("t.toml"),
        )
        .map(|c| c.groups)
        .unwrap_or_default();
        assert_eq!(g.len(), 1);
        let vms = list(&h, &g).unwrap_or_default();
        assert_eq!(vms.len(), 2);
        assert_eq!(
            (vms[0].domain.name.as_str(), vms[0].group.as_deref()),
            ("web01", Some("g1"))
        );
        assert_eq!(
            (vms[1].domain.name.as_str(), vms[1].group.as_deref()),
            ("web02", None)
        );
        assert_eq!(vms[0].domain.disks[0].disk.format.as_deref(), Some("qcow2"));
        g.clear();
        assert!(list(&h, &g)
            .unwrap_or_default()
            .iter()
            .all(|v| v.group.is_none()));
    }
}
