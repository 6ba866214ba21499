//! The open handles of the mount by number: image files, directory
//! listings and control files.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::session::{Errno, FileHandle};

use super::MigsafeFs;
use super::namespace;
use crate::ctl::CtlHandle;
use crate::error::Error;
use crate::image::Handle;

/// An open file, directory or control file.
#[derive(Clone)]
pub(super) enum Open {
    File(Arc<Handle>),
    Dir(Arc<namespace::DirSnapshot>),
    Ctl(Arc<CtlHandle>),
}

/// The open handles by number.
#[derive(Default)]
pub(super) struct HandleTable {
    map: RwLock<HashMap<u64, Open>>,
    last: AtomicU64,
}

impl HandleTable {
    pub(super) fn add(&self, open: Open) -> u64 {
        let fh = self.reserve();
        self.insert(fh, open);
        fh
    }

    /// A number no handle has had.
    pub(super) fn reserve(&self) -> u64 {
        self.last.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Registers `open` as `fh` (a reserved number, or one a previous
    /// daemon gave the kernel: later numbers start above it).
    pub(super) fn insert(&self, fh: u64, open: Open) {
        self.last.fetch_max(fh, Ordering::Relaxed);
        self.map.write().expect("handles lock").insert(fh, open);
    }

    pub(super) fn get(&self, fh: u64) -> Option<Open> {
        self.map.read().expect("handles lock").get(&fh).cloned()
    }

    pub(super) fn remove(&self, fh: u64) -> Option<Open> {
        self.map.write().expect("handles lock").remove(&fh)
    }
}

impl MigsafeFs {
    pub(super) fn file_handle(&self, fh: FileHandle) -> Result<Arc<Handle>, Error> {
        match self.handles.get(fh.0) {
            Some(Open::File(h)) => Ok(h),
            _ => Err(Errno::EBADF.into()),
        }
    }

    /// Forgets handle `fh` (the keeper first: a handle it still lists
    /// would be rebuilt after a restart, one the kernel no longer has).
    pub(super) fn remove_handle(&self, fh: FileHandle) -> Option<Open> {
        if let Some(k) = self.keeper() {
            k.handle_close(fh.0);
        }
        self.handles.remove(fh.0)
    }
}
