//! What tells one file from another that later got the same inode number:
//! its file handle, its birth time, and whether its filesystem is FUSE
//! (whose handles name a node of the FUSE server, not the file for good)
//! or keeps files in memory only.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::check;

/// `MAX_HANDLE_SZ` of linux/exportfs.h: no filesystem encodes a longer one.
const MAX_HANDLE: usize = 128;

/// `name_to_handle_at(fd, "", AT_EMPTY_PATH)`: the handle type (4 bytes,
/// native order) followed by the handle bytes of the file an (O_PATH) fd
/// refers to. Only filesystems that can be exported (open a file by its
/// handle) give one; others fail with `EOPNOTSUPP`, a handle longer than
/// `MAX_HANDLE_SZ` with `EOVERFLOW`.
pub fn file_handle(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    #[repr(C)]
    struct Handle {
        head: libc::file_handle,
        bytes: [u8; MAX_HANDLE],
    }
    let mut h = Handle {
        head: libc::file_handle {
            handle_bytes: MAX_HANDLE as libc::c_uint,
            handle_type: 0,
            f_handle: [],
        },
        bytes: [0; MAX_HANDLE],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: the empty path is NUL-terminated and, with AT_EMPTY_PATH, makes
    // the call act on fd itself, valid for the call; `h` is a file_handle
    // whose handle_bytes (MAX_HANDLE) is exactly the room that follows it,
    // the most the kernel writes; mount_id is a live int.
    let ret = unsafe {
        libc::name_to_handle_at(
            fd.as_raw_fd(),
            c"".as_ptr(),
            &mut h.head,
            &mut mount_id,
            libc::AT_EMPTY_PATH,
        )
    };
    check(ret as libc::c_long)?;
    let len = (h.head.handle_bytes as usize).min(MAX_HANDLE);
    let mut out = h.head.handle_type.to_ne_bytes().to_vec();
    out.extend_from_slice(&h.bytes[..len]);
    Ok(out)
}

/// Birth time (seconds, nanoseconds) of the file an (O_PATH) fd refers to,
/// `statx(STATX_BTIME)`; None where the filesystem does not report one.
pub fn birth_time(fd: BorrowedFd<'_>) -> Option<(i64, u32)> {
    // SAFETY: statx holds only integers, for which all-zero bytes are valid.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the empty path is NUL-terminated, stx is a live statx the
    // kernel fills; with AT_EMPTY_PATH the call acts on fd itself.
    let ret = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_BTIME,
            &mut stx,
        )
    };
    if ret != 0 || stx.stx_mask & libc::STATX_BTIME == 0 {
        return None;
    }
    Some((stx.stx_btime.tv_sec, stx.stx_btime.tv_nsec))
}

/// The `fstatfs` magic number of the filesystem of `fd`.
fn fs_magic(fd: BorrowedFd<'_>) -> io::Result<libc::__fsword_t> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: fd is valid for the call and st is writable memory of the
    // right size, filled by the kernel on success.
    let ret = unsafe { libc::fstatfs(fd.as_raw_fd(), st.as_mut_ptr()) };
    check(ret as libc::c_long)?;
    // SAFETY: fstatfs succeeded, so st is initialized.
    let st = unsafe { st.assume_init() };
    Ok(st.f_type)
}

/// Whether the filesystem of `fd` is FUSE.
pub fn is_fuse(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(fs_magic(fd)? == libc::FUSE_SUPER_MAGIC)
}

/// Whether `fd` is a regular file on a filesystem that keeps files in
/// memory only (tmpfs, ramfs): its page cache is the file itself, with no
/// storage below that another host could write, and DONTNEED never drops
/// it. A block device is never: `fstatfs` of one names the filesystem of
/// its device node (devtmpfs, a tmpfs), not the device's storage.
pub fn is_memory_backed(fd: BorrowedFd<'_>) -> io::Result<bool> {
    /// linux/magic.h; the libc crate does not name it.
    const RAMFS_MAGIC: libc::__fsword_t = 0x858458f6;
    if super::fstat_fd(fd)?.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Ok(false);
    }
    let magic = fs_magic(fd)?;
    Ok(magic == libc::TMPFS_MAGIC || magic == RAMFS_MAGIC)
}
