//! Where an image's bytes live and how the image is found again: by its
//! FUSE inode's O_PATH fd while the kernel holds it, else by its last path
//! beneath the backing root, checked to be the same file.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, Weak};

use super::{Image, Outcome};
use crate::backing::Device;
use crate::cache::{Identity, Incarnation};
use crate::sys;

/// Where an image's bytes live.
#[derive(Debug)]
pub enum Source {
    /// A regular file of the backing directory. While the kernel holds its
    /// FUSE inode, `live` reaches the inode's O_PATH fd (immune to renames);
    /// otherwise the file is found again by its last path beneath the
    /// backing root and must still be the same file (dev, ino and
    /// incarnation). `live` is weak: deleting an image must free its space
    /// (the fd kept for writeback errors goes with the last handle once
    /// the file has no name, and a deleted image is forgotten).
    File {
        root: Arc<OwnedFd>,
        live: Mutex<Weak<OwnedFd>>,
    },
    /// A block device (or file) given with `--device NAME=PATH`.
    Device(Arc<Device>),
}

/// What a file found by an image's last path is to the image.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    This,
    /// Another (dev, ino): the image was renamed or replaced by another file.
    Other,
    /// The same (dev, ino) but another incarnation: the image's file was
    /// deleted and a new file got its inode number.
    Successor,
}

impl Image {
    /// Records the O_PATH fd of the FUSE inode now standing for this image.
    pub fn set_live_fd(&self, fd: &Arc<OwnedFd>) {
        if let Source::File { live, .. } = &self.source {
            *live.lock().expect("live lock") = Arc::downgrade(fd);
        }
    }

    pub fn is_device(&self) -> bool {
        matches!(self.source, Source::Device(_))
    }

    /// The `--device` entry this image is, if it is one.
    pub fn device(&self) -> Option<&Arc<Device>> {
        match &self.source {
            Source::Device(d) => Some(d),
            Source::File { .. } => None,
        }
    }

    /// Opens a fresh backing fd with `flags`, by the live O_PATH fd or the
    /// checked last path (ENOENT when another file is there now). Callers
    /// pass O_RDONLY, never O_DIRECT: the fd must see the page cache.
    pub fn open_backing(&self, flags: i32) -> std::io::Result<File> {
        match &self.source {
            Source::File { root, live } => {
                let live = live.lock().expect("live lock").upgrade();
                if let Some(opath) = live {
                    return sys::reopen(opath.as_fd(), flags);
                }
                let fd = self.at_last_path(root)?;
                if self.found_at(&fd)? != Found::This {
                    return Err(std::io::Error::from_raw_os_error(libc::ENOENT));
                }
                sys::reopen(fd.as_fd(), flags)
            }
            Source::Device(d) => d.open(flags),
        }
    }

    /// O_PATH fd of whatever is at the image's last path now.
    fn at_last_path(&self, root: &OwnedFd) -> std::io::Result<OwnedFd> {
        let path = sys::cstring(std::ffi::OsStr::new(&self.path()))?;
        sys::openat2_beneath(root.as_fd(), &path, libc::O_PATH | libc::O_NOFOLLOW)
    }

    /// Whether `fd` is this image's file: same (dev, ino) and, as far as
    /// the backing tells, the same incarnation.
    fn found_at(&self, fd: &OwnedFd) -> std::io::Result<Found> {
        let st = sys::fstat_fd(fd.as_fd())?;
        if Identity::of_stat(&st) != self.identity {
            return Ok(Found::Other);
        }
        if self
            .incarnation
            .same_file(&Incarnation::of_fd(fd.as_fd(), st.st_dev))
        {
            Ok(Found::This)
        } else {
            Ok(Found::Successor)
        }
    }

    /// The image's path beneath the backing root now: its last path while
    /// that still leads to it, else (renamed on the backing, on this host)
    /// the name its live fd has now, if that leads to it; None when neither
    /// does (renamed on another host, or deleted). The last path is
    /// refreshed by the lookup that a caller's open through the mount makes.
    pub fn current_path(&self) -> Option<String> {
        let Source::File { root, live } = &self.source else {
            return Some(self.path());
        };
        let leads_here = |path: &str| {
            sys::cstring(std::ffi::OsStr::new(path))
                .and_then(|c| {
                    sys::openat2_beneath(root.as_fd(), &c, libc::O_PATH | libc::O_NOFOLLOW)
                })
                .and_then(|fd| self.found_at(&fd))
                .is_ok_and(|found| matches!(found, Found::This))
        };
        let last = self.path();
        if leads_here(&last) {
            return Some(last);
        }
        let live = live.lock().expect("live lock").upgrade()?;
        sys::path_beneath(root.as_fd(), live.as_fd()).filter(|p| leads_here(p))
    }

    /// Whether the image's file can still be opened (by its FUSE inode's
    /// fd, else by its last path; a device always); the error says what to
    /// do when it cannot.
    pub fn locate(&self) -> Result<(), Outcome> {
        if self.is_device() {
            return Ok(());
        }
        self.open_backing(libc::O_RDONLY).map(drop).map_err(|e| {
            Outcome::io(
                &e,
                format!(
                    "image last seen as {} cannot be found there ({e}): renamed or deleted \
                     outside this mount? name it by its current path",
                    self.path()
                ),
            )
        })
    }

    /// True when the file is known to be deleted everywhere and no handle
    /// is open here: the fd kept since its first open sees no name left,
    /// or (no FUSE inode standing for it) a new file with its (dev, ino)
    /// but another incarnation is at its last path (a number is reused
    /// only once freed).
    pub(super) fn is_deleted(&self) -> bool {
        if self.is_device() {
            return false;
        }
        if let Source::File { root, live } = &self.source
            && live.lock().expect("live lock").upgrade().is_none()
            && let Ok(fd) = self.at_last_path(root)
            && matches!(self.found_at(&fd), Ok(Found::Successor))
            && self.open_handle_count() == 0
        {
            return true;
        }
        let keep = self.errseq.lock().expect("errseq lock");
        keep.as_ref().is_some_and(|f| {
            f.metadata()
                .map(|m| std::os::unix::fs::MetadataExt::nlink(&m) == 0)
                .unwrap_or(false)
        }) && self.open_handle_count() == 0
    }
}
