//! An in-memory hypervisor for unit tests of what drives one: domains are
//! XML and a state; starting, stopping and copying disks change them at
//! once. Failures can be switched on per operation.

use std::collections::BTreeMap;
use std::time::Duration;

use parking_lot::Mutex;

use crate::xml;
use crate::{CopyOutcome, DiskInfo, DomainInfo, DomainState, Hypervisor, HypervisorError};

struct Domain {
    xml: String,
    state: DomainState,
    defined: bool,
}

/// Operations a test can make fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    Define,
    Start,
    Destroy,
    CopyDisk,
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
        if !d.defined {
            domains.remove(name);
        }
        Ok(())
    }

    fn shutdown(&self, name: &str, _timeout: Duration) -> Result<(), HypervisorError> {
        self.destroy(name)
    }

    fn copy_disk(
        &self,
        name: &str,
        target: &str,
        disk_xml: &str,
    ) -> Result<CopyOutcome, HypervisorError> {
        self.check(Op::CopyDisk, &format!("copy {name} {target}"))?;
        let mut domains = self.domains.lock();
        let d = domains
            .get_mut(name)
            .ok_or_else(|| HypervisorError::NoSuchDomain(name.to_owned()))?;
        d.xml = xml::replace_disks(&d.xml, &[(target.to_owned(), disk_xml.to_owned())])?;
        Ok(CopyOutcome {
            elapsed: Duration::ZERO,
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
    fn the_fake_defines_starts_copies_and_destroys() {
        let h = Fake::new();
        assert_eq!(h.state("vm1").unwrap(), DomainState::Absent);
        h.define(XML).unwrap();
        h.start("vm1").unwrap();
        assert_eq!(h.state("vm1").unwrap(), DomainState::Running);
        let nbd = xml::nbd_disk("vda", None, "v", "/s.sock");
        h.copy_disk("vm1", "vda", &nbd).unwrap();
        let d = &h.domains().unwrap()[0];
        assert!(matches!(
            d.disks[0].disk.source,
            crate::DiskSource::Nbd { .. }
        ));
        h.fail(Op::Start, true);
        h.destroy("vm1").unwrap();
        assert!(h.start("vm1").is_err());
        assert_eq!(h.calls()[0], "define vm1");
    }
}
