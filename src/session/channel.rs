//! One `/dev/fuse` fd of the connection: reading whole requests, writing
//! whole replies and notifications. Every worker has its own clone, so a
//! reply goes back on the fd its request was read from (the kernel finds
//! the request in that fd's processing queue).

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::errno::Errno as NixErrno;

use crate::sys;

#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

/// Why reading a request stopped.
pub enum ReadEnd {
    /// The connection is gone (unmounted or aborted): the session ends.
    Unmounted,
    Error(io::Error),
}

impl Channel {
    pub fn new(fd: OwnedFd) -> Channel {
        Channel { fd }
    }

    /// A new fd on the same connection, for one more worker.
    pub fn clone_fd(&self) -> io::Result<Channel> {
        let fd = nix::fcntl::open(
            "/dev/fuse",
            nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        sys::fuse_dev_clone(&fd, &self.fd)?;
        Ok(Channel { fd })
    }

    /// Reads one request into `buf`; returns its length.
    pub fn receive(&self, buf: &mut [u8]) -> Result<usize, ReadEnd> {
        loop {
            match nix::unistd::read(&self.fd, buf) {
                Ok(n) => return Ok(n),
                // Interrupted, or a request taken back before it was read.
                Err(NixErrno::EINTR | NixErrno::EAGAIN | NixErrno::ENOENT) => continue,
                Err(NixErrno::ENODEV) => return Err(ReadEnd::Unmounted),
                Err(e) => return Err(ReadEnd::Error(e.into())),
            }
        }
    }

    /// Writes one message (a reply or a notification) in one writev.
    pub fn send(&self, parts: &[IoSlice<'_>]) -> io::Result<()> {
        match nix::sys::uio::writev(&self.fd, parts) {
            Ok(_) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
