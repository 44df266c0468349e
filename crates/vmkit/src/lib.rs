//! Real libvirt and real guests for Tandem's VM tests, and for `tandem
//! demo --vm` (a normal dependency of `tandem-demo`, hence of the `tandem`
//! binary: it adds no crate beyond `thiserror`, `rustix` and
//! `tandem-testkit`, and runs only system tools, never at an agent's run
//! time).
//!
//! Facts this crate relies on were measured on the project's machines
//! (Debian 12, 2 cores, no systemd as PID 1, KVM unusable): see
//! `VMS-ON-THESE-MACHINES.md` in the shared docs. `scripts/test` installs
//! every package used here; a missing tool makes a test fail, not skip
//! (and `tandem demo --vm` stop at once, naming the packages).
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
//!   raw file, an NBD export on a Unix socket (raw, `cache='none'`), or
//!   [`Disk::TandemNbd`], see below), running a [`Workload`] chosen by
//!   `tandem.workload=` on the kernel command line: `write` (numbered,
//!   fsync()ed files, `ACK <N>` on the console only after the fsync
//!   returned; on a disk with such files already, as after a failover,
//!   `RESUME <M>` and on from `f<M+1>`), `check`, `idle`, `dd` (timed
//!   direct writes, `RATE` lines). Names are
//!   `tandem-test-<pid>-<n>-<label>`, unique per test process, unless
//!   [`GuestConfig::name`] fixes one (a
//!   site daemon's `web01`); the console file is `<work_dir>/<name>.console`
//!   unless [`GuestConfig::console`] says where (QEMU truncates it at each
//!   start unless [`GuestConfig::console_append`]). Dropping a `Guest`
//!   destroys and undefines it, and the first [`Libvirt::ensure`] of a
//!   process removes `tandem-test-*` domains whose process is gone. Waits
//!   read the console file and fail early when the guest prints
//!   `TANDEM-ERROR`, panics or stops (while libvirt does not answer, as
//!   with a stopped site daemon, they go on with the console alone). A
//!   guest runs on any daemon: [`Guest::start`] takes a [`Libvirt`]
//!   handle, the system's or a site's ([`SiteLibvirt::libvirt`], or
//!   [`Libvirt::with_uri`]). [`Guest::start_xml`] defines and starts a
//!   domain from the caller's XML (say [`domain_xml`] rewritten the way
//!   Tandem rewrites domains); [`Guest::attach`] watches a domain someone
//!   else (Tandem's agent) defines and starts, given the daemon, the
//!   name and the console file the XML names, and leaves it alone when
//!   dropped ([`Guest::wait_running`] waits for it to run).
//! - [`Disk::TandemNbd`] / [`tandem_nbd_commandline`]: the disk form Tandem
//!   uses, an NBD export on a Unix socket given to QEMU as
//!   `-blockdev {"driver":"raw","node-name":"tandem-vda","file":{"driver":
//!   "nbd","node-name":"tandem-vda-nbd","server":{"type":"unix","path":
//!   SOCKET},"export":EXPORT,"reconnect-delay":N}}` and `-device
//!   virtio-blk-pci,drive=tandem-vda,id=tandem-vda-dev,bus=pci.0,addr=0x9` in
//!   `<qemu:commandline>` (no `<disk>` element; the domain declares
//!   `xmlns:qemu=`[`QEMU_XMLNS`]), because libvirt 9.0 drops `<reconnect
//!   delay>` from an NBD `<disk>`. With it QEMU holds the guest's I/O while
//!   the server is gone and reconnects when it is back on the same socket:
//!   qemu-nbd killed with SIGKILL and restarted 3 s later, the writing
//!   guest printed no ACK during the outage, no I/O error at all, and 10
//!   more ACKs 0.3-0.6 s after the restart.
//! - [`QemuNbd`]: `qemu-nbd` serving a raw image on a Unix socket, so the
//!   harness can run a guest on an NBD disk without Tandem; [`QemuNbd::stop`]
//!   is a SIGKILL, and serving again on the same socket a restart.
//! - [`SiteLibvirt`]: a libvirt daemon of a simulated site's own (below).
//! - [`ext4`]: make an ext4 image (`mkfs.ext4 -F`), replay its journal
//!   after a crash (`e2fsck -E journal_only`), check it (`e2fsck -n -f`),
//!   list and read its files and verify the write workload's files, all
//!   with e2fsprogs (`debugfs`), no loop device or mount.
//!
//! # One libvirt daemon per site
//!
//! Tests that play several sites on one machine give each site its own
//! daemon, [`SiteLibvirt`] ([`SiteLibvirt::start`]`(label)`, or
//! [`SiteLibvirt::start_at`]`(root)`): two sites can then both have a domain
//! `web01`, libvirt can be down on one site while its guests run, and one
//! site's host can crash. (The system daemon of [`Libvirt::ensure`] stays
//! as it was, shared by tests that need one daemon; a site's host loss
//! there is [`Guest::remove`].)
//!
//! - **Layout.** A site lives under a root, by default
//!   [`SITES_DIR`]`/<test pid>-<n>-<label>/` (`/run/tandem-vmkit-sites`):
//!   `run/`, `etc/`, `lib/`, `log/`, `cache/`, bind-mounted in the site's
//!   own mount namespace over `/run/libvirt`, `/etc/libvirt`,
//!   `/var/lib/libvirt`, `/var/log/libvirt` and `/var/cache/libvirt`;
//!   `owner` (pid and start time of the test process), `libvirtd.pid`,
//!   `virtlogd.pid`. Its URI ([`SiteLibvirt::uri`]) is
//!   `qemu+unix:///system?socket=<root>/run/libvirt-sock` (the root must
//!   keep that path within 107 bytes). libvirtd logs to
//!   `<root>/log/libvirtd.log`, QEMU to `<root>/log/qemu/<domain>.log`;
//!   QEMU's pid file is `<root>/run/qemu/<domain>.pid`
//!   ([`SiteLibvirt::qemu_pid`]).
//! - **Configuration.** `etc/` gets the top-level files of `/etc/libvirt`
//!   (the `*.conf`; no domains, networks, hooks or autostart links of the
//!   system), with `qemu.conf` brought to the settings [`Libvirt::ensure`]
//!   enforces and `stdio_handler = "file"`: with the default `"logd"` a
//!   `<serial type='file'>` console is written through virtlogd, and a
//!   guest's console fell silent for good once virtlogd was stopped
//!   (measured); with `"file"` QEMU writes it itself. `cache/` gets a
//!   copy of the system's QEMU capabilities cache
//!   (`/var/cache/libvirt/qemu/capabilities`, filled by the system
//!   daemon): a site daemon then answers in 0.13-0.33 s instead of 8.3 s
//!   (libvirt probes QEMU again by itself when an entry is stale).
//! - **Start** ([`SiteLibvirt::restart_daemon`], also run by `start`):
//!   `bash` closes every inherited descriptor but 0-2 (on /dev/null),
//!   then `setsid unshare --mount --propagation private bash -c SCRIPT`,
//!   where SCRIPT bind-mounts the five directories, runs `virtlogd -d -p
//!   <root>/virtlogd.pid` and `exec`s `libvirtd -d -p <root>/libvirtd.pid`
//!   (its own errors go to `<root>/log/start.log`). The daemons, and the
//!   QEMUs they start, keep the namespace alive. The wait for `virsh -c
//!   URI version` is bounded (90 s) and gives up as soon as libvirtd is
//!   gone; errors carry the tails of the site's logs.
//! - **Which processes are a site's.** Those whose `/run/libvirt`, seen
//!   through their own root (`/proc/PID/root/run/libvirt`), is the site's
//!   `<root>/run` (same device and inode): its daemons and every QEMU they
//!   started, in whichever of the site's namespaces (each daemon start
//!   makes a new one; QEMUs stay in the one they were started in), and
//!   nothing of other sites or of the system.
//! - **Libvirt down** ([`SiteLibvirt::stop_daemon`]): SIGTERM to the
//!   site's libvirtd and virtlogd, SIGKILL after 10 s; QEMUs go on, their
//!   guests keep writing and printing ACKs. [`SiteLibvirt::restart_daemon`]
//!   starts the daemons in a new mount namespace over the same root: this
//!   works, libvirtd finds each QEMU through its pid file, status XML and
//!   monitor socket under the root and lists the domain as running, and
//!   `virsh destroy` then kills it (measured; its log says "At least one
//!   cgroup controller is required" during the reconnect, harmless).
//! - **Host crash** ([`SiteLibvirt::crash_host`]): SIGKILL to every
//!   process of the site, daemons first, then `<root>/run` emptied (a
//!   tmpfs on a real host). After [`SiteLibvirt::restart_daemon`] the
//!   site's defined domains are shut off (autostart ones would start).
//! - **Cleanup.** Dropping a `SiteLibvirt` (or [`SiteLibvirt::remove`])
//!   SIGKILLs every process of the site (QEMUs included, which is what
//!   `virsh destroy` does) and removes the root; bounded, never hangs. The
//!   first [`SiteLibvirt::start`] of a process runs
//!   [`SiteLibvirt::remove_stale_sites`]: roots under [`SITES_DIR`] whose
//!   owner (pid and start time, or the pid the name begins with) is gone
//!   are cleaned the same way. Roots given to `start_at` are not swept.
//!   [`SiteLibvirt::leave_running`] (`tandem demo --vm --keep`) lets a
//!   site outlive its handle; the sweep takes it once its process is gone.
//! - **Shared with the system and the other sites:** the kernel and one
//!   pid namespace (every site's QEMUs show in `ps`), the network (guests
//!   have no NICs), every file outside the five directories (guest image,
//!   disk images, consoles, NBD sockets: a domain must not refer to files
//!   under them, which differ inside a site), the QEMU binaries. No cgroups
//!   and no security driver, as for the system daemon.
//! - Live migration between sites (`virsh migrate` from one site daemon
//!   to another) is not built yet.
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
//! - Site daemons (with the capabilities cache copied): start to
//!   answering 0.13-0.49 s (8.3 s without the cache); `stop_daemon`
//!   30-150 ms; `restart_daemon` with a guest running 0.3-0.85 s;
//!   `crash_host` 8-28 ms; a sweep of a stale site with one QEMU 10-95 ms
//!   (the higher figures while other builds load the machine).
//! - Boot on site daemons, two or three guests at once on the two cores:
//!   6.5-13 s to `MOUNTED`, up to 17 s while other builds load the machine.
//! - `cargo test -p tandem-vmkit`: `guests` (three tests, four boots, two
//!   at once) 30-42 s; `sites` (five tests, six boots, two or three at
//!   once) 33-51 s; 75-93 s in all.
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
    domain_xml, parse_ack, parse_rate, tandem_nbd_commandline, Disk, Guest, GuestConfig, Workload,
    QEMU_XMLNS,
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
