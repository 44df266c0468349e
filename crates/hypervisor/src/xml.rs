//! libvirt domain XML, read and rewritten without I/O (docs/VMS.md, "XML
//! rewrite rules"): the domain's name, its disks, and a copy of the whole
//! document with some disks' sources replaced — everything else is kept
//! byte for byte, by splicing new text over the replaced elements' byte
//! ranges in the original (the document is parsed read-only).

use std::ops::Range;

/// Why a domain's XML could not be read or rewritten.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    #[error("not XML: {0}")]
    Parse(String),
    #[error("not a libvirt domain: the root element is <{0}>, not <domain>")]
    NotADomain(String),
    #[error("the domain has no <name>")]
    NoName,
    #[error("a disk has no <target dev=...>")]
    NoTarget,
    #[error("no disk {0} in the domain")]
    NoSuchDisk(String),
}

/// Where a disk's data lives.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum DiskSource {
    /// A file on this host (`type='file'`).
    File { path: String },
    /// A block device on this host (`type='block'`).
    Block { dev: String },
    /// An NBD export on a Unix socket (`type='network'`, `protocol='nbd'`).
    Nbd { export: String, socket: String },
    /// Anything else (another network protocol, a volume of a pool, no
    /// source: an empty CD-ROM).
    Other { kind: String },
}

/// One `<disk>` of a domain.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Disk {
    /// `<target dev=...>`: `vda`, `sda`...
    pub target: String,
    /// `<target bus=...>`: `virtio`, `sata`, `scsi`...
    pub bus: Option<String>,
    /// `device=...`: `disk`, `cdrom`, `floppy`, `lun`.
    pub device: String,
    /// `<driver type=...>`: `raw`, `qcow2`...
    pub format: Option<String>,
    pub source: DiskSource,
    pub readonly: bool,
}

impl Disk {
    /// Whether Tandem can protect this disk: a writable disk whose data is
    /// a file or block device on this host, or already a Tandem export.
    pub fn protectable(&self) -> bool {
        self.device == "disk"
            && !self.readonly
            && matches!(
                self.source,
                DiskSource::File { .. } | DiskSource::Block { .. } | DiskSource::Nbd { .. }
            )
    }
}

/// What a domain's XML says of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainXml {
    pub name: String,
    /// `<domain type=...>`: `kvm`, `qemu`.
    pub kind: Option<String>,
    pub disks: Vec<Disk>,
}

fn parse(xml: &str) -> Result<roxmltree::Document<'_>, XmlError> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| XmlError::Parse(e.to_string()))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" {
        return Err(XmlError::NotADomain(root.tag_name().name().to_owned()));
    }
    Ok(doc)
}

fn child<'a, 'i>(node: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    node.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
}

/// The `<disk>` elements under `<devices>`.
fn disk_nodes<'a, 'i>(doc: &'a roxmltree::Document<'i>) -> Vec<roxmltree::Node<'a, 'i>> {
    child(doc.root_element(), "devices")
        .map(|d| {
            d.children()
                .filter(|c| c.is_element() && c.tag_name().name() == "disk")
                .collect()
        })
        .unwrap_or_default()
}

fn disk_of(node: roxmltree::Node<'_, '_>) -> Result<Disk, XmlError> {
    let target = child(node, "target").ok_or(XmlError::NoTarget)?;
    let dev = target.attribute("dev").ok_or(XmlError::NoTarget)?;
    let kind = node.attribute("type").unwrap_or("file");
    let source = child(node, "source");
    let source = match (kind, source) {
        ("file", Some(s)) => s
            .attribute("file")
            .map(|p| DiskSource::File { path: p.into() }),
        ("block", Some(s)) => s
            .attribute("dev")
            .map(|d| DiskSource::Block { dev: d.into() }),
        ("network", Some(s)) if s.attribute("protocol") == Some("nbd") => {
            let host = child(s, "host");
            host.and_then(|h| {
                (h.attribute("transport") == Some("unix"))
                    .then(|| h.attribute("socket"))
                    .flatten()
            })
            .map(|socket| DiskSource::Nbd {
                export: s.attribute("name").unwrap_or_default().into(),
                socket: socket.into(),
            })
        }
        _ => None,
    }
    .unwrap_or_else(|| DiskSource::Other { kind: kind.into() });
    Ok(Disk {
        target: dev.into(),
        bus: target.attribute("bus").map(str::to_owned),
        device: node.attribute("device").unwrap_or("disk").into(),
        format: child(node, "driver")
            .and_then(|d| d.attribute("type"))
            .map(str::to_owned),
        source,
        readonly: child(node, "readonly").is_some(),
    })
}

/// Reads a domain's name, type and disks.
pub fn read(xml: &str) -> Result<DomainXml, XmlError> {
    let doc = parse(xml)?;
    let root = doc.root_element();
    let name = child(root, "name")
        .and_then(|n| n.text())
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .ok_or(XmlError::NoName)?
        .to_owned();
    let disks = disk_nodes(&doc)
        .into_iter()
        .map(disk_of)
        .collect::<Result<_, _>>()?;
    Ok(DomainXml {
        name,
        kind: root.attribute("type").map(str::to_owned),
        disks,
    })
}

/// Escapes text for an attribute value in single quotes.
fn attr(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// A `<disk>` element for `target` on an NBD Unix socket: raw, no host
/// cache (the agent is the disk and makes FLUSH durable itself).
pub fn nbd_disk(target: &str, bus: Option<&str>, export: &str, socket: &str) -> String {
    let bus = bus
        .map(|b| format!(" bus='{}'", attr(b)))
        .unwrap_or_default();
    format!(
        "<disk type='network' device='disk'><driver name='qemu' type='raw' cache='none'/>\
         <source protocol='nbd' name='{}'><host transport='unix' socket='{}'/></source>\
         <target dev='{}'{bus}/></disk>",
        attr(export),
        attr(socket),
        attr(target)
    )
}

/// A `<disk>` element for `target` on a raw file (unprotecting).
pub fn file_disk(target: &str, bus: Option<&str>, path: &str) -> String {
    let bus = bus
        .map(|b| format!(" bus='{}'", attr(b)))
        .unwrap_or_default();
    format!(
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='{}'/><target dev='{}'{bus}/></disk>",
        attr(path),
        attr(target)
    )
}

/// The document with the `<disk>` elements of the given targets replaced
/// by the given element text; everything else is kept as it was.
pub fn replace_disks(xml: &str, replacements: &[(String, String)]) -> Result<String, XmlError> {
    let doc = parse(xml)?;
    let mut spans: Vec<(Range<usize>, &str)> = Vec::new();
    for (target, element) in replacements {
        let node = disk_nodes(&doc)
            .into_iter()
            .find(|n| child(*n, "target").and_then(|t| t.attribute("dev")) == Some(target.as_str()))
            .ok_or_else(|| XmlError::NoSuchDisk(target.clone()))?;
        spans.push((node.range(), element.as_str()));
    }
    spans.sort_by_key(|(r, _)| r.start);
    let mut out = String::with_capacity(xml.len() + 256);
    let mut at = 0;
    for (range, element) in spans {
        out.push_str(&xml[at..range.start]);
        out.push_str(element);
        at = range.end;
    }
    out.push_str(&xml[at..]);
    Ok(out)
}

/// The document with each interface's network or bridge renamed by `map`
/// (`<source network=...>` / `<source bridge=...>`: a per-site
/// `network_map`); other interfaces are kept.
pub fn map_networks(xml: &str, map: &[(String, String)]) -> Result<String, XmlError> {
    let doc = parse(xml)?;
    let mut spans: Vec<(Range<usize>, String)> = Vec::new();
    let Some(devices) = child(doc.root_element(), "devices") else {
        return Ok(xml.to_owned());
    };
    for iface in devices
        .children()
        .filter(|c| c.is_element() && c.tag_name().name() == "interface")
    {
        let Some(source) = child(iface, "source") else {
            continue;
        };
        for attr_name in ["network", "bridge"] {
            let Some(old) = source.attribute(attr_name) else {
                continue;
            };
            let Some((_, new)) = map.iter().find(|(from, _)| from == old) else {
                continue;
            };
            // Rewrite the whole <source .../> start tag with the new name.
            let mut attrs = String::new();
            for a in source.attributes() {
                let value = if a.name() == attr_name {
                    new.as_str()
                } else {
                    a.value()
                };
                attrs.push_str(&format!(" {}='{}'", a.name(), attr(value)));
            }
            let range = source.range();
            let inner = &xml[range.clone()];
            let replacement = if inner.ends_with("/>") {
                format!("<source{attrs}/>")
            } else {
                // Keep the children of <source>: replace only the start tag.
                let end_of_start = inner.find('>').map_or(inner.len(), |i| i + 1);
                format!("<source{attrs}>{}", &inner[end_of_start..])
            };
            spans.push((range, replacement));
        }
    }
    spans.sort_by_key(|(r, _)| r.start);
    let mut out = String::with_capacity(xml.len());
    let mut at = 0;
    for (range, text) in spans {
        out.push_str(&xml[at..range.start]);
        out.push_str(&text);
        at = range.end;
    }
    out.push_str(&xml[at..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DOMAIN: &str = r#"<domain type='qemu'>
  <name>web01</name>
  <memory unit='KiB'>262144</memory>
  <os><type arch='x86_64'>hvm</type><kernel>/boot/vmlinuz</kernel></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web01.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg0/data'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <source network='default'/>
      <model type='virtio'/>
    </interface>
    <interface type='bridge'>
      <source bridge='br0'/>
    </interface>
  </devices>
</domain>"#;

    #[test]
    fn disks_are_read_with_their_sources() {
        let d = read(DOMAIN).unwrap();
        assert_eq!(d.name, "web01");
        assert_eq!(d.kind.as_deref(), Some("qemu"));
        assert_eq!(d.disks.len(), 3);
        assert_eq!(
            d.disks[0].source,
            DiskSource::File {
                path: "/var/lib/libvirt/images/web01.qcow2".into()
            }
        );
        assert_eq!(d.disks[0].format.as_deref(), Some("qcow2"));
        assert_eq!(
            d.disks[1].source,
            DiskSource::Block {
                dev: "/dev/vg0/data".into()
            }
        );
        assert!(d.disks[0].protectable() && d.disks[1].protectable());
        assert!(!d.disks[2].protectable(), "an empty read-only CD-ROM");
    }

    #[test]
    fn replacing_disks_keeps_everything_else_byte_for_byte() {
        let nbd = nbd_disk(
            "vda",
            Some("virtio"),
            "web01-vda",
            "/var/lib/tandem/nbd/web01-vda.sock",
        );
        let out = replace_disks(DOMAIN, &[("vda".into(), nbd)]).unwrap();
        let d = read(&out).unwrap();
        assert_eq!(
            d.disks[0].source,
            DiskSource::Nbd {
                export: "web01-vda".into(),
                socket: "/var/lib/tandem/nbd/web01-vda.sock".into()
            }
        );
        assert_eq!(d.disks[0].format.as_deref(), Some("raw"));
        assert_eq!(d.disks[1], read(DOMAIN).unwrap().disks[1]);
        let before = DOMAIN.split("<disk").next().unwrap();
        assert!(out.starts_with(before));
        assert!(out.ends_with(&DOMAIN[DOMAIN.find("    <disk type='block'").unwrap()..]));
        assert!(matches!(
            replace_disks(DOMAIN, &[("vdz".into(), String::new())]),
            Err(XmlError::NoSuchDisk(_))
        ));
    }

    #[test]
    fn networks_and_bridges_are_renamed_by_the_site_map() {
        let out = map_networks(
            DOMAIN,
            &[
                ("default".into(), "dr-net".into()),
                ("br0".into(), "br9".into()),
            ],
        )
        .unwrap();
        assert!(out.contains("<source network='dr-net'/>"));
        assert!(out.contains("<source bridge='br9'/>"));
        assert_eq!(read(&out).unwrap(), read(DOMAIN).unwrap());
    }

    #[test]
    fn attribute_values_are_escaped() {
        let e = nbd_disk("vda", None, "a'b", "/x&y<z>");
        let doc = format!("<domain><name>n</name><devices>{e}</devices></domain>");
        let d = read(&doc).unwrap();
        assert_eq!(
            d.disks[0].source,
            DiskSource::Nbd {
                export: "a'b".into(),
                socket: "/x&y<z>".into()
            }
        );
    }

    #[test]
    fn what_is_not_a_domain_is_refused_by_name() {
        assert!(matches!(read("<network/>"), Err(XmlError::NotADomain(_))));
        assert!(matches!(read("<domain/>"), Err(XmlError::NoName)));
        assert!(matches!(read("<domain"), Err(XmlError::Parse(_))));
        assert!(matches!(
            read("<domain><name>x</name><devices><disk/></devices></domain>"),
            Err(XmlError::NoTarget)
        ));
    }

    proptest! {
        /// Any input gets an answer, never a panic.
        #[test]
        fn arbitrary_text_never_panics(s in ".{0,400}") {
            let _ = read(&s);
            let _ = replace_disks(&s, &[("vda".into(), "<disk/>".into())]);
            let _ = map_networks(&s, &[("a".into(), "b".into())]);
        }

        /// Replacing a disk and replacing it back gives the same disks.
        #[test]
        fn a_replaced_disk_reads_back(export in "[a-z0-9'&<>\"-]{1,20}", socket in "/[a-z0-9/'&<> -]{1,40}") {
            let nbd = nbd_disk("vdb", Some("virtio"), &export, &socket);
            let out = replace_disks(DOMAIN, &[("vdb".into(), nbd)]).unwrap();
            let d = read(&out).unwrap();
            prop_assert_eq!(&d.disks[1].source, &DiskSource::Nbd { export: export.clone(), socket: socket.clone() });
            prop_assert_eq!(&d.disks[0], &read(DOMAIN).unwrap().disks[0]);
        }
    }
}
