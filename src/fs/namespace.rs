//! Namespace operations: lookup, create/remove/rename of names, links,
//! directory listing, xattrs. Every backing access is relative to a parent's
//! O_PATH fd with a single-component name and O_NOFOLLOW, so nothing the
//! kernel sends can reach outside the backing directory.

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use fuser::{Errno, FileAttr, FileType, INodeNo, ReplyXattr, Request};

use super::inodes::{self, Inode, Kind};
use super::{MigsafeFs, Open, attr};
use crate::cache::Identity;
use crate::image::{Image, Source};
use crate::sys;

/// A directory's entries, read once at opendir: offsets stay stable for the
/// life of the handle however the backing directory changes meanwhile.
pub(crate) struct DirSnapshot {
    pub entries: Vec<(u64, FileType, OsString)>,
}

fn errno(e: std::io::Error) -> Errno {
    Errno::from_i32(sys::errno_of(&e))
}

/// Rejects names the kernel should never send but a confused client could:
/// anything but a single path component.
fn component(name: &OsStr) -> Result<CString, Errno> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(Errno::EINVAL);
    }
    sys::cstring(name).map_err(|_| Errno::EINVAL)
}

impl MigsafeFs {
    pub(crate) fn parent_dir(&self, parent: INodeNo) -> Result<Arc<Inode>, Errno> {
        let inode = self.inode(parent)?;
        if !inode.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        Ok(inode)
    }

    /// Resolves `name` in `parent` on the backing and enters it into the
    /// inode table (one kernel lookup reference).
    pub(crate) fn do_lookup(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
    ) -> Result<FileAttr, Errno> {
        if let Some(id) = self.device_at_root(parent, name) {
            let inode = self.inodes.get(id).ok_or(Errno::EIO)?;
            return self.attr_of(&inode);
        }
        let dir = self.parent_dir(parent)?;
        let cname = component(name)?;
        let fd = {
            let _creds = self.as_caller(req)?;
            sys::openat(
                dir.fd.as_ref().ok_or(Errno::EIO)?.as_fd(),
                &cname,
                libc::O_PATH | libc::O_NOFOLLOW,
                0,
            )
            .map_err(errno)?
        };
        self.enter(&dir, name, fd)
    }

    /// Adds a freshly opened O_PATH fd of `dir/name` to the inode table.
    pub(crate) fn enter(
        &self,
        dir: &Inode,
        name: &OsStr,
        fd: std::os::fd::OwnedFd,
    ) -> Result<FileAttr, Errno> {
        let st = sys::fstat_fd(fd.as_fd()).map_err(errno)?;
        let identity = Identity::of_stat(&st);
        let path = Self::child_path(dir, name);
        let fd = Arc::new(fd);
        let inode = self.inodes.lookup_or_insert(identity, path.clone(), || {
            let kind = match st.st_mode & libc::S_IFMT {
                libc::S_IFDIR => Kind::Directory,
                libc::S_IFREG => Kind::Image(self.registry.get_or_insert(identity, || {
                    Image::new(
                        identity,
                        Source::File {
                            root: self.root_fd.clone(),
                            live: Default::default(),
                        },
                        path.clone(),
                    )
                })),
                libc::S_IFLNK => Kind::Symlink,
                _ => Kind::Special,
            };
            (fd.clone(), kind)
        });
        if let Some(image) = inode.image() {
            image.set_path(path);
            image.nodeid.store(inode.nodeid, Ordering::Relaxed);
            if let Some(fd) = &inode.fd {
                image.set_live_fd(fd);
            }
        }
        Ok(attr::from_stat(inode.nodeid, &st))
    }

    fn check_name_allowed(&self, parent: INodeNo, name: &OsStr) -> Result<(), Errno> {
        if self.is_ctl_name(parent, name) || parent.0 == inodes::CTL_DIR {
            return Err(Errno::EPERM);
        }
        if self.device_at_root(parent, name).is_some() {
            return Err(Errno::EPERM);
        }
        Ok(())
    }

    fn lookup_after_create(
        &self,
        dir: &Inode,
        name: &OsStr,
        cname: &CString,
    ) -> Result<FileAttr, Errno> {
        let fd = sys::openat(
            dir.fd.as_ref().ok_or(Errno::EIO)?.as_fd(),
            cname,
            libc::O_PATH | libc::O_NOFOLLOW,
            0,
        )
        .map_err(errno)?;
        self.enter(dir, name, fd)
    }

    pub(crate) fn do_mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        rdev: u32,
    ) -> Result<FileAttr, Errno> {
        self.check_name_allowed(parent, name)?;
        let dir = self.parent_dir(parent)?;
        let cname = component(name)?;
        // Any node type, as on the backing: device nodes are inert through
        // the mount (nodev unless mounted with -o dev), the kernel lets
        // only callers with CAP_MKNOD ask for them, and a non-root caller
        // is served without it, so the backing itself refuses others.
        let _creds = self.as_caller(req)?;
        let dirfd = dir.fd.as_ref().ok_or(Errno::EIO)?;
        sys::mknodat(dirfd.as_fd(), &cname, mode, rdev).map_err(errno)?;
        self.lookup_after_create(&dir, name, &cname)
    }

    pub(crate) fn do_mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
    ) -> Result<FileAttr, Errno> {
        if self.is_ctl_name(parent, name) {
            return Err(Errno::EEXIST);
        }
        self.check_name_allowed(parent, name)?;
        let dir = self.parent_dir(parent)?;
        let cname = component(name)?;
        let _creds = self.as_caller(req)?;
        let dirfd = dir.fd.as_ref().ok_or(Errno::EIO)?;
        sys::mkdirat(dirfd.as_fd(), &cname, mode).map_err(errno)?;
        self.lookup_after_create(&dir, name, &cname)
    }

    pub(crate) fn do_remove(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        is_dir: bool,
    ) -> Result<(), Errno> {
        self.check_name_allowed(parent, name)?;
        let dir = self.parent_dir(parent)?;
        let cname = component(name)?;
        let dirfd = dir.fd.as_ref().ok_or(Errno::EIO)?;
        let before = sys::fstatat(dirfd.as_fd(), &cname).ok();
        let _creds = self.as_caller(req)?;
        let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
        sys::unlinkat(dirfd.as_fd(), &cname, flags).map_err(errno)?;
        // The last name of an image is gone: forget its migration state, so a
        // new file that reuses the inode number starts fresh.
        if let Some(st) = before
            && st.st_mode & libc::S_IFMT == libc::S_IFREG
            && st.st_nlink <= 1
        {
            self.registry.remove(&Identity::of_stat(&st));
        }
        Ok(())
    }

    pub(crate) fn do_symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        target: &std::path::Path,
    ) -> Result<FileAttr, Errno> {
        self.check_name_allowed(parent, name)?;
        let dir = self.parent_dir(parent)?;
        let cname = component(name)?;
        let ctarget = sys::cstring(target.as_os_str()).map_err(errno)?;
        let _creds = self.as_caller(req)?;
        let dirfd = dir.fd.as_ref().ok_or(Errno::EIO)?;
        sys::symlinkat(&ctarget, dirfd.as_fd(), &cname).map_err(errno)?;
        self.lookup_after_create(&dir, name, &cname)
    }

    pub(crate) fn do_rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: u32,
    ) -> Result<(), Errno> {
        self.check_name_allowed(parent, name)?;
        self.check_name_allowed(newparent, newname)?;
        let dir = self.parent_dir(parent)?;
        let newdir = self.parent_dir(newparent)?;
        let (cname, cnew) = (component(name)?, component(newname)?);
        let _creds = self.as_caller(req)?;
        let (d1, d2) = (
            dir.fd.as_ref().ok_or(Errno::EIO)?,
            newdir.fd.as_ref().ok_or(Errno::EIO)?,
        );
        sys::renameat2(d1.as_fd(), &cname, d2.as_fd(), &cnew, flags).map_err(errno)?;
        // Keep the moved image's name current for status and control paths.
        if let Ok(st) = sys::fstatat(d2.as_fd(), &cnew) {
            let id = Identity::of_stat(&st);
            if let Some(img) = self.registry.get(&id) {
                img.set_path(Self::child_path(&newdir, newname));
            }
        }
        Ok(())
    }

    pub(crate) fn do_link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
    ) -> Result<FileAttr, Errno> {
        self.check_name_allowed(newparent, newname)?;
        let inode = self.inode(ino)?;
        if inode.device_name.is_some() {
            return Err(Errno::EPERM);
        }
        let newdir = self.parent_dir(newparent)?;
        let cnew = component(newname)?;
        let src = inode.fd.as_ref().ok_or(Errno::EIO)?;
        let _creds = self.as_caller(req)?;
        let dirfd = newdir.fd.as_ref().ok_or(Errno::EIO)?;
        // Through the /proc magic link: links the inode the O_PATH fd pins,
        // without needing its path.
        sys::link_fd(src.as_fd(), dirfd.as_fd(), &cnew).map_err(errno)?;
        self.lookup_after_create(&newdir, newname, &cnew)
    }

    pub(crate) fn do_readlink(&self, ino: INodeNo) -> Result<Vec<u8>, Errno> {
        let inode = self.inode(ino)?;
        let fd = inode.fd.as_ref().ok_or(Errno::EINVAL)?;
        sys::readlink_fd(fd.as_fd()).map_err(errno)
    }

    pub(crate) fn do_opendir(&self, req: &Request, ino: INodeNo) -> Result<u64, Errno> {
        if ino.0 == inodes::CTL_DIR {
            return Ok(self.add_handle(Open::Dir(Arc::new(DirSnapshot {
                entries: super::ctl_node::dir_entries(),
            }))));
        }
        let inode = self.inode(ino)?;
        let fd = inode.fd.as_ref().ok_or(Errno::ENOTDIR)?;
        // Reopen the O_PATH fd itself: that needs read permission on the
        // directory only, as opendir on the backing does, where
        // openat(fd, ".") would also need search permission.
        let dirfd = {
            let _creds = self.as_caller(req)?;
            let dir = sys::reopen(fd.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY).map_err(errno)?;
            std::os::fd::OwnedFd::from(dir)
        };
        let mut dir = nix::dir::Dir::from_fd(dirfd).map_err(|e| Errno::from_i32(e as i32))?;
        let mut entries = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(|e| Errno::from_i32(e as i32))?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes()).to_os_string();
            if ino == INodeNo::ROOT
                && (name == OsStr::new(&self.config.ctl_name)
                    || self.device_at_root(ino, &name).is_some())
            {
                continue;
            }
            let kind = match entry.file_type() {
                Some(nix::dir::Type::Directory) => FileType::Directory,
                Some(nix::dir::Type::Symlink) => FileType::Symlink,
                Some(nix::dir::Type::Fifo) => FileType::NamedPipe,
                Some(nix::dir::Type::Socket) => FileType::Socket,
                Some(nix::dir::Type::CharacterDevice) => FileType::CharDevice,
                Some(nix::dir::Type::BlockDevice) => FileType::BlockDevice,
                _ => FileType::RegularFile,
            };
            entries.push((entry.ino(), kind, name));
        }
        // "." and ".." first, as every directory listing has them.
        entries.sort_by_key(|(_, _, n)| n.as_bytes() != b"." && n.as_bytes() != b"..");
        if ino == INodeNo::ROOT {
            for (name, id) in &self.devices {
                entries.push((*id, FileType::RegularFile, OsString::from(name)));
            }
        }
        Ok(self.add_handle(Open::Dir(Arc::new(DirSnapshot { entries }))))
    }

    pub(crate) fn do_fsyncdir(&self, ino: INodeNo, datasync: bool) -> Result<(), Errno> {
        let inode = self.inode(ino)?;
        let fd = inode.fd.as_ref().ok_or(Errno::EINVAL)?;
        let dir =
            sys::openat(fd.as_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0).map_err(errno)?;
        let file = std::fs::File::from(dir);
        let res = if datasync {
            file.sync_data()
        } else {
            file.sync_all()
        };
        res.map_err(errno)
    }

    pub(crate) fn do_access(&self, req: &Request, ino: INodeNo, mask: i32) -> Result<(), Errno> {
        if super::ctl_node::is_virtual(ino.0) {
            return Ok(());
        }
        let inode = self.inode(ino)?;
        if inode.device_name.is_some() {
            return self.check_device_access(req, &inode, mask);
        }
        let Some(fd) = inode.fd.as_ref() else {
            return Ok(());
        };
        let _creds = self.as_caller(req)?;
        let path = sys::proc_fd_path(fd.as_fd());
        // Checked with the fs ids switched above (AT_EACCESS).
        sys::access_effective(&path, mask).map_err(errno)
    }

    /// The `stat` of a `--device` entry's node (following symlinks, as the
    /// daemon opens it): its owner and mode are the entry's.
    pub(crate) fn device_node_stat(&self, inode: &Inode) -> Result<libc::stat, Errno> {
        let image = inode.image().ok_or(Errno::EIO)?;
        let Source::Device(path) = &image.source else {
            return Err(Errno::EIO);
        };
        sys::stat_path(&sys::cstring(path.as_os_str()).map_err(errno)?).map_err(|e| {
            log::warn!("device {}: stat {}: {e}", image.path(), path.display());
            errno(e)
        })
    }

    /// The daemon opens devices with its own rights, so it checks the
    /// caller against the node's owner and mode itself, as the kernel would
    /// for an open of the node (`mask`: R_OK/W_OK/X_OK bits).
    pub(crate) fn check_device_access(
        &self,
        req: &Request,
        inode: &Inode,
        mask: i32,
    ) -> Result<(), Errno> {
        let st = self.device_node_stat(inode)?;
        if super::caller::caller_of(req).may(&st, mask) {
            Ok(())
        } else {
            Err(Errno::EACCES)
        }
    }

    fn xattr_path(&self, ino: INodeNo) -> Result<CString, Errno> {
        if !self.config.xattr {
            // ENOSYS makes the kernel stop asking for the whole mount; else it
            // asks for security.capability before every write (docs/DESIGN.md §2).
            return Err(Errno::ENOSYS);
        }
        let inode = self.inode(ino)?;
        match (&inode.kind, inode.fd.as_ref()) {
            (Kind::Symlink, _) | (_, None) => Err(Errno::from_i32(libc::ENOTSUP)),
            (_, Some(fd)) => Ok(sys::proc_fd_path(fd.as_fd())),
        }
    }

    pub(crate) fn do_getxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: Option<&OsStr>,
        size: u32,
        reply: ReplyXattr,
    ) {
        let path = match self.xattr_path(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let _creds = match self.as_caller(req) {
            Ok(c) => c,
            Err(e) => return reply.error(e),
        };
        let mut buf = vec![0u8; size as usize];
        let n = match name {
            Some(name) => {
                let Ok(cname) = sys::cstring(name) else {
                    return reply.error(Errno::EINVAL);
                };
                sys::getxattr(&path, &cname, &mut buf)
            }
            None => sys::listxattr(&path, &mut buf),
        };
        let n = match n {
            Ok(n) => n,
            Err(e) => return reply.error(errno(e)),
        };
        if size == 0 {
            reply.size(n as u32);
        } else {
            reply.data(&buf[..n]);
        }
    }

    pub(crate) fn do_setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
    ) -> Result<(), Errno> {
        let path = self.xattr_path(ino)?;
        let cname = sys::cstring(name).map_err(|_| Errno::EINVAL)?;
        let _creds = self.as_caller(req)?;
        sys::setxattr(&path, &cname, value, flags).map_err(errno)
    }

    pub(crate) fn do_removexattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
    ) -> Result<(), Errno> {
        let path = self.xattr_path(ino)?;
        let cname = sys::cstring(name).map_err(|_| Errno::EINVAL)?;
        let _creds = self.as_caller(req)?;
        sys::removexattr(&path, &cname).map_err(errno)
    }
}
