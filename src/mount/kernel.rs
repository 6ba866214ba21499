//! The mount itself: migsafe's own mount(2) of /dev/fuse as `fuse.migsafe`,
//! the unmount on a stop signal, the mount's readahead window, and which mount
//! is on top at a path (read from mountinfo: a stat of a new mount would send
//! a request to this process before it serves).

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::options::MountOption;
use crate::session::Acl;

use super::args::{StartError, err};
use crate::mountinfo::{MountEntry, mountinfo};

/// Who takes the mount away on SIGTERM: migsafe's own mount(2), or
/// fusermount3 for a mount it made.
pub(super) enum Unmounter {
    Own(Arc<OwnMount>),
    Fusermount(Arc<super::fusermount::UserMount>),
}

impl Unmounter {
    pub(super) fn unmount(&mut self) -> std::io::Result<()> {
        match self {
            Unmounter::Own(m) => m.unmount(),
            Unmounter::Fusermount(m) => m.unmount(),
        }
    }
}

/// A FUSE mount migsafe made itself with mount(2), so the kernel records the
/// type `fuse.migsafe` (a plain mount(2) of `fuse` says just `fuse`, which
/// `findmnt -t fuse.migsafe` and libvirt do not recognise). It also keeps the
/// /dev/fuse connection in migsafe's hands.
pub(super) struct OwnMount {
    mountpoint: PathBuf,
    /// The mount's device number (`major:minor` in mountinfo): unmounting
    /// checks the top mount on the path is still this one, so a mount an
    /// operator already took away never makes us unmount what lies beneath.
    dev: String,
    /// The mountpoint as mountinfo spells it, resolved before mounting.
    canonical: PathBuf,
    done: std::sync::atomic::AtomicBool,
}

/// The filesystem type migsafe mounts as.
pub(super) const FSTYPE: &str = "fuse.migsafe";

impl OwnMount {
    /// Opens /dev/fuse and mounts it on `mountpoint`; `None` when mount(2)
    /// is not permitted (then fusermount3 has to do it).
    pub(super) fn mount(
        mountpoint: &Path,
        options: &[MountOption],
        acl: Acl,
    ) -> Result<Option<(OwnedFd, OwnMount)>, StartError> {
        let dev_fuse = open_dev_fuse()?;
        let canonical =
            std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
        let (flags, source, data) =
            mount_data(options, acl, std::os::fd::AsRawFd::as_raw_fd(&dev_fuse));
        match nix::mount::mount(
            Some(source.as_str()),
            mountpoint,
            Some(FSTYPE),
            flags,
            Some(data.as_str()),
        ) {
            Ok(()) => {}
            Err(nix::errno::Errno::EPERM) => return Ok(None),
            Err(e) => {
                return err(format!(
                    "mount(2) {FSTYPE} on {}: {} ({e}); check the mountpoint and the options",
                    mountpoint.display(),
                    crate::sys::errno_name(e as i32),
                ));
            }
        }
        // Looked up by the path resolved before mounting: resolving it now
        // could send a request to this very process, which does not serve
        // requests yet.
        let dev = top_mount_at(&canonical).map(|m| m.dev).unwrap_or_default();
        Ok(Some((
            dev_fuse,
            OwnMount {
                mountpoint: mountpoint.to_path_buf(),
                canonical,
                dev,
                done: std::sync::atomic::AtomicBool::new(false),
            },
        )))
    }

    /// True while the top mount on the path is still ours (or, should
    /// mountinfo not have shown it after mounting, assumed so: better an
    /// unmount by path than a SIGTERM that does nothing).
    fn still_ours(&self) -> bool {
        self.dev.is_empty()
            || top_mount_at(&self.canonical)
                .is_some_and(|m| m.dev == self.dev && m.fstype == FSTYPE)
    }

    fn unmount(&self) -> std::io::Result<()> {
        use std::sync::atomic::Ordering;
        if self.done.swap(true, Ordering::SeqCst) || !self.still_ours() {
            return Ok(());
        }
        nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::empty()).map_err(|e| {
            self.done.store(false, Ordering::SeqCst);
            std::io::Error::from(e)
        })
    }
}

/// The mount(2) flags, source and data for `options`, as libfuse would
/// pass them; `fd` is the /dev/fuse connection.
fn mount_data(
    options: &[MountOption],
    acl: Acl,
    fd: std::os::fd::RawFd,
) -> (nix::mount::MsFlags, String, String) {
    use nix::mount::MsFlags;
    let mut flags = MsFlags::empty();
    let (mut dev, mut suid) = (false, false);
    let mut source = "migsafe".to_string();
    let mut data = format!(
        "fd={},rootmode={:o},user_id={},group_id={}",
        fd,
        libc::S_IFDIR,
        nix::unistd::getuid(),
        nix::unistd::getgid()
    );
    for opt in options {
        match opt {
            MountOption::FSName(n) => source = n.clone(),
            MountOption::Subtype(_) | MountOption::AutoUnmount => {}
            MountOption::DefaultPermissions => data.push_str(",default_permissions"),
            MountOption::Dev => dev = true,
            MountOption::NoDev => dev = false,
            MountOption::Suid => suid = true,
            MountOption::NoSuid => suid = false,
            MountOption::RO => flags |= MsFlags::MS_RDONLY,
            MountOption::RW => flags &= !MsFlags::MS_RDONLY,
            MountOption::Exec => flags &= !MsFlags::MS_NOEXEC,
            MountOption::NoExec => flags |= MsFlags::MS_NOEXEC,
            MountOption::Atime => flags &= !MsFlags::MS_NOATIME,
            MountOption::NoAtime => flags |= MsFlags::MS_NOATIME,
            MountOption::Sync => flags |= MsFlags::MS_SYNCHRONOUS,
            MountOption::Async => flags &= !MsFlags::MS_SYNCHRONOUS,
            MountOption::DirSync => flags |= MsFlags::MS_DIRSYNC,
        }
    }
    // nodev,nosuid unless asked otherwise, as libfuse does.
    if !dev {
        flags |= MsFlags::MS_NODEV;
    }
    if !suid {
        flags |= MsFlags::MS_NOSUID;
    }
    if acl != Acl::Owner {
        data.push_str(",allow_other");
    }
    (flags, source, data)
}

impl Drop for OwnMount {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        if !self.done.load(Ordering::SeqCst) && self.still_ours() {
            log::warn!(
                "session on {} ended while mounted: detaching the mount",
                self.mountpoint.display()
            );
            let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Opens /dev/fuse read-write; a refusal names the device, its mode and the
/// next step.
fn open_dev_fuse() -> Result<OwnedFd, StartError> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        Ok(f) => Ok(f.into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            err("/dev/fuse does not exist: load the fuse module (modprobe fuse)")
        }
        Err(e) => {
            let mode = std::fs::metadata("/dev/fuse")
                .map(|m| {
                    format!(
                        "mode {:04o}, owner {}:{}",
                        m.mode() & 0o7777,
                        m.uid(),
                        m.gid()
                    )
                })
                .unwrap_or_else(|_| "mode unknown".into());
            err(format!(
                "cannot open /dev/fuse ({mode}): {e}; run as root or give this user read-write access to /dev/fuse"
            ))
        }
    }
}

/// Readahead window of the mount, in KiB. FUSE starts a mount at the
/// kernel's default (128 KiB) and FUSE_INIT can only lower it; the cached
/// data path turns every readahead into one O_DIRECT read of the device, so
/// a sequential reader is served by fewer, larger reads with a wider window.
const READAHEAD_KB: u32 = 1024;

/// Sets the mount's readahead and, for a write-back mount, its dirty-page
/// limits through its BDI in sysfs (root only; a failure costs speed, never
/// correctness). Found through mountinfo, never by a stat of the
/// mountpoint: nothing serves this mount's requests yet.
///
/// FUSE gives every mount a strict dirty limit of 1% of the system's
/// dirty threshold (`strict_limit`, `max_ratio` 1), which throttles a
/// write-back mount's writers to the device's speed after a few MiB. A
/// write-back mount of migsafe is a block device's cache in all but name,
/// so it gets a block device's limits: no strict limit, up to the whole
/// threshold (`vm.dirty_ratio` / `vm.dirty_bytes`, as for the device
/// itself). An operator bounds one mount with `max_bytes` and
/// `strict_limit` in the same directory (README "Write-back devices").
pub(super) fn tune_bdi(mountpoint: &Path, writeback: bool) {
    let canonical = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let Some(dev) = top_mount_at(&canonical).map(|m| m.dev) else {
        return;
    };
    let mut knobs = vec![("read_ahead_kb", READAHEAD_KB)];
    if writeback {
        knobs.extend([("strict_limit", 0), ("max_ratio", 100)]);
    }
    for (name, value) in knobs {
        let knob = format!("/sys/class/bdi/{dev}/{name}");
        if let Err(e) = std::fs::write(&knob, format!("{value}\n")) {
            log::info!("{} ({name}): {knob}: {e}", mountpoint.display());
        }
    }
}

/// The mount on top at `path` (canonicalized), if `path` is a mountpoint.
pub(super) fn top_mount(path: &Path) -> Option<MountEntry> {
    top_mount_at(&std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()))
}

/// Like [`top_mount`] for a path already canonical; touches no filesystem
/// but /proc.
fn top_mount_at(canonical: &Path) -> Option<MountEntry> {
    mountinfo()
        .into_iter()
        .rev()
        .find(|m| m.mountpoint == canonical)
}
