//! The FUSE session: the connection to the kernel beneath the op table.
//! It negotiates FUSE_INIT, reads requests on one cloned `/dev/fuse` fd per
//! worker thread, decodes them, calls the [`Filesystem`] op table, and
//! writes its replies and notifications.
//!
//! The project keeps this layer (rather than fuser's) so that a restarted
//! daemon can take over a connection the kernel already initialized, and
//! ask for the requests a dead daemon left unanswered (FUSE_NOTIFY_RESEND)
//! — see DESIGN §2, "The session layer".

mod abi;
mod backing;
mod channel;
mod notify;
mod reply;
mod request;
mod types;

use std::ffi::OsStr;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;

pub use abi::init as InitFlags;
pub use backing::BackingId;
pub use channel::Channel;
pub use notify::Notifier;
pub use reply::{
    FopenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyLog, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, StatFs,
};
pub use request::SetAttr;
pub use types::{Errno, FileAttr, FileHandle, FileType, INodeNo, Request, TimeOrNow};

use abi::Out;
use channel::ReadEnd;
use reply::Replier;
use request::{Header, Operation, decode};

/// Who may use the mount, as the daemon enforces it on top of the kernel
/// (which without `allow_other` lets only the mounting user in).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acl {
    Owner,
    RootAndOwner,
    All,
}

/// The op table the session calls, one method per served operation. A
/// method answers through its reply, now or later from any thread.
#[allow(clippy::too_many_arguments)]
pub trait Filesystem: Send + Sync + 'static {
    /// Chooses what to ask of the kernel at FUSE_INIT; an error refuses
    /// the mount.
    fn init(&mut self, config: &mut KernelConfig) -> io::Result<()>;
    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry);
    fn forget(&self, ino: INodeNo, nlookup: u64);
    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr);
    fn setattr(&self, req: &Request, ino: INodeNo, changes: SetAttr, reply: ReplyAttr);
    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData);
    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        rdev: u32,
        reply: ReplyEntry,
    );
    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, reply: ReplyEntry);
    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty);
    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty);
    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    );
    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    );
    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    );
    fn open(&self, req: &Request, ino: INodeNo, flags: i32, reply: ReplyOpen);
    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        reply: ReplyData,
    );
    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        flags: WriteFlags,
        reply: ReplyWrite,
    );
    fn flush(&self, req: &Request, ino: INodeNo, fh: FileHandle, reply: ReplyEmpty);
    fn release(&self, req: &Request, ino: INodeNo, fh: FileHandle, reply: ReplyEmpty);
    fn fsync(&self, req: &Request, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty);
    fn opendir(&self, req: &Request, ino: INodeNo, flags: i32, reply: ReplyOpen);
    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    );
    fn releasedir(&self, req: &Request, ino: INodeNo, fh: FileHandle, reply: ReplyEmpty);
    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    );
    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs);
    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        reply: ReplyEmpty,
    );
    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr);
    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr);
    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty);
    fn access(&self, req: &Request, ino: INodeNo, mask: i32, reply: ReplyEmpty);
    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        flags: i32,
        reply: ReplyCreate,
    );
    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    );
    fn lseek(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    );
    fn copy_file_range(
        &self,
        req: &Request,
        fh_in: FileHandle,
        offset_in: u64,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        reply: ReplyWrite,
    );
}

/// What a FUSE_WRITE says of itself besides its range.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// The writer lacks CAP_FSETID: set-id bits go before the write.
    pub kill_suidgid: bool,
    /// The kernel writing back pages already written into its cache (the
    /// writeback cache, a shared mapping): the writer's call returned long
    /// ago, so a failure reaches it only through its next fsync or close.
    pub writeback: bool,
}

/// What FUSE_INIT offers and what the op table asks for.
#[derive(Debug, Clone)]
pub struct KernelConfig {
    offered: u64,
    requested: u64,
    kernel_max_readahead: u32,
    max_readahead: u32,
    max_write: u32,
    max_background: u16,
    max_stack_depth: u32,
}

impl KernelConfig {
    fn new(offered: u64, max_readahead: u32) -> KernelConfig {
        KernelConfig {
            offered,
            // Reads may be sent in parallel; writes bigger than a page.
            // HAS_RESEND: resent requests are told by their unique id.
            requested: InitFlags::ASYNC_READ
                | InitFlags::BIG_WRITES
                | InitFlags::MAX_PAGES
                | InitFlags::HAS_RESEND,
            kernel_max_readahead: max_readahead,
            max_readahead,
            max_write: 128 << 10,
            max_background: 16,
            max_stack_depth: 0,
        }
    }
    /// Whether the kernel offers `flag` (an [`InitFlags`] bit).
    pub fn offered(&self, flag: u64) -> bool {
        self.offered & flag == flag
    }
    /// Asks for `flag`; a flag the kernel does not offer is left out.
    pub fn request(&mut self, flag: u64) {
        self.requested |= flag;
    }
    pub fn set_max_write(&mut self, n: u32) {
        self.max_write = n;
    }
    pub fn set_max_background(&mut self, n: u16) {
        self.max_background = n;
    }
    /// INIT can only lower the kernel's readahead window.
    pub fn set_max_readahead(&mut self, n: u32) {
        self.max_readahead = n.min(self.kernel_max_readahead);
    }
    pub fn set_max_stack_depth(&mut self, n: u32) {
        self.max_stack_depth = n;
    }
}

/// What was agreed at FUSE_INIT: all a daemon taking over the connection
/// needs of it (the kernel sends FUSE_INIT once per mount).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// The INIT flags both sides agreed on ([`InitFlags`] bits).
    pub flags: u64,
    pub max_write: u32,
}

impl Negotiated {
    pub fn passthrough(&self) -> bool {
        self.flags & InitFlags::PASSTHROUGH != 0
    }
    pub fn writeback(&self) -> bool {
        self.flags & InitFlags::WRITEBACK_CACHE != 0
    }
}

/// A `/dev/fuse` connection before its session runs: what restoring a
/// previous daemon's state needs of it (its passthrough backing ids).
#[derive(Debug, Clone)]
pub struct Connection {
    ch: Arc<Channel>,
}

impl Connection {
    pub fn new(fd: OwnedFd) -> Connection {
        Connection {
            ch: Arc::new(Channel::new(fd)),
        }
    }

    /// Takes over passthrough backing `id`, registered on this connection
    /// by a previous daemon.
    pub fn adopt_backing(&self, id: u32) -> BackingId {
        BackingId::adopt(&self.ch, id)
    }
}

/// A connection to the kernel and the op table that serves it.
pub struct Session<FS: Filesystem> {
    fs: FS,
    ch: Arc<Channel>,
    acl: Acl,
    owner: u32,
    negotiated: Option<Negotiated>,
    adopted: bool,
    /// Worker fds besides `ch` (see [`Session::workers`]).
    workers: Vec<Arc<Channel>>,
    replies: Replies,
}

/// The recorded answers (see [`ReplyLog`]): where new ones go, and the
/// ones a previous daemon recorded, by unique id, for requests sent again.
#[derive(Default)]
struct Replies {
    log: Option<Arc<dyn ReplyLog>>,
    recorded: std::sync::Mutex<std::collections::HashMap<u64, Vec<u8>>>,
}

impl<FS: Filesystem> Session<FS> {
    /// A session on `conn`, whose FUSE_INIT [`Session::handshake`] answers.
    pub fn new(fs: FS, conn: Connection, acl: Acl) -> Session<FS> {
        Session {
            fs,
            ch: conn.ch,
            acl,
            owner: nix::unistd::geteuid().as_raw(),
            negotiated: None,
            adopted: false,
            workers: Vec::new(),
            replies: Replies::default(),
        }
    }

    /// A session on a connection a previous daemon initialized (the kernel
    /// sends no second FUSE_INIT): `negotiated` is what it agreed. Once
    /// serving, it asks the kernel to send again every request the previous
    /// daemon read and never answered.
    pub fn adopt(fs: FS, conn: Connection, acl: Acl, negotiated: Negotiated) -> Session<FS> {
        Session {
            fs,
            ch: conn.ch,
            acl,
            owner: nix::unistd::geteuid().as_raw(),
            negotiated: Some(negotiated),
            adopted: true,
            workers: Vec::new(),
            replies: Replies::default(),
        }
    }

    /// Sets up the fds the worker threads read on, up to `threads` in all:
    /// the connection's own fd, then `given` (fds a previous daemon read
    /// on), then fresh clones. Returns the clones made. A keeper must hold
    /// every fd a worker reads on: requests read on an fd whose last holder
    /// dies are failed with ECONNABORTED, while those on an fd still open
    /// stay pending for FUSE_NOTIFY_RESEND.
    pub fn workers(&mut self, threads: usize, given: Vec<OwnedFd>) -> io::Result<Vec<&Channel>> {
        self.workers = given
            .into_iter()
            .take(threads.saturating_sub(1))
            .map(|fd| Arc::new(Channel::new(fd)))
            .collect();
        let before = self.workers.len();
        while self.workers.len() + 1 < threads {
            self.workers.push(Arc::new(self.ch.clone_fd()?));
        }
        Ok(self.workers[before..].iter().map(|c| &**c).collect())
    }

    /// Records the answers to namespace changes in `log` before sending
    /// them; `recorded` are the answers a previous daemon recorded (whole
    /// messages by unique id), sent again unchanged to a request the
    /// kernel resends instead of running it twice.
    pub fn log_replies(&mut self, log: Arc<dyn ReplyLog>, recorded: Vec<(u64, Vec<u8>)>) {
        self.replies.log = Some(log);
        *self.replies.recorded.lock().expect("replies lock") = recorded.into_iter().collect();
    }

    /// The op table this session serves.
    pub fn fs(&self) -> &FS {
        &self.fs
    }

    pub fn notifier(&self) -> Notifier {
        Notifier::new(self.ch.clone())
    }

    /// Reads FUSE_INIT (the first request of a new mount), lets the op
    /// table choose, and answers it.
    pub fn handshake(&mut self) -> io::Result<Negotiated> {
        let mut buf = vec![0u8; 64 << 10];
        let n = match self.ch.receive(&mut buf) {
            Ok(n) => n,
            Err(ReadEnd::Unmounted) => {
                return Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "the mount went away before FUSE_INIT",
                ));
            }
            Err(ReadEnd::Error(e)) => return Err(e),
        };
        let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
        let (h, op) = decode(&buf[..n]).map_err(|_| bad("short FUSE_INIT".into()))?;
        let reply = Replier::new(h.unique, self.ch.clone());
        let Operation::Init {
            major,
            minor,
            max_readahead,
            flags,
        } = op
        else {
            reply.error(Errno::EIO);
            return Err(bad(format!("request {} before FUSE_INIT", h.opcode)));
        };
        if major != abi::KERNEL_VERSION || minor < abi::MIN_MINOR_VERSION {
            reply.error(Errno::EPROTO);
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "the kernel speaks FUSE {major}.{minor}; migsafe needs 7.{} or later",
                    abi::MIN_MINOR_VERSION
                ),
            ));
        }
        let mut config = KernelConfig::new(flags, max_readahead);
        if let Err(e) = self.fs.init(&mut config) {
            reply.error(Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO)));
            return Err(e);
        }
        let agreed = (config.requested | InitFlags::INIT_EXT) & flags;
        send_init_reply(reply, &config, agreed);
        let negotiated = Negotiated {
            flags: agreed,
            max_write: config.max_write,
        };
        log::debug!(
            "FUSE_INIT: kernel 7.{minor}, flags {agreed:#x}, max_write {}",
            config.max_write
        );
        self.negotiated = Some(negotiated);
        Ok(negotiated)
    }

    /// Serves with `threads` workers until the mount goes away.
    pub fn run(self, threads: usize) -> io::Result<()> {
        let negotiated = self
            .negotiated
            .ok_or_else(|| io::Error::other("session run before FUSE_INIT"))?;
        let buf_len = (negotiated.max_write as usize).max(64 << 10) + (8 << 10);
        let mut channels = vec![self.ch.clone()];
        channels.extend(self.workers.iter().cloned());
        for _ in channels.len()..threads.max(1) {
            channels.push(Arc::new(self.ch.clone_fd()?));
        }
        let shared = Arc::new(Worker {
            fs: self.fs,
            acl: self.acl,
            owner: self.owner,
            replies: self.replies,
        });
        let mut handles = Vec::new();
        for (i, ch) in channels.into_iter().enumerate() {
            let w = shared.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("fuse-{i}"))
                    .spawn(move || w.serve(ch, buf_len))?,
            );
        }
        if self.adopted {
            // Every worker is reading: the requests come back to them.
            match Notifier::new(self.ch.clone()).resend() {
                Ok(()) => log::info!("asked the kernel to resend requests left unanswered"),
                Err(e) => log::warn!("FUSE_NOTIFY_RESEND: {e}; requests in flight may hang"),
            }
        }
        let mut result = Ok(());
        for h in handles {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = result.and(Err(e)),
                Err(_) => result = result.and(Err(io::Error::other("a worker thread panicked"))),
            }
        }
        result
    }
}

fn send_init_reply(reply: Replier, c: &KernelConfig, agreed: u64) {
    let page = 4096u32;
    let max_pages = (c.max_write.max(c.max_readahead).saturating_sub(1) / page + 1) as u16;
    let mut o = Out::with_capacity(64);
    o.u32(abi::KERNEL_VERSION)
        .u32(abi::KERNEL_MINOR_VERSION)
        .u32(c.max_readahead)
        .u32(agreed as u32)
        .u16(c.max_background)
        .u16((c.max_background as u32 * 3 / 4) as u16) // congestion_threshold
        .u32(c.max_write)
        .u32(1) // time_gran: nanoseconds
        .u16(max_pages)
        .u16(0) // map_alignment
        .u32((agreed >> 32) as u32)
        .u32(if agreed & InitFlags::PASSTHROUGH != 0 {
            c.max_stack_depth
        } else {
            0
        })
        .zeros(24);
    reply.send(0, &o.buf);
}

/// What every worker thread shares.
struct Worker<FS: Filesystem> {
    fs: FS,
    acl: Acl,
    owner: u32,
    replies: Replies,
}

impl<FS: Filesystem> Worker<FS> {
    fn serve(&self, ch: Arc<Channel>, buf_len: usize) -> io::Result<()> {
        let mut buf = vec![0u8; buf_len];
        loop {
            let n = match ch.receive(&mut buf) {
                Ok(n) => n,
                Err(ReadEnd::Unmounted) => return Ok(()),
                Err(ReadEnd::Error(e)) => return Err(e),
            };
            self.dispatch(&ch, &buf[..n]);
        }
    }

    /// Whether `uid` may use the mount (root and the owner by the ACL).
    fn allowed(&self, uid: u32) -> bool {
        match self.acl {
            Acl::All => true,
            Acl::RootAndOwner => uid == self.owner || uid == 0,
            Acl::Owner => uid == self.owner,
        }
    }

    fn dispatch(&self, ch: &Arc<Channel>, buf: &[u8]) {
        let (h, op) = match decode(buf) {
            Ok(x) => x,
            Err(_) => {
                if buf.len() >= abi::IN_HEADER_LEN {
                    let unique = u64::from_ne_bytes(buf[8..16].try_into().unwrap());
                    log::warn!("request {unique}: shorter than its layout; EIO");
                    Replier::new(unique, ch.clone()).error(Errno::EIO);
                }
                return;
            }
        };
        if h.unique & abi::UNIQUE_RESEND != 0 {
            let first = h.unique & !abi::UNIQUE_RESEND;
            let recorded = self
                .replies
                .recorded
                .lock()
                .expect("replies lock")
                .remove(&first);
            if let Some(mut message) = recorded {
                // Ran and answered before the restart; the answer never
                // reached the kernel. Same answer, under the resent id.
                log::info!(
                    "request {first} (opcode {}) sent again: its recorded answer",
                    h.opcode
                );
                message[8..16].copy_from_slice(&h.unique.to_ne_bytes());
                let _ = ch.send(&[std::io::IoSlice::new(&message)]);
                return;
            }
            log::debug!("request {first} (opcode {}) sent again", h.opcode);
        }
        let log = matches!(
            h.opcode,
            abi::opcode::MKNOD
                | abi::opcode::MKDIR
                | abi::opcode::UNLINK
                | abi::opcode::RMDIR
                | abi::opcode::RENAME
                | abi::opcode::RENAME2
                | abi::opcode::LINK
                | abi::opcode::SYMLINK
                | abi::opcode::CREATE
        )
        .then(|| self.replies.log.clone())
        .flatten();
        let replier = || Replier::new(h.unique, ch.clone()).logged(log.clone());
        if !self.allowed(h.uid) && !op.without_caller() {
            return replier().error(Errno::EACCES);
        }
        self.call(&h, op, replier);
    }

    fn call(&self, h: &Header, op: Operation<'_>, replier: impl Fn() -> Replier) {
        let fs = &self.fs;
        let req = &h.request();
        let ino = INodeNo(h.nodeid);
        match op {
            Operation::Forget { nlookup } => fs.forget(ino, nlookup),
            Operation::BatchForget { nodes } => {
                for (node, nlookup) in nodes {
                    fs.forget(INodeNo(node), nlookup);
                }
            }
            // Nothing is interrupted: every request runs to its answer.
            Operation::Interrupt => {}
            Operation::Init { .. } => replier().error(Errno::EIO),
            Operation::Destroy => ReplyEmpty(replier()).ok(),
            Operation::Lookup { name } => fs.lookup(req, ino, name, ReplyEntry(replier())),
            Operation::GetAttr { fh } => fs.getattr(req, ino, fh, ReplyAttr(replier())),
            Operation::SetAttr(changes) => fs.setattr(req, ino, changes, ReplyAttr(replier())),
            Operation::ReadLink => fs.readlink(req, ino, ReplyData(replier())),
            Operation::SymLink { name, target } => {
                fs.symlink(req, ino, name, Path::new(target), ReplyEntry(replier()))
            }
            Operation::MkNod { name, mode, rdev } => {
                fs.mknod(req, ino, name, mode, rdev, ReplyEntry(replier()))
            }
            Operation::MkDir { name, mode } => {
                fs.mkdir(req, ino, name, mode, ReplyEntry(replier()))
            }
            Operation::Unlink { name } => fs.unlink(req, ino, name, ReplyEmpty(replier())),
            Operation::RmDir { name } => fs.rmdir(req, ino, name, ReplyEmpty(replier())),
            Operation::Rename {
                name,
                newparent,
                newname,
                flags,
            } => fs.rename(
                req,
                ino,
                name,
                newparent,
                newname,
                flags,
                ReplyEmpty(replier()),
            ),
            Operation::Link {
                ino: target,
                newname,
            } => fs.link(req, target, ino, newname, ReplyEntry(replier())),
            Operation::Open { flags } => fs.open(req, ino, flags, ReplyOpen(replier())),
            Operation::Read { fh, offset, size } => {
                fs.read(req, ino, fh, offset, size, ReplyData(replier()))
            }
            Operation::Write {
                fh,
                offset,
                data,
                write_flags,
            } => {
                let flags = WriteFlags {
                    kill_suidgid: write_flags & abi::WRITE_KILL_SUIDGID != 0,
                    writeback: write_flags & abi::WRITE_CACHE != 0,
                };
                fs.write(req, ino, fh, offset, data, flags, ReplyWrite(replier()))
            }
            Operation::StatFs => fs.statfs(req, ino, ReplyStatfs(replier())),
            Operation::Release { fh } => fs.release(req, ino, fh, ReplyEmpty(replier())),
            Operation::Fsync { fh, datasync } => {
                fs.fsync(req, ino, fh, datasync, ReplyEmpty(replier()))
            }
            Operation::SetXattr { name, value, flags } => {
                fs.setxattr(req, ino, name, value, flags, ReplyEmpty(replier()))
            }
            Operation::GetXattr { name, size } => {
                fs.getxattr(req, ino, name, size, ReplyXattr(replier()))
            }
            Operation::ListXattr { size } => fs.listxattr(req, ino, size, ReplyXattr(replier())),
            Operation::RemoveXattr { name } => {
                fs.removexattr(req, ino, name, ReplyEmpty(replier()))
            }
            Operation::Flush { fh } => fs.flush(req, ino, fh, ReplyEmpty(replier())),
            Operation::OpenDir { flags } => fs.opendir(req, ino, flags, ReplyOpen(replier())),
            Operation::ReadDir { fh, offset, size } => {
                fs.readdir(req, ino, fh, offset, ReplyDirectory::new(replier(), size))
            }
            Operation::ReleaseDir { fh } => fs.releasedir(req, ino, fh, ReplyEmpty(replier())),
            Operation::FsyncDir { fh, datasync } => {
                fs.fsyncdir(req, ino, fh, datasync, ReplyEmpty(replier()))
            }
            Operation::Access { mask } => fs.access(req, ino, mask, ReplyEmpty(replier())),
            Operation::Create { name, mode, flags } => {
                fs.create(req, ino, name, mode, flags, ReplyCreate(replier()))
            }
            // No ioctls are served (QEMU probes a few); ENOTTY is what a
            // regular file without them answers.
            Operation::Ioctl => replier().error(Errno::ENOTTY),
            Operation::Fallocate {
                fh,
                offset,
                length,
                mode,
            } => fs.fallocate(req, ino, fh, offset, length, mode, ReplyEmpty(replier())),
            Operation::Lseek { fh, offset, whence } => {
                fs.lseek(req, ino, fh, offset, whence, ReplyLseek(replier()))
            }
            Operation::CopyFileRange {
                fh_in,
                offset_in,
                fh_out,
                offset_out,
                len,
            } => fs.copy_file_range(
                req,
                fh_in,
                offset_in,
                fh_out,
                offset_out,
                len,
                ReplyWrite(replier()),
            ),
            Operation::Unsupported(opcode) => {
                log::debug!("opcode {opcode}: not served (ENOSYS)");
                replier().error(Errno::ENOSYS)
            }
        }
    }
}
