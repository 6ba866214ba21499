//! Dropping the kernel's cached attributes of an image's FUSE inode, from
//! one long-lived worker thread, and its pages on a control command's
//! demand.

use std::sync::mpsc::Sender;
use std::sync::{Arc, OnceLock};

use crate::session::{INodeNo, Notifier};

/// One long-lived thread that sends FUSE inode invalidations. The kernel
/// may wait on locks held by the request being served when a notification
/// is sent from inside a handler, so handlers (and control commands) only
/// queue the node id here; a queue instead of a thread per request keeps
/// invalidate-on-open cheap.
pub struct AttrInvalidator {
    queue: Sender<u64>,
    notifier: Arc<OnceLock<Notifier>>,
}

impl AttrInvalidator {
    /// `notifier` is filled once the FUSE session exists; requests queued
    /// before are dropped (nothing can be cached before the mount is live).
    pub fn start(notifier: Arc<OnceLock<Notifier>>) -> AttrInvalidator {
        let (queue, rx) = std::sync::mpsc::channel::<u64>();
        let worker_notifier = notifier.clone();
        let spawned = std::thread::Builder::new()
            .name("migsafe-inval".into())
            .spawn(move || {
                for nodeid in rx {
                    // Offset -1: the attributes only. Pages are the open
                    // reply's business (no FOPEN_KEEP_CACHE on a first open)
                    // and `invalidate_now`'s; a drop queued here would land
                    // at any later moment, on pages read since, and also
                    // where `drop-cache` is off.
                    if let Some(n) = worker_notifier.get()
                        && let Err(e) = n.inval_inode(INodeNo(nodeid), -1, 0)
                    {
                        log::debug!("inval_inode {nodeid}: {e}");
                    }
                }
            });
        if let Err(e) = spawned {
            log::warn!("cannot start the invalidation thread: {e}; attributes expire by TTL only");
        }
        AttrInvalidator { queue, notifier }
    }

    /// Invalidates FUSE node `nodeid`'s attributes and page cache now, and
    /// returns once the kernel has done it: the kernel writes dirty pages
    /// back, unmaps mapped ones and drops them inside the notification's
    /// write. Only from a thread that serves no FUSE request (a control
    /// worker): the kernel may wait on pages a request being served holds.
    pub fn invalidate_now(&self, nodeid: u64) -> std::io::Result<()> {
        match self.notifier.get() {
            Some(n) if nodeid != 0 => match n.inval_inode(INodeNo(nodeid), 0, 0) {
                // ENOENT: the kernel has no such inode, so nothing cached.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
                other => other,
            },
            _ => Ok(()),
        }
    }

    /// Queues an invalidation of FUSE node `nodeid`'s attributes (0 = none:
    /// nothing to do); its pages stay.
    pub fn request(&self, nodeid: u64) {
        if nodeid != 0 {
            // Fails only once the worker is gone (unmounting): nothing to do then.
            let _ = self.queue.send(nodeid);
        }
    }
}
