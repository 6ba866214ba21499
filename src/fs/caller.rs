//! Who a request is served as: the caller's uid, gid and supplementary
//! groups, switched on the serving thread for the request's backing calls.

use crate::session::Request;

use super::MigsafeFs;
use crate::error::Error;
use crate::sys::{Caller, FsCreds};

/// The identity `req` is served with (uid, gid and supplementary groups).
pub(crate) fn caller_of(req: &Request) -> Caller {
    Caller::of_request(req.uid(), req.gid(), req.pid())
}

impl MigsafeFs {
    /// Switches this thread to the caller of `req` until the guard drops.
    /// A switch that fails refuses the request: serving it as root instead
    /// would grant what the caller may not have.
    pub(crate) fn as_caller(&self, req: &Request) -> Result<FsCreds, Error> {
        FsCreds::switch(caller_of(req)).map_err(|e| {
            log::error!(
                "cannot switch to the identity of uid {} gid {} (pid {}): {e}",
                req.uid(),
                req.gid(),
                req.pid()
            );
            Error::from(e)
        })
    }
}
