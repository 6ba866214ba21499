//! The FUSE inode table: node ids handed to the kernel, each pinned to its
//! backing object, with the kernel's lookup count so `forget` can free it.
//! Backing entries are held by O_PATH fds (immune to renames on the backing,
//! and every later access is relative to them, never to a path string).

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use super::keep::Keeper;
use crate::backing::Device;
use crate::cache::{Identity, Incarnation};
use crate::image::Image;

/// Node ids: backing entries use their backing inode number, so `st_ino`
/// through the mount equals `d_ino` in readdir and the backing's own number.
/// Virtual nodes and the rare collisions (two backing filesystems under one
/// directory) live above `VIRTUAL_BASE`, where no real inode number is.
pub const ROOT: u64 = 1;
const VIRTUAL_BASE: u64 = 1 << 62;
pub const CTL_DIR: u64 = VIRTUAL_BASE;
/// Control files take node ids `CTL_FIRST..CTL_FIRST + n`.
pub const CTL_FIRST: u64 = VIRTUAL_BASE + 1;
/// Devices and colliding backing entries get ids from here up.
const FIRST_DYNAMIC: u64 = VIRTUAL_BASE + 256;

#[derive(Debug)]
pub enum Kind {
    Directory,
    /// A regular file of the backing or a `--device` entry: an image.
    Image(Arc<Image>),
    Symlink,
    /// FIFOs, sockets, device nodes found in the backing: served as they are
    /// but never opened by migsafe.
    Special,
}

#[derive(Debug)]
pub struct Inode {
    pub nodeid: u64,
    /// O_PATH fd of the backing entry; `None` for `--device` entries.
    pub fd: Option<Arc<OwnedFd>>,
    pub identity: Identity,
    /// Which file of that (dev, ino) the fd pins (see `lookup_or_insert`).
    pub incarnation: Incarnation,
    pub kind: Kind,
    /// Set for `--device` entries, which the namespace operations protect.
    pub device: Option<Arc<Device>>,
    /// Last known path relative to the mount root ("" for the root), for
    /// naming images in status and logs.
    pub path: RwLock<String>,
    lookups: AtomicU64,
    /// Passthrough backing registration shared by all handles of the inode.
    pub passthrough: Mutex<std::sync::Weak<crate::datapath::PassthroughBacking>>,
}

impl Inode {
    pub fn image(&self) -> Option<&Arc<Image>> {
        match &self.kind {
            Kind::Image(img) => Some(img),
            _ => None,
        }
    }

    pub fn is_dir(&self) -> bool {
        matches!(self.kind, Kind::Directory)
    }
}

#[derive(Default)]
pub struct InodeTable {
    by_id: RwLock<HashMap<u64, Arc<Inode>>>,
    by_identity: Mutex<HashMap<Identity, u64>>,
    next: AtomicU64,
    /// Told of every count change before the kernel hears of it (so a
    /// daemon started after this one dies knows every node the kernel
    /// does); unset when the daemon serves without a keeper.
    pub keeper: OnceLock<Arc<dyn Keeper>>,
}

impl InodeTable {
    pub fn new() -> InodeTable {
        InodeTable {
            next: AtomicU64::new(FIRST_DYNAMIC),
            ..Default::default()
        }
    }

    pub fn get(&self, nodeid: u64) -> Option<Arc<Inode>> {
        self.by_id.read().expect("inode lock").get(&nodeid).cloned()
    }

    /// Inserts the root or a device entry, which are never forgotten.
    pub fn insert_pinned(
        &self,
        nodeid: Option<u64>,
        fd: Option<Arc<OwnedFd>>,
        identity: Identity,
        kind: Kind,
        device: Option<Arc<Device>>,
    ) -> Arc<Inode> {
        let nodeid = nodeid.unwrap_or_else(|| self.next.fetch_add(1, Ordering::Relaxed));
        let inode = Arc::new(Inode {
            nodeid,
            fd,
            identity,
            incarnation: Incarnation::default(),
            kind,
            path: RwLock::new(device.as_ref().map(|d| d.name.clone()).unwrap_or_default()),
            device,
            lookups: AtomicU64::new(u64::MAX / 2),
            passthrough: Mutex::default(),
        });
        self.by_id
            .write()
            .expect("inode lock")
            .insert(nodeid, inode.clone());
        self.by_identity
            .lock()
            .expect("inode lock")
            .insert(identity, nodeid);
        inode
    }

    /// Returns the inode for a backing entry, creating it if needed, and
    /// counts one kernel lookup. An existing inode keeps its fd (the new one is
    /// dropped), so hard links share one node id. An inode whose fd pins
    /// another file with the same (dev, ino) (deleted on another NFS client,
    /// whose server then gave its number to a new file) is not that entry:
    /// the new file gets a node of its own, the old node stays until the
    /// kernel forgets it.
    pub fn lookup_or_insert(
        &self,
        identity: Identity,
        incarnation: Incarnation,
        path: String,
        make: impl FnOnce() -> (Arc<OwnedFd>, Kind),
    ) -> Arc<Inode> {
        let mut by_identity = self.by_identity.lock().expect("inode lock");
        if let Some(id) = by_identity.get(&identity)
            && let Some(inode) = self.get(*id)
            && inode.incarnation.same_file(&incarnation)
        {
            inode.lookups.fetch_add(1, Ordering::Relaxed);
            if let Some(k) = self.keeper.get() {
                k.inode_ref(inode.nodeid);
            }
            *inode.path.write().expect("path lock") = path;
            return inode;
        }
        let wanted = identity.ino;
        let nodeid = if wanted > ROOT && wanted < VIRTUAL_BASE && self.get(wanted).is_none() {
            wanted
        } else {
            self.next.fetch_add(1, Ordering::Relaxed)
        };
        let (fd, kind) = make();
        if let Some(k) = self.keeper.get() {
            k.inode_new(nodeid, fd.as_fd(), &path);
        }
        self.insert(
            nodeid,
            fd,
            identity,
            incarnation,
            kind,
            path,
            1,
            &mut by_identity,
        )
    }

    /// Enters a node the kernel already knows with `lookups` references
    /// (a restarted daemon taking over the connection).
    #[allow(clippy::too_many_arguments)]
    pub fn restore(
        &self,
        nodeid: u64,
        fd: Arc<OwnedFd>,
        identity: Identity,
        incarnation: Incarnation,
        kind: Kind,
        path: String,
        lookups: u64,
    ) -> Arc<Inode> {
        let mut by_identity = self.by_identity.lock().expect("inode lock");
        if nodeid >= self.next.load(Ordering::Relaxed) && nodeid >= FIRST_DYNAMIC {
            self.next.store(nodeid + 1, Ordering::Relaxed);
        }
        self.insert(
            nodeid,
            fd,
            identity,
            incarnation,
            kind,
            path,
            lookups,
            &mut by_identity,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn insert(
        &self,
        nodeid: u64,
        fd: Arc<OwnedFd>,
        identity: Identity,
        incarnation: Incarnation,
        kind: Kind,
        path: String,
        lookups: u64,
        by_identity: &mut HashMap<Identity, u64>,
    ) -> Arc<Inode> {
        let inode = Arc::new(Inode {
            nodeid,
            fd: Some(fd),
            identity,
            incarnation,
            kind,
            device: None,
            path: RwLock::new(path),
            lookups: AtomicU64::new(lookups),
            passthrough: Mutex::default(),
        });
        self.by_id
            .write()
            .expect("inode lock")
            .insert(nodeid, inode.clone());
        by_identity.insert(identity, nodeid);
        inode
    }

    /// The kernel dropped `n` references; the inode goes when none remain.
    pub fn forget(&self, nodeid: u64, n: u64) {
        let mut by_identity = self.by_identity.lock().expect("inode lock");
        let Some(inode) = self.get(nodeid) else {
            if !(CTL_DIR..FIRST_DYNAMIC).contains(&nodeid) {
                log::warn!("forget of node {nodeid}, which this daemon does not know");
            }
            return;
        };
        if let Some(k) = self.keeper.get() {
            k.inode_forget(nodeid, n);
        }
        let prev = inode.lookups.fetch_sub(
            n.min(inode.lookups.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        if prev <= n {
            self.by_id.write().expect("inode lock").remove(&nodeid);
            if by_identity.get(&inode.identity) == Some(&nodeid) {
                by_identity.remove(&inode.identity);
            }
            if let Some(img) = inode.image() {
                let _ =
                    img.nodeid
                        .compare_exchange(nodeid, 0, Ordering::Relaxed, Ordering::Relaxed);
            }
        }
    }
}
