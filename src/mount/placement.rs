//! Where a mount may go: the refusals (a missing or dead mountpoint, a live
//! migsafe mount already there) and the warnings (hidden entries, a second
//! mount of the same backing).

use std::path::Path;

use super::args::{MountArgs, StartError, err};
use super::kernel::{FSTYPE, top_mount};
use super::options::default_fsname;
use crate::mountinfo::{MountEntry, mountinfo};

/// The mountpoint must be a directory that exists, is no dead FUSE mount
/// and no live migsafe mount.
pub(super) fn check_mountpoint(path: &Path) -> Result<(), StartError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => refuse_live_migsafe(path),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => err(format!(
            "mountpoint {} is a dead FUSE mount (its daemon is gone): umount -l {} and mount again; VMs must reopen their images",
            path.display(),
            path.display()
        )),
        Ok(_) => err(format!("mountpoint {} is not a directory", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => err(format!(
            "mountpoint {} does not exist (create it with mkdir -p)",
            path.display()
        )),
        Err(e) => err(format!("mountpoint {}: {e}", path.display())),
    }
}

/// True for a mount migsafe made (plain `fuse` with a `migsafe:` source is
/// what versions before `fuse.migsafe` left).
fn is_migsafe(m: &MountEntry) -> bool {
    m.fstype == FSTYPE || (m.fstype == "fuse" && m.source.starts_with("migsafe:"))
}

/// A second mount on a live migsafe mountpoint would stack over it: its
/// images and control files vanish under the new mount, and `migsafe ctl`
/// would drive the wrong daemon.
fn refuse_live_migsafe(path: &Path) -> Result<(), StartError> {
    match top_mount(path) {
        Some(m) if is_migsafe(&m) => err(format!(
            "{} is already a live migsafe mount ({}, type {}); a second mount would hide it: unmount it first (umount {}) or choose another mountpoint",
            path.display(),
            m.source,
            m.fstype,
            path.display()
        )),
        _ => Ok(()),
    }
}

/// Warnings (not refusals) about where the mount goes: entries it hides, and
/// another migsafe mount of the same backing on this host (each daemon keeps
/// its own activation state, so the two can disagree about an image).
pub(super) fn warn_about_placement(args: &MountArgs, is_backing: bool) {
    if !is_backing && let Ok(entries) = std::fs::read_dir(&args.mountpoint) {
        let n = entries.count();
        if n > 0 {
            log::warn!(
                "mountpoint {} is not empty ({n} entries): they stay hidden while migsafe is mounted there",
                args.mountpoint.display()
            );
        }
    }
    let source = default_fsname(&args.backing);
    for m in mountinfo() {
        if is_migsafe(&m) && m.source == source {
            log::warn!(
                "backing {} is already mounted by migsafe on {}: two daemons keep separate activation state for the same images; use that mount or unmount it",
                args.backing.display(),
                m.mountpoint.display()
            );
        }
    }
}
