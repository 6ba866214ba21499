//! The `/dev/fuse` ioctls the session layer needs: cloning a connection's
//! fd for another worker thread, and registering a passthrough backing
//! file with the connection (and dropping it again).

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use super::check;

/// `_IOC(dir, 229, nr, size)` as the kernel's uapi `fuse.h` spells it.
const fn fuse_ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (229 << 8) | nr
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
/// FUSE_DEV_IOC_CLONE: `_IOR(229, 0, uint32_t)`.
const FUSE_DEV_IOC_CLONE: u64 = fuse_ioc(IOC_READ, 0, 4);
/// FUSE_DEV_IOC_BACKING_OPEN: `_IOW(229, 1, struct fuse_backing_map)`.
const FUSE_DEV_IOC_BACKING_OPEN: u64 = fuse_ioc(IOC_WRITE, 1, 16);
/// FUSE_DEV_IOC_BACKING_CLOSE: `_IOW(229, 2, uint32_t)`.
const FUSE_DEV_IOC_BACKING_CLOSE: u64 = fuse_ioc(IOC_WRITE, 2, 4);

/// `struct fuse_backing_map`: the backing fd and flags (none defined yet).
#[repr(C)]
struct BackingMap {
    fd: i32,
    flags: u32,
    padding: u64,
}

/// Attaches `new` (a fresh open of /dev/fuse) to the connection `session`
/// belongs to, so a worker reads requests and writes replies on its own fd.
pub fn fuse_dev_clone(new: impl AsFd, session: impl AsFd) -> io::Result<()> {
    let src: u32 = session.as_fd().as_raw_fd() as u32;
    // SAFETY: the ioctl reads one u32 through the pointer, which points at
    // `src`, alive for the call; both fds are open (borrowed).
    let ret = unsafe {
        libc::ioctl(
            new.as_fd().as_raw_fd(),
            FUSE_DEV_IOC_CLONE as _,
            &src as *const u32,
        )
    };
    check(ret as libc::c_long).map(|_| ())
}

/// Registers `backing` with the connection of `dev` for kernel passthrough;
/// the id names it in open replies until [`fuse_backing_close`].
pub fn fuse_backing_open(dev: impl AsFd, backing: impl AsFd) -> io::Result<u32> {
    let map = BackingMap {
        fd: backing.as_fd().as_raw_fd(),
        flags: 0,
        padding: 0,
    };
    // SAFETY: the ioctl reads a `struct fuse_backing_map` (16 bytes, the
    // layout above) through the pointer, alive for the call; the kernel
    // takes its own reference to the backing file.
    let ret = unsafe {
        libc::ioctl(
            dev.as_fd().as_raw_fd(),
            FUSE_DEV_IOC_BACKING_OPEN as _,
            &map as *const BackingMap,
        )
    };
    check(ret as libc::c_long).map(|id| id as u32)
}

/// Drops the connection's reference to backing `id`.
pub fn fuse_backing_close(dev: impl AsFd, id: u32) -> io::Result<()> {
    // SAFETY: the ioctl reads one u32 through the pointer, alive for the call.
    let ret = unsafe {
        libc::ioctl(
            dev.as_fd().as_raw_fd(),
            FUSE_DEV_IOC_BACKING_CLOSE as _,
            &id as *const u32,
        )
    };
    check(ret as libc::c_long).map(|_| ())
}
