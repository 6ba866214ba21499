//! Backing `stat` → FUSE attributes, and the kernel's rules for clearing
//! set-id bits that the daemon applies itself.

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::session::{Errno, FileAttr, FileHandle, FileType, INodeNo, Request};

use super::MigsafeFs;
use super::inodes::Inode;
use crate::error::Error;
use crate::image::DataPath;
use crate::sys;

/// How long the kernel may cache attributes and entries. Short, because the
/// backing is shared storage that other hosts change; `invalidate` drops them
/// at once when it matters.
pub const TTL: Duration = Duration::from_secs(1);

/// How long the kernel may keep a name bound to its node without asking:
/// not at all. Without `default_permissions` the kernel checks no search
/// permission on the directories of a path; the daemon's lookup, made as
/// the caller, is that check. A cached name would skip it, so a caller
/// could still reach `dir/name` for up to a TTL after `dir` was made
/// unsearchable (pjdfstest's `*/05.t`). Lookups are rare next to the I/O
/// that matters here: an image is looked up at open, not per request.
pub const ENTRY_TTL: Duration = Duration::ZERO;

fn time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs())
    }
}

pub fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

pub fn from_stat(nodeid: u64, st: &libc::stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(nodeid),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
        kind: file_type(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
    }
}

/// A `--device` entry: a regular file of the device's size, with the device
/// node's owner, mode bits and times.
pub fn device(nodeid: u64, node: &libc::stat, size: u64) -> FileAttr {
    let mut attr = from_stat(nodeid, node);
    attr.kind = FileType::RegularFile;
    attr.size = size;
    attr.blocks = size.div_ceil(512);
    attr.rdev = 0;
    attr.nlink = 1;
    attr.blksize = 4096;
    attr
}

/// Attributes of the control directory and its files: owned by root (or
/// the mounting user), times fixed at mount.
pub fn virtual_node(
    nodeid: u64,
    dir: bool,
    perm: u16,
    uid: u32,
    gid: u32,
    at: SystemTime,
) -> FileAttr {
    FileAttr {
        ino: INodeNo(nodeid),
        size: 0,
        blocks: 0,
        atime: at,
        mtime: at,
        ctime: at,
        kind: if dir {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm,
        nlink: if dir { 2 } else { 1 },
        uid,
        gid,
        rdev: 0,
        blksize: 4096,
    }
}

const SET_ID: u32 = libc::S_ISUID | libc::S_ISGID;

/// True when `new` is exactly the mode the kernel asks for when it clears
/// the set-id bits of `cur` for a writer (`fuse_setattr`, without
/// `handle_killpriv`): set-uid removed, set-gid removed if group-executable,
/// nothing else changed. Any other mode is a chmod of the caller's own.
pub fn is_set_id_clearing(cur: u32, new: u32) -> bool {
    let cur = cur & 0o7777;
    let mut cleared = cur & !libc::S_ISUID;
    if cur & (libc::S_ISGID | libc::S_IXGRP) == libc::S_ISGID | libc::S_IXGRP {
        cleared &= !libc::S_ISGID;
    }
    cleared != cur && new & 0o7777 == cleared
}

/// The set-id bits a write by `caller`, who lacks CAP_FSETID, clears by the
/// kernel's rule (`setattr_should_drop_suidgid`): set-uid always, set-gid
/// when the file is group-executable or the caller is not in its group;
/// none for anything but a regular file.
pub fn set_id_bits_killed_by_write(st: &libc::stat, caller: impl FnOnce() -> sys::Caller) -> u32 {
    if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_mode & SET_ID == 0 {
        return 0;
    }
    let caller = caller();
    let mut kill = st.st_mode & libc::S_ISUID;
    if st.st_mode & libc::S_ISGID != 0
        && (st.st_mode & libc::S_IXGRP != 0 || !caller.in_group(st.st_gid))
    {
        kill |= libc::S_ISGID;
    }
    kill
}

impl MigsafeFs {
    /// A chmod the caller was refused (not the owner) may still be the
    /// kernel clearing set-id bits for a writer, which it asks for in the
    /// writer's name however the file is owned: allowed when the mode is
    /// exactly that clearing, the caller (whose identity is in force) may
    /// write the file, and a write is under way: the same request truncates
    /// (truncate, O_TRUNC), or a writable handle of the file is open through
    /// this mount (a write or fallocate through it). A chmod of the caller's
    /// own matches none of these and keeps the backing's EPERM: only the
    /// owner changes a mode. (The kernel's request carries no mark of its
    /// own; a non-owner's `chmod` to exactly the cleared mode while a
    /// writable handle is open is taken for it, and clears only what a
    /// write by that caller would clear anyway.)
    pub(crate) fn may_clear_set_id(
        &self,
        inode: &Inode,
        fd: &OwnedFd,
        path: &std::ffi::CStr,
        mode: u32,
        truncates: bool,
    ) -> bool {
        let Ok(st) = sys::fstat_fd(fd.as_fd()) else {
            return false;
        };
        if st.st_mode & libc::S_IFMT != libc::S_IFREG || !is_set_id_clearing(st.st_mode, mode) {
            return false;
        }
        let writing = truncates
            || inode
                .image()
                .is_some_and(|img| img.handles().iter().any(|h| h.writable));
        // With the fs ids and groups switched to the caller's (AT_EACCESS).
        writing && sys::access_effective(path, libc::W_OK).is_ok()
    }

    /// Before a relay write that the kernel flagged FUSE_WRITE_KILL_SUIDGID
    /// (the writer lacks CAP_FSETID): the kernel does not clear set-id bits
    /// itself for direct-I/O files, and the daemon writes their data with
    /// root's rights, which keep them; so the daemon clears them first, by
    /// the rule the kernel applies to a write on a local filesystem.
    /// (Passthrough writes do not come here: for them the kernel sends the
    /// chmod that `do_setattr` accepts.)
    pub(crate) fn clear_set_id_before_write(
        &self,
        req: &Request,
        fh: FileHandle,
    ) -> Result<(), Error> {
        let Ok(h) = self.file_handle(fh) else {
            return Ok(());
        };
        if h.data_path != DataPath::Relay {
            return Ok(());
        }
        let st = sys::fstat_fd(h.file.as_fd()).map_err(|e| Errno::from_i32(sys::errno_of(&e)))?;
        let kill = set_id_bits_killed_by_write(&st, || super::caller::caller_of(req));
        if kill == 0 {
            return Ok(());
        }
        if let Err(e) = sys::fchmod(h.file.as_fd(), st.st_mode & 0o7777 & !kill) {
            log::warn!("write {}: clearing set-id bits: {e}", h.image.path());
            return Err(e.into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_the_kernels_set_id_clearing() {
        assert!(is_set_id_clearing(0o4777, 0o777));
        assert!(is_set_id_clearing(0o6777, 0o777));
        assert!(is_set_id_clearing(0o6767, 0o2767));
        assert!(is_set_id_clearing(0o2775, 0o775));
        assert!(is_set_id_clearing(
            libc::S_IFREG | 0o6755,
            libc::S_IFREG | 0o755
        ));
        // Not what the kernel asks: set-gid of a group-executable file
        // goes with set-uid; nothing else may change.
        assert!(!is_set_id_clearing(0o6777, 0o2777));
        assert!(!is_set_id_clearing(0o6777, 0o4777));
        assert!(!is_set_id_clearing(0o4777, 0o4777));
        assert!(!is_set_id_clearing(0o4777, 0o775));
        assert!(!is_set_id_clearing(0o777, 0o777));
        assert!(!is_set_id_clearing(0o2767, 0o767));
        assert!(!is_set_id_clearing(0o777, 0o4777));
    }

    #[test]
    fn kernel_rule_for_writes() {
        let mut st = sys::zeroed_stat();
        st.st_gid = 50;
        let nobody = || sys::Caller {
            uid: 65534,
            gid: 65534,
            groups: vec![],
        };
        let member = || sys::Caller {
            uid: 65534,
            gid: 65534,
            groups: vec![50],
        };
        st.st_mode = libc::S_IFREG | 0o6777;
        assert_eq!(set_id_bits_killed_by_write(&st, nobody), SET_ID);
        assert_eq!(set_id_bits_killed_by_write(&st, member), SET_ID);
        st.st_mode = libc::S_IFREG | 0o2767;
        assert_eq!(set_id_bits_killed_by_write(&st, nobody), libc::S_ISGID);
        assert_eq!(set_id_bits_killed_by_write(&st, member), 0);
        st.st_mode = libc::S_IFDIR | 0o2777;
        assert_eq!(set_id_bits_killed_by_write(&st, nobody), 0);
    }
}
