//! The data paths of docs/DESIGN.md §2 (the cached one, for devices and
//! for regular files with `--io cached`, in `cached.rs`).
//!
//! passthrough: the kernel reads and writes the backing file itself; the
//! daemon only registers one backing file per inode (shared by all handles,
//! released with the last one).
//!
//! relay: the daemon serves each request with pread/pwrite on a buffered (or,
//! for O_DIRECT openers, O_DIRECT) backing fd, while the FUSE side is opened
//! FOPEN_DIRECT_IO so reads and writes leave nothing in the FUSE inode: the
//! page cache is the backing's, the one migration control manages. Only a
//! mapping of the image fills the FUSE inode's pages (direct-io mmap), and
//! the handover drops those too (`DataPath::fuse_pages`).

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use crate::session::BackingId;

use crate::sys::AlignedBuf;

pub mod cached;

/// `--io`: which data path regular files use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoMode {
    Auto,
    Passthrough,
    Relay,
    /// The FUSE inode's page cache, O_DIRECT on the backing (as devices).
    Cached,
}

impl IoMode {
    /// Every mode, in the order help and errors list them: the one home of
    /// the `--io` words (the command line, `-o io=`, `status`).
    pub const ALL: [IoMode; 4] = [
        IoMode::Auto,
        IoMode::Passthrough,
        IoMode::Relay,
        IoMode::Cached,
    ];

    /// The mode called `word`.
    pub fn from_name(word: &str) -> Option<IoMode> {
        IoMode::ALL.into_iter().find(|m| m.name() == word)
    }

    pub fn name(self) -> &'static str {
        match self {
            IoMode::Auto => "auto",
            IoMode::Passthrough => "passthrough",
            IoMode::Relay => "relay",
            IoMode::Cached => "cached",
        }
    }
}

/// `--writeback`: whether buffered writes to device entries stay in the
/// FUSE inode's page cache and reach the device later (the kernel's FUSE
/// writeback cache), or go through to the device before the write returns.
/// The kernel negotiates it per connection and then trusts its own size
/// and times of every regular file, so it is for mounts that serve devices
/// only (DESIGN §2 "Write-back devices").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writeback {
    /// On when the mount serves devices only: at least one `--device`, all
    /// on the cached path, and an empty backing directory.
    Auto,
    /// On, and the start fails where it cannot be.
    On,
    Off,
}

impl Writeback {
    /// The one home of the `--writeback` words, the default first. Off by
    /// default: a write-back mount answers `inactivate` with EBUSY while a
    /// writer still writes (write-through fences it), and refuses regular
    /// files (DESIGN §2 "Write-back devices").
    pub const ALL: [Writeback; 3] = [Writeback::Off, Writeback::Auto, Writeback::On];

    pub fn from_name(word: &str) -> Option<Writeback> {
        Writeback::ALL.into_iter().find(|m| m.name() == word)
    }

    pub fn name(self) -> &'static str {
        match self {
            Writeback::Auto => "auto",
            Writeback::On => "on",
            Writeback::Off => "off",
        }
    }
}

/// Which data path serves an open handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPath {
    Passthrough,
    Relay,
    /// The FUSE inode's page cache, O_DIRECT on the backing.
    Cached,
}

impl DataPath {
    /// Every data path, as handles and `status` name them.
    pub const ALL: [DataPath; 3] = [DataPath::Passthrough, DataPath::Relay, DataPath::Cached];

    /// The data paths a `--device` entry may use (`--device-io`,
    /// `-o device-io=`), the default first: the kernel refuses a block
    /// device as passthrough backing.
    pub const DEVICE: [DataPath; 2] = [DataPath::Cached, DataPath::Relay];

    /// The data path called `word`.
    pub fn from_name(word: &str) -> Option<DataPath> {
        DataPath::ALL.into_iter().find(|p| p.name() == word)
    }

    /// The device data path called `word`.
    pub fn device_from_name(word: &str) -> Option<DataPath> {
        DataPath::DEVICE.into_iter().find(|p| p.name() == word)
    }

    pub fn name(self) -> &'static str {
        match self {
            DataPath::Passthrough => "passthrough",
            DataPath::Relay => "relay",
            DataPath::Cached => "cached",
        }
    }

    /// Whether the FUSE inode can hold pages of the image: always for
    /// cached; for relay through mappings (direct-io mmap uses the FUSE
    /// page cache); never for passthrough, whose mappings are the backing's.
    pub fn fuse_pages(self) -> bool {
        self != DataPath::Passthrough
    }
}

/// A backing file registered with the kernel for passthrough. Dropping it
/// closes the kernel's backing id (the session's `BackingId` does the ioctl).
#[derive(Debug)]
pub struct PassthroughBacking {
    pub id: BackingId,
    pub file: Arc<File>,
}

thread_local! {
    /// One buffer per event-loop thread: no allocation per request, and
    /// aligned so O_DIRECT backing fds accept it.
    static BUFFER: RefCell<AlignedBuf> = const { RefCell::new(AlignedBuf::empty()) };
}

/// Reads up to `size` bytes at `offset`, retrying short reads until EOF so a
/// partial pread is never mistaken for end of file by the kernel.
pub fn relay_read<R>(
    file: &File,
    offset: u64,
    size: usize,
    reply: impl FnOnce(io::Result<&[u8]>) -> R,
) -> R {
    BUFFER.with(|cell| {
        let mut buf = cell.borrow_mut();
        let buf = buf.get(size);
        let mut done = 0usize;
        while done < size {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if done == 0 {
                        return reply(Err(e));
                    }
                    break;
                }
            }
        }
        reply(Ok(&buf[..done]))
    })
}

/// Writes `data` at `offset`. For O_DIRECT backing fds the data is copied
/// into an aligned buffer first: FUSE places write data at an arbitrary
/// offset inside its request buffer, and O_DIRECT rejects unaligned memory
/// with EINVAL. Short writes are retried; a write that takes no bytes ends
/// it short, and an error after partial progress reports the progress
/// (POSIX write semantics).
pub fn relay_write(file: &File, offset: u64, data: &[u8], direct: bool) -> io::Result<usize> {
    if direct {
        BUFFER.with(|cell| {
            let mut buf = cell.borrow_mut();
            let buf = buf.get(data.len());
            buf.copy_from_slice(data);
            write_all_at(file, offset, buf)
        })
    } else {
        write_all_at(file, offset, data)
    }
}

fn write_all_at(file: &File, offset: u64, data: &[u8]) -> io::Result<usize> {
    let mut done = 0usize;
    while done < data.len() {
        match file.write_at(&data[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if done == 0 {
                    return Err(e);
                }
                break;
            }
        }
    }
    Ok(done)
}
