//! Where a control file is, and what an error on one means for an operator.

use std::path::Path;

pub(super) fn ctl_dir(mountpoint: &Path, ctl_name: &str) -> std::path::PathBuf {
    mountpoint.join(ctl_name)
}

/// True for the errnos of a FUSE mount whose daemon has gone (killed,
/// crashed, or the connection aborted through fusectl).
pub(super) fn daemon_gone(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOTCONN) | Some(libc::ECONNABORTED)
    )
}

/// The message for an error on control file `path`, saying what it means
/// for an operator and what to do next.
pub(super) fn explain(mountpoint: &Path, path: &Path, e: &std::io::Error) -> String {
    let mnt = mountpoint.display();
    let errno = e
        .raw_os_error()
        .map(crate::sys::errno_name)
        .unwrap_or_else(|| "?".into());
    if daemon_gone(e) {
        return format!(
            "the migsafe daemon of {mnt} is gone ({errno}: {e}): nothing reaches storage \
             through this mount any more. Unmount it with `umount -l {mnt}` and mount it \
             again; then every VM using images there must reopen them (restart it or \
             re-attach its disks), its open files still point at the dead mount"
        );
    }
    match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => format!(
            "cannot write {}: permission denied ({errno}): only root or the user who mounted \
             {mnt} may write control files (any user may read status); run this as root",
            path.display()
        ),
        Some(libc::ENOENT) => format!(
            "cannot open {}: no such file ({errno}): is {mnt} a migsafe mount (and is its \
             control directory named {:?}; see --ctl-name)?",
            path.display(),
            path.parent()
                .and_then(|p| p.file_name())
                .unwrap_or_default()
        ),
        Some(libc::EAGAIN) => format!(
            "cannot open {}: the daemon of {mnt} is busy ({errno}): too many status reads \
             or commands are waiting (another user flooding status?); try again",
            path.display()
        ),
        _ => format!(
            "cannot open {}: {e} ({errno}; is {mnt} a migsafe mount?)",
            path.display()
        ),
    }
}
