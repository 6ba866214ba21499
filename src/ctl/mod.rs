//! The control directory (DESIGN §3): virtual files at `MOUNT/.ctl/` through
//! which scripts drive migrations. A command's write() returns when the
//! command has finished, with its errno; the result lines can be read back
//! on the same open file.

pub mod commands;
pub mod request;

use std::ffi::{OsStr, OsString};
use std::sync::{Arc, Mutex};

use fuser::{Errno, FileHandle, FileType, FopenFlags, ReplyData, ReplyOpen, ReplyWrite, Request};

use crate::fs::MigsafeFs;
use crate::fs::inodes::{CTL_DIR, CTL_FIRST};
use crate::settings::Key;
use commands::Command;

/// What a control file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtlFile {
    Command(Command),
    Setting(Key),
    Status,
}

/// The files of the control directory, in node-id order.
pub const FILES: [(&str, CtlFile); 12] = [
    ("activate", CtlFile::Command(Command::Activate)),
    ("inactivate", CtlFile::Command(Command::Inactivate)),
    ("invalidate", CtlFile::Command(Command::Invalidate)),
    ("flush", CtlFile::Command(Command::Flush)),
    ("check", CtlFile::Command(Command::Check)),
    (
        "check-cache-dropped",
        CtlFile::Setting(Key::CheckCacheDropped),
    ),
    ("drop-cache", CtlFile::Setting(Key::DropCache)),
    ("fsync-on-close", CtlFile::Setting(Key::FsyncOnClose)),
    (
        "invalidate-on-open",
        CtlFile::Setting(Key::InvalidateOnOpen),
    ),
    ("sync", CtlFile::Setting(Key::Sync)),
    ("inactive-writes", CtlFile::Setting(Key::InactiveWrites)),
    ("status", CtlFile::Status),
];

fn file_of(nodeid: u64) -> Option<CtlFile> {
    nodeid
        .checked_sub(CTL_FIRST)
        .and_then(|i| FILES.get(i as usize))
        .map(|(_, f)| *f)
}

pub fn lookup(name: &OsStr) -> Option<u64> {
    FILES
        .iter()
        .position(|(n, _)| OsStr::new(n) == name)
        .map(|i| CTL_FIRST + i as u64)
}

pub fn dir_entries() -> Vec<(u64, FileType, OsString)> {
    let mut v = vec![
        (CTL_DIR, FileType::Directory, OsString::from(".")),
        (
            fuser::INodeNo::ROOT.0,
            FileType::Directory,
            OsString::from(".."),
        ),
    ];
    v.extend(FILES.iter().enumerate().map(|(i, (n, _))| {
        (
            CTL_FIRST + i as u64,
            FileType::RegularFile,
            OsString::from(n),
        )
    }));
    v
}

/// Mode bits shown for control nodes. Informational only: who may write is
/// decided by `check_writer`, whatever the bits say.
pub fn file_mode(nodeid: u64) -> u16 {
    match file_of(nodeid) {
        None => 0o755,
        Some(CtlFile::Status) => 0o444,
        Some(_) => 0o644,
    }
}

/// Per-open state: the text a read returns (the last command's result
/// lines, or the status snapshot taken at open) and a read cursor of its
/// own. The kernel's file position has moved past the bytes the script
/// wrote, yet `echo x >&3; cat <&3` must read the result from its start:
/// so a write resets the cursor, reads advance it, and an explicit read at
/// offset 0 (a rewind) restarts it.
#[derive(Debug)]
pub struct CtlHandle {
    file: CtlFile,
    text: Mutex<Vec<u8>>,
    cursor: Mutex<usize>,
}

/// Only root, or the user who mounted, may change anything: with
/// `allow_other` every user reaches these files.
pub fn check_writer(fs: &MigsafeFs, req: &Request) -> Result<(), Errno> {
    if req.uid() == 0 || req.uid() == fs.config.owner_uid {
        Ok(())
    } else {
        Err(Errno::EACCES)
    }
}

pub fn open(fs: &MigsafeFs, req: &Request, nodeid: u64, flags: i32, reply: ReplyOpen) {
    let Some(file) = file_of(nodeid) else {
        return reply.error(Errno::EISDIR);
    };
    if flags & libc::O_ACCMODE != libc::O_RDONLY {
        if let Err(e) = check_writer(fs, req) {
            return reply.error(e);
        }
        if file == CtlFile::Status {
            return reply.error(Errno::EACCES);
        }
    }
    let text = match file {
        CtlFile::Status => {
            let mut s =
                serde_json::to_string_pretty(&commands::status_json(fs)).unwrap_or_default();
            s.push('\n');
            s.into_bytes()
        }
        _ => Vec::new(),
    };
    let fh = fs.add_handle(crate::fs::Open::Ctl(Arc::new(CtlHandle {
        file,
        text: Mutex::new(text),
        cursor: Mutex::new(0),
    })));
    // Direct I/O: every read reaches the daemon, the size (0) is irrelevant.
    reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
}

pub fn read(fs: &MigsafeFs, fh: FileHandle, offset: u64, size: u32, reply: ReplyData) {
    let Some(h) = fs.ctl_handle(fh) else {
        return reply.error(Errno::EBADF);
    };
    let text = match h.file {
        CtlFile::Setting(key) => format!("{}\n", fs.settings.get(key)).into_bytes(),
        _ => h.text.lock().expect("ctl text lock").clone(),
    };
    let mut cursor = h.cursor.lock().expect("ctl cursor lock");
    if offset == 0 {
        *cursor = 0;
    }
    let start = (*cursor).min(text.len());
    let end = (start + size as usize).min(text.len());
    *cursor = end;
    reply.data(&text[start..end]);
}

pub fn write(
    fs: &MigsafeFs,
    req: &Request,
    _nodeid: u64,
    fh: FileHandle,
    data: &[u8],
    reply: ReplyWrite,
) {
    if let Err(e) = check_writer(fs, req) {
        return reply.error(e);
    }
    let Some(h) = fs.ctl_handle(fh) else {
        return reply.error(Errno::EBADF);
    };
    let len = data.len() as u32;
    match h.file {
        CtlFile::Status => reply.error(Errno::EACCES),
        CtlFile::Setting(key) => {
            let word = String::from_utf8_lossy(data);
            match fs
                .settings
                .set(key, word.trim_end_matches(['\n', '\r', ' ', '\t']))
            {
                Ok(()) => {
                    log::info!("setting {} = {}", key.name(), fs.settings.get(key));
                    reply.written(len)
                }
                Err(msg) => {
                    log::warn!("setting {}: {msg}", key.name());
                    reply.error(Errno::EINVAL)
                }
            }
        }
        CtlFile::Command(cmd) => {
            // Commands sync and scan page caches: run them off the event
            // loop so a slow fsync never stalls other I/O of the mount.
            let job = commands::Job::new(fs, cmd, data);
            // The reply stays reachable here if the thread cannot start
            // (out of threads or memory): the caller then gets EAGAIN
            // instead of a daemon that panics.
            let slot = Arc::new(Mutex::new(Some(reply)));
            let worker_slot = slot.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("migsafe-{}", cmd.name()))
                .spawn(move || {
                    let (errno, text) = job.run();
                    *h.text.lock().expect("ctl text lock") = text.into_bytes();
                    *h.cursor.lock().expect("ctl cursor lock") = 0;
                    if let Some(reply) = worker_slot.lock().expect("reply lock").take() {
                        match errno {
                            None => reply.written(len),
                            Some(e) => reply.error(Errno::from_i32(e)),
                        }
                    }
                });
            if let Err(e) = spawned {
                log::warn!("{}: cannot start a worker thread: {e}", cmd.name());
                if let Some(reply) = slot.lock().expect("reply lock").take() {
                    reply.error(Errno::EAGAIN);
                }
            }
        }
    }
}
