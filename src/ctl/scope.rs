//! What a command (or the `status` document) works with besides the image:
//! the one place that builds a [`CommandContext`] from the mount's record.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::ControlPlane;
use super::fuse_cache::MountCache;
use crate::cache::WriterScan;
use crate::image::{CommandContext, FuseCache, Image};

/// One request's surroundings: the mount's record, this mount's ids and
/// the one /proc pass for writers outside it, shared by every image of the
/// request.
pub struct CommandScope {
    plane: Arc<ControlPlane>,
    own_mounts: Vec<u64>,
    writers: WriterScan,
    invalidate_attrs: Box<dyn Fn(&Image) + Send + Sync>,
}

impl CommandScope {
    /// For a command request or the status document, on a worker thread:
    /// the mount ids of this mount (writers through it are fenced), and a
    /// writer scan that asks the daemon's cache first.
    pub fn of_worker(plane: &Arc<ControlPlane>) -> CommandScope {
        let own_mounts = crate::mountinfo::ids_at(&plane.config.mountpoint);
        CommandScope::new(
            plane,
            own_mounts,
            WriterScan::with_cache(&plane.writer_cache),
        )
    }

    /// Inside a request handler (invalidate-on-open): no mount ids and a
    /// writer scan of its own, as its steps name no writers (the scan is
    /// never taken).
    pub fn in_handler(plane: &Arc<ControlPlane>) -> CommandScope {
        CommandScope::new(plane, Vec::new(), WriterScan::new())
    }

    fn new(plane: &Arc<ControlPlane>, own_mounts: Vec<u64>, writers: WriterScan) -> CommandScope {
        let invalidator = plane.invalidator.clone();
        CommandScope {
            plane: plane.clone(),
            own_mounts,
            writers,
            invalidate_attrs: Box::new(move |img: &Image| {
                invalidator.request(img.nodeid.load(Ordering::Relaxed))
            }),
        }
    }

    /// The FUSE inodes' page caches, reached through files of this mount.
    /// Never from a request handler: such an open is a request to this
    /// daemon.
    pub fn mount_cache(&self) -> MountCache<'_> {
        MountCache::new(&self.plane.config.mountpoint, &self.plane.invalidator)
    }

    /// The context of one command on one image (`fuse`: None inside a
    /// request handler).
    pub fn context<'a>(&'a self, fuse: Option<&'a dyn FuseCache>) -> CommandContext<'a> {
        CommandContext {
            settings: &self.plane.settings,
            invalidate_attrs: &*self.invalidate_attrs,
            fuse,
            own_mounts: &self.own_mounts,
            writers: &self.writers,
        }
    }
}
