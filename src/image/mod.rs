//! The image registry and each image's migration state machine
//! (docs/DESIGN.md §3): active/inactive, the sticky sync error, open handles,
//! counters and the last control command. Images are keyed by backing
//! identity (device, inode), so two paths to one file are one image, and an
//! image's state outlives the kernel forgetting its FUSE inode. A new file
//! that got a deleted image's inode number is told apart by its
//! incarnation (`cache::Incarnation`) and starts as a new image.
//!
//! This file holds the state and the rules every command shares; each
//! concern has its own file beside it: the registry (registry.rs), where an
//! image's bytes are (source.rs), an open handle and its sync rules
//! (handle.rs), what a command returns (outcome.rs), the source side of a
//! handover (handover.rs), the destination side (arrival.rs), writers that
//! cannot be fenced (fencing.rs), the `status` entry (status.rs), the state
//! file (state_file.rs), a command's state-file record (record.rs) and the
//! per-image command order (turns.rs).

use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{Instant, SystemTime};

mod arrival;
mod fencing;
pub mod handle;
mod handover;
mod outcome;
mod record;
mod registry;
mod source;
pub mod state_file;
mod status;
pub mod turns;

pub use outcome::{CommandContext, FuseAccessError, FuseCache, Outcome};
pub use record::StagedRecord;
pub use registry::Registry;
pub use source::Source;

use crate::cache::{Identity, Incarnation};
use crate::error::Error;
use crate::settings::Settings;
use crate::sys;
use state_file::{Record, StateFile};

/// An image's phases: writes are admitted, wait for a decision, or are
/// refused (with `inactive-writes` deny or strict).
const ACTIVE: u8 = 0;
const DECIDING: u8 = 1;
const INACTIVE: u8 = 2;

pub use crate::datapath::DataPath;

pub use handle::Handle;

/// What happened to one image since the mount started, for `status` and
/// the client's metrics.
#[derive(Debug, Default)]
pub struct Counters {
    /// READ and WRITE requests that reached the daemon (relay and cached
    /// I/O; passthrough I/O never does).
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    /// Syncs of a backing fd (fsync, close, flush, inactivate), failed ones
    /// too; not those refused at once by a sticky error.
    pub fsyncs: AtomicU64,
    /// Successful `activate` and `inactivate` commands.
    pub activations: AtomicU64,
    pub inactivations: AtomicU64,
    /// Invalidations attempted (`invalidate`, `activate`, a first open),
    /// failed ones too.
    pub invalidations: AtomicU64,
    /// Syncs that failed (the first sets the sticky error).
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
    /// `ACTIVE`, `DECIDING` or `INACTIVE`; read on every write that reaches
    /// the daemon (EROFS fencing): an atomic, not the lock.
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
        match self.stage_record(command, f) {
            Some((journal, generation)) => journal.commit(generation),
            None => Ok(()),
        }
    }

    /// `record_update` in memory only: the state file and the generation
    /// its `commit` must reach (None: the mount keeps no state file).
    fn stage_record(
        &self,
        command: Option<&str>,
        f: impl FnOnce(Option<Record>) -> Option<Record>,
    ) -> Option<(&Arc<StateFile>, u64)> {
        let journal = self.journal.get()?;
        let generation = journal.stage(self.identity, |old| {
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
        });
        Some((journal, generation))
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

    /// Syncs one backing fd with the mount's sync rule, recording a failure
    /// as the image's sticky error: after a failed fsync the kernel marks the
    /// lost pages clean, so a later "successful" sync would lie.
    pub(super) fn sync_file(
        &self,
        file: &File,
        datasync: bool,
        settings: &Settings,
    ) -> Result<(), Error> {
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
            self.counters.sync_errors.fetch_add(1, Ordering::Relaxed);
            Error::Sticky(self.make_sticky(sys::errno_of(&e), "sync", &e))
        })
    }

    /// A write-back of this host's dirty pages failed: the kernel has
    /// marked those pages clean and tells the writer once (its next fsync
    /// or close), so the failure becomes the image's sticky error, as a
    /// failed sync does, and every later sync reports it until `activate`.
    pub fn writeback_failed(&self, e: &Error) -> i32 {
        self.make_sticky(e.errno(), "write-back", e)
    }

    /// Records `errno` as the sticky error (the first one stays: two
    /// failures at once both report it) in memory and in the state file;
    /// returns the sticky errno.
    fn make_sticky(&self, errno: i32, what: &str, e: &dyn std::fmt::Display) -> i32 {
        let (sticky, first) = {
            let mut st = self.state.lock().expect("state lock");
            let first = st.sticky_error.is_none();
            (*st.sticky_error.get_or_insert(errno), first)
        };
        // Recorded for a restarted daemon (stamped "sync" or "write-back");
        // the request fails either way, so a record that cannot be written
        // is only logged.
        if first
            && let Err(e) = self.record_update(Some(what), |r| {
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
            "image {}: {what} failed: {} ({e}); it stays failed with {} until activate",
            self.path(),
            sys::errno_name(errno),
            sys::errno_name(sticky)
        );
        sticky
    }

    /// Runs one command on this image, then `conclude`s it; a command
    /// whose record is staged is concluded by `settle` once the record is
    /// written.
    fn run_command(&self, name: &str, f: impl FnOnce() -> Result<Outcome, Outcome>) -> Outcome {
        let start = Instant::now();
        let mut outcome = f().unwrap_or_else(|e| e);
        let ms = start.elapsed().as_millis() as u64;
        if let Some(staged) = &mut outcome.staged {
            staged.ms = ms;
            return outcome;
        }
        self.conclude(name, outcome, ms)
    }

    /// Logs a command's result (a first open's ok only at debug; a warning
    /// when it failed or fencing is partial), counts a failure by errno
    /// name, and keeps it as the last command for `status`.
    fn conclude(&self, name: &str, outcome: Outcome, ms: u64) -> Outcome {
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
}

#[cfg(test)]
mod tests;
