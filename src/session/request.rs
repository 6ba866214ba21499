//! Taking a request apart: the header, then the opcode's own layout. Names
//! and data borrow the read buffer; nothing is copied.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::abi::{self, Cursor, Short, fattr, opcode};
use super::types::{FileHandle, INodeNo, Request, TimeOrNow};

/// The header every request starts with.
#[derive(Clone, Copy, Debug)]
pub struct Header {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl Header {
    pub fn request(&self) -> Request {
        Request {
            uid: self.uid,
            gid: self.gid,
            pid: self.pid,
        }
    }
}

/// A setattr's changes (only the ones the kernel marked valid).
#[derive(Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeOrNow>,
    pub mtime: Option<TimeOrNow>,
    pub fh: Option<FileHandle>,
}

/// The operations the session passes to the op table; the rest is
/// answered ENOSYS (see [`decode`]).
#[derive(Debug)]
pub enum Operation<'a> {
    Init {
        major: u32,
        minor: u32,
        max_readahead: u32,
        flags: u64,
    },
    Destroy,
    Interrupt,
    Lookup {
        name: &'a OsStr,
    },
    Forget {
        nlookup: u64,
    },
    BatchForget {
        nodes: Vec<(u64, u64)>,
    },
    GetAttr {
        fh: Option<FileHandle>,
    },
    SetAttr(SetAttr),
    ReadLink,
    SymLink {
        name: &'a OsStr,
        target: &'a OsStr,
    },
    MkNod {
        name: &'a OsStr,
        mode: u32,
        rdev: u32,
    },
    MkDir {
        name: &'a OsStr,
        mode: u32,
    },
    Unlink {
        name: &'a OsStr,
    },
    RmDir {
        name: &'a OsStr,
    },
    Rename {
        name: &'a OsStr,
        newparent: INodeNo,
        newname: &'a OsStr,
        flags: u32,
    },
    Link {
        ino: INodeNo,
        newname: &'a OsStr,
    },
    Open {
        flags: i32,
    },
    Read {
        fh: FileHandle,
        offset: u64,
        size: u32,
    },
    Write {
        fh: FileHandle,
        offset: u64,
        data: &'a [u8],
        write_flags: u32,
    },
    StatFs,
    Release {
        fh: FileHandle,
    },
    Fsync {
        fh: FileHandle,
        datasync: bool,
    },
    SetXattr {
        name: &'a OsStr,
        value: &'a [u8],
        flags: i32,
    },
    GetXattr {
        name: &'a OsStr,
        size: u32,
    },
    ListXattr {
        size: u32,
    },
    RemoveXattr {
        name: &'a OsStr,
    },
    Flush {
        fh: FileHandle,
    },
    OpenDir {
        flags: i32,
    },
    ReadDir {
        fh: FileHandle,
        offset: u64,
        size: u32,
    },
    ReleaseDir {
        fh: FileHandle,
    },
    FsyncDir {
        fh: FileHandle,
        datasync: bool,
    },
    Access {
        mask: i32,
    },
    Create {
        name: &'a OsStr,
        mode: u32,
        flags: i32,
    },
    Ioctl,
    Fallocate {
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
    },
    Lseek {
        fh: FileHandle,
        offset: i64,
        whence: i32,
    },
    CopyFileRange {
        fh_in: FileHandle,
        offset_in: u64,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
    },
    /// An opcode this layer does not serve: answered ENOSYS.
    Unsupported(u32),
}

impl Operation<'_> {
    /// Operations the kernel sends on behalf of no particular caller (page
    /// writeback, readahead, release after the last close, forgets): they
    /// pass the owner-only check of a mount without allow_other.
    pub fn without_caller(&self) -> bool {
        matches!(
            self,
            Operation::Init { .. }
                | Operation::Destroy
                | Operation::Interrupt
                | Operation::Read { .. }
                | Operation::ReadDir { .. }
                | Operation::Forget { .. }
                | Operation::BatchForget { .. }
                | Operation::Write { .. }
                | Operation::Fsync { .. }
                | Operation::FsyncDir { .. }
                | Operation::Release { .. }
                | Operation::ReleaseDir { .. }
        )
    }
}

fn name(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

/// A setattr time: seconds are signed on the wire (times before 1970).
fn time(secs: u64, nsecs: u32) -> SystemTime {
    let secs = secs as i64;
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs)
    } else {
        UNIX_EPOCH - Duration::new(secs.unsigned_abs(), 0) + Duration::new(0, nsecs)
    }
}

/// Splits `buf` (one whole request as read from /dev/fuse) into its header
/// and operation. A request shorter than its layout is an error the caller
/// answers with EIO.
pub fn decode(buf: &[u8]) -> Result<(Header, Operation<'_>), Short> {
    let mut c = Cursor::new(buf);
    let h = Header {
        len: c.u32()?,
        opcode: c.u32()?,
        unique: c.u64()?,
        nodeid: c.u64()?,
        uid: c.u32()?,
        gid: c.u32()?,
        pid: c.u32()?,
    };
    c.skip(4)?; // total_extlen, padding
    let body = &buf[..(h.len as usize).min(buf.len())];
    let mut c = Cursor::new(&body[abi::IN_HEADER_LEN.min(body.len())..]);
    let op = decode_body(h.opcode, &mut c)?;
    Ok((h, op))
}

fn decode_body<'a>(op: u32, c: &mut Cursor<'a>) -> Result<Operation<'a>, Short> {
    Ok(match op {
        opcode::INIT => {
            let major = c.u32()?;
            let minor = c.u32()?;
            let max_readahead = c.u32()?;
            let lo = c.u32()?;
            // flags2 exists from 7.36; an older kernel sends a shorter body.
            let hi = c.u32().unwrap_or(0);
            Operation::Init {
                major,
                minor,
                max_readahead,
                flags: (lo as u64) | ((hi as u64) << 32),
            }
        }
        opcode::DESTROY => Operation::Destroy,
        opcode::INTERRUPT => Operation::Interrupt,
        opcode::LOOKUP => Operation::Lookup {
            name: name(c.name()?),
        },
        opcode::FORGET => Operation::Forget { nlookup: c.u64()? },
        opcode::BATCH_FORGET => {
            let count = c.u32()?;
            c.skip(4)?;
            let mut nodes = Vec::with_capacity(count as usize);
            for _ in 0..count {
                nodes.push((c.u64()?, c.u64()?));
            }
            Operation::BatchForget { nodes }
        }
        opcode::GETATTR => {
            let flags = c.u32()?;
            c.skip(4)?;
            let fh = c.u64()?;
            Operation::GetAttr {
                fh: (flags & abi::GETATTR_FH != 0).then_some(FileHandle(fh)),
            }
        }
        opcode::SETATTR => Operation::SetAttr(decode_setattr(c)?),
        opcode::READLINK => Operation::ReadLink,
        opcode::SYMLINK => {
            let n = name(c.name()?);
            Operation::SymLink {
                name: n,
                target: name(c.name()?),
            }
        }
        opcode::MKNOD => {
            let mode = c.u32()?;
            let rdev = c.u32()?;
            c.skip(8)?; // umask, padding
            Operation::MkNod {
                name: name(c.name()?),
                mode,
                rdev,
            }
        }
        opcode::MKDIR => {
            let mode = c.u32()?;
            c.skip(4)?; // umask
            Operation::MkDir {
                name: name(c.name()?),
                mode,
            }
        }
        opcode::UNLINK => Operation::Unlink {
            name: name(c.name()?),
        },
        opcode::RMDIR => Operation::RmDir {
            name: name(c.name()?),
        },
        opcode::RENAME | opcode::RENAME2 => {
            let newparent = INodeNo(c.u64()?);
            let flags = if op == opcode::RENAME2 {
                let f = c.u32()?;
                c.skip(4)?;
                f
            } else {
                0
            };
            let n = name(c.name()?);
            Operation::Rename {
                name: n,
                newparent,
                newname: name(c.name()?),
                flags,
            }
        }
        opcode::LINK => {
            let ino = INodeNo(c.u64()?);
            Operation::Link {
                ino,
                newname: name(c.name()?),
            }
        }
        opcode::OPEN | opcode::OPENDIR => {
            let flags = c.u32()? as i32;
            if op == opcode::OPEN {
                Operation::Open { flags }
            } else {
                Operation::OpenDir { flags }
            }
        }
        opcode::READ | opcode::READDIR => {
            let fh = FileHandle(c.u64()?);
            let offset = c.u64()?;
            let size = c.u32()?;
            if op == opcode::READ {
                Operation::Read { fh, offset, size }
            } else {
                Operation::ReadDir { fh, offset, size }
            }
        }
        opcode::WRITE => {
            let fh = FileHandle(c.u64()?);
            let offset = c.u64()?;
            let size = c.u32()?;
            let write_flags = c.u32()?;
            c.skip(16)?; // lock_owner, flags, padding
            let data = c.bytes(size as usize)?;
            Operation::Write {
                fh,
                offset,
                data,
                write_flags,
            }
        }
        opcode::STATFS => Operation::StatFs,
        opcode::RELEASE | opcode::RELEASEDIR => {
            let fh = FileHandle(c.u64()?);
            if op == opcode::RELEASE {
                Operation::Release { fh }
            } else {
                Operation::ReleaseDir { fh }
            }
        }
        opcode::FSYNC | opcode::FSYNCDIR => {
            let fh = FileHandle(c.u64()?);
            let datasync = c.u32()? & 1 != 0;
            if op == opcode::FSYNC {
                Operation::Fsync { fh, datasync }
            } else {
                Operation::FsyncDir { fh, datasync }
            }
        }
        opcode::SETXATTR => {
            // FUSE_SETXATTR_EXT is never negotiated: the short layout.
            let size = c.u32()?;
            let flags = c.u32()? as i32;
            let n = name(c.name()?);
            Operation::SetXattr {
                name: n,
                value: c.bytes(size as usize)?,
                flags,
            }
        }
        opcode::GETXATTR | opcode::LISTXATTR => {
            let size = c.u32()?;
            c.skip(4)?;
            if op == opcode::GETXATTR {
                Operation::GetXattr {
                    name: name(c.name()?),
                    size,
                }
            } else {
                Operation::ListXattr { size }
            }
        }
        opcode::REMOVEXATTR => Operation::RemoveXattr {
            name: name(c.name()?),
        },
        opcode::FLUSH => Operation::Flush {
            fh: FileHandle(c.u64()?),
        },
        opcode::ACCESS => Operation::Access {
            mask: c.u32()? as i32,
        },
        opcode::CREATE => {
            let flags = c.u32()? as i32;
            let mode = c.u32()?;
            c.skip(8)?; // umask, open_flags
            Operation::Create {
                name: name(c.name()?),
                mode,
                flags,
            }
        }
        opcode::IOCTL => Operation::Ioctl,
        opcode::FALLOCATE => {
            let fh = FileHandle(c.u64()?);
            let offset = c.u64()?;
            let length = c.u64()?;
            Operation::Fallocate {
                fh,
                offset,
                length,
                mode: c.u32()? as i32,
            }
        }
        opcode::LSEEK => {
            let fh = FileHandle(c.u64()?);
            let offset = c.u64()? as i64;
            Operation::Lseek {
                fh,
                offset,
                whence: c.u32()? as i32,
            }
        }
        opcode::COPY_FILE_RANGE => {
            let fh_in = FileHandle(c.u64()?);
            let offset_in = c.u64()?;
            c.skip(8)?; // nodeid_out
            let fh_out = FileHandle(c.u64()?);
            let offset_out = c.u64()?;
            let len = c.u64()?;
            Operation::CopyFileRange {
                fh_in,
                offset_in,
                fh_out,
                offset_out,
                len,
            }
        }
        other => Operation::Unsupported(other),
    })
}

fn decode_setattr(c: &mut Cursor<'_>) -> Result<SetAttr, Short> {
    let valid = c.u32()?;
    c.skip(4)?;
    let fh = c.u64()?;
    let size = c.u64()?;
    c.skip(8)?; // lock_owner
    let atime = c.u64()?;
    let mtime = c.u64()?;
    c.skip(8)?; // ctime
    let atimensec = c.u32()?;
    let mtimensec = c.u32()?;
    c.skip(4)?; // ctimensec
    let mode = c.u32()?;
    c.skip(4)?;
    let uid = c.u32()?;
    let gid = c.u32()?;
    let has = |bit| valid & bit != 0;
    let when = |now, bit, secs, nsecs| {
        if has(now) {
            Some(TimeOrNow::Now)
        } else if has(bit) {
            Some(TimeOrNow::SpecificTime(time(secs, nsecs)))
        } else {
            None
        }
    };
    Ok(SetAttr {
        mode: has(fattr::MODE).then_some(mode),
        uid: has(fattr::UID).then_some(uid),
        gid: has(fattr::GID).then_some(gid),
        size: has(fattr::SIZE).then_some(size),
        atime: when(fattr::ATIME_NOW, fattr::ATIME, atime, atimensec),
        mtime: when(fattr::MTIME_NOW, fattr::MTIME, mtime, mtimensec),
        fh: has(fattr::FH).then_some(FileHandle(fh)),
    })
}
