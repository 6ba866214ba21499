//! What a daemon taking over this one's connection needs to know: every
//! node the kernel holds (its backing entry's O_PATH fd, path and lookup
//! count) and every open handle (its backing fds and how it was opened).
//! The [`Keeper`] hears of each change before the kernel does, so the
//! keeper process holds a superset of what the kernel refers to even when
//! this process is killed between the two; [`MigsafeFs::restore_inode`] and
//! [`MigsafeFs::restore_handle`] rebuild the tables in the next daemon from
//! the same fds, so no node is ever matched to a backing entry by name.
//! Node changes are reported under the inode table's lock, so the keeper
//! sees them in the order the kernel does; each is one sendmsg, on lookups
//! and forgets but never on reads and writes.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde_json::{Value, json};

use super::MigsafeFs;
use super::handles::Open;
use crate::cache::{Identity, Incarnation};
use crate::datapath::{DataPath, PassthroughBacking};
use crate::image::Handle;
use crate::session::{Connection, Negotiated};
use crate::sys;

/// Hears of every change of the kernel's view of this mount, in order.
pub trait Keeper: Send + Sync {
    fn inode_new(&self, nodeid: u64, fd: BorrowedFd<'_>, path: &str);
    fn inode_ref(&self, nodeid: u64);
    fn inode_forget(&self, nodeid: u64, n: u64);
    fn handle_open(&self, fh: u64, record: Value, fds: &[BorrowedFd<'_>]);
    fn handle_close(&self, fh: u64);
}

/// The record of an open handle, and the fds that go with it.
fn handle_record(open: &Open, internal: bool) -> Option<(Value, Vec<BorrowedFd<'_>>)> {
    match open {
        Open::File(h) => {
            let mut fds = vec![h.file.as_fd()];
            if let Some(e) = &h.edges {
                fds.push(e.as_fd());
            }
            let record = json!({
                "kind": "file",
                "node": h.image.nodeid.load(Ordering::Relaxed),
                "writable": h.writable,
                "direct": h.direct,
                "data_path": h.data_path.name(),
                "pid": h.pid,
                "backing": h.passthrough().map(|p| p.id.id()),
                "edges": h.edges.is_some(),
                "internal": internal,
            });
            Some((record, fds))
        }
        Open::Dir(d) => Some((json!({ "kind": "dir", "node": d.nodeid }), Vec::new())),
        // A control file's command in flight is not carried over: its
        // reader gets EBADF, never an ok it did not see happen.
        Open::Ctl(_) => None,
    }
}

impl MigsafeFs {
    pub(crate) fn keeper(&self) -> Option<&Arc<dyn Keeper>> {
        self.inodes.keeper.get()
    }

    /// Registers `open` under a new number, telling the keeper first.
    pub(super) fn add_kept_handle(&self, open: Open, internal: bool) -> u64 {
        let fh = self.handles.reserve();
        if let Some(k) = self.keeper()
            && let Some((record, fds)) = handle_record(&open, internal)
        {
            k.handle_open(fh, record, &fds);
        }
        self.handles.insert(fh, open);
        fh
    }

    /// Rebuilds node `nodeid`, which the kernel holds `lookups` times, from
    /// the O_PATH fd of its backing entry.
    pub fn restore_inode(
        &self,
        nodeid: u64,
        fd: OwnedFd,
        path: String,
        lookups: u64,
    ) -> Result<(), String> {
        let st = sys::fstat_fd(fd.as_fd()).map_err(|e| format!("node {nodeid} ({path}): {e}"))?;
        let identity = Identity::of_stat(&st);
        let incarnation = Incarnation::of_fd(fd.as_fd(), st.st_dev);
        let kind = self.kind_of(&st, identity, &incarnation, &path);
        let fd = Arc::new(fd);
        let inode = self.inodes.restore(
            nodeid,
            fd.clone(),
            identity,
            incarnation,
            kind,
            path.clone(),
            lookups,
        );
        self.attach(&inode, fd, &path, st)
            .map(|_| ())
            .map_err(|e| format!("node {nodeid} ({path}): {e}"))
    }

    /// Rebuilds open handle `fh` from its record and backing fds.
    pub fn restore_handle(
        &self,
        fh: u64,
        record: &Value,
        mut fds: Vec<OwnedFd>,
        conn: &Connection,
    ) -> Result<(), String> {
        let node = record["node"].as_u64().unwrap_or(0);
        if record["kind"] == "dir" && node == super::inodes::CTL_DIR {
            let snapshot = self.snapshot_dir(node, None).map_err(|e| e.to_string())?;
            self.handles.insert(fh, Open::Dir(Arc::new(snapshot)));
            return Ok(());
        }
        let inode = self
            .inodes
            .get(node)
            .ok_or_else(|| format!("handle {fh}: node {node} is not known"))?;
        let open = if record["kind"] == "dir" {
            let fd = inode
                .fd
                .as_ref()
                .ok_or_else(|| format!("handle {fh}: no fd"))?;
            let snapshot = sys::reopen(fd.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY)
                .map_err(crate::error::Error::from)
                .and_then(|d| self.snapshot_dir(node, Some(d.into())))
                .map_err(|e| format!("handle {fh}: directory {node}: {e}"))?;
            Open::Dir(Arc::new(snapshot))
        } else {
            let image = inode
                .image()
                .cloned()
                .ok_or_else(|| format!("handle {fh}: node {node} is not an image"))?;
            if fds.is_empty() {
                return Err(format!("handle {fh}: no backing fd"));
            }
            let edges = record["edges"].as_bool() == Some(true) && fds.len() > 1;
            let edges = edges.then(|| File::from(fds.remove(1)));
            let file = Arc::new(File::from(fds.remove(0)));
            let data_path = record["data_path"]
                .as_str()
                .and_then(DataPath::from_name)
                .ok_or_else(|| format!("handle {fh}: unknown data path"))?;
            let passthrough = record["backing"].as_u64().map(|id| {
                let mut slot = inode.passthrough.lock().expect("passthrough lock");
                if let Some(existing) = slot.upgrade() {
                    return existing;
                }
                let backing = Arc::new(PassthroughBacking {
                    id: conn.adopt_backing(id as u32),
                    file: file.clone(),
                });
                *slot = Arc::downgrade(&backing);
                backing
            });
            let mut flags = if record["writable"].as_bool() == Some(true) {
                libc::O_RDWR
            } else {
                libc::O_RDONLY
            };
            if record["direct"].as_bool() == Some(true) {
                flags |= libc::O_DIRECT;
            }
            let pid = record["pid"].as_u64().unwrap_or(0) as u32;
            let mut handle = Handle::new(image.clone(), file, data_path, flags, pid, passthrough);
            handle.edges = edges;
            handle.assume_unsynced();
            let handle = Arc::new(handle);
            if record["internal"].as_bool() != Some(true) {
                image.add_handle(fh, handle.clone());
            }
            Open::File(handle)
        };
        self.handles.insert(fh, open);
        Ok(())
    }

    /// After a restore: the keeper hears of everything from here on.
    pub fn keep_with(&self, keeper: Arc<dyn Keeper>) {
        let _ = self.inodes.keeper.set(keeper);
    }
}

impl MigsafeFs {
    /// Takes what FUSE_INIT agreed from the daemon that answered it.
    pub fn adopted(&self, negotiated: &Negotiated, passthrough_supported: bool) {
        self.ctl
            .passthrough_active
            .store(negotiated.passthrough(), Ordering::Relaxed);
        self.ctl
            .writeback_active
            .store(negotiated.writeback(), Ordering::Relaxed);
        self.ctl
            .passthrough_supported
            .store(passthrough_supported, Ordering::Relaxed);
    }

    /// Whether passthrough was offered and is allowed here (for the keeper
    /// to hand to the next daemon).
    pub fn passthrough_supported(&self) -> bool {
        self.ctl.passthrough_supported.load(Ordering::Relaxed)
    }
}
