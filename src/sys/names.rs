//! Names in a directory: creating and removing nodes relative to a directory
//! fd, hard links to what an O_PATH fd pins, and reading a symlink's target.
//! Every name is a single component the caller has already checked.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::{check, proc_fd_path};

/// `mknodat(dirfd, name, mode, rdev)`: any node type the backing allows.
pub fn mknodat(dirfd: BorrowedFd<'_>, name: &CStr, mode: u32, rdev: u32) -> io::Result<()> {
    // SAFETY: name is NUL-terminated (a &CStr) and lives across the call;
    // dirfd is a valid descriptor borrowed for the call.
    let ret = unsafe { libc::mknodat(dirfd.as_raw_fd(), name.as_ptr(), mode, rdev as libc::dev_t) };
    check(ret as libc::c_long).map(|_| ())
}

/// `mkdirat(dirfd, name, mode)`.
pub fn mkdirat(dirfd: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: name is NUL-terminated and lives across the call; dirfd is a
    // valid descriptor borrowed for the call.
    let ret = unsafe { libc::mkdirat(dirfd.as_raw_fd(), name.as_ptr(), mode as libc::mode_t) };
    check(ret as libc::c_long).map(|_| ())
}

/// `unlinkat(dirfd, name, flags)`; `flags` is 0 or `AT_REMOVEDIR`.
pub fn unlinkat(dirfd: BorrowedFd<'_>, name: &CStr, flags: i32) -> io::Result<()> {
    // SAFETY: name is NUL-terminated and lives across the call; dirfd is a
    // valid descriptor borrowed for the call.
    let ret = unsafe { libc::unlinkat(dirfd.as_raw_fd(), name.as_ptr(), flags) };
    check(ret as libc::c_long).map(|_| ())
}

/// `symlinkat(target, dirfd, name)`: a symlink `name` in `dirfd` to `target`.
pub fn symlinkat(target: &CStr, dirfd: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: both strings are NUL-terminated and live across the call;
    // dirfd is a valid descriptor borrowed for the call.
    let ret = unsafe { libc::symlinkat(target.as_ptr(), dirfd.as_raw_fd(), name.as_ptr()) };
    check(ret as libc::c_long).map(|_| ())
}

/// A new hard link `name` in `dirfd` to the inode an (O_PATH) fd pins:
/// `linkat` following its `/proc/self/fd` magic link, so neither the
/// inode's path nor CAP_DAC_READ_SEARCH (which AT_EMPTY_PATH needs) is needed.
pub fn link_fd(src: BorrowedFd<'_>, dirfd: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let proc_path = proc_fd_path(src);
    // SAFETY: both strings are NUL-terminated and live across the call;
    // dirfd is a valid descriptor borrowed for the call; AT_FDCWD is a
    // sentinel, not a descriptor.
    let ret = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            proc_path.as_ptr(),
            dirfd.as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    check(ret as libc::c_long).map(|_| ())
}

/// The target of the symlink an O_PATH fd refers to (`readlinkat(fd, "")`),
/// up to PATH_MAX bytes.
pub fn readlink_fd(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: the empty path is NUL-terminated and makes readlinkat read the
    // link fd itself refers to; buf is writable for buf.len() bytes and the
    // kernel writes at most that many.
    let n = unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let n = check(n as libc::c_long)?;
    buf.truncate(n as usize);
    Ok(buf)
}
