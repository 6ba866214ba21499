//! The session's `Filesystem`: the op table, and one module per concern behind
//! it (building it at mount time, the inode table, the open handles, the
//! replies, and the operations on names, files and the control directory).

pub mod attr;
mod caller;
mod ctl_node;
mod files;
mod handles;
pub mod inodes;
mod keep;
mod namespace;
mod open;
mod reply;
mod setup;

use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use crate::session::{
    Errno, FileHandle, Filesystem, FopenFlags, INodeNo, InitFlags, KernelConfig, Notifier,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, SetAttr, StatFs, WriteFlags,
};

use crate::ctl::{ControlPlane, FsConfig};
use crate::error::Error;
use crate::image::Registry;
use crate::settings::Settings;
use crate::sys;
use handles::{HandleTable, Open};
use inodes::{Inode, InodeTable};
pub use keep::Keeper;
use reply::{
    reply_attr, reply_create, reply_data, reply_empty, reply_entry, reply_offset, reply_open,
    reply_written, reply_xattr,
};

pub use crate::datapath::{DataPath, IoMode, Writeback};

pub struct MigsafeFs {
    /// The mount's one record: configuration, settings, registry, backing
    /// root, device entries and the control plane (reached through the
    /// accessors below).
    pub(crate) ctl: Arc<ControlPlane>,
    pub(crate) inodes: InodeTable,
    /// Shared with the worker threads that finish a control file's open.
    handles: Arc<HandleTable>,
    /// Filled after the session exists; used from worker threads only.
    pub notifier: Arc<OnceLock<Notifier>>,
    pub(crate) mounted_at: SystemTime,
}

impl MigsafeFs {
    pub(crate) fn config(&self) -> &FsConfig {
        &self.ctl.config
    }

    pub(crate) fn settings(&self) -> &Settings {
        &self.ctl.settings
    }

    pub(crate) fn registry(&self) -> &Registry {
        &self.ctl.registry
    }

    pub(crate) fn root_fd(&self) -> &Arc<OwnedFd> {
        &self.ctl.root_fd
    }

    /// (name, node id) of the `--device` entries, in command-line order.
    pub(crate) fn devices(&self) -> impl Iterator<Item = (&str, u64)> {
        self.ctl
            .devices
            .iter()
            .map(|(name, image)| (name.as_str(), image.nodeid.load(Ordering::Relaxed)))
    }

    pub(crate) fn inode(&self, ino: INodeNo) -> Result<Arc<Inode>, Error> {
        self.inodes.get(ino.0).ok_or(Errno::ENOENT.into())
    }

    /// The path of `name` in directory `parent`, relative to the mount root.
    pub(crate) fn child_path(parent: &Inode, name: &OsStr) -> String {
        let p = parent.path.read().expect("path lock");
        if p.is_empty() {
            name.to_string_lossy().into_owned()
        } else {
            format!("{p}/{}", name.to_string_lossy())
        }
    }

    pub(crate) fn device_at_root(&self, parent: INodeNo, name: &OsStr) -> Option<u64> {
        if parent != INodeNo::ROOT {
            return None;
        }
        self.devices()
            .find(|(n, _)| OsStr::new(n) == name)
            .map(|(_, id)| id)
    }

    /// Attributes of a node of the inode table (a backing entry or a
    /// `--device` entry); control nodes are not in it (`ctl_attr`).
    pub(crate) fn attr_of(&self, inode: &Inode) -> Result<crate::session::FileAttr, Error> {
        if let Some(dev) = &inode.device {
            return Ok(attr::device(inode.nodeid, &dev.node_stat()?, dev.size()));
        }
        let fd = inode.fd.as_ref().ok_or(Errno::EIO)?;
        // Never the length of a growing cached write half done.
        let _size = inode.image().map(|img| img.io_locks.shared());
        let st = sys::fstat_fd(std::os::fd::AsFd::as_fd(&**fd))?;
        Ok(attr::from_stat(inode.nodeid, &st))
    }

    pub(crate) fn passthrough_active(&self) -> bool {
        self.ctl.passthrough_active.load(Ordering::Relaxed)
    }

    pub(crate) fn writeback_active(&self) -> bool {
        self.ctl.writeback_active.load(Ordering::Relaxed)
    }

    /// How long the kernel may keep these attributes. On a write-back
    /// connection a buffered write asks for attributes (GETATTR with the
    /// writer's handle) only when the kept ones are stale, and that request
    /// is the one moment the daemon can refuse the write (see
    /// `refuse_fenced_writer`); so the attributes of an image that is not
    /// active are never kept. Elsewhere `attr::TTL`.
    fn attr_ttl(&self, result: &Result<crate::session::FileAttr, Error>) -> Duration {
        let not_active = || {
            let Ok(a) = result else { return false };
            self.inodes
                .get(a.ino.0)
                .and_then(|i| i.image().cloned())
                .is_some_and(|img| !img.is_active())
        };
        if self.writeback_active() && not_active() {
            Duration::ZERO
        } else {
            attr::TTL
        }
    }

    /// On a write-back connection the kernel asks for attributes with the
    /// writer's handle (FUSE_GETATTR_FH) before it copies a buffered write
    /// into its cache, and only then: a size or time it keeps itself. So a
    /// writable handle's request for a fenced image is a write after the
    /// fence, refused here with `EROFS` at write time, as on the other data
    /// paths; left to write-back it would fail at the writer's next fsync,
    /// which QEMU (cache=writeback) turns into a permanent failure of every
    /// later flush, also once a cancelled migration's source is active
    /// again. A write racing the fence itself is refused at write-back.
    fn refuse_fenced_writer(&self, fh: FileHandle) -> Result<(), Error> {
        if !self.writeback_active() {
            return Ok(());
        }
        let Ok(h) = self.file_handle(fh) else {
            return Ok(());
        };
        if !h.writable {
            return Ok(());
        }
        // Waits while `inactivate` decides, as a write does.
        h.image.admit_write(self.settings()).map(drop)
    }
}

impl Filesystem for MigsafeFs {
    fn init(&mut self, config: &mut KernelConfig) -> std::io::Result<()> {
        // relay and cached never use passthrough (nor need CAP_SYS_ADMIN).
        let want_pt = matches!(self.config().io, IoMode::Auto | IoMode::Passthrough);
        let pt_offered = config.offered(InitFlags::PASSTHROUGH);
        self.ctl
            .passthrough_supported
            .store(pt_offered && sys::has_cap_sys_admin(), Ordering::Relaxed);
        if want_pt && pt_offered && sys::has_cap_sys_admin() {
            config.request(InitFlags::PASSTHROUGH);
            // Backing files on ordinary filesystems have stack depth 0; 1 also
            // allows a backing that is itself a FUSE mount (mergerfs, NFS-like).
            config.set_max_stack_depth(2);
            self.ctl.passthrough_active.store(true, Ordering::Relaxed);
        } else if self.config().io == IoMode::Passthrough {
            let why = if !pt_offered {
                "the kernel does not offer FUSE passthrough (needs Linux >= 6.9 with CONFIG_FUSE_PASSTHROUGH)"
            } else {
                "FUSE passthrough needs CAP_SYS_ADMIN (run as root)"
            };
            return Err(std::io::Error::other(format!(
                "--io passthrough: {why}; use --io relay or auto"
            )));
        }
        // mmap of FOPEN_DIRECT_IO (relay) files fails with ENODEV without
        // DIRECT_IO_ALLOW_MMAP; flags the kernel does not offer stay off.
        for flag in [
            InitFlags::DIRECT_IO_ALLOW_MMAP,
            InitFlags::PARALLEL_DIROPS,
            InitFlags::ASYNC_DIO,
        ] {
            config.request(flag);
        }
        if self.config().writeback {
            if !config.offered(InitFlags::WRITEBACK_CACHE) {
                return Err(std::io::Error::other(
                    "--writeback: the kernel does not offer the FUSE writeback cache; \
                     use --writeback off",
                ));
            }
            config.request(InitFlags::WRITEBACK_CACHE);
            self.ctl.writeback_active.store(true, Ordering::Relaxed);
        }
        config.set_max_write(self.config().max_write);
        config.set_max_background(self.config().max_background);
        // The most the kernel offers: FUSE_INIT can only lower the mount's
        // readahead window (mount/kernel.rs widens it through sysfs).
        config.set_max_readahead(self.config().max_write);
        log::info!(
            "mounted: io={:?} passthrough={} writeback={} max_write={} ctl={}",
            self.config().io,
            self.passthrough_active(),
            self.writeback_active(),
            self.config().max_write,
            self.config().ctl_name
        );
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let result = self
            .ctl_lookup(parent, name)
            .unwrap_or_else(|| self.do_lookup(req, parent, name));
        let ttl = self.attr_ttl(&result);
        reply_entry(reply, result, ttl)
    }

    fn forget(&self, ino: INodeNo, nlookup: u64) {
        self.inodes.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        if ctl_node::is_virtual(ino.0) {
            return reply_attr(reply, Ok(self.ctl_attr(ino.0)), attr::TTL);
        }
        if let Some(fh) = fh
            && let Err(e) = self.refuse_fenced_writer(fh)
        {
            return reply_attr(reply, Err(e), attr::TTL);
        }
        let result = self.inode(ino).and_then(|i| self.attr_of(&i));
        let ttl = self.attr_ttl(&result);
        reply_attr(reply, result, ttl)
    }

    fn setattr(&self, req: &Request, ino: INodeNo, changes: SetAttr, reply: ReplyAttr) {
        if ctl_node::is_virtual(ino.0) {
            return reply_attr(reply, self.ctl_setattr(req, ino.0), attr::TTL);
        }
        let result = self.do_setattr(req, ino, changes);
        let ttl = self.attr_ttl(&result);
        reply_attr(reply, result, ttl)
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        reply_data(reply, self.do_readlink(ino))
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        reply_entry(
            reply,
            self.do_mknod(req, parent, name, mode, rdev),
            attr::TTL,
        )
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, reply: ReplyEntry) {
        reply_entry(reply, self.do_mkdir(req, parent, name, mode), attr::TTL)
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.do_remove(req, parent, name, false))
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.do_remove(req, parent, name, true))
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        reply_entry(
            reply,
            self.do_symlink(req, parent, link_name, target),
            attr::TTL,
        )
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    ) {
        reply_empty(
            reply,
            self.do_rename(req, parent, name, newparent, newname, flags),
        )
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply_entry(reply, self.do_link(req, ino, newparent, newname), attr::TTL)
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: i32, reply: ReplyOpen) {
        if ctl_node::is_virtual(ino.0) {
            return self.ctl_open(req, ino.0, flags, |result| {
                reply_open(reply, result.map(|(fh, fopen)| (fh, fopen, None)))
            });
        }
        let result = self.do_open(req, ino, flags, &reply);
        reply_open(reply, result)
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        reply: ReplyData,
    ) {
        if ctl_node::is_virtual(ino.0) {
            return reply_data(reply, self.ctl_read(fh, offset, size));
        }
        self.do_read(fh, offset, size, |result| reply_data(reply, result));
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        flags: WriteFlags,
        reply: ReplyWrite,
    ) {
        if ctl_node::is_virtual(ino.0) {
            return self.ctl_write(req, fh, data, |result| reply_written(reply, result));
        }
        if flags.kill_suidgid
            && let Err(e) = self.clear_set_id_before_write(req, fh)
        {
            return reply_written(reply, Err(e));
        }
        reply_written(
            reply,
            self.do_write(fh, offset, data, flags.writeback)
                .map(|n| n as u32),
        )
    }

    fn flush(&self, _req: &Request, ino: INodeNo, fh: FileHandle, reply: ReplyEmpty) {
        if ctl_node::is_virtual(ino.0) {
            return reply.ok();
        }
        reply_empty(reply, self.do_flush(fh))
    }

    fn release(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, reply: ReplyEmpty) {
        self.do_release(fh);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        if ctl_node::is_virtual(ino.0) {
            return reply.ok();
        }
        reply_empty(reply, self.do_fsync(fh, datasync))
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: i32, reply: ReplyOpen) {
        let result = self.do_opendir(req, ino);
        reply_open(reply, result.map(|fh| (fh, FopenFlags::empty(), None)))
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let snapshot = match self.handles.get(fh.0) {
            Some(Open::Dir(d)) => d,
            _ => return reply.error(Errno::EBADF),
        };
        for (i, (ino, kind, name)) in snapshot.entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, reply: ReplyEmpty) {
        self.remove_handle(fh);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.do_fsyncdir(ino, datasync))
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match nix::sys::statvfs::statvfs(
            sys::proc_fd_path(std::os::fd::AsFd::as_fd(self.root_fd())).as_c_str(),
        ) {
            Ok(s) => reply.statfs(&StatFs {
                blocks: s.blocks(),
                bfree: s.blocks_free(),
                bavail: s.blocks_available(),
                files: s.files(),
                ffree: s.files_free(),
                bsize: s.block_size() as u32,
                namelen: s.name_max() as u32,
                frsize: s.fragment_size() as u32,
            }),
            Err(e) => reply.error(Errno::from_i32(e as i32)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.do_setxattr(req, ino, name, value, flags))
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        reply_xattr(reply, self.do_getxattr(req, ino, Some(name), size));
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        reply_xattr(reply, self.do_getxattr(req, ino, None, size));
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.do_removexattr(req, ino, name))
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: i32, reply: ReplyEmpty) {
        reply_empty(reply, self.do_access(req, ino, mask))
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let result = self.do_create(req, parent, name, mode, flags, &reply);
        reply_create(reply, result)
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.do_fallocate(fh, offset, length, mode))
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        reply_offset(reply, self.do_lseek(fh, offset, whence))
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        fh_in: FileHandle,
        offset_in: u64,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        reply: ReplyWrite,
    ) {
        let result = self.do_copy_file_range(fh_in, offset_in, fh_out, offset_out, len);
        reply_written(reply, result.map(|n| n as u32))
    }
}
