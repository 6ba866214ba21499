//! Page-cache syscalls: what of a file (or block device) is cached, dirty or
//! under writeback, writing a range out and dropping clean pages, readahead
//! advice, and the sizes and O_DIRECT alignment a device or file reports.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::check;

/// The kernel's `struct cachestat` (include/uapi/linux/mman.h).
#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
struct RawCachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

/// Page counts of a file's (or block device's) page cache.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageCounts {
    pub cached: u64,
    pub dirty: u64,
    pub writeback: u64,
}

/// cachestat(2) syscall number (same on x86-64 and aarch64); libc does
/// not name it yet.
const SYS_CACHESTAT: libc::c_long = 451;

/// `cachestat(2)` over the whole file (len 0 = to the end).
/// Linux 6.5+; older kernels answer ENOSYS, callers fall back to mincore.
pub fn cachestat(fd: BorrowedFd<'_>) -> io::Result<PageCounts> {
    cachestat_range(fd, 0, 0)
}

/// `cachestat(2)` over the bytes `[off, off + len)` (len 0 = to the end).
/// It counts every folio in the page cache, also one whose read is still in
/// flight (locked, not uptodate), which mincore(2) does not report.
pub fn cachestat_range(fd: BorrowedFd<'_>, off: u64, len: u64) -> io::Result<PageCounts> {
    let range = CachestatRange { off, len };
    let mut out = RawCachestat::default();
    // SAFETY: both pointers reference live, correctly laid-out structs for the
    // duration of the call; flags must be 0.
    let ret = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            fd.as_raw_fd(),
            &range as *const CachestatRange,
            &mut out as *mut RawCachestat,
            0u32,
        )
    };
    check(ret)?;
    Ok(PageCounts {
        cached: out.nr_cache,
        dirty: out.nr_dirty,
        writeback: out.nr_writeback,
    })
}

/// `posix_fadvise(POSIX_FADV_DONTNEED)` over the whole file.
pub fn fadvise_dontneed(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd; no memory is passed.
    let ret = unsafe { libc::posix_fadvise(fd.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(())
}

/// `sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER)` over `[offset,
/// offset + len)`: the dirty pages of the range are written and their
/// writeback has finished when it returns (no metadata, no device cache
/// flush: what an O_DIRECT write gives). A writeback error is returned.
pub fn write_out_range(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: plain syscall on a valid fd; no memory is passed.
    let ret = unsafe { libc::sync_file_range(fd.as_raw_fd(), offset as i64, len as i64, flags) };
    check(ret as libc::c_long).map(|_| ())
}

/// `posix_fadvise(POSIX_FADV_DONTNEED)` over `[offset, offset + len)`; the
/// kernel drops only the clean pages that lie wholly inside the range.
pub fn fadvise_dontneed_range(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd; no memory is passed.
    let ret = unsafe {
        libc::posix_fadvise(
            fd.as_raw_fd(),
            offset as i64,
            len as i64,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(())
}

/// `posix_fadvise(POSIX_FADV_RANDOM)`: reads through this open file read
/// only the pages asked for, no readahead.
pub fn fadvise_random(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd; no memory is passed.
    let ret = unsafe { libc::posix_fadvise(fd.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(())
}

/// Residency of one window of a file, from `mmap(PROT_NONE)` + `mincore(2)`,
/// the method QEMU uses: a PROT_NONE mapping never faults pages in, so looking
/// does not change what is resident.
pub fn mincore_window(fd: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<Vec<bool>> {
    let page = page_size();
    let pages = len.div_ceil(page);
    if pages == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: a fresh PROT_NONE shared mapping chosen by the kernel (addr NULL);
    // it is unmapped before returning and never dereferenced.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_NONE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let mut vec = vec![0u8; pages];
    // SAFETY: addr/len is the mapping created above; vec has one byte per page.
    let ret = unsafe { libc::mincore(addr, len, vec.as_mut_ptr()) };
    let err = io::Error::last_os_error();
    // SAFETY: unmapping exactly the mapping created above.
    unsafe { libc::munmap(addr, len) };
    if ret != 0 {
        return Err(err);
    }
    Ok(vec.into_iter().map(|b| b & 1 == 1).collect())
}

pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 { v as usize } else { 4096 }
}

/// Size of a block device in bytes (`BLKGETSIZE64`).
pub fn blkdev_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is live.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    check(ret as libc::c_long)?;
    Ok(size)
}

/// The logical block size O_DIRECT I/O must be aligned to: BLKSSZGET for a
/// block device, 4096 (every filesystem's page-sized safe choice) otherwise.
pub fn logical_block_size(fd: BorrowedFd<'_>) -> u64 {
    const BLKSSZGET: libc::c_ulong = 0x1268;
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which is live;
    // on a non-device the ioctl fails and nothing is written.
    let ret = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            BLKSSZGET as _,
            &mut size as *mut libc::c_int,
        )
    };
    if ret == 0 && size > 0 {
        size as u64
    } else {
        4096
    }
}

/// What O_DIRECT I/O on a file must be aligned to, as the filesystem reports
/// it with `statx(STATX_DIOALIGN)` (Linux 6.1+): file offsets and lengths to
/// `offset`, memory to `mem`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DioAlign {
    pub offset: u64,
    pub mem: u64,
}

/// `statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN)`. None where the kernel or
/// the filesystem does not report it (NFS, FUSE, older kernels), or reports
/// that O_DIRECT is not supported (zero alignments).
pub fn dio_align(fd: BorrowedFd<'_>) -> Option<DioAlign> {
    // SAFETY: statx holds only integers, for which all-zero bytes are valid.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the empty path is NUL-terminated, stx is a live statx the
    // kernel fills; with AT_EMPTY_PATH the call acts on fd itself.
    let ret = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if ret != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    if stx.stx_dio_offset_align == 0 || stx.stx_dio_mem_align == 0 {
        return None;
    }
    Some(DioAlign {
        offset: stx.stx_dio_offset_align as u64,
        mem: stx.stx_dio_mem_align as u64,
    })
}

/// The offset alignment the cached data path uses for `fd`: the filesystem's
/// `STATX_DIOALIGN` where it reports one, else the logical block size (a
/// device's BLKSSZGET, or 4096).
pub fn dio_block(fd: BorrowedFd<'_>) -> u64 {
    match dio_align(fd) {
        Some(a) if a.offset.is_power_of_two() => a.offset,
        _ => logical_block_size(fd),
    }
}
