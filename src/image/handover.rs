//! The source side of a handover (docs/DESIGN.md §3 "Source side"):
//! `flush`, and `inactivate` with the decision that holds writes while it
//! runs.

use std::fs::File;
use std::sync::Arc;

use super::record::Change;
use super::{CommandContext, Image, Outcome};
use crate::cache;
use crate::settings::Settings;
use crate::sys;

impl Image {
    /// Syncs every open backing fd of the image and the fd kept since the
    /// first open (or, for an image never opened here, a fresh one): each
    /// fd reports writeback errors only since it sampled them, so one fd
    /// alone could miss an error another already consumed.
    fn sync_everything(&self, settings: &Settings) -> Result<(), Outcome> {
        let mut files: Vec<Arc<File>> = self.handles().iter().map(|h| h.file.clone()).collect();
        let kept = self.errseq.lock().expect("errseq lock").clone();
        match kept {
            Some(f) => files.push(f),
            None => files.push(Arc::new(
                self.open_backing(libc::O_RDONLY)
                    .map_err(|e| Outcome::cannot_open_backing(&e))?,
            )),
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

    /// `flush`: write back the FUSE inode's dirty pages (mappings, cached
    /// path), wait for the writes admitted so far, then sync every backing
    /// fd of the image. It fences nothing: later writes go on.
    pub fn flush(&self, ctx: &CommandContext<'_>) -> Outcome {
        self.run_command("flush", || {
            if let Some(fuse) = self.fuse_cache(ctx) {
                fuse.writeback(self)
                    .map_err(|e| Outcome::fuse_failed(e, "cannot write back"))?;
            }
            self.drain_writes();
            self.sync_everything(ctx.settings)?;
            Ok(self.fencing_outcome(ctx))
        })
    }

    /// `inactivate`: write back and drop the FUSE inode's pages, start
    /// deciding (later writes wait), wait for every write admitted before,
    /// sync, drop the backing's cached pages, and verify that no dirty or
    /// writeback page is left; then inactive (the waiting writes get EROFS)
    /// or, on failure, as it was before (an active image's waiting writes
    /// are admitted; one already inactive stays fenced). In this order: a
    /// sync before the mark would let writes admitted between the two stay
    /// dirty here and be written back over the destination's data later.
    pub fn inactivate(&self, ctx: &CommandContext<'_>) -> Outcome {
        self.run_command("inactivate", || {
            // Dirty pages of mappings in the FUSE inode are written back
            // through the daemon, and the inode's pages dropped (unmapped),
            // while writes are still admitted. Once the decision starts,
            // nothing here may wait for a write of the FUSE inode: its
            // writeback waits for the decision. The drop by node id would
            // write dirty pages back and wait, so it comes first, and the
            // steps below only count what a mapping dirtied since.
            if let Some(fuse) = self.fuse_cache(ctx) {
                fuse.writeback(self)
                    .map_err(|e| Outcome::fuse_failed(e, "cannot write back"))?;
                if ctx.settings.drop_cache() {
                    fuse.drop_pages(self)
                        .map_err(|e| Outcome::fuse_failed(e, "cannot drop"))?;
                }
            }
            let decision = Decision::begin(self);
            self.drain_writes();
            let result = self.inactivate_steps(ctx);
            let handed_over = result.is_ok();
            // The fence is recorded before the command says ok: staged
            // here, written by the caller once for all images of its
            // request, then the outcome is settled (`settle`: ok only once
            // the fence is on disk). A record that cannot be written fails
            // the command, but the image stays fenced: its data is synced
            // and the destination may already own it, so letting writes
            // through would be the unsafe side. The writes waiting for the
            // decision get EROFS before the record is on disk: still the
            // safe side, as no ok was reported yet.
            let staged = handed_over.then(|| self.stage_fence());
            decision.end(handed_over);
            if handed_over {
                // Attributes the kernel kept from before the fence would
                // let a write-back connection's writer copy into its cache
                // without asking (fs/mod.rs `refuse_fenced_writer`).
                (ctx.invalidate_attrs)(self);
            }
            // What the result names (writers, holders) is read from /proc
            // only now: a process may be waiting for this image's writes
            // there (a close or an exec writing its dirty pages back), and
            // a /proc read of it (stat, maps) waits for that process, so
            // during the decision it would wait for the decision itself.
            match result {
                Ok(()) => Ok(Outcome {
                    staged: staged.flatten(),
                    ..self.fencing_outcome(ctx)
                }),
                Err(Refused::With(o)) => Err(o),
                Err(Refused::StillDirty { left, mapped_dirty }) => {
                    Err(self.still_dirty(ctx, left, mapped_dirty))
                }
            }
        })
    }

    /// Stages the record that the image is inactive; the outcome carries
    /// it to `settle`.
    fn stage_fence(&self) -> Option<super::StagedRecord> {
        let staged = self.stage_change(Change::Fence, |r| {
            let mut r = r.unwrap_or_else(|| self.new_record());
            r.path = self.path();
            r.inactive = true;
            Some(r)
        });
        if staged.is_none() {
            // No state file: nothing to wait for.
            self.fence_recorded();
        }
        staged
    }

    /// The steps of `inactivate` while writes wait: nothing here reads
    /// /proc (see `inactivate`).
    fn inactivate_steps(&self, ctx: &CommandContext<'_>) -> Result<(), Refused> {
        let file = self
            .open_backing(libc::O_RDONLY)
            .map_err(|e| Outcome::cannot_open_backing(&e))?;
        // Pages dirtied between the syncs (by a writer the daemon cannot
        // fence) are synced again a few times before giving up.
        if !ctx.settings.deny_inactive_writes() {
            // inactive-writes=allow: the operator lets writes through, so
            // nothing can promise that none is left; sync what is there.
            self.sync_and_drop(&file, ctx.settings)?;
            return Ok(());
        }
        let mut left = sys::PageCounts::default();
        let mut mapped_dirty = 0;
        for _ in 0..3 {
            self.sync_and_drop(&file, ctx.settings)?;
            // "Cannot verify" is a failure: a count that cannot be made is
            // not "0 dirty".
            left = self.dirty_left(&file)?;
            // The FUSE inode's pages were written back and dropped before
            // the decision; dirty ones now were written since, through a
            // mapping or by a writer of a write-back device (counted, never
            // written back here: see `inactivate`),
            // on the file opened before the decision: no request to the
            // mount now (an image first opened through it meanwhile has
            // none, and the command is refused).
            if let Some(fuse) = self.fuse_cache(ctx) {
                let f = fuse
                    .held_page_counts(self)
                    .map_err(|e| Outcome::fuse_failed(e, "cannot read"))?;
                left.dirty += f.dirty;
                left.writeback += f.writeback;
                left.cached += f.cached;
                mapped_dirty = f.dirty + f.writeback;
            }
            if left.dirty + left.writeback == 0 {
                return Ok(());
            }
        }
        Err(Refused::StillDirty { left, mapped_dirty })
    }
}

/// Why `inactivate`'s steps refused: a finished outcome, or pages still
/// dirty, whose report (naming writers and holders from /proc) is made once
/// the decision is over.
enum Refused {
    With(Outcome),
    StillDirty {
        left: sys::PageCounts,
        mapped_dirty: u64,
    },
}

impl From<Outcome> for Refused {
    fn from(o: Outcome) -> Refused {
        Refused::With(o)
    }
}

impl Image {
    /// Syncs every fd of the image, then drops the backing's cached pages
    /// (unless `drop-cache` is off).
    fn sync_and_drop(&self, file: &File, settings: &Settings) -> Result<(), Outcome> {
        self.sync_everything(settings)?;
        if settings.drop_cache() {
            cache::evict(file).map_err(|e| Outcome::fadvise_failed(&e))?;
        }
        Ok(())
    }

    /// EBUSY: pages still dirty after every sync (`mapped_dirty` of them in
    /// the FUSE inode), naming the writers fencing cannot stop, or else
    /// the holders.
    fn still_dirty(
        &self,
        ctx: &CommandContext<'_>,
        left: sys::PageCounts,
        mapped_dirty: u64,
    ) -> Outcome {
        let writers = self.unfenced_report(ctx.own_mounts, ctx.writers);
        let detail = format!(
            "{} dirty and {} writeback pages written on this host after the sync{}; \
             a writer outside the daemon's fencing is still writing{}; stop it before handing over",
            left.dirty,
            left.writeback,
            if mapped_dirty > 0 {
                format!(
                    " ({mapped_dirty} of them in this mount's page cache, written since \
                     inactivate wrote it back: by a mapping, or a writer of a write-back device)"
                )
            } else {
                String::new()
            },
            if writers.is_empty() {
                format!(" (holders: {})", self.holders_text())
            } else {
                format!(" ({writers})")
            }
        );
        Outcome {
            unfenced: !writers.is_empty(),
            ..Outcome::busy(left.cached, detail)
        }
    }

    /// The backing's page counts after inactivate's sync and drop, or the
    /// failure that says they cannot be known. Without cachestat(2) dirty
    /// pages cannot be told from clean ones: resident pages then fail too.
    fn dirty_left(&self, file: &File) -> Result<sys::PageCounts, Outcome> {
        let cannot = |e: std::io::Error| {
            Outcome::io(
                &e,
                format!(
                    "cannot verify that no dirty page is left on this host: {e}; \
                     the image stays active"
                ),
            )
        };
        let size = cache::file_size(file).map_err(cannot)?;
        let (counts, method) = cache::page_counts(file, size).map_err(cannot)?;
        if method == cache::Method::Mincore && counts.cached > 0 {
            return Err(Outcome::busy(
                counts.cached,
                format!(
                    "{} pages still resident after the sync and drop, and without cachestat(2) \
                     dirty pages cannot be told from clean ones: cannot verify; the image stays active",
                    counts.cached
                ),
            ));
        }
        Ok(counts)
    }
}

/// An `inactivate` decision in progress. Writes arriving meanwhile wait
/// for it. A refused handover, or a command that unwinds without deciding
/// (a panic), puts back the phase the decision found: an active image
/// stays active (no writer waits forever, none is refused by a fence that
/// was never established), and an image already handed over stays
/// inactive (a failed second `inactivate` must not let the source write
/// storage the destination owns).
struct Decision<'a> {
    image: &'a Image,
    before: u8,
    ended: bool,
}

impl<'a> Decision<'a> {
    fn begin(image: &'a Image) -> Decision<'a> {
        let before = image.begin_deciding();
        Decision {
            image,
            before,
            ended: false,
        }
    }

    /// Inactive when `handed_over`, else the phase found at `begin`.
    fn end(mut self, handed_over: bool) {
        self.ended = true;
        if handed_over {
            self.image.decide(false);
        } else {
            self.image.set_phase(self.before);
        }
    }
}

impl Drop for Decision<'_> {
    fn drop(&mut self) {
        if !self.ended {
            self.image.set_phase(self.before);
        }
    }
}
