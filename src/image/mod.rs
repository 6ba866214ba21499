//! The image registry and each image's migration state machine
//! (docs/DESIGN.md §3): active/inactive, the sticky sync error, open handles,
//! counters and the last control command. Images are keyed by backing
//! identity (device, inode), so two paths to one file are one image, and an
//! image's state outlives the kernel forgetting its FUSE inode. A new file
//! that got a deleted image's inode number is told apart by its
//! incarnation (`cache::Incarnation`) and starts as a new image.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, Weak};
use std::time::{Instant, SystemTime};

pub mod handle;
mod handover;
mod outcome;
mod registry;
pub mod state_file;
mod status;
pub mod turns;

pub use outcome::{CommandContext, FuseAccessError, FuseCache, Outcome};
pub use registry::{Registry, Restored};

use crate::backing::Device;
use crate::cache::{
    self, Identity, Incarnation, Report, WriterScan, format_ranges, holders::format_holders,
};
use crate::error::Error;
use crate::settings::Settings;
use crate::sys;
use state_file::{Record, StateFile};

/// Probes after which step 4 of `invalidate` refuses pages that stay dirty,
/// or uptodate through every drop while a process maps the image: waiting
/// does not make those go.
const VERIFY_ATTEMPTS: u32 = 3;

/// An image's phases: writes are admitted, wait for a decision, or are
/// refused (with `inactive-writes` deny or strict).
const ACTIVE: u8 = 0;
const DECIDING: u8 = 1;
const INACTIVE: u8 = 2;
/// How long step 4 of `invalidate` waits for reads in flight to land (and
/// pinned pages to be let go) before refusing with EBUSY. A read of a
/// healthy backing takes milliseconds; a hung NFS server is not waited out.
const SETTLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Where an image's bytes live.
#[derive(Debug)]
pub enum Source {
    /// A regular file of the backing directory. While the kernel holds its
    /// FUSE inode, `live` reaches the inode's O_PATH fd (immune to renames);
    /// otherwise the file is found again by its last path beneath the
    /// backing root and must still be the same file (dev, ino and
    /// incarnation). The registry never
    /// pins the file itself: deleting an image must free its space.
    File {
        root: Arc<OwnedFd>,
        live: Mutex<Weak<OwnedFd>>,
    },
    /// A block device (or file) given with `--device NAME=PATH`.
    Device(Arc<Device>),
}

pub use crate::datapath::DataPath;

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

#[derive(Debug)]
pub struct Image {
    pub identity: Identity,
    /// Which file of that (dev, ino) this image is (see `Registry`).
    pub incarnation: Incarnation,
    pub source: Source,
    /// Last path this image was seen under, relative to the mount root.
    path: RwLock<String>,
    /// FUSE node id currently standing for this image (0 = none).
    pub nodeid: AtomicU64,
    /// `ACTIVE`, `DECIDING` or `INACTIVE`; read on every relay write (EROFS
    /// fencing): an atomic, not the lock.
    phase: std::sync::atomic::AtomicU8,
    /// Writes that arrive while `inactivate` decides wait here for the
    /// decision (`decide`), so a refused handover refuses no write.
    decided: (Mutex<()>, std::sync::Condvar),
    /// Every write that reaches the daemon holds this shared while it checks
    /// `phase` and runs; `inactivate` sets `DECIDING` and then takes it
    /// exclusively once, so when it goes on to sync, every write admitted
    /// before has finished and every later one waits for the decision.
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
    /// The mount's state file, where a fence and a sticky error are
    /// recorded for a restarted daemon (none with `--state-file none`).
    journal: std::sync::OnceLock<Arc<StateFile>>,
    /// The state came from the state file at start, not from a command of
    /// this daemon.
    restored: std::sync::atomic::AtomicBool,
}

impl Image {
    pub fn new(identity: Identity, source: Source, path: String) -> Image {
        Image {
            identity,
            incarnation: Incarnation::default(),
            source,
            path: RwLock::new(path),
            nodeid: AtomicU64::new(0),
            phase: std::sync::atomic::AtomicU8::new(ACTIVE),
            decided: Default::default(),
            write_gate: RwLock::default(),
            open_gate: Mutex::default(),
            errseq: Mutex::default(),
            fuse_pages: Default::default(),
            io_locks: Default::default(),
            state: Mutex::default(),
            handles: Mutex::default(),
            counters: Counters::default(),
            commands: Default::default(),
            journal: Default::default(),
            restored: Default::default(),
        }
    }

    /// The image of one file among those that ever had its (dev, ino).
    pub fn with_incarnation(mut self, incarnation: Incarnation) -> Image {
        self.incarnation = incarnation;
        self
    }

    pub fn path(&self) -> String {
        self.path.read().expect("path lock").clone()
    }

    pub fn set_path(&self, path: String) {
        {
            let mut p = self.path.write().expect("path lock");
            if *p == path {
                return;
            }
            *p = path.clone();
        }
        // A recorded image found under a new name: a restarted daemon
        // looks for it there (best effort: the old name fails the identity
        // check and drops the record with a warning, never fences another
        // file).
        if let Err(e) = self.record_update(None, |r| {
            r.map(|mut r| {
                r.path = path;
                r
            })
        }) {
            log::warn!(
                "image {}: cannot record its new name in the state file: {e}",
                self.path()
            );
        }
    }

    /// Changes this image's record in the state file (if the mount keeps
    /// one) to what `f` makes of it, stamped with `command` and the time
    /// (None: a new name only, which keeps the stamp of the command that
    /// set the state); a record of another file that had the same (dev,
    /// ino) counts as none. Ok once it is durable.
    fn record_update(
        &self,
        command: Option<&str>,
        f: impl FnOnce(Option<Record>) -> Option<Record>,
    ) -> std::io::Result<()> {
        let Some(journal) = self.journal.get() else {
            return Ok(());
        };
        journal.update(self.identity, |old| {
            let old = old.filter(|r| {
                r.device == self.is_device() && r.incarnation.same_file(&self.incarnation)
            });
            f(old).map(|mut r| {
                if let Some(command) = command {
                    r.set_by = command.to_string();
                    r.at = state_file::now();
                }
                r
            })
        })
    }

    /// A fresh record of this image (active, no error).
    fn new_record(&self) -> Record {
        Record::new(
            self.path(),
            self.is_device(),
            self.identity,
            self.incarnation.clone(),
        )
    }

    /// Where this image's state is recorded, for messages.
    fn journal_path(&self) -> String {
        self.journal
            .get()
            .map(|j| j.path().display().to_string())
            .unwrap_or_default()
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

    /// False from the moment `inactivate` starts deciding.
    pub fn is_active(&self) -> bool {
        self.phase.load(Ordering::SeqCst) == ACTIVE
    }

    /// `inactivate` starts deciding: from now on writes wait (`admit_write`).
    /// Only through `Decision`, which ends every decision it starts.
    /// Returns the phase before (what a refused decision puts back).
    fn begin_deciding(&self) -> u8 {
        let _g = self.decided.0.lock().unwrap_or_else(|p| p.into_inner());
        self.phase.swap(DECIDING, Ordering::SeqCst)
    }

    /// Ends a decision (or sets the state outright): the writes waiting
    /// for it go on, admitted when `active`, EROFS otherwise.
    fn decide(&self, active: bool) {
        self.set_phase(if active { ACTIVE } else { INACTIVE });
    }

    fn set_phase(&self, phase: u8) {
        let _g = self.decided.0.lock().unwrap_or_else(|p| p.into_inner());
        self.phase.store(phase, Ordering::SeqCst);
        self.decided.1.notify_all();
    }

    fn wait_decided(&self) {
        let mut g = self.decided.0.lock().unwrap_or_else(|p| p.into_inner());
        while self.phase.load(Ordering::SeqCst) == DECIDING {
            g = self.decided.1.wait(g).unwrap_or_else(|p| p.into_inner());
        }
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

    /// EROFS when this host must not write the image (an inactive image
    /// with `inactive-writes` deny or strict). Only a check: a write must go
    /// through `admit_write`, which also holds off `inactivate` while it runs.
    pub fn check_writable(&self, settings: &Settings) -> Result<(), Error> {
        if settings.deny_inactive_writes() && !self.is_active() {
            return Err(Error::Fenced);
        }
        Ok(())
    }

    /// Admits one write (relay write, truncate, fallocate, copy_file_range,
    /// the kernel writing back mapped pages): the guard must be held until
    /// the write has reached the backing fd. A write arriving while
    /// `inactivate` decides waits for the decision, outside the gate (the
    /// command waits for the writes inside it): refused (EROFS) if the
    /// image went inactive, admitted if the handover was refused, so a
    /// failed `inactivate` has refused nothing. The kernel drops a mapped
    /// page whose writeback failed, so an EROFS there would lose data the
    /// writer still counts on.
    pub fn admit_write(&self, settings: &Settings) -> Result<RwLockReadGuard<'_, ()>, Error> {
        loop {
            let gate = self.write_gate.read().unwrap_or_else(|p| p.into_inner());
            // One load decides: a second one could see a decision start
            // after this write was admitted (drain_writes waits for it).
            let phase = self.phase.load(Ordering::SeqCst);
            if phase == ACTIVE || !settings.deny_inactive_writes() {
                return Ok(gate);
            }
            if phase == INACTIVE {
                return Err(Error::Fenced);
            }
            drop(gate);
            self.wait_decided();
        }
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
        ctx.fuse.filter(|_| self.may_hold_fuse_pages())
    }

    /// A handle whose data path can fill the FUSE inode's cache has been
    /// open, and a FUSE inode stands for the image now.
    fn may_hold_fuse_pages(&self) -> bool {
        self.fuse_pages.load(Ordering::Relaxed) && self.nodeid.load(Ordering::Relaxed) != 0
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
    /// inactivate) and, with `outside` (own mount ids and the command's
    /// shared scan), processes writing the backing outside this mount.
    /// Empty when fencing is full.
    fn unfenced_report(&self, outside: Option<(&[u64], &WriterScan)>) -> String {
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
        if let Some((own, scan)) = outside
            && self.may_be_written_elsewhere()
        {
            list.extend(
                scan.unfenced(self.identity, &self.path(), own, || {
                    self.open_backing(libc::O_RDONLY)
                })
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

    /// False only when the kernel says that no file of the backing inode is
    /// open for writing on this host, by anyone (this daemon included): then
    /// no process can be writing it outside this mount, and the /proc scan
    /// that would name such writers is skipped (docs/DESIGN.md §3, "Writers
    /// outside the mount"). A block device, a backing without leases, or a
    /// failed open: true (the scan decides).
    fn may_be_written_elsewhere(&self) -> bool {
        if self.is_device() {
            return true;
        }
        let probe = match self.open_backing(libc::O_RDONLY) {
            Ok(f) => f,
            Err(_) => return true,
        };
        match sys::open_for_write_anywhere(probe.as_fd()) {
            Ok(open) => open,
            Err(e) => {
                log::debug!(
                    "image {}: cannot ask the kernel for writable opens ({e}); scanning /proc",
                    self.path()
                );
                true
            }
        }
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
            let (sticky, first) = {
                let mut st = self.state.lock().expect("state lock");
                let first = st.sticky_error.is_none();
                (*st.sticky_error.get_or_insert(errno), first)
            };
            // Recorded for a restarted daemon; the sync fails either way,
            // so a record that cannot be written is only logged.
            if first
                && let Err(e) = self.record_update(Some("sync"), |r| {
                    let mut r = r.unwrap_or_else(|| self.new_record());
                    r.sticky_error = Some(sticky);
                    Some(r)
                })
            {
                log::error!(
                    "image {}: cannot record its sticky error in the state file {}: {e}; \
                     a restarted daemon would forget it",
                    self.path(),
                    self.journal_path()
                );
            }
            log::warn!(
                "image {}: sync failed: {} ({e}); it stays failed with {} until activate",
                self.path(),
                sys::errno_name(errno),
                sys::errno_name(sticky)
            );
            Error::Sticky(sticky)
        })
    }

    /// Ok, naming the writers that fencing cannot stop, if any.
    fn fencing_outcome(&self, ctx: &CommandContext<'_>) -> Outcome {
        let report = self.unfenced_report(Some((ctx.own_mounts, ctx.writers)));
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
            self.decide(true);
            self.clear_sticky_error();
            self.restored.store(false, Ordering::Relaxed);
            self.counters.activations.fetch_add(1, Ordering::Relaxed);
            // A record left behind errs on the safe side: a restarted daemon
            // brings the image back inactive, and the operator activates
            // it again. So the command does not fail for it.
            if let Err(e) = self.record_update(Some("activate"), |_| None) {
                log::warn!(
                    "image {}: active, but the state file {} still records it inactive or failed ({e}); \
                     after a restart activate it again",
                    self.path(),
                    self.journal_path()
                );
            }
            Ok(self.fencing_outcome(ctx))
        })
    }

    /// `check`: the residency check alone, dropping nothing.
    pub fn check(&self, ctx: &CommandContext<'_>) -> Outcome {
        self.run_command("check", || {
            let file = self.open_backing(libc::O_RDONLY).map_err(|e| {
                Outcome::cannot_open_backing(&e)
            })?;
            if let Some(fuse) = self.fuse_cache(ctx) {
                let f = fuse
                    .page_counts(self)
                    .map_err(|e| Outcome::fuse_failed(e, "cannot read"))?;
                if f.cached > 0 {
                    return Err(Outcome::busy(
                        f.cached,
                        format!(
                            "{} pages resident in the FUSE page cache of the image ({} dirty, {} writeback)",
                            f.cached, f.dirty, f.writeback
                        ),
                    ));
                }
            }
            self.verify_dropped(&file)
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
            .map_err(|e| Outcome::cannot_open_backing(&e))?;
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
                    return Err(Outcome::busy(
                        c.cached,
                        format!(
                            "{} dirty and {} writeback pages on this host; nothing dropped; \
                             find the writer on this host (it must not write an image the source owns)",
                            c.dirty, c.writeback
                        ),
                    ));
                }
                // On tmpfs or ramfs the cached pages are the file itself,
                // never a copy of storage another host writes: nothing to
                // drop (DONTNEED cannot) and nothing that can be stale.
                Ok((c, _)) => {
                    nothing_cached = c.cached == 0
                        || sys::is_memory_backed(file.as_fd()).map_err(|e| {
                            Outcome::io(&e, format!("cannot tell the backing's filesystem: {e}"))
                        })?
                }
                Err(e) => {
                    return Err(Outcome::io(
                        &e,
                        format!("cannot verify the page-cache state: {e}"),
                    ));
                }
            }
            // 2. Drop this host's cached pages of the backing.
            if !nothing_cached {
                cache::evict(&file).map_err(|e| Outcome::fadvise_failed(&e))?;
            }
        }
        // The FUSE inode's own cache (cached path, relay mappings): the
        // same refusal for dirty pages, then a drop that has happened when
        // this returns (the kernel unmaps mapped pages too, so no mapping
        // can read a stale page after activate said ok).
        if let Some(fuse) = self.fuse_cache(ctx).filter(|_| ctx.settings.drop_cache()) {
            let f = fuse
                .page_counts(self)
                .map_err(|e| Outcome::fuse_failed(e, "cannot read"))?;
            if f.dirty + f.writeback > 0 {
                return Err(Outcome::busy(
                    f.cached,
                    format!(
                        "{} dirty and {} writeback pages in the FUSE page cache on this host; nothing dropped; \
                         find the writer on this host (it must not write an image the source owns)",
                        f.dirty, f.writeback
                    ),
                ));
            }
            fuse.drop_pages(self)
                .map_err(|e| Outcome::fuse_failed(e, "cannot drop"))?;
            let f = fuse
                .page_counts(self)
                .map_err(|e| Outcome::fuse_failed(e, "cannot read"))?;
            // Clean pages present now were read from storage after the drop.
            if ctx.settings.check_cache_dropped() && f.dirty + f.writeback > 0 {
                return Err(Outcome::busy(
                    f.cached,
                    format!(
                        "{} dirty and {} writeback pages of the FUSE page cache survived the drop; \
                         a process on this host is writing the image",
                        f.dirty, f.writeback
                    ),
                ));
            }
        } else {
            // 3. The size may have changed on the source (the drop above
            // invalidates the attributes too).
            (ctx.invalidate_attrs)(self);
        }
        // 4. Verify that no page read from storage before the drop is left
        // (docs/DESIGN.md §3): wait for reads in flight to land and drop
        // again, until every page is gone or read again since.
        if ctx.settings.drop_cache() && ctx.settings.check_cache_dropped() && !nothing_cached {
            self.settle_dropped(&file)?;
            // Relay mappings fill the FUSE inode from the backing: a fault
            // between the FUSE drop above and the moment the backing held
            // only current pages may have copied a stale backing page into
            // it. Drop it again now.
            if let Some(fuse) = self.fuse_cache(ctx) {
                fuse.drop_pages(self)
                    .map_err(|e| Outcome::fuse_failed(e, "cannot drop"))?;
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

    /// `check`: fails with EBUSY naming resident pages (also pages under
    /// read, which cachestat counts), ranges and holders, or with the errno
    /// that made verification impossible ("cannot verify" is never a pass).
    fn verify_dropped(&self, file: &File) -> Result<Outcome, Outcome> {
        let report = Report::of(file, self.identity).map_err(|e| Outcome::cannot_verify(&e))?;
        if report.counts.cached == 0 {
            return Ok(Outcome::default());
        }
        let holders = if report.holders.is_empty() {
            "none found".to_string()
        } else {
            format_holders(&report.holders)
        };
        Err(Outcome::busy(
            report.counts.cached,
            format!(
                "{} pages still resident ({} dirty, {} writeback); first ranges {}; holders {holders}{}",
                report.counts.cached,
                report.counts.dirty,
                report.counts.writeback,
                format_ranges(&report.ranges),
                self.handle_summary()
            ),
        ))
    }

    /// Step 4: drops and probes until no page read from storage before the
    /// command is left (`cache::Settle` has the rule), waiting for reads in
    /// flight to land (`cache::settle::wait_for_read`) and backing off
    /// briefly between drops of pages kept uptodate.
    ///
    /// The line between "read again after the drop" and "stale": a page is
    /// current once its index was seen absent, or seen not uptodate after
    /// being seen uptodate, at a probe of this command; until then it may
    /// have been read before the source's last write. EBUSY when that is
    /// not established within SETTLE_LIMIT, and after VERIFY_ATTEMPTS probes
    /// for dirty pages and for pages kept while a process maps the image.
    fn settle_dropped(&self, file: &File) -> Result<(), Outcome> {
        let start = Instant::now();
        let size = cache::file_size(file).map_err(|e| Outcome::cannot_verify(&e))?;
        let mut settle = cache::Settle::new();
        let mut backoff = std::time::Duration::from_millis(1);
        let mut attempt = 0u32;
        let mut read_failed = false;
        loop {
            attempt += 1;
            let (counts, method) =
                cache::page_counts(file, size).map_err(|e| Outcome::cannot_verify(&e))?;
            if counts.cached == 0 {
                log::debug!(
                    "image {}: nothing cached after the drop ({attempt} probes in {} ms)",
                    self.path(),
                    start.elapsed().as_millis()
                );
                return Ok(());
            }
            settle
                .probe(file, size, method)
                .map_err(|e| Outcome::cannot_verify(&e))?;
            let dirty = counts.dirty + counts.writeback > 0;
            if settle.is_done() && !dirty {
                let level = if attempt > 1 {
                    log::Level::Info
                } else {
                    log::Level::Debug
                };
                log::log!(
                    level,
                    "image {}: {} pages cached after the drop were read from storage again \
                     since the command started; they are current, not stale ({attempt} probes in {} ms)",
                    self.path(),
                    counts.cached,
                    start.elapsed().as_millis()
                );
                return Ok(());
            }
            let (in_flight, _) = settle.under_read();
            // Who holds the pages is asked at most once per command (a /proc
            // pass over every process's fds and mappings): here, to learn
            // whether a mapping keeps them, and the same answer names them.
            let mut holders = None;
            let give_up = start.elapsed() >= SETTLE_LIMIT
                || (attempt >= VERIFY_ATTEMPTS && dirty)
                || (attempt == VERIFY_ATTEMPTS
                    && in_flight == 0
                    && holders
                        .insert(cache::find_holders(self.identity))
                        .iter()
                        .any(|h| h.how == "mmap"));
            if give_up {
                let holders = holders.unwrap_or_else(|| cache::find_holders(self.identity));
                return Err(self.settle_failed(&settle, counts, &holders));
            }
            // A page never seen uptodate: wait for its read to land (a read
            // of our own joins it) rather than hope a probe catches it
            // uptodate between a reader's drops. Otherwise (pages kept
            // uptodate) back off before the next drop.
            let waited = match settle.first_under_read() {
                Some(i) => {
                    let left = SETTLE_LIMIT.saturating_sub(start.elapsed());
                    match cache::settle::wait_for_read(file, i, left) {
                        Ok(true) => {
                            settle
                                .look_at(file, i)
                                .map_err(|e| Outcome::cannot_verify(&e))?;
                            true
                        }
                        Ok(false) => false,
                        // Also over the bound on settle reads (the backing
                        // hangs on many): the page stays under read.
                        Err(e) => {
                            let level = if std::mem::replace(&mut read_failed, true) {
                                log::Level::Debug
                            } else {
                                log::Level::Warn
                            };
                            log::log!(level, "image {}: waiting for a read: {e}", self.path());
                            false
                        }
                    }
                }
                None => false,
            };
            if !waited {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(std::time::Duration::from_millis(50));
            }
            cache::evict(file).map_err(|e| Outcome::fadvise_failed(&e))?;
        }
    }

    /// EBUSY naming what step 4 could not clear: pages under read since
    /// before the command, pages kept through every drop, dirty pages, and
    /// who holds the image.
    fn settle_failed(
        &self,
        settle: &cache::Settle,
        counts: sys::PageCounts,
        holders: &[cache::Holder],
    ) -> Outcome {
        let (in_flight, flight_ranges) = settle.under_read();
        let (kept, kept_ranges) = settle.resident();
        let mut what = Vec::new();
        if in_flight > 0 {
            what.push(format!(
                "{in_flight} under read since before the command (first ranges {})",
                format_ranges(&flight_ranges)
            ));
        }
        if kept > 0 {
            what.push(format!(
                "{kept} kept through every drop (first ranges {})",
                format_ranges(&kept_ranges)
            ));
        }
        Outcome::busy(
            counts.cached,
            format!(
                "{} pages still resident ({} dirty, {} writeback){}{}; holders {}{}; \
                 retry once the backing answers and nothing maps or writes the image",
                counts.cached,
                counts.dirty,
                counts.writeback,
                if what.is_empty() { "" } else { ": " },
                what.join(", "),
                if holders.is_empty() {
                    "none found".to_string()
                } else {
                    format_holders(holders)
                },
                self.handle_summary()
            ),
        )
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

    /// True when the file is known to be deleted everywhere: the fd kept
    /// since its first open sees no name left, or another file now has its
    /// (dev, ino) at its last path (a number is reused only once freed).
    fn is_deleted(&self) -> bool {
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
            writers: Box::leak(Box::new(WriterScan::new())),
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
