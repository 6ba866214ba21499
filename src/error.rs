//! The one error type a FUSE request fails with (the image's write and sync
//! rules and a device entry's rules return it; a data path's or syscall's
//! `io::Error` becomes its `Io` variant on the way up to the FUSE
//! operations), and its one conversion into the errno the kernel hands the
//! caller.
//!
//! The errno is the contract (docs/DESIGN.md §6): a backing error reaches
//! the VMM unchanged, a fenced write is EROFS, a sticky sync error repeats
//! the first errno until activate. The variants keep *why* a request failed
//! for logs and tests; `errno()` is what the caller sees.

use std::io;

use crate::sys;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A syscall on the backing failed: its errno passes through (EIO for an
    /// error that carries none).
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The image is inactive on this host and the settings deny its writes.
    #[error("the image is inactive on this host (EROFS)")]
    Fenced,
    /// An earlier sync of the image failed: the kernel marked the lost pages
    /// clean, so every later sync reports that first errno until activate.
    #[error("an earlier sync failed with {}", sys::errno_name(*.0))]
    Sticky(i32),
    /// A write or allocation past the end of a device, which cannot grow.
    #[error("past the end of the device (ENOSPC)")]
    DeviceFull,
    /// Any other refusal of a request (permissions, names, unsupported
    /// operations), as the errno the caller gets.
    #[error("{}", sys::errno_name(*.0))]
    Refused(i32),
}

impl Error {
    /// The errno the caller gets.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io(e) => sys::errno_of(e),
            Error::Fenced => libc::EROFS,
            Error::Sticky(e) | Error::Refused(e) => *e,
            Error::DeviceFull => libc::ENOSPC,
        }
    }
}

impl From<crate::session::Errno> for Error {
    fn from(e: crate::session::Errno) -> Error {
        Error::Refused(e.code())
    }
}

impl From<Error> for crate::session::Errno {
    fn from(e: Error) -> crate::session::Errno {
        crate::session::Errno::from_i32(e.errno())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_maps_to_its_errno() {
        assert_eq!(Error::Fenced.errno(), libc::EROFS);
        assert_eq!(Error::DeviceFull.errno(), libc::ENOSPC);
        assert_eq!(Error::Sticky(libc::EIO).errno(), libc::EIO);
        assert_eq!(Error::Refused(libc::EACCES).errno(), libc::EACCES);
        let io = io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(Error::from(io).errno(), libc::ENOSPC);
        // An io::Error without an errno must not reach the kernel as 0.
        assert_eq!(Error::from(io::Error::other("x")).errno(), libc::EIO);
        assert_eq!(
            crate::session::Errno::from(Error::Fenced),
            crate::session::Errno::EROFS
        );
        assert_eq!(
            Error::from(crate::session::Errno::EPERM).errno(),
            libc::EPERM
        );
    }
}
