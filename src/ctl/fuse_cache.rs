//! The FUSE inode's page cache of an image, as a control command on a
//! worker thread reaches it: through a file of this very mount (cachestat,
//! fsync) and a synchronous invalidation notification.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::Ordering;

use crate::cache::invalidator::AttrInvalidator;
use crate::image::handle::as_internal_opener;
use crate::image::{FuseCache, Image};
use crate::sys::{self, PageCounts};

pub struct MountCache<'a> {
    pub mountpoint: &'a Path,
    pub invalidator: &'a AttrInvalidator,
}

impl MountCache<'_> {
    /// Opens the image through the mount. Never from a request handler:
    /// the open is a request to this daemon.
    fn open(&self, image: &Image) -> io::Result<File> {
        let path = self.mountpoint.join(image.path());
        as_internal_opener(|| File::open(&path))
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
        let counts = sys::cachestat(f.as_fd());
        as_internal_opener(|| drop(f));
        counts
    }
}
