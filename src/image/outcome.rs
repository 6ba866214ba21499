//! What a control command returns (`Outcome`, one constructor per kind of
//! failure, so every step words and numbers its errors alike) and what it
//! needs from the filesystem around the image (`CommandContext`,
//! `FuseCache`).

use crate::cache::WriterScan;
use crate::settings::Settings;
use crate::sys;

use super::{Image, StagedRecord};

/// The outcome of one control command on one image.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub errno: Option<i32>,
    pub resident_pages: u64,
    pub detail: String,
    /// Writers exist that the daemon cannot fence (its own writable
    /// passthrough handles, processes writing the backing outside this
    /// mount; named in `detail`), also on success.
    pub unfenced: bool,
    /// The command's state-file record, staged and not yet written: until
    /// `Image::settle` the outcome is not final and must not be reported
    /// (and the command's log line and `last_command` wait for it).
    pub staged: Option<StagedRecord>,
}

impl Outcome {
    pub(super) fn failed(errno: i32, detail: impl Into<String>) -> Outcome {
        Outcome {
            errno: Some(errno),
            detail: detail.into(),
            ..Outcome::default()
        }
    }

    /// Failed with the errno of `e`.
    pub(super) fn io(e: &std::io::Error, detail: impl Into<String>) -> Outcome {
        Outcome::failed(sys::errno_of(e), detail)
    }

    /// EBUSY with `resident_pages` still cached: pages that a step must
    /// not drop, or could not get rid of.
    pub(super) fn busy(resident_pages: u64, detail: impl Into<String>) -> Outcome {
        Outcome {
            errno: Some(libc::EBUSY),
            resident_pages,
            detail: detail.into(),
            ..Outcome::default()
        }
    }

    pub(super) fn cannot_open_backing(e: &std::io::Error) -> Outcome {
        Outcome::io(e, format!("cannot open backing: {e}"))
    }

    pub(super) fn fadvise_failed(e: &std::io::Error) -> Outcome {
        Outcome::io(e, format!("fadvise failed: {e}"))
    }

    /// A residency count or probe failed: "cannot verify" is never a pass.
    pub(super) fn cannot_verify(e: &std::io::Error) -> Outcome {
        Outcome::io(
            e,
            format!("cannot verify that the page cache was dropped: {e}"),
        )
    }

    /// `what` (cannot write back, drop, read) the FUSE page cache failed;
    /// with the errno a `FuseAccessError` carries, else that of `e`.
    pub(super) fn fuse_failed(e: std::io::Error, what: &str) -> Outcome {
        let errno = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<FuseAccessError>())
            .map_or_else(|| sys::errno_of(&e), |f| f.errno);
        Outcome::failed(errno, format!("{what} the FUSE page cache: {e}"))
    }
}

/// What a command needs from the filesystem around the image (the mount
/// builds it in one place, `ctl::scope`; the unit tests build their own).
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
    /// The one /proc pass that names those writers, shared by every image
    /// of the command and taken only if an image needs it.
    pub writers: &'a WriterScan,
}

/// The page cache of an image's FUSE inode, as control commands (on worker
/// threads) reach it. Every method works on the image's own FUSE inode
/// (node id `Image::nodeid`) or fails; never on another file that has
/// taken the image's name.
pub trait FuseCache: Sync {
    /// Writes the FUSE inode's dirty pages back through the daemon and syncs.
    fn writeback(&self, image: &Image) -> std::io::Result<()>;
    /// Writes back, unmaps and drops every page of the FUSE inode, and
    /// returns when the kernel has done it.
    fn drop_pages(&self, image: &Image) -> std::io::Result<()>;
    /// The FUSE inode's page counts (cachestat on a file of the mount).
    fn page_counts(&self, image: &Image) -> std::io::Result<sys::PageCounts>;
    /// The same, only through the file an earlier call of this command
    /// opened (never a request to the mount: while `inactivate` decides,
    /// every request thread may be waiting for the decision); fails with
    /// `FuseAccessError` when there is none.
    fn held_page_counts(&self, image: &Image) -> std::io::Result<sys::PageCounts>;
}

/// Why the FUSE inode of an image cannot be reached, with the errno the
/// command fails with (carried in an `io::Error` from `FuseCache`).
#[derive(Debug)]
pub struct FuseAccessError {
    pub errno: i32,
    pub message: String,
}

impl std::fmt::Display for FuseAccessError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for FuseAccessError {}
