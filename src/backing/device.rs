//! A `--device NAME=PATH` entry: what migsafe knows of a device and the
//! rules it serves it by, in one place. The operations ask it instead of
//! special-casing devices themselves.
//!
//! A device is presented as a regular file of the device's size at the
//! mount root. It cannot grow or shrink (writes at or past its end get
//! ENOSPC, as on the block device itself), its owner and mode are the device
//! node's (the daemon opens it with its own rights, so it checks the caller
//! against them as the kernel would for an open of the node), and its size
//! is re-read when an `invalidate` makes this host pick up a resized LUN.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::Error;
use crate::sys::{self, Caller};

#[derive(Debug)]
pub struct Device {
    /// The entry's name at the mount root.
    pub name: String,
    pub path: PathBuf,
    /// `stat` of the node at start (its dev/ino name the image).
    pub stat: libc::stat,
    /// BLKGETSIZE64 (or the file size), re-read by invalidate.
    size: AtomicU64,
}

impl Device {
    pub fn new(name: String, path: PathBuf, stat: libc::stat, size: u64) -> Device {
        Device {
            name,
            path,
            stat,
            size: AtomicU64::new(size),
        }
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    /// Picks up a resized device from a fresh fd of it.
    pub fn reread_size(&self, file: &File) {
        if let Ok(size) = crate::cache::file_size(file) {
            self.size.store(size, Ordering::Relaxed);
        }
    }

    /// The node's `stat` now (following symlinks, as the daemon opens it):
    /// its owner and mode are the entry's.
    pub fn node_stat(&self) -> Result<libc::stat, Error> {
        let path = CString::new(self.path.as_os_str().as_bytes())
            .map_err(|_| Error::Refused(libc::EINVAL))?;
        sys::stat_path(&path).map_err(|e| {
            log::warn!("device {}: stat {}: {e}", self.name, self.path.display());
            Error::from(e)
        })
    }

    /// EACCES unless `caller` may open the node for `mask` (R_OK/W_OK/X_OK).
    pub fn check_access(&self, caller: &Caller, mask: i32) -> Result<(), Error> {
        if caller.may(&self.node_stat()?, mask) {
            Ok(())
        } else {
            Err(Error::Refused(libc::EACCES))
        }
    }

    /// Opens the device for `caller` with open(2) `flags`, after checking
    /// the caller's access to the node.
    pub fn open_as(&self, caller: &Caller, flags: i32) -> Result<File, Error> {
        let mask = match flags & libc::O_ACCMODE {
            libc::O_RDONLY => libc::R_OK,
            libc::O_WRONLY => libc::W_OK,
            _ => libc::R_OK | libc::W_OK,
        };
        self.check_access(caller, mask)?;
        self.open(flags).map_err(|e| {
            log::warn!("device {}: open: {e}", self.name);
            Error::from(e)
        })
    }

    /// Opens the device with the daemon's rights (control plane, sync).
    pub fn open(&self, flags: i32) -> io::Result<File> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(flags & libc::O_ACCMODE != libc::O_RDONLY)
            .custom_flags(flags & !libc::O_ACCMODE)
            .open(&self.path)
    }

    /// How much of a `len`-byte write at `offset` fits: up to the end, and
    /// ENOSPC at or past it.
    pub fn write_room(&self, offset: u64, len: usize) -> Result<usize, Error> {
        if len == 0 {
            return Ok(0);
        }
        let size = self.size();
        if offset >= size {
            return Err(Error::DeviceFull);
        }
        Ok(len.min((size - offset).min(usize::MAX as u64) as usize))
    }

    /// ENOSPC when the device would have to grow to `end` bytes.
    pub fn grow_allowed(&self, end: u64) -> Result<(), Error> {
        if end > self.size() {
            return Err(Error::DeviceFull);
        }
        Ok(())
    }

    /// Owner and mode are the device node's: chown and chmod get EPERM.
    pub fn check_owner_mode_change(&self) -> Result<(), Error> {
        Err(Error::Refused(libc::EPERM))
    }

    /// A device has one size: a truncate to it is a no-op (as tools that
    /// "resize" to the current size expect), to anything else EINVAL.
    pub fn check_set_len(&self, size: u64) -> Result<(), Error> {
        if size == self.size() {
            Ok(())
        } else {
            Err(Error::Refused(libc::EINVAL))
        }
    }

    /// Whether O_DIRECT I/O in `block`-sized units covers the whole device:
    /// an aligned write of a last partial block would grow a regular file
    /// standing in for a device.
    pub fn whole_blocks(&self, block: u64) -> Result<(), String> {
        let size = self.size();
        if size.is_multiple_of(block) {
            Ok(())
        } else {
            Err(format!(
                "its size {size} is not a multiple of the {block}-byte block"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(size: u64) -> Device {
        let stat = sys::fstat_fd(sys::cwd()).expect("stat cwd");
        Device::new("disk".into(), PathBuf::from("/nonexistent"), stat, size)
    }

    #[test]
    fn writes_fit_up_to_the_end_and_get_enospc_past_it() {
        let d = device(4096);
        assert_eq!(d.write_room(0, 8192).unwrap(), 4096);
        assert_eq!(d.write_room(4000, 10).unwrap(), 10);
        assert_eq!(d.write_room(4096, 1).unwrap_err().errno(), libc::ENOSPC);
        assert_eq!(d.write_room(9999, 0).unwrap(), 0);
        assert!(d.grow_allowed(4096).is_ok());
        assert_eq!(d.grow_allowed(4097).unwrap_err().errno(), libc::ENOSPC);
    }

    #[test]
    fn setattr_takes_only_its_own_size() {
        let d = device(8192);
        assert!(d.check_set_len(8192).is_ok());
        assert_eq!(d.check_set_len(0).unwrap_err().errno(), libc::EINVAL);
        assert_eq!(
            d.check_owner_mode_change().unwrap_err().errno(),
            libc::EPERM
        );
        assert!(d.whole_blocks(4096).is_ok());
        assert!(device(8192 + 512).whole_blocks(4096).is_err());
    }
}
