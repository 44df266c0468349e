//! The test guest's kernel and initramfs, built once per machine.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::cmd::run_ok;
use crate::lock::FileLock;
use crate::Error;

/// Where built guest images live, one directory per version (and small
/// `lists-*` files naming the one the apt lists of the moment lead to).
pub const CACHE_ROOT: &str = "/var/cache/tandem-guest";

/// Bump when the build changes in a way the hashed inputs do not show.
const RECIPE_REVISION: &str = "vmkit-guest-1";

/// The guest's `/init`.
pub const INIT_SCRIPT: &str = include_str!("init.sh");

/// The modules the guest loads (with everything they depend on, softdeps
/// included, in the order `modprobe --show-depends` gives): the virtio PCI
/// transport, the virtio disk, and ext4 (jbd2, mbcache, crc16, and crc32c:
/// `crc32c_generic`, as TCG's CPU has no SSE4.2 for `crc32c-intel`).
pub const MODULE_ROOTS: [&str; 4] = ["virtio_pci", "virtio_blk", "crc32c_generic", "ext4"];

const APT_TIMEOUT: Duration = Duration::from_secs(600);
const TOOL_TIMEOUT: Duration = Duration::from_secs(300);
const LOCK_TIMEOUT: Duration = Duration::from_secs(900);

/// A built guest: a Debian kernel and a busybox-static initramfs whose
/// `/init` runs a workload (see [`crate::Workload`]).
#[derive(Debug, Clone)]
pub struct GuestImage {
    dir: PathBuf,
    kernel_release: String,
}

impl GuestImage {
    /// The guest image for the kernel the apt sources offer now
    /// (`linux-image-amd64`'s dependency), built under
    /// [`CACHE_ROOT`]`/<version>/` if it is not there yet. Safe to call
    /// from many tests and processes at once: one builds, under a file
    /// lock, in a temporary directory renamed into place when complete.
    pub fn ensure() -> Result<GuestImage, Error> {
        Self::ensure_in(Path::new(CACHE_ROOT))
    }

    /// [`GuestImage::ensure`] with another cache directory.
    pub fn ensure_in(root: &Path) -> Result<GuestImage, Error> {
        let busybox = busybox_static()?;
        let recipe = recipe_hash(&busybox)? & 0xffff_ffff_ffff;
        // `apt-cache` takes about a second here (no package cache kept):
        // remember which image the apt lists as they are now lead to.
        let pointer = root.join(format!(
            "lists-{:016x}-{recipe:012x}",
            apt_lists_fingerprint()
        ));
        if let Some(image) = Self::from_pointer(root, &pointer) {
            return Ok(image);
        }
        let (package, version) = kernel_package()?;
        let kernel_release = package
            .strip_prefix("linux-image-")
            .unwrap_or(&package)
            .to_string();
        let name = format!("{kernel_release}_{}_{recipe:012x}", sanitize(&version));
        let dir = root.join(&name);
        let image = GuestImage {
            dir: dir.clone(),
            kernel_release: kernel_release.clone(),
        };
        mkdir(root)?;
        let _lock = FileLock::acquire(&root.join(".lock"), LOCK_TIMEOUT)?;
        if !image.complete() {
            remove_stale_builds(root);
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let tmp = root.join(format!(".build-{}-{nanos}", std::process::id()));
            let built = build(&tmp, &package, &version, &kernel_release, &busybox);
            let result = built.and_then(|out| {
                std::fs::rename(&out, &dir).map_err(|source| Error::Io {
                    what: format!("cannot rename {} to {}", out.display(), dir.display()),
                    source,
                })
            });
            let _ = std::fs::remove_dir_all(&tmp);
            result?;
        }
        let tmp = pointer.with_extension("tmp");
        write(&tmp, format!("{name}\n{kernel_release}\n").as_bytes())?;
        std::fs::rename(&tmp, &pointer).map_err(|source| Error::Io {
            what: format!("cannot rename {} to {}", tmp.display(), pointer.display()),
            source,
        })?;
        Ok(image)
    }

    /// The complete image a pointer file names, if any.
    fn from_pointer(root: &Path, pointer: &Path) -> Option<GuestImage> {
        let text = std::fs::read_to_string(pointer).ok()?;
        let mut lines = text.lines();
        let name = lines.next()?.trim();
        let kernel_release = lines.next()?.trim();
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return None;
        }
        let image = GuestImage {
            dir: root.join(name),
            kernel_release: kernel_release.to_string(),
        };
        image.complete().then_some(image)
    }

    /// The directory holding `vmlinuz`, `initrd.img` and `info`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The kernel (`vmlinuz`).
    pub fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }

    /// The initramfs (`initrd.img`, gzip'd newc cpio).
    pub fn initrd(&self) -> PathBuf {
        self.dir.join("initrd.img")
    }

    /// The kernel's release (`6.1.0-57-amd64`).
    pub fn kernel_release(&self) -> &str {
        &self.kernel_release
    }

    fn complete(&self) -> bool {
        self.kernel().is_file() && self.initrd().is_file() && self.dir.join("info").is_file()
    }
}

/// The Debian kernel package `linux-image-amd64` depends on, and the
/// version apt would fetch (from the local package lists; no network).
fn kernel_package() -> Result<(String, String), Error> {
    let out = run_ok(
        Command::new("apt-cache").args(["depends", "linux-image-amd64"]),
        TOOL_TIMEOUT,
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let package = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
        .ok_or_else(|| Error::Build {
            step: "find the kernel package".into(),
            message: format!(
                "`apt-cache depends linux-image-amd64` names no linux-image-*-amd64 \
                 (run apt-get update?):\n{text}"
            ),
        })?
        .to_string();
    let out = run_ok(
        Command::new("apt-cache").args(["policy", &package]),
        TOOL_TIMEOUT,
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .find(|v| !v.is_empty() && *v != "(none)")
        .ok_or_else(|| Error::Build {
            step: "find the kernel package".into(),
            message: format!("no candidate version for {package}:\n{text}"),
        })?
        .to_string();
    Ok((package, version))
}

/// A hash of the names, sizes and times of the apt package lists: it
/// changes whenever `apt-get update` fetched anything.
fn apt_lists_fingerprint() -> u64 {
    let mut entries: Vec<(String, u64, u128)> = std::fs::read_dir("/var/lib/apt/lists")
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| {
                    let meta = e.metadata().ok()?;
                    let mtime = meta
                        .modified()
                        .ok()?
                        .duration_since(UNIX_EPOCH)
                        .ok()?
                        .as_nanos();
                    Some((
                        e.file_name().to_string_lossy().into_owned(),
                        meta.len(),
                        mtime,
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    entries.sort();
    let text: String = entries
        .iter()
        .map(|(n, len, t)| format!("{n} {len} {t}\n"))
        .collect();
    fnv1a(&[text.as_bytes()])
}

/// The busybox-static binary, checked to come from that package.
struct Busybox {
    path: PathBuf,
    version: String,
}

fn busybox_static() -> Result<Busybox, Error> {
    let out = run_ok(
        Command::new("dpkg-query").args(["-W", "-f=${Status}|${Version}", "busybox-static"]),
        TOOL_TIMEOUT,
    )
    .map_err(|e| Error::Build {
        step: "find busybox-static".into(),
        message: format!("the Debian package busybox-static is needed: {e}"),
    })?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (status, version) = text.split_once('|').unwrap_or((&text, ""));
    if !status.ends_with("installed") || status.contains("not-installed") {
        return Err(Error::Build {
            step: "find busybox-static".into(),
            message: format!("the Debian package busybox-static is not installed ({status})"),
        });
    }
    Ok(Busybox {
        path: PathBuf::from("/bin/busybox"),
        version: version.to_string(),
    })
}

/// FNV-1a over everything the image is built from besides the kernel
/// package (which names the cache directory itself).
fn recipe_hash(busybox: &Busybox) -> Result<u64, Error> {
    let bytes = std::fs::read(&busybox.path).map_err(|source| Error::Io {
        what: format!("cannot read {}", busybox.path.display()),
        source,
    })?;
    let roots = MODULE_ROOTS.join(",");
    Ok(fnv1a(&[
        RECIPE_REVISION.as_bytes(),
        INIT_SCRIPT.as_bytes(),
        roots.as_bytes(),
        busybox.version.as_bytes(),
        &bytes,
    ]))
}

/// FNV-1a (64 bits) over `parts`, each followed by a 0 byte.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in part.iter().chain(std::iter::once(&0u8)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn mkdir(path: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(path).map_err(|source| Error::Io {
        what: format!("cannot create {}", path.display()),
        source,
    })
}

/// Removes `.build-*` directories (called under the lock: any such
/// directory belongs to a build that died).
fn remove_stale_builds(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(".build-") {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn build_err(step: &str) -> impl FnOnce(Error) -> Error + '_ {
    move |e| Error::Build {
        step: step.to_string(),
        message: e.to_string(),
    }
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// Builds the image in `tmp`; returns the finished output directory.
fn build(
    tmp: &Path,
    package: &str,
    version: &str,
    kernel_release: &str,
    busybox: &Busybox,
) -> Result<PathBuf, Error> {
    let dl = tmp.join("download");
    let kroot = tmp.join("kernel");
    let tree = tmp.join("initramfs");
    let out = tmp.join("out");
    for d in [&dl, &kroot, &tree, &out] {
        mkdir(d)?;
    }

    // 1. The kernel package, unpacked.
    run_ok(
        Command::new("apt-get")
            .args(["download", "-q", "-o", "APT::Sandbox::User=root"])
            .arg(format!("{package}={version}"))
            .current_dir(&dl),
        APT_TIMEOUT,
    )
    .map_err(build_err("apt-get download the kernel"))?;
    let deb = std::fs::read_dir(&dl)
        .map_err(io_err(format!("cannot list {}", dl.display())))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| Error::Build {
            step: "apt-get download the kernel".into(),
            message: format!("no .deb in {}", dl.display()),
        })?;
    run_ok(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&kroot),
        TOOL_TIMEOUT,
    )
    .map_err(build_err("dpkg-deb -x the kernel"))?;
    let vmlinuz = kroot.join(format!("boot/vmlinuz-{kernel_release}"));
    std::fs::copy(&vmlinuz, out.join("vmlinuz"))
        .map_err(io_err(format!("cannot copy {}", vmlinuz.display())))?;

    // 2. The modules, in load order.
    run_ok(
        Command::new("depmod")
            .arg("-b")
            .arg(&kroot)
            .arg(kernel_release),
        TOOL_TIMEOUT,
    )
    .map_err(build_err("depmod"))?;
    let mut modules: Vec<PathBuf> = Vec::new();
    for root in MODULE_ROOTS {
        let mut c = Command::new("modprobe");
        c.arg("-d")
            .arg(&kroot)
            .args(["-S", kernel_release, "--show-depends", root]);
        let o = run_ok(&mut c, TOOL_TIMEOUT).map_err(build_err("modprobe --show-depends"))?;
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            let Some(path) = line.trim().strip_prefix("insmod ") else {
                continue; // "builtin NAME": nothing to load
            };
            let path = PathBuf::from(path.trim());
            if !modules.contains(&path) {
                modules.push(path);
            }
        }
    }
    let mod_dir = tree.join("lib/modules");
    mkdir(&mod_dir)?;
    let mut order = String::new();
    for m in &modules {
        let name = m
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !name.ends_with(".ko") {
            return Err(Error::Build {
                step: "collect modules".into(),
                message: format!(
                    "{} is not a plain .ko (busybox insmod loads no compressed modules)",
                    m.display()
                ),
            });
        }
        std::fs::copy(m, mod_dir.join(&name))
            .map_err(io_err(format!("cannot copy {}", m.display())))?;
        order.push_str(&name);
        order.push('\n');
    }
    write(&mod_dir.join("load-order"), order.as_bytes())?;

    // 3. The initramfs tree: busybox and its applets, /init, mount points.
    for d in ["bin", "dev", "proc", "sys", "data", "tmp"] {
        mkdir(&tree.join(d))?;
    }
    std::fs::copy(&busybox.path, tree.join("bin/busybox"))
        .map_err(io_err(format!("cannot copy {}", busybox.path.display())))?;
    let list = run_ok(Command::new(&busybox.path).arg("--list"), TOOL_TIMEOUT)
        .map_err(build_err("busybox --list"))?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet))
            .map_err(io_err(format!("cannot link applet {applet}")))?;
    }
    write(&tree.join("init"), INIT_SCRIPT.as_bytes())?;
    chmod_x(&tree.join("init"))?;

    // 4. The initramfs: newc cpio, owned by root, gzip'd.
    let initrd = out.join("initrd.img");
    let mut c = Command::new("bash");
    c.arg("-c")
        .arg(
            "set -euo pipefail; cd \"$1\"; \
             find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet | gzip -1 >\"$2\"",
        )
        .arg("cpio")
        .arg(&tree)
        .arg(&initrd);
    run_ok(&mut c, TOOL_TIMEOUT).map_err(build_err("cpio | gzip the initramfs"))?;

    // 5. What it is.
    let mut info = String::new();
    let _ = writeln!(info, "kernel package: {package} {version}");
    let _ = writeln!(info, "kernel release: {kernel_release}");
    let _ = writeln!(info, "busybox-static: {}", busybox.version);
    let _ = writeln!(info, "recipe: {RECIPE_REVISION}");
    let _ = writeln!(info, "modules (load order):");
    for line in order.lines() {
        let _ = writeln!(info, "  {line}");
    }
    write(&out.join("info"), info.as_bytes())?;
    Ok(out)
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    std::fs::write(path, bytes).map_err(io_err(format!("cannot write {}", path.display())))
}

fn chmod_x(path: &Path) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .map_err(io_err(format!("cannot chmod {}", path.display())))
}
