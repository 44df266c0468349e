//! An in-memory hypervisor for unit tests of what drives one: domains are
//! XML and a state; starting, stopping and moving disks change them at
//! once. Failures can be switched on per operation.
//!
//! A live move ([`Hypervisor::move_disk`]) does what the real one does to
//! the domain: the running disk's place changes ([`Fake::live_disk`]), the
//! definition does not; it lasts until the domain stops.

use std::collections::BTreeMap;
use std::time::Duration;

use parking_lot::Mutex;

use crate::{qemu, xml};
use crate::{
    Destination, DiskInfo, DomainInfo, DomainState, Hypervisor, HypervisorError, MoveError,
    MoveOutcome, Progress,
};

struct Domain {
    xml: String,
    state: DomainState,
    defined: bool,
    /// Where running disks were moved (target → destination).
    moved: BTreeMap<String, Destination>,
}

/// Operations a test can make fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    Define,
    Start,
    Destroy,
    /// [`Hypervisor::move_disk`] fails as a failed mirror job does
    /// ([`MoveError::JobFailed`]); the disk stays where it was.
    MoveDisk,
}

#[derive(Default)]
pub struct Fake {
    domains: Mutex<BTreeMap<String, Domain>>,
    failing: Mutex<Vec<Op>>,
    /// Every call, in order, for tests to inspect.
    calls: Mutex<Vec<String>>,
}

fn refused(what: &str) -> HypervisorError {
    HypervisorError::Output {
        what: what.to_owned(),
        output: "refused by the fake hypervisor".to_owned(),
    }
}

impl Fake {
    pub fn new() -> Fake {
        Fake::default()
    }

    /// Makes `op` fail from now on (or succeed again).
    pub fn fail(&self, op: Op, failing: bool) {
        let mut f = self.failing.lock();
        f.retain(|o| *o != op);
        if failing {
            f.push(op);
        }
    }

    fn check(&self, op: Op, what: &str) -> Result<(), HypervisorError> {
        self.calls.lock().push(what.to_owned());
        if self.failing.lock().contains(&op) {
            return Err(refused(what));
        }
        Ok(())
    }

    /// Where a running domain's disk `target` was moved by
    /// [`Hypervisor::move_disk`] (`None`: where its definition says).
    pub fn live_disk(&self, name: &str, target: &str) -> Option<Destination> {
        self.domains
            .lock()
            .get(name)
            .and_then(|d| d.moved.get(target).cloned())
    }

    /// The calls made so far ("define web01", "start web01", ...).
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().clone()
    }
}

impl Hypervisor for Fake {
    fn domains(&self) -> Result<Vec<DomainInfo>, HypervisorError> {
        let domains = self.domains.lock();
        domains
            .iter()
            .map(|(name, d)| {
                let parsed = xml::read(&d.xml)?;
                Ok(DomainInfo {
                    name: name.clone(),
                    state: d.state,
                    disks: parsed
                        .disks
                        .into_iter()
                        .map(|disk| DiskInfo { disk, size: None })
                        .collect(),
                })
            })
            .collect()
    }

    fn state(&self, name: &str) -> Result<DomainState, HypervisorError> {
        Ok(self
            .domains
            .lock()
            .get(name)
            .map_or(DomainState::Absent, |d| d.state))
    }

    fn xml(&self, name: &str, _inactive: bool) -> Result<String, HypervisorError> {
        self.domains
            .lock()
            .get(name)
            .map(|d| d.xml.clone())
            .ok_or_else(|| HypervisorError::NoSuchDomain(name.to_owned()))
    }

    fn define(&self, xml: &str) -> Result<String, HypervisorError> {
        let name = xml::read(xml)?.name;
        self.check(Op::Define, &format!("define {name}"))?;
        let mut domains = self.domains.lock();
        let d = domains.entry(name.clone()).or_insert_with(|| Domain {
            xml: String::new(),
            state: DomainState::ShutOff,
            defined: false,
            moved: BTreeMap::new(),
        });
        d.xml = xml.to_owned();
        d.defined = true;
        Ok(name)
    }

    fn undefine(&self, name: &str) -> Result<(), HypervisorError> {
        self.calls.lock().push(format!("undefine {name}"));
        let mut domains = self.domains.lock();
        match domains.get(name).map(|d| d.state.is_active()) {
            None => Err(HypervisorError::NoSuchDomain(name.to_owned())),
            Some(true) => {
                if let Some(d) = domains.get_mut(name) {
                    d.defined = false;
                }
                Ok(())
            }
            Some(false) => {
                domains.remove(name);
                Ok(())
            }
        }
    }

    fn start(&self, name: &str) -> Result<(), HypervisorError> {
        self.check(Op::Start, &format!("start {name}"))?;
        let mut domains = self.domains.lock();
        let d = domains
            .get_mut(name)
            .ok_or_else(|| HypervisorError::NoSuchDomain(name.to_owned()))?;
        d.state = DomainState::Running;
        Ok(())
    }

    fn destroy(&self, name: &str) -> Result<(), HypervisorError> {
        self.check(Op::Destroy, &format!("destroy {name}"))?;
        let mut domains = self.domains.lock();
        let Some(d) = domains.get_mut(name) else {
            return Err(HypervisorError::NoSuchDomain(name.to_owned()));
        };
        d.state = DomainState::ShutOff;
        d.moved.clear();
        if !d.defined {
            domains.remove(name);
        }
        Ok(())
    }

    fn shutdown(&self, name: &str, _timeout: Duration) -> Result<(), HypervisorError> {
        self.destroy(name)
    }

    fn move_disk(
        &self,
        name: &str,
        target: &str,
        to: &Destination,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<MoveOutcome, HypervisorError> {
        let names = qemu::names(target)?;
        let failed = |error| HypervisorError::moving(name, target, error);
        if self
            .check(Op::MoveDisk, &format!("move {name} {target}"))
            .is_err()
        {
            return Err(failed(MoveError::JobFailed(
                "refused by the fake hypervisor".into(),
            )));
        }
        let mut domains = self.domains.lock();
        let d = domains
            .get_mut(name)
            .ok_or_else(|| HypervisorError::NoSuchDomain(name.to_owned()))?;
        if !d.state.is_active() {
            return Err(failed(MoveError::NotRunning(d.state)));
        }
        let disk = xml::read(&d.xml)?
            .disks
            .into_iter()
            .find(|disk| disk.target == target)
            .ok_or_else(|| failed(MoveError::NoSuchDisk(target.to_owned())))?;
        let node = |dest: Option<&Destination>| match dest {
            Some(Destination::Nbd { .. }) => names.nbd_format.clone(),
            Some(Destination::File { .. }) => names.file_format.clone(),
            None if disk.tandem => names.nbd_format.clone(),
            None => format!("libvirt-{target}-format"),
        };
        let previous = node(d.moved.get(target));
        let new = node(Some(to));
        if previous == new {
            return Err(failed(MoveError::AlreadyThere(new)));
        }
        const SIZE: u64 = 1 << 20;
        for (copied, ready) in [(0, false), (SIZE, true)] {
            progress(Progress {
                copied,
                total: SIZE,
                ready,
            });
        }
        d.moved.insert(target.to_owned(), to.clone());
        Ok(MoveOutcome {
            elapsed: Duration::ZERO,
            pivot: Duration::ZERO,
            node: new,
            previous,
            size: SIZE,
        })
    }

    fn monitor(
        &self,
        name: &str,
        _command: &serde_json::Value,
    ) -> Result<serde_json::Value, HypervisorError> {
        self.calls.lock().push(format!("monitor {name}"));
        Ok(serde_json::json!({ "return": {} }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = "<domain type='qemu'><name>vm1</name><devices>\
        <disk type='file' device='disk'><source file='/a.img'/><target dev='vda'/></disk>\
        </devices></domain>";

    #[test]
    fn the_fake_defines_starts_moves_and_destroys() {
        let h = Fake::new();
        assert_eq!(h.state("vm1").unwrap(), DomainState::Absent);
        h.define(XML).unwrap();
        let to = Destination::Nbd {
            volume: "v".into(),
            socket: "/s.sock".into(),
            reconnect_delay_secs: 30,
        };
        let mut seen = Vec::new();
        // Not running: refused, typed.
        assert!(matches!(
            h.move_disk("vm1", "vda", &to, &mut |p| seen.push(p)),
            Err(HypervisorError::Move(f)) if matches!(f.error, MoveError::NotRunning(DomainState::ShutOff))
        ));
        h.start("vm1").unwrap();
        assert_eq!(h.state("vm1").unwrap(), DomainState::Running);
        let out = h
            .move_disk("vm1", "vda", &to, &mut |p| seen.push(p))
            .unwrap();
        assert_eq!(out.node, "tandem-vda");
        assert!(seen.last().unwrap().ready);
        assert_eq!(h.live_disk("vm1", "vda"), Some(to.clone()));
        // The definition is not changed by a live move.
        assert!(matches!(
            h.domains().unwrap()[0].disks[0].disk.source,
            crate::DiskSource::File { .. }
        ));
        assert!(matches!(
            h.move_disk("vm1", "vda", &to, &mut |_| {}),
            Err(HypervisorError::Move(f)) if matches!(f.error, MoveError::AlreadyThere(_))
        ));
        assert!(matches!(
            h.move_disk("vm1", "vdz", &to, &mut |_| {}),
            Err(HypervisorError::Move(f)) if matches!(f.error, MoveError::NoSuchDisk(_))
        ));
        h.fail(Op::MoveDisk, true);
        let back = Destination::File {
            path: "/b.img".into(),
        };
        assert!(matches!(
            h.move_disk("vm1", "vda", &back, &mut |_| {}),
            Err(HypervisorError::Move(f)) if matches!(f.error, MoveError::JobFailed(_))
        ));
        assert_eq!(h.live_disk("vm1", "vda"), Some(to));
        h.fail(Op::MoveDisk, false);
        let out = h.move_disk("vm1", "vda", &back, &mut |_| {}).unwrap();
        assert_eq!(
            (out.previous.as_str(), out.node.as_str()),
            ("tandem-vda", "tandem-vda-local")
        );
        h.fail(Op::Start, true);
        h.destroy("vm1").unwrap();
        assert_eq!(h.live_disk("vm1", "vda"), None);
        assert!(h.start("vm1").is_err());
        assert_eq!(h.calls()[0], "define vm1");
    }
}
