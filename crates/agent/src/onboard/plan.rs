//! What `tandem protect` does with a domain, decided without I/O from the
//! request and the domain as libvirt shows it (docs/VMS.md, "Onboarding").

use serde::{Deserialize, Serialize};
use tandem_config::toml_string;
use tandem_hypervisor::{xml, DiskSource, DomainState, XmlError};

/// `POST /api/v1/protect`: protect a domain of this host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtectRequest {
    /// The libvirt domain.
    pub domain: String,
    /// The sites to replicate to, in priority order unless given.
    pub replicas: Vec<ReplicaRequest>,
    /// `async` (default) or `sync`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// The group's name; the domain's by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// One `--replica SITE[:PRIORITY]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaRequest {
    pub site: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
}

/// A disk the group takes over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedDisk {
    /// `<target dev=...>`.
    pub target: String,
    /// The group's volume for it: `<group>-<target>`.
    pub volume: String,
    /// Where its data is now: a file or block device path.
    pub source: String,
    /// `raw` or `qcow2` (what the data is copied from).
    pub format: String,
    /// Guest-visible bytes: the volume's size.
    pub size: u64,
}

/// What protecting the domain means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub group: String,
    pub domain: String,
    /// Running: moved live; shut off: copied.
    pub running: bool,
    pub disks: Vec<PlannedDisk>,
    /// The group's `[[group]]` table, as `POST /api/v1/groups` takes it.
    pub definition: String,
}

/// Why a domain cannot be protected as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("domain {domain} is {state}: only a running or shut-off domain can be protected")]
    State { domain: String, state: DomainState },
    #[error("domain {domain} is protected by group {group} already")]
    AlreadyProtected { domain: String, group: String },
    #[error("name at least one replica site (--replica SITE[:PRIORITY])")]
    NoReplicas,
    #[error("site {0} is this site: a group's replicas are other sites")]
    ReplicaIsHere(String),
    #[error("mode must be \"async\" or \"sync\", not {0:?}")]
    Mode(String),
    #[error("domain {0} has no writable disk to protect")]
    NoDisks(String),
    #[error(
        "disk {target} of {domain} cannot be protected: {reason}; Tandem protects every \
         writable disk of a VM or none (a VM started elsewhere without one of its disks \
         would not be the same VM)"
    )]
    Disk {
        domain: String,
        target: String,
        reason: String,
    },
    #[error(
        "the running domain's disks ({running}) differ from its persistent definition's \
         ({persistent}): make them agree (or shut the domain down) first"
    )]
    Differs { running: String, persistent: String },
    #[error("the size of disk {0} is not known")]
    SizeUnknown(String),
    #[error("disk {target} is {size} bytes, not a multiple of 512")]
    Size { target: String, size: u64 },
    #[error(transparent)]
    Xml(#[from] XmlError),
}

/// What the domain looks like, as gathered by the driver.
pub struct Domain<'a> {
    pub name: &'a str,
    pub state: DomainState,
    /// The persistent definition.
    pub persistent: &'a str,
    /// The running XML (when it runs).
    pub running: Option<&'a str>,
    /// Guest-visible size of each disk, by target.
    pub sizes: &'a [(String, u64)],
    /// The group already naming this domain, if any.
    pub protected_by: Option<&'a str>,
}

/// Decides what protecting `domain` on `site` as `request` asks means.
pub fn plan(request: &ProtectRequest, site: &str, domain: &Domain<'_>) -> Result<Plan, PlanError> {
    if let Some(group) = domain.protected_by {
        return Err(PlanError::AlreadyProtected {
            domain: domain.name.to_owned(),
            group: group.to_owned(),
        });
    }
    let running = match domain.state {
        DomainState::Running => true,
        DomainState::ShutOff => false,
        state => {
            return Err(PlanError::State {
                domain: domain.name.to_owned(),
                state,
            })
        }
    };
    if request.replicas.is_empty() {
        return Err(PlanError::NoReplicas);
    }
    if let Some(r) = request.replicas.iter().find(|r| r.site == site) {
        return Err(PlanError::ReplicaIsHere(r.site.clone()));
    }
    let mode = request.mode.as_deref().unwrap_or("async");
    if mode != "async" && mode != "sync" {
        return Err(PlanError::Mode(mode.to_owned()));
    }
    let group = request
        .group
        .clone()
        .unwrap_or_else(|| domain.name.to_owned());
    let persistent = xml::read(domain.persistent)?;
    let disks = writable_disks(domain.name, &persistent)?;
    if let Some(running_xml) = domain.running {
        let live = writable_disks(domain.name, &xml::read(running_xml)?)?;
        let summary = |d: &[(String, String, String)]| {
            d.iter()
                .map(|(t, s, _)| format!("{t}={s}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if summary(&live) != summary(&disks) {
            return Err(PlanError::Differs {
                running: summary(&live),
                persistent: summary(&disks),
            });
        }
    }
    if disks.is_empty() {
        return Err(PlanError::NoDisks(domain.name.to_owned()));
    }
    let mut planned = Vec::new();
    for (target, source, format) in disks {
        let size = domain
            .sizes
            .iter()
            .find(|(t, _)| *t == target)
            .map(|(_, s)| *s)
            .ok_or_else(|| PlanError::SizeUnknown(target.clone()))?;
        if size == 0 || size % 512 != 0 {
            return Err(PlanError::Size { target, size });
        }
        planned.push(PlannedDisk {
            volume: format!("{group}-{target}"),
            target,
            source,
            format,
            size,
        });
    }
    let definition = group_table(request, site, &group, mode, domain.name, &planned);
    Ok(Plan {
        group,
        domain: domain.name.to_owned(),
        running,
        disks: planned,
        definition,
    })
}

/// Every writable disk as (target, source path, format); an error for one
/// Tandem cannot take.
pub(crate) fn writable_disks(
    domain: &str,
    parsed: &xml::DomainXml,
) -> Result<Vec<(String, String, String)>, PlanError> {
    let mut out = Vec::new();
    for d in &parsed.disks {
        if d.device != "disk" || d.readonly {
            continue;
        }
        let refuse = |reason: String| PlanError::Disk {
            domain: domain.to_owned(),
            target: d.target.clone(),
            reason,
        };
        if d.tandem {
            return Err(refuse("it is on a Tandem volume already".into()));
        }
        let source = match &d.source {
            DiskSource::File { path } => path.clone(),
            DiskSource::Block { dev } => dev.clone(),
            DiskSource::Nbd { socket, .. } => {
                return Err(refuse(format!("it is an NBD export ({socket})")))
            }
            DiskSource::Other { kind } => {
                return Err(refuse(format!("its source is {kind}, not a local file")))
            }
        };
        if d.bus.as_deref() != Some("virtio") {
            return Err(refuse(format!(
                "it is on bus {}, and this version protects virtio disks",
                d.bus.as_deref().unwrap_or("(none)")
            )));
        }
        let format = d.format.clone().unwrap_or_else(|| "raw".into());
        if format != "raw" && format != "qcow2" {
            return Err(refuse(format!("its format is {format}, not raw or qcow2")));
        }
        out.push((d.target.clone(), source, format));
    }
    Ok(out)
}

fn group_table(
    request: &ProtectRequest,
    site: &str,
    group: &str,
    mode: &str,
    domain: &str,
    disks: &[PlannedDisk],
) -> String {
    let replicas: Vec<String> = request
        .replicas
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let priority = r
                .priority
                .unwrap_or_else(|| u32::try_from(i + 1).unwrap_or(u32::MAX));
            format!(
                "{{ site = {}, priority = {priority} }}",
                toml_string(&r.site)
            )
        })
        .collect();
    let volumes: Vec<String> = disks
        .iter()
        .map(|d| {
            format!(
                "{{ name = {}, size = \"{}\" }}",
                toml_string(&d.volume),
                d.size
            )
        })
        .collect();
    format!(
        "[[group]]\nname = {}\nprimary = {}\nreplicas = [ {} ]\nmode = {}\n\
         vm = {}\nvolumes = [ {} ]\n",
        toml_string(group),
        toml_string(site),
        replicas.join(", "),
        toml_string(mode),
        toml_string(&format!("libvirt:{domain}")),
        volumes.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN: &str = "<domain type='qemu'><name>web01</name><devices>\
        <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
        <source file='/images/web01.qcow2'/><target dev='vda' bus='virtio'/></disk>\
        <disk type='block' device='disk'><driver name='qemu' type='raw'/>\
        <source dev='/dev/vg/web01-data'/><target dev='vdb' bus='virtio'/></disk>\
        <disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='sda' bus='sata'/><readonly/></disk>\
        </devices></domain>";

    fn request() -> ProtectRequest {
        ProtectRequest {
            domain: "web01".into(),
            replicas: vec![
                ReplicaRequest {
                    site: "chicago".into(),
                    priority: None,
                },
                ReplicaRequest {
                    site: "seattle".into(),
                    priority: Some(5),
                },
            ],
            mode: Some("sync".into()),
            group: None,
        }
    }

    fn sizes() -> Vec<(String, u64)> {
        vec![("vda".into(), 1 << 30), ("vdb".into(), 64 << 20)]
    }

    fn domain<'a>(xml: &'a str, sizes: &'a [(String, u64)]) -> Domain<'a> {
        Domain {
            name: "web01",
            state: DomainState::Running,
            persistent: xml,
            running: Some(xml),
            sizes,
            protected_by: None,
        }
    }

    #[test]
    fn every_writable_disk_becomes_a_volume_of_a_group_that_reads_back() {
        let s = sizes();
        let p = plan(&request(), "ny", &domain(PLAIN, &s)).unwrap();
        assert_eq!(p.group, "web01");
        assert!(p.running);
        let vols: Vec<_> = p
            .disks
            .iter()
            .map(|d| {
                (
                    d.volume.as_str(),
                    d.source.as_str(),
                    d.format.as_str(),
                    d.size,
                )
            })
            .collect();
        assert_eq!(
            vols,
            [
                ("web01-vda", "/images/web01.qcow2", "qcow2", 1 << 30),
                ("web01-vdb", "/dev/vg/web01-data", "raw", 64 << 20)
            ]
        );
        let config = format!(
            "[site]\nname = \"ny\"\ndata_dir = \"/tmp/x\"\nlisten = \"127.0.0.1:1\"\napi = \"127.0.0.1:2\"\n\
             [tls]\nmode = \"off\"\n\
             [[peer]]\nname = \"ny\"\naddress = \"127.0.0.1:1\"\n\
             [[peer]]\nname = \"chicago\"\naddress = \"127.0.0.1:3\"\n\
             [[peer]]\nname = \"seattle\"\naddress = \"127.0.0.1:4\"\n{}",
            p.definition
        );
        let c = tandem_config::parse(&config, std::path::Path::new("t.toml")).unwrap();
        let g = &c.groups[0];
        assert_eq!(g.vm.as_deref(), Some("web01"));
        assert_eq!(g.mode, tandem_config::Mode::Sync);
        let r: Vec<_> = g
            .replicas
            .iter()
            .map(|r| (r.site.as_str(), r.priority))
            .collect();
        assert_eq!(r, [("chicago", 1), ("seattle", 5)]);
        assert_eq!(g.volumes[1].size, 64 << 20);
    }

    #[test]
    fn a_disk_tandem_cannot_take_refuses_the_whole_vm() {
        let s = sizes();
        let ide = PLAIN.replacen("bus='virtio'", "bus='ide'", 1);
        let e = plan(&request(), "ny", &domain(&ide, &s)).unwrap_err();
        assert!(
            matches!(&e, PlanError::Disk { target, .. } if target == "vda"),
            "{e}"
        );
        let vmdk = PLAIN.replacen("type='qcow2'", "type='vmdk'", 1);
        assert!(plan(&request(), "ny", &domain(&vmdk, &s)).is_err());
    }

    #[test]
    fn requests_that_make_no_sense_are_refused() {
        let s = sizes();
        let d = domain(PLAIN, &s);
        let mut r = request();
        r.replicas.clear();
        assert_eq!(plan(&r, "ny", &d), Err(PlanError::NoReplicas));
        let mut r = request();
        r.replicas[0].site = "ny".into();
        assert_eq!(
            plan(&r, "ny", &d),
            Err(PlanError::ReplicaIsHere("ny".into()))
        );
        let mut r = request();
        r.mode = Some("semi".into());
        assert_eq!(plan(&r, "ny", &d), Err(PlanError::Mode("semi".into())));
        let paused = Domain {
            state: DomainState::Paused,
            ..domain(PLAIN, &s)
        };
        assert!(matches!(
            plan(&request(), "ny", &paused),
            Err(PlanError::State { .. })
        ));
        let taken = Domain {
            protected_by: Some("g"),
            ..domain(PLAIN, &s)
        };
        assert!(matches!(
            plan(&request(), "ny", &taken),
            Err(PlanError::AlreadyProtected { .. })
        ));
        let odd = vec![("vda".into(), 1000), ("vdb".into(), 512)];
        assert!(matches!(
            plan(&request(), "ny", &domain(PLAIN, &odd)),
            Err(PlanError::Size { .. })
        ));
        let none = vec![("vda".into(), 512)];
        assert_eq!(
            plan(&request(), "ny", &domain(PLAIN, &none)),
            Err(PlanError::SizeUnknown("vdb".into()))
        );
    }

    #[test]
    fn running_and_persistent_disks_must_agree() {
        let s = sizes();
        let other = PLAIN.replace("/images/web01.qcow2", "/images/other.qcow2");
        let d = Domain {
            running: Some(&other),
            ..domain(PLAIN, &s)
        };
        assert!(matches!(
            plan(&request(), "ny", &d),
            Err(PlanError::Differs { .. })
        ));
    }
}
