//! The image registry and each image's migration state machine
//! (docs/DESIGN.md §3): active/inactive, the sticky sync error, open handles,
//! counters and the last control command. Images are keyed by backing
//! identity (device, inode), so two paths to one file are one image, and an
//! image's state outlives the kernel forgetting its FUSE inode.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, Weak};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;

pub mod handle;
pub mod turns;

use crate::backing::Device;
use crate::cache::{self, Identity, Report, format_ranges, holders::format_holders};
use crate::error::Error;
use crate::settings::Settings;
use crate::sys;

/// How often `invalidate` drops and re-checks before reporting resident
/// pages (10, 20 ms apart).
const VERIFY_ATTEMPTS: u32 = 3;

/// Where an image's bytes live.
#[derive(Debug)]
pub enum Source {
    /// A regular file of the backing directory. While the kernel holds its
    /// FUSE inode, `live` reaches the inode's O_PATH fd (immune to renames);
    /// otherwise the file is found again by its last path beneath the
    /// backing root and must still be the same (dev, ino). The registry never
    /// pins the file itself: deleting an image must free its space.
    File {
        root: Arc<OwnedFd>,
        live: Mutex<Weak<OwnedFd>>,
    },
    /// A block device (or file) given with `--device NAME=PATH`.
    Device(Arc<Device>),
}

pub use crate::datapath::DataPath;
pub use handle::Handle;

#[derive(Debug, Default)]
pub struct Counters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub fsyncs: AtomicU64,
    pub activations: AtomicU64,
    pub inactivations: AtomicU64,
    pub invalidations: AtomicU64,
    pub sync_errors: AtomicU64,
    /// Failed control commands, by errno name.
    pub failures: Mutex<std::collections::BTreeMap<String, u64>>,
}

#[derive(Debug, Clone)]
struct LastCommand {
    command: String,
    at: SystemTime,
    ms: u64,
    result: String,
}

#[derive(Debug, Default)]
struct State {
    sticky_error: Option<i32>,
    last: Option<LastCommand>,
}

/// The outcome of one control command on one image.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub errno: Option<i32>,
    pub resident_pages: u64,
    pub detail: String,
    /// Writable handles exist whose writes the daemon cannot fence (named in
    /// `detail`), also on success.
    pub unfenced: bool,
}

impl Outcome {
    fn failed(errno: i32, detail: impl Into<String>) -> Outcome {
        Outcome {
            errno: Some(errno),
            detail: detail.into(),
            ..Outcome::default()
        }
    }
}

/// What a command needs from the filesystem around the image.
pub struct CommandContext<'a> {
    pub settings: &'a Settings,
    /// Drops the kernel's cached attributes of the image's FUSE inode (its
    /// size may have changed on the source). Called from a worker thread.
    pub invalidate_attrs: &'a (dyn Fn(&Image) + Sync),
    /// The FUSE inode's own page cache (cached data path, relay mappings);
    /// None inside a request handler, where it must not be touched.
    pub fuse: Option<&'a dyn FuseCache>,
    /// Mount ids of this daemon's own mount: writers through it are fenced,
    /// writers elsewhere (the backing itself, another or a crashed
    /// instance's mount) are named as unfenced.
    pub own_mounts: &'a [u64],
}

/// The page cache of an image's FUSE inode, as control commands (on worker
/// threads) reach it.
pub trait FuseCache: Sync {
    /// Writes the FUSE inode's dirty pages back through the daemon and syncs.
    fn writeback(&self, image: &Image) -> std::io::Result<()>;
    /// Writes back, unmaps and drops every page of the FUSE inode, and
    /// returns when the kernel has done it.
    fn drop_pages(&self, image: &Image) -> std::io::Result<()>;
    /// The FUSE inode's page counts (cachestat on a file of the mount).
    fn page_counts(&self, image: &Image) -> std::io::Result<sys::PageCounts>;
}

#[derive(Debug)]
pub struct Image {
    pub identity: Identity,
    pub source: Source,
    /// Last path this image was seen under, relative to the mount root.
    path: RwLock<String>,
    /// FUSE node id currently standing for this image (0 = none).
    pub nodeid: AtomicU64,
    /// Read on every relay write (EROFS fencing): an atomic, not the lock.
    inactive: std::sync::atomic::AtomicBool,
    /// Every write that reaches the daemon holds this shared while it checks
    /// `inactive` and runs; `inactivate` sets `inactive` and then takes it
    /// exclusively once, so when it goes on to sync, every write admitted
    /// before has finished and every later one sees `inactive` (EROFS).
    write_gate: RwLock<()>,
    /// Serializes a first open's close-to-open invalidation with the
    /// registration of its handle: two first opens racing would otherwise
    /// both invalidate, and one would find the pages the other's reader had
    /// just read from storage and refuse with EBUSY.
    open_gate: Mutex<()>,
    /// A backing fd kept from the first open on: an fd reports writeback
    /// errors that happen after it was opened, so this one sees every error
    /// of data this host wrote, also when no handle is open any more
    /// (a fresh fd at `inactivate` time would miss them).
    errseq: Mutex<Option<Arc<File>>>,
    /// A handle whose data path can leave pages in the FUSE inode (cached,
    /// or relay with mappings) has been open: the handover must drop and
    /// verify that cache too.
    fuse_pages: std::sync::atomic::AtomicBool,
    /// The cached path's locks: byte ranges of O_DIRECT read-modify-writes
    /// in progress, and the size lock that size changes hold alone.
    pub io_locks: crate::datapath::cached::Locks,
    state: Mutex<State>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    pub counters: Counters,
    /// Control commands on this image run one at a time, in the order
    /// their requests arrived (the control plane takes the tickets; an
    /// open's own invalidation does not queue here: it runs on a FUSE
    /// request thread, which must never wait behind a command that may
    /// itself need FUSE requests served).
    pub commands: turns::Turns,
}

impl Image {
    pub fn new(identity: Identity, source: Source, path: String) -> Image {
        Image {
            identity,
            source,
            path: RwLock::new(path),
            nodeid: AtomicU64::new(0),
            inactive: Default::default(),
            write_gate: RwLock::default(),
            open_gate: Mutex::default(),
            errseq: Mutex::default(),
            fuse_pages: Default::default(),
            io_locks: Default::default(),
            state: Mutex::default(),
            handles: Mutex::default(),
            counters: Counters::default(),
            commands: Default::default(),
        }
    }

    pub fn path(&self) -> String {
        self.path.read().expect("path lock").clone()
    }

    pub fn set_path(&self, path: String) {
        *self.path.write().expect("path lock") = path;
    }

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

    /// How much of a `len`-byte write at `offset` fits: all of it for a
    /// file, up to its end for a device (`Device::write_room`).
    pub fn write_room(&self, offset: u64, len: usize) -> Result<usize, Error> {
        match self.device() {
            Some(d) => d.write_room(offset, len),
            None => Ok(len),
        }
    }

    /// ENOSPC when the image would have to grow to `end` bytes and cannot.
    pub fn grow_allowed(&self, end: u64) -> Result<(), Error> {
        match self.device() {
            Some(d) => d.grow_allowed(end),
            None => Ok(()),
        }
    }

    pub fn is_active(&self) -> bool {
        !self.inactive.load(Ordering::Relaxed)
    }

    pub fn sticky_error(&self) -> Option<i32> {
        self.state.lock().expect("state lock").sticky_error
    }

    /// Opens a fresh backing fd (never O_DIRECT: it must see the page cache).
    pub fn open_backing(&self, flags: i32) -> std::io::Result<File> {
        match &self.source {
            Source::File { root, live } => {
                let live = live.lock().expect("live lock").upgrade();
                if let Some(opath) = live {
                    return sys::reopen(opath.as_fd(), flags);
                }
                let path = sys::cstring(std::ffi::OsStr::new(&self.path()))?;
                let fd =
                    sys::openat2_beneath(root.as_fd(), &path, libc::O_PATH | libc::O_NOFOLLOW)?;
                let st = sys::fstat_fd(fd.as_fd())?;
                if Identity::of_stat(&st) != self.identity {
                    return Err(std::io::Error::from_raw_os_error(libc::ENOENT));
                }
                sys::reopen(fd.as_fd(), flags)
            }
            Source::Device(d) => d.open(flags),
        }
    }

    /// EROFS when this host must not write the image (an inactive image
    /// with `inactive-writes` deny or strict). Only a check: a write must go
    /// through `admit_write`, which also holds off `inactivate` while it runs.
    pub fn check_writable(&self, settings: &Settings) -> Result<(), Error> {
        if settings.deny_inactive_writes() && !self.is_active() {
            return Err(Error::Fenced);
        }
        Ok(())
    }

    /// Admits one write (relay write, truncate, fallocate, copy_file_range):
    /// the guard must be held until the write has reached the backing fd.
    pub fn admit_write(&self, settings: &Settings) -> Result<RwLockReadGuard<'_, ()>, Error> {
        let gate = self.write_gate.read().unwrap_or_else(|p| p.into_inner());
        self.check_writable(settings)?;
        Ok(gate)
    }

    /// Waits until every write admitted so far has finished.
    fn drain_writes(&self) {
        drop(self.write_gate.write().unwrap_or_else(|p| p.into_inner()));
    }

    /// Held across a first open's invalidation and its handle's
    /// registration.
    pub fn open_gate(&self) -> std::sync::MutexGuard<'_, ()> {
        self.open_gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn add_handle(&self, fh: u64, handle: Arc<Handle>) {
        {
            let mut keep = self.errseq.lock().expect("errseq lock");
            if keep.is_none() {
                // Sampled before this handle writes anything.
                match self.open_backing(libc::O_RDONLY) {
                    Ok(f) => *keep = Some(Arc::new(f)),
                    Err(e) => log::warn!(
                        "image {}: cannot keep a backing fd for writeback errors: {e}",
                        self.path()
                    ),
                }
            }
        }
        if handle.data_path.fuse_pages() {
            self.fuse_pages.store(true, Ordering::Relaxed);
        }
        self.handles
            .lock()
            .expect("handles lock")
            .insert(fh, handle);
    }

    /// The FUSE cache to manage for this image in this command, if any.
    fn fuse_cache<'a>(&self, ctx: &CommandContext<'a>) -> Option<&'a dyn FuseCache> {
        ctx.fuse.filter(|_| {
            self.fuse_pages.load(Ordering::Relaxed) && self.nodeid.load(Ordering::Relaxed) != 0
        })
    }

    fn fuse_failed(e: std::io::Error, what: &str) -> Outcome {
        Outcome::failed(
            sys::errno_of(&e),
            format!("{what} the FUSE page cache: {e}"),
        )
    }

    pub fn remove_handle(&self, fh: u64) {
        let mut handles = self.handles.lock().expect("handles lock");
        handles.remove(&fh);
        if handles.is_empty() {
            // A file deleted (on any host) must free its space: do not pin it
            // once nobody here has it open.
            let mut keep = self.errseq.lock().expect("errseq lock");
            if let Some(f) = keep.as_ref()
                && !self.is_device()
                && f.metadata()
                    .map(|m| std::os::unix::fs::MetadataExt::nlink(&m) == 0)
                    .unwrap_or(true)
            {
                *keep = None;
            }
        }
    }

    pub fn open_handle_count(&self) -> usize {
        self.handles.lock().expect("handles lock").len()
    }

    pub fn handles(&self) -> Vec<Arc<Handle>> {
        self.handles
            .lock()
            .expect("handles lock")
            .values()
            .cloned()
            .collect()
    }

    /// Open handles whose writes never reach the daemon (writable
    /// passthrough): EROFS fencing cannot stop them.
    pub fn unfenced_writers(&self) -> Vec<Arc<Handle>> {
        let mut v: Vec<Arc<Handle>> = self
            .handles()
            .into_iter()
            .filter(|h| h.bypasses_fencing())
            .collect();
        v.sort_by_key(|h| h.opened_at);
        v
    }

    /// `fencing partial: ...` naming every writer the daemon cannot fence:
    /// its own writable passthrough handles (opened before or after
    /// inactivate) and, with `own_mounts`, processes writing the backing
    /// outside this mount. Empty when fencing is full.
    fn unfenced_report(&self, own_mounts: Option<&[u64]>) -> String {
        let mut list: Vec<String> = self
            .unfenced_writers()
            .iter()
            .map(|h| {
                format!(
                    "{} writable passthrough, opened {} inactivate",
                    h.who(),
                    if h.opened_inactive { "after" } else { "before" }
                )
            })
            .collect();
        if let Some(own) = own_mounts {
            list.extend(
                cache::find_unfenced_writers(self.identity, &self.path(), own)
                    .iter()
                    .map(|h| format!("{}({}) {}", h.pid, h.comm, h.how)),
            );
        }
        if list.is_empty() {
            return String::new();
        }
        format!(
            "fencing partial: writers the daemon cannot fence: {}",
            list.join(", ")
        )
    }

    /// Syncs one backing fd with the mount's sync rule, recording a failure
    /// as the image's sticky error: after a failed fsync the kernel marks the
    /// lost pages clean, so a later "successful" sync would lie.
    pub fn sync_file(&self, file: &File, datasync: bool, settings: &Settings) -> Result<(), Error> {
        if let Some(e) = self.sticky_error() {
            return Err(Error::Sticky(e));
        }
        self.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
        let res = if settings.full_fsync() || !datasync {
            file.sync_all()
        } else {
            file.sync_data()
        };
        res.map_err(|e| {
            let errno = sys::errno_of(&e);
            self.counters.sync_errors.fetch_add(1, Ordering::Relaxed);
            // Two syncs failing at once: the first error stays, and both
            // callers report it.
            let sticky = *self
                .state
                .lock()
                .expect("state lock")
                .sticky_error
                .get_or_insert(errno);
            log::warn!(
                "image {}: sync failed: {} ({e}); it stays failed with {} until activate",
                self.path(),
                sys::errno_name(errno),
                sys::errno_name(sticky)
            );
            Error::Sticky(sticky)
        })
    }

    /// Syncs every open backing fd of the image and the fd kept since the
    /// first open (or, for an image never opened here, a fresh one): each
    /// fd reports writeback errors only since it sampled them, so one fd
    /// alone could miss an error another already consumed.
    fn sync_everything(&self, settings: &Settings) -> Result<(), Outcome> {
        let mut files: Vec<Arc<File>> = self.handles().iter().map(|h| h.file.clone()).collect();
        let kept = self.errseq.lock().expect("errseq lock").clone();
        match kept {
            Some(f) => files.push(f),
            None => files.push(Arc::new(self.open_backing(libc::O_RDONLY).map_err(
                |e| Outcome::failed(sys::errno_of(&e), format!("cannot open backing: {e}")),
            )?)),
        }
        for f in &files {
            self.sync_file(f, false, settings).map_err(|e| {
                Outcome::failed(
                    e.errno(),
                    "sync failed; the image stays failed until activate",
                )
            })?;
        }
        Ok(())
    }

    /// `flush`: wait for the writes admitted so far, then sync every
    /// backing fd of the image.
    pub fn flush(&self, ctx: &CommandContext<'_>) -> Outcome {
        self.run_command("flush", || {
            if let Some(fuse) = self.fuse_cache(ctx) {
                fuse.writeback(self)
                    .map_err(|e| Self::fuse_failed(e, "cannot write back"))?;
            }
            self.drain_writes();
            self.sync_everything(ctx.settings)?;
            Ok(self.fencing_outcome(ctx))
        })
    }

    /// `inactivate`: mark inactive (later writes get EROFS), wait for every
    /// write admitted before, sync, drop the cached pages, and verify that no
    /// dirty or writeback page is left. In this order: a sync before the
    /// mark would let writes admitted between the two stay dirty here and be
    /// written back over the destination's data later. A failed sync puts
    /// the image back to active so the source can keep running.
    pub fn inactivate(&self, ctx: &CommandContext<'_>) -> Outcome {
        self.run_command("inactivate", || {
            // Dirty pages of mappings in the FUSE inode are written back
            // through the daemon while writes are still admitted; once the
            // image is inactive they could only fail with EROFS.
            if let Some(fuse) = self.fuse_cache(ctx) {
                fuse.writeback(self)
                    .map_err(|e| Self::fuse_failed(e, "cannot write back"))?;
            }
            self.inactive.store(true, Ordering::SeqCst);
            self.drain_writes();
            let result = self.inactivate_steps(ctx);
            if result.is_err() {
                self.inactive.store(false, Ordering::SeqCst);
            } else {
                self.counters.inactivations.fetch_add(1, Ordering::Relaxed);
            }
            result
        })
    }

    fn inactivate_steps(&self, ctx: &CommandContext<'_>) -> Result<Outcome, Outcome> {
        let file = self
            .open_backing(libc::O_RDONLY)
            .map_err(|e| Outcome::failed(sys::errno_of(&e), format!("cannot open backing: {e}")))?;
        // Pages dirtied between the syncs (by a writer the daemon cannot
        // fence) are synced again a few times before giving up.
        if !ctx.settings.deny_inactive_writes() {
            // inactive-writes=allow: the operator lets writes through, so
            // nothing can promise that none is left; sync what is there.
            self.sync_everything(ctx.settings)?;
            if ctx.settings.drop_cache() {
                cache::evict(&file).map_err(|e| {
                    Outcome::failed(sys::errno_of(&e), format!("fadvise failed: {e}"))
                })?;
            }
            return Ok(self.fencing_outcome(ctx));
        }
        let mut left = sys::PageCounts::default();
        for _ in 0..3 {
            self.sync_everything(ctx.settings)?;
            if ctx.settings.drop_cache() {
                cache::evict(&file).map_err(|e| {
                    Outcome::failed(sys::errno_of(&e), format!("fadvise failed: {e}"))
                })?;
            }
            left = sys::cachestat(file.as_fd()).unwrap_or_default();
            if let Some(fuse) = self.fuse_cache(ctx) {
                if ctx.settings.drop_cache() {
                    fuse.drop_pages(self)
                        .map_err(|e| Self::fuse_failed(e, "cannot drop"))?;
                }
                let f = fuse
                    .page_counts(self)
                    .map_err(|e| Self::fuse_failed(e, "cannot read"))?;
                left.dirty += f.dirty;
                left.writeback += f.writeback;
                left.cached += f.cached;
            }
            if left.dirty + left.writeback == 0 {
                return Ok(self.fencing_outcome(ctx));
            }
        }
        let writers = self.unfenced_report(Some(ctx.own_mounts));
        Err(Outcome {
            errno: Some(libc::EBUSY),
            resident_pages: left.cached,
            detail: format!(
                "{} dirty and {} writeback pages written on this host after the sync; \
                 a writer outside the daemon's fencing is still writing{}; stop it before handing over",
                left.dirty,
                left.writeback,
                if writers.is_empty() {
                    format!(" (holders: {})", self.holders_text())
                } else {
                    format!(" ({writers})")
                }
            ),
            unfenced: !writers.is_empty(),
        })
    }

    /// Ok, naming the writers that fencing cannot stop, if any.
    fn fencing_outcome(&self, ctx: &CommandContext<'_>) -> Outcome {
        let report = self.unfenced_report(Some(ctx.own_mounts));
        Outcome {
            unfenced: !report.is_empty(),
            detail: report,
            ..Outcome::default()
        }
    }

    fn holders_text(&self) -> String {
        let holders = cache::find_holders(self.identity);
        if holders.is_empty() {
            "none found".to_string()
        } else {
            format_holders(&holders)
        }
    }

    /// `invalidate`: the destination-side steps in order. It never clears a
    /// sticky sync error: only `activate`, an operator's explicit decision.
    pub fn invalidate(&self, ctx: &CommandContext<'_>) -> Outcome {
        self.run_command("invalidate", || {
            self.invalidate_steps(ctx, false)?;
            Ok(self.fencing_outcome(ctx))
        })
    }

    /// `activate` = invalidate + active + clear the sticky error.
    pub fn activate(&self, ctx: &CommandContext<'_>) -> Outcome {
        self.run_command("activate", || {
            self.invalidate_steps(ctx, false)?;
            self.inactive.store(false, Ordering::SeqCst);
            self.clear_sticky_error();
            self.counters.activations.fetch_add(1, Ordering::Relaxed);
            Ok(self.fencing_outcome(ctx))
        })
    }

    /// `check`: the residency check alone, dropping nothing.
    pub fn check(&self, ctx: &CommandContext<'_>) -> Outcome {
        self.run_command("check", || {
            let file = self.open_backing(libc::O_RDONLY).map_err(|e| {
                Outcome::failed(sys::errno_of(&e), format!("cannot open backing: {e}"))
            })?;
            if let Some(fuse) = self.fuse_cache(ctx) {
                let f = fuse
                    .page_counts(self)
                    .map_err(|e| Self::fuse_failed(e, "cannot read"))?;
                if f.cached > 0 {
                    return Err(Outcome {
                        errno: Some(libc::EBUSY),
                        resident_pages: f.cached,
                        detail: format!(
                            "{} pages resident in the FUSE page cache of the image ({} dirty, {} writeback)",
                            f.cached, f.dirty, f.writeback
                        ),
                        unfenced: false,
                    });
                }
            }
            self.verify_dropped(&file, false)
        })
    }

    /// The first open of an image on this host (close-to-open): the same
    /// steps as `invalidate`, except that a sticky sync error stays: clearing
    /// it is an operator's decision (`activate`), not a side effect of a
    /// VMM reopening the image.
    pub fn invalidate_on_open(&self, ctx: &CommandContext<'_>) -> Outcome {
        self.run_command("invalidate-on-open", || self.invalidate_steps(ctx, true))
    }

    /// `on_open`: dirty pages mean this host itself wrote the image and has
    /// not written it back yet, so its cache is ahead of storage, not stale:
    /// the open proceeds without dropping anything (an explicit
    /// `invalidate`/`activate` still refuses, as docs/DESIGN.md §3 says).
    fn invalidate_steps(
        &self,
        ctx: &CommandContext<'_>,
        on_open: bool,
    ) -> Result<Outcome, Outcome> {
        self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
        let file = self
            .open_backing(libc::O_RDONLY)
            .map_err(|e| Outcome::failed(sys::errno_of(&e), format!("cannot open backing: {e}")))?;
        // Nothing cached on this host: nothing can be stale, and steps 2 and
        // 4 are skipped, so a first open of an uncached image costs one
        // cachestat.
        let mut nothing_cached = false;
        if ctx.settings.drop_cache() {
            // 1. Dirty or writeback pages here would be written over the
            // source's newer data by DONTNEED: refuse and drop nothing.
            let size = cache::file_size(&file).unwrap_or(0);
            match cache::page_counts(&file, size) {
                Ok((c, _)) if c.dirty + c.writeback > 0 && on_open => {
                    log::debug!(
                        "open {}: {} dirty pages written on this host; not invalidating",
                        self.path(),
                        c.dirty + c.writeback
                    );
                    return Ok(Outcome::default());
                }
                Ok((c, _)) if c.dirty + c.writeback > 0 => {
                    return Err(Outcome {
                        errno: Some(libc::EBUSY),
                        resident_pages: c.cached,
                        detail: format!(
                            "{} dirty and {} writeback pages on this host; nothing dropped; \
                             find the writer on this host (it must not write an image the source owns)",
                            c.dirty, c.writeback
                        ),
                        unfenced: false,
                    });
                }
                Ok((c, _)) => nothing_cached = c.cached == 0,
                Err(e) => {
                    return Err(Outcome::failed(
                        sys::errno_of(&e),
                        format!("cannot read page-cache state: {e}"),
                    ));
                }
            }
            // 2. Drop this host's cached pages of the backing.
            if !nothing_cached {
                cache::evict(&file).map_err(|e| {
                    Outcome::failed(sys::errno_of(&e), format!("fadvise failed: {e}"))
                })?;
            }
        }
        // The FUSE inode's own cache (cached path, relay mappings): the
        // same refusal for dirty pages, then a drop that has happened when
        // this returns (the kernel unmaps mapped pages too, so no mapping
        // can read a stale page after activate said ok).
        if let Some(fuse) = self.fuse_cache(ctx).filter(|_| ctx.settings.drop_cache()) {
            let f = fuse
                .page_counts(self)
                .map_err(|e| Self::fuse_failed(e, "cannot read"))?;
            if f.dirty + f.writeback > 0 {
                return Err(Outcome {
                    errno: Some(libc::EBUSY),
                    resident_pages: f.cached,
                    detail: format!(
                        "{} dirty and {} writeback pages in the FUSE page cache on this host; nothing dropped; \
                         find the writer on this host (it must not write an image the source owns)",
                        f.dirty, f.writeback
                    ),
                    unfenced: false,
                });
            }
            fuse.drop_pages(self)
                .map_err(|e| Self::fuse_failed(e, "cannot drop"))?;
            let f = fuse
                .page_counts(self)
                .map_err(|e| Self::fuse_failed(e, "cannot read"))?;
            // Clean pages present now were read from storage after the drop.
            if ctx.settings.check_cache_dropped() && f.dirty + f.writeback > 0 {
                return Err(Outcome {
                    errno: Some(libc::EBUSY),
                    resident_pages: f.cached,
                    detail: format!(
                        "{} dirty and {} writeback pages of the FUSE page cache survived the drop; \
                         a process on this host is writing the image",
                        f.dirty, f.writeback
                    ),
                    unfenced: false,
                });
            }
        } else {
            // 3. The size may have changed on the source (the drop above
            // invalidates the attributes too).
            (ctx.invalidate_attrs)(self);
        }
        // 4. Verify nothing stayed resident. Pages a process just let go of
        // (an unmapped mlock, a folio still in a per-CPU LRU batch, readahead
        // completing) can outlive one DONTNEED by a few milliseconds: drop
        // and look again a few times before failing. Pages that are really
        // held (mapped and touched) survive every retry.
        if ctx.settings.drop_cache() && ctx.settings.check_cache_dropped() && !nothing_cached {
            let mut attempt = 1;
            loop {
                let last = attempt >= VERIFY_ATTEMPTS;
                match self.verify_dropped(&file, last) {
                    Ok(_) => break,
                    Err(failed) if last || failed.errno != Some(libc::EBUSY) => return Err(failed),
                    Err(_) => {}
                }
                std::thread::sleep(std::time::Duration::from_millis(10 * attempt as u64));
                cache::evict(&file).map_err(|e| {
                    Outcome::failed(sys::errno_of(&e), format!("fadvise failed: {e}"))
                })?;
                attempt += 1;
            }
        }
        // 5. Re-read the size.
        if let Some(d) = self.device() {
            d.reread_size(&file);
        }
        Ok(Outcome::default())
    }

    /// Only `activate`, an operator's explicit decision, forgets a failed
    /// sync. The kept fd is opened afresh too: it would otherwise report the
    /// forgotten error once more at the next sync.
    fn clear_sticky_error(&self) {
        let mut keep = self.errseq.lock().expect("errseq lock");
        if keep.is_some() {
            *keep = self.open_backing(libc::O_RDONLY).ok().map(Arc::new);
        }
        self.state.lock().expect("state lock").sticky_error = None;
    }

    /// Fails with EBUSY naming resident pages, ranges and holders, or with
    /// the errno that made verification impossible ("cannot verify" is never
    /// a pass).
    ///
    /// `allow_reread`: DONTNEED skips only pages that are dirty, under
    /// writeback, mapped or pinned; every other page it drops. So clean pages
    /// found after repeated drops while no process maps the file were read
    /// from storage again after a drop (another opener, a udev probe of a
    /// fresh LUN): they are current, not stale, and do not fail the check.
    /// Dirty or mapped pages still do.
    fn verify_dropped(&self, file: &File, allow_reread: bool) -> Result<Outcome, Outcome> {
        let report = Report::of(file, self.identity).map_err(|e| {
            Outcome::failed(
                sys::errno_of(&e),
                format!("cannot verify that the page cache was dropped: {e}"),
            )
        })?;
        if report.counts.cached == 0 {
            return Ok(Outcome::default());
        }
        let mapped = report.holders.iter().any(|h| h.how == "mmap");
        let holders = if report.holders.is_empty() {
            "none found".to_string()
        } else {
            format_holders(&report.holders)
        };
        if allow_reread && !mapped && report.counts.dirty + report.counts.writeback == 0 {
            log::info!(
                "image {}: {} clean pages were read from storage again after the drop (holders {holders}); \
                 they are current, not stale",
                self.path(),
                report.counts.cached
            );
            return Ok(Outcome::default());
        }
        Err(Outcome {
            errno: Some(libc::EBUSY),
            resident_pages: report.counts.cached,
            detail: format!(
                "{} pages still resident ({} dirty, {} writeback); first ranges {}; holders {holders}{}",
                report.counts.cached,
                report.counts.dirty,
                report.counts.writeback,
                format_ranges(&report.ranges),
                self.handle_summary()
            ),
            unfenced: false,
        })
    }

    fn handle_summary(&self) -> String {
        let handles = self.handles();
        if handles.is_empty() {
            return String::new();
        }
        let pids: Vec<String> = handles.iter().map(|h| h.who()).collect();
        format!("; open through this mount by {}", pids.join(","))
    }

    fn run_command(&self, name: &str, f: impl FnOnce() -> Result<Outcome, Outcome>) -> Outcome {
        let start = Instant::now();
        let outcome = f().unwrap_or_else(|e| e);
        let ms = start.elapsed().as_millis() as u64;
        let result = match outcome.errno {
            None => "ok".to_string(),
            Some(e) => sys::errno_name(e),
        };
        match outcome.errno {
            None if name == "invalidate-on-open" => {
                log::debug!("{name} {}: ok in {ms} ms", self.path())
            }
            None if outcome.unfenced => log::warn!(
                "{name} {}: ok in {ms} ms, but {}",
                self.path(),
                outcome.detail
            ),
            None => log::info!("{name} {}: ok in {ms} ms", self.path()),
            Some(_) => log::warn!(
                "{name} {}: {result} in {ms} ms: {}",
                self.path(),
                outcome.detail
            ),
        }
        if let Some(e) = outcome.errno {
            *self
                .counters
                .failures
                .lock()
                .expect("failures lock")
                .entry(sys::errno_name(e))
                .or_default() += 1;
        }
        self.state.lock().expect("state lock").last = Some(LastCommand {
            command: name.to_string(),
            at: SystemTime::now(),
            ms,
            result,
        });
        outcome
    }

    /// Whether the image can still be found by its last path; the error
    /// says what to do when it cannot.
    pub fn locate(&self) -> Result<(), Outcome> {
        if self.is_device() {
            return Ok(());
        }
        self.open_backing(libc::O_RDONLY).map(drop).map_err(|e| {
            Outcome::failed(
                sys::errno_of(&e),
                format!(
                    "image last seen as {} cannot be found there ({e}): renamed or deleted \
                     outside this mount? name it by its current path",
                    self.path()
                ),
            )
        })
    }

    /// True when the file is known to be deleted everywhere: the fd kept
    /// since its first open sees no name left.
    fn is_deleted(&self) -> bool {
        if self.is_device() {
            return false;
        }
        let keep = self.errseq.lock().expect("errseq lock");
        keep.as_ref().is_some_and(|f| {
            f.metadata()
                .map(|m| std::os::unix::fs::MetadataExt::nlink(&m) == 0)
                .unwrap_or(false)
        }) && self.open_handle_count() == 0
    }

    /// `size`: None when unknown; `missing`: why the backing cannot be
    /// opened (the image is still listed, with this error).
    pub fn status_json(
        &self,
        size: Option<u64>,
        missing: Option<std::io::Error>,
        own_mounts: &[u64],
        fuse: Option<&dyn FuseCache>,
    ) -> serde_json::Value {
        let (state, sticky, last) = {
            let st = self.state.lock().expect("state lock");
            (
                if self.is_active() {
                    "active"
                } else {
                    "inactive"
                },
                st.sticky_error.map(sys::errno_name),
                st.last.clone(),
            )
        };
        let counts = self
            .open_backing(libc::O_RDONLY)
            .ok()
            .and_then(|f| sys::cachestat(f.as_fd()).ok())
            .unwrap_or_default();
        let handles: Vec<serde_json::Value> = self
            .handles()
            .iter()
            .map(|h| {
                json!({
                    "pid": h.pid,
                    "comm": h.comm,
                    "data_path": h.data_path.name(),
                    "writable": h.writable,
                    "fenced": !h.bypasses_fencing(),
                    "opened_while_inactive": h.opened_inactive,
                })
            })
            .collect();
        // The FUSE inode's own cache, for images whose data path can fill
        // it (cached; relay through mappings): the cache the handover drops
        // and verifies beside the backing's.
        let fuse_cache = fuse
            .filter(|_| {
                self.fuse_pages.load(Ordering::Relaxed) && self.nodeid.load(Ordering::Relaxed) != 0
            })
            .map(|f| match f.page_counts(self) {
                Ok(p) => json!({
                    "cached_pages": p.cached,
                    "dirty_pages": p.dirty,
                    "writeback_pages": p.writeback,
                }),
                Err(e) => json!({ "error": e.to_string() }),
            });
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let unfenced = self.unfenced_report(Some(own_mounts));
        json!({
            "path": self.path(),
            "error": missing.map(|e| format!(
                "{}: cannot be found by its last path ({e}); renamed or deleted outside this mount?",
                sys::errno_name(sys::errno_of(&e))
            )),
            "kind": if self.is_device() { "device" } else { "file" },
            "state": state,
            "size": size,
            "cached_pages": counts.cached,
            "dirty_pages": counts.dirty,
            "writeback_pages": counts.writeback,
            "fuse_cache": fuse_cache,
            "sticky_error": sticky,
            "fencing": if unfenced.is_empty() { "full" } else { "partial" },
            "unfenced": if unfenced.is_empty() { None } else { Some(unfenced) },
            "open_handles": handles,
            "last_command": last.map(|l| json!({
                "command": l.command,
                "at": l.at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
                "ms": l.ms,
                "result": l.result,
            })),
            "counters": {
                "reads": load(&c.reads),
                "writes": load(&c.writes),
                "fsyncs": load(&c.fsyncs),
                "sync_errors": load(&c.sync_errors),
                "activations": load(&c.activations),
                "inactivations": load(&c.inactivations),
                "invalidations": load(&c.invalidations),
                "failures": c.failures.lock().expect("failures lock").clone(),
            },
        })
    }
}

/// All images this mount has seen, by backing identity.
#[derive(Debug, Default)]
pub struct Registry {
    images: Mutex<HashMap<Identity, Arc<Image>>>,
}

impl Registry {
    /// Returns the image for `identity`, creating it with `make` the first time.
    pub fn get_or_insert(&self, identity: Identity, make: impl FnOnce() -> Image) -> Arc<Image> {
        self.images
            .lock()
            .expect("registry lock")
            .entry(identity)
            .or_insert_with(|| Arc::new(make()))
            .clone()
    }

    pub fn get(&self, identity: &Identity) -> Option<Arc<Image>> {
        self.images
            .lock()
            .expect("registry lock")
            .get(identity)
            .cloned()
    }

    pub fn remove(&self, identity: &Identity) {
        self.images.lock().expect("registry lock").remove(identity);
    }

    /// Forgets `image` if it is deleted (no name left on the backing and
    /// no handle open here); returns whether it did.
    pub fn forget_if_deleted(&self, image: &Image) -> bool {
        if image.is_deleted() {
            self.remove(&image.identity);
            return true;
        }
        false
    }

    pub fn all(&self) -> Vec<Arc<Image>> {
        let mut v: Vec<Arc<Image>> = self
            .images
            .lock()
            .expect("registry lock")
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|i| i.path());
        v
    }
}

#[cfg(test)]
mod tests {
    //! The state machine on a real file in a temporary directory, without a
    //! mount: fast and deterministic.
    use super::*;
    use crate::settings::Key;
    use std::io::Write;

    fn image_in(dir: &tempfile::TempDir, name: &str) -> (Image, File) {
        let path = dir.path().join(name);
        let mut f = File::create(&path).unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        let root = sys::openat(
            sys::cwd(),
            &sys::cstring(dir.path().as_os_str()).unwrap(),
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )
        .unwrap();
        let st = sys::fstat_fd(f.as_fd()).unwrap();
        let image = Image::new(
            Identity::of_stat(&st),
            Source::File {
                root: Arc::new(root),
                live: Mutex::default(),
            },
            name.to_string(),
        );
        (image, f)
    }

    fn ctx(settings: &Settings) -> CommandContext<'_> {
        CommandContext {
            settings,
            invalidate_attrs: &|_| {},
            fuse: None,
            own_mounts: &[],
        }
    }

    #[test]
    fn inactivate_fences_and_activate_lifts_it() {
        let dir = tempfile::tempdir().unwrap();
        let (image, _f) = image_in(&dir, "vm.img");
        let settings = Settings::default();
        assert!(image.is_active());
        assert!(image.admit_write(&settings).is_ok());
        let o = image.inactivate(&ctx(&settings));
        assert_eq!(o.errno, None, "{}", o.detail);
        assert!(!image.is_active());
        assert_eq!(
            image.admit_write(&settings).err().map(|e| e.errno()),
            Some(libc::EROFS)
        );
        // Idempotent: inactivating an inactive image runs the flush again.
        assert_eq!(image.inactivate(&ctx(&settings)).errno, None);
        settings.set(Key::InactiveWrites, "allow").unwrap();
        assert!(image.admit_write(&settings).is_ok());
        settings.set(Key::InactiveWrites, "deny").unwrap();
        let o = image.activate(&ctx(&settings));
        assert_eq!(o.errno, None, "{}", o.detail);
        assert!(image.is_active());
        assert!(image.admit_write(&settings).is_ok());
    }

    #[test]
    fn inactivate_waits_for_an_admitted_write() {
        let dir = tempfile::tempdir().unwrap();
        let (image, _f) = image_in(&dir, "vm.img");
        let image = Arc::new(image);
        let settings = Arc::new(Settings::default());
        let gate = image.admit_write(&settings).unwrap();
        let (img, st) = (image.clone(), settings.clone());
        let t = std::thread::spawn(move || img.inactivate(&ctx(&st)).errno);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            !t.is_finished(),
            "inactivate returned while a write was admitted"
        );
        assert!(!image.is_active(), "the mark comes before the wait");
        drop(gate);
        assert_eq!(t.join().unwrap(), None);
    }

    #[test]
    fn invalidate_drops_this_hosts_clean_pages_and_check_reports() {
        let dir = tempfile::tempdir().unwrap();
        let (image, f) = image_in(&dir, "vm.img");
        f.sync_all().unwrap();
        let settings = Settings::default();
        let o = image.invalidate(&ctx(&settings));
        assert_eq!(o.errno, None, "{}", o.detail);
        assert_eq!(sys::cachestat(f.as_fd()).unwrap().cached, 0);
        assert_eq!(image.check(&ctx(&settings)).errno, None);
    }

    #[test]
    fn invalidate_refuses_dirty_pages_and_drops_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (image, f) = image_in(&dir, "vm.img");
        let before = sys::cachestat(f.as_fd()).unwrap();
        assert!(before.dirty > 0, "test needs dirty pages");
        let o = image.invalidate(&ctx(&Settings::default()));
        assert_eq!(o.errno, Some(libc::EBUSY), "{}", o.detail);
        assert!(sys::cachestat(f.as_fd()).unwrap().cached >= before.dirty);
    }

    #[test]
    fn a_device_image_cannot_grow_past_its_device() {
        let stat = sys::fstat_fd(sys::cwd()).unwrap();
        let dev = Device::new("lun".into(), "/nonexistent".into(), stat, 4096);
        let image = Image::new(
            Identity { dev: 1, ino: 2 },
            Source::Device(Arc::new(dev)),
            "lun".into(),
        );
        assert_eq!(image.write_room(0, 8192).map_err(|e| e.errno()), Ok(4096));
        assert_eq!(
            image.write_room(4096, 1).map_err(|e| e.errno()),
            Err(libc::ENOSPC)
        );
        assert_eq!(
            image.grow_allowed(4097).map_err(|e| e.errno()),
            Err(libc::ENOSPC)
        );
    }
}
