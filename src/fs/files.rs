//! I/O on open images: read and write (relay and cached), the sync rules'
//! entry points (fsync, fsync on close), setattr, fallocate, lseek,
//! copy_file_range.

use std::os::fd::AsFd;
use std::sync::atomic::Ordering;

use crate::session::{Errno, FileAttr, FileHandle, INodeNo, Request, SetAttr, TimeOrNow};

use super::MigsafeFs;
use super::inodes::{Inode, Kind};
use crate::backing::Device;
use crate::datapath;
use crate::error::Error;
use crate::image::DataPath;
use crate::sys;

impl MigsafeFs {
    /// `respond` gets the bytes read, borrowed from this thread's buffer
    /// (no copy on the way to the reply).
    pub(super) fn do_read(
        &self,
        fh: FileHandle,
        offset: u64,
        size: u32,
        respond: impl FnOnce(Result<&[u8], Error>),
    ) {
        let h = match self.file_handle(fh) {
            Ok(h) => h,
            Err(e) => return respond(Err(e)),
        };
        h.image.counters.reads.fetch_add(1, Ordering::Relaxed);
        let respond = |res: std::io::Result<&[u8]>| match res {
            Ok(data) => respond(Ok(data)),
            Err(e) => {
                // O_DIRECT openers (QEMU) probe alignment with reads that
                // fail EINVAL on purpose: not worth a warning.
                if h.direct && e.raw_os_error() == Some(libc::EINVAL) {
                    log::debug!("read {} at {offset}: {e}", h.image.path());
                } else {
                    log::warn!("read {} at {offset}: {e}", h.image.path());
                }
                respond(Err(Error::from(e)))
            }
        };
        match h.data_path {
            DataPath::Cached => datapath::cached::read(
                &h.file,
                h.block,
                &h.image.io_locks,
                offset,
                size as usize,
                respond,
            ),
            _ => datapath::relay_read(&h.file, offset, size as usize, respond),
        }
    }

    pub(super) fn do_write(
        &self,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        writeback: bool,
    ) -> Result<usize, Error> {
        let h = self.file_handle(fh)?;
        let res = self.write_handle(&h, offset, data);
        if !writeback {
            // A caller's write: its error fails that call and nothing more.
            return res;
        }
        // A write-back: the writer's call returned long ago and learns of
        // a loss only through its next fsync or close, so a failure stays
        // on the image (sticky until `activate`).
        match res {
            // Written after the fence: never reaches the device, and the
            // writer's next fsync or close gets EROFS from the sticky
            // error. Answered as written, so the kernel records no error
            // of its own: that one would reach every fd open now at its
            // next fsync, also after `activate` (a cancelled migration's
            // source VMM would fail its first flush after taking over).
            Err(Error::Fenced) => {
                h.image.writeback_failed(&Error::Fenced);
                Ok(data.len())
            }
            Err(e) => Err(Error::Sticky(h.image.writeback_failed(&e))),
            ok => ok,
        }
    }

    fn write_handle(
        &self,
        h: &crate::image::Handle,
        offset: u64,
        data: &[u8],
    ) -> Result<usize, Error> {
        let _admitted = h.image.admit_write(self.settings())?;
        let room = h.image.write_room(offset, data.len())?;
        let data = &data[..room];
        h.image.counters.writes.fetch_add(1, Ordering::Relaxed);
        let written = match h.data_path {
            DataPath::Cached if h.image.is_device() => {
                datapath::cached::write(&h.file, h.block, &h.image.io_locks, offset, data)
            }
            DataPath::Cached => {
                let edges = h.edges.as_ref();
                datapath::cached::write_file(
                    &h.file,
                    edges,
                    h.block,
                    &h.image.io_locks,
                    offset,
                    data,
                )
            }
            _ => datapath::relay_write(&h.file, offset, data, h.direct),
        }
        .map_err(|e| {
            log::warn!("write {} at {offset}: {e}", h.image.path());
            Error::from(e)
        });
        h.note_write();
        written
    }

    pub(super) fn do_fsync(&self, fh: FileHandle, datasync: bool) -> Result<(), Error> {
        let h = self.file_handle(fh)?;
        h.fsync(datasync, self.settings())
    }

    /// `close()` waits for FLUSH (not for RELEASE), so the fsync-on-close
    /// rule syncs here and its error reaches the closing process.
    pub(super) fn do_flush(&self, fh: FileHandle) -> Result<(), Error> {
        let h = self.file_handle(fh)?;
        h.sync_on_flush(self.settings())
    }

    pub(super) fn do_setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        ch: SetAttr,
    ) -> Result<FileAttr, Error> {
        let fh = ch.fh;
        let inode = self.inode(ino)?;
        if let Some(dev) = &inode.device {
            return self.setattr_device(req, &inode, dev, &ch, fh);
        }
        let fd = inode.fd.as_ref().ok_or(Errno::EIO)?;
        let path = sys::proc_fd_path(fd.as_fd());
        let is_link = matches!(inode.kind, Kind::Symlink);
        let mut creds = self.as_caller(req)?;
        if let Some(mode) = ch.mode {
            if is_link {
                return Err(Error::Refused(libc::EOPNOTSUPP));
            }
            let chmod = || sys::chmod(&path, mode & 0o7777);
            match chmod() {
                Err(e)
                    if e.raw_os_error() == Some(libc::EPERM)
                        && self.may_clear_set_id(&inode, fd, &path, mode, ch.size.is_some()) =>
                {
                    // What the kernel sends when a writer without
                    // CAP_FSETID writes or truncates a set-id file (it kills
                    // the bits with ATTR_FORCE, whoever owns the file); only
                    // the owner could chmod, so the daemon does it.
                    creds.as_daemon(chmod)??;
                }
                other => other?,
            }
        }
        // Nothing to set is how the kernel sends chown(-1, -1): still a
        // chown on the backing, which updates the ctime there.
        let nothing =
            ch.mode.is_none() && ch.size.is_none() && ch.atime.is_none() && ch.mtime.is_none();
        if ch.uid.is_some() || ch.gid.is_some() || nothing {
            let uid = ch.uid.unwrap_or(u32::MAX);
            let gid = ch.gid.unwrap_or(u32::MAX);
            // On the O_PATH fd itself (also for symlinks).
            sys::chown_fd(fd.as_fd(), uid, gid)?;
        }
        if let Some(size) = ch.size {
            let image = inode.image().ok_or(Errno::EISDIR)?;
            // A truncate is a write: admitted (and so fenced) like one.
            let _admitted = image.admit_write(self.settings())?;
            let handle_file = fh
                .and_then(|fh| self.file_handle(fh).ok())
                .filter(|h| h.writable);
            // Cached images change size alone (datapath/cached.rs).
            let _resize = image.io_locks.resize();
            match handle_file {
                Some(h) => {
                    h.file.set_len(size)?;
                    h.note_write();
                }
                None => sys::truncate(&path, size)?,
            }
        }
        if ch.atime.is_some() || ch.mtime.is_some() {
            let times = [utime(ch.atime), utime(ch.mtime)];
            // A symlink's own times (`touch -h`, `cp -a`): the /proc magic
            // link would lead to its target, so act on the O_PATH fd itself
            // (utimensat takes AT_EMPTY_PATH since Linux 5.8).
            if is_link {
                sys::utimens_fd(fd.as_fd(), &times)
            } else {
                sys::utimens_path(&path, &times)
            }?;
        }
        self.attr_of(&inode)
    }

    /// A device entry's size is the device's: truncating to it is a no-op,
    /// to anything else EINVAL; ownership and mode belong to the device node
    /// (EPERM), and its times are left as they are.
    /// A truncate by path needs write permission on the node, as any
    /// truncate(2) does.
    fn setattr_device(
        &self,
        req: &Request,
        inode: &Inode,
        dev: &Device,
        ch: &SetAttr,
        fh: Option<FileHandle>,
    ) -> Result<FileAttr, Error> {
        if ch.mode.is_some() || ch.uid.is_some() || ch.gid.is_some() {
            dev.check_owner_mode_change()?;
        }
        if let Some(size) = ch.size {
            let by_handle = fh.is_some_and(|fh| self.file_handle(fh).is_ok_and(|h| h.writable));
            if !by_handle {
                dev.check_access(&super::caller::caller_of(req), libc::W_OK)?;
            }
            dev.check_set_len(size)?;
        }
        self.attr_of(inode)
    }

    pub(super) fn do_fallocate(
        &self,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Result<(), Error> {
        let h = self.file_handle(fh)?;
        let _admitted = h.image.admit_write(self.settings())?;
        if mode & (libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE) == 0 {
            // Growing: a device cannot, past its end.
            h.image.grow_allowed(offset.saturating_add(length))?;
        }
        // Punching or zeroing a block between the read and the write of a
        // cached device's read-modify-write would be undone: alone, as size
        // changes.
        let res = {
            let _resize = h.image.io_locks.resize();
            sys::fallocate(h.file.as_fd(), mode, offset, length)
        };
        h.note_write();
        Ok(res?)
    }

    pub(super) fn do_lseek(&self, fh: FileHandle, offset: i64, whence: i32) -> Result<i64, Error> {
        let h = self.file_handle(fh)?;
        Ok(sys::lseek(h.file.as_fd(), offset, whence)?)
    }

    pub(super) fn do_copy_file_range(
        &self,
        fh_in: FileHandle,
        off_in: u64,
        fh_out: FileHandle,
        off_out: u64,
        len: u64,
    ) -> Result<usize, Error> {
        let hin = self.file_handle(fh_in)?;
        let hout = self.file_handle(fh_out)?;
        if hin.data_path == DataPath::Cached || hout.data_path == DataPath::Cached {
            // A copy between the backing fds would skip the FUSE page cache
            // (mapped pages not written back yet) and the cached write
            // path's locks. EOPNOTSUPP makes the kernel copy through this
            // mount's read and write instead.
            return Err(Error::Refused(libc::EOPNOTSUPP));
        }
        let _admitted = hout.image.admit_write(self.settings())?;
        let len = hout
            .image
            .write_room(off_out, len.min(u32::MAX as u64 & !0xfff) as usize)?;
        let res = sys::copy_file_range(hin.file.as_fd(), off_in, hout.file.as_fd(), off_out, len);
        hout.note_write();
        Ok(res?)
    }
}

/// A setattr time as utimensat(2) takes it: not given leaves the time as it
/// is (`UTIME_OMIT`), `Now` is the kernel's clock (`UTIME_NOW`).
fn utime(t: Option<TimeOrNow>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(TimeOrNow::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(TimeOrNow::SpecificTime(t)) => {
            let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            libc::timespec {
                tv_sec: d.as_secs() as i64,
                tv_nsec: d.subsec_nanos() as i64,
            }
        }
    }
}
