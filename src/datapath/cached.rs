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

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Condvar, Mutex};

use crate::sys::AlignedBuf;

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

fn align_down(v: u64, block: u64) -> u64 {
    v - v % block
}

fn align_up(v: u64, block: u64) -> u64 {
    v.div_ceil(block) * block
}

/// Reads `[start, end)` (block aligned) into `buf`; bytes past the end of
/// the backing read as zero. Returns how many bytes the backing had.
fn read_blocks(file: &File, start: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0usize;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], start + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        if !done.is_multiple_of(512) {
            // A short O_DIRECT read ends at the end of the backing.
            break;
        }
    }
    buf[done..].fill(0);
    Ok(done)
}

/// Reads up to `size` bytes at `offset` from an O_DIRECT backing fd;
/// `reply` gets the bytes (short at the end of the backing).
pub fn read<R>(
    file: &File,
    block: u64,
    offset: u64,
    size: usize,
    reply: impl FnOnce(io::Result<&[u8]>) -> R,
) -> R {
    let start = align_down(offset, block);
    let end = align_up(offset + size as u64, block);
    BOUNCE.with(|cell| {
        let mut buf = cell.borrow_mut();
        let buf = buf.get((end - start) as usize);
        match read_blocks(file, start, buf) {
            Ok(have) => {
                let skip = (offset - start) as usize;
                let avail = have.saturating_sub(skip).min(size);
                reply(Ok(&buf[skip..skip + avail]))
            }
            Err(e) => reply(Err(e)),
        }
    })
}

/// Writes `data` at `offset` through an O_DIRECT backing fd of `size`
/// bytes (a device: writes never extend it; the caller bounds them).
pub fn write(
    file: &File,
    block: u64,
    locks: &RangeLock,
    offset: u64,
    data: &[u8],
) -> io::Result<usize> {
    if data.is_empty() {
        return Ok(0);
    }
    let end_byte = offset + data.len() as u64;
    let start = align_down(offset, block);
    let end = align_up(end_byte, block);
    let _range = locks.lock(start, end);
    BOUNCE.with(|cell| {
        let mut buf = cell.borrow_mut();
        let buf = buf.get((end - start) as usize);
        let head = (offset - start) as usize;
        if head != 0 {
            read_blocks(file, start, &mut buf[..block as usize])?;
        }
        if end_byte != end && (end - block >= start + block || head == 0) {
            let last = (end - block - start) as usize;
            read_blocks(file, end - block, &mut buf[last..])?;
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
        // What the caller asked for that made it to the backing.
        Ok((done.saturating_sub(head)).min(data.len()))
    })
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
