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
use std::time::SystemTime;

use crate::session::{
    Errno, FileHandle, Filesystem, FopenFlags, INodeNo, InitFlags, KernelConfig, Notifier,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, SetAttr, StatFs,
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

pub use crate::datapath::{DataPath, IoMode};

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
        config.set_max_write(self.config().max_write);
        config.set_max_background(self.config().max_background);
        // The most the kernel offers: FUSE_INIT can only lower the mount's
        // readahead window (mount/kernel.rs widens it through sysfs).
        config.set_max_readahead(self.config().max_write);
        log::info!(
            "mounted: io={:?} passthrough={} max_write={} ctl={}",
            self.config().io,
            self.passthrough_active(),
            self.config().max_write,
            self.config().ctl_name
        );
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let result = self
            .ctl_lookup(parent, name)
            .unwrap_or_else(|| self.do_lookup(req, parent, name));
        reply_entry(reply, result)
    }

    fn forget(&self, ino: INodeNo, nlookup: u64) {
        self.inodes.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ctl_node::is_virtual(ino.0) {
            return reply_attr(reply, Ok(self.ctl_attr(ino.0)));
        }
        reply_attr(reply, self.inode(ino).and_then(|i| self.attr_of(&i)))
    }

    fn setattr(&self, req: &Request, ino: INodeNo, changes: SetAttr, reply: ReplyAttr) {
        if ctl_node::is_virtual(ino.0) {
            return reply_attr(reply, self.ctl_setattr(req, ino.0));
        }
        reply_attr(reply, self.do_setattr(req, ino, changes))
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
        reply_entry(reply, self.do_mknod(req, parent, name, mode, rdev))
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, reply: ReplyEntry) {
        reply_entry(reply, self.do_mkdir(req, parent, name, mode))
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
        reply_entry(reply, self.do_symlink(req, parent, link_name, target))
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
        reply_entry(reply, self.do_link(req, ino, newparent, newname))
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
        kill_suidgid: bool,
        reply: ReplyWrite,
    ) {
        if ctl_node::is_virtual(ino.0) {
            return self.ctl_write(req, fh, data, |result| reply_written(reply, result));
        }
        if kill_suidgid && let Err(e) = self.clear_set_id_before_write(req, fh) {
            return reply_written(reply, Err(e));
        }
        reply_written(reply, self.do_write(fh, offset, data).map(|n| n as u32))
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
