//! Whether anyone on this host has a file open for writing, asked of the
//! kernel in three `fcntl` calls (the break signal, a read lease, its
//! removal) instead of a walk over every process.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// The signal a lease break would send to this process: one whose default
/// action is to ignore it, because the default lease-break signal (SIGIO)
/// terminates a process that has no handler for it.
const BREAK_SIGNAL: libc::c_int = libc::SIGURG;

/// `F_SETSIG` of <fcntl.h> (Linux), which the libc crate does not export.
const F_SETSIG: libc::c_int = 10;

/// True when some open file of the inode behind `fd` has write access, on
/// this host, by anyone (this process included; a writable shared mapping
/// keeps its file open, so it counts too): the kernel refuses a read lease
/// with EAGAIN exactly when the inode's count of writable opens is above
/// zero. False means no writable open existed at the moment of the call.
///
/// `fd` must be open read-only (a read lease needs it). The lease exists
/// only between the two `F_SETLEASE` calls: an open for writing by anyone that comes in
/// between waits for it to go (microseconds), or fails with EAGAIN if it
/// was opened O_NONBLOCK. Errors (EINVAL: not a regular file, a filesystem
/// without leases, or leases disabled; EACCES: not the owner and no
/// CAP_LEASE) mean the question could not be asked.
pub fn open_for_write_anywhere(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let raw = fd.as_raw_fd();
    // SAFETY: F_SETSIG takes an int and only changes which signal this
    // open file description sends; `raw` is a valid fd for the whole call
    // (borrowed). Set before the lease, so a break can never send SIGIO.
    if unsafe { libc::fcntl(raw, F_SETSIG, BREAK_SIGNAL) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETLEASE takes an int; `raw` is valid (borrowed).
    if unsafe { libc::fcntl(raw, libc::F_SETLEASE, libc::F_RDLCK) } < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) => Ok(true),
            _ => Err(e),
        };
    }
    // SAFETY: as above; removes the lease this call just took.
    if unsafe { libc::fcntl(raw, libc::F_SETLEASE, libc::F_UNLCK) } < 0 {
        // Closing the fd removes it as well; the answer stands.
        log::debug!("cannot remove a read lease: {}", io::Error::last_os_error());
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{File, OpenOptions};
    use std::os::fd::AsFd;
    use std::os::unix::fs::OpenOptionsExt;

    /// A writable open anywhere (here: this very process) is seen, a
    /// read-only one is not, and the answer follows the writer's close.
    #[test]
    fn sees_writable_opens_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        File::create(&path).unwrap();
        let probe = File::open(&path).unwrap();
        let _reader = File::open(&path).unwrap();
        assert!(!open_for_write_anywhere(probe.as_fd()).unwrap());
        let writer = OpenOptions::new().write(true).open(&path).unwrap();
        assert!(open_for_write_anywhere(probe.as_fd()).unwrap());
        drop(writer);
        assert!(!open_for_write_anywhere(probe.as_fd()).unwrap());
        // The probe left no lease behind: a writer opens without waiting.
        let _w = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .expect("a lease was left on the file");
    }

    /// A writable shared mapping whose fd was closed still writes the
    /// file, and still counts as a writable open.
    #[test]
    fn sees_a_mapping_without_an_fd() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        File::create(&path).unwrap().set_len(4096).unwrap();
        let probe = File::open(&path).unwrap();
        let rw = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let len = std::num::NonZeroUsize::new(4096).unwrap();
        use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};
        // SAFETY: a fresh shared mapping of a 4 KiB file nobody truncates,
        // unmapped below; no reference into it is created.
        let p = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &rw,
                0,
            )
        }
        .unwrap();
        drop(rw);
        assert!(open_for_write_anywhere(probe.as_fd()).unwrap());
        // SAFETY: unmaps exactly the mapping made above.
        unsafe { munmap(p, 4096) }.unwrap();
        assert!(!open_for_write_anywhere(probe.as_fd()).unwrap());
    }

    #[test]
    fn refuses_a_non_regular_file() {
        let dev = File::open("/dev/null").unwrap();
        assert!(open_for_write_anywhere(dev.as_fd()).is_err());
    }
}
