//! Metadata of a backing node: mode, owner, size, times, access checks and
//! extended attributes. The calls that take a path are given the
//! `/proc/self/fd/N` link of the node's fd (what passthrough_hp does), so a
//! rename cannot redirect them; the others act on the fd itself.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::check;

/// `chmod(path, mode)`.
pub fn chmod(path: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: path is NUL-terminated and lives across the call.
    let ret = unsafe { libc::chmod(path.as_ptr(), mode as libc::mode_t) };
    check(ret as libc::c_long).map(|_| ())
}

/// `fchmod(fd, mode)` on an open file description.
pub fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    // SAFETY: fd is a valid descriptor borrowed for the call; no memory is passed.
    let ret = unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) };
    check(ret as libc::c_long).map(|_| ())
}

/// `fchownat(fd, "", uid, gid, AT_EMPTY_PATH)`: changes the owner of the node
/// an (O_PATH) fd refers to, a symlink included; `u32::MAX` leaves an id as is.
pub fn chown_fd(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: the empty path is NUL-terminated and, with AT_EMPTY_PATH, makes
    // the call act on fd itself, a valid descriptor borrowed for the call.
    let ret =
        unsafe { libc::fchownat(fd.as_raw_fd(), c"".as_ptr(), uid, gid, libc::AT_EMPTY_PATH) };
    check(ret as libc::c_long).map(|_| ())
}

/// `truncate(path, size)`.
pub fn truncate(path: &CStr, size: u64) -> io::Result<()> {
    // SAFETY: path is NUL-terminated and lives across the call.
    let ret = unsafe { libc::truncate(path.as_ptr(), size as libc::off_t) };
    check(ret as libc::c_long).map(|_| ())
}

/// `utimensat(AT_FDCWD, path, times, 0)`: atime and mtime of what `path`
/// leads to (`UTIME_OMIT`/`UTIME_NOW` allowed).
pub fn utimens_path(path: &CStr, times: &[libc::timespec; 2]) -> io::Result<()> {
    // SAFETY: path is NUL-terminated; times points to exactly the two
    // timespecs utimensat reads; both live across the call.
    let ret = unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), times.as_ptr(), 0) };
    check(ret as libc::c_long).map(|_| ())
}

/// `utimensat(fd, "", times, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)`: the times
/// of the node an O_PATH fd refers to itself, also a symlink's own (Linux 5.8+).
pub fn utimens_fd(fd: BorrowedFd<'_>, times: &[libc::timespec; 2]) -> io::Result<()> {
    // SAFETY: the empty path is NUL-terminated and, with AT_EMPTY_PATH, makes
    // the call act on fd itself, valid for the call; times points to exactly
    // the two timespecs utimensat reads.
    let ret = unsafe {
        libc::utimensat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            times.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    check(ret as libc::c_long).map(|_| ())
}

/// `faccessat(AT_FDCWD, path, mask, AT_EACCESS)`: the check made with this
/// thread's filesystem ids and groups (those of the caller being served)
/// rather than its real ids. `mask` combines `R_OK`, `W_OK`, `X_OK`.
pub fn access_effective(path: &CStr, mask: i32) -> io::Result<()> {
    // SAFETY: path is NUL-terminated and lives across the call.
    let ret = unsafe { libc::faccessat(libc::AT_FDCWD, path.as_ptr(), mask, libc::AT_EACCESS) };
    check(ret as libc::c_long).map(|_| ())
}

/// `getxattr(path, name)` into `buf`; an empty `buf` asks for the size.
/// Returns the value's length.
pub fn getxattr(path: &CStr, name: &CStr, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: both strings are NUL-terminated; buf is writable for buf.len()
    // bytes and the kernel writes at most that many.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    check(n as libc::c_long).map(|n| n as usize)
}

/// `listxattr(path)` into `buf`; an empty `buf` asks for the size. Returns
/// the length of the NUL-separated name list.
pub fn listxattr(path: &CStr, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: path is NUL-terminated; buf is writable for buf.len() bytes
    // and the kernel writes at most that many.
    let n = unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    check(n as libc::c_long).map(|n| n as usize)
}

/// `setxattr(path, name, value, flags)`; `flags` is 0, `XATTR_CREATE` or
/// `XATTR_REPLACE`.
pub fn setxattr(path: &CStr, name: &CStr, value: &[u8], flags: i32) -> io::Result<()> {
    // SAFETY: both strings are NUL-terminated; value is readable for
    // value.len() bytes and the kernel reads no more.
    let ret = unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    };
    check(ret as libc::c_long).map(|_| ())
}

/// `removexattr(path, name)`.
pub fn removexattr(path: &CStr, name: &CStr) -> io::Result<()> {
    // SAFETY: both strings are NUL-terminated and live across the call.
    let ret = unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) };
    check(ret as libc::c_long).map(|_| ())
}
