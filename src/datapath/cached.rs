//! The cached data path: the kernel keeps the image's pages in the FUSE
//! inode's page cache and serves hits itself; misses and writes reach the
//! daemon, which reads and writes the backing with O_DIRECT, so the backing
//! (the block device, or the regular file's filesystem) caches nothing of
//! the image. One cache on the host,
//! the FUSE inode's, is the one the handover drops and verifies.
//!
//! O_DIRECT needs offsets, lengths and memory aligned to the backing's
//! O_DIRECT alignment (`STATX_DIOALIGN`, else the logical block size:
//! `sys::dio_block`), but the kernel sends writes as the caller made them
//! (write-through, no FUSE writeback cache) and O_DIRECT callers' reads as
//! they came. Unaligned requests are served through an aligned bounce
//! buffer; on a device, a write that covers a block only partly reads that
//! block, patches it and writes it back (a device takes whole blocks only),
//! and holds the byte range locked meanwhile, so a concurrent write of this
//! daemon to the same block is never lost.
//!
//! Regular files (`--io cached`) also grow and shrink, and their storage
//! may be shared with other hosts (NFS, two mounts of one directory) whose
//! writes and truncates land between any two syscalls of this daemon. So a
//! regular file's write never rewrites bytes it was not asked to write: its
//! whole blocks go by O_DIRECT, and the bytes in blocks (pages) it covers
//! only partly (the head and tail of an unaligned write, the tail at end of
//! file) are written exactly, with `pwrite` on a second, buffered fd of the
//! same file ("edges" fd), whose pages are then written out and dropped
//! before the write returns. No read-modify-write (which would write back another
//! host's bytes of the block as read before), no padded block past end of
//! file and no cut-back `ftruncate` (which would undo another host's
//! truncate or write past the old end, and which a crash would skip, leaving
//! the padding): the file only ever holds bytes somebody wrote, and has the
//! length they made it.
//!
//! A write that grows the file runs alone: it holds the image's size lock
//! exclusively (as truncate and fallocate do), while reads, attribute reads
//! and writes inside the file hold it shared and run in parallel, so nobody
//! going through this mount sees the file between the pieces of a growing
//! write.

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

/// An image's locks for the cached path, within this daemon only (another
/// host's writes and truncates take none of them, which is why nothing here
/// depends on them for what lands on storage): the blocks of writes in
/// progress, and the size lock (see the module comment).
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
    /// (truncate, fallocate, writes that end past end of file), and by
    /// fallocate of a device (a block punched or zeroed between the read
    /// and the write of a read-modify-write would be undone).
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
/// With `edges` (a writable handle of a regular file) it also opens the
/// file's buffered write-only "edges" fd (see the module comment), returned
/// beside the O_DIRECT one.
///
/// A write-only fd is reopened read-write by the daemon: a write that
/// covers a block of a device only partly must read it first. The caller's
/// write access was checked by its own open, and no read reaches the daemon
/// through a write-only handle.
pub fn prepare(
    file: File,
    flags: i32,
    whole_blocks: impl FnOnce(u64) -> Result<(), String>,
    edges: bool,
) -> Result<(File, Option<File>), (File, io::Error)> {
    let block = sys::dio_block(file.as_fd());
    if let Err(why) = whole_blocks(block) {
        return Err((file, io::Error::other(why)));
    }
    // Write-only: a partial-page write through it never makes an NFS
    // client read the rest of the page (it sends the bytes written).
    let edges = if edges {
        let eflags = (flags & !(libc::O_ACCMODE | libc::O_DIRECT)) | libc::O_WRONLY;
        match sys::reopen(file.as_fd(), eflags) {
            Ok(f) => Some(f),
            Err(e) => {
                let e = io::Error::new(
                    e.kind(),
                    format!("cannot open the buffered fd for partial blocks: {e}"),
                );
                return Err((file, e));
            }
        }
    } else {
        None
    };
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
    Ok((file, edges))
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
/// size lock is held shared for the read, so it never sees a growing write
/// half done (the reply is sent after it is released). Pages a write left
/// in the backing's cache cannot make it read old bytes: the kernel writes
/// a range's dirty pages back before an O_DIRECT read of it.
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
/// their range locked (devices only: a regular file's write never rewrites
/// bytes it was not given, see the module comment). Returns what the caller
/// asked for that made it to the backing.
fn write_blocks(
    file: &File,
    block: u64,
    ranges: &RangeLock,
    offset: u64,
    data: &[u8],
) -> io::Result<usize> {
    let end_byte = offset + data.len() as u64;
    let start = align_down(offset, block);
    let end = align_up(end_byte, block);
    let _range = ranges.lock(start, end);
    BOUNCE.with(|cell| {
        let mut buf = cell.borrow_mut();
        let buf = buf.get((end - start) as usize);
        let head = (offset - start) as usize;
        if head != 0 {
            read_blocks(file, block, start, &mut buf[..block as usize])?;
        }
        if end_byte != end && (end - block >= start + block || head == 0) {
            read_blocks(
                file,
                block,
                end - block,
                &mut buf[(end - block - start) as usize..],
            )?;
        }
        buf[head..head + data.len()].copy_from_slice(data);
        let mut done = 0usize;
        while done < buf.len() {
            match file.write_at(&buf[done..], start + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(done.saturating_sub(head).min(data.len()))
    })
}

/// Writes all of `buf` at `offset`, retrying short writes; returns how much
/// was written, short only where the backing stopped taking bytes. An
/// error after some progress is returned as the progress.
fn write_all_at(file: &File, offset: u64, buf: &[u8]) -> io::Result<usize> {
    let mut done = 0usize;
    while done < buf.len() {
        match file.write_at(&buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if done == 0 => return Err(e),
            Err(_) => break,
        }
    }
    Ok(done)
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
    write_blocks(file, block, &locks.ranges, offset, data)
}

/// Writes `data` at `offset` to a regular file: the whole blocks (and
/// pages) it covers through the O_DIRECT fd `file`, the bytes of blocks or
/// pages it covers only partly exactly as given through the buffered
/// `edges` fd (`None` for a read-only handle: `EBADF`, as the O_DIRECT fd
/// would say). The pieces go in file order, so the file grows through true
/// lengths only (a crash between them leaves a shorter write, never bytes
/// nobody wrote). A write that grows the file holds the size lock
/// exclusively; the blocks (pages) it touches are locked against this
/// daemon's other writes of them, so two overlapping writes end as one or
/// the other, never a mix of their pieces.
pub fn write_file(
    file: &File,
    edges: Option<&File>,
    block: u64,
    locks: &Locks,
    offset: u64,
    data: &[u8],
) -> io::Result<usize> {
    if data.is_empty() {
        return Ok(0);
    }
    let edges = edges.ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))?;
    let end = offset + data.len() as u64;
    let mut _inside = Some(locks.shared());
    let mut _growing = None;
    let mut old = file.metadata()?.len();
    if end > old {
        _inside = None;
        _growing = Some(locks.resize());
        old = file.metadata()?.len();
    }
    // The buffered pieces cover whole pages where they can: a partial page
    // costs the filesystem a read and a write of the whole page anyway, so
    // an O_DIRECT write of another part of it would be one I/O more.
    let unit = block.max(sys::page_size() as u64);
    let _range = locks
        .ranges
        .lock(align_down(offset, unit), align_up(end, unit));
    // [offset, first): head; [first, last): whole units; [last, end): tail.
    let first = align_up(offset, unit).min(end);
    let last = align_down(end, unit).max(first);
    let piece = |at: u64, to: u64| &data[(at - offset) as usize..(to - offset) as usize];
    let mut done = 0usize;
    let mut exact = false;
    let res = (|| -> io::Result<()> {
        if first == last {
            // No whole page: one exact write of it all.
            exact = true;
            done = write_all_at(edges, offset, data)?;
            return Ok(());
        }
        if first > offset {
            exact = true;
            done = write_all_at(edges, offset, piece(offset, first))?;
            if offset + (done as u64) < first {
                return Ok(());
            }
        }
        let whole = piece(first, last);
        let n = BOUNCE.with(|cell| {
            let mut buf = cell.borrow_mut();
            let buf = buf.get(whole.len());
            buf.copy_from_slice(whole);
            write_all_at(file, first, buf)
        })?;
        done += n;
        if n < whole.len() || last == end {
            return Ok(());
        }
        exact = true;
        done += write_all_at(edges, last, piece(last, end))?;
        Ok(())
    })();
    if exact {
        // From the old end of file on: a write past it makes the
        // filesystem zero the rest of the old last block, in the cache.
        settle(edges, offset.min(old), end)?;
    }
    match res {
        Err(_) if done > 0 => Ok(done),
        Err(e) => Err(e),
        Ok(()) => Ok(done),
    }
}

/// After exact writes through the buffered edges fd: the range's pages
/// written out (a writeback error fails the write, as it would have failed
/// an O_DIRECT write) and dropped, so the backing's own cache holds nothing
/// of the image when the write returns.
fn settle(edges: &File, from: u64, to: u64) -> io::Result<()> {
    let fd = edges.as_fd();
    sys::write_out_range(fd, from, to - from)?;
    // DONTNEED drops only whole pages inside its range: round out.
    let page = sys::page_size() as u64;
    let lo = align_down(from, page);
    let hi = align_up(to, page);
    if let Err(e) = sys::fadvise_dontneed_range(fd, lo, hi - lo) {
        log::warn!("cannot drop the backing's pages at {lo}..{hi} after a write: {e}");
    }
    Ok(())
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

    /// Regular-file writes of every shape (inside one block, head + whole
    /// blocks + tail, aligned, past end of file after a hole, overwrites
    /// across the end) leave exactly the model's bytes and length, and the
    /// backing's page cache empty, after each write.
    #[test]
    fn file_writes_are_exact_and_leave_no_backing_pages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.img");
        let open = || {
            File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .unwrap()
        };
        let (file, edges) = match prepare(open(), libc::O_RDWR, |_| Ok(()), true) {
            Ok(p) => p,
            Err((_, e)) => {
                eprintln!("SKIPPED: no O_DIRECT in {}: {e}", dir.path().display());
                return;
            }
        };
        let edges = edges.expect("edges fd");
        let block = sys::dio_block(file.as_fd());
        let locks = Locks::default();
        let mut model: Vec<u8> = Vec::new();
        let b = block as usize;
        let writes = [
            (0, 100),
            (100, 1),
            (1000, 3 * b + 17),
            (5 * b, 2 * b),
            (9 * b + 300, 50),
            (2 * b - 10, 20),
            (11 * b - 7, b + 14),
            (3, 12 * b),
        ];
        for (i, &(offset, len)) in writes.iter().enumerate() {
            let data: Vec<u8> = (0..len).map(|j| (i * 31 + j * 7) as u8 | 1).collect();
            let n = write_file(&file, Some(&edges), block, &locks, offset as u64, &data).unwrap();
            assert_eq!(n, len, "write {i}: short");
            if model.len() < offset + len {
                model.resize(offset + len, 0);
            }
            model[offset..offset + len].copy_from_slice(&data);
            if let Ok(c) = sys::cachestat(file.as_fd()) {
                assert_eq!(c.cached, 0, "write {i}: pages left in the backing's cache");
            }
            let got = std::fs::read(&path).unwrap();
            assert_eq!(got.len(), model.len(), "write {i}: length");
            assert!(got == model, "write {i} ({len} at {offset}): bytes differ");
            // This test's own read filled the cache: empty it again.
            sys::fadvise_dontneed(open().as_fd()).unwrap();
        }
        let ro = write_file(&file, None, block, &locks, 0, b"x").unwrap_err();
        assert_eq!(ro.raw_os_error(), Some(libc::EBADF));
    }

    #[test]
    fn alignment_helpers() {
        assert_eq!(align_down(1000, 512), 512);
        assert_eq!(align_up(1000, 512), 1024);
        assert_eq!(align_up(1024, 512), 1024);
    }
}
