//! Real libvirt and real guests for Tandem's VM tests (dev-dependency only).
//!
//! Facts this crate relies on were measured on the project's machines
//! (Debian 12, 2 cores, no systemd as PID 1, KVM unusable): see
//! `VMS-ON-THESE-MACHINES.md` in the shared docs. `scripts/test` installs
//! every package used here; a missing tool makes a test fail, not skip.
//!
//! # What it provides
//!
//! - [`Libvirt::ensure`]: the machine's libvirt daemon, running and
//!   configured. It brings `/etc/libvirt/qemu.conf` to `user`/`group`
//!   `"root"` (QEMU must open root-owned NBD sockets), `security_driver =
//!   "none"`, `cgroup_controllers = [ ]` (else libvirt moves QEMU out of the
//!   machine's memory cgroup) and `namespaces = [ ]` (offending lines are
//!   commented out, one marked block appended), then starts `virtlogd -d`
//!   and `libvirtd -d` when their `/run/*.pid` names no live process
//!   (restarting libvirtd when it had to change qemu.conf, which libvirtd
//!   reads only at start), and waits until `virsh -c qemu:///system
//!   version` answers. Daemons are started through `bash`, which closes
//!   every inherited descriptor but 0-2 and `exec`s `setsid NAME -d` with
//!   all three on /dev/null: a daemon holding the test runner's pipe would
//!   make `cargo test` wait forever (`pre_exec` would need `unsafe`). A
//!   file lock (`/run/tandem-vmkit-libvirt.lock`) serialises all of this
//!   across threads and processes; when everything runs it costs one
//!   `virsh version`. libvirtd logs warnings to
//!   `/var/log/libvirt/libvirtd.log` (errors there about dnsmasq, D-Bus and
//!   dmidecode are harmless). The daemons are left running after the tests.
//! - [`GuestImage::ensure`]: the test guest, built once per machine under
//!   `/var/cache/tandem-guest/<kernel release>_<kernel version>_<recipe
//!   hash>/` (`vmlinuz`, `initrd.img`, `info`): the kernel of the package
//!   `linux-image-amd64` depends on in the apt lists (`apt-get download`,
//!   `dpkg-deb -x`; this needs the Debian mirror once), and a gzip'd newc
//!   initramfs with busybox-static, its applet links, the modules of
//!   [`image::MODULE_ROOTS`] with their dependencies in `modprobe
//!   --show-depends` order (virtio_ring, virtio, virtio_pci_modern_dev,
//!   virtio_pci_legacy_dev, virtio_pci, virtio_blk, crc32c-intel (fails to
//!   load under TCG, harmless), crc32c_generic, jbd2, mbcache, crc16, ext4)
//!   and [`image::INIT_SCRIPT`] as `/init`. The recipe hash covers the init
//!   script, the module list and the busybox binary, so a change rebuilds.
//!   One process builds, under `/var/cache/tandem-guest/.lock`, in a
//!   `.build-*` directory renamed into place when complete. As `apt-cache`
//!   takes about a second here, a small `lists-<hash>-<recipe>` file
//!   remembers which image the apt lists of the moment (names, sizes,
//!   times) lead to: a warm `ensure` reads it and costs ~20 ms.
//! - [`Guest`]: a persistent TCG domain (`<domain type='qemu'>`, 1 vCPU,
//!   256 MiB, direct kernel boot, ACPI so `poweroff -f` powers off, serial
//!   console to a file, no graphics, `on_poweroff`/`on_reboot`/`on_crash`
//!   `destroy`, kernel `panic=-1`) with one data disk `vda` ([`Disk`]: a
//!   raw file, or an NBD export on a Unix socket; raw, `cache='none'`),
//!   running a [`Workload`] chosen by `tandem.workload=` on the kernel
//!   command line: `write` (numbered, fsync()ed files, `ACK <N>` on the
//!   console only after the fsync returned), `check`, `idle`. Names are
//!   `tandem-test-<pid>-<n>-<label>`, unique per test process; dropping a
//!   `Guest` destroys and undefines it, and the first
//!   [`Libvirt::ensure`] of a process removes `tandem-test-*` domains
//!   whose process is gone. Waits read the console file and fail early
//!   when the guest prints `TANDEM-ERROR`, panics or stops.
//! - [`QemuNbd`]: `qemu-nbd` serving a raw image on a Unix socket, so the
//!   harness can run a guest on an NBD disk without Tandem.
//! - [`ext4`]: make an ext4 image (`mkfs.ext4 -F`), replay its journal
//!   after a crash (`e2fsck -E journal_only`), check it (`e2fsck -n -f`),
//!   list and read its files and verify the write workload's files, all
//!   with e2fsprogs (`debugfs`), no loop device or mount.
//!
//! # Sites share one libvirt daemon
//!
//! Tests that play several sites on one machine use the one system
//! daemon (`qemu:///system`) for all of them: a site's guest is just a
//! domain with that site's name in its label. Losing a site's host is
//! simulated by destroying and undefining that site's domain
//! ([`Guest::remove`], or [`Libvirt::destroy_and_undefine`]): its QEMU is
//! killed at once, as in a crash, and the domain is gone from the view of
//! anyone asking libvirt. Only a test of live migration between sites
//! needs two daemons (`virsh migrate` to the same libvirtd is refused);
//! that is not built yet.
//!
//! # Timings (measured on a 2-core machine of the project's kind)
//!
//! - Installing what `scripts/test` adds (qemu-system-x86 with qemu-utils
//!   7.2 replacing the 10 backport, libvirt, busybox-static, cpio, kmod):
//!   16 s from a fast mirror; the check when everything is there: 0.5 s.
//! - [`Libvirt::ensure`]: 7.6 s when it starts virtlogd and libvirtd
//!   (most of it libvirtd's driver start-up before `virsh version`
//!   answers); 15-100 ms when they run.
//! - [`GuestImage::ensure`], cold: 5.5-5.8 s (the 70 MB kernel package
//!   came in about 1 s; two `apt-cache` runs 1.3 s; depmod, cpio and gzip
//!   the rest); warm: 20 ms. The image: vmlinuz 8.2 MB, initrd 1.9 MB.
//! - Boot, `virsh start` to `MOUNTED`: 6.3-7.6 s for one guest alone (the
//!   guest kernel reaches `/init` at 1.9 s of its own clock and mounts
//!   /data at 2.7 s; the rest is QEMU, SeaBIOS and the kernel's
//!   decompression under TCG); 8.5-10.9 s for two guests booting at once
//!   on the two cores. Then ~13 fsync()ed files per second, on a local
//!   file and on qemu-nbd alike.
//! - `cargo test -p tandem-vmkit` (three tests, four guest boots, two of
//!   them at once): 33-37 s.
#![forbid(unsafe_code)]

mod cmd;
pub mod ext4;
mod guest;
pub mod image;
mod libvirt;
mod lock;
mod nbd;
mod site;

use std::path::PathBuf;
use std::time::Duration;

pub use guest::{
    domain_xml, parse_ack, tandem_nbd_commandline, Disk, Guest, GuestConfig, Workload, QEMU_XMLNS,
};
pub use image::GuestImage;
pub use libvirt::{Libvirt, LIBVIRTD_LOG, QEMU_CONF, URI};
pub use nbd::QemuNbd;
pub use site::{SiteLibvirt, SITES_DIR};

/// Every domain this crate defines has a name starting with this.
pub const DOMAIN_PREFIX: &str = "tandem-test-";

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// A command exited with a failure status.
    #[error("`{command}` failed ({status}){output}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// The tail of its stdout and stderr.
        output: String,
    },
    /// A command did not finish in time (it was killed).
    #[error("`{command}` did not finish within {timeout:?}")]
    CommandTimeout {
        /// The command line.
        command: String,
        /// Its limit.
        timeout: Duration,
    },
    /// A bounded wait ran out.
    #[error("timed out after {timeout:?} waiting for {what}{detail}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The limit.
        timeout: Duration,
        /// More to know (a console tail, a log's place).
        detail: String,
    },
    /// Building the guest image failed.
    #[error("building the guest image: {step}: {message}")]
    Build {
        /// The step that failed.
        step: String,
        /// Why.
        message: String,
    },
    /// A guest failed or stopped while a test waited for it.
    #[error("guest {name}: {message}; console tail:\n{console_tail}")]
    Guest {
        /// The domain.
        name: String,
        /// What happened.
        message: String,
        /// The console's last lines.
        console_tail: String,
    },
    /// `e2fsck -n -f` found something wrong.
    #[error("e2fsck -n -f {image} ({status}):\n{output}")]
    Fsck {
        /// The image checked.
        image: PathBuf,
        /// e2fsck's exit status.
        status: String,
        /// What it printed.
        output: String,
    },
    /// A libvirt daemon did not start, died, or could not be stopped.
    #[error("libvirt daemon {uri}: {message}")]
    Daemon {
        /// Its connection URI.
        uri: String,
        /// What happened (with its log's tail where it helps).
        message: String,
    },
    /// qemu-nbd did not start.
    #[error("qemu-nbd: {message}")]
    Nbd {
        /// What happened.
        message: String,
    },
}
