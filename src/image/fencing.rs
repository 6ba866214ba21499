//! Who can still write an image that the daemon cannot fence: its own
//! writable passthrough handles, and processes writing the backing outside
//! this mount (docs/DESIGN.md §3 "Writers outside the mount").

use std::os::fd::AsFd;
use std::sync::Arc;

use super::{CommandContext, Handle, Image, Outcome};
use crate::cache::{self, WriterScan, holders::format_holders};
use crate::sys;

impl Image {
    /// Open handles whose writes never reach the daemon (writable
    /// passthrough): EROFS fencing cannot stop them.
    fn unfenced_writers(&self) -> Vec<Arc<Handle>> {
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
    /// inactivate) and processes writing the backing outside this mount
    /// (`own_mounts`: this daemon's mount ids; `writers`: the command's
    /// shared scan). Empty when fencing is full.
    pub(super) fn unfenced_report(&self, own_mounts: &[u64], writers: &WriterScan) -> String {
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
        if self.may_be_written_elsewhere() {
            list.extend(
                writers
                    .unfenced(self.identity, &self.path(), own_mounts, || {
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

    /// Ok, naming the writers that fencing cannot stop, if any.
    pub(super) fn fencing_outcome(&self, ctx: &CommandContext<'_>) -> Outcome {
        let report = self.unfenced_report(ctx.own_mounts, ctx.writers);
        Outcome {
            unfenced: !report.is_empty(),
            detail: report,
            ..Outcome::default()
        }
    }

    pub(super) fn holders_text(&self) -> String {
        let holders = cache::find_holders(self.identity);
        if holders.is_empty() {
            "none found".to_string()
        } else {
            format_holders(&holders)
        }
    }
}
