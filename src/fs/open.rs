//! A handle's life on an image: open and create (the data-path choice,
//! passthrough registration, invalidate on first open, the control plane's
//! own opens) and release.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Arc;

use crate::session::{
    Errno, FileAttr, FileHandle, FopenFlags, INodeNo, ReplyCreate, ReplyOpen, Request,
};

use super::inodes::{Inode, Kind};
use super::{IoMode, MigsafeFs, Open};
use crate::ctl::scope::CommandScope;
use crate::datapath::{self, PassthroughBacking};
use crate::error::Error;
use crate::image::handle::is_internal_opener;
use crate::image::{DataPath, Handle, Image};
use crate::settings::OnOpen;
use crate::sys;

/// Flags for the daemon's backing fd: the caller's access mode and the flags
/// that change I/O semantics. O_APPEND is left out: the kernel sends the
/// write offset, and pwrite on an O_APPEND fd would ignore it.
fn backing_flags(flags: i32) -> i32 {
    flags & (libc::O_ACCMODE | libc::O_DIRECT | libc::O_SYNC | libc::O_DSYNC | libc::O_NOATIME)
}

impl MigsafeFs {
    fn data_path_for(&self, inode: &Inode) -> DataPath {
        if inode.device.is_some() {
            // The kernel refuses a block device as passthrough backing
            // (EINVAL): cached (default) or relay.
            return self.config().device_io;
        }
        match self.config().io {
            IoMode::Relay => DataPath::Relay,
            IoMode::Cached => DataPath::Cached,
            _ if self.passthrough_active() => DataPath::Passthrough,
            _ => DataPath::Relay,
        }
    }

    /// Close-to-open (docs/DESIGN.md §3): on the first open of an image on this
    /// host, drop whatever this host cached of it before the open completes.
    fn invalidate_on_first_open(&self, image: &Image) -> Result<(), Error> {
        let mode = self.settings().on_open();
        if mode == OnOpen::Off || !self.settings().drop_cache() || image.open_handle_count() > 0 {
            return Ok(());
        }
        if mode == OnOpen::Warn {
            // Only say what `on` would have dropped; drop nothing.
            if let Ok(f) = image.open_backing(libc::O_RDONLY)
                && let Ok(c) = sys::cachestat(f.as_fd())
                && c.cached > c.dirty + c.writeback
            {
                log::warn!(
                    "open {}: {} pages of it were cached on this host before this first open and may be stale \
                     (invalidate-on-open=warn: not dropped)",
                    image.path(),
                    c.cached
                );
            }
            return Ok(());
        }
        // Inside the open request: the FUSE inode's cache is dropped by the
        // reply (no FOPEN_KEEP_CACHE on a first open), never from here.
        let scope = CommandScope::in_handler(&self.ctl);
        let outcome = image.invalidate_on_open(&scope.context(None));
        match outcome.errno {
            None => Ok(()),
            Some(e) => {
                log::warn!(
                    "open {}: refused ({}): {}; run `migsafe ctl MOUNT check {}` to see what holds it",
                    image.path(),
                    sys::errno_name(e),
                    outcome.detail,
                    image.path()
                );
                Err(Error::Refused(e))
            }
        }
    }

    /// Opens the backing of an image inode for a handle, as the caller.
    fn open_image_backing(
        &self,
        req: &Request,
        inode: &Inode,
        image: &Image,
        flags: i32,
    ) -> Result<File, Error> {
        let bflags = backing_flags(flags);
        match &inode.fd {
            Some(fd) => {
                let _creds = self.as_caller(req)?;
                Ok(sys::reopen(fd.as_fd(), bflags)?)
            }
            None => {
                let dev = image.device().ok_or(Errno::EIO)?;
                dev.open_as(&super::caller::caller_of(req), bflags)
            }
        }
    }

    /// Returns the inode's passthrough registration, creating it with root's
    /// credentials (the kernel opens the backing with the registering
    /// credentials for every later opener; permission was already checked by
    /// the caller's own open).
    fn passthrough_backing(
        &self,
        inode: &Inode,
        reply: &ReplyOpenLike<'_>,
    ) -> std::io::Result<Arc<PassthroughBacking>> {
        let mut slot = inode.passthrough.lock().expect("passthrough lock");
        if let Some(existing) = slot.upgrade() {
            return Ok(existing);
        }
        let fd = inode
            .fd
            .as_ref()
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        let file = sys::reopen(fd.as_fd(), libc::O_RDWR)
            .or_else(|_| sys::reopen(fd.as_fd(), libc::O_RDONLY))?;
        let id = match reply {
            ReplyOpenLike::Open(r) => r.open_backing(&file)?,
            ReplyOpenLike::Create(r) => r.open_backing(&file)?,
        };
        let backing = Arc::new(PassthroughBacking {
            id,
            file: Arc::new(file),
        });
        *slot = Arc::downgrade(&backing);
        Ok(backing)
    }

    /// Everything open and create share after the backing fd exists.
    fn register_handle(
        &self,
        req: &Request,
        inode: Arc<Inode>,
        image: Arc<Image>,
        file: File,
        flags: i32,
        reply: ReplyOpenLike<'_>,
    ) -> Result<Opened, Error> {
        if flags & libc::O_ACCMODE != libc::O_RDONLY
            && !image.is_active()
            && self.settings().refuse_inactive_opens()
        {
            log::warn!(
                "open {}: writable open by pid {} refused: the image is inactive on this host \
                 (inactive-writes=strict); activate it first",
                image.path(),
                req.pid()
            );
            return Err(Errno::EROFS.into());
        }
        let (data_path, passthrough) = self.first_data_path(&inode, &image, &reply)?;
        let (file, data_path, edges) = if data_path == DataPath::Cached {
            Self::prepare_cached(&image, file, flags)
        } else {
            (file, data_path, None)
        };
        // A first open (nobody else has the image open here) is the
        // close-to-open point: without FOPEN_KEEP_CACHE the kernel drops the
        // FUSE inode's pages as the open completes.
        let keep_cache = image.open_handle_count() > 0
            || self.settings().on_open() != OnOpen::Invalidate
            || !self.settings().drop_cache();
        let mut handle = Handle::new(
            image.clone(),
            Arc::new(file),
            data_path,
            flags,
            req.pid(),
            passthrough.clone(),
        );
        handle.edges = edges;
        let handle = Arc::new(handle);
        let fh = self.add_kept_handle(Open::File(handle.clone()), false);
        image.add_handle(fh, handle.clone());
        // Writers outside the mount: the answer for this image is made
        // ready before any command needs it.
        self.ctl
            .writer_cache
            .warm(image.identity, &image.path(), &handle.file);
        log_open(&image, &handle, req.pid(), flags);
        let fopen = match data_path {
            DataPath::Passthrough => FopenFlags::empty(),
            DataPath::Relay => {
                FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
            }
            DataPath::Cached if keep_cache => FopenFlags::FOPEN_KEEP_CACHE,
            DataPath::Cached => FopenFlags::empty(),
        };
        Ok((fh, fopen, passthrough))
    }

    /// The inode's data path, with its passthrough backing registered when
    /// that is the path. A registration that fails falls back to relay,
    /// unless passthrough was asked for by name (`--io passthrough`).
    fn first_data_path(
        &self,
        inode: &Arc<Inode>,
        image: &Image,
        reply: &ReplyOpenLike<'_>,
    ) -> Result<(DataPath, Option<Arc<PassthroughBacking>>), Error> {
        let data_path = self.data_path_for(inode);
        if data_path != DataPath::Passthrough {
            return Ok((data_path, None));
        }
        match self.passthrough_backing(inode, reply) {
            Ok(b) => Ok((data_path, Some(b))),
            Err(e) if self.config().io == IoMode::Passthrough => {
                log::warn!(
                    "open {}: passthrough registration failed: {e}",
                    image.path()
                );
                Err(Error::from(e))
            }
            Err(e) => {
                log::info!(
                    "open {}: passthrough unavailable ({e}); using relay",
                    image.path()
                );
                Ok((DataPath::Relay, None))
            }
        }
    }

    /// The backing fd of a cached handle (`O_DIRECT`), with the buffered fd
    /// a writable regular file's partial blocks are written through; relay
    /// where the cached path cannot serve the image.
    fn prepare_cached(image: &Image, file: File, flags: i32) -> (File, DataPath, Option<File>) {
        // The backing's own page cache must hold nothing of the image:
        // the FUSE inode's is the one cache. A backing that refuses
        // O_DIRECT (ramfs), or a `--device` that is a regular file ending
        // inside a block (an aligned write of its last block would grow
        // it), is served by relay, whose one cache is the backing's.
        let whole = |block| image.device().map_or(Ok(()), |d| d.whole_blocks(block));
        // A regular file's partial blocks are written exactly, through
        // a buffered fd of its own (datapath/cached.rs).
        let want_edges = !image.is_device() && flags & libc::O_ACCMODE != libc::O_RDONLY;
        match datapath::cached::prepare(file, backing_flags(flags), whole, want_edges) {
            Ok((f, edges)) => (f, DataPath::Cached, edges),
            Err((f, e)) => {
                log::info!(
                    "open {}: cached data path unavailable ({e}); using relay",
                    image.path()
                );
                (f, DataPath::Relay, None)
            }
        }
    }

    /// `reply` is only borrowed to register a passthrough backing; the op
    /// table sends the reply.
    pub(super) fn do_open(
        &self,
        req: &Request,
        ino: INodeNo,
        flags: i32,
        reply: &ReplyOpen,
    ) -> Result<Opened, Error> {
        {
            let inode = self.inode(ino)?;
            let image = match &inode.kind {
                Kind::Image(img) => img.clone(),
                Kind::Directory => return Err(Errno::EISDIR.into()),
                _ => return Err(Errno::EINVAL.into()),
            };
            if flags & libc::O_ACCMODE != libc::O_RDONLY && flags & libc::O_TRUNC != 0 {
                image.check_writable(self.settings())?;
            }
            if !image.is_device() {
                self.refuse_regular_file_on_writeback(&image.path())?;
            }
            if is_internal_opener(req.pid()) {
                return self.open_internal(inode, image);
            }
            // Held until the handle is registered, so a concurrent first
            // open neither invalidates again nor sees a half-open image.
            let gate = image.clone();
            let _first_open = gate.open_gate();
            self.invalidate_on_first_open(&image)?;
            let file = self.open_image_backing(req, &inode, &image, flags)?;
            self.register_handle(req, inode, image, file, flags, ReplyOpenLike::Open(reply))
        }
    }

    /// A write-back connection serves device entries only: the kernel
    /// trusts its own size and times of every regular file there, which a
    /// file changed anywhere else would make wrong (`--writeback`, DESIGN
    /// §2), so no other regular file is created or opened.
    pub(super) fn refuse_regular_file_on_writeback(
        &self,
        name: &(impl AsRef<std::ffi::OsStr> + ?Sized),
    ) -> Result<(), Error> {
        if !self.writeback_active() {
            return Ok(());
        }
        log::warn!(
            "{}: refused (EPERM): this mount serves devices only (--writeback on); \
             keep regular files on a mount with --writeback off",
            name.as_ref().to_string_lossy()
        );
        Err(Errno::EPERM.into())
    }

    /// The control plane opening a file of this mount to measure or sync
    /// its FUSE cache: read-only, not one of the image's handles, and the
    /// cache it measures stays (FOPEN_KEEP_CACHE).
    fn open_internal(&self, inode: Arc<Inode>, image: Arc<Image>) -> Result<Opened, Error> {
        let file = match &inode.fd {
            Some(fd) => sys::reopen(fd.as_fd(), libc::O_RDONLY)?,
            None => image.open_backing(libc::O_RDONLY)?,
        };
        let handle = Handle::new(
            image,
            Arc::new(file),
            DataPath::Relay,
            libc::O_RDONLY,
            std::process::id(),
            None,
        );
        let fh = self.add_kept_handle(Open::File(Arc::new(handle)), true);
        Ok((fh, FopenFlags::FOPEN_KEEP_CACHE, None))
    }

    pub(super) fn do_create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &std::ffi::OsStr,
        mode: u32,
        flags: i32,
        reply: &ReplyCreate,
    ) -> Result<Created, Error> {
        {
            if self.is_ctl_name(parent, name) || parent.0 == super::inodes::CTL_DIR {
                return Err(Errno::EPERM.into());
            }
            if let Some(id) = self.device_at_root(parent, name) {
                // Creating over a device entry opens it, as O_CREAT on an
                // existing file does; O_EXCL must fail.
                if flags & libc::O_EXCL != 0 {
                    return Err(Errno::EEXIST.into());
                }
                let inode = self.inodes.get(id).ok_or(Errno::EIO)?;
                return self.open_created(req, inode, None, flags, reply);
            }
            self.refuse_regular_file_on_writeback(name)?;
            let dir = self.parent_dir(parent)?;
            let cname = super::namespace::component(name)?;
            let dirfd = dir.fd.as_ref().ok_or(Errno::EIO)?;
            let (file, opath) = {
                let _creds = self.as_caller(req)?;
                // Create as the caller and keep this very fd for the handle:
                // a mode that excludes the access being opened (0444 with
                // O_RDWR) is allowed for the creating open only. O_NONBLOCK
                // keeps an existing FIFO of that name from blocking the
                // thread; it is cleared below.
                let fd = sys::openat(
                    dirfd.as_fd(),
                    &cname,
                    backing_flags(flags)
                        | (flags & libc::O_EXCL)
                        | libc::O_CREAT
                        | libc::O_NOFOLLOW
                        | libc::O_NONBLOCK,
                    mode,
                )?;
                let st = sys::fstat_fd(fd.as_fd())?;
                if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                    // Only regular files are served as images (as by open).
                    return Err(Errno::EINVAL.into());
                }
                sys::clear_nonblock(fd.as_fd())?;
                // Pin the inode this fd created, not whatever the name
                // may point to by now.
                let opath = sys::reopen(fd.as_fd(), libc::O_PATH)?;
                (File::from(fd), std::os::fd::OwnedFd::from(opath))
            };
            let attr = self.enter(&dir, name, opath)?;
            let inode = self.inodes.get(attr.ino.0).ok_or(Errno::EIO)?;
            self.open_created(req, inode, Some(file), flags, reply)
        }
    }

    /// The open half of create, for a file the create opened (`file`, the
    /// fd it made) or an existing device entry (`None`: opened here).
    fn open_created(
        &self,
        req: &Request,
        inode: Arc<Inode>,
        file: Option<File>,
        flags: i32,
        reply: &ReplyCreate,
    ) -> Result<Created, Error> {
        let image = inode.image().ok_or(Errno::EISDIR)?.clone();
        let truncate = flags & libc::O_TRUNC != 0 && flags & libc::O_ACCMODE != libc::O_RDONLY;
        if truncate {
            image.check_writable(self.settings())?;
        }
        let file = match file {
            Some(f) => f,
            None => self.open_image_backing(req, &inode, &image, flags)?,
        };
        // O_TRUNC leaves a device as it is, as on the block device itself.
        if truncate && inode.device.is_none() {
            let _admitted = image.admit_write(self.settings())?;
            // As the caller, so the kernel clears set-id bits as it would.
            let _creds = self.as_caller(req)?;
            let _resize = image.io_locks.resize();
            file.set_len(0)?;
        }
        let attr = self.attr_of(&inode)?;
        let (fh, fopen, pt) =
            self.register_handle(req, inode, image, file, flags, ReplyOpenLike::Create(reply))?;
        Ok((attr, fh, fopen, pt))
    }

    pub(super) fn do_release(&self, fh: FileHandle) {
        let Some(Open::File(h)) = self.remove_handle(fh) else {
            return;
        };
        h.sync_on_release(self.settings());
        h.image.remove_handle(fh.0);
    }
}

/// What an open registers: the handle number, the open flags for the
/// kernel and the passthrough backing the reply names, if any.
pub(super) type Opened = (u64, FopenFlags, Option<Arc<PassthroughBacking>>);
/// What a create registers: the new entry's attributes and its open.
pub(super) type Created = (FileAttr, u64, FopenFlags, Option<Arc<PassthroughBacking>>);

/// open and create replies both register passthrough backings.
enum ReplyOpenLike<'a> {
    Open(&'a ReplyOpen),
    Create(&'a ReplyCreate),
}

/// The open's log line, and who opened an inactive image for writing (a
/// passthrough handle's writes would bypass the EROFS fencing: a warning).
fn log_open(image: &Image, handle: &Handle, pid: u32, flags: i32) {
    if handle.writable && handle.opened_inactive {
        // An incoming VMM opens its image read-write before activation.
        let level = if handle.bypasses_fencing() {
            log::Level::Warn
        } else {
            log::Level::Info
        };
        log::log!(
            level,
            "open {}: writable open of an inactive image by pid {} ({}), data path={}{}",
            image.path(),
            handle.pid,
            handle.comm,
            handle.data_path.name(),
            if handle.bypasses_fencing() {
                "; its writes bypass fencing until the image is activated"
            } else {
                "; its writes get EROFS until the image is activated"
            }
        );
    }
    log::info!(
        "open {} data path={} pid={} flags={:#o}{}",
        image.path(),
        handle.data_path.name(),
        pid,
        flags,
        if handle.data_path == DataPath::Cached {
            format!(" dio_align={}", handle.block)
        } else {
            String::new()
        }
    );
}
