//! File descriptors: opening (relative to a directory fd, beneath it, or
//! again through `/proc/self/fd`), a file's name beneath a directory, stat,
//! `dup2`, descriptor flags and the data and rename syscalls that work on fds.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::check;

/// `fstatat(fd, "", AT_EMPTY_PATH|AT_SYMLINK_NOFOLLOW)`: works on O_PATH fds.
pub fn fstat_fd(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: the path is a NUL-terminated empty string and st points to
    // writable memory of the right size; the kernel fills it on success.
    let ret = unsafe {
        libc::fstatat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            st.as_mut_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    check(ret as libc::c_long)?;
    // SAFETY: fstatat succeeded, so st is initialized.
    Ok(unsafe { st.assume_init() })
}

/// `fstatat(dirfd, name, AT_SYMLINK_NOFOLLOW)`.
pub fn fstatat(dirfd: BorrowedFd<'_>, name: &CStr) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: name is NUL-terminated; st is writable and correctly sized.
    let ret = unsafe {
        libc::fstatat(
            dirfd.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    check(ret as libc::c_long)?;
    // SAFETY: fstatat succeeded.
    Ok(unsafe { st.assume_init() })
}

/// `stat(2)` following symlinks.
pub fn stat_path(path: &CStr) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: path is NUL-terminated; st is writable and correctly sized.
    let ret = unsafe { libc::stat(path.as_ptr(), st.as_mut_ptr()) };
    check(ret as libc::c_long)?;
    // SAFETY: stat succeeded.
    Ok(unsafe { st.assume_init() })
}

/// `dup2(src, target)`: makes `target` (a standard descriptor) refer to
/// what `src` refers to.
pub fn dup2(src: BorrowedFd<'_>, target: RawFd) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd; `target` is replaced atomically
    // and owned by the process's standard streams, not by a Rust object.
    check(unsafe { libc::dup2(src.as_raw_fd(), target) } as libc::c_long).map(|_| ())
}

/// AT_FDCWD as a borrowed fd, for `openat` relative to the working directory.
pub fn cwd() -> BorrowedFd<'static> {
    // SAFETY: AT_FDCWD is a sentinel the kernel interprets; it is never closed.
    unsafe { BorrowedFd::borrow_raw(libc::AT_FDCWD) }
}

/// `openat(dirfd, name, flags, mode)` returning an owned fd.
pub fn openat(dirfd: BorrowedFd<'_>, name: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: name is NUL-terminated; on success the returned fd is new and
    // owned by nobody else.
    let fd = unsafe {
        libc::openat(
            dirfd.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode,
        )
    };
    check(fd as libc::c_long)?;
    // SAFETY: fd is a freshly opened descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_BENEATH: u64 = 0x08;

/// `openat2(dirfd, path, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`: the kernel
/// refuses (EXDEV) any resolution that would leave `dirfd`, whether by `..`,
/// an absolute path or a symlink pointing outside, so a path from a control
/// file can never name a file outside the backing.
pub fn openat2_beneath(dirfd: BorrowedFd<'_>, path: &CStr, flags: i32) -> io::Result<OwnedFd> {
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: path is NUL-terminated; how is a live struct of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dirfd.as_raw_fd(),
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    check(fd)?;
    // SAFETY: fd is a freshly opened descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Opens a real file description for an O_PATH fd (through its /proc magic
/// link, as passthrough_hp does): the O_PATH fd pins the inode across renames,
/// and the reopen checks permissions against the caller's fsuid.
pub fn reopen(opath: BorrowedFd<'_>, flags: i32) -> io::Result<File> {
    let path = CString::new(format!("/proc/self/fd/{}", opath.as_raw_fd())).expect("no NUL");
    // SAFETY: path is NUL-terminated; the returned fd is new.
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC, 0) };
    check(fd as libc::c_long)?;
    // SAFETY: fd is a freshly opened descriptor.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// The path of `fd`'s file relative to the directory `root`, as the kernel
/// names both now (their `/proc/self/fd` links, which follow renames made
/// on this host). None when the file is not beneath `root`, the name is not
/// UTF-8, or the file is deleted. Only a hint: the caller must check that
/// the path leads to the file.
pub fn path_beneath(root: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> Option<String> {
    let link = |fd: BorrowedFd<'_>| {
        std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .ok()?
            .into_os_string()
            .into_string()
            .ok()
    };
    let (root, file) = (link(root)?, link(fd)?);
    if file.ends_with(" (deleted)") {
        return None;
    }
    let rel = if root == "/" {
        file.strip_prefix('/')?
    } else {
        file.strip_prefix(&root)?.strip_prefix('/')?
    };
    (!rel.is_empty()).then(|| rel.to_string())
}

/// Clears O_NONBLOCK on an open file description.
pub fn clear_nonblock(fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK))?;
    Ok(())
}

pub fn proc_fd_path(fd: BorrowedFd<'_>) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL")
}

pub fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    let ret = unsafe { libc::fallocate(fd.as_raw_fd(), mode, offset as i64, len as i64) };
    check(ret as libc::c_long).map(|_| ())
}

pub fn lseek(fd: BorrowedFd<'_>, offset: i64, whence: i32) -> io::Result<i64> {
    // SAFETY: plain syscall on a valid fd.
    let ret = unsafe { libc::lseek(fd.as_raw_fd(), offset, whence) };
    check(ret as libc::c_long)
}

pub fn copy_file_range(
    fd_in: BorrowedFd<'_>,
    off_in: u64,
    fd_out: BorrowedFd<'_>,
    off_out: u64,
    len: usize,
) -> io::Result<usize> {
    let mut off_in = off_in as i64;
    let mut off_out = off_out as i64;
    // SAFETY: the offset pointers reference live locals; fds are valid.
    let ret = unsafe {
        libc::copy_file_range(
            fd_in.as_raw_fd(),
            &mut off_in,
            fd_out.as_raw_fd(),
            &mut off_out,
            len,
            0,
        )
    };
    check(ret as libc::c_long).map(|v| v as usize)
}

pub fn renameat2(
    olddir: BorrowedFd<'_>,
    oldname: &CStr,
    newdir: BorrowedFd<'_>,
    newname: &CStr,
    flags: u32,
) -> io::Result<()> {
    // SAFETY: names are NUL-terminated; fds are valid.
    let ret = unsafe {
        libc::renameat2(
            olddir.as_raw_fd(),
            oldname.as_ptr(),
            newdir.as_raw_fd(),
            newname.as_ptr(),
            flags,
        )
    };
    check(ret as libc::c_long).map(|_| ())
}

/// Sets O_DIRECT on an open fd (F_SETFL accepts it on Linux).
pub fn set_direct(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl on a valid fd with integer arguments only.
    let flags = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) } as libc::c_long)?;
    // SAFETY: as above.
    check(
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags as i32 | libc::O_DIRECT) }
            as libc::c_long,
    )
    .map(|_| ())
}

/// Clears O_DIRECT on an open file description.
pub fn clear_direct(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl on a valid fd with integer arguments only.
    let flags = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) } as libc::c_long)?;
    // SAFETY: as above.
    check(unsafe {
        libc::fcntl(
            fd.as_raw_fd(),
            libc::F_SETFL,
            flags as i32 & !libc::O_DIRECT,
        )
    } as libc::c_long)
    .map(|_| ())
}

/// An all-zero `stat`, to fill in field by field (tests build attributes
/// from one).
#[cfg(test)]
pub fn zeroed_stat() -> libc::stat {
    // SAFETY: libc::stat holds only integers (plain old data), for which
    // all-zero bytes are a valid value.
    unsafe { std::mem::zeroed() }
}

/// Takes ownership of an fd received in an SCM_RIGHTS message.
pub fn owned_fd_from_scm_rights(fd: RawFd) -> OwnedFd {
    // SAFETY: the kernel installed `fd` in this process while receiving the
    // message; nothing else refers to it, so it is owned exactly once here.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Takes ownership of fd number `fd`, inherited from the parent for this
/// process (named in its environment), and marks it close-on-exec.
pub fn inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // F_GETFD fails with EBADF on a number that is not open: never take
    // ownership of a number nothing stands behind.
    // SAFETY: F_GETFD only reads the flags of the fd table entry.
    check(unsafe { libc::fcntl(fd, libc::F_GETFD) } as libc::c_long)?;
    // SAFETY: the fd is open (checked above) and the parent passed it to
    // this process alone; nothing else in this process refers to it yet.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    nix::fcntl::fcntl(
        &owned,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )?;
    Ok(owned)
}
