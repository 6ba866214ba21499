//! Who opened a watched file since we last looked: fanotify `FAN_OPEN`
//! events with the opener's pid, so that the answer of a /proc pass can be
//! kept until some other process opens the file (docs/DESIGN.md §3,
//! "Writers outside the mount").

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// A fanotify group reporting `FAN_OPEN` of the files marked in it. File
/// identifiers, not file descriptors, are reported (`FAN_REPORT_FID`): the
/// kernel opens nothing in this process per event (an event fd would be a
/// new open of the image, on whatever filesystem it lives), and the mode is
/// allowed to unprivileged processes too (since Linux 5.13; they are told
/// the opener's pid only when it is themselves, else 0).
#[derive(Debug)]
pub struct OpenEvents {
    fd: OwnedFd,
}

/// What the events read since the last drain say.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Opens {
    /// Pids of processes other than this one that opened a marked file
    /// (each once, in arrival order). 0: a process the kernel would not
    /// name (another pid namespace, or this process is unprivileged).
    pub others: Vec<u32>,
    /// The queue overflowed: events were lost, opens are unknown.
    pub overflow: bool,
}

impl OpenEvents {
    pub fn new() -> io::Result<OpenEvents> {
        let flags =
            libc::FAN_CLASS_NOTIF | libc::FAN_REPORT_FID | libc::FAN_CLOEXEC | libc::FAN_NONBLOCK;
        // SAFETY: fanotify_init takes two integer flag words and returns a
        // new fd or -1; it touches no memory of ours.
        let fd = unsafe { libc::fanotify_init(flags, (libc::O_RDONLY | libc::O_LARGEFILE) as u32) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by fanotify_init and is owned by
        // nobody else.
        Ok(OpenEvents {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Reports every later open of the file behind `file` (its inode, by
    /// any path and any process on this host). Kept until this group is
    /// closed or the file's last link is removed. Fails on a filesystem
    /// that cannot identify files (no file handles or no fsid), or past the
    /// per-user mark limit.
    pub fn watch(&self, file: BorrowedFd<'_>) -> io::Result<()> {
        // SAFETY: with a null pathname fanotify_mark marks the object of
        // `file` itself; both fds are valid for the call (owned / borrowed).
        let ret = unsafe {
            libc::fanotify_mark(
                self.fd.as_raw_fd(),
                libc::FAN_MARK_ADD,
                libc::FAN_OPEN,
                file.as_raw_fd(),
                std::ptr::null(),
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads every event queued so far. An open by any process queues its
    /// event inside open(2), before that call returns: whatever open
    /// returned before this call is in its answer.
    pub fn drain(&self) -> io::Result<Opens> {
        let me = std::process::id();
        let mut out = Opens::default();
        // u64 elements: the kernel's records are 8-byte aligned.
        let mut buf = vec![0u64; 512];
        let meta_len = std::mem::size_of::<libc::fanotify_event_metadata>();
        loop {
            let bytes = buf.len() * 8;
            // SAFETY: reads at most `bytes` bytes into `buf`, which is that
            // long and lives across the call.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), bytes) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(out),
                    Some(libc::EINTR) => continue,
                    _ => Err(e),
                };
            }
            let n = n as usize;
            if n == 0 {
                return Ok(out);
            }
            let base = buf.as_ptr().cast::<u8>();
            let mut off = 0;
            while off + meta_len <= n {
                // SAFETY: `off + meta_len <= n` bytes were written by the
                // kernel; read_unaligned copies the record out.
                let m: libc::fanotify_event_metadata =
                    unsafe { std::ptr::read_unaligned(base.add(off).cast()) };
                let len = m.event_len as usize;
                if len < meta_len || off + len > n || m.vers != libc::FANOTIFY_METADATA_VERSION {
                    // Not a record this code understands: say nothing is
                    // known rather than guess.
                    out.overflow = true;
                    return Ok(out);
                }
                if m.mask & libc::FAN_Q_OVERFLOW != 0 {
                    out.overflow = true;
                } else if m.pid as u32 != me && !out.others.contains(&(m.pid as u32)) {
                    out.others.push(m.pid as u32);
                }
                off += len;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{File, OpenOptions};
    use std::os::fd::AsFd;

    /// Opens by this process are not reported; an open by another process
    /// is, with its pid; nothing is reported twice.
    #[test]
    fn names_other_openers_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        File::create(&path).unwrap();
        let events = OpenEvents::new().unwrap();
        events.watch(File::open(&path).unwrap().as_fd()).unwrap();
        let _own = OpenOptions::new().write(true).open(&path).unwrap();
        assert_eq!(events.drain().unwrap(), Opens::default());
        let child = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg("exec 3>>\"$1\"")
            .arg("sh")
            .arg(&path)
            .status()
            .unwrap();
        assert!(child.success());
        let opens = events.drain().unwrap();
        assert!(!opens.overflow);
        assert_eq!(opens.others.len(), 1, "{opens:?}");
        assert_ne!(opens.others[0], std::process::id());
        assert_eq!(events.drain().unwrap(), Opens::default());
    }
}
