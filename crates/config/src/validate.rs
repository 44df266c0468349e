//! From the raw file to a validated [`Config`]: defaults, relative paths,
//! and every check that involves more than one value.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;

use crate::error::{ConfigError, Location};
use crate::model::{
    Api, Coordinator, CoordinatorKind, Group, Libvirt, Mode, Peer, ReplicaSpec, Site, Tls, TlsMode,
    VolumeSpec,
};
use crate::raw::{
    endpoint_host_port, is_loopback_host, span_of_path, split_host_port, Entry, RawConfig,
    RawCoordinator, RawGroup, RawPeer, RawSite, RawTls, SizeValue,
};
use crate::units::format_size;
use crate::Config;

type Span = Range<usize>;

struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
    entries: &'a [Entry],
    /// Base for relative paths: the configuration file's directory.
    base: PathBuf,
}

impl Ctx<'_> {
    fn err(&self, span: &Span, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::invalid(self.file, self.text, span, key, message)
    }

    /// Where `path` is written, or the start of the file.
    fn span_of(&self, path: &str) -> Span {
        span_of_path(self.entries, path).unwrap_or(0..0)
    }

    fn line(&self, span: &Span) -> usize {
        Location::of_span(self.text, span).line
    }

    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }
}

pub(crate) fn build(
    raw: RawConfig,
    entries: &[Entry],
    file: &Path,
    text: &str,
) -> Result<Config, ConfigError> {
    let base = match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let cx = Ctx {
        file,
        text,
        base,
        entries,
    };

    let data_dir_location = Location::of_span(text, &raw.site.data_dir.span());
    let site = site(&cx, &raw.site)?;
    let tls_mode_span = raw
        .tls
        .as_ref()
        .and_then(|t| t.mode.as_ref().map(Spanned::span));
    let tls = tls(&cx, raw.tls.as_ref())?;
    let coordinator = coordinator(&cx, raw.coordinator.as_ref())?;
    let libvirt = raw
        .libvirt
        .as_ref()
        .map_or_else(Libvirt::default, |l| Libvirt {
            uri: l.uri.as_ref().map_or_else(
                || Libvirt::DEFAULT_URI.to_owned(),
                |u| u.get_ref().0.clone(),
            ),
            network_map: l
                .network_map
                .iter()
                .map(|(from, to)| (from.clone(), to.get_ref().0.clone()))
                .collect(),
        });
    let api = Api {
        metrics_auth: raw
            .api
            .as_ref()
            .and_then(|a| a.metrics_auth.as_ref())
            .map(|m| *m.get_ref())
            .unwrap_or_default(),
    };
    let peers = peers(&cx, &raw.peer)?;

    let site_name = raw.site.name.get_ref().0.as_str();
    let Some(local) = peers.iter().find(|p| p.name == site_name).cloned() else {
        return Err(cx.err(
            &raw.site.name.span(),
            "site.name",
            format!(
                "site {site_name:?} is not listed in any [[peer]] table (every site, this one \
                 included, needs a [[peer]] entry with its name and address)"
            ),
        ));
    };

    let groups = groups(&cx, &raw.group, &peers)?;

    if tls.mode == TlsMode::Off {
        check_loopback(&cx, &raw, tls_mode_span)?;
    }
    check_nbd_tls(&cx, &raw.site, tls.mode)?;
    let mut coordinator = coordinator;
    if let Some(rc) = &raw.coordinator {
        coordinator.etcd = etcd_access(&cx, rc, &coordinator, &tls)?;
    }

    Ok(Config {
        path: file.to_path_buf(),
        site,
        tls,
        coordinator,
        libvirt,
        api,
        peers,
        groups,
        data_dir_location,
        local,
    })
}

fn site(cx: &Ctx<'_>, raw: &RawSite) -> Result<Site, ConfigError> {
    // Two listeners on the same port conflict when their hosts are equal or
    // one of them is a wildcard.
    let mut listeners: Vec<(&str, &Spanned<crate::raw::ListenAddr>)> =
        vec![("site.listen", &raw.listen), ("site.api", &raw.api)];
    if let Some(nbd) = &raw.nbd_listen {
        listeners.push(("site.nbd_listen", nbd));
    }
    for (i, (key, addr)) in listeners.iter().enumerate() {
        for (other_key, other) in &listeners[..i] {
            if listeners_conflict(&addr.get_ref().0, &other.get_ref().0) {
                return Err(cx.err(
                    &addr.span(),
                    *key,
                    format!(
                        "{:?} uses the same port as {other_key} ({:?})",
                        addr.get_ref().0,
                        other.get_ref().0
                    ),
                ));
            }
        }
    }
    Ok(Site {
        name: raw.name.get_ref().0.clone(),
        data_dir: cx.resolve(&raw.data_dir.get_ref().0),
        listen: raw.listen.get_ref().0.clone(),
        api: raw.api.get_ref().0.clone(),
        nbd_listen: raw.nbd_listen.as_ref().map(|a| a.get_ref().0.clone()),
        nbd_tls: raw.nbd_tls.as_ref().is_some_and(|b| *b.get_ref()),
        nbd_insecure: raw.nbd_insecure.as_ref().is_some_and(|b| *b.get_ref()),
    })
}

fn listeners_conflict(a: &str, b: &str) -> bool {
    let (Ok((ha, pa)), Ok((hb, pb))) = (split_host_port(a), split_host_port(b)) else {
        return false;
    };
    let wildcard = |h: &str| matches!(h, "0.0.0.0" | "::");
    pa == pb && pa != 0 && (ha.eq_ignore_ascii_case(hb) || wildcard(ha) || wildcard(hb))
}

fn tls(cx: &Ctx<'_>, raw: Option<&RawTls>) -> Result<Tls, ConfigError> {
    let section_span = cx.span_of("tls");
    let mode = raw
        .and_then(|t| t.mode.as_ref())
        .map_or(TlsMode::On, |m| *m.get_ref());
    let path_of = |v: Option<&Spanned<crate::raw::NonEmpty>>| v.map(|p| cx.resolve(&p.get_ref().0));
    let tls = Tls {
        mode,
        ca: path_of(raw.and_then(|t| t.ca.as_ref())),
        cert: path_of(raw.and_then(|t| t.cert.as_ref())),
        key: path_of(raw.and_then(|t| t.key.as_ref())),
    };
    if mode == TlsMode::On {
        for (name, value) in [("ca", &tls.ca), ("cert", &tls.cert), ("key", &tls.key)] {
            if value.is_none() {
                let why = if raw.is_none() {
                    "missing [tls] section: TLS between sites is on by default; give ca, cert and \
                     key (see `tandem certs create`), or set mode = \"off\" if every address is \
                     loopback"
                } else {
                    "missing required key: TLS is on, so ca, cert and key are required (or set \
                     mode = \"off\" if every address is loopback)"
                };
                return Err(cx.err(&section_span, format!("tls.{name}"), why));
            }
        }
    }
    Ok(tls)
}

fn coordinator(cx: &Ctx<'_>, raw: Option<&RawCoordinator>) -> Result<Coordinator, ConfigError> {
    let Some(raw) = raw else {
        return Ok(Coordinator::default());
    };
    let kind = raw
        .kind
        .as_ref()
        .map_or(CoordinatorKind::None, |k| *k.get_ref());
    let endpoints: Vec<String> = raw
        .endpoints
        .as_ref()
        .map(|e| e.get_ref().iter().map(|x| x.get_ref().0.clone()).collect())
        .unwrap_or_default();
    let endpoints_span = raw.endpoints.as_ref().map(Spanned::span);
    match kind {
        CoordinatorKind::Witness | CoordinatorKind::Etcd if endpoints.is_empty() => {
            let span = endpoints_span
                .or_else(|| raw.kind.as_ref().map(Spanned::span))
                .unwrap_or_else(|| cx.span_of("coordinator"));
            return Err(cx.err(
                &span,
                "coordinator.endpoints",
                format!("kind = \"{kind}\" needs at least one endpoint"),
            ));
        }
        CoordinatorKind::None if !endpoints.is_empty() => {
            return Err(cx.err(
                &endpoints_span.unwrap_or_else(|| cx.span_of("coordinator")),
                "coordinator.endpoints",
                "endpoints are given but kind is \"none\" (the default): set kind = \"witness\" \
                 or \"etcd\", or remove the endpoints",
            ));
        }
        _ => {}
    }
    if let Some(list) = &raw.endpoints {
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (i, e) in list.get_ref().iter().enumerate() {
            if let Some(first) = seen.insert(e.get_ref().0.as_str(), i) {
                return Err(cx.err(
                    &e.span(),
                    format!("coordinator.endpoints[{i}]"),
                    format!(
                        "duplicate endpoint {:?} (also endpoints[{first}])",
                        e.get_ref().0
                    ),
                ));
            }
        }
    }
    let lease_ttl = match &raw.lease_ttl {
        Some(d) if d.get_ref().0.is_zero() => {
            return Err(cx.err(
                &d.span(),
                "coordinator.lease_ttl",
                "lease_ttl must be greater than zero",
            ))
        }
        Some(d)
            if d.get_ref().0 < Coordinator::MIN_LEASE_TTL
                || d.get_ref().0 > Coordinator::MAX_LEASE_TTL =>
        {
            return Err(cx.err(
                &d.span(),
                "coordinator.lease_ttl",
                format!(
                    "lease_ttl must be from 1s to 1h, not {:?}: shorter leases are renewed \
                     and fenced faster than a busy host can keep up with; longer ones keep a \
                     dead site's groups that long",
                    d.get_ref().0
                ),
            ))
        }
        Some(d) => d.get_ref().0,
        None => Coordinator::DEFAULT_LEASE_TTL,
    };
    let prefix = match &raw.prefix {
        Some(p) if !p.get_ref().starts_with('/') => {
            return Err(cx.err(
                &p.span(),
                "coordinator.prefix",
                format!("prefix {:?} must start with '/'", p.get_ref()),
            ))
        }
        Some(p) => p.get_ref().clone(),
        None => Coordinator::DEFAULT_PREFIX.to_string(),
    };
    Ok(Coordinator {
        kind,
        endpoints,
        lease_ttl,
        failsafe: raw.failsafe.unwrap_or(true),
        prefix,
        etcd: crate::model::EtcdAccess::default(),
    })
}

fn peers(cx: &Ctx<'_>, raw: &[RawPeer]) -> Result<Vec<Peer>, ConfigError> {
    let mut seen: HashMap<&str, Span> = HashMap::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, p) in raw.iter().enumerate() {
        let name = p.name.get_ref().0.as_str();
        if let Some(first) = seen.insert(name, p.name.span()) {
            return Err(cx.err(
                &p.name.span(),
                format!("peer[{i}].name"),
                format!(
                    "duplicate peer name {name:?} (first defined at line {})",
                    cx.line(&first)
                ),
            ));
        }
        if let Some(b) = &p.bandwidth {
            if b.get_ref().0 .0 == 0 {
                return Err(cx.err(
                    &b.span(),
                    format!("peer[{i}].bandwidth"),
                    "bandwidth must be greater than zero (leave it out for no limit)",
                ));
            }
        }
        out.push(Peer {
            name: name.to_string(),
            address: p.address.get_ref().0.clone(),
            bandwidth: p.bandwidth.as_ref().map(|b| b.get_ref().0),
            schedule: p.schedule.iter().map(|w| w.get_ref().0).collect(),
        });
    }
    Ok(out)
}

/// Groups defined at runtime (one file each): checked like the file's
/// groups, then for names this site's `existing` groups already use.
pub(crate) fn runtime_groups(
    raw: &[RawGroup],
    entries: &[Entry],
    file: &Path,
    text: &str,
    peers: &[Peer],
    existing: &[Group],
) -> Result<Vec<Group>, ConfigError> {
    let cx = Ctx {
        file,
        text,
        base: file
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
        entries,
    };
    if raw.len() != 1 {
        return Err(cx.err(
            &(0..0),
            "group",
            format!(
                "a runtime group file holds exactly one [[group]] table, not {}",
                raw.len()
            ),
        ));
    }
    let groups = groups(&cx, raw, peers)?;
    for (g, r) in groups.iter().zip(raw) {
        if existing.iter().any(|e| e.name == g.name) {
            return Err(cx.err(
                &r.name.span(),
                "group[0].name",
                format!("a group named {:?} exists on this site already", g.name),
            ));
        }
        for (vi, v) in g.volumes.iter().enumerate() {
            if let Some(other) = existing.iter().find(|e| e.volume(&v.name).is_some()) {
                return Err(cx.err(
                    &r.volumes.span(),
                    format!("group[0].volumes[{vi}].name"),
                    format!(
                        "volume {:?} belongs to group {:?} already",
                        v.name, other.name
                    ),
                ));
            }
        }
        if let (Some(vm), Some(span)) = (&g.vm, r.vm.as_ref().map(|v| v.span())) {
            if let Some(other) = existing.iter().find(|e| e.vm.as_ref() == Some(vm)) {
                return Err(cx.err(
                    &span,
                    "group[0].vm",
                    format!("VM {vm:?} is already protected by group {:?}", other.name),
                ));
            }
        }
    }
    Ok(groups)
}

fn groups(cx: &Ctx<'_>, raw: &[RawGroup], peers: &[Peer]) -> Result<Vec<Group>, ConfigError> {
    let mut group_names: HashMap<&str, Span> = HashMap::new();
    let mut vm_names: HashMap<&str, Span> = HashMap::new();
    // Volume names are global: they name image files and sockets.
    let mut volume_names: HashMap<&str, (&str, Span)> = HashMap::new();
    let known = |site: &str| peers.iter().any(|p| p.name == site);
    let mut out = Vec::with_capacity(raw.len());

    for (gi, g) in raw.iter().enumerate() {
        let key = |k: &str| format!("group[{gi}].{k}");
        let name = g.name.get_ref().0.as_str();
        if let Some(first) = group_names.insert(name, g.name.span()) {
            return Err(cx.err(
                &g.name.span(),
                key("name"),
                format!(
                    "duplicate group name {name:?} (first defined at line {})",
                    cx.line(&first)
                ),
            ));
        }

        let primary = g.primary.get_ref().0.as_str();
        if !known(primary) {
            return Err(cx.err(
                &g.primary.span(),
                key("primary"),
                format!("unknown site {primary:?}: no [[peer]] has that name"),
            ));
        }

        let mut replicas = Vec::with_capacity(g.replicas.len());
        let mut replica_sites: HashMap<&str, usize> = HashMap::new();
        let mut priorities: HashMap<u32, usize> = HashMap::new();
        for (ri, r) in g.replicas.iter().enumerate() {
            let rkey = |k: &str| key(&format!("replicas[{ri}].{k}"));
            let site = r.site.get_ref().0.as_str();
            if !known(site) {
                return Err(cx.err(
                    &r.site.span(),
                    rkey("site"),
                    format!("unknown site {site:?}: no [[peer]] has that name"),
                ));
            }
            if site == primary {
                return Err(cx.err(
                    &r.site.span(),
                    rkey("site"),
                    format!("site {site:?} is the group's primary; it cannot also be a replica"),
                ));
            }
            if let Some(first) = replica_sites.insert(site, ri) {
                return Err(cx.err(
                    &r.site.span(),
                    rkey("site"),
                    format!("duplicate replica site {site:?} (also replicas[{first}])"),
                ));
            }
            let (priority, p_span) = match &r.priority {
                Some(p) => (*p.get_ref(), p.span()),
                // Default: the 1-based position in the list.
                None => (u32::try_from(ri + 1).unwrap_or(u32::MAX), r.site.span()),
            };
            if let Some(first) = priorities.insert(priority, ri) {
                return Err(cx.err(
                    &p_span,
                    rkey("priority"),
                    format!(
                        "duplicate priority {priority} (also replicas[{first}]); priorities \
                         order failover and must differ"
                    ),
                ));
            }
            replicas.push(ReplicaSpec {
                site: site.to_string(),
                priority,
            });
        }

        let mode = g.mode.as_ref().map_or(Mode::Async, |m| *m.get_ref());
        let sync_replicas = g
            .sync_replicas
            .as_ref()
            .map_or(Group::DEFAULT_SYNC_REPLICAS, |s| *s.get_ref());
        if mode == Mode::Sync {
            let n = replicas.len();
            let bad = sync_replicas == 0 || usize::try_from(sync_replicas).map_or(true, |s| s > n);
            if bad {
                let (span, k) = match (&g.sync_replicas, &g.mode) {
                    (Some(s), _) => (s.span(), key("sync_replicas")),
                    (None, Some(m)) => (m.span(), key("mode")),
                    (None, None) => (g.name.span(), key("mode")),
                };
                let msg = if sync_replicas == 0 {
                    "mode = \"sync\" needs sync_replicas of at least 1".to_string()
                } else {
                    format!(
                        "mode = \"sync\" with sync_replicas = {sync_replicas}, but the group has \
                         {n} replica{}",
                        if n == 1 { "" } else { "s" }
                    )
                };
                return Err(cx.err(&span, k, msg));
            }
        }

        if g.volumes.get_ref().is_empty() {
            return Err(cx.err(
                &g.volumes.span(),
                key("volumes"),
                "a group needs at least one volume",
            ));
        }
        if g.volumes.get_ref().len() > Group::MAX_VOLUMES {
            return Err(cx.err(
                &g.volumes.span(),
                key("volumes"),
                format!(
                    "a group has at most {} volumes (this one has {}): split it into several groups",
                    Group::MAX_VOLUMES,
                    g.volumes.get_ref().len()
                ),
            ));
        }
        let mut volumes = Vec::with_capacity(g.volumes.get_ref().len());
        for (vi, v) in g.volumes.get_ref().iter().enumerate() {
            let vkey = |k: &str| key(&format!("volumes[{vi}].{k}"));
            let vname = v.name.get_ref().0.as_str();
            if let Some((other_group, first)) = volume_names.insert(vname, (name, v.name.span())) {
                return Err(cx.err(
                    &v.name.span(),
                    vkey("name"),
                    format!(
                        "duplicate volume name {vname:?} (already used in group {other_group:?} \
                         at line {}); volume names must be unique across all groups",
                        cx.line(&first)
                    ),
                ));
            }
            let size = v.size.get_ref().0;
            if size == 0 || size % 512 != 0 {
                return Err(cx.err(
                    &v.size.span(),
                    vkey("size"),
                    format!(
                        "volume size must be a non-zero multiple of 512 bytes, not {}",
                        format_size(size)
                    ),
                ));
            }
            volumes.push(VolumeSpec {
                name: vname.to_string(),
                size,
            });
        }

        let mut files: Vec<PathBuf> = Vec::with_capacity(g.files.len());
        for (fi, f) in g.files.iter().enumerate() {
            let p = &f.get_ref().0;
            if let Some(first) = files.iter().position(|x| x == p) {
                return Err(cx.err(
                    &f.span(),
                    key(&format!("files[{fi}]")),
                    format!("duplicate file {} (also files[{first}])", p.display()),
                ));
            }
            files.push(p.clone());
        }

        let queue_memory = g
            .queue_memory
            .as_ref()
            .map_or(Group::DEFAULT_QUEUE_MEMORY, |q| q.get_ref().0);
        if let Some(q) = &g.queue_memory {
            if queue_memory == 0 {
                return Err(cx.err(
                    &q.span(),
                    key("queue_memory"),
                    "queue_memory must be greater than zero",
                ));
            }
        }

        let vm = match &g.vm {
            Some(v) => {
                let name = v.get_ref().0.as_str();
                if let Some(first) = vm_names.insert(name, v.span()) {
                    return Err(cx.err(
                        &v.span(),
                        key("vm"),
                        format!(
                            "VM {name:?} is already protected by another group (line {})",
                            cx.line(&first)
                        ),
                    ));
                }
                Some(name.to_owned())
            }
            None => None,
        };
        let retention = g
            .retention
            .as_ref()
            .map_or(Group::DEFAULT_RETENTION, |d| d.get_ref().0);
        let positive = |v: &Option<Spanned<SizeValue>>, k: &str, default: u64, hint: &str| match v {
            Some(v) if v.get_ref().0 == 0 => Err(cx.err(
                &v.span(),
                key(k),
                format!("{k} must be greater than zero{hint}"),
            )),
            Some(v) => Ok(v.get_ref().0),
            None => Ok(default),
        };
        let history_max = positive(
            &g.history_max,
            "history_max",
            Group::DEFAULT_HISTORY_MAX,
            " (to keep no history, set retention = \"0s\")",
        )?;
        let test_scratch_max = positive(
            &g.test_scratch_max,
            "test_scratch_max",
            Group::DEFAULT_TEST_SCRATCH_MAX,
            "",
        )?;
        out.push(Group {
            name: name.to_string(),
            primary: primary.to_string(),
            replicas,
            mode,
            sync_replicas,
            failover: g
                .failover
                .as_ref()
                .map_or_else(Default::default, |f| *f.get_ref()),
            max_lag_on_failover: g
                .max_lag_on_failover
                .as_ref()
                .map_or(Group::DEFAULT_MAX_LAG_ON_FAILOVER, |d| d.get_ref().0),
            volumes,
            files,
            on_promote: g.on_promote.as_ref().map(|h| h.get_ref().0.clone()),
            on_demote: g.on_demote.as_ref().map(|h| h.get_ref().0.clone()),
            max_queue: g
                .max_queue
                .as_ref()
                .map_or(Group::DEFAULT_MAX_QUEUE, |q| q.get_ref().0),
            queue_memory,
            on_sync_loss: g
                .on_sync_loss
                .as_ref()
                .map_or_else(Default::default, |x| *x.get_ref()),
            on_lost_lease: g
                .on_lost_lease
                .as_ref()
                .map_or_else(Default::default, |x| *x.get_ref()),
            on_promote_failure: g
                .on_promote_failure
                .as_ref()
                .map_or_else(Default::default, |x| *x.get_ref()),
            vm,
            vm_shutdown_timeout: g
                .vm_shutdown_timeout
                .as_ref()
                .map_or(Group::DEFAULT_VM_SHUTDOWN_TIMEOUT, |d| d.get_ref().0),
            retention,
            history_max,
            test_scratch_max,
        });
    }
    Ok(out)
}

/// A TCP NBD listener reachable from other hosts serves the disks to
/// whoever reaches it: with TLS on, it must require NBD TLS (`nbd_tls`) or
/// be declared insecure (`nbd_insecure`), not both.
fn check_nbd_tls(cx: &Ctx<'_>, s: &RawSite, mode: TlsMode) -> Result<(), ConfigError> {
    let set = |v: &Option<Spanned<bool>>| v.as_ref().filter(|b| *b.get_ref()).map(Spanned::span);
    let (nbd_tls, insecure) = (set(&s.nbd_tls), set(&s.nbd_insecure));
    if let (Some(span), Some(_)) = (&nbd_tls, &insecure) {
        return Err(cx.err(
            span,
            "site.nbd_tls",
            "nbd_tls = true and nbd_insecure = true contradict each other; set one".to_owned(),
        ));
    }
    if let (Some(span), TlsMode::Off) = (&nbd_tls, mode) {
        return Err(cx.err(
            span,
            "site.nbd_tls",
            "nbd_tls = true needs [tls] mode = \"on\" (clients are checked against the \
             site CA and the listener presents the site's certificate)"
                .to_owned(),
        ));
    }
    let Some(listen) = &s.nbd_listen else {
        return Ok(());
    };
    let addr = &listen.get_ref().0;
    let loopback = split_host_port(addr).is_ok_and(|(host, _)| {
        is_loopback_host(host.trim_start_matches('[').trim_end_matches(']'))
    });
    if mode == TlsMode::On && !loopback && nbd_tls.is_none() && insecure.is_none() {
        return Err(cx.err(
            &listen.span(),
            "site.nbd_listen",
            format!(
                "{addr:?} is not loopback: it would serve the disks unauthenticated and \
                 unencrypted to anyone who reaches it. Set nbd_tls = true (clients then need \
                 NBD STARTTLS and a certificate signed by the site CA), or nbd_insecure = true \
                 to accept that (logged at every start)"
            ),
        ));
    }
    Ok(())
}

/// With `tls.mode = "off"`, every address must be loopback; names the first
/// (in file order) that is not.
fn check_loopback(
    cx: &Ctx<'_>,
    raw: &RawConfig,
    mode_span: Option<Span>,
) -> Result<(), ConfigError> {
    let mut addrs: Vec<(Span, String, &str)> = Vec::new();
    let s = &raw.site;
    addrs.push((s.listen.span(), "site.listen".into(), &s.listen.get_ref().0));
    addrs.push((s.api.span(), "site.api".into(), &s.api.get_ref().0));
    if let Some(n) = &s.nbd_listen {
        addrs.push((n.span(), "site.nbd_listen".into(), &n.get_ref().0));
    }
    if let Some(c) = &raw.coordinator {
        if let Some(list) = &c.endpoints {
            for (i, e) in list.get_ref().iter().enumerate() {
                addrs.push((
                    e.span(),
                    format!("coordinator.endpoints[{i}]"),
                    endpoint_host_port(&e.get_ref().0),
                ));
            }
        }
    }
    for (i, p) in raw.peer.iter().enumerate() {
        let a = &p.address;
        addrs.push((a.span(), format!("peer[{i}].address"), &a.get_ref().0));
    }
    addrs.sort_by_key(|(span, _, _)| span.start);
    for (span, key, addr) in addrs {
        let loopback = split_host_port(addr).is_ok_and(|(host, _)| {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            is_loopback_host(host)
        });
        if !loopback {
            let at = mode_span
                .as_ref()
                .map(|m| format!(" (line {})", cx.line(m)))
                .unwrap_or_default();
            return Err(cx.err(
                &span,
                key,
                format!(
                    "address {addr:?} is not loopback, but tls mode = \"off\"{at} is accepted \
                     only when every address is loopback (127.0.0.0/8, ::1, localhost)"
                ),
            ));
        }
    }
    Ok(())
}

/// The `etcd_*` keys of `[coordinator]`, checked against the endpoints
/// (SPEC G11: the etcd link is authenticated unless it is loopback).
fn etcd_access(
    cx: &Ctx<'_>,
    raw: &RawCoordinator,
    c: &Coordinator,
    tls: &Tls,
) -> Result<crate::model::EtcdAccess, ConfigError> {
    let keys = [
        ("etcd_ca", &raw.etcd_ca),
        ("etcd_cert", &raw.etcd_cert),
        ("etcd_key", &raw.etcd_key),
        ("etcd_user", &raw.etcd_user),
        ("etcd_password_file", &raw.etcd_password_file),
    ];
    if c.kind != CoordinatorKind::Etcd {
        if let Some((name, Some(v))) = keys.iter().find(|(_, v)| v.is_some()) {
            return Err(cx.err(
                &v.span(),
                format!("coordinator.{name}"),
                format!(
                    "{name} is for kind = \"etcd\" (this coordinator is \"{}\")",
                    c.kind
                ),
            ));
        }
        return Ok(crate::model::EtcdAccess::default());
    }
    let pair = |a: (&str, &Option<Spanned<crate::raw::NonEmpty>>),
                b: (&str, &Option<Spanned<crate::raw::NonEmpty>>)|
     -> Result<(), ConfigError> {
        for ((name, v), (other, w)) in [(a, b), (b, a)] {
            if let (Some(v), None) = (v, w) {
                return Err(cx.err(
                    &v.span(),
                    format!("coordinator.{name}"),
                    format!("{name} is given without {other}: give both, or neither"),
                ));
            }
        }
        Ok(())
    };
    pair(("etcd_cert", &raw.etcd_cert), ("etcd_key", &raw.etcd_key))?;
    pair(
        ("etcd_user", &raw.etcd_user),
        ("etcd_password_file", &raw.etcd_password_file),
    )?;
    let list = raw
        .endpoints
        .as_ref()
        .map(|l| l.get_ref().as_slice())
        .unwrap_or_default();
    let is_https = |e: &str| e.trim().to_ascii_lowercase().starts_with("https://");
    let https = list.first().is_some_and(|e| is_https(&e.get_ref().0));
    for (i, e) in list.iter().enumerate() {
        let text = &e.get_ref().0;
        if is_https(text) != https {
            return Err(cx.err(
                &e.span(),
                format!("coordinator.endpoints[{i}]"),
                format!(
                    "endpoint {text:?} mixes plain and TLS endpoints: write every etcd endpoint \
                     as https://host:port (TLS) or every one as host:port (plain HTTP, loopback only)"
                ),
            ));
        }
        if !https {
            let loopback = split_host_port(endpoint_host_port(text)).is_ok_and(|(host, _)| {
                is_loopback_host(host.trim_start_matches('[').trim_end_matches(']'))
            });
            if !loopback {
                return Err(cx.err(
                    &e.span(),
                    format!("coordinator.endpoints[{i}]"),
                    format!(
                        "etcd endpoint {text:?} is plain HTTP to an address that is not loopback: \
                         the etcd link must be authenticated (SPEC G11); write it as \
                         \"https://{}\" and set etcd_ca (and etcd_cert/etcd_key if etcd asks for \
                         client certificates)",
                        endpoint_host_port(text)
                    ),
                ));
            }
        }
    }
    let path =
        |v: &Option<Spanned<crate::raw::NonEmpty>>| v.as_ref().map(|p| cx.resolve(&p.get_ref().0));
    if !https {
        if let Some((name, Some(v))) = keys[..3].iter().find(|(_, v)| v.is_some()) {
            return Err(cx.err(
                &v.span(),
                format!("coordinator.{name}"),
                format!("{name} is set but no endpoint uses https://: write the endpoints as https://host:port"),
            ));
        }
    }
    let tls_on = tls.mode == TlsMode::On;
    let (ca, cert, key) = if !https {
        (None, None, None)
    } else if raw.etcd_ca.is_some() {
        (
            path(&raw.etcd_ca),
            path(&raw.etcd_cert),
            path(&raw.etcd_key),
        )
    } else if tls_on && tls.ca.is_some() {
        let cert = path(&raw.etcd_cert).or_else(|| tls.cert.clone());
        let key = path(&raw.etcd_key).or_else(|| tls.key.clone());
        (tls.ca.clone(), cert, key)
    } else {
        let span = list
            .first()
            .map_or_else(|| cx.span_of("coordinator"), Spanned::span);
        return Err(cx.err(
            &span,
            "coordinator.etcd_ca",
            "https:// etcd endpoints need the CA that signed etcd's certificates: set etcd_ca \
             (or [tls] ca, with TLS on)",
        ));
    };
    Ok(crate::model::EtcdAccess {
        ca,
        cert,
        key,
        user: raw.etcd_user.as_ref().map(|u| u.get_ref().0.clone()),
        password_file: path(&raw.etcd_password_file),
    })
}
