//! The backing sources of docs/DESIGN.md §2: the backing directory (an O_PATH root
//! that confines every access) and `--device NAME=PATH` entries.

use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::sys;

mod device;
pub use device::Device;

/// Opens the backing directory as the O_PATH root every later access is
/// made relative to.
pub fn open_root(path: &Path) -> Result<OwnedFd, String> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| format!("bad path {}", path.display()))?;
    match sys::openat(sys::cwd(), &c, libc::O_PATH | libc::O_DIRECTORY, 0) {
        Ok(fd) => Ok(fd),
        Err(e) => match e.raw_os_error() {
            Some(libc::ENOENT) => Err(format!(
                "backing directory {} does not exist",
                path.display()
            )),
            Some(libc::ENOTDIR) => Err(format!("backing {} is not a directory", path.display())),
            Some(libc::EACCES) | Some(libc::EPERM) => Err(format!(
                "backing directory {}: permission denied",
                path.display()
            )),
            _ => Err(format!("backing directory {}: {e}", path.display())),
        },
    }
}

/// Refuses a mountpoint beneath the backing directory, also when reached
/// through a bind mount or symlink of it: every lookup of that entry would
/// go through migsafe's own mount back into migsafe, and the event-loop
/// threads end up waiting on themselves (the whole mount hangs in D state).
/// Returns true when the mountpoint *is* the backing directory (a mount over
/// its own backing, which is safe: the backing is reached through the fd
/// opened before the mount).
pub fn check_mountpoint_outside(
    root: &OwnedFd,
    backing: &Path,
    mountpoint: &Path,
) -> Result<bool, String> {
    let root_st = sys::fstat_fd(root.as_fd())
        .map_err(|e| format!("backing directory {}: {e}", backing.display()))?;
    let same = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .ok()
            .and_then(|c| sys::stat_path(&c).ok())
            .is_some_and(|st| st.st_dev == root_st.st_dev && st.st_ino == root_st.st_ino)
    };
    let Ok(canonical) = std::fs::canonicalize(mountpoint) else {
        return Ok(false);
    };
    if same(&canonical) {
        return Ok(true);
    }
    let mut up = canonical.parent();
    while let Some(dir) = up {
        if same(dir) {
            return Err(format!(
                "mountpoint {} is inside the backing directory {} (at {}): migsafe would serve its own mount and hang; choose a mountpoint outside {}",
                mountpoint.display(),
                backing.display(),
                dir.display(),
                backing.display()
            ));
        }
        up = dir.parent();
    }
    Ok(false)
}

/// Validates a `--device NAME=PATH`: a name that is one free path component
/// at the root, a block device or regular file that opens read-write, and
/// its size (BLKGETSIZE64 for block devices).
pub fn open_device(
    name: &str,
    path: &Path,
    root: &OwnedFd,
    ctl_name: &str,
) -> Result<Device, String> {
    if !sys::is_component(name.as_bytes()) || name == ctl_name {
        return Err(format!(
            "--device {name}={}: invalid name {name:?}",
            path.display()
        ));
    }
    let cname = CString::new(name).map_err(|_| format!("--device {name}: invalid name"))?;
    if sys::fstatat(root.as_fd(), &cname).is_ok() {
        return Err(format!(
            "--device {name}={}: the backing directory already has an entry {name:?}; pick another name",
            path.display()
        ));
    }
    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| format!("bad path {}", path.display()))?;
    let stat =
        sys::stat_path(&cpath).map_err(|e| format!("--device {name}={}: {e}", path.display()))?;
    let fmt = stat.st_mode & libc::S_IFMT;
    if fmt != libc::S_IFBLK && fmt != libc::S_IFREG {
        return Err(format!(
            "--device {name}={}: not a block device or regular file",
            path.display()
        ));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| {
            format!(
                "--device {name}={}: cannot open read-write: {e}",
                path.display()
            )
        })?;
    let size = crate::cache::file_size(&file)
        .map_err(|e| format!("--device {name}={}: cannot read size: {e}", path.display()))?;
    Ok(Device::new(
        name.to_string(),
        path.to_path_buf(),
        stat,
        size,
    ))
}
