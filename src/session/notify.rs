//! Messages to the kernel that answer no request: dropping a node's cached
//! attributes and pages, and asking for unanswered requests again.

use std::io::{self, IoSlice};
use std::sync::Arc;

use super::abi::{self, Out, notify};
use super::channel::Channel;
use super::types::INodeNo;

/// Sends notifications on the connection's first fd; cheap to clone.
#[derive(Clone, Debug)]
pub struct Notifier {
    ch: Arc<Channel>,
}

impl Notifier {
    pub(super) fn new(ch: Arc<Channel>) -> Notifier {
        Notifier { ch }
    }

    fn send(&self, code: i32, body: &[u8]) -> io::Result<()> {
        let mut h = Out::with_capacity(abi::OUT_HEADER_LEN);
        h.u32((abi::OUT_HEADER_LEN + body.len()) as u32)
            .i32(code)
            .u64(0);
        self.ch.send(&[IoSlice::new(&h.buf), IoSlice::new(body)])
    }

    /// Drops `ino`'s cached attributes, and its cached pages from `offset`
    /// for `len` bytes (0: to the end); offset -1 drops attributes only.
    pub fn inval_inode(&self, ino: INodeNo, offset: i64, len: i64) -> io::Result<()> {
        let mut o = Out::with_capacity(24);
        o.u64(ino.0).i64(offset).i64(len);
        self.send(notify::INVAL_INODE, &o.buf)
    }

    /// Asks the kernel to send again every request read from the
    /// connection and not yet answered (the resent ones carry
    /// [`abi::UNIQUE_RESEND`] in their unique id).
    pub fn resend(&self) -> io::Result<()> {
        self.send(notify::RESEND, &[])
    }
}
