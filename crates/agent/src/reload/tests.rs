use super::*;

const BASE: &str = r#"
[site]
name = "ny"
data_dir = "/var/lib/tandem"
listen = "127.0.0.1:7450"
api = "127.0.0.1:7451"

[tls]
mode = "off"

[[peer]]
name = "ny"
address = "127.0.0.1:7450"

[[peer]]
name = "chicago"
address = "127.0.0.1:7460"
bandwidth = "200Mbit"

[[group]]
name = "web01"
primary = "ny"
replicas = [ { site = "chicago", priority = 1 } ]
volumes = [ { name = "web01-root", size = "1GiB" } ]
on_promote = "/bin/true promote"
on_demote = "/bin/true demote"
"#;

fn cfg(text: &str) -> Config {
    match tandem_config::parse(text, std::path::Path::new("/etc/tandem/tandem.toml")) {
        Ok(c) => c,
        Err(e) => panic!("test configuration: {e}\n{text}"),
    }
}

fn edit(from: &str, to: &str) -> Config {
    assert!(BASE.contains(from), "{from:?} not in the base");
    cfg(&BASE.replacen(from, to, 1))
}

fn only_refused(p: &Plan) -> Vec<String> {
    p.refused().map(|(what, _)| what.to_owned()).collect()
}

#[test]
fn the_same_file_changes_nothing() {
    let p = plan(&cfg(BASE), &cfg(BASE));
    assert!(p.is_empty(), "{p:?}");
    assert!(p.acceptable());
}

#[test]
fn a_new_peer_and_a_new_group_are_added() {
    let new = cfg(&format!(
        "{BASE}\n[[peer]]\nname = \"seattle\"\naddress = \"127.0.0.1:7470\"\n\n\
         [[group]]\nname = \"db01\"\nprimary = \"ny\"\nreplicas = [ {{ site = \"seattle\" }} ]\n\
         volumes = [ {{ name = \"db01-data\", size = \"2GiB\" }} ]\n"
    ));
    let p = plan(&cfg(BASE), &new);
    assert!(p.acceptable(), "{p:?}");
    assert_eq!(p.changes.len(), 2, "{p:?}");
    assert!(matches!(&p.changes[0], Change::AddPeer(peer) if peer.name == "seattle"));
    assert!(matches!(&p.changes[1], Change::AddGroup(g) if g.name == "db01"));
}

#[test]
fn a_removed_group_is_removed_and_its_peer_can_go_with_it() {
    let two = format!(
        "{BASE}\n[[peer]]\nname = \"seattle\"\naddress = \"127.0.0.1:7470\"\n\n\
         [[group]]\nname = \"db01\"\nprimary = \"seattle\"\nreplicas = [ {{ site = \"ny\" }} ]\n\
         volumes = [ {{ name = \"db01-data\", size = \"2GiB\" }} ]\n"
    );
    let p = plan(&cfg(&two), &cfg(BASE));
    assert!(p.acceptable(), "{p:?}");
    assert_eq!(
        p.changes,
        vec![
            Change::RemovePeer("seattle".into()),
            Change::RemoveGroup("db01".into())
        ]
    );
}

#[test]
fn groups_of_other_sites_are_only_recorded() {
    let other = format!(
        "{BASE}\n[[peer]]\nname = \"seattle\"\naddress = \"127.0.0.1:7470\"\n\n\
         [[group]]\nname = \"far\"\nprimary = \"seattle\"\nreplicas = [ {{ site = \"chicago\" }} ]\n\
         volumes = [ {{ name = \"far-0\", size = \"2GiB\" }} ]\n"
    );
    let with_peer = format!("{BASE}\n[[peer]]\nname = \"seattle\"\naddress = \"127.0.0.1:7470\"\n");
    let p = plan(&cfg(&with_peer), &cfg(&other));
    assert_eq!(p.changes, vec![Change::Recorded("far".into())]);
    let p = plan(&cfg(&other), &cfg(&with_peer));
    assert_eq!(p.changes, vec![Change::Recorded("far".into())]);
}

#[test]
fn bandwidth_and_schedule_changes_are_applied() {
    let p = plan(&cfg(BASE), &edit("200Mbit", "50Mbit"));
    assert!(p.acceptable());
    assert!(
        matches!(&p.changes[..], [Change::ChangePeerBandwidth(peer)] if peer.name == "chicago"
            && peer.bandwidth.map(|r| r.bits_per_sec()) == Some(50_000_000)),
        "{p:?}"
    );
    let p = plan(
        &cfg(BASE),
        &edit(
            "bandwidth = \"200Mbit\"",
            "bandwidth = \"200Mbit\"\nschedule = [\"Mon-Fri 08:00-18:00 10Mbit\"]",
        ),
    );
    assert!(
        matches!(&p.changes[..], [Change::ChangePeerBandwidth(_)]),
        "{p:?}"
    );
}

#[test]
fn a_changed_hook_command_is_applied() {
    let p = plan(
        &cfg(BASE),
        &edit("/bin/true promote", "/usr/local/bin/start web01"),
    );
    assert_eq!(
        p.changes,
        vec![Change::ChangeHooks {
            group: "web01".into(),
            on_promote: Some("/usr/local/bin/start web01".into()),
            on_demote: Some("/bin/true demote".into()),
        }]
    );
}

#[test]
fn a_hook_that_comes_or_goes_is_refused() {
    let p = plan(&cfg(BASE), &edit("on_demote = \"/bin/true demote\"\n", ""));
    assert_eq!(only_refused(&p), vec!["group web01 on_demote removed"]);
    let p = plan(&edit("on_demote = \"/bin/true demote\"\n", ""), &cfg(BASE));
    assert_eq!(only_refused(&p), vec!["group web01 on_demote added"]);
}

#[test]
fn a_changed_volume_size_is_refused_with_both_sizes() {
    let p = plan(&cfg(BASE), &edit("size = \"1GiB\"", "size = \"2GiB\""));
    assert!(!p.acceptable());
    let refused: Vec<_> = p.refused().collect();
    assert_eq!(refused.len(), 1, "{p:?}");
    assert_eq!(
        refused[0].0,
        "group web01 volume web01-root size 1GiB -> 2GiB"
    );
    assert!(refused[0].1.contains("size is fixed"), "{}", refused[0].1);
}

#[test]
fn a_changed_volume_list_is_refused() {
    let p = plan(
        &cfg(BASE),
        &edit(
            "{ name = \"web01-root\", size = \"1GiB\" }",
            "{ name = \"web01-root\", size = \"1GiB\" }, { name = \"web01-data\", size = \"1GiB\" }",
        ),
    );
    assert_eq!(
        only_refused(&p),
        vec!["group web01 volumes [web01-root] -> [web01-root, web01-data]"]
    );
}

#[test]
fn site_settings_are_refused_one_line_each() {
    let new = cfg(&BASE
        .replacen("name = \"ny\"", "name = \"boston\"", 1)
        .replacen("name = \"ny\"", "name = \"boston\"", 1)
        .replace("primary = \"ny\"", "primary = \"boston\"")
        .replace("/var/lib/tandem", "/srv/tandem")
        .replace("127.0.0.1:7451", "127.0.0.1:7452"));
    let p = plan(&cfg(BASE), &new);
    let refused = only_refused(&p);
    assert!(
        refused
            .iter()
            .any(|r| r == "site.name \"ny\" -> \"boston\""),
        "{refused:?}"
    );
    assert!(refused
        .iter()
        .any(|r| r == "site.data_dir /var/lib/tandem -> /srv/tandem"));
    assert!(refused
        .iter()
        .any(|r| r == "site.api 127.0.0.1:7451 -> 127.0.0.1:7452"));
    assert!(refused
        .iter()
        .any(|r| r == "group web01 primary ny -> boston"));
    assert!(!p.acceptable());
}

#[test]
fn tls_coordinator_and_a_peer_address_are_refused() {
    let p = plan(
        &cfg(BASE),
        &edit(
            "address = \"127.0.0.1:7460\"",
            "address = \"127.0.0.1:7461\"",
        ),
    );
    assert_eq!(
        only_refused(&p),
        vec!["peer chicago address 127.0.0.1:7460 -> 127.0.0.1:7461"]
    );
    let p = plan(
        &cfg(BASE),
        &edit(
            "[tls]\nmode = \"off\"",
            "[tls]\nmode = \"off\"\n\n[coordinator]\nkind = \"witness\"\nendpoints = [\"127.0.0.1:7499\"]",
        ),
    );
    assert_eq!(only_refused(&p), vec!["[coordinator]"]);
}

#[test]
fn a_volume_moving_to_a_new_group_is_refused() {
    let moved = BASE.replace("name = \"web01\"", "name = \"web02\"");
    let p = plan(&cfg(BASE), &cfg(&moved));
    assert_eq!(
        only_refused(&p),
        vec!["volume web01-root moves from group web01 to group web02"]
    );
}

#[test]
fn every_other_group_key_is_refused_by_name() {
    for (from, to, key) in [
        ("replicas = [", "mode = \"sync\"\nreplicas = [", "mode"),
        (
            "replicas = [",
            "failover = \"manual\"\nreplicas = [",
            "failover",
        ),
        (
            "replicas = [",
            "max_queue = \"2GiB\"\nreplicas = [",
            "max_queue",
        ),
        ("replicas = [", "vm = \"libvirt:web01\"\nreplicas = [", "vm"),
        ("priority = 1", "priority = 5", "replicas"),
    ] {
        let p = plan(&cfg(BASE), &edit(from, to));
        assert_eq!(
            only_refused(&p),
            vec![format!("group web01 {key}")],
            "{key}"
        );
    }
}

#[test]
fn history_values_change_live_but_history_does_not_switch_on_or_off() {
    let with = |keys: &str| {
        edit(
            "on_demote = \"/bin/true demote\"",
            &format!("on_demote = \"/bin/true demote\"\n{keys}"),
        )
    };
    // Default (24h) -> a shorter window and a larger cap: applied.
    let p = plan(
        &cfg(BASE),
        &with("retention = \"1h\"\nhistory_max = \"50GiB\"\ntest_scratch_max = \"1GiB\""),
    );
    assert!(p.acceptable(), "{p:?}");
    assert_eq!(
        p.changes,
        vec![Change::ChangeHistory {
            group: "web01".into(),
            retention: std::time::Duration::from_secs(3600),
            history_max: 50 << 30,
            test_scratch_max: 1 << 30,
        }]
    );
    // The same values written another way: nothing.
    let p = plan(&with("retention = \"24h\""), &with("retention = \"1440m\""));
    assert!(p.is_empty(), "{p:?}");
    // On -> off and off -> on: refused, with one line naming the restart.
    for (from, to) in [
        (cfg(BASE), with("retention = \"0s\"")),
        (with("retention = \"0s\""), with("retention = \"1h\"")),
    ] {
        let p = plan(&from, &to);
        assert!(!p.acceptable(), "{p:?}");
        let refused: Vec<(String, String)> = p
            .refused()
            .map(|(w, y)| (w.to_owned(), y.to_owned()))
            .collect();
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(
            refused[0].0.starts_with("group web01 retention"),
            "{refused:?}"
        );
        assert!(
            refused[0]
                .1
                .starts_with("restart the agent to switch the history of group web01 on or off"),
            "{refused:?}"
        );
    }
    // history_max alone while history is off: applied (it is kept for
    // when history is switched on).
    let p = plan(
        &with("retention = \"0s\""),
        &with("retention = \"0s\"\nhistory_max = \"1GiB\""),
    );
    assert!(p.acceptable(), "{p:?}");
    assert!(matches!(&p.changes[..], [Change::ChangeHistory { .. }]));
}
