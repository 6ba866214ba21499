//! The replies the op table sends, one type per answer shape. A reply may
//! be sent from any thread (a deferred open or read); it goes back on the
//! fd its request came from. A reply dropped unsent answers EIO, so no
//! caller waits forever on a forgotten request.

use std::io::IoSlice;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::abi::{self, Out};
use super::backing::BackingId;
use super::channel::Channel;
use super::types::{Errno, FileAttr, FileHandle, FileType, INodeNo};

/// Keeps the answers to requests that must not run twice (they change the
/// namespace), before the kernel gets them: a request the kernel sends
/// again after a restart (FUSE_NOTIFY_RESEND) gets the recorded answer
/// instead of running again.
pub trait ReplyLog: Send + Sync {
    /// `message` is the whole reply (header and payload).
    fn record(&self, unique: u64, message: &[u8]);
}

/// Where a request's answer goes, and whether it went.
pub struct Replier {
    unique: u64,
    ch: Arc<Channel>,
    sent: bool,
    /// Set for requests whose answer is recorded before it is sent.
    log: Option<Arc<dyn ReplyLog>>,
}

impl std::fmt::Debug for Replier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Replier({})", self.unique)
    }
}

impl Replier {
    pub(super) fn new(unique: u64, ch: Arc<Channel>) -> Replier {
        Replier {
            unique,
            ch,
            sent: false,
            log: None,
        }
    }

    /// The answer is recorded in `log` before it is sent.
    pub(super) fn logged(mut self, log: Option<Arc<dyn ReplyLog>>) -> Replier {
        self.log = log;
        self
    }

    pub(super) fn send(mut self, errno: i32, payload: &[u8]) {
        self.send_now(errno, payload);
    }

    fn send_now(&mut self, errno: i32, payload: &[u8]) {
        self.sent = true;
        // On the stack: every read and write answer passes here.
        let mut h = [0u8; abi::OUT_HEADER_LEN];
        h[0..4].copy_from_slice(&((abi::OUT_HEADER_LEN + payload.len()) as u32).to_ne_bytes());
        h[4..8].copy_from_slice(&(-errno).to_ne_bytes());
        h[8..16].copy_from_slice(&self.unique.to_ne_bytes());
        if let Some(log) = &self.log {
            log.record(self.unique, &[&h[..], payload].concat());
        }
        let parts = [IoSlice::new(&h), IoSlice::new(payload)];
        if let Err(e) = self.ch.send(&parts) {
            // ENOENT: the request was interrupted or its caller killed; the
            // kernel no longer waits for the answer.
            if e.raw_os_error() == Some(libc::ENOENT) {
                log::debug!("reply to request {}: caller gone", self.unique);
            } else {
                log::warn!("reply to request {}: {e}", self.unique);
            }
        }
    }

    pub fn error(self, e: Errno) {
        self.send(e.code(), &[])
    }

    /// The connection fd the request came on (for backing registration).
    pub(super) fn channel(&self) -> &Arc<Channel> {
        &self.ch
    }
}

impl Drop for Replier {
    fn drop(&mut self) {
        if !self.sent {
            log::warn!("request {} left without an answer: EIO", self.unique);
            self.send_now(libc::EIO, &[]);
        }
    }
}

/// Seconds and nanoseconds since the epoch, as `fuse_attr` has them
/// (seconds before 1970 are negative).
fn wire_time(t: SystemTime) -> (u64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs(), d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            if d.subsec_nanos() == 0 {
                ((-(d.as_secs() as i64)) as u64, 0)
            } else {
                (
                    (-(d.as_secs() as i64) - 1) as u64,
                    1_000_000_000 - d.subsec_nanos(),
                )
            }
        }
    }
}

fn put_attr(o: &mut Out, a: &FileAttr) {
    let (at, atn) = wire_time(a.atime);
    let (mt, mtn) = wire_time(a.mtime);
    let (ct, ctn) = wire_time(a.ctime);
    o.u64(a.ino.0).u64(a.size).u64(a.blocks);
    o.u64(at).u64(mt).u64(ct).u32(atn).u32(mtn).u32(ctn);
    o.u32(a.kind.mode_bits() | a.perm as u32)
        .u32(a.nlink)
        .u32(a.uid)
        .u32(a.gid)
        .u32(a.rdev)
        .u32(a.blksize)
        .u32(0); // flags
}

fn put_entry(o: &mut Out, entry_ttl: Duration, attr_ttl: Duration, a: &FileAttr) {
    o.u64(a.ino.0).u64(0); // nodeid, generation
    o.u64(entry_ttl.as_secs()).u64(attr_ttl.as_secs());
    o.u32(entry_ttl.subsec_nanos()).u32(attr_ttl.subsec_nanos());
    put_attr(o, a);
}

fn put_open(o: &mut Out, fh: FileHandle, flags: FopenFlags, backing: Option<&BackingId>) {
    let mut bits = flags.0;
    if backing.is_some() {
        bits |= abi::fopen::PASSTHROUGH;
    }
    o.u64(fh.0)
        .u32(bits)
        .i32(backing.map_or(0, |b| b.id() as i32));
}

/// `fuse_open_out.open_flags` the op table chooses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FopenFlags(u32);

impl FopenFlags {
    pub const FOPEN_DIRECT_IO: FopenFlags = FopenFlags(abi::fopen::DIRECT_IO);
    pub const FOPEN_KEEP_CACHE: FopenFlags = FopenFlags(abi::fopen::KEEP_CACHE);
    pub const FOPEN_PARALLEL_DIRECT_WRITES: FopenFlags =
        FopenFlags(abi::fopen::PARALLEL_DIRECT_WRITES);

    pub const fn empty() -> FopenFlags {
        FopenFlags(0)
    }
}

impl std::ops::BitOr for FopenFlags {
    type Output = FopenFlags;
    fn bitor(self, rhs: FopenFlags) -> FopenFlags {
        FopenFlags(self.0 | rhs.0)
    }
}

macro_rules! reply_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $name(pub(super) Replier);
        impl $name {
            pub fn error(self, e: Errno) {
                self.0.error(e)
            }
        }
    };
}

reply_type!(
    /// No data: ok or an errno.
    ReplyEmpty
);
reply_type!(
    /// A name's node and attributes.
    ReplyEntry
);
reply_type!(
    /// A node's attributes.
    ReplyAttr
);
reply_type!(
    /// Bytes (read, readlink).
    ReplyData
);
reply_type!(
    /// How many bytes a write or copy took.
    ReplyWrite
);
reply_type!(
    /// A file handle for an open or opendir.
    ReplyOpen
);
reply_type!(
    /// A new name's entry and its open file handle.
    ReplyCreate
);
reply_type!(
    /// The backing filesystem's statfs.
    ReplyStatfs
);
reply_type!(
    /// An xattr's size (when asked with size 0) or its bytes.
    ReplyXattr
);
reply_type!(
    /// The offset lseek found.
    ReplyLseek
);

impl ReplyEmpty {
    pub fn ok(self) {
        self.0.send(0, &[])
    }
}

impl ReplyEntry {
    pub fn entry(self, entry_ttl: Duration, attr_ttl: Duration, attr: &FileAttr) {
        let mut o = Out::with_capacity(128);
        put_entry(&mut o, entry_ttl, attr_ttl, attr);
        self.0.send(0, &o.buf)
    }
}

impl ReplyAttr {
    pub fn attr(self, ttl: Duration, attr: &FileAttr) {
        let mut o = Out::with_capacity(104);
        o.u64(ttl.as_secs()).u32(ttl.subsec_nanos()).u32(0);
        put_attr(&mut o, attr);
        self.0.send(0, &o.buf)
    }
}

impl ReplyData {
    pub fn data(self, data: &[u8]) {
        self.0.send(0, data)
    }
}

impl ReplyWrite {
    pub fn written(self, n: u32) {
        // fuse_write_out: size, padding.
        let mut o = [0u8; 8];
        o[0..4].copy_from_slice(&n.to_ne_bytes());
        self.0.send(0, &o)
    }
}

impl ReplyLseek {
    pub fn offset(self, off: i64) {
        let mut o = Out::with_capacity(8);
        o.i64(off);
        self.0.send(0, &o.buf)
    }
}

impl ReplyXattr {
    pub fn size(self, n: u32) {
        let mut o = Out::with_capacity(8);
        o.u32(n).u32(0);
        self.0.send(0, &o.buf)
    }
    pub fn data(self, d: &[u8]) {
        self.0.send(0, d)
    }
}

/// What statfs reports, in `struct fuse_kstatfs` order.
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

impl ReplyStatfs {
    pub fn statfs(self, s: &StatFs) {
        let mut o = Out::with_capacity(80);
        o.u64(s.blocks)
            .u64(s.bfree)
            .u64(s.bavail)
            .u64(s.files)
            .u64(s.ffree);
        o.u32(s.bsize).u32(s.namelen).u32(s.frsize).u32(0).zeros(24);
        self.0.send(0, &o.buf)
    }
}

impl ReplyOpen {
    pub fn opened(self, fh: FileHandle, flags: FopenFlags, backing: Option<&BackingId>) {
        let mut o = Out::with_capacity(16);
        put_open(&mut o, fh, flags, backing);
        self.0.send(0, &o.buf)
    }
    /// Registers `file` for kernel passthrough on this request's connection.
    pub fn open_backing(&self, file: impl AsFd) -> std::io::Result<BackingId> {
        BackingId::open(self.0.channel(), file)
    }
}

impl ReplyCreate {
    pub fn created(
        self,
        ttl: Duration,
        attr: &FileAttr,
        fh: FileHandle,
        flags: FopenFlags,
        backing: Option<&BackingId>,
    ) {
        let mut o = Out::with_capacity(144);
        put_entry(&mut o, ttl, ttl, attr);
        put_open(&mut o, fh, flags, backing);
        self.0.send(0, &o.buf)
    }
    pub fn open_backing(&self, file: impl AsFd) -> std::io::Result<BackingId> {
        BackingId::open(self.0.channel(), file)
    }
}

/// A readdir answer: as many `fuse_dirent`s as fit in the size asked for.
#[derive(Debug)]
pub struct ReplyDirectory {
    replier: Replier,
    size: usize,
    buf: Out,
}

impl ReplyDirectory {
    pub(super) fn new(replier: Replier, size: u32) -> ReplyDirectory {
        ReplyDirectory {
            replier,
            size: size as usize,
            buf: Out::with_capacity(size as usize),
        }
    }

    /// Adds one entry; `offset` is where the next readdir resumes. Returns
    /// true when the entry did not fit (the buffer is full).
    pub fn add(
        &mut self,
        ino: INodeNo,
        offset: u64,
        kind: FileType,
        name: &std::ffi::OsStr,
    ) -> bool {
        use std::os::unix::ffi::OsStrExt;
        let name = name.as_bytes();
        let len = (24 + name.len()).next_multiple_of(8);
        if self.buf.buf.len() + len > self.size {
            return true;
        }
        let pad = len - 24 - name.len();
        self.buf
            .u64(ino.0)
            .u64(offset)
            .u32(name.len() as u32)
            .u32(kind.mode_bits() >> 12)
            .bytes(name)
            .zeros(pad);
        false
    }

    pub fn ok(self) {
        self.replier.send(0, &self.buf.buf)
    }

    pub fn error(self, e: Errno) {
        self.replier.error(e)
    }
}
