//! The QEMU side of a Tandem disk (docs/VMS.md, "Tandem's disk form"):
//! the `-blockdev` node JSON and the `-device` argument of a protected
//! disk, shared by the persistent definition (`<qemu:commandline>`, see
//! [`crate::xml::protect`]) and the live move over QMP
//! ([`crate::Hypervisor::move_disk`]), and their parsing back.
//!
//! Names, for a disk whose target is `vda`:
//!
//! | what | name |
//! |---|---|
//! | raw format node on the NBD export | `tandem-vda` |
//! | its NBD protocol node | `tandem-vda-nbd` |
//! | raw format node on a local file (moving back) | `tandem-vda-local` |
//! | its file protocol node | `tandem-vda-file` |
//! | the `virtio-blk-pci` device | `tandem-vda-dev` |
//! | the mirror job | `tandem-move-vda` |
//!
//! QEMU node names are at most 31 bytes of letters, digits, `-`, `.` and
//! `_`, starting with a letter; [`names`] checks that every name a target
//! makes is one (so a target is at most [`TARGET_MAX`] bytes).

use serde_json::Value;

/// What every node, device and job name Tandem gives QEMU starts with.
pub const PREFIX: &str = "tandem-";
/// The longest node name QEMU accepts.
pub const NODE_NAME_MAX: usize = 31;
/// The longest disk target whose names all fit ([`NODE_NAME_MAX`] minus
/// `tandem-` and `-local`).
pub const TARGET_MAX: usize = NODE_NAME_MAX - PREFIX.len() - "-local".len();

/// A disk target that cannot name QEMU nodes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("disk target {target:?} cannot name QEMU nodes: {reason}")]
pub struct InvalidTarget {
    pub target: String,
    pub reason: &'static str,
}

/// The QEMU names of one disk's nodes, device and job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// `tandem-<target>`: the raw node on the NBD export.
    pub nbd_format: String,
    /// `tandem-<target>-nbd`.
    pub nbd_protocol: String,
    /// `tandem-<target>-local`: the raw node on a local file.
    pub file_format: String,
    /// `tandem-<target>-file`.
    pub file_protocol: String,
    /// `tandem-<target>-dev`: the `virtio-blk-pci` device of a disk in
    /// Tandem's form.
    pub device: String,
    /// `tandem-move-<target>`: the mirror job of a live move.
    pub job: String,
}

/// The names for `target`, checked against QEMU's rules.
pub fn names(target: &str) -> Result<Names, InvalidTarget> {
    let bad = |reason| InvalidTarget {
        target: target.to_owned(),
        reason,
    };
    if target.is_empty() {
        return Err(bad("it is empty"));
    }
    if target.len() > TARGET_MAX {
        return Err(bad(
            "it is longer than 18 bytes (QEMU node names are at most 31)",
        ));
    }
    if !target
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    {
        return Err(bad("only letters, digits, '-', '.' and '_' are allowed"));
    }
    Ok(Names {
        nbd_format: format!("{PREFIX}{target}"),
        nbd_protocol: format!("{PREFIX}{target}-nbd"),
        file_format: format!("{PREFIX}{target}-local"),
        file_protocol: format!("{PREFIX}{target}-file"),
        device: format!("{PREFIX}{target}-dev"),
        job: format!("{PREFIX}move-{target}"),
    })
}

/// A JSON string literal.
fn js(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

/// The `-blockdev` JSON of a Tandem disk: a raw node `tandem-<target>` on
/// an NBD node `tandem-<target>-nbd` reaching export `volume` on the Unix
/// socket `socket`, with `reconnect-delay` (seconds during which QEMU
/// holds the guest's requests while it reconnects, so an agent restart
/// causes no I/O error). The same text is the `blockdev-add` argument of
/// the live move.
pub fn nbd_blockdev(
    target: &str,
    volume: &str,
    socket: &str,
    reconnect_delay_secs: u32,
) -> Result<String, InvalidTarget> {
    let n = names(target)?;
    // Written by hand (not through a serde_json map, which sorts keys) so
    // the text reads in the documented order.
    Ok(format!(
        "{{\"driver\":\"raw\",\"node-name\":{},\"file\":{{\"driver\":\"nbd\",\"node-name\":{},\
         \"server\":{{\"type\":\"unix\",\"path\":{}}},\"export\":{},\"reconnect-delay\":{}}}}}",
        js(&n.nbd_format),
        js(&n.nbd_protocol),
        js(socket),
        js(volume),
        reconnect_delay_secs
    ))
}

/// The `blockdev-add` JSON of a raw node `tandem-<target>-local` on the
/// local file `path` (moving a disk back off Tandem).
pub fn file_blockdev(target: &str, path: &str) -> Result<String, InvalidTarget> {
    let n = names(target)?;
    Ok(format!(
        "{{\"driver\":\"raw\",\"node-name\":{},\"file\":{{\"driver\":\"file\",\"node-name\":{},\
         \"filename\":{}}}}}",
        js(&n.file_format),
        js(&n.file_protocol),
        js(path)
    ))
}

/// A PCI address as libvirt writes it (`<address type='pci' .../>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct PciAddress {
    pub domain: u16,
    pub bus: u8,
    pub slot: u8,
    pub function: u8,
}

/// The guest-visible settings of a Tandem disk's `-device` argument.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DeviceSettings {
    /// `<serial>` → `serial=`.
    pub serial: Option<String>,
    /// `<boot order='N'/>` → `bootindex=N`.
    pub boot_order: Option<u32>,
    /// `<address type='pci'>` → `bus=`, `addr=`, so the guest finds the
    /// disk in the same PCI slot (and in the same order among its disks)
    /// as before. Only PCI domain 0.
    pub address: Option<PciAddress>,
}

/// QEMU's bus id for PCI bus `bus` as libvirt names it: the root bus is
/// `pci.0` (`pcie.0` on a q35 machine), other buses are the controllers
/// `pci.<index>`.
fn bus_id(bus: u8, q35: bool) -> String {
    if bus == 0 && q35 {
        "pcie.0".to_owned()
    } else {
        format!("pci.{bus}")
    }
}

/// Escapes a value of a QEMU `key=value,...` option string (`,` → `,,`).
fn opt(value: &str) -> String {
    value.replace(',', ",,")
}

/// The `-device` argument of a Tandem disk:
/// `virtio-blk-pci,drive=tandem-<target>,id=tandem-<target>-dev` with
/// `serial=`, `bootindex=`, `bus=` and `addr=` when `settings` has them.
/// `q35`: the machine is a q35 (its root bus is `pcie.0`).
pub fn device_arg(
    target: &str,
    settings: &DeviceSettings,
    q35: bool,
) -> Result<String, InvalidTarget> {
    let n = names(target)?;
    let mut out = format!("virtio-blk-pci,drive={},id={}", n.nbd_format, n.device);
    if let Some(serial) = &settings.serial {
        out.push_str(&format!(",serial={}", opt(serial)));
    }
    if let Some(order) = settings.boot_order {
        out.push_str(&format!(",bootindex={order}"));
    }
    if let Some(a) = settings.address.filter(|a| a.domain == 0) {
        out.push_str(&format!(
            ",bus={},addr={:#x}.{:#x}",
            bus_id(a.bus, q35),
            a.slot,
            a.function
        ));
    }
    Ok(out)
}

/// A Tandem disk's `-blockdev`, read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdBlockdev {
    pub target: String,
    pub volume: String,
    pub socket: String,
    pub reconnect_delay_secs: u32,
}

/// Reads a `-blockdev` argument if it is a Tandem disk's: a raw node
/// `tandem-<target>` (a valid target) on an NBD node on a Unix socket.
pub fn parse_nbd_blockdev(arg: &str) -> Option<NbdBlockdev> {
    let v: Value = serde_json::from_str(arg).ok()?;
    let node = v.get("node-name")?.as_str()?;
    let target = node.strip_prefix(PREFIX)?;
    let n = names(target).ok()?;
    if v.get("driver")?.as_str()? != "raw" {
        return None;
    }
    let file = v.get("file")?;
    if file.get("driver")?.as_str()? != "nbd" {
        return None;
    }
    if file.get("node-name").and_then(Value::as_str) != Some(n.nbd_protocol.as_str()) {
        return None;
    }
    let server = file.get("server")?;
    if server.get("type")?.as_str()? != "unix" {
        return None;
    }
    Some(NbdBlockdev {
        target: target.to_owned(),
        volume: file.get("export")?.as_str()?.to_owned(),
        socket: server.get("path")?.as_str()?.to_owned(),
        reconnect_delay_secs: file
            .get("reconnect-delay")
            .and_then(Value::as_u64)
            .and_then(|d| u32::try_from(d).ok())
            .unwrap_or(0),
    })
}

/// A Tandem disk's `-device`, read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceArg {
    /// The target whose `tandem-<target>` node the device reads.
    pub target: String,
    pub settings: DeviceSettings,
}

/// Splits a QEMU option string at single commas (`,,` is a comma).
pub fn split_opts(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

fn parse_hex_u8(s: &str) -> Option<u8> {
    let digits = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X"))?;
    u8::from_str_radix(digits, 16).ok()
}

/// Reads a `-device` argument if it is a Tandem disk's:
/// `virtio-blk-pci,drive=tandem-<target>,...`.
pub fn parse_device_arg(arg: &str) -> Option<DeviceArg> {
    let parts = split_opts(arg);
    let (driver, props) = parts.split_first()?;
    if driver != "virtio-blk-pci" {
        return None;
    }
    let mut target = None;
    let mut settings = DeviceSettings::default();
    let (mut bus, mut addr) = (None, None);
    for p in props {
        let (k, v) = p.split_once('=')?;
        match k {
            "drive" => {
                let t = v.strip_prefix(PREFIX)?;
                names(t).ok()?;
                target = Some(t.to_owned());
            }
            "serial" => settings.serial = Some(v.to_owned()),
            "bootindex" => settings.boot_order = Some(v.parse().ok()?),
            "bus" => {
                let n = if v == "pcie.0" {
                    0
                } else {
                    v.strip_prefix("pci.")?.parse().ok()?
                };
                bus = Some(n);
            }
            "addr" => {
                let (s, f) = v.split_once('.').unwrap_or((v, "0x0"));
                addr = Some((parse_hex_u8(s)?, parse_hex_u8(f)?));
            }
            _ => {}
        }
    }
    if let (Some(bus), Some((slot, function))) = (bus, addr) {
        settings.address = Some(PciAddress {
            domain: 0,
            bus,
            slot,
            function,
        });
    }
    Some(DeviceArg {
        target: target?,
        settings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_target() {
        let n = names("vda").unwrap();
        assert_eq!(n.nbd_format, "tandem-vda");
        assert_eq!(n.nbd_protocol, "tandem-vda-nbd");
        assert_eq!(n.file_format, "tandem-vda-local");
        assert_eq!(n.file_protocol, "tandem-vda-file");
        assert_eq!(n.device, "tandem-vda-dev");
        assert_eq!(n.job, "tandem-move-vda");
        let longest = "a".repeat(TARGET_MAX);
        let n = names(&longest).unwrap();
        assert_eq!(n.file_format.len(), NODE_NAME_MAX);
        assert!(names(&format!("{longest}b")).is_err());
        assert!(names("").is_err());
        assert!(names("vd a").is_err());
        assert!(names("vd\"a").is_err());
    }

    #[test]
    fn the_blockdev_is_the_documented_json() {
        let b = nbd_blockdev(
            "vda",
            "web01-root",
            "/var/lib/tandem/nbd/web01-root.sock",
            30,
        )
        .unwrap();
        assert_eq!(
            b,
            r#"{"driver":"raw","node-name":"tandem-vda","file":{"driver":"nbd","node-name":"tandem-vda-nbd","server":{"type":"unix","path":"/var/lib/tandem/nbd/web01-root.sock"},"export":"web01-root","reconnect-delay":30}}"#
        );
        let back = parse_nbd_blockdev(&b).unwrap();
        assert_eq!(
            back,
            NbdBlockdev {
                target: "vda".into(),
                volume: "web01-root".into(),
                socket: "/var/lib/tandem/nbd/web01-root.sock".into(),
                reconnect_delay_secs: 30
            }
        );
        // Quotes and backslashes are JSON-escaped.
        let b = nbd_blockdev("vdb", "a\"b", "/x\\y\n", 5).unwrap();
        let back = parse_nbd_blockdev(&b).unwrap();
        assert_eq!(
            (back.volume.as_str(), back.socket.as_str()),
            ("a\"b", "/x\\y\n")
        );
        let f = file_blockdev("vda", "/var/lib/libvirt/images/a.img").unwrap();
        let v: Value = serde_json::from_str(&f).unwrap();
        assert_eq!(v["node-name"], "tandem-vda-local");
        assert_eq!(v["file"]["filename"], "/var/lib/libvirt/images/a.img");
        // Not Tandem's.
        assert!(parse_nbd_blockdev(&f).is_none());
        assert!(parse_nbd_blockdev(r#"{"driver":"raw","node-name":"other"}"#).is_none());
        assert!(parse_nbd_blockdev("not json").is_none());
    }

    #[test]
    fn the_device_carries_serial_boot_order_and_address() {
        let s = DeviceSettings {
            serial: Some("ab,c".into()),
            boot_order: Some(2),
            address: Some(PciAddress {
                domain: 0,
                bus: 0,
                slot: 4,
                function: 0,
            }),
        };
        let d = device_arg("vda", &s, false).unwrap();
        assert_eq!(
            d,
            "virtio-blk-pci,drive=tandem-vda,id=tandem-vda-dev,serial=ab,,c,bootindex=2,bus=pci.0,addr=0x4.0x0"
        );
        assert_eq!(
            parse_device_arg(&d).unwrap(),
            DeviceArg {
                target: "vda".into(),
                settings: s.clone()
            }
        );
        let q = device_arg("vda", &s, true).unwrap();
        assert!(q.contains(",bus=pcie.0,"), "{q}");
        assert_eq!(parse_device_arg(&q).unwrap().settings, s);
        let plain = device_arg("vdb", &DeviceSettings::default(), false).unwrap();
        assert_eq!(plain, "virtio-blk-pci,drive=tandem-vdb,id=tandem-vdb-dev");
        assert_eq!(
            parse_device_arg(&plain).unwrap().settings,
            DeviceSettings::default()
        );
        assert!(parse_device_arg("virtio-blk-pci,drive=libvirt-1-format").is_none());
        assert!(parse_device_arg("e1000,netdev=n").is_none());
    }
}
