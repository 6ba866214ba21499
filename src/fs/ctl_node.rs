//! The FUSE side of the control directory: its node ids, attributes,
//! lookup and listing, and the open/read/write/setattr glue that hands
//! requests to the control plane (which knows nothing of FUSE nodes).

use std::ffi::{OsStr, OsString};
use std::sync::Arc;

use crate::session::{Errno, FileAttr, FileHandle, FileType, FopenFlags, INodeNo, Request};

use super::inodes::{CTL_DIR, CTL_FIRST};
use super::{MigsafeFs, Open, attr};
use crate::ctl::{self, CtlHandle};
use crate::error::Error;

/// True for the control directory and its files.
pub(crate) fn is_virtual(nodeid: u64) -> bool {
    (CTL_DIR..CTL_FIRST + ctl::FILES.len() as u64).contains(&nodeid)
}

/// The control file index of a node id (None: the directory itself).
fn index_of(nodeid: u64) -> Option<usize> {
    nodeid
        .checked_sub(CTL_FIRST)
        .map(|i| i as usize)
        .filter(|i| *i < ctl::FILES.len())
}

/// The size a command file shows. The kernel holds a FUSE file's inode
/// lock for a whole write (until the daemon answers, which for a command is
/// when it has finished), exclusively unless the open allows parallel
/// direct writes and the write ends within the file's size. With size 0,
/// a command hung on one image would hold up every later command written
/// to the same file, whatever image it names. So command files allow
/// parallel writes and show this size: a write ending below it (any
/// command request at the start of an open file) runs alongside the others.
/// An open with `O_TRUNC` (the shell's `>`) or a write with `O_APPEND`
/// (`>>`) still needs the lock exclusively and waits for the writes in
/// flight on that file.
pub(crate) const COMMAND_FILE_SIZE: u64 = 1 << 20;

/// True for the control files that take commands.
fn is_command(nodeid: u64) -> bool {
    index_of(nodeid).is_some_and(|i| matches!(ctl::FILES[i].1, ctl::CtlFile::Command(_)))
}

/// Entries of the control directory, for readdir.
pub(crate) fn dir_entries() -> Vec<(u64, FileType, OsString)> {
    let mut v = vec![
        (CTL_DIR, FileType::Directory, OsString::from(".")),
        (INodeNo::ROOT.0, FileType::Directory, OsString::from("..")),
    ];
    v.extend(ctl::FILES.iter().enumerate().map(|(i, (n, _))| {
        (
            CTL_FIRST + i as u64,
            FileType::RegularFile,
            OsString::from(n),
        )
    }));
    v
}

impl MigsafeFs {
    pub(crate) fn is_ctl_name(&self, parent: INodeNo, name: &OsStr) -> bool {
        parent == INodeNo::ROOT && name == OsStr::new(&self.config().ctl_name)
    }

    /// Lookups the control plane answers: the directory at the root and
    /// the files in it. None: not a control node, the backing decides.
    pub(crate) fn ctl_lookup(
        &self,
        parent: INodeNo,
        name: &OsStr,
    ) -> Option<Result<FileAttr, Error>> {
        if parent.0 == CTL_DIR {
            return Some(
                ctl::file_index(name.as_encoded_bytes())
                    .map(|i| self.ctl_attr(CTL_FIRST + i as u64))
                    .ok_or(Errno::ENOENT.into()),
            );
        }
        self.is_ctl_name(parent, name)
            .then(|| Ok(self.ctl_attr(CTL_DIR)))
    }

    /// Attributes of a control node: owned by the mounting user, times
    /// fixed at mount. A command file has a size (see [`COMMAND_FILE_SIZE`]),
    /// the others none.
    pub(crate) fn ctl_attr(&self, nodeid: u64) -> FileAttr {
        let mut attr = attr::virtual_node(
            nodeid,
            nodeid == CTL_DIR,
            ctl::file_mode(index_of(nodeid)),
            self.config().owner_uid,
            self.config().owner_gid,
            self.mounted_at,
        );
        if is_command(nodeid) {
            attr.size = COMMAND_FILE_SIZE;
        }
        attr
    }

    fn ctl_handle(&self, fh: FileHandle) -> Option<Arc<CtlHandle>> {
        match self.handles.get(fh.0) {
            Some(Open::Ctl(h)) => Some(h),
            _ => None,
        }
    }

    /// `done` gets the handle number and open flags, from a worker thread
    /// for `status` (see `ControlPlane::open`).
    pub(crate) fn ctl_open(
        &self,
        req: &Request,
        nodeid: u64,
        flags: i32,
        done: impl FnOnce(Result<(u64, FopenFlags), Error>) + Send + 'static,
    ) {
        let Some(index) = index_of(nodeid) else {
            return done(Err(Errno::EISDIR.into()));
        };
        let handles = self.handles.clone();
        let open_flags = if is_command(nodeid) {
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
        } else {
            FopenFlags::FOPEN_DIRECT_IO
        };
        self.ctl.open(index, flags, req.uid(), move |result| {
            // Direct I/O: every read reaches the daemon, the size is
            // irrelevant to reads.
            done(result.map(|h| (handles.add(Open::Ctl(Arc::new(h))), open_flags)))
        });
    }

    pub(crate) fn ctl_read(
        &self,
        fh: FileHandle,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>, Error> {
        let h = self.ctl_handle(fh).ok_or(Errno::EBADF)?;
        Ok(self.ctl.read(&h, offset, size))
    }

    /// Hands a write to the control plane; `done` gets the result, from a
    /// worker thread for commands.
    pub(crate) fn ctl_write(
        &self,
        req: &Request,
        fh: FileHandle,
        data: &[u8],
        done: impl FnOnce(Result<u32, Error>) + Send + 'static,
    ) {
        match self.ctl_handle(fh) {
            Some(h) => self.ctl.write(h, req.uid(), data, done),
            None => done(Err(Errno::EBADF.into())),
        }
    }

    /// `echo x > .ctl/file` truncates first; control files keep their size
    /// (none, or a command file's), but the truncate is checked like a
    /// write.
    pub(crate) fn ctl_setattr(&self, req: &Request, nodeid: u64) -> Result<FileAttr, Error> {
        self.ctl.check_writer(req.uid())?;
        Ok(self.ctl_attr(nodeid))
    }
}
