//! Passthrough backing ids: a backing file registered with the connection,
//! named by the open replies of the handles that pass through to it.

use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;

use super::channel::Channel;
use crate::sys;

/// A registered backing file; dropping it unregisters it. Handles the
/// kernel already opened with it keep their own reference.
#[derive(Debug)]
pub struct BackingId {
    id: u32,
    ch: Arc<Channel>,
}

impl BackingId {
    pub(super) fn open(ch: &Arc<Channel>, file: impl AsFd) -> io::Result<BackingId> {
        let id = sys::fuse_backing_open(&**ch, file)?;
        Ok(BackingId { id, ch: ch.clone() })
    }

    /// A backing a previous daemon registered on this connection: the
    /// kernel still holds it under `id`; dropping this unregisters it.
    pub(super) fn adopt(ch: &Arc<Channel>, id: u32) -> BackingId {
        BackingId { id, ch: ch.clone() }
    }

    pub fn id(&self) -> u32 {
        self.id
    }
}

impl Drop for BackingId {
    fn drop(&mut self) {
        if let Err(e) = sys::fuse_backing_close(&*self.ch, self.id) {
            log::debug!("closing passthrough backing {}: {e}", self.id);
        }
    }
}
