//! The FUSE inode's page cache of an image, as a control command on a
//! worker thread reaches it: through a file of this very mount (cachestat,
//! fsync) and a synchronous invalidation notification.
//!
//! The file is opened by the image's current name and kept only if it is
//! the image's own FUSE inode (its inode number through the mount is the
//! image's node id): a name the image no longer has may lead to another
//! file, and writing that one back and counting its pages would report a
//! handover done while the image's mapped writes are still dirty here.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use crate::cache::Identity;
use crate::cache::invalidator::AttrInvalidator;
use crate::image::handle::as_internal_opener;
use crate::image::{FuseAccessError, FuseCache, Image};
use crate::sys::{self, PageCounts};

pub struct MountCache<'a> {
    mountpoint: &'a Path,
    invalidator: &'a AttrInvalidator,
    /// The last image's verified file, kept open while a command works on
    /// that image: a close writes the inode's dirty pages back and waits,
    /// which must not happen while `inactivate` decides (those writes wait
    /// for the decision). Closed when the next image is opened or this
    /// goes.
    held: Mutex<Option<(Identity, u64, Arc<File>)>>,
}

impl<'a> MountCache<'a> {
    pub fn new(mountpoint: &'a Path, invalidator: &'a AttrInvalidator) -> MountCache<'a> {
        MountCache {
            mountpoint,
            invalidator,
            held: Mutex::default(),
        }
    }

    /// The image's own FUSE inode, opened through the mount by its current
    /// name. Never from a request handler: the open is a request to this
    /// daemon.
    fn open(&self, image: &Image) -> io::Result<Arc<File>> {
        let nodeid = image.nodeid.load(Ordering::Relaxed);
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((id, node, f)) = held.as_ref()
            && *id == image.identity
            && *node == nodeid
        {
            return Ok(f.clone());
        }
        if let Some((_, _, old)) = held.take() {
            as_internal_opener(|| drop(old));
        }
        let f = Arc::new(self.open_verified(image, nodeid)?);
        *held = Some((image.identity, nodeid, f.clone()));
        Ok(f)
    }

    fn open_verified(&self, image: &Image, nodeid: u64) -> io::Result<File> {
        let last = image.path();
        let stale = |why: String| {
            io::Error::other(FuseAccessError {
                errno: libc::ESTALE,
                message: format!(
                    "image last seen as {last}: {why}; its mapped writes cannot be reached, \
                     nothing was done: name the image by its current path"
                ),
            })
        };
        let Some(path) = image.current_path() else {
            return Err(stale(
                "that name no longer leads to it and its current name is unknown here \
                 (moved out of the backing, renamed on another host, or deleted)"
                    .into(),
            ));
        };
        let mount_dev = std::fs::metadata(self.mountpoint)?.dev();
        let full = self.mountpoint.join(&path);
        let f = as_internal_opener(|| File::open(&full))?;
        let st = f.metadata()?;
        if st.ino() != nodeid || st.dev() != mount_dev {
            as_internal_opener(|| drop(f));
            return Err(stale(format!(
                "{path} through the mount is node {}, not the image's node {nodeid}",
                st.ino()
            )));
        }
        if path != last {
            log::info!("image last seen as {last} is now {path} (renamed on the backing)");
        }
        Ok(f)
    }
}

impl Drop for MountCache<'_> {
    fn drop(&mut self) {
        if let Some((_, _, f)) = self.held.get_mut().ok().and_then(|h| h.take()) {
            as_internal_opener(|| drop(f));
        }
    }
}

impl FuseCache for MountCache<'_> {
    fn writeback(&self, image: &Image) -> io::Result<()> {
        // fsync of any fd of the FUSE file writes the inode's dirty pages
        // back through the daemon, then asks the daemon to sync.
        let f = self.open(image)?;
        as_internal_opener(|| f.sync_all())
    }

    fn drop_pages(&self, image: &Image) -> io::Result<()> {
        self.invalidator
            .invalidate_now(image.nodeid.load(Ordering::Relaxed))
    }

    fn page_counts(&self, image: &Image) -> io::Result<PageCounts> {
        let f = self.open(image)?;
        sys::cachestat(f.as_fd())
    }

    fn held_page_counts(&self, image: &Image) -> io::Result<PageCounts> {
        let nodeid = image.nodeid.load(Ordering::Relaxed);
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        match held.as_ref() {
            Some((id, node, f)) if *id == image.identity && *node == nodeid => {
                sys::cachestat(f.as_fd())
            }
            _ => Err(io::Error::other(FuseAccessError {
                errno: libc::EBUSY,
                message: format!(
                    "image {} was first opened through this mount while inactivate \
                     decided: its pages cannot be counted without a request to the \
                     mount, whose threads may all be waiting for the decision; the \
                     image stays as it was: retry inactivate",
                    image.path()
                ),
            })),
        }
    }
}
