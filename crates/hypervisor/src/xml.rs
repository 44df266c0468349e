//! libvirt domain XML, read and rewritten without I/O (docs/VMS.md, "XML
//! rewrite rules"): the domain's name and its disks, and the rewrites
//! Tandem makes of a definition — protected disks into Tandem's form
//! ([`protect`]) and back ([`unprotect`]), a definition made ready for
//! another site ([`for_site`]). Everything Tandem does not rewrite is kept
//! byte for byte: the document is parsed read-only (roxmltree) and new
//! text is spliced over the byte ranges of the replaced elements.
//!
//! # Tandem's disk form
//!
//! A protected disk is not a `<disk>` element: libvirt 9.0 cannot give an
//! NBD disk QEMU's `reconnect-delay`. It is given to QEMU by libvirt's
//! command-line passthrough, as a `-blockdev` node on the volume's NBD
//! socket and a `virtio-blk-pci` device reading it ([`crate::qemu`]):
//!
//! ```xml
//! <domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'> ...
//!   <qemu:commandline>
//!     <qemu:arg value='-blockdev'/>
//!     <qemu:arg value='{"driver":"raw","node-name":"tandem-vda","file":{"driver":"nbd",...,"reconnect-delay":30}}'/>
//!     <qemu:arg value='-device'/>
//!     <qemu:arg value='virtio-blk-pci,drive=tandem-vda,id=tandem-vda-dev'/>
//!   </qemu:commandline>
//! ```
//!
//! [`read`] reports such disks among the domain's disks with
//! [`Disk::tandem`] set.

use std::ops::Range;

use crate::qemu::{self, DeviceSettings, PciAddress};

/// libvirt's namespace for QEMU command-line passthrough.
pub const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

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
    #[error("disk {0} is named twice")]
    DuplicateTarget(String),
    #[error(transparent)]
    InvalidTarget(#[from] qemu::InvalidTarget),
    #[error(
        "disk {target} is on bus {}: Tandem protects only bus='virtio' disks in this version",
        bus.as_deref().unwrap_or("(none given)")
    )]
    UnsupportedBus { target: String, bus: Option<String> },
    #[error("disk {target} cannot be protected: {reason}")]
    NotProtectable {
        target: String,
        reason: &'static str,
    },
    #[error("disk {0} is already in Tandem's form")]
    AlreadyProtected(String),
    #[error("disk {0} is not in Tandem's form")]
    NotTandem(String),
    #[error(
        "the prefix 'qemu' is bound to {0:?}, not to {QEMU_NS}: declare that namespace \
         with some prefix on <domain>"
    )]
    QemuPrefixTaken(String),
    #[error("{what} {value:?} has characters XML cannot carry")]
    Unrepresentable { what: &'static str, value: String },
    #[error("the rewritten XML does not parse ({0}); this is a bug in Tandem")]
    Rewrite(String),
}

/// Where a disk's data lives.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum DiskSource {
    /// A file on this host (`type='file'`).
    File { path: String },
    /// A block device on this host (`type='block'`).
    Block { dev: String },
    /// An NBD export on a Unix socket (`type='network'`, `protocol='nbd'`,
    /// or a disk in Tandem's form).
    Nbd { export: String, socket: String },
    /// Anything else (another network protocol, a volume of a pool, no
    /// source: an empty CD-ROM).
    Other { kind: String },
}

/// One disk of a domain: a `<disk>` element, or a disk in Tandem's form.
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
    /// `<serial>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// `<boot order=...>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_order: Option<u32>,
    /// `<address type='pci' .../>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<PciAddress>,
    /// In Tandem's form (`<qemu:commandline>` arguments), not a `<disk>`
    /// element: libvirt does not know this disk (`virsh domblklist` and
    /// the like do not show it).
    #[serde(default)]
    pub tandem: bool,
}

impl Disk {
    /// Whether Tandem can protect this disk: a writable disk whose data is
    /// a file or block device on this host, or already a Tandem export.
    /// ([`protect`] also wants `bus='virtio'` in this version.)
    pub fn protectable(&self) -> bool {
        self.device == "disk"
            && !self.readonly
            && matches!(
                self.source,
                DiskSource::File { .. } | DiskSource::Block { .. } | DiskSource::Nbd { .. }
            )
    }

    /// The guest-visible settings a rewrite carries over.
    pub fn settings(&self) -> DeviceSettings {
        DeviceSettings {
            serial: self.serial.clone(),
            boot_order: self.boot_order,
            address: self.address,
        }
    }
}

/// What a domain's XML says of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainXml {
    pub name: String,
    /// `<domain type=...>`: `kvm`, `qemu`.
    pub kind: Option<String>,
    /// The `<disk>` elements in document order, then the disks in Tandem's
    /// form in command-line order.
    pub disks: Vec<Disk>,
}

/// A disk [`protect`] puts into Tandem's form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProtectedDisk {
    /// `<target dev=...>` of the `<disk>` to replace.
    pub target: String,
    /// The volume: the NBD export name.
    pub volume: String,
    /// The agent's Unix socket for the volume (`DATA_DIR/nbd/<volume>.sock`).
    pub socket: String,
}

type Doc<'i> = roxmltree::Document<'i>;
type Node<'a, 'i> = roxmltree::Node<'a, 'i>;

fn parse(xml: &str) -> Result<Doc<'_>, XmlError> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| XmlError::Parse(e.to_string()))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" {
        return Err(XmlError::NotADomain(root.tag_name().name().to_owned()));
    }
    Ok(doc)
}

fn child<'a, 'i>(node: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    node.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
}

/// The `<disk>` elements under `<devices>`.
fn disk_nodes<'a, 'i>(doc: &'a Doc<'i>) -> Vec<Node<'a, 'i>> {
    child(doc.root_element(), "devices")
        .map(|d| {
            d.children()
                .filter(|c| c.is_element() && c.tag_name().name() == "disk")
                .collect()
        })
        .unwrap_or_default()
}

fn disk_target<'a>(node: Node<'a, '_>) -> Option<&'a str> {
    child(node, "target").and_then(|t| t.attribute("dev"))
}

fn hex<T: TryFrom<u64>>(s: &str) -> Option<T> {
    let s = s.trim();
    let v = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok()?,
        None => s.parse().ok()?,
    };
    T::try_from(v).ok()
}

fn pci_address(node: Node<'_, '_>) -> Option<PciAddress> {
    let a = child(node, "address")?;
    if a.attribute("type") != Some("pci") {
        return None;
    }
    Some(PciAddress {
        domain: a.attribute("domain").map_or(Some(0), hex)?,
        bus: a.attribute("bus").map_or(Some(0), hex)?,
        slot: hex(a.attribute("slot")?)?,
        function: a.attribute("function").map_or(Some(0), hex)?,
    })
}

fn disk_of(node: Node<'_, '_>) -> Result<Disk, XmlError> {
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
        serial: child(node, "serial").map(|s| s.text().unwrap_or_default().to_owned()),
        boot_order: child(node, "boot")
            .and_then(|b| b.attribute("order"))
            .and_then(|o| o.trim().parse().ok()),
        address: pci_address(node),
        tandem: false,
    })
}

/// The `<commandline>` elements (in libvirt's QEMU namespace) of the root.
fn commandlines<'a, 'i>(doc: &'a Doc<'i>) -> Vec<Node<'a, 'i>> {
    doc.root_element()
        .children()
        .filter(|c| {
            c.is_element()
                && c.tag_name().name() == "commandline"
                && c.tag_name().namespace() == Some(QEMU_NS)
        })
        .collect()
}

/// A Tandem disk's arguments in a `<qemu:commandline>`.
struct TandemArgs<'a, 'i> {
    blockdev: qemu::NbdBlockdev,
    /// The `-blockdev` and JSON `<arg>` elements.
    blockdev_args: [Node<'a, 'i>; 2],
    /// Its `-device` (the first one reading its node), if any.
    device: Option<(qemu::DeviceArg, [Node<'a, 'i>; 2])>,
}

/// The Tandem disks of the document's `<qemu:commandline>`s: a
/// `-blockdev` argument whose JSON is a Tandem NBD node, with the
/// `-device` reading it.
fn tandem_args<'a, 'i>(doc: &'a Doc<'i>) -> Vec<TandemArgs<'a, 'i>> {
    let mut args: Vec<(Node<'a, 'i>, &'a str)> = Vec::new();
    for cl in commandlines(doc) {
        for a in cl.children().filter(|c| {
            c.is_element()
                && c.tag_name().name() == "arg"
                && c.tag_name().namespace() == Some(QEMU_NS)
        }) {
            args.push((a, a.attribute("value").unwrap_or_default()));
        }
    }
    let mut blockdevs = Vec::new();
    let mut devices: Vec<(qemu::DeviceArg, [Node<'a, 'i>; 2])> = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let next = args.get(i + 1);
        match (args[i].1, next) {
            ("-blockdev", Some(&(n, v))) => {
                if let Some(b) = qemu::parse_nbd_blockdev(v) {
                    if !blockdevs
                        .iter()
                        .any(|(o, _): &(qemu::NbdBlockdev, _)| o.target == b.target)
                    {
                        blockdevs.push((b, [args[i].0, n]));
                    }
                    i += 2;
                    continue;
                }
            }
            ("-device", Some(&(n, v))) => {
                if let Some(d) = qemu::parse_device_arg(v) {
                    devices.push((d, [args[i].0, n]));
                    i += 2;
                    continue;
                }
            }
            _ => {}
        }
        i += 1;
    }
    blockdevs
        .into_iter()
        .map(|(blockdev, blockdev_args)| {
            let device = devices
                .iter()
                .position(|(d, _)| d.target == blockdev.target)
                .map(|at| devices.remove(at));
            TandemArgs {
                blockdev,
                blockdev_args,
                device,
            }
        })
        .collect()
}

fn tandem_disk(t: &TandemArgs<'_, '_>) -> Disk {
    let settings = t
        .device
        .as_ref()
        .map(|(d, _)| d.settings.clone())
        .unwrap_or_default();
    Disk {
        target: t.blockdev.target.clone(),
        bus: Some("virtio".into()),
        device: "disk".into(),
        format: Some("raw".into()),
        source: DiskSource::Nbd {
            export: t.blockdev.volume.clone(),
            socket: t.blockdev.socket.clone(),
        },
        readonly: false,
        serial: settings.serial,
        boot_order: settings.boot_order,
        address: settings.address,
        tandem: true,
    }
}

/// Reads a domain's name, type and disks (the `<disk>` elements, then the
/// disks in Tandem's form).
pub fn read(xml: &str) -> Result<DomainXml, XmlError> {
    let doc = parse(xml)?;
    let root = doc.root_element();
    let name = child(root, "name")
        .and_then(|n| n.text())
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .ok_or(XmlError::NoName)?
        .to_owned();
    let mut disks = disk_nodes(&doc)
        .into_iter()
        .map(disk_of)
        .collect::<Result<Vec<_>, _>>()?;
    disks.extend(tandem_args(&doc).iter().map(tandem_disk));
    Ok(DomainXml {
        name,
        kind: root.attribute("type").map(str::to_owned),
        disks,
    })
}

/// The QEMU device id of disk `target` in a running domain's XML: the
/// `<alias name=...>` libvirt gives its `<disk>`, or `tandem-<target>-dev`
/// for a disk in Tandem's form. `None` when there is no such disk (or its
/// `<disk>` has no alias: the XML is not a running domain's).
pub fn device_id(xml: &str, target: &str) -> Result<Option<String>, XmlError> {
    let doc = parse(xml)?;
    if let Some(node) = disk_nodes(&doc)
        .into_iter()
        .find(|n| disk_target(*n) == Some(target))
    {
        return Ok(child(node, "alias")
            .and_then(|a| a.attribute("name"))
            .map(str::to_owned));
    }
    Ok(tandem_args(&doc)
        .into_iter()
        .find(|t| t.blockdev.target == target && t.device.is_some())
        .map(|_| format!("{}{target}-dev", qemu::PREFIX)))
}

/// Whether `c` may appear in an XML 1.0 document.
fn xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

fn representable(what: &'static str, value: &str) -> Result<(), XmlError> {
    if value.chars().all(xml_char) {
        Ok(())
    } else {
        Err(XmlError::Unrepresentable {
            what,
            value: value.to_owned(),
        })
    }
}

/// Escapes text for an attribute value in single quotes (tabs and line
/// ends as character references, which attribute normalisation keeps).
fn attr(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '\t' => out.push_str("&#9;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
    out
}

/// Escapes element text (`\r` as a reference: a parser turns a literal
/// one into `\n`).
fn text(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
    out
}

/// The `<serial>`, `<boot>` and `<address>` elements for `settings`.
fn settings_elements(settings: &DeviceSettings) -> String {
    let mut out = String::new();
    if let Some(serial) = &settings.serial {
        out.push_str(&format!("<serial>{}</serial>", text(serial)));
    }
    if let Some(order) = settings.boot_order {
        out.push_str(&format!("<boot order='{order}'/>"));
    }
    if let Some(a) = settings.address {
        out.push_str(&format!(
            "<address type='pci' domain='{:#06x}' bus='{:#04x}' slot='{:#04x}' function='{:#x}'/>",
            a.domain, a.bus, a.slot, a.function
        ));
    }
    out
}

/// A `<disk>` element for `target` on a raw file, with the guest-visible
/// `settings` (what [`unprotect`] puts back).
pub fn file_disk(target: &str, bus: Option<&str>, path: &str, settings: &DeviceSettings) -> String {
    let bus = bus
        .map(|b| format!(" bus='{}'", attr(b)))
        .unwrap_or_default();
    format!(
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='{}'/><target dev='{}'{bus}/>{}</disk>",
        attr(path),
        attr(target),
        settings_elements(settings)
    )
}

/// Applies `edits` (byte range → new text; ranges must not overlap) to
/// `xml`.
fn splice(xml: &str, mut edits: Vec<(Range<usize>, String)>) -> String {
    edits.sort_by_key(|(r, _)| (r.start, r.end));
    let mut out =
        String::with_capacity(xml.len() + edits.iter().map(|(_, t)| t.len()).sum::<usize>());
    let mut at = 0;
    for (range, new) in edits {
        // Overlaps cannot happen by construction; never slice backwards.
        let start = range.start.max(at);
        out.push_str(&xml[at..start]);
        out.push_str(&new);
        at = range.end.max(start);
    }
    out.push_str(&xml[at..]);
    out
}

/// A rewrite's result, checked to parse as a domain (a net under the
/// splicing, whose inputs are escaped and checked).
fn checked(out: String) -> Result<String, XmlError> {
    match parse(&out) {
        Ok(_) => Ok(out),
        Err(e) => Err(XmlError::Rewrite(e.to_string())),
    }
}

/// `range` widened to the element's own line: the indentation before it
/// and the line end before that, when nothing but a line end follows it.
fn whole_line(xml: &str, range: Range<usize>) -> Range<usize> {
    let bytes = xml.as_bytes();
    if !matches!(bytes.get(range.end), None | Some(b'\n' | b'\r')) {
        return range;
    }
    let mut start = range.start;
    while start > 0 && matches!(bytes[start - 1], b' ' | b'\t') {
        start -= 1;
    }
    if start > 0 && bytes[start - 1] == b'\n' {
        start -= 1;
        if start > 0 && bytes[start - 1] == b'\r' {
            start -= 1;
        }
        start..range.end
    } else {
        range
    }
}

/// The qualified name's prefix of an element, from its start tag (`None`
/// without one).
fn prefix_of<'i>(xml: &'i str, node: Node<'_, '_>) -> Option<&'i str> {
    let tag = &xml[node.range().start + 1..];
    let end = tag
        .find(|c: char| c.is_whitespace() || c == '>' || c == '/')
        .unwrap_or(tag.len());
    tag[..end].split_once(':').map(|(p, _)| p)
}

/// Where new children go inside `node`: after its last element child, or
/// after its start tag; `None` for an empty element (`<x/>`).
fn append_point(xml: &str, node: Node<'_, '_>) -> Option<usize> {
    if let Some(last) = node.children().rfind(|c| c.is_element()) {
        return Some(last.range().end);
    }
    let end = start_tag_end(xml, node)?;
    // `<x/>`: no content to append to.
    (xml.as_bytes().get(end) == Some(&b'>')).then_some(end + 1)
}

/// The `<P:arg value=.../>` elements of one Tandem disk, each on its own
/// line at `indent`.
fn arg_elements(prefix: Option<&str>, args: &[String], indent: &str) -> String {
    let tag = match prefix {
        Some(p) => format!("{p}:arg"),
        None => "arg".to_owned(),
    };
    args.iter()
        .map(|a| format!("\n{indent}<{tag} value='{}'/>", attr(a)))
        .collect()
}

/// Whether the machine is a q35 (its PCI root bus is `pcie.0`).
fn is_q35(doc: &Doc<'_>) -> bool {
    child(doc.root_element(), "os")
        .and_then(|os| child(os, "type"))
        .and_then(|t| t.attribute("machine"))
        .is_some_and(|m| m.contains("q35"))
}

/// Puts the disks `disks` into Tandem's form: each `<disk>` element (of a
/// writable `device='disk'`, `bus='virtio'` disk whose source is a file, a
/// block device or an NBD socket) is removed, and its `-blockdev` and
/// `-device` arguments (reconnect-delay `reconnect_delay_secs`; the disk's
/// `<serial>`, `<boot order>` and PCI `<address>` carried over) are added
/// to the domain's `<qemu:commandline>`, which is created when absent, as
/// is the `xmlns:qemu` declaration on `<domain>`. A prefix other than
/// `qemu` already bound to libvirt's QEMU namespace is used as it is.
/// Everything else is kept byte for byte.
pub fn protect(
    xml: &str,
    disks: &[ProtectedDisk],
    reconnect_delay_secs: u32,
) -> Result<String, XmlError> {
    let doc = parse(xml)?;
    let root = doc.root_element();
    let q35 = is_q35(&doc);
    let existing: Vec<String> = tandem_args(&doc)
        .into_iter()
        .map(|t| t.blockdev.target)
        .collect();
    let mut edits: Vec<(Range<usize>, String)> = Vec::new();
    let mut args: Vec<String> = Vec::new();
    for (i, pd) in disks.iter().enumerate() {
        if disks[..i].iter().any(|o| o.target == pd.target) {
            return Err(XmlError::DuplicateTarget(pd.target.clone()));
        }
        if existing.contains(&pd.target) {
            return Err(XmlError::AlreadyProtected(pd.target.clone()));
        }
        let node = disk_nodes(&doc)
            .into_iter()
            .find(|n| disk_target(*n) == Some(pd.target.as_str()))
            .ok_or_else(|| XmlError::NoSuchDisk(pd.target.clone()))?;
        let disk = disk_of(node)?;
        let refuse = |reason| XmlError::NotProtectable {
            target: pd.target.clone(),
            reason,
        };
        if disk.device != "disk" {
            return Err(refuse("it is not a device='disk' disk"));
        }
        if disk.readonly {
            return Err(refuse("it is read-only"));
        }
        if !disk.protectable() {
            return Err(refuse(
                "its source is not a file, a block device or an NBD Unix socket",
            ));
        }
        if disk.bus.as_deref() != Some("virtio") {
            return Err(XmlError::UnsupportedBus {
                target: pd.target.clone(),
                bus: disk.bus,
            });
        }
        representable("volume", &pd.volume)?;
        representable("socket", &pd.socket)?;
        representable("serial", disk.serial.as_deref().unwrap_or_default())?;
        args.push("-blockdev".into());
        args.push(qemu::nbd_blockdev(
            &pd.target,
            &pd.volume,
            &pd.socket,
            reconnect_delay_secs,
        )?);
        args.push("-device".into());
        args.push(qemu::device_arg(&pd.target, &disk.settings(), q35)?);
        edits.push((whole_line(xml, node.range()), String::new()));
    }
    if disks.is_empty() {
        return Ok(xml.to_owned());
    }
    match commandlines(&doc).first() {
        Some(cl) => {
            let prefix = prefix_of(xml, *cl);
            let new = arg_elements(prefix, &args, "    ");
            match append_point(xml, *cl) {
                Some(at) => edits.push((at..at, new)),
                None => {
                    // `<P:commandline .../>`: open it, keeping its attributes
                    // (a namespace declaration may be among them).
                    let tag =
                        prefix.map_or("commandline".to_owned(), |p| format!("{p}:commandline"));
                    let at = start_tag_end(xml, *cl).ok_or(XmlError::NoName)?;
                    edits.push((at..cl.range().end, format!(">{new}\n  </{tag}>")));
                }
            }
        }
        None => {
            let prefix = match root.lookup_prefix(QEMU_NS) {
                Some(p) => p.to_owned(),
                None => {
                    if let Some(other) = root.lookup_namespace_uri(Some("qemu")) {
                        return Err(XmlError::QemuPrefixTaken(other.to_owned()));
                    }
                    // Declare it on <domain>, after its attributes.
                    let at = start_tag_end(xml, root).ok_or(XmlError::NoName)?;
                    edits.push((at..at, format!(" xmlns:qemu='{QEMU_NS}'")));
                    "qemu".to_owned()
                }
            };
            let new = format!(
                "\n  <{prefix}:commandline>{}\n  </{prefix}:commandline>",
                arg_elements(Some(&prefix), &args, "    ")
            );
            let at = append_point(xml, root).ok_or(XmlError::NoName)?;
            edits.push((at..at, new));
        }
    }
    checked(splice(xml, edits))
}

/// Where the attributes of `node`'s start tag end: the position of its
/// closing `>` (or of the `/` of `/>`).
fn start_tag_end(xml: &str, node: Node<'_, '_>) -> Option<usize> {
    let r = node.range();
    let mut quote = None;
    for (i, c) in xml[r.clone()].char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '>') => {
                let at = r.start + i;
                return Some(if xml[..at].ends_with('/') { at - 1 } else { at });
            }
            _ => {}
        }
    }
    None
}

/// The definition made ready for another site: every disk in Tandem's form
/// gets the socket `socket_of(volume)` (that site's
/// `DATA_DIR/nbd/<volume>.sock`), and interfaces are renamed by that
/// site's `network_map` ([`map_networks`]). Nothing else changes.
pub fn for_site(
    xml: &str,
    socket_of: impl Fn(&str) -> String,
    network_map: &[(String, String)],
) -> Result<String, XmlError> {
    let doc = parse(xml)?;
    let mut edits = Vec::new();
    for t in tandem_args(&doc) {
        let socket = socket_of(&t.blockdev.volume);
        representable("socket", &socket)?;
        let json = qemu::nbd_blockdev(
            &t.blockdev.target,
            &t.blockdev.volume,
            &socket,
            t.blockdev.reconnect_delay_secs,
        )?;
        let node = t.blockdev_args[1];
        let Some(value) = node
            .attributes()
            .find(|a| a.name() == "value" && a.namespace().is_none())
        else {
            continue;
        };
        edits.push((value.range(), format!("value='{}'", attr(&json))));
    }
    let out = checked(splice(xml, edits))?;
    map_networks(&out, network_map)
}

/// A test copy of the VM (`tandem test start --boot`; docs/HISTORY.md,
/// "Test views"): the group's definition made into another domain that
/// can run beside the real VM without touching it. Every disk in Tandem's
/// form reads `socket_of(volume)` (the test view's socket); the domain is
/// named `name` and loses its `<uuid>` (libvirt makes a new one); every
/// `<interface>` goes (the network is detached); a file-backed serial
/// port or console writes to `<path>.<name>` instead of the VM's file; a
/// graphics console with a fixed port gets one of libvirt's choosing.
/// Everything else is kept byte for byte.
pub fn test_copy(
    xml: &str,
    name: &str,
    socket_of: impl Fn(&str) -> String,
) -> Result<String, XmlError> {
    representable("name", name)?;
    let on_view = for_site(xml, socket_of, &[])?;
    let doc = parse(&on_view)?;
    let root = doc.root_element();
    let mut edits: Vec<(Range<usize>, String)> = Vec::new();
    let name_node = child(root, "name").ok_or(XmlError::NoName)?;
    edits.push((name_node.range(), format!("<name>{}</name>", text(name))));
    if let Some(uuid) = child(root, "uuid") {
        edits.push((whole_line(&on_view, uuid.range()), String::new()));
    }
    if let Some(devices) = child(root, "devices") {
        for dev in devices.children().filter(|c| c.is_element()) {
            match dev.tag_name().name() {
                "interface" => edits.push((whole_line(&on_view, dev.range()), String::new())),
                "serial" | "console" | "parallel" | "channel"
                    if dev.attribute("type") == Some("file") =>
                {
                    if let Some(a) = child(dev, "source").and_then(|s| {
                        s.attributes()
                            .find(|a| a.name() == "path" && a.namespace().is_none())
                    }) {
                        let path = format!("{}.{name}", a.value());
                        edits.push((a.range(), format!("path='{}'", attr(&path))));
                    }
                }
                "graphics" => {
                    for a in dev.attributes().filter(|a| a.namespace().is_none()) {
                        match a.name() {
                            "port" | "tlsPort" | "websocket" if a.value() != "-1" => {
                                // With the space before it.
                                let start = on_view[..a.range().start]
                                    .trim_end_matches([' ', '\t', '\n'])
                                    .len();
                                edits.push((start..a.range().end, String::new()));
                            }
                            "autoport" if a.value() != "yes" => {
                                edits.push((a.range(), "autoport='yes'".into()));
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
    }
    checked(splice(&on_view, edits))
}

/// Puts the Tandem disks `disks` (target, raw file) back as `<disk>`
/// elements: their `<qemu:commandline>` arguments are removed (the whole
/// `<qemu:commandline>` when nothing else is left in it) and each gets
/// `<disk type='file' device='disk'><driver name='qemu' type='raw'/>
/// <source file=.../><target dev=... bus='virtio'/></disk>` with its
/// serial, boot order and PCI address, after the last `<disk>` of
/// `<devices>`.
pub fn unprotect(xml: &str, disks: &[(String, String)]) -> Result<String, XmlError> {
    let doc = parse(xml)?;
    let all = tandem_args(&doc);
    let mut removed: Vec<Node<'_, '_>> = Vec::new();
    let mut new_disks = String::new();
    for (i, (target, path)) in disks.iter().enumerate() {
        if disks[..i].iter().any(|(o, _)| o == target) {
            return Err(XmlError::DuplicateTarget(target.clone()));
        }
        let Some(t) = all.iter().find(|t| &t.blockdev.target == target) else {
            return Err(
                if disk_nodes(&doc)
                    .iter()
                    .any(|n| disk_target(*n) == Some(target))
                {
                    XmlError::NotTandem(target.clone())
                } else {
                    XmlError::NoSuchDisk(target.clone())
                },
            );
        };
        representable("file", path)?;
        removed.extend(t.blockdev_args);
        let mut settings = DeviceSettings::default();
        if let Some((d, nodes)) = &t.device {
            removed.extend(nodes);
            settings = d.settings.clone();
        }
        representable("serial", settings.serial.as_deref().unwrap_or_default())?;
        new_disks.push_str("\n    ");
        new_disks.push_str(&file_disk(target, Some("virtio"), path, &settings));
    }
    if disks.is_empty() {
        return Ok(xml.to_owned());
    }
    let mut edits: Vec<(Range<usize>, String)> = Vec::new();
    for cl in commandlines(&doc) {
        let children: Vec<_> = cl.children().filter(|c| c.is_element()).collect();
        let gone = children.iter().filter(|c| removed.contains(c)).count();
        if gone == 0 {
            continue;
        }
        if gone == children.len() {
            edits.push((whole_line(xml, cl.range()), String::new()));
        } else {
            for c in children.iter().filter(|c| removed.contains(c)) {
                edits.push((whole_line(xml, c.range()), String::new()));
            }
        }
    }
    let root = doc.root_element();
    match child(root, "devices") {
        Some(devices) => {
            // After the last <disk>, or <emulator>, where libvirt puts disks.
            let after = disk_nodes(&doc)
                .last()
                .copied()
                .or_else(|| child(devices, "emulator"))
                .map(|d| d.range().end);
            let at = match after {
                Some(at) => Some(at),
                None => start_tag_end(xml, devices)
                    .filter(|e| xml.as_bytes().get(*e) == Some(&b'>'))
                    .map(|e| e + 1),
            };
            match at {
                Some(at) => edits.push((at..at, new_disks)),
                None => edits.push((
                    devices.range(),
                    format!("<devices>{new_disks}\n  </devices>"),
                )),
            }
        }
        None => {
            let at = append_point(xml, root).ok_or(XmlError::NoName)?;
            edits.push((at..at, format!("\n  <devices>{new_disks}\n  </devices>")));
        }
    }
    checked(splice(xml, edits))
}

/// The document with the `<disk>` elements of the given targets replaced
/// by the given element text; everything else is kept as it was.
pub fn replace_disks(xml: &str, replacements: &[(String, String)]) -> Result<String, XmlError> {
    let doc = parse(xml)?;
    let mut spans: Vec<(Range<usize>, String)> = Vec::new();
    for (target, element) in replacements {
        let node = disk_nodes(&doc)
            .into_iter()
            .find(|n| disk_target(*n) == Some(target.as_str()))
            .ok_or_else(|| XmlError::NoSuchDisk(target.clone()))?;
        if spans.iter().any(|(r, _)| *r == node.range()) {
            return Err(XmlError::DuplicateTarget(target.clone()));
        }
        spans.push((node.range(), element.clone()));
    }
    Ok(splice(xml, spans))
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
    for (_, new) in map {
        representable("network", new)?;
    }
    for iface in devices
        .children()
        .filter(|c| c.is_element() && c.tag_name().name() == "interface")
    {
        let Some(source) = child(iface, "source") else {
            continue;
        };
        for a in source.attributes() {
            if !matches!(a.name(), "network" | "bridge") || a.namespace().is_some() {
                continue;
            }
            let Some((_, new)) = map.iter().find(|(from, _)| from == a.value()) else {
                continue;
            };
            spans.push((a.range(), format!("{}='{}'", a.name(), attr(new))));
        }
    }
    checked(splice(xml, spans))
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

    /// `virsh dumpxml --inactive` of a tandem-vmkit test guest (libvirt
    /// 9.0, qemu 7.2), with a serial and a boot order added to its disk.
    const VMKIT_GUEST: &str = r#"<domain type='qemu'>
  <name>tandem-test-4242-0-write</name>
  <uuid>50762ec6-adbf-4a93-bc4f-fce37ca3161d</uuid>
  <memory unit='KiB'>262144</memory>
  <currentMemory unit='KiB'>262144</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <kernel>/var/cache/tandem-guest/6.1.0-57-amd64_6.1.192-3_4c9404af9871/vmlinuz</kernel>
    <initrd>/var/cache/tandem-guest/6.1.0-57-amd64_6.1.192-3_4c9404af9871/initrd.img</initrd>
    <cmdline>console=ttyS0 panic=-1 loglevel=4 tandem.workload=write</cmdline>
  </os>
  <features>
    <acpi/>
  </features>
  <cpu mode='custom' match='exact' check='none'>
    <model fallback='forbid'>qemu64</model>
  </cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='/var/tmp/hvexp/data.img'/>
      <target dev='vda' bus='virtio'/>
      <serial>myserial</serial>
      <boot order='1'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>
    </disk>
    <controller type='usb' index='0' model='none'/>
    <controller type='pci' index='0' model='pci-root'/>
    <serial type='file'>
      <source path='/var/tmp/hvexp/console.log'/>
      <target type='isa-serial' port='0'>
        <model name='isa-serial'/>
      </target>
    </serial>
    <console type='file'>
      <source path='/var/tmp/hvexp/console.log'/>
      <target type='serial' port='0'/>
    </console>
    <input type='mouse' bus='ps2'/>
    <input type='keyboard' bus='ps2'/>
    <audio id='1' type='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"#;

    const SOCK: &str = "/var/lib/tandem/nbd/web01-data.sock";

    fn pd(target: &str, volume: &str, socket: &str) -> ProtectedDisk {
        ProtectedDisk {
            target: target.into(),
            volume: volume.into(),
            socket: socket.into(),
        }
    }

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
        assert!(d.disks.iter().all(|d| !d.tandem));
    }

    #[test]
    fn replacing_disks_keeps_everything_else_byte_for_byte() {
        let file = file_disk(
            "vda",
            Some("virtio"),
            "/new.img",
            &DeviceSettings::default(),
        );
        let out = replace_disks(DOMAIN, &[("vda".into(), file)]).unwrap();
        let d = read(&out).unwrap();
        assert_eq!(
            d.disks[0].source,
            DiskSource::File {
                path: "/new.img".into()
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
        assert_eq!(
            out.replace("dr-net", "default").replace("br9", "br0"),
            DOMAIN
        );
    }

    #[test]
    fn attribute_values_are_escaped() {
        let e = file_disk(
            "vda",
            None,
            "/x&y<z>'\"\t\n\r",
            &DeviceSettings {
                serial: Some("s&<>\r\n".into()),
                ..Default::default()
            },
        );
        let doc = format!("<domain><name>n</name><devices>{e}</devices></domain>");
        let d = read(&doc).unwrap();
        assert_eq!(
            d.disks[0].source,
            DiskSource::File {
                path: "/x&y<z>'\"\t\n\r".into()
            }
        );
        assert_eq!(d.disks[0].serial.as_deref(), Some("s&<>\r\n"));
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

    #[test]
    fn a_libvirt_guest_is_protected_in_the_decided_form() {
        let out = protect(VMKIT_GUEST, &[pd("vda", "web01-data", SOCK)], 30).unwrap();
        let expected = VMKIT_GUEST
            .replace(
                "<domain type='qemu'>",
                "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>",
            )
            .replace(
                &VMKIT_GUEST[VMKIT_GUEST.find("\n    <disk").unwrap()
                    ..VMKIT_GUEST.find("</disk>").unwrap() + "</disk>".len()],
                "",
            )
            .replace(
                "  </devices>\n</domain>",
                "  </devices>
  <qemu:commandline>
    <qemu:arg value='-blockdev'/>
    <qemu:arg value='{\"driver\":\"raw\",\"node-name\":\"tandem-vda\",\"file\":{\"driver\":\"nbd\",\"node-name\":\"tandem-vda-nbd\",\"server\":{\"type\":\"unix\",\"path\":\"/var/lib/tandem/nbd/web01-data.sock\"},\"export\":\"web01-data\",\"reconnect-delay\":30}}'/>
    <qemu:arg value='-device'/>
    <qemu:arg value='virtio-blk-pci,drive=tandem-vda,id=tandem-vda-dev,serial=myserial,bootindex=1,bus=pci.0,addr=0x2.0x0'/>
  </qemu:commandline>
</domain>",
            );
        assert_eq!(out, expected);
        let d = read(&out).unwrap();
        assert_eq!(
            d.disks,
            vec![Disk {
                target: "vda".into(),
                bus: Some("virtio".into()),
                device: "disk".into(),
                format: Some("raw".into()),
                source: DiskSource::Nbd {
                    export: "web01-data".into(),
                    socket: SOCK.into()
                },
                readonly: false,
                serial: Some("myserial".into()),
                boot_order: Some(1),
                address: Some(PciAddress {
                    domain: 0,
                    bus: 0,
                    slot: 2,
                    function: 0
                }),
                tandem: true,
            }]
        );
        // And back: the same disk element content, as a raw file.
        let back = unprotect(&out, &[("vda".into(), "/var/tmp/back.img".into())]).unwrap();
        assert!(!back.contains("commandline"), "{back}");
        let disk = &read(&back).unwrap().disks[0];
        assert_eq!(
            disk.source,
            DiskSource::File {
                path: "/var/tmp/back.img".into()
            }
        );
        assert_eq!(
            disk.settings(),
            read(VMKIT_GUEST).unwrap().disks[0].settings()
        );
        assert!(!disk.tandem);
        // Everything outside <devices> is as it was (but the namespace).
        let head = |x: &str| x[..x.find("<devices>").unwrap()].to_owned();
        assert_eq!(
            head(&back),
            head(VMKIT_GUEST).replace(
                "<domain type='qemu'>",
                "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
            )
        );
        let one_line = VMKIT_GUEST[VMKIT_GUEST.find("<disk").unwrap()
            ..VMKIT_GUEST.find("</disk>").unwrap() + "</disk>".len()]
            .replace("\n", "")
            .replace("  ", "")
            .replace(" cache='none'", "")
            .replace("/var/tmp/hvexp/data.img", "/var/tmp/back.img");
        let disk_text = &back[back.find("<disk").unwrap()..back.find("</disk>").unwrap() + 7];
        assert_eq!(disk_text, one_line);
        assert_eq!(
            back.replace(disk_text, "DISK"),
            VMKIT_GUEST
                .replace(
                    "<domain type='qemu'>",
                    "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
                )
                .replace(
                    &VMKIT_GUEST[VMKIT_GUEST.find("<disk").unwrap()
                        ..VMKIT_GUEST.find("</disk>").unwrap() + "</disk>".len()],
                    "DISK"
                )
        );
    }

    #[test]
    fn an_existing_commandline_and_other_prefixes_are_used() {
        // libvirt's own dump of a domain with other passthrough arguments.
        let base = VMKIT_GUEST
            .replace(
                "<domain type='qemu'>",
                "<domain type='qemu' xmlns:q='http://libvirt.org/schemas/domain/qemu/1.0'>",
            )
            .replace(
                "  </devices>\n",
                "  </devices>\n  <q:commandline>\n    <q:arg value='-trace'/>\n    <q:arg value='nbd_*'/>\n    <q:env name='A' value='b'/>\n  </q:commandline>\n",
            );
        let out = protect(&base, &[pd("vda", "v", "/s.sock")], 5).unwrap();
        assert!(!out.contains("xmlns:qemu"), "{out}");
        assert!(
            out.contains("<q:env name='A' value='b'/>\n    <q:arg value='-blockdev'/>"),
            "{out}"
        );
        assert!(out.contains("<q:arg value='nbd_*'/>"));
        assert!(read(&out).unwrap().disks[0].tandem);
        let back = unprotect(&out, &[("vda".into(), "/f".into())]).unwrap();
        assert!(back.contains("<q:commandline>\n    <q:arg value='-trace'/>\n    <q:arg value='nbd_*'/>\n    <q:env name='A' value='b'/>\n  </q:commandline>"), "{back}");
        assert!(!back.contains("tandem-vda"), "{back}");

        // Declared on <qemu:commandline> only, and empty.
        let base = VMKIT_GUEST.replace(
            "  </devices>\n",
            "  </devices>\n  <x:commandline xmlns:x='http://libvirt.org/schemas/domain/qemu/1.0'/>\n",
        );
        let out = protect(&base, &[pd("vda", "v", "/s.sock")], 5).unwrap();
        assert!(out.contains("<x:commandline xmlns:x='http://libvirt.org/schemas/domain/qemu/1.0'>\n    <x:arg value='-blockdev'/>"), "{out}");
        assert!(read(&out).unwrap().disks[0].tandem);

        // 'qemu' bound to something else.
        let base = VMKIT_GUEST.replace(
            "<domain type='qemu'>",
            "<domain type='qemu' xmlns:qemu='urn:other'>",
        );
        assert_eq!(
            protect(&base, &[pd("vda", "v", "/s.sock")], 5),
            Err(XmlError::QemuPrefixTaken("urn:other".into()))
        );
    }

    #[test]
    fn a_q35_machine_names_its_root_bus_pcie() {
        let base = VMKIT_GUEST
            .replace("machine='pc-i440fx-7.2'", "machine='pc-q35-7.2'")
            .replace("bus='0x00' slot='0x02'", "bus='0x03' slot='0x00'");
        let out = protect(&base, &[pd("vda", "v", "/s.sock")], 5).unwrap();
        assert!(out.contains(",bus=pci.3,addr=0x0.0x0'"), "{out}");
        let base = VMKIT_GUEST.replace("machine='pc-i440fx-7.2'", "machine='pc-q35-7.2'");
        let out = protect(&base, &[pd("vda", "v", "/s.sock")], 5).unwrap();
        assert!(out.contains(",bus=pcie.0,addr=0x2.0x0'"), "{out}");
        assert_eq!(
            read(&out).unwrap().disks[0].address,
            read(&base).unwrap().disks[0].address
        );
    }

    #[test]
    fn disks_tandem_cannot_protect_are_refused_by_name() {
        let sata = DOMAIN.replace(
            "<target dev='vdb' bus='virtio'/>",
            "<target dev='vdb' bus='sata'/>",
        );
        assert_eq!(
            protect(&sata, &[pd("vdb", "v", "/s")], 5),
            Err(XmlError::UnsupportedBus {
                target: "vdb".into(),
                bus: Some("sata".into())
            })
        );
        let e = protect(&sata, &[pd("vdb", "v", "/s")], 5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("vdb") && e.contains("sata"), "{e}");
        assert!(matches!(
            protect(DOMAIN, &[pd("sda", "v", "/s")], 5),
            Err(XmlError::NotProtectable { .. })
        ));
        assert_eq!(
            protect(DOMAIN, &[pd("vdz", "v", "/s")], 5),
            Err(XmlError::NoSuchDisk("vdz".into()))
        );
        assert_eq!(
            protect(DOMAIN, &[pd("vda", "v", "/s"), pd("vda", "w", "/t")], 5),
            Err(XmlError::DuplicateTarget("vda".into()))
        );
        let long = DOMAIN.replace("dev='vda'", "dev='vdaaaaaaaaaaaaaaaaaaaaaa'");
        assert!(matches!(
            protect(&long, &[pd("vdaaaaaaaaaaaaaaaaaaaaaa", "v", "/s")], 5),
            Err(XmlError::InvalidTarget(_))
        ));
        assert!(matches!(
            protect(DOMAIN, &[pd("vda", "v\u{1}", "/s")], 5),
            Err(XmlError::Unrepresentable { .. })
        ));
        let once = protect(DOMAIN, &[pd("vda", "v", "/s")], 5).unwrap();
        let twice = once.replace("</devices>", "<disk type='file' device='disk'><source file='/x'/><target dev='vda' bus='virtio'/></disk></devices>");
        assert_eq!(
            protect(&twice, &[pd("vda", "v", "/s")], 5),
            Err(XmlError::AlreadyProtected("vda".into()))
        );
        assert_eq!(
            unprotect(&once, &[("vdb".into(), "/f".into())]),
            Err(XmlError::NotTandem("vdb".into()))
        );
        assert_eq!(
            unprotect(&once, &[("vdq".into(), "/f".into())]),
            Err(XmlError::NoSuchDisk("vdq".into()))
        );
    }

    #[test]
    fn a_definition_for_another_site_differs_only_in_sockets_and_networks() {
        let out = protect(
            DOMAIN,
            &[
                pd("vda", "web01-root", "/a/nbd/web01-root.sock"),
                pd("vdb", "web01-data", "/a/nbd/web01-data.sock"),
            ],
            30,
        )
        .unwrap();
        let there = for_site(
            &out,
            |v| format!("/b/nbd/{v}.sock"),
            &[("default".into(), "dr-net".into())],
        )
        .unwrap();
        assert_eq!(
            there
                .replace("/b/nbd/", "/a/nbd/")
                .replace("dr-net", "default"),
            out
        );
        let d = read(&there).unwrap();
        let sockets: Vec<_> = d
            .disks
            .iter()
            .filter(|d| d.tandem)
            .map(|d| match &d.source {
                DiskSource::Nbd { socket, .. } => socket.as_str(),
                _ => "",
            })
            .collect();
        assert_eq!(
            sockets,
            ["/b/nbd/web01-root.sock", "/b/nbd/web01-data.sock"]
        );
    }

    #[test]
    fn the_running_device_of_a_disk_is_found() {
        let running = VMKIT_GUEST.replace(
            "<boot order='1'/>",
            "<boot order='1'/>\n      <alias name='virtio-disk0'/>",
        );
        assert_eq!(
            device_id(&running, "vda").unwrap().as_deref(),
            Some("virtio-disk0")
        );
        assert_eq!(device_id(VMKIT_GUEST, "vda").unwrap(), None);
        assert_eq!(device_id(&running, "vdb").unwrap(), None);
        let p = protect(VMKIT_GUEST, &[pd("vda", "v", "/s")], 5).unwrap();
        assert_eq!(
            device_id(&p, "vda").unwrap().as_deref(),
            Some("tandem-vda-dev")
        );
    }

    #[test]
    fn a_test_copy_reads_the_view_and_clashes_with_nothing() {
        let guest = VMKIT_GUEST.replace(
            "<memballoon model='none'/>",
            "<memballoon model='none'/>\n    <interface type='network'>\n      \
                 <source network='default'/>\n    </interface>\n    \
                 <graphics type='vnc' port='5901' autoport='no' listen='127.0.0.1'/>",
        );
        let p = protect(
            &guest,
            &[pd("vda", "web01-vda", "/a/nbd/web01-vda.sock")],
            30,
        )
        .unwrap();
        let copy = test_copy(&p, "web01-test-3", |v| format!("/a/nbd/test/web/{v}.sock")).unwrap();
        let d = read(&copy).unwrap();
        assert_eq!(d.name, "web01-test-3");
        assert_eq!(d.disks.len(), 1);
        assert_eq!(
            d.disks[0].source,
            DiskSource::Nbd {
                export: "web01-vda".into(),
                socket: "/a/nbd/test/web/web01-vda.sock".into()
            }
        );
        assert_eq!(d.disks[0].serial.as_deref(), Some("myserial"));
        for gone in [
            "<uuid>",
            "<interface",
            "port='5901'",
            "autoport='no'",
            "/a/nbd/web01-vda.sock",
        ] {
            assert!(!copy.contains(gone), "{gone} left in {copy}");
        }
        assert!(
            copy.contains("<graphics type='vnc' autoport='yes' listen='127.0.0.1'/>"),
            "{copy}"
        );
        assert_eq!(
            copy.matches("/var/tmp/hvexp/console.log.web01-test-3'")
                .count(),
            2,
            "{copy}"
        );
        // The rest is kept as it was.
        assert!(copy.contains(
            "<cmdline>console=ttyS0 panic=-1 loglevel=4 tandem.workload=write</cmdline>"
        ));
        assert_eq!(
            copy.lines().count() + 4,
            p.lines().count(),
            "uuid and the interface's 3 lines go: {copy}"
        );
        // The original's name nowhere but where it was part of a path.
        assert!(!copy.contains("<name>tandem-test-4242-0-write</name>"));
    }

    #[test]
    fn a_test_copy_needs_a_name_xml_can_carry() {
        let p = protect(VMKIT_GUEST, &[pd("vda", "v", "/s")], 30).unwrap();
        assert!(matches!(
            test_copy(&p, "bad\u{1}", |v| v.to_owned()),
            Err(XmlError::Unrepresentable { .. })
        ));
        assert!(matches!(
            test_copy("<domain><devices/></domain>", "x", |v| v.to_owned()),
            Err(XmlError::NoName)
        ));
        // A name with XML's special characters is escaped.
        let copy = test_copy(&p, "a&b", |v| v.to_owned()).unwrap();
        assert_eq!(read(&copy).unwrap().name, "a&b");
    }

    /// A disk of a generated domain.
    #[derive(Debug, Clone)]
    struct GenDisk {
        bus: &'static str,
        kind: u8,
        path: String,
        serial: Option<String>,
        boot: Option<u32>,
        address: Option<(u8, u8, u8)>,
        protect: bool,
        socket: String,
    }

    fn gen_disk() -> impl Strategy<Value = GenDisk> {
        (
            prop_oneof![4 => Just("virtio"), 1 => Just("sata")],
            0u8..3,
            "/[a-z0-9 '&<>\"./-]{1,30}",
            proptest::option::of("[A-Za-z0-9 _.,=&<>'\"+\r\n\t-]{0,20}"),
            proptest::option::of(1u32..20),
            proptest::option::of((0u8..4, 1u8..32, 0u8..8)),
            any::<bool>(),
            "/[a-zA-Z0-9 '&<>\"\\\\,./=-]{1,40}",
        )
            .prop_map(
                |(bus, kind, path, serial, boot, address, protect, socket)| GenDisk {
                    bus,
                    kind,
                    path,
                    serial,
                    boot,
                    address,
                    protect,
                    socket,
                },
            )
    }

    /// How the generated domain declares libvirt's QEMU namespace.
    fn gen_domain() -> impl Strategy<Value = (String, Vec<GenDisk>, u8, bool)> {
        (proptest::collection::vec(gen_disk(), 1..5), 0u8..5, any::<bool>()).prop_map(
            |(disks, ns, q35)| {
                let mut x = String::new();
                let root_ns = match ns {
                    1 | 4 => format!(" xmlns:qemu='{QEMU_NS}'"),
                    2 => format!(" xmlns:q='{QEMU_NS}'"),
                    _ => String::new(),
                };
                x.push_str(&format!("<domain type='qemu'{root_ns}>\n  <name>gen</name>\n"));
                let machine = if q35 { "pc-q35-7.2" } else { "pc-i440fx-7.2" };
                x.push_str(&format!("  <os><type arch='x86_64' machine='{machine}'>hvm</type></os>\n  <devices>\n"));
                for (i, d) in disks.iter().enumerate() {
                    let target = format!("vd{}", char::from(b'a' + u8::try_from(i).unwrap()));
                    let (kind, source) = match d.kind {
                        0 => ("file", format!("<source file='{}'/>", attr(&d.path))),
                        1 => ("block", format!("<source dev='{}'/>", attr(&d.path))),
                        _ => (
                            "network",
                            format!(
                                "<source protocol='nbd' name='e{i}'><host transport='unix' socket='{}'/></source>",
                                attr(&d.path)
                            ),
                        ),
                    };
                    let settings = DeviceSettings {
                        serial: d.serial.clone(),
                        boot_order: d.boot,
                        address: d.address.map(|(bus, slot, function)| PciAddress {
                            domain: 0,
                            bus,
                            slot,
                            function,
                        }),
                    };
                    x.push_str(&format!(
                        "    <disk type='{kind}' device='disk'>\n      <driver name='qemu' type='raw'/>\n      {source}\n      <target dev='{target}' bus='{}'/>\n      {}\n    </disk>\n",
                        d.bus,
                        settings_elements(&settings)
                    ));
                }
                x.push_str("    <interface type='network'><source network='default'/></interface>\n  </devices>\n");
                match ns {
                    1 => x.push_str("  <qemu:commandline>\n    <qemu:arg value='-S'/>\n  </qemu:commandline>\n"),
                    3 => x.push_str(&format!("  <z:commandline xmlns:z='{QEMU_NS}'>\n    <z:arg value='-S'/>\n  </z:commandline>\n")),
                    _ => {}
                }
                x.push_str("</domain>\n");
                (x, disks, ns, q35)
            },
        )
    }

    fn targets(disks: &[GenDisk]) -> Vec<(String, &GenDisk)> {
        disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                (
                    format!("vd{}", char::from(b'a' + u8::try_from(i).unwrap())),
                    d,
                )
            })
            .collect()
    }

    proptest! {
        /// Any input gets an answer, never a panic.
        #[test]
        fn arbitrary_text_never_panics(
            s in ".{0,400}",
            target in ".{0,20}",
            value in ".{0,40}",
        ) {
            let _ = read(&s);
            let _ = device_id(&s, &target);
            let _ = replace_disks(&s, &[(target.clone(), "<disk/>".into())]);
            let _ = map_networks(&s, &[("a".into(), value.clone())]);
            let _ = protect(&s, &[pd(&target, &value, &value)], 5);
            let _ = unprotect(&s, &[(target.clone(), value.clone())]);
            let _ = for_site(&s, |v| format!("{v}{value}"), &[]);
        }

        /// A valid protected document with a span replaced by junk gets an
        /// answer, never a panic; what the rewrites return parses.
        #[test]
        fn damaged_documents_never_panic(
            (xml, _disks, _ns, _q35) in gen_domain(),
            at in 0.0f64..1.0,
            len in 0usize..40,
            junk in ".{0,20}",
            value in ".{0,20}",
        ) {
            let all = ["vda", "vdb", "vdc", "vdd"].map(|t| pd(t, "v", "/s"));
            let base = protect(&xml, &all[..1], 5).unwrap_or(xml);
            let bytes: Vec<char> = base.chars().collect();
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
            let start = ((bytes.len() as f64) * at) as usize;
            let end = (start + len).min(bytes.len());
            let damaged: String = bytes[..start].iter().chain(junk.chars().collect::<Vec<_>>().iter()).chain(bytes[end..].iter()).collect();
            for out in [
                protect(&damaged, &all[1..2], 5),
                unprotect(&damaged, &[("vda".into(), value.clone())]),
                for_site(&damaged, |v| format!("/x/{v}{value}"), &[("default".into(), value.clone())]),
            ].into_iter().flatten() {
                prop_assert!(parse(&out).is_ok(), "{}", out);
            }
            let _ = read(&damaged);
        }

        /// protect: the chosen disks read back in Tandem's form with their
        /// serial, boot order and address; the other disks are unchanged;
        /// unprotect gives back equivalent `<disk>`s; for_site changes only
        /// sockets.
        #[test]
        fn protect_unprotect_and_for_site_keep_what_they_must(
            (xml, disks, ns, _q35) in gen_domain(),
            delay in 0u32..100,
        ) {
            let before = read(&xml).unwrap();
            let chosen: Vec<ProtectedDisk> = targets(&disks)
                .into_iter()
                .filter(|(_, d)| d.protect)
                .map(|(t, d)| pd(&t, &format!("vol-{t}"), &d.socket))
                .collect();
            let out = protect(&xml, &chosen, delay);
            if let Some((t, d)) = targets(&disks).into_iter().find(|(_, d)| d.protect && d.bus != "virtio") {
                prop_assert_eq!(out, Err(XmlError::UnsupportedBus { target: t, bus: Some(d.bus.into()) }));
                return Ok(());
            }
            let out = out.unwrap();
            let after = read(&out).unwrap();
            prop_assert_eq!(after.disks.len(), before.disks.len());
            for old in &before.disks {
                match chosen.iter().find(|c| c.target == old.target) {
                    None => prop_assert_eq!(after.disks.iter().find(|d| d.target == old.target), Some(old)),
                    Some(c) => {
                        let new = after.disks.iter().find(|d| d.target == old.target && d.tandem).unwrap();
                        prop_assert_eq!(&new.source, &DiskSource::Nbd { export: c.volume.clone(), socket: c.socket.clone() });
                        prop_assert_eq!(new.settings(), old.settings());
                        prop_assert_eq!(new.bus.as_deref(), Some("virtio"));
                    }
                }
            }

            // for_site: the same document with the same sockets; only the
            // sockets differ with others.
            let same = for_site(&out, |v| chosen.iter().find(|c| c.volume == v).unwrap().socket.clone(), &[]).unwrap();
            prop_assert_eq!(&same, &out);
            let there = for_site(&out, |v| format!("/site-b/nbd/{v}.sock"), &[("default".into(), "dr".into())]).unwrap();
            let there_disks = read(&there).unwrap().disks;
            for (a, b) in after.disks.iter().zip(&there_disks) {
                let mut a = a.clone();
                if let (true, DiskSource::Nbd { export, socket }) = (a.tandem, &mut a.source) {
                    *socket = format!("/site-b/nbd/{export}.sock");
                }
                prop_assert_eq!(&a, b);
            }
            prop_assert!(there.contains("<source network='dr'/>"));

            // unprotect: equivalent <disk>s on the given files.
            let back: Vec<(String, String)> = chosen.iter().map(|c| (c.target.clone(), format!("/back/{}.img", c.target))).collect();
            let restored = unprotect(&out, &back).unwrap();
            let r = read(&restored).unwrap();
            prop_assert!(r.disks.iter().all(|d| !d.tandem));
            prop_assert_eq!(r.disks.len(), before.disks.len());
            for old in &before.disks {
                let new = r.disks.iter().find(|d| d.target == old.target).unwrap();
                if chosen.iter().any(|c| c.target == old.target) {
                    prop_assert_eq!(&new.source, &DiskSource::File { path: format!("/back/{}.img", old.target) });
                    prop_assert_eq!(new.settings(), old.settings());
                    prop_assert_eq!(new.bus.as_deref(), Some("virtio"));
                    prop_assert_eq!(new.device.as_str(), "disk");
                } else {
                    prop_assert_eq!(new, old);
                }
            }
            // Other passthrough arguments stay; an emptied commandline goes.
            let other_args = matches!(ns, 1 | 3);
            prop_assert_eq!(restored.contains("value='-S'"), other_args);
            prop_assert_eq!(restored.contains("commandline"), other_args);
        }
    }
}
