//! The cached data path: the kernel keeps the image's pages in the FUSE
//! inode's page cache and serves hits itself; misses and writes reach the
//! daemon, which reads and writes the backing with O_DIRECT, so the backing
//! (the block device) caches nothing of the image. One cache on the host,
//! the FUSE inode's, is the one the handover drops and verifies.
//!
//! O_DIRECT needs offsets, lengths and memory aligned to the device's
//! logical block size, but the kernel sends writes as the caller made them
//! (write-through, no FUSE writeback cache) and O_DIRECT callers' reads as
//! they came. Unaligned requests are served through an aligned bounce
//! buffer; a write that covers a block only partly reads that block, patches
//! it and writes it back, and holds the byte range locked meanwhile, so a
//! concurrent write to the same block is never lost.
//!
//! Regular files (`--io cached`) also grow and shrink. A whole-block
//! O_DIRECT write of a block that ends past end of file makes the file too
//! long, so such a write is cut back to its true size right after it
//! (`ftruncate`), and every operation that changes the size (those writes,
//! truncate, fallocate) runs alone: it holds the image's size lock
//! exclusively, while reads, attribute reads and writes that stay inside the
//! file hold it shared and run in parallel. No reader, `stat` or other write
//! ever sees the padded length in between.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::{Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::sys::{self, AlignedBuf};

thread_local! {
    static BOUNCE: RefCell<AlignedBuf> = const { RefCell::new(AlignedBuf::empty()) };
}

/// Block ranges `[start, end)` being written; writes whose ranges overlap
/// wait for each other, all others run in parallel.
#[derive(Debug, Default)]
pub struct RangeLock {
    busy: Mutex<Vec<(u64, u64)>>,
    freed: Condvar,
}

/// Releases its range on drop.
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    range: (u64, u64),
}

impl RangeLock {
    pub fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        while busy.iter().any(|&(s, e)| s < end && start < e) {
            busy = self.freed.wait(busy).unwrap_or_else(|p| p.into_inner());
        }
        busy.push((start, end));
        RangeGuard {
            lock: self,
            range: (start, end),
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut busy = self.lock.busy.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = busy.iter().position(|r| *r == self.range) {
            busy.swap_remove(i);
        }
        self.lock.freed.notify_all();
    }
}

/// An image's locks for the cached path: the byte ranges of
/// read-modify-writes in progress, and the size lock (see the module
/// comment).
#[derive(Debug, Default)]
pub struct Locks {
    pub ranges: RangeLock,
    size: RwLock<()>,
}

impl Locks {
    /// Held by every operation that must not see the size change under it
    /// (reads, attribute reads, writes inside the file).
    pub fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.size.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Held by every operation that changes the size of a regular file
    /// (truncate, fallocate, writes that end in or past the last block).
    pub fn resize(&self) -> RwLockWriteGuard<'_, ()> {
        self.size.write().unwrap_or_else(|p| p.into_inner())
    }
}

fn align_down(v: u64, block: u64) -> u64 {
    v - v % block
}

fn align_up(v: u64, block: u64) -> u64 {
    v.div_ceil(block) * block
}

/// Makes the caller's backing fd of an image ready for the cached path, or
/// says why it cannot be (then the caller serves the image by relay, with
/// `file` as it was). `flags` are the backing flags it was opened with;
/// `whole_blocks` refuses a `--device` entry that does not end on a block.
///
/// A write-only fd is reopened read-write by the daemon: a write that
/// covers a block only partly must read it first. The caller's write access
/// was checked by its own open, and no read reaches the daemon through a
/// write-only handle.
pub fn prepare(
    file: File,
    flags: i32,
    whole_blocks: impl FnOnce(u64) -> Result<(), String>,
) -> Result<File, (File, io::Error)> {
    let block = sys::dio_block(file.as_fd());
    if let Err(why) = whole_blocks(block) {
        return Err((file, io::Error::other(why)));
    }
    if let Some(a) = sys::dio_align(file.as_fd())
        && a.mem > sys::BUF_ALIGN as u64
    {
        let e = io::Error::other(format!(
            "O_DIRECT needs {}-byte aligned memory, more than the daemon's buffers have",
            a.mem
        ));
        return Err((file, e));
    }
    let file = if flags & libc::O_ACCMODE == libc::O_WRONLY {
        match sys::reopen(file.as_fd(), (flags & !libc::O_ACCMODE) | libc::O_RDWR) {
            Ok(rw) => rw,
            Err(e) => {
                let e = io::Error::new(
                    e.kind(),
                    format!("cannot reopen the write-only backing fd for reading: {e}"),
                );
                return Err((file, e));
            }
        }
    } else {
        file
    };
    if let Err(e) = sys::set_direct(file.as_fd()) {
        return Err((
            file,
            io::Error::new(e.kind(), format!("O_DIRECT refused: {e}")),
        ));
    }
    // fcntl may take O_DIRECT where I/O then refuses it: one aligned read.
    let probe = BOUNCE.with(|cell| {
        let mut buf = cell.borrow_mut();
        let buf = buf.get(block as usize);
        file.read_at(buf, 0).map(|_| ())
    });
    if let Err(e) = probe {
        // Relay then uses this fd as the caller opened it.
        if flags & libc::O_DIRECT == 0
            && let Err(c) = sys::clear_direct(file.as_fd())
        {
            log::warn!("cannot clear O_DIRECT after a failed probe: {c}");
        }
        return Err((
            file,
            io::Error::new(e.kind(), format!("O_DIRECT read failed: {e}")),
        ));
    }
    Ok(file)
}

/// Reads `[start, end)` (block aligned) into `buf`; bytes past the end of
/// the backing read as zero. Returns how many bytes the backing had: a read
/// that ends inside a block is the end of the backing (an O_DIRECT read
/// returns the bytes up to end of file and no more).
fn read_blocks(file: &File, block: u64, start: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0usize;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], start + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        if !(done as u64).is_multiple_of(block) {
            break;
        }
    }
    buf[done..].fill(0);
    Ok(done)
}

/// Reads up to `size` bytes at `offset` from an O_DIRECT backing fd;
/// `reply` gets the bytes, short exactly at the end of the backing. The
/// size lock is held shared for the read, so it never sees a write's padded
/// length (the reply is sent after it is released).
pub fn read<R>(
    file: &File,
    block: u64,
    locks: &Locks,
    offset: u64,
    size: usize,
    reply: impl FnOnce(io::Result<&[u8]>) -> R,
) -> R {
    let start = align_down(offset, block);
    let end = align_up(offset + size as u64, block);
    BOUNCE.with(|cell| {
        let mut buf = cell.borrow_mut();
        let buf = buf.get((end - start) as usize);
        let got = {
            let _size = locks.shared();
            read_blocks(file, block, start, buf)
        };
        match got {
            Ok(have) => {
                let skip = (offset - start) as usize;
                let avail = have.saturating_sub(skip).min(size);
                reply(Ok(&buf[skip..skip + avail]))
            }
            Err(e) => reply(Err(e)),
        }
    })
}

/// The read-modify-write of the blocks `data` at `offset` touches, with
/// their range locked. Returns what the caller asked for that made it to
/// the backing, and where the bytes written to the backing end (past the
/// caller's end when the last block was padded).
fn write_blocks(
    file: &File,
    block: u64,
    ranges: &RangeLock,
    offset: u64,
    data: &[u8],
) -> (io::Result<usize>, u64) {
    let end_byte = offset + data.len() as u64;
    let start = align_down(offset, block);
    let end = align_up(end_byte, block);
    let _range = ranges.lock(start, end);
    BOUNCE.with(|cell| {
        let mut buf = cell.borrow_mut();
        let buf = buf.get((end - start) as usize);
        let head = (offset - start) as usize;
        if head != 0
            && let Err(e) = read_blocks(file, block, start, &mut buf[..block as usize])
        {
            return (Err(e), 0);
        }
        if end_byte != end
            && (end - block >= start + block || head == 0)
            && let Err(e) = read_blocks(
                file,
                block,
                end - block,
                &mut buf[(end - block - start) as usize..],
            )
        {
            return (Err(e), 0);
        }
        buf[head..head + data.len()].copy_from_slice(data);
        let mut done = 0usize;
        while done < buf.len() {
            match file.write_at(&buf[done..], start + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return (Err(e), start + done as u64),
            }
        }
        let written = done.saturating_sub(head).min(data.len());
        (Ok(written), start + done as u64)
    })
}

/// Writes `data` at `offset` through an O_DIRECT backing fd of a device:
/// writes never extend it (the caller bounds them to its size).
pub fn write(
    file: &File,
    block: u64,
    locks: &Locks,
    offset: u64,
    data: &[u8],
) -> io::Result<usize> {
    if data.is_empty() {
        return Ok(0);
    }
    let _size = locks.shared();
    write_blocks(file, block, &locks.ranges, offset, data).0
}

/// Writes `data` at `offset` through an O_DIRECT backing fd of a regular
/// file. A write whose blocks end inside the file runs with the size lock
/// shared; one whose last block reaches past end of file runs alone, and
/// afterwards cuts the file back to `max(old size, end of what was
/// written)`: the padding of its last block must not become file data.
/// A write that fails leaves the old size.
pub fn write_file(
    file: &File,
    block: u64,
    locks: &Locks,
    offset: u64,
    data: &[u8],
) -> io::Result<usize> {
    if data.is_empty() {
        return Ok(0);
    }
    let block_end = align_up(offset + data.len() as u64, block);
    {
        let _size = locks.shared();
        if block_end <= file.metadata()?.len() {
            return write_blocks(file, block, &locks.ranges, offset, data).0;
        }
    }
    let _size = locks.resize();
    let old = file.metadata()?.len();
    let (res, reached) = write_blocks(file, block, &locks.ranges, offset, data);
    let want = match &res {
        Ok(n) => old.max(offset + *n as u64),
        Err(_) => old,
    };
    if reached > want {
        file.set_len(want)?;
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_lock_lets_disjoint_ranges_through_and_holds_overlaps() {
        let l = RangeLock::default();
        let a = l.lock(0, 512);
        let _b = l.lock(512, 1024);
        std::thread::scope(|s| {
            let t = s.spawn(|| {
                let _c = l.lock(256, 768);
            });
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert!(!t.is_finished(), "an overlapping range must wait");
            drop(a);
            drop(_b);
            t.join().unwrap();
        });
    }

    #[test]
    fn alignment_helpers() {
        assert_eq!(align_down(1000, 512), 512);
        assert_eq!(align_up(1000, 512), 1024);
        assert_eq!(align_up(1024, 512), 1024);
    }
}
