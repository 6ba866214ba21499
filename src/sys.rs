//! Thin, safe wrappers over the Linux syscalls migsafe needs and `libc`/`nix`
//! do not wrap conveniently. Every `unsafe` block states the invariant it relies on.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

/// Converts a `-1`-returning libc result into `io::Result`.
fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub fn cstring(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

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
    let range = CachestatRange { off: 0, len: 0 };
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

/// `fstatat(fd, "", AT_EMPTY_PATH|AT_SYMLINK_NOFOLLOW)`: works on O_PATH fds.
pub fn fstat_fd(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: the path is a NUL-terminated empty string and st points to
    // writable memory of the right size; the kernel fills it on success.
    let ret = unsafe {
        libc::fstatat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            st.as_mut_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    check(ret as libc::c_long)?;
    // SAFETY: fstatat succeeded, so st is initialized.
    Ok(unsafe { st.assume_init() })
}

/// `fstatat(dirfd, name, AT_SYMLINK_NOFOLLOW)`.
pub fn fstatat(dirfd: BorrowedFd<'_>, name: &CStr) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: name is NUL-terminated; st is writable and correctly sized.
    let ret = unsafe {
        libc::fstatat(
            dirfd.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    check(ret as libc::c_long)?;
    // SAFETY: fstatat succeeded.
    Ok(unsafe { st.assume_init() })
}

/// `stat(2)` following symlinks.
pub fn stat_path(path: &CStr) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: path is NUL-terminated; st is writable and correctly sized.
    let ret = unsafe { libc::stat(path.as_ptr(), st.as_mut_ptr()) };
    check(ret as libc::c_long)?;
    // SAFETY: stat succeeded.
    Ok(unsafe { st.assume_init() })
}

/// `openat(dirfd, name, flags, mode)` returning an owned fd.
pub fn openat(dirfd: BorrowedFd<'_>, name: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: name is NUL-terminated; on success the returned fd is new and
    // owned by nobody else.
    let fd = unsafe {
        libc::openat(
            dirfd.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode,
        )
    };
    check(fd as libc::c_long)?;
    // SAFETY: fd is a freshly opened descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_BENEATH: u64 = 0x08;

/// `openat2(dirfd, path, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`: the kernel
/// refuses (EXDEV) any resolution that would leave `dirfd`, whether by `..`,
/// an absolute path or a symlink pointing outside, so a path from a control
/// file can never name a file outside the backing.
pub fn openat2_beneath(dirfd: BorrowedFd<'_>, path: &CStr, flags: i32) -> io::Result<OwnedFd> {
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: path is NUL-terminated; how is a live struct of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dirfd.as_raw_fd(),
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    check(fd)?;
    // SAFETY: fd is a freshly opened descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Opens a real file description for an O_PATH fd (through its /proc magic
/// link, as passthrough_hp does): the O_PATH fd pins the inode across renames,
/// and the reopen checks permissions against the caller's fsuid.
pub fn reopen(opath: BorrowedFd<'_>, flags: i32) -> io::Result<File> {
    let path = CString::new(format!("/proc/self/fd/{}", opath.as_raw_fd())).expect("no NUL");
    // SAFETY: path is NUL-terminated; the returned fd is new.
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC, 0) };
    check(fd as libc::c_long)?;
    // SAFETY: fd is a freshly opened descriptor.
    Ok(unsafe { File::from_raw_fd(fd) })
}

pub fn proc_fd_path(fd: BorrowedFd<'_>) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL")
}

pub fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    let ret = unsafe { libc::fallocate(fd.as_raw_fd(), mode, offset as i64, len as i64) };
    check(ret as libc::c_long).map(|_| ())
}

pub fn lseek(fd: BorrowedFd<'_>, offset: i64, whence: i32) -> io::Result<i64> {
    // SAFETY: plain syscall on a valid fd.
    let ret = unsafe { libc::lseek(fd.as_raw_fd(), offset, whence) };
    check(ret as libc::c_long)
}

pub fn copy_file_range(
    fd_in: BorrowedFd<'_>,
    off_in: u64,
    fd_out: BorrowedFd<'_>,
    off_out: u64,
    len: usize,
) -> io::Result<usize> {
    let mut off_in = off_in as i64;
    let mut off_out = off_out as i64;
    // SAFETY: the offset pointers reference live locals; fds are valid.
    let ret = unsafe {
        libc::copy_file_range(
            fd_in.as_raw_fd(),
            &mut off_in,
            fd_out.as_raw_fd(),
            &mut off_out,
            len,
            0,
        )
    };
    check(ret as libc::c_long).map(|v| v as usize)
}

pub fn renameat2(
    olddir: BorrowedFd<'_>,
    oldname: &CStr,
    newdir: BorrowedFd<'_>,
    newname: &CStr,
    flags: u32,
) -> io::Result<()> {
    // SAFETY: names are NUL-terminated; fds are valid.
    let ret = unsafe {
        libc::renameat2(
            olddir.as_raw_fd(),
            oldname.as_ptr(),
            newdir.as_raw_fd(),
            newname.as_ptr(),
            flags,
        )
    };
    check(ret as libc::c_long).map(|_| ())
}

/// Switches this thread's filesystem uid/gid to the caller's, so the backing
/// filesystem checks permissions (EACCES) and assigns ownership as it would
/// for the caller. `setfsuid` is per-thread on Linux (the raw syscall; glibc
/// does not broadcast it), and leaving uid 0 clears the fs capabilities
/// (CAP_DAC_OVERRIDE, CAP_CHOWN, CAP_FOWNER) from the effective set; going
/// back to 0 restores them.
pub struct FsCreds {
    switched: bool,
}

impl FsCreds {
    pub fn switch(uid: u32, gid: u32) -> FsCreds {
        if uid == 0 && gid == 0 {
            return FsCreds { switched: false };
        }
        // SAFETY: setfsgid/setfsuid only change this thread's credentials.
        unsafe {
            libc::syscall(libc::SYS_setfsgid, gid);
            libc::syscall(libc::SYS_setfsuid, uid);
        }
        FsCreds { switched: true }
    }
}

impl Drop for FsCreds {
    fn drop(&mut self) {
        if self.switched {
            // SAFETY: restores this thread's fs credentials to root's.
            unsafe {
                libc::syscall(libc::SYS_setfsuid, 0);
                libc::syscall(libc::SYS_setfsgid, 0);
            }
        }
    }
}

/// A page-aligned heap buffer: O_DIRECT needs aligned memory, and FUSE hands
/// write data at an arbitrary offset inside its request buffer.
pub struct AlignedBuf {
    ptr: *mut u8,
    cap: usize,
}

const ALIGN: usize = 4096;

impl AlignedBuf {
    pub const fn empty() -> AlignedBuf {
        AlignedBuf {
            ptr: std::ptr::null_mut(),
            cap: 0,
        }
    }

    /// Returns a slice of at least `len` bytes, growing (never shrinking) the buffer.
    pub fn get(&mut self, len: usize) -> &mut [u8] {
        if len > self.cap {
            self.release();
            let cap = len.next_multiple_of(ALIGN).max(ALIGN);
            let layout = std::alloc::Layout::from_size_align(cap, ALIGN).expect("layout");
            // SAFETY: layout has non-zero size.
            let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
            if ptr.is_null() {
                std::alloc::handle_alloc_error(layout);
            }
            self.ptr = ptr;
            self.cap = cap;
        }
        if self.cap == 0 {
            return &mut [];
        }
        // SAFETY: ptr is valid for cap >= len initialized bytes, owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }

    fn release(&mut self) {
        if !self.ptr.is_null() {
            let layout = std::alloc::Layout::from_size_align(self.cap, ALIGN).expect("layout");
            // SAFETY: ptr was allocated with this layout in `get`.
            unsafe { std::alloc::dealloc(self.ptr, layout) };
            self.ptr = std::ptr::null_mut();
            self.cap = 0;
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        self.release();
    }
}

/// True when the process has CAP_SYS_ADMIN in its effective set, which the
/// kernel requires to register FUSE passthrough backing files.
pub fn has_cap_sys_admin() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("CapEff:"))
                .and_then(|l| u64::from_str_radix(l[7..].trim(), 16).ok())
        })
        .map(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
        .unwrap_or(false)
}

/// Name of an errno ("EBUSY"), for result lines and logs.
pub fn errno_name(errno: i32) -> String {
    format!("{:?}", nix::errno::Errno::from_raw(errno))
}

pub fn errno_of(err: &io::Error) -> i32 {
    err.raw_os_error().unwrap_or(libc::EIO)
}

/// The calling thread's id (the pid FUSE requests carry).
pub fn gettid() -> u32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() as u32 }
}

/// Sets O_DIRECT on an open fd (F_SETFL accepts it on Linux).
pub fn set_direct(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl on a valid fd with integer arguments only.
    let flags = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) } as libc::c_long)?;
    // SAFETY: as above.
    check(
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags as i32 | libc::O_DIRECT) }
            as libc::c_long,
    )
    .map(|_| ())
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
