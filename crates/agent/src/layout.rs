//! Where things live under `site.data_dir` (SPEC §4.2).

use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct Layout {
    pub data_dir: PathBuf,
}

impl Layout {
    pub fn new(data_dir: &Path) -> Layout {
        Layout {
            data_dir: data_dir.to_owned(),
        }
    }

    /// Held (flock) by the running agent, from before its listeners.
    pub fn agent_lock(&self) -> PathBuf {
        self.data_dir.join("agent.lock")
    }

    pub fn volumes_dir(&self) -> PathBuf {
        self.data_dir.join("volumes")
    }

    pub fn image(&self, volume: &str) -> PathBuf {
        self.volumes_dir().join(format!("{volume}.img"))
    }

    pub fn nbd_dir(&self) -> PathBuf {
        self.data_dir.join("nbd")
    }

    pub fn socket(&self, volume: &str) -> PathBuf {
        self.nbd_dir().join(format!("{volume}.sock"))
    }

    pub fn capture_dir(&self, group: &str) -> PathBuf {
        self.data_dir.join("capture").join(group)
    }

    pub fn replica_dir(&self, group: &str) -> PathBuf {
        self.data_dir.join("replica").join(group)
    }

    /// A protected VM's definition, as the group keeps it (docs/VMS.md).
    pub fn vm_definition(&self, group: &str) -> PathBuf {
        self.data_dir.join("vms").join(format!("{group}.xml"))
    }

    /// The scratch space of every test view (docs/HISTORY.md, "Test
    /// views"); emptied at agent start.
    pub fn tests_dir(&self) -> PathBuf {
        self.data_dir.join("tests")
    }

    /// Test `id` of `group`'s scratch files.
    pub fn test_dir(&self, group: &str, id: u64) -> PathBuf {
        self.tests_dir().join(group).join(id.to_string())
    }

    /// The test views' sockets; emptied at agent start.
    pub fn test_sockets_dir(&self) -> PathBuf {
        self.nbd_dir().join("test")
    }

    /// Where a test view's sockets are: `nbd/test/<group>/` (SPEC §4.2)
    /// for the test that holds it, `nbd/test/<group>@<id>/` for further
    /// tests of the group running at the same time.
    pub fn test_socket_dir(&self, group: &str, id: Option<u64>) -> PathBuf {
        match id {
            None => self.test_sockets_dir().join(group),
            Some(id) => self.test_sockets_dir().join(format!("{group}@{id}")),
        }
    }

    pub fn dirty_map(&self, group: &str, volume: &str) -> PathBuf {
        self.capture_dir(group).join(format!("{volume}.dirty"))
    }
}
