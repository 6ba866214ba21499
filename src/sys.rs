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

/// `dup2(src, target)`: makes `target` (a standard descriptor) refer to
/// what `src` refers to.
pub fn dup2(src: BorrowedFd<'_>, target: RawFd) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd; `target` is replaced atomically
    // and owned by the process's standard streams, not by a Rust object.
    check(unsafe { libc::dup2(src.as_raw_fd(), target) } as libc::c_long).map(|_| ())
}

/// Gives signal `sig` its default disposition (undoing an inherited
/// SIG_IGN), for a signal that is then blocked and waited for.
pub fn default_disposition(sig: libc::c_int) -> io::Result<()> {
    // SAFETY: installs no handler (SIG_DFL), so no code of ours runs in
    // signal context; called before the daemon starts its threads.
    if unsafe { libc::signal(sig, libc::SIG_DFL) } == libc::SIG_ERR {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// AT_FDCWD as a borrowed fd, for `openat` relative to the working directory.
pub fn cwd() -> BorrowedFd<'static> {
    // SAFETY: AT_FDCWD is a sentinel the kernel interprets; it is never closed.
    unsafe { BorrowedFd::borrow_raw(libc::AT_FDCWD) }
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

/// Clears O_NONBLOCK on an open file description.
pub fn clear_nonblock(fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK))?;
    Ok(())
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

/// The identity a request is served with: the caller's filesystem uid and
/// gid (as the kernel sends them) and its supplementary groups, which the
/// kernel does not send and which are read from `/proc/PID/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl Caller {
    /// The caller of a request. Its groups come from `/proc/PID/status` of the
    /// requesting task, and only when that task's fsuid and fsgid are the
    /// request's: if the task is gone or its pid now names another process,
    /// the caller gets no supplementary groups (fewer rights, never others').
    /// Root (uid and gid 0) needs none: its capabilities decide.
    pub fn of_request(uid: u32, gid: u32, pid: u32) -> Caller {
        let groups = if (uid == 0 && gid == 0) || pid == 0 {
            Vec::new()
        } else {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| groups_from_status(&s, uid, gid))
                .unwrap_or_default()
        };
        Caller { uid, gid, groups }
    }

    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }

    /// The kernel's generic permission check without ACLs: the owner bits if
    /// the caller owns the object, else the group bits if its gid or one of
    /// its groups is the object's, else the other bits; root may read and
    /// write anything and execute what has any execute bit. `mask` is a
    /// combination of `libc::R_OK`, `W_OK` and `X_OK`.
    pub fn may(&self, st: &libc::stat, mask: i32) -> bool {
        let mask = (mask & 0o7) as u32;
        if self.uid == 0 {
            return mask & libc::X_OK as u32 == 0 || st.st_mode & 0o111 != 0;
        }
        let bits = if self.uid == st.st_uid {
            st.st_mode >> 6
        } else if self.in_group(st.st_gid) {
            st.st_mode >> 3
        } else {
            st.st_mode
        } & 0o7;
        bits & mask == mask
    }
}

/// Supplementary groups from the text of `/proc/PID/status`, if the task's
/// fsuid and fsgid (the fourth fields of `Uid:` and `Gid:`) are `uid`/`gid`.
fn groups_from_status(status: &str, uid: u32, gid: u32) -> Option<Vec<u32>> {
    let field = |key: &str, n: usize| -> Option<u32> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        line[key.len()..].split_whitespace().nth(n)?.parse().ok()
    };
    if field("Uid:", 3)? != uid || field("Gid:", 3)? != gid {
        return None;
    }
    let line = status.lines().find(|l| l.starts_with("Groups:"))?;
    line["Groups:".len()..]
        .split_whitespace()
        .map(|g| g.parse().ok())
        .collect()
}

/// Drops the daemon's own supplementary groups from every thread (glibc's
/// `setgroups` applies to all threads), so that only a caller's groups ever
/// take part in a permission check. Fails with EPERM when not root, where
/// there is nothing to switch anyway.
pub fn drop_supplementary_groups() -> io::Result<()> {
    // SAFETY: setgroups with an empty list reads no memory.
    let ret = unsafe { libc::setgroups(0, std::ptr::null()) };
    check(ret as libc::c_long).map(|_| ())
}

/// Sets this thread's supplementary groups only: the raw syscall, because
/// glibc's `setgroups` changes every thread of the process.
fn set_thread_groups(groups: &[u32]) -> io::Result<()> {
    // SAFETY: the pointer and length describe a live slice of gid_t (u32).
    let ret = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    check(ret).map(|_| ())
}

/// `setfsuid`/`setfsgid` (raw, per thread), checked: the call returns the
/// previous id whether or not it succeeded, so a second call reads it back.
fn set_thread_fsid(nr: libc::c_long, id: u32) -> io::Result<()> {
    // SAFETY: setfsuid/setfsgid only change this thread's credentials.
    let now = unsafe {
        libc::syscall(nr, id);
        libc::syscall(nr, u32::MAX)
    };
    if now as u32 != id {
        return Err(io::Error::from_raw_os_error(libc::EPERM));
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;

/// This thread's capability sets (capget(2), version 3: two words).
fn thread_caps() -> io::Result<[CapData; 2]> {
    let mut hdr = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: hdr and data are live and laid out as capget(2) expects for
    // version 3 (two CapData words).
    let ret = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    check(ret)?;
    Ok(data)
}

/// Sets this thread's capability sets (capset(2) with pid 0 is per thread).
fn set_thread_caps(data: &[CapData; 2]) -> io::Result<()> {
    let mut hdr = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    // SAFETY: as in thread_caps; the kernel only reads data.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) };
    check(ret).map(|_| ())
}

fn daemon_is_root() -> bool {
    static ROOT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // SAFETY: geteuid has no preconditions.
    *ROOT.get_or_init(|| unsafe { libc::geteuid() } == 0)
}

/// Serves a request as its caller: switches this thread's fsuid, fsgid and
/// supplementary groups to the caller's, and for a non-root caller empties
/// the effective capability set, so the backing filesystem checks
/// permissions (EACCES/EPERM) and assigns ownership exactly as for the
/// caller. Everything here is per thread (raw syscalls; glibc would
/// broadcast setgroups to every thread), and dropping the guard restores
/// root. A daemon that is not root cannot switch and serves as itself.
pub struct FsCreds {
    caller: Caller,
    switched: bool,
    /// The capability sets to restore, when they were emptied.
    caps: Option<[CapData; 2]>,
}

thread_local! {
    /// Set while this thread serves as a caller: a second switch would
    /// save the caller's (empty) capabilities as the ones to restore.
    static SWITCHED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl FsCreds {
    pub fn switch(caller: Caller) -> io::Result<FsCreds> {
        let mut guard = FsCreds {
            caller,
            switched: false,
            caps: None,
        };
        guard.enter()?;
        Ok(guard)
    }

    /// Runs `f` with the daemon's own identity, then serves as the caller
    /// again: for the few steps the kernel itself performs with more rights
    /// than the caller's (clearing set-id bits for a writer).
    pub fn as_daemon<T>(&mut self, f: impl FnOnce() -> T) -> io::Result<T> {
        self.leave();
        let out = f();
        self.enter()?;
        Ok(out)
    }

    fn enter(&mut self) -> io::Result<()> {
        let c = &self.caller;
        if !daemon_is_root() || (c.uid == 0 && c.gid == 0) {
            return Ok(());
        }
        if SWITCHED.get() {
            log::error!("nested credential switch refused");
            return Err(io::Error::from_raw_os_error(libc::EDEADLK));
        }
        let saved = thread_caps()?;
        // From here on, leave() restores whatever was changed.
        self.switched = true;
        SWITCHED.set(true);
        set_thread_groups(&c.groups)?;
        set_thread_fsid(libc::SYS_setfsgid, c.gid)?;
        set_thread_fsid(libc::SYS_setfsuid, c.uid)?;
        if c.uid != 0 {
            // Leaving fsuid 0 already cleared the file capabilities; the
            // others (CAP_SYS_ADMIN, CAP_SYS_RESOURCE, CAP_SETFCAP...) go too.
            let mut none = saved;
            for d in &mut none {
                d.effective = 0;
            }
            self.caps = Some(saved);
            set_thread_caps(&none)?;
        }
        Ok(())
    }

    fn leave(&mut self) {
        if !self.switched {
            return;
        }
        // Capabilities first: setfsuid and setgroups need CAP_SETUID/SETGID.
        let restored = self
            .caps
            .take()
            .map_or(Ok(()), |c| set_thread_caps(&c))
            .and_then(|()| set_thread_fsid(libc::SYS_setfsuid, 0))
            .and_then(|()| set_thread_fsid(libc::SYS_setfsgid, 0))
            .and_then(|()| set_thread_groups(&[]));
        match restored {
            Ok(()) => SWITCHED.set(false),
            // Cannot happen while the daemon keeps its permitted set. The
            // thread then has less than root's rights, never more, and
            // refuses further switches (SWITCHED stays set).
            Err(e) => log::error!("restoring the daemon's credentials after a request: {e}"),
        }
        self.switched = false;
    }
}

impl Drop for FsCreds {
    fn drop(&mut self) {
        self.leave();
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

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str =
        "Name:\tcat\nUid:\t1000\t1000\t1000\t1001\nGid:\t100\t100\t100\t101\nGroups:\t4 24 27 \n";

    #[test]
    fn groups_only_when_the_task_is_the_caller() {
        assert_eq!(groups_from_status(STATUS, 1001, 101), Some(vec![4, 24, 27]));
        assert_eq!(groups_from_status(STATUS, 1000, 100), None);
        assert_eq!(
            groups_from_status("Uid:\t5\t5\t5\t5\nGid:\t5\t5\t5\t5\nGroups:\t\n", 5, 5),
            Some(vec![])
        );
    }

    fn status_line(task: &str, key: &str) -> String {
        let s = std::fs::read_to_string(format!("/proc/{task}/status")).unwrap();
        s.lines()
            .find(|l| l.starts_with(key))
            .unwrap()
            .trim_end()
            .to_string()
    }

    fn groups_of(task: &str) -> String {
        status_line(task, "Groups:")
    }

    /// A switch changes the serving thread only: another thread serving at
    /// the same time keeps its own groups and ids (glibc's setgroups would
    /// change every thread), and dropping the guard restores the thread.
    #[test]
    fn switch_is_per_thread_and_restored() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: needs root");
            return;
        }
        let before = groups_of("thread-self");
        let (switched_tx, switched_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let caller = Caller {
                uid: 65534,
                gid: 65534,
                groups: vec![65533, 65532],
            };
            let guard = FsCreds::switch(caller.clone()).unwrap();
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            // A nested switch would save the caller's empty capabilities.
            assert!(FsCreds::switch(caller).is_err());
            let caps = status_line("thread-self", "CapEff:");
            switched_tx
                .send((tid, groups_of("thread-self"), caps))
                .unwrap();
            done_rx.recv().unwrap();
            drop(guard);
            (
                groups_of("thread-self"),
                status_line("thread-self", "CapEff:"),
            )
        });
        let caps_before = status_line("thread-self", "CapEff:");
        let (tid, inside, caps_inside) = switched_rx.recv().unwrap();
        // A non-root caller is served without any capability.
        assert_eq!(caps_inside, "CapEff:\t0000000000000000");
        // The kernel keeps groups sorted.
        assert_eq!(inside, "Groups:\t65532 65533");
        assert_eq!(
            groups_of(&format!("self/task/{tid}")),
            "Groups:\t65532 65533"
        );
        assert_eq!(
            groups_of("thread-self"),
            before,
            "another thread's switch changed this one"
        );
        done_tx.send(()).unwrap();
        assert_eq!(
            t.join().unwrap(),
            (before, caps_before),
            "the guard did not restore the groups and capabilities"
        );
    }

    #[test]
    fn generic_permission_check() {
        // SAFETY: stat is plain old data; all-zero is a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        st.st_mode = libc::S_IFREG | 0o640;
        st.st_uid = 10;
        st.st_gid = 20;
        let c = |uid, gid, groups: &[u32]| Caller {
            uid,
            gid,
            groups: groups.to_vec(),
        };
        assert!(c(10, 1, &[]).may(&st, libc::R_OK | libc::W_OK));
        assert!(c(11, 20, &[]).may(&st, libc::R_OK));
        assert!(!c(11, 20, &[]).may(&st, libc::W_OK));
        assert!(c(11, 1, &[20]).may(&st, libc::R_OK));
        assert!(!c(11, 1, &[21]).may(&st, libc::R_OK));
        // The owner class decides even when group or other would allow.
        st.st_mode = libc::S_IFREG | 0o066;
        assert!(!c(10, 20, &[]).may(&st, libc::R_OK));
        assert!(c(0, 0, &[]).may(&st, libc::R_OK | libc::W_OK));
        assert!(!c(0, 0, &[]).may(&st, libc::X_OK));
    }
}
