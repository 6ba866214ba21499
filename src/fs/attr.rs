//! Backing `stat` → FUSE attributes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo};

/// How long the kernel may cache attributes and entries. Short, because the
/// backing is shared storage that other hosts change; `invalidate` drops them
/// at once when it matters.
pub const TTL: Duration = Duration::from_secs(1);

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
        crtime: time(st.st_ctime, st.st_ctime_nsec),
        kind: file_type(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
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
        crtime: at,
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
        flags: 0,
    }
}
