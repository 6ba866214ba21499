//! The destination side of a handover (docs/DESIGN.md §3 "Destination
//! side"): `invalidate` and its steps 1 to 5, `activate`, `check`, and the
//! first open's invalidation (close-to-open).

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::record::Change;
use super::{CommandContext, FuseCache, Image, Outcome};
use crate::cache::{self, Report, format_ranges, holders::format_holders};
use crate::sys;

/// Probes after which step 4 of `invalidate` refuses pages that stay dirty,
/// or uptodate through every drop while a process maps the image: waiting
/// does not make those go.
const VERIFY_ATTEMPTS: u32 = 3;

/// How long step 4 of `invalidate` waits for reads in flight to land (and
/// pinned pages to be let go) before refusing with EBUSY. A read of a
/// healthy backing takes milliseconds; a hung NFS server is not waited out.
const SETTLE_LIMIT: Duration = Duration::from_secs(10);

/// What step 1 found in the backing's cache on this host.
enum BackingCache {
    /// Dirty pages at a first open: this host's own writes, ahead of
    /// storage, not stale; nothing is dropped.
    OwnWrites,
    /// Nothing cached, or the pages are the file itself (tmpfs, ramfs):
    /// nothing can be stale, steps 2 and 4 are skipped.
    NothingStale,
    /// Clean pages that may be stale: dropped and verified.
    Cached,
}

impl Image {
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
            // Staged: the caller writes it (`settle`); a record left behind
            // does not fail the command (`lift_not_recorded`).
            let staged = self.stage_change(Change::Lift, |_| None);
            Ok(Outcome {
                staged,
                ..self.fencing_outcome(ctx)
            })
        })
    }

    /// `check`: the residency check alone, dropping nothing.
    pub fn check(&self, ctx: &CommandContext<'_>) -> Outcome {
        self.run_command("check", || {
            let file = self
                .open_backing(libc::O_RDONLY)
                .map_err(|e| Outcome::cannot_open_backing(&e))?;
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
    /// steps as `invalidate`, except that dirty pages of this host's own
    /// writes let the open go on without dropping anything (see
    /// `invalidate_steps`). Like `invalidate` it leaves a sticky sync error:
    /// clearing it is an operator's decision (`activate`), not a side
    /// effect of a VMM reopening the image.
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
            match self.refuse_dirty_backing(&file, on_open)? {
                BackingCache::OwnWrites => return Ok(Outcome::default()),
                BackingCache::NothingStale => nothing_cached = true,
                // 2. Drop this host's cached pages of the backing.
                BackingCache::Cached => {
                    cache::evict(&file).map_err(|e| Outcome::fadvise_failed(&e))?
                }
            }
        }
        if let Some(fuse) = self.fuse_cache(ctx).filter(|_| ctx.settings.drop_cache()) {
            self.drop_fuse_pages(fuse, ctx.settings.check_cache_dropped())?;
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

    /// Step 1 on the backing's cache: dirty or writeback pages here would
    /// be written over the source's newer data by DONTNEED: refuse and drop
    /// nothing (at a first open they are this host's own writes: see
    /// `invalidate_steps`).
    fn refuse_dirty_backing(&self, file: &File, on_open: bool) -> Result<BackingCache, Outcome> {
        let size = cache::file_size(file).unwrap_or(0);
        match cache::page_counts(file, size) {
            Ok((c, _)) if c.dirty + c.writeback > 0 && on_open => {
                log::debug!(
                    "open {}: {} dirty pages written on this host; not invalidating",
                    self.path(),
                    c.dirty + c.writeback
                );
                Ok(BackingCache::OwnWrites)
            }
            Ok((c, _)) if c.dirty + c.writeback > 0 => Err(Outcome::busy(
                c.cached,
                format!(
                    "{} dirty and {} writeback pages on this host; nothing dropped; \
                     find the writer on this host (it must not write an image the source owns)",
                    c.dirty, c.writeback
                ),
            )),
            // On tmpfs or ramfs the cached pages are the file itself,
            // never a copy of storage another host writes: nothing to
            // drop (DONTNEED cannot) and nothing that can be stale.
            Ok((c, _)) => {
                let nothing_stale = c.cached == 0
                    || sys::is_memory_backed(file.as_fd()).map_err(|e| {
                        Outcome::io(&e, format!("cannot tell the backing's filesystem: {e}"))
                    })?;
                Ok(if nothing_stale {
                    BackingCache::NothingStale
                } else {
                    BackingCache::Cached
                })
            }
            Err(e) => Err(Outcome::io(
                &e,
                format!("cannot verify the page-cache state: {e}"),
            )),
        }
    }

    /// Steps 1 and 2 on the FUSE inode's own cache (cached path, relay
    /// mappings): the same refusal for dirty pages, then a drop that has
    /// happened when this returns (the kernel unmaps mapped pages too, so
    /// no mapping can read a stale page after activate said ok); with
    /// `check`, dirty pages that survive the drop fail the command.
    fn drop_fuse_pages(&self, fuse: &dyn FuseCache, check: bool) -> Result<(), Outcome> {
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
        if check && f.dirty + f.writeback > 0 {
            return Err(Outcome::busy(
                f.cached,
                format!(
                    "{} dirty and {} writeback pages of the FUSE page cache survived the drop; \
                     a process on this host is writing the image",
                    f.dirty, f.writeback
                ),
            ));
        }
        Ok(())
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
        let mut backoff = Duration::from_millis(1);
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
            let left = SETTLE_LIMIT.saturating_sub(start.elapsed());
            let waited = self.wait_for_first_read(file, &mut settle, left, &mut read_failed)?;
            if !waited {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(50));
            }
            cache::evict(file).map_err(|e| Outcome::fadvise_failed(&e))?;
        }
    }

    /// Step 4's wait for the first page under read, for at most `left`:
    /// true when it landed and was looked at. Failures to wait (also over
    /// the bound on settle reads, when the backing hangs on many) leave the
    /// page under read; the first is a warning, `read_failed` remembers it.
    fn wait_for_first_read(
        &self,
        file: &File,
        settle: &mut cache::Settle,
        left: Duration,
        read_failed: &mut bool,
    ) -> Result<bool, Outcome> {
        let Some(i) = settle.first_under_read() else {
            return Ok(false);
        };
        match cache::settle::wait_for_read(file, i, left) {
            Ok(true) => {
                settle
                    .look_at(file, i)
                    .map_err(|e| Outcome::cannot_verify(&e))?;
                Ok(true)
            }
            Ok(false) => Ok(false),
            Err(e) => {
                let level = if std::mem::replace(read_failed, true) {
                    log::Level::Debug
                } else {
                    log::Level::Warn
                };
                log::log!(level, "image {}: waiting for a read: {e}", self.path());
                Ok(false)
            }
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
}
