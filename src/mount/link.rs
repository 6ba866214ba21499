//! The link between the keeper and its serving process: a SOCK_SEQPACKET
//! socket pair carrying one JSON object per message, with the fds it names
//! (SCM_RIGHTS). Sequenced packets keep each message whole and in order,
//! and a peer that dies is seen as the end of the stream.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};
use serde_json::Value;

/// Most fds one message carries (a cached handle: its O_DIRECT fd and the
/// buffered fd of its partial blocks).
const MAX_FDS: usize = 4;
/// Largest message: a record with a path of up to PATH_MAX bytes, quoted.
const MAX_MESSAGE: usize = 64 << 10;

#[derive(Debug)]
pub(super) struct Link {
    sock: OwnedFd,
}

impl Link {
    pub(super) fn pair() -> io::Result<(Link, Link)> {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        Ok((Link { sock: a }, Link { sock: b }))
    }

    pub(super) fn from_fd(sock: OwnedFd) -> Link {
        Link { sock }
    }

    pub(super) fn send(&self, msg: &Value, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let text = msg.to_string();
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
        sendmsg::<()>(
            self.sock.as_raw_fd(),
            &[IoSlice::new(text.as_bytes())],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )?;
        Ok(())
    }

    /// The next message, or None once the peer is gone.
    pub(super) fn recv(&self) -> io::Result<Option<(Value, Vec<OwnedFd>)>> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
        let (len, fds) = loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            match recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => {
                    let mut fds = Vec::new();
                    for c in msg.cmsgs()? {
                        if let ControlMessageOwned::ScmRights(raw) = c {
                            fds.extend(raw.into_iter().map(crate::sys::owned_fd_from_scm_rights));
                        }
                    }
                    break (msg.bytes, fds);
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        if len == 0 {
            return Ok(None);
        }
        let msg = serde_json::from_slice(&buf[..len])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok(Some((msg, fds)))
    }
}

impl AsFd for Link {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}
