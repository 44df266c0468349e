//! The file as written: serde structs (`deny_unknown_fields`) whose leaves
//! carry their byte spans, and value types that check their own syntax.
//! Tables themselves are not wrapped in `Spanned`: a table made implicitly
//! by dotted keys has no span, which `Spanned` cannot take.
//! Cross-references are checked afterwards, in `validate.rs`.

use std::fmt;
use std::marker::PhantomData;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use toml::Spanned;

use crate::model::{
    CoordinatorKind, FailoverPolicy, Mode, OnLostLease, OnPromoteFailure, OnSyncLoss, TlsMode,
};
use crate::schedule::ScheduleWindow;
use crate::units::{parse_duration, parse_rate, parse_size, Rate};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub site: RawSite,
    pub tls: Option<RawTls>,
    pub coordinator: Option<RawCoordinator>,
    pub libvirt: Option<RawLibvirt>,
    pub api: Option<RawApi>,
    #[serde(default)]
    pub peer: Vec<RawPeer>,
    #[serde(default)]
    pub group: Vec<RawGroup>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [site] table")]
pub(crate) struct RawSite {
    pub name: Spanned<Name>,
    pub data_dir: Spanned<NonEmpty>,
    pub listen: Spanned<ListenAddr>,
    pub api: Spanned<ListenAddr>,
    pub nbd_listen: Option<Spanned<ListenAddr>>,
    pub nbd_tls: Option<Spanned<bool>>,
    pub nbd_insecure: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [tls] table")]
pub(crate) struct RawTls {
    pub mode: Option<Spanned<TlsMode>>,
    pub ca: Option<Spanned<NonEmpty>>,
    pub cert: Option<Spanned<NonEmpty>>,
    pub key: Option<Spanned<NonEmpty>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [coordinator] table")]
pub(crate) struct RawCoordinator {
    pub kind: Option<Spanned<CoordinatorKind>>,
    pub endpoints: Option<Spanned<Vec<Spanned<Endpoint>>>>,
    pub lease_ttl: Option<Spanned<DurationValue>>,
    pub failsafe: Option<bool>,
    pub prefix: Option<Spanned<String>>,
    pub etcd_ca: Option<Spanned<NonEmpty>>,
    pub etcd_cert: Option<Spanned<NonEmpty>>,
    pub etcd_key: Option<Spanned<NonEmpty>>,
    pub etcd_user: Option<Spanned<NonEmpty>>,
    pub etcd_password_file: Option<Spanned<NonEmpty>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an [api] table")]
pub(crate) struct RawApi {
    pub metrics_auth: Option<Spanned<crate::model::MetricsAuth>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [libvirt] table")]
pub(crate) struct RawLibvirt {
    pub uri: Option<Spanned<NonEmpty>>,
    #[serde(default)]
    pub network_map: std::collections::BTreeMap<String, Spanned<NonEmpty>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [[peer]] table")]
pub(crate) struct RawPeer {
    pub name: Spanned<Name>,
    pub address: Spanned<RemoteAddr>,
    pub bandwidth: Option<Spanned<RateValue>>,
    #[serde(default)]
    pub schedule: Vec<Spanned<Window>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [[group]] table")]
pub(crate) struct RawGroup {
    pub name: Spanned<Name>,
    pub primary: Spanned<Name>,
    #[serde(default)]
    pub replicas: Vec<RawReplica>,
    pub mode: Option<Spanned<Mode>>,
    pub sync_replicas: Option<Spanned<u32>>,
    pub failover: Option<Spanned<FailoverPolicy>>,
    pub max_lag_on_failover: Option<Spanned<DurationValue>>,
    pub volumes: Spanned<Vec<RawVolume>>,
    #[serde(default)]
    pub files: Vec<Spanned<AbsPath>>,
    pub on_promote: Option<Spanned<NonEmpty>>,
    pub on_demote: Option<Spanned<NonEmpty>>,
    pub max_queue: Option<Spanned<SizeValue>>,
    pub queue_memory: Option<Spanned<SizeValue>>,
    pub on_sync_loss: Option<Spanned<OnSyncLoss>>,
    pub on_lost_lease: Option<Spanned<OnLostLease>>,
    pub on_promote_failure: Option<Spanned<OnPromoteFailure>>,
    pub vm: Option<Spanned<VmName>>,
    pub vm_shutdown_timeout: Option<Spanned<DurationValue>>,
    pub retention: Option<Spanned<DurationValue>>,
    pub history_max: Option<Spanned<SizeValue>>,
    pub test_scratch_max: Option<Spanned<SizeValue>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a replica like { site = \"chicago\", priority = 1 }"
)]
pub(crate) struct RawReplica {
    pub site: Spanned<Name>,
    pub priority: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a volume like { name = \"web01-root\", size = \"20GiB\" }"
)]
pub(crate) struct RawVolume {
    pub name: Spanned<Name>,
    pub size: Spanned<SizeValue>,
}

// ---------------------------------------------------------------------------
// Leaf value types.

/// A value parsed from a TOML string by `FromText::from_text`.
trait FromText: Sized {
    const EXPECTING: &'static str;
    fn from_text(s: &str) -> Result<Self, String>;
    /// TOML integers, for types that accept them.
    fn from_integer(_v: i128) -> Option<Result<Self, String>> {
        None
    }
}

struct TextVisitor<T>(PhantomData<T>);

impl<'de, T: FromText> Visitor<'de> for TextVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(T::EXPECTING)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        T::from_text(v).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        match T::from_integer(i128::from(v)) {
            Some(r) => r.map_err(E::custom),
            None => Err(E::invalid_type(de::Unexpected::Signed(v), &self)),
        }
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        match T::from_integer(i128::from(v)) {
            Some(r) => r.map_err(E::custom),
            None => Err(E::invalid_type(de::Unexpected::Unsigned(v), &self)),
        }
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<T, A::Error> {
        Err(de::Error::invalid_type(
            de::Unexpected::Other("array"),
            &self,
        ))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
        // TOML date-times reach serde as a map with one private key.
        let what = match map.next_key::<String>() {
            Ok(Some(k)) if k.starts_with("$__toml_private") => "date-time",
            _ => "table",
        };
        Err(de::Error::invalid_type(de::Unexpected::Other(what), &self))
    }
}

macro_rules! text_deserialize {
    ($($t:ty),* $(,)?) => {$(
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_any(TextVisitor::<$t>(PhantomData))
            }
        }
    )*};
}

text_deserialize!(
    Name,
    NonEmpty,
    ListenAddr,
    RemoteAddr,
    Endpoint,
    AbsPath,
    SizeValue,
    RateValue,
    DurationValue,
    Window,
    VmName
);

/// A site, group or volume name: 1-64 characters of `[A-Za-z0-9._-]`, not
/// starting with `.` or `-` (names become file names).
pub(crate) struct Name(pub String);

pub(crate) const NAME_RULE: &str =
    "names are 1-64 characters of A-Z, a-z, 0-9, '.', '_' and '-', not starting with '.' or '-'";

pub(crate) fn check_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !s.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(format!("invalid name {s:?}: {NAME_RULE}"))
    }
}

impl FromText for Name {
    const EXPECTING: &'static str = "a name (a string)";
    fn from_text(s: &str) -> Result<Self, String> {
        check_name(s).map(|()| Name(s.to_string()))
    }
}

/// A non-empty string.
pub(crate) struct NonEmpty(pub String);

impl FromText for NonEmpty {
    const EXPECTING: &'static str = "a string";
    fn from_text(s: &str) -> Result<Self, String> {
        if s.trim().is_empty() {
            Err("must not be empty".to_string())
        } else {
            Ok(NonEmpty(s.to_string()))
        }
    }
}

/// `vm = "libvirt:NAME"`: the protected libvirt domain.
pub(crate) struct VmName(pub String);

impl FromText for VmName {
    const EXPECTING: &'static str = "a VM like \"libvirt:web01\"";
    fn from_text(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("libvirt", name)) if !name.trim().is_empty() && name.trim() == name => {
                Ok(VmName(name.to_owned()))
            }
            Some(("libvirt", _)) => Err(
                "the domain name after \"libvirt:\" must not be empty or start or end with spaces"
                    .into(),
            ),
            _ => Err("must be \"libvirt:NAME\" (libvirt is the only hypervisor)".into()),
        }
    }
}

/// Splits `host:port` (IPv6 in brackets), checking both parts.
pub(crate) fn split_host_port(s: &str) -> Result<(&str, u16), String> {
    let bad = |why: &str| format!("invalid address {s:?}: {why}");
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| bad("missing ']' after an IPv6 address"))?;
        host.parse::<Ipv6Addr>()
            .map_err(|_| bad("not an IPv6 address between '[' and ']'"))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| bad("expected host:port, e.g. \"10.0.1.1:7450\" or \"[::1]:7450\""))?;
        (host, port)
    } else {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| bad("expected host:port, e.g. \"10.0.1.1:7450\""))?;
        if host.contains(':') {
            return Err(bad("put IPv6 addresses in brackets, e.g. \"[::1]:7450\""));
        }
        let host_ok = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
        if !host_ok {
            return Err(bad("expected host:port with a host name or IP address"));
        }
        (host, port)
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("the port must be a number from 0 to 65535"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| bad("the port must be a number from 0 to 65535"))?;
    Ok((host, port))
}

/// Whether `host` (as returned by `split_host_port`) is a loopback host:
/// `localhost`, 127.0.0.0/8 or ::1.
pub(crate) fn is_loopback_host(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    if let Ok(v4) = host.parse::<Ipv4Addr>() {
        return v4.is_loopback();
    }
    if let Ok(v6) = host.parse::<Ipv6Addr>() {
        return v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback());
    }
    false
}

/// Strips an `http://` / `https://` scheme and a trailing `/`.
pub(crate) fn endpoint_host_port(s: &str) -> &str {
    let s = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .unwrap_or(s);
    s.strip_suffix('/').unwrap_or(s)
}

/// A listening address, `host:port` (port 0 allowed).
pub(crate) struct ListenAddr(pub String);

impl FromText for ListenAddr {
    const EXPECTING: &'static str = "an address like \"0.0.0.0:7450\"";
    fn from_text(s: &str) -> Result<Self, String> {
        split_host_port(s).map(|_| ListenAddr(s.to_string()))
    }
}

fn check_remote(original: &str, host_port: &str) -> Result<(), String> {
    let (_, port) = split_host_port(host_port)?;
    if port == 0 {
        return Err(format!(
            "invalid address {original:?}: port 0 cannot be connected to"
        ));
    }
    Ok(())
}

/// An address to connect to, `host:port`.
pub(crate) struct RemoteAddr(pub String);

impl FromText for RemoteAddr {
    const EXPECTING: &'static str = "an address like \"10.0.1.1:7450\"";
    fn from_text(s: &str) -> Result<Self, String> {
        check_remote(s, s).map(|()| RemoteAddr(s.to_string()))
    }
}

/// A coordinator endpoint: `host:port`, or `http(s)://host:port` (etcd).
pub(crate) struct Endpoint(pub String);

impl FromText for Endpoint {
    const EXPECTING: &'static str = "an endpoint like \"10.0.3.1:7460\"";
    fn from_text(s: &str) -> Result<Self, String> {
        check_remote(s, endpoint_host_port(s)).map(|()| Endpoint(s.to_string()))
    }
}

/// An absolute path without `..` components (a `files` entry).
pub(crate) struct AbsPath(pub PathBuf);

impl FromText for AbsPath {
    const EXPECTING: &'static str = "an absolute path (a string)";
    fn from_text(s: &str) -> Result<Self, String> {
        let p = Path::new(s);
        if !p.is_absolute() {
            return Err(format!("{s:?} is not an absolute path"));
        }
        if p.components().any(|c| c == Component::ParentDir) {
            return Err(format!("{s:?} must not contain '..'"));
        }
        Ok(AbsPath(p.to_path_buf()))
    }
}

/// A size in bytes: a string with a unit, or a TOML integer.
pub(crate) struct SizeValue(pub u64);

impl FromText for SizeValue {
    const EXPECTING: &'static str = "a size like \"20GiB\" or a number of bytes";
    fn from_text(s: &str) -> Result<Self, String> {
        parse_size(s).map(SizeValue).map_err(|e| e.to_string())
    }
    fn from_integer(v: i128) -> Option<Result<Self, String>> {
        Some(
            u64::try_from(v)
                .map(SizeValue)
                .map_err(|_| format!("invalid size {v}: must be from 0 to {}", u64::MAX)),
        )
    }
}

/// A rate.
pub(crate) struct RateValue(pub Rate);

impl FromText for RateValue {
    const EXPECTING: &'static str = "a rate like \"200Mbit\" or \"10MB\"";
    fn from_text(s: &str) -> Result<Self, String> {
        parse_rate(s).map(RateValue).map_err(|e| e.to_string())
    }
}

/// A duration.
pub(crate) struct DurationValue(pub Duration);

impl FromText for DurationValue {
    const EXPECTING: &'static str = "a duration like \"3s\" or \"1500ms\"";
    fn from_text(s: &str) -> Result<Self, String> {
        parse_duration(s)
            .map(DurationValue)
            .map_err(|e| e.to_string())
    }
}

/// A schedule window.
pub(crate) struct Window(pub ScheduleWindow);

impl FromText for Window {
    const EXPECTING: &'static str = "a schedule window like \"Mon-Fri 08:00-18:00 50Mbit\"";
    fn from_text(s: &str) -> Result<Self, String> {
        s.parse()
            .map(Window)
            .map_err(|e: crate::UnitError| e.to_string())
    }
}

// ---------------------------------------------------------------------------
// Span index: every key and array element of the document with its path and
// spans, used to name the key of serde errors (which carry only a span) and
// to locate tables.

pub(crate) struct Entry {
    pub path: String,
    pub key_span: Option<Range<usize>>,
    pub value_span: Option<Range<usize>>,
    pub depth: usize,
}

/// Parses `text` as TOML and lists its keys; a syntax error is returned as is.
pub(crate) fn index(text: &str) -> Result<Vec<Entry>, toml_edit::TomlError> {
    let doc = toml_edit::ImDocument::parse(text)?;
    let mut out = Vec::new();
    walk_table(doc.as_table(), "", 0, &mut out);
    Ok(out)
}

fn child_path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

fn walk_table(table: &toml_edit::Table, path: &str, depth: usize, out: &mut Vec<Entry>) {
    for (k, item) in table.iter() {
        let key_span = table.key(k).and_then(toml_edit::Key::span);
        walk_item(item, child_path(path, k), key_span, depth + 1, out);
    }
}

fn walk_item(
    item: &toml_edit::Item,
    path: String,
    key_span: Option<Range<usize>>,
    depth: usize,
    out: &mut Vec<Entry>,
) {
    out.push(Entry {
        path: path.clone(),
        key_span,
        value_span: item.span(),
        depth,
    });
    match item {
        toml_edit::Item::Table(t) => walk_table(t, &path, depth, out),
        toml_edit::Item::ArrayOfTables(a) => {
            for (i, t) in a.iter().enumerate() {
                let p = format!("{path}[{i}]");
                out.push(Entry {
                    path: p.clone(),
                    key_span: None,
                    value_span: t.span(),
                    depth: depth + 1,
                });
                walk_table(t, &p, depth + 1, out);
            }
        }
        toml_edit::Item::Value(v) => walk_value(v, &path, depth, out),
        toml_edit::Item::None => {}
    }
}

fn walk_value(value: &toml_edit::Value, path: &str, depth: usize, out: &mut Vec<Entry>) {
    match value {
        toml_edit::Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                let p = format!("{path}[{i}]");
                out.push(Entry {
                    path: p.clone(),
                    key_span: None,
                    value_span: v.span(),
                    depth: depth + 1,
                });
                walk_value(v, &p, depth + 1, out);
            }
        }
        toml_edit::Value::InlineTable(t) => {
            for (k, v) in t.iter() {
                let key_span = t.key(k).and_then(toml_edit::Key::span);
                let p = child_path(path, k);
                out.push(Entry {
                    path: p.clone(),
                    key_span,
                    value_span: v.span(),
                    depth: depth + 1,
                });
                walk_value(v, &p, depth + 1, out);
            }
        }
        _ => {}
    }
}

/// The entry whose key has exactly this span (unknown keys, and values
/// without a span of their own, are reported at their key).
pub(crate) fn by_key_span<'a>(entries: &'a [Entry], span: &Range<usize>) -> Option<&'a Entry> {
    entries.iter().find(|e| e.key_span.as_ref() == Some(span))
}

/// The innermost entry whose value has exactly this span.
pub(crate) fn by_value_span<'a>(entries: &'a [Entry], span: &Range<usize>) -> Option<&'a Entry> {
    entries
        .iter()
        .filter(|e| e.value_span.as_ref() == Some(span))
        .max_by_key(|e| e.depth)
}

/// The key path a serde error span refers to: the key itself, else the
/// innermost value with that span, else the innermost value containing it.
pub(crate) fn path_for_span<'a>(entries: &'a [Entry], span: &Range<usize>) -> Option<&'a Entry> {
    by_key_span(entries, span)
        .or_else(|| by_value_span(entries, span))
        .or_else(|| {
            entries
                .iter()
                .filter(|e| {
                    e.value_span
                        .as_ref()
                        .is_some_and(|v| v.start <= span.start && span.end <= v.end)
                })
                .max_by_key(|e| e.depth)
        })
}

/// Where the key at `path` is written (its key, else its value).
pub(crate) fn span_of_path(entries: &[Entry], path: &str) -> Option<Range<usize>> {
    entries
        .iter()
        .find(|e| e.path == path)
        .and_then(|e| e.key_span.clone().or_else(|| e.value_span.clone()))
}
