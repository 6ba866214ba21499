//! The control directory (docs/DESIGN.md §3): virtual files at `MOUNT/.ctl/` through
//! which scripts drive migrations. A command's write() returns when the
//! command has finished, with its errno; the result lines can be read back
//! on the same open file.

pub mod arrivals;
pub mod commands;
pub mod fuse_cache;
pub mod request;
pub mod scope;
pub mod workers;

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::cache::invalidator::AttrInvalidator;
use crate::datapath::{DataPath, IoMode};
use crate::error::Error;
use crate::image::{Image, Registry};
use crate::protocol;
use crate::settings::{Key, Settings};
use commands::Command;

/// What a control file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtlFile {
    Command(Command),
    Setting(Key),
    Status,
}

/// The files of the control directory, in listing order; each name is the
/// command's or setting's own (one vocabulary: `protocol`, `settings`).
pub const FILES: [(&str, CtlFile); 12] = [
    (protocol::ACTIVATE, CtlFile::Command(Command::Activate)),
    (protocol::INACTIVATE, CtlFile::Command(Command::Inactivate)),
    (protocol::INVALIDATE, CtlFile::Command(Command::Invalidate)),
    (protocol::FLUSH, CtlFile::Command(Command::Flush)),
    (protocol::CHECK, CtlFile::Command(Command::Check)),
    setting(Key::CheckCacheDropped),
    setting(Key::DropCache),
    setting(Key::FsyncOnClose),
    setting(Key::InvalidateOnOpen),
    setting(Key::Sync),
    setting(Key::InactiveWrites),
    ("status", CtlFile::Status),
];

const fn setting(key: Key) -> (&'static str, CtlFile) {
    (key.name(), CtlFile::Setting(key))
}

/// The index in [`FILES`] of the control file called `name`.
pub fn file_index(name: &[u8]) -> Option<usize> {
    FILES.iter().position(|(n, _)| n.as_bytes() == name)
}

/// Mode bits shown for control file `index` (None: the directory).
/// Informational only: who may write is decided by `check_writer`, whatever
/// the bits say.
pub fn file_mode(index: Option<usize>) -> u16 {
    match index.and_then(|i| FILES.get(i)) {
        None => 0o755,
        Some((_, CtlFile::Status)) => 0o444,
        Some(_) => 0o644,
    }
}

/// Everything fixed at mount time.
#[derive(Debug)]
pub struct FsConfig {
    pub io: IoMode,
    pub ctl_name: String,
    pub xattr: bool,
    /// The user who mounted: besides root, the only one allowed to write
    /// control files.
    pub owner_uid: u32,
    pub owner_gid: u32,
    pub max_write: u32,
    pub max_background: u16,
    /// Absolute path of the mountpoint: control commands reach the FUSE
    /// inodes' page caches through files of the mount.
    pub mountpoint: std::path::PathBuf,
    /// Data path of `--device` entries (cached or relay).
    pub device_io: DataPath,
    /// Ask FUSE_INIT for the writeback cache: the mount serves devices only
    /// (`--writeback`, decided at start).
    pub writeback: bool,
}

/// The mount's one record: its configuration, the image registry, the
/// settings, the backing root, the device entries, and what the control
/// plane needs to run commands (the attribute invalidator, the arrival
/// order, the workers). The filesystem reaches all of it through its
/// `ctl`; a command job holds an `Arc` of it.
pub struct ControlPlane {
    pub config: FsConfig,
    pub registry: Arc<Registry>,
    pub settings: Arc<Settings>,
    pub invalidator: Arc<AttrInvalidator>,
    /// `--device` entries by name, in command-line order.
    pub devices: Vec<(String, Arc<Image>)>,
    /// The backing directory's O_PATH root, beneath which paths resolve.
    pub root_fd: Arc<OwnedFd>,
    /// Set once the kernel answered FUSE_INIT.
    pub passthrough_supported: AtomicBool,
    pub passthrough_active: AtomicBool,
    /// The connection has the writeback cache (agreed at FUSE_INIT):
    /// buffered writes of device entries stay in the FUSE inode's cache
    /// until written back, and no regular file of the backing directory is
    /// created or opened.
    pub writeback_active: AtomicBool,
    /// Command requests in arrival order: each takes its tickets for its
    /// images' command queues in this order (a request still resolving its
    /// paths after `arrivals::RESOLVE_BOUND` is passed), so commands on one
    /// image run in the order their requests arrived. A request's number,
    /// logged at arrival, says which of two requests reached the daemon
    /// first.
    pub arrivals: arrivals::Arrivals,
    /// Held while a request takes its arrival ticket and joins the command
    /// lane, so the lane's order is the tickets' order.
    pub arrival_order: Mutex<()>,
    pub workers: workers::Workers,
    /// Answers of earlier /proc passes for writers outside the mount,
    /// kept until another process opens an image's backing.
    pub writer_cache: Arc<crate::cache::WriterCache>,
}

/// Per-open state: the text a read returns (the result lines of the
/// commands written on this open file since it was last read, or the
/// status snapshot taken at open) and a read cursor of its own. The
/// kernel's file position has moved past the bytes the script wrote, yet
/// `echo x >&3; cat <&3` must read the result from its start: so the first
/// write after a read starts a new text at cursor 0, reads advance the
/// cursor, and an explicit read at offset 0 (a rewind) restarts it.
/// Results of writes with no read between them accumulate: the kernel
/// splits a large `writev` at segment ends into several writes, each run
/// as a request, and the script must read every line's result.
#[derive(Debug)]
pub struct CtlHandle {
    file: CtlFile,
    text: Mutex<Vec<u8>>,
    cursor: Mutex<usize>,
    /// The text has been read since the last write: the next write's
    /// results replace it.
    answered: AtomicBool,
}

impl ControlPlane {
    /// Only root, or the user who mounted, may change anything: with
    /// `allow_other` every user reaches these files.
    pub fn check_writer(&self, uid: u32) -> Result<(), Error> {
        if uid == 0 || uid == self.config.owner_uid {
            Ok(())
        } else {
            Err(Error::Refused(libc::EACCES))
        }
    }

    /// Opens control file `index` with open(2) `flags` for user `uid`;
    /// `done` gets the handle. `status` is built at open, on a status
    /// worker (`workers`: bounded, root's and the mounting user's opens
    /// first, EAGAIN for another user over its bound): it measures the FUSE
    /// inode's cache of cached images through a file of this mount, which a
    /// request handler must never open (the open is a request to this
    /// daemon).
    pub fn open(
        self: &Arc<Self>,
        index: usize,
        flags: i32,
        uid: u32,
        done: impl FnOnce(Result<CtlHandle, Error>) + Send + 'static,
    ) {
        let Some((_, file)) = FILES.get(index) else {
            return done(Err(Error::Refused(libc::ENOENT)));
        };
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            if let Err(e) = self.check_writer(uid) {
                return done(Err(e));
            }
            if *file == CtlFile::Status {
                return done(Err(Error::Refused(libc::EACCES)));
            }
        }
        let handle = |text: Vec<u8>| CtlHandle {
            file: *file,
            text: Mutex::new(text),
            cursor: Mutex::new(0),
            answered: AtomicBool::new(false),
        };
        if *file != CtlFile::Status {
            return done(Ok(handle(Vec::new())));
        }
        let class = if self.check_writer(uid).is_ok() {
            workers::Class::Owner
        } else {
            workers::Class::Other(uid)
        };
        let plane = self.clone();
        self.workers.status(class, done, move |done| {
            let mut s =
                serde_json::to_string_pretty(&commands::status_json(&plane)).unwrap_or_default();
            s.push('\n');
            done(Ok(handle(s.into_bytes())));
        });
    }

    pub fn read(&self, h: &CtlHandle, offset: u64, size: u32) -> Vec<u8> {
        let text = match h.file {
            CtlFile::Setting(key) => format!("{}\n", self.settings.get(key)).into_bytes(),
            _ => h.text.lock().expect("ctl text lock").clone(),
        };
        h.answered.store(true, Ordering::Relaxed);
        let mut cursor = h.cursor.lock().expect("ctl cursor lock");
        if offset == 0 {
            *cursor = 0;
        }
        let start = (*cursor).min(text.len());
        let end = (start + size as usize).min(text.len());
        *cursor = end;
        text[start..end].to_vec()
    }

    /// A write to a control file by `uid`. `done` gets the byte count or
    /// the errno; for commands it is called from a worker thread once the
    /// command has finished, so a slow sync never stalls the event loop.
    /// The command's result lines are added to the open file's text (see
    /// [`CtlHandle`]).
    pub fn write(
        self: &Arc<Self>,
        h: Arc<CtlHandle>,
        uid: u32,
        data: &[u8],
        done: impl FnOnce(Result<u32, Error>) + Send + 'static,
    ) {
        if let Err(e) = self.check_writer(uid) {
            return done(Err(e));
        }
        let len = data.len() as u32;
        match h.file {
            CtlFile::Status => done(Err(Error::Refused(libc::EACCES))),
            CtlFile::Setting(key) => {
                let word = String::from_utf8_lossy(data);
                match self
                    .settings
                    .set(key, word.trim_end_matches(['\n', '\r', ' ', '\t']))
                {
                    Ok(()) => {
                        log::info!("setting {} = {}", key.name(), self.settings.get(key));
                        done(Ok(len))
                    }
                    Err(msg) => {
                        log::warn!("setting {}: {msg}", key.name());
                        done(Err(Error::Refused(libc::EINVAL)))
                    }
                }
            }
            CtlFile::Command(cmd) => {
                let _order = self.arrival_order.lock().expect("arrival lock");
                let ticket = self.arrivals.take();
                log::info!(
                    "{} request #{} received from uid {uid}: {} bytes",
                    cmd.name(),
                    ticket.number() + 1,
                    data.len()
                );
                let job = commands::Job::new(self, cmd, data);
                self.workers.command(done, move |done| {
                    job.run(ticket, move |errno, text| {
                        let mut all = h.text.lock().expect("ctl text lock");
                        let mut cursor = h.cursor.lock().expect("ctl cursor lock");
                        if h.answered.swap(false, Ordering::Relaxed) {
                            all.clear();
                            *cursor = 0;
                        }
                        all.extend_from_slice(text.as_bytes());
                        drop((all, cursor));
                        done(match errno {
                            None => Ok(len),
                            Some(e) => Err(Error::Refused(e)),
                        });
                    })
                });
            }
        }
    }
}
