//! One open handle of an image: the single record that the filesystem's
//! handle table and the image's handle list share, and that owns the sync
//! rules (note a write, fsync, sync on flush, sync on release).

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::Image;
use crate::datapath::{DataPath, PassthroughBacking};
use crate::error::Error;
use crate::settings::Settings;
use crate::sys;

/// An open FUSE file handle of an image.
#[derive(Debug)]
pub struct Handle {
    pub image: Arc<Image>,
    /// The backing fd this handle reads, writes and syncs (opened with the
    /// caller's access mode and O_DIRECT/O_SYNC flags; on the cached path
    /// O_DIRECT, and read-write for a write-only open:
    /// `datapath::cached::prepare`).
    pub file: Arc<File>,
    pub data_path: DataPath,
    /// Cached path, writable handle of a regular file: a buffered
    /// write-only fd of the same backing file, for the bytes of writes that
    /// cover a block only partly (datapath/cached.rs). None otherwise.
    pub edges: Option<File>,
    pub direct: bool,
    pub writable: bool,
    /// The alignment O_DIRECT on the backing needs (STATX_DIOALIGN, else
    /// the logical block size).
    pub block: u64,
    /// The opening process and its command name, captured at open: the
    /// process may be gone by the time a report names it.
    pub pid: u32,
    pub comm: String,
    /// The image was inactive when this handle was opened.
    pub opened_inactive: bool,
    pub opened_at: Instant,
    /// Writes completed through this handle, and how many of them the last
    /// successful sync covered. A counter pair rather than a flag: a write
    /// that completes while a sync runs must stay unsynced, and a flag
    /// cleared after the sync would lose it.
    writes: AtomicU64,
    synced: AtomicU64,
    /// Keeps the inode's passthrough registration alive while open.
    passthrough: Option<Arc<PassthroughBacking>>,
}

impl Handle {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        image: Arc<Image>,
        file: Arc<File>,
        data_path: DataPath,
        flags: i32,
        pid: u32,
        passthrough: Option<Arc<PassthroughBacking>>,
    ) -> Handle {
        let pid = process_of(pid);
        let block = sys::dio_block(std::os::fd::AsFd::as_fd(&*file));
        Handle {
            opened_inactive: !image.is_active(),
            image,
            file,
            data_path,
            edges: None,
            direct: flags & libc::O_DIRECT != 0,
            writable: flags & libc::O_ACCMODE != libc::O_RDONLY,
            block,
            pid,
            comm: crate::cache::holders::comm_of(pid),
            opened_at: Instant::now(),
            writes: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            passthrough,
        }
    }

    /// The kernel passthrough registration this handle was opened with.
    pub fn passthrough(&self) -> Option<&Arc<PassthroughBacking>> {
        self.passthrough.as_ref()
    }

    /// A handle a restarted daemon took over: its writes since the last
    /// sync are unknown, so they count as not synced.
    pub fn assume_unsynced(&self) {
        if self.writable {
            self.note_write();
        }
    }

    /// A write, truncate, fallocate or copy into this handle completed.
    pub fn note_write(&self) {
        self.writes.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether this handle may hold data that no sync has covered yet.
    /// Passthrough writes never reach the daemon, so a writable passthrough
    /// handle is never known to be clean.
    pub fn needs_sync(&self) -> bool {
        self.writable
            && (self.data_path == DataPath::Passthrough
                || self.writes.load(Ordering::Acquire) != self.synced.load(Ordering::Acquire))
    }

    /// The kernel may write through a passthrough handle without asking.
    pub fn bypasses_fencing(&self) -> bool {
        self.writable && self.data_path == DataPath::Passthrough
    }

    /// FUSE fsync from the caller.
    pub fn fsync(&self, datasync: bool, settings: &Settings) -> Result<(), Error> {
        let seen = self.writes.load(Ordering::Acquire);
        self.image.sync_file(&self.file, datasync, settings)?;
        self.synced.fetch_max(seen, Ordering::AcqRel);
        Ok(())
    }

    /// The fsync-on-close rule at FLUSH (which `close()` waits for): the
    /// error reaches the closing process.
    pub fn sync_on_flush(&self, settings: &Settings) -> Result<(), Error> {
        if !settings.fsync_on_close() || !self.needs_sync() {
            return Ok(());
        }
        self.fsync(false, settings)
    }

    /// The same rule at RELEASE, for data written after the last flush
    /// (through a dup'ed fd or a mapping); nobody waits for the result, so
    /// a failure is logged and stays sticky on the image.
    pub fn sync_on_release(&self, settings: &Settings) {
        if let Err(e) = self.sync_on_flush(settings) {
            log::warn!("release {}: sync failed: {e}", self.image.path());
        }
    }

    /// `pid(comm)` for reports.
    pub fn who(&self) -> String {
        format!("{}({})", self.pid, self.comm)
    }
}

/// FUSE requests carry the calling thread's id; reports name the process
/// (its thread-group id), which is what `ps` and `kill` know.
fn process_of(tid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Tgid:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(tid)
}

/// Threads of this daemon that are opening files of its own mount (the
/// control plane measuring a FUSE inode's cache). Their opens must not
/// count as an image's handles, run close-to-open invalidation, or drop the
/// cache they are about to measure.
static INTERNAL_OPENERS: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// Runs `f` with the calling thread's opens marked as the daemon's own.
pub fn as_internal_opener<T>(f: impl FnOnce() -> T) -> T {
    let tid = sys::gettid();
    INTERNAL_OPENERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(tid);
    let out = f();
    let mut openers = INTERNAL_OPENERS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(i) = openers.iter().position(|t| *t == tid) {
        openers.swap_remove(i);
    }
    out
}

/// Whether a FUSE request from thread `tid` comes from this daemon's own
/// control plane.
pub fn is_internal_opener(tid: u32) -> bool {
    INTERNAL_OPENERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(&tid)
}
