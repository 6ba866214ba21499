//! Keeping a bed's pages in the page cache while a negative control (or
//! a precondition that counts them) needs them.
//!
//! A negative control reads the destination's cached copy of a block after
//! the source rewrote it, and must see the old bytes. The kernel may reclaim
//! clean unmapped file pages at any time, and proactive reclaim does so by
//! physical region (DAMON `pageout` of "cold" regions takes pages read a
//! moment ago when they landed in a region idle for a minute): seen in CI as
//! 25 of 256 pages of a block read fresh from the device ("946176 x 'A'
//! (old), 102400 x 'B' (new)"). A shared mapping of the range with the pages
//! touched and locked keeps them: mlocked pages are never reclaimed, and
//! reclaim that skips mapped pages skips them too. Drop the pin before the
//! handover step under test: a mapped page is what `POSIX_FADV_DONTNEED` and
//! the residency check are meant to report, not what the bed should leave.

use std::fs::File;
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::path::Path;
use std::ptr::NonNull;

use nix::sys::mman::{MapFlags, ProtFlags, mlock, mmap, munmap};

pub struct PinnedPages {
    addr: NonNull<std::ffi::c_void>,
    len: usize,
}

/// Maps `[offset, offset + len)` of `path` (page-aligned) read-only and
/// shared, touches every page (a page not cached yet is read now) and locks
/// the mapping.
pub fn pin_cached(path: &Path, offset: u64, len: usize) -> PinnedPages {
    let page = 4096usize;
    assert!(
        offset.is_multiple_of(page as u64) && len.is_multiple_of(page) && len > 0,
        "pin_cached: offset and len must be whole pages"
    );
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: a fresh read-only shared mapping the kernel places; it is only
    // read through volatile loads below and unmapped in Drop.
    let addr = unsafe {
        mmap(
            None,
            NonZeroUsize::new(len).unwrap(),
            ProtFlags::PROT_READ,
            MapFlags::MAP_SHARED,
            f.as_fd(),
            offset as i64,
        )
    }
    .unwrap_or_else(|e| panic!("mmap {}: {e}", path.display()));
    let pin = PinnedPages { addr, len };
    for i in (0..len).step_by(page) {
        // SAFETY: inside the mapping made above.
        unsafe { std::ptr::read_volatile((addr.as_ptr() as *const u8).add(i)) };
    }
    // SAFETY: the range is the mapping made above.
    if let Err(e) = unsafe { mlock(addr, len) } {
        panic!("mlock of {} bytes of {}: {e}", len, path.display());
    }
    pin
}

impl Drop for PinnedPages {
    fn drop(&mut self) {
        // SAFETY: the mapping made in pin_cached, unmapped once.
        let _ = unsafe { munmap(self.addr, self.len) };
    }
}
