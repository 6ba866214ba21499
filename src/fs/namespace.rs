//! Namespace operations: lookup, create/remove/rename of names, links,
//! directory listing, xattrs. Every backing access is relative to a parent's
//! O_PATH fd with a single-component name and O_NOFOLLOW, so nothing the
//! kernel sends can reach outside the backing directory.

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::session::{Errno, FileAttr, FileType, INodeNo, Request};

use super::inodes::{self, Inode, Kind};
use super::{MigsafeFs, Open, attr};
use crate::cache::{Identity, Incarnation};
use crate::error::Error;
use crate::image::{Image, Source};
use crate::sys;

/// A directory's entries, read once at opendir: offsets stay stable for the
/// life of the handle however the backing directory changes meanwhile.
pub(crate) struct DirSnapshot {
    /// The directory's node (kept across a daemon restart).
    pub nodeid: u64,
    pub entries: Vec<(u64, FileType, OsString)>,
}

/// An extended attribute's size or value (or the list of names).
pub(crate) enum Xattr {
    Size(u32),
    Data(Vec<u8>),
}

/// Rejects names the kernel should never send but a confused client could:
/// anything but a single path component (`sys::is_component`).
pub(super) fn component(name: &OsStr) -> Result<CString, Error> {
    if !sys::is_component(name.as_bytes()) {
        return Err(Errno::EINVAL.into());
    }
    Ok(sys::cstring(name)?)
}

impl MigsafeFs {
    pub(crate) fn parent_dir(&self, parent: INodeNo) -> Result<Arc<Inode>, Error> {
        let inode = self.inode(parent)?;
        if !inode.is_dir() {
            return Err(Errno::ENOTDIR.into());
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
    ) -> Result<FileAttr, Error> {
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
            )?
        };
        self.enter(&dir, name, fd)
    }

    /// Adds a freshly opened O_PATH fd of `dir/name` to the inode table.
    pub(crate) fn enter(
        &self,
        dir: &Inode,
        name: &OsStr,
        fd: std::os::fd::OwnedFd,
    ) -> Result<FileAttr, Error> {
        let st = sys::fstat_fd(fd.as_fd())?;
        let identity = Identity::of_stat(&st);
        // Whatever had this (dev, ino) before may be gone, its number
        // reused: the incarnation tells (one syscall per lookup).
        let incarnation = Incarnation::of_fd(fd.as_fd(), st.st_dev);
        let path = Self::child_path(dir, name);
        let fd = Arc::new(fd);
        let inode =
            self.inodes
                .lookup_or_insert(identity, incarnation.clone(), path.clone(), || {
                    let kind = self.kind_of(&st, identity, &incarnation, &path);
                    (fd.clone(), kind)
                });
        self.attach(&inode, fd, &path, st)
    }

    /// What the node of a backing entry is: a directory, an image (the
    /// registry's, made on first sight), a symlink or a special file.
    pub(crate) fn kind_of(
        &self,
        st: &libc::stat,
        identity: Identity,
        incarnation: &Incarnation,
        path: &str,
    ) -> Kind {
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => Kind::Directory,
            libc::S_IFREG => {
                Kind::Image(self.registry().get_or_insert(identity, incarnation, || {
                    Image::new(
                        identity,
                        Source::File {
                            root: self.root_fd().clone(),
                            live: Default::default(),
                        },
                        path.to_string(),
                    )
                    .with_incarnation(incarnation.clone())
                }))
            }
            libc::S_IFLNK => Kind::Symlink,
            _ => Kind::Special,
        }
    }

    /// Points an image at the node it is reached by, and answers the
    /// node's attributes.
    pub(crate) fn attach(
        &self,
        inode: &Inode,
        fd: Arc<std::os::fd::OwnedFd>,
        path: &str,
        st: libc::stat,
    ) -> Result<FileAttr, Error> {
        let mut st = st;
        if let Some(image) = inode.image() {
            image.set_path(path.to_string());
            image.nodeid.store(inode.nodeid, Ordering::Relaxed);
            if let Some(fd) = &inode.fd {
                image.set_live_fd(fd);
            }
            // The kernel takes the size from a lookup too: never the length
            // of a growing cached write half done (datapath/cached.rs).
            let _size = image.io_locks.shared();
            st = sys::fstat_fd(fd.as_fd())?;
        }
        Ok(attr::from_stat(inode.nodeid, &st))
    }

    fn check_name_allowed(&self, parent: INodeNo, name: &OsStr) -> Result<(), Error> {
        if self.is_ctl_name(parent, name) || parent.0 == inodes::CTL_DIR {
            return Err(Errno::EPERM.into());
        }
        if self.device_at_root(parent, name).is_some() {
            return Err(Errno::EPERM.into());
        }
        Ok(())
    }

    fn lookup_after_create(
        &self,
        dir: &Inode,
        name: &OsStr,
        cname: &CString,
    ) -> Result<FileAttr, Error> {
        let fd = sys::openat(
            dir.fd.as_ref().ok_or(Errno::EIO)?.as_fd(),
            cname,
            libc::O_PATH | libc::O_NOFOLLOW,
            0,
        )?;
        self.enter(dir, name, fd)
    }

    pub(crate) fn do_mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        rdev: u32,
    ) -> Result<FileAttr, Error> {
        self.check_name_allowed(parent, name)?;
        if mode & libc::S_IFMT == libc::S_IFREG {
            self.refuse_regular_file_on_writeback(name)?;
        }
        let dir = self.parent_dir(parent)?;
        let cname = component(name)?;
        // Any node type, as on the backing: device nodes are inert through
        // the mount (nodev unless mounted with -o dev), the kernel lets
        // only callers with CAP_MKNOD ask for them, and a non-root caller
        // is served without it, so the backing itself refuses others.
        let _creds = self.as_caller(req)?;
        let dirfd = dir.fd.as_ref().ok_or(Errno::EIO)?;
        sys::mknodat(dirfd.as_fd(), &cname, mode, rdev)?;
        self.lookup_after_create(&dir, name, &cname)
    }

    pub(crate) fn do_mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
    ) -> Result<FileAttr, Error> {
        if self.is_ctl_name(parent, name) {
            return Err(Errno::EEXIST.into());
        }
        self.check_name_allowed(parent, name)?;
        let dir = self.parent_dir(parent)?;
        let cname = component(name)?;
        let _creds = self.as_caller(req)?;
        let dirfd = dir.fd.as_ref().ok_or(Errno::EIO)?;
        sys::mkdirat(dirfd.as_fd(), &cname, mode)?;
        self.lookup_after_create(&dir, name, &cname)
    }

    pub(crate) fn do_remove(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        is_dir: bool,
    ) -> Result<(), Error> {
        self.check_name_allowed(parent, name)?;
        let dir = self.parent_dir(parent)?;
        let cname = component(name)?;
        let dirfd = dir.fd.as_ref().ok_or(Errno::EIO)?;
        let before = sys::fstatat(dirfd.as_fd(), &cname).ok();
        let _creds = self.as_caller(req)?;
        let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
        sys::unlinkat(dirfd.as_fd(), &cname, flags)?;
        // The last name of an image is gone: forget its migration state, so a
        // new file that reuses the inode number starts fresh.
        if let Some(st) = before
            && st.st_mode & libc::S_IFMT == libc::S_IFREG
            && st.st_nlink <= 1
        {
            self.registry().remove(&Identity::of_stat(&st));
        }
        Ok(())
    }

    pub(crate) fn do_symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        target: &std::path::Path,
    ) -> Result<FileAttr, Error> {
        self.check_name_allowed(parent, name)?;
        let dir = self.parent_dir(parent)?;
        let cname = component(name)?;
        let ctarget = sys::cstring(target.as_os_str())?;
        let _creds = self.as_caller(req)?;
        let dirfd = dir.fd.as_ref().ok_or(Errno::EIO)?;
        sys::symlinkat(&ctarget, dirfd.as_fd(), &cname)?;
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
    ) -> Result<(), Error> {
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
        sys::renameat2(d1.as_fd(), &cname, d2.as_fd(), &cnew, flags)?;
        // Keep the moved image's name current for status and control paths.
        if let Ok(st) = sys::fstatat(d2.as_fd(), &cnew) {
            let id = Identity::of_stat(&st);
            if let Some(img) = self.registry().get(&id) {
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
    ) -> Result<FileAttr, Error> {
        self.check_name_allowed(newparent, newname)?;
        let inode = self.inode(ino)?;
        if inode.device.is_some() {
            return Err(Errno::EPERM.into());
        }
        let newdir = self.parent_dir(newparent)?;
        let cnew = component(newname)?;
        let src = inode.fd.as_ref().ok_or(Errno::EIO)?;
        let _creds = self.as_caller(req)?;
        let dirfd = newdir.fd.as_ref().ok_or(Errno::EIO)?;
        // Through the /proc magic link: links the inode the O_PATH fd pins,
        // without needing its path.
        sys::link_fd(src.as_fd(), dirfd.as_fd(), &cnew)?;
        self.lookup_after_create(&newdir, newname, &cnew)
    }

    pub(crate) fn do_readlink(&self, ino: INodeNo) -> Result<Vec<u8>, Error> {
        let inode = self.inode(ino)?;
        let fd = inode.fd.as_ref().ok_or(Errno::EINVAL)?;
        Ok(sys::readlink_fd(fd.as_fd())?)
    }

    pub(crate) fn do_opendir(&self, req: &Request, ino: INodeNo) -> Result<u64, Error> {
        let snapshot = if ino.0 == inodes::CTL_DIR {
            self.snapshot_dir(ino.0, None)?
        } else {
            let inode = self.inode(ino)?;
            let fd = inode.fd.as_ref().ok_or(Errno::ENOTDIR)?;
            // Reopen the O_PATH fd itself: that needs read permission on the
            // directory only, as opendir on the backing does, where
            // openat(fd, ".") would also need search permission.
            let dirfd = {
                let _creds = self.as_caller(req)?;
                sys::reopen(fd.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY)?
            };
            self.snapshot_dir(ino.0, Some(dirfd.into()))?
        };
        Ok(self.add_kept_handle(Open::Dir(Arc::new(snapshot)), false))
    }

    /// The entries of directory `nodeid`, read from `dirfd` (None for the
    /// control directory, whose entries are fixed).
    pub(crate) fn snapshot_dir(
        &self,
        nodeid: u64,
        dirfd: Option<std::os::fd::OwnedFd>,
    ) -> Result<DirSnapshot, Error> {
        let Some(dirfd) = dirfd else {
            return Ok(DirSnapshot {
                nodeid,
                entries: super::ctl_node::dir_entries(),
            });
        };
        let ino = INodeNo(nodeid);
        let mut dir = nix::dir::Dir::from_fd(dirfd).map_err(|e| Errno::from_i32(e as i32))?;
        let mut entries = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(|e| Errno::from_i32(e as i32))?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes()).to_os_string();
            if ino == INodeNo::ROOT
                && (name == OsStr::new(&self.config().ctl_name)
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
            for (name, id) in self.devices() {
                entries.push((id, FileType::RegularFile, OsString::from(name)));
            }
        }
        Ok(DirSnapshot { nodeid, entries })
    }

    pub(crate) fn do_fsyncdir(&self, ino: INodeNo, datasync: bool) -> Result<(), Error> {
        let inode = self.inode(ino)?;
        let fd = inode.fd.as_ref().ok_or(Errno::EINVAL)?;
        let dir = sys::openat(fd.as_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        let file = std::fs::File::from(dir);
        let res = if datasync {
            file.sync_data()
        } else {
            file.sync_all()
        };
        Ok(res?)
    }

    pub(crate) fn do_access(&self, req: &Request, ino: INodeNo, mask: i32) -> Result<(), Error> {
        if super::ctl_node::is_virtual(ino.0) {
            return Ok(());
        }
        let inode = self.inode(ino)?;
        if let Some(dev) = &inode.device {
            // The daemon opens devices with its own rights: the node's owner
            // and mode decide, as the kernel would for an open of the node.
            return dev.check_access(&super::caller::caller_of(req), mask);
        }
        let Some(fd) = inode.fd.as_ref() else {
            return Ok(());
        };
        let _creds = self.as_caller(req)?;
        let path = sys::proc_fd_path(fd.as_fd());
        // Checked with the fs ids switched above (AT_EACCESS).
        Ok(sys::access_effective(&path, mask)?)
    }

    fn xattr_path(&self, ino: INodeNo) -> Result<CString, Error> {
        if !self.config().xattr {
            // ENOSYS makes the kernel stop asking for the whole mount; else it
            // asks for security.capability before every write (docs/DESIGN.md §2).
            return Err(Errno::ENOSYS.into());
        }
        let inode = self.inode(ino)?;
        match (&inode.kind, inode.fd.as_ref()) {
            (Kind::Symlink, _) | (_, None) => Err(Error::Refused(libc::ENOTSUP)),
            (_, Some(fd)) => Ok(sys::proc_fd_path(fd.as_fd())),
        }
    }

    /// getxattr (`name`) or listxattr (`None`): with `size` 0 the caller
    /// asks only how big the value is.
    pub(crate) fn do_getxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: Option<&OsStr>,
        size: u32,
    ) -> Result<Xattr, Error> {
        let path = self.xattr_path(ino)?;
        let _creds = self.as_caller(req)?;
        let mut buf = vec![0u8; size as usize];
        let n = match name {
            Some(name) => sys::getxattr(&path, &sys::cstring(name)?, &mut buf)?,
            None => sys::listxattr(&path, &mut buf)?,
        };
        if size == 0 {
            Ok(Xattr::Size(n as u32))
        } else {
            buf.truncate(n);
            Ok(Xattr::Data(buf))
        }
    }

    pub(crate) fn do_setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
    ) -> Result<(), Error> {
        let path = self.xattr_path(ino)?;
        let cname = sys::cstring(name)?;
        let _creds = self.as_caller(req)?;
        Ok(sys::setxattr(&path, &cname, value, flags)?)
    }

    pub(crate) fn do_removexattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
    ) -> Result<(), Error> {
        let path = self.xattr_path(ino)?;
        let cname = sys::cstring(name)?;
        let _creds = self.as_caller(req)?;
        Ok(sys::removexattr(&path, &cname)?)
    }
}
