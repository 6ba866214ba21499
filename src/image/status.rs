//! One image's entry in the `status` document (docs/DESIGN.md §3 and the
//! README's `status` fields).

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::UNIX_EPOCH;

use serde_json::json;

use super::{CommandContext, FuseCache, Image};
use crate::sys;

impl Image {
    /// `size`: None when unknown; `missing`: why the backing cannot be
    /// opened (the image is still listed, with this error); `ctx`: the
    /// document's mount ids, writer scan and FUSE cache, as a command's.
    pub fn status_json(
        &self,
        size: Option<u64>,
        missing: Option<std::io::Error>,
        ctx: &CommandContext<'_>,
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
        let unfenced = self.unfenced_report(ctx.own_mounts, ctx.writers);
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
            "fuse_cache": self.fuse_cache_json(ctx.fuse),
            "sticky_error": sticky,
            "restored": self.restored.load(Ordering::Relaxed),
            "fencing": if unfenced.is_empty() { "full" } else { "partial" },
            "unfenced": if unfenced.is_empty() { None } else { Some(unfenced) },
            "open_handles": self.handles_json(),
            "last_command": last.map(|l| json!({
                "command": l.command,
                "at": l.at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
                "ms": l.ms,
                "result": l.result,
            })),
            "counters": self.counters_json(),
        })
    }

    fn handles_json(&self) -> Vec<serde_json::Value> {
        self.handles()
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
            .collect()
    }

    /// The FUSE inode's own cache, for images whose data path can fill it
    /// (cached; relay through mappings): the cache the handover drops and
    /// verifies beside the backing's. None for any other image.
    fn fuse_cache_json(&self, fuse: Option<&dyn FuseCache>) -> Option<serde_json::Value> {
        fuse.filter(|_| self.may_hold_fuse_pages())
            .map(|f| match f.page_counts(self) {
                Ok(p) => json!({
                    "cached_pages": p.cached,
                    "dirty_pages": p.dirty,
                    "writeback_pages": p.writeback,
                }),
                Err(e) => json!({ "error": e.to_string() }),
            })
    }

    fn counters_json(&self) -> serde_json::Value {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "reads": load(&c.reads),
            "writes": load(&c.writes),
            "fsyncs": load(&c.fsyncs),
            "sync_errors": load(&c.sync_errors),
            "activations": load(&c.activations),
            "inactivations": load(&c.inactivations),
            "invalidations": load(&c.invalidations),
            "failures": c.failures.lock().expect("failures lock").clone(),
        })
    }
}
