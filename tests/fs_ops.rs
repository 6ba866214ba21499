//! Namespace and metadata operations through the mount must land in the
//! backing exactly as if made there directly: operators manage image
//! directories through the mount with ordinary tools, and qemu-img relies on
//! fallocate and SEEK_DATA/SEEK_HOLE telling the truth about sparse images.

mod common;

use common::*;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{
    DirBuilderExt, FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt,
};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

const MIB: usize = 1 << 20;

/// The process umask, read without changing it (umask(2) would race with
/// other tests running in parallel threads).
fn umask() -> u32 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("Umask:"))
        .expect("Umask in /proc/self/status");
    u32::from_str_radix(line["Umask:".len()..].trim(), 8).unwrap()
}

/// A scratch dir with a backing directory and a migsafe mount over it.
/// Field order makes the mount drop before the directory it lives in.
struct Bed {
    m: Mount,
    backing: PathBuf,
    _dir: common::Scratch,
}

fn bed(args: &[&str]) -> Bed {
    let dir = scratch();
    let backing = dir.path().join("backing");
    fs::create_dir(&backing).unwrap();
    let m = Mount::start(dir.path(), &backing, args);
    Bed {
        m,
        backing,
        _dir: dir,
    }
}

fn renameat2(from: &Path, to: &Path, flags: u32) -> io::Result<()> {
    let (a, b) = (cstr(from), cstr(to));
    // SAFETY: both strings are valid NUL-terminated paths for the duration of the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[test]
fn mkdir_rmdir() {
    if !common::require_root() {
        return;
    }
    let b = bed(&[]);
    let mode = 0o750 & !umask();
    fs::DirBuilder::new()
        .mode(0o750)
        .create(b.m.path("d"))
        .unwrap();
    let md = fs::metadata(b.backing.join("d")).unwrap();
    assert!(
        md.is_dir(),
        "mkdir through the mount must make a backing directory"
    );
    assert_eq!(
        md.mode() & 0o7777,
        mode,
        "mode of the new directory in the backing"
    );
    fs::create_dir(b.m.path("d/e")).unwrap();
    assert!(b.backing.join("d/e").is_dir(), "nested mkdir");
    assert_eq!(
        errno_of(fs::create_dir(b.m.path("d")), "mkdir existing"),
        libc::EEXIST
    );
    assert_eq!(
        errno_of(fs::remove_dir(b.m.path("d")), "rmdir non-empty"),
        libc::ENOTEMPTY
    );
    fs::write(b.m.path("f"), b"x").unwrap();
    assert_eq!(
        errno_of(fs::remove_dir(b.m.path("f")), "rmdir on a file"),
        libc::ENOTDIR
    );
    fs::remove_dir(b.m.path("d/e")).unwrap();
    assert!(
        !b.backing.join("d/e").exists(),
        "rmdir through the mount must remove the backing dir"
    );
    fs::remove_dir(b.m.path("d")).unwrap();
    assert!(!b.backing.join("d").exists());
    assert!(
        !b.m.path("d").exists(),
        "removed dir still visible through the mount"
    );
    assert_eq!(
        errno_of(fs::remove_dir(b.m.path("d")), "rmdir missing"),
        libc::ENOENT
    );
    // A directory made in the backing is usable through the mount at once.
    fs::create_dir(b.backing.join("fromback")).unwrap();
    fs::write(b.m.path("fromback/x"), b"hello").unwrap();
    assert_eq!(fs::read(b.backing.join("fromback/x")).unwrap(), b"hello");
}

#[test]
fn create_unlink_mkfifo() {
    if !common::require_root() {
        return;
    }
    let b = bed(&[]);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(b.m.path("new.img"))
            .unwrap();
        f.write_all(b"created through the mount").unwrap();
    }
    let md = fs::metadata(b.backing.join("new.img")).unwrap();
    assert!(md.is_file());
    assert_eq!(
        md.mode() & 0o7777,
        0o640 & !umask(),
        "mode of a created file in the backing"
    );
    assert_eq!(
        fs::read(b.backing.join("new.img")).unwrap(),
        b"created through the mount"
    );
    assert_eq!(
        errno_of(
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(b.m.path("new.img")),
            "O_EXCL create of an existing file"
        ),
        libc::EEXIST
    );

    fs::remove_file(b.m.path("new.img")).unwrap();
    assert!(
        !b.backing.join("new.img").exists(),
        "unlink through the mount must remove the backing file"
    );
    assert!(
        !b.m.path("new.img").exists(),
        "unlinked file still visible through the mount"
    );
    assert_eq!(
        errno_of(fs::remove_file(b.m.path("new.img")), "unlink missing"),
        libc::ENOENT
    );
    fs::create_dir(b.m.path("dir")).unwrap();
    assert_eq!(
        errno_of(fs::remove_file(b.m.path("dir")), "unlink a directory"),
        libc::EISDIR
    );

    // mknod (a FIFO) through the mount.
    let fifo = cstr(&b.m.path("fifo"));
    // SAFETY: fifo is a valid NUL-terminated path.
    let r = unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) };
    assert_eq!(
        r,
        0,
        "mkfifo through the mount: {}",
        io::Error::last_os_error()
    );
    let ft = fs::symlink_metadata(b.backing.join("fifo"))
        .unwrap()
        .file_type();
    assert!(
        ft.is_fifo(),
        "mkfifo through the mount must make a FIFO in the backing, got {ft:?}"
    );
}

#[test]
fn rename_plain_noreplace_exchange() {
    if !common::require_root() {
        return;
    }
    let b = bed(&[]);
    fs::write(b.m.path("a"), b"AAAA").unwrap();
    fs::write(b.m.path("b"), b"BB").unwrap();
    fs::create_dir(b.m.path("sub")).unwrap();

    fs::rename(b.m.path("a"), b.m.path("a2")).unwrap();
    assert!(!b.backing.join("a").exists());
    assert_eq!(fs::read(b.backing.join("a2")).unwrap(), b"AAAA");
    fs::rename(b.m.path("a2"), b.m.path("sub/a3")).unwrap();
    assert_eq!(
        fs::read(b.backing.join("sub/a3")).unwrap(),
        b"AAAA",
        "rename across directories"
    );
    assert!(!b.m.path("a2").exists());

    // Plain rename replaces the target.
    fs::write(b.m.path("victim"), b"old").unwrap();
    fs::rename(b.m.path("b"), b.m.path("victim")).unwrap();
    assert_eq!(fs::read(b.backing.join("victim")).unwrap(), b"BB");
    assert_eq!(fs::read(b.m.path("victim")).unwrap(), b"BB");

    // Directory rename carries its contents.
    fs::rename(b.m.path("sub"), b.m.path("sub2")).unwrap();
    assert_eq!(fs::read(b.backing.join("sub2/a3")).unwrap(), b"AAAA");
    assert_eq!(fs::read(b.m.path("sub2/a3")).unwrap(), b"AAAA");

    // RENAME_NOREPLACE: refused onto an existing name, both untouched.
    fs::write(b.m.path("x"), b"xx").unwrap();
    fs::write(b.m.path("y"), b"yyy").unwrap();
    assert_eq!(
        errno_of(
            renameat2(&b.m.path("x"), &b.m.path("y"), libc::RENAME_NOREPLACE),
            "RENAME_NOREPLACE onto existing"
        ),
        libc::EEXIST
    );
    assert_eq!(fs::read(b.backing.join("x")).unwrap(), b"xx");
    assert_eq!(fs::read(b.backing.join("y")).unwrap(), b"yyy");
    renameat2(&b.m.path("x"), &b.m.path("z"), libc::RENAME_NOREPLACE)
        .expect("RENAME_NOREPLACE onto a free name");
    assert_eq!(fs::read(b.backing.join("z")).unwrap(), b"xx");
    assert!(!b.backing.join("x").exists());

    // RENAME_EXCHANGE swaps atomically.
    renameat2(&b.m.path("y"), &b.m.path("z"), libc::RENAME_EXCHANGE).expect("RENAME_EXCHANGE");
    assert_eq!(fs::read(b.backing.join("y")).unwrap(), b"xx");
    assert_eq!(fs::read(b.backing.join("z")).unwrap(), b"yyy");
    assert_eq!(
        fs::read(b.m.path("y")).unwrap(),
        b"xx",
        "exchanged name through the mount"
    );
    assert_eq!(
        fs::read(b.m.path("z")).unwrap(),
        b"yyy",
        "exchanged name through the mount"
    );
    assert_eq!(
        errno_of(
            renameat2(&b.m.path("y"), &b.m.path("missing"), libc::RENAME_EXCHANGE),
            "RENAME_EXCHANGE with a missing target"
        ),
        libc::ENOENT
    );
}

#[test]
fn symlink_readlink() {
    if !common::require_root() {
        return;
    }
    let b = bed(&[]);
    fs::write(b.m.path("target.img"), b"through the link").unwrap();
    std::os::unix::fs::symlink("target.img", b.m.path("link")).unwrap();
    assert_eq!(
        fs::read_link(b.backing.join("link")).unwrap(),
        Path::new("target.img"),
        "symlink through the mount must store the target verbatim in the backing"
    );
    assert!(
        fs::symlink_metadata(b.m.path("link"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(
        fs::read_link(b.m.path("link")).unwrap(),
        Path::new("target.img")
    );
    assert_eq!(fs::read(b.m.path("link")).unwrap(), b"through the link");

    // A target with odd components must come back byte for byte, not resolved.
    let odd = "a/../b/./c//d";
    std::os::unix::fs::symlink(odd, b.backing.join("odd")).unwrap();
    assert_eq!(fs::read_link(b.m.path("odd")).unwrap(), Path::new(odd));
    assert_eq!(
        errno_of(fs::read(b.m.path("odd")), "read through a dangling link"),
        libc::ENOENT
    );
    assert_eq!(
        errno_of(
            fs::read_link(b.m.path("target.img")),
            "readlink of a regular file"
        ),
        libc::EINVAL
    );
}

#[test]
fn hard_link_same_inode() {
    if !common::require_root() {
        return;
    }
    let b = bed(&[]);
    fs::write(b.m.path("a"), b"one").unwrap();
    fs::hard_link(b.m.path("a"), b.m.path("b")).unwrap();
    let (ba, bb) = (
        fs::metadata(b.backing.join("a")).unwrap(),
        fs::metadata(b.backing.join("b")).unwrap(),
    );
    assert_eq!(
        ba.ino(),
        bb.ino(),
        "link through the mount must be a backing hard link"
    );
    assert_eq!(ba.nlink(), 2);
    let (ma, mb) = (
        fs::metadata(b.m.path("a")).unwrap(),
        fs::metadata(b.m.path("b")).unwrap(),
    );
    assert_eq!(
        ma.ino(),
        mb.ino(),
        "both names must be one inode through the mount"
    );
    assert_eq!(mb.nlink(), 2, "nlink through the mount");
    write_at_sync(&b.m.path("b"), 0, b"ONE");
    assert_eq!(
        fs::read(b.m.path("a")).unwrap(),
        b"ONE",
        "a write through one name is seen through the other"
    );

    // A link made in the backing is the same mount inode too (images are
    // keyed by backing identity, not by path).
    fs::hard_link(b.backing.join("a"), b.backing.join("c")).unwrap();
    assert_eq!(
        fs::metadata(b.m.path("c")).unwrap().ino(),
        ma.ino(),
        "a backing hard link must look up as the same mount inode"
    );
    fs::remove_file(b.m.path("a")).unwrap();
    assert_eq!(fs::metadata(b.backing.join("b")).unwrap().nlink(), 2);
    assert_eq!(fs::read(b.m.path("b")).unwrap(), b"ONE");
}

#[test]
fn setattr_reflected_in_backing() {
    if !common::require_root() {
        return;
    }
    let b = bed(&[]);
    let p = b.m.path("f");
    fs::write(&p, vec![7u8; 10_000]).unwrap();

    fs::set_permissions(&p, fs::Permissions::from_mode(0o751)).unwrap();
    assert_eq!(
        fs::metadata(b.backing.join("f")).unwrap().mode() & 0o7777,
        0o751,
        "chmod"
    );
    fs::set_permissions(&p, fs::Permissions::from_mode(0o4700)).unwrap();
    assert_eq!(
        fs::metadata(b.backing.join("f")).unwrap().mode() & 0o7777,
        0o4700,
        "chmod with setuid"
    );
    assert_eq!(
        fs::metadata(&p).unwrap().mode() & 0o7777,
        0o4700,
        "chmod seen through the mount"
    );

    std::os::unix::fs::chown(&p, Some(1234), Some(5678)).unwrap();
    let md = fs::metadata(b.backing.join("f")).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 5678), "chown");
    std::os::unix::fs::chown(&p, None, Some(42)).unwrap();
    let md = fs::metadata(b.backing.join("f")).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 42), "chown of the group alone");
    let mm = fs::metadata(&p).unwrap();
    assert_eq!(
        (mm.uid(), mm.gid()),
        (1234, 42),
        "ownership through the mount"
    );

    {
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(3 * MIB as u64).unwrap();
        assert_eq!(
            fs::metadata(b.backing.join("f")).unwrap().len(),
            3 * MIB as u64,
            "truncate up"
        );
        f.set_len(100).unwrap();
    }
    assert_eq!(
        fs::read(b.backing.join("f")).unwrap(),
        vec![7u8; 100],
        "truncate down keeps the prefix"
    );
    let path_trunc = cstr(&p);
    // SAFETY: valid NUL-terminated path.
    let r = unsafe { libc::truncate(path_trunc.as_ptr(), 4096) };
    assert_eq!(r, 0, "truncate(2) by path: {}", io::Error::last_os_error());
    let mut want = vec![7u8; 100];
    want.resize(4096, 0);
    assert_eq!(
        fs::read(b.backing.join("f")).unwrap(),
        want,
        "truncate by path extends with zeros"
    );

    let times = [
        libc::timespec {
            tv_sec: 1_000_000_000,
            tv_nsec: 123_456_789,
        },
        libc::timespec {
            tv_sec: 1_500_000_000,
            tv_nsec: 987_654_321,
        },
    ];
    let c = cstr(&p);
    // SAFETY: valid path and a two-element timespec array.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) };
    assert_eq!(r, 0, "utimensat: {}", io::Error::last_os_error());
    let md = fs::metadata(b.backing.join("f")).unwrap();
    assert_eq!(
        (md.atime(), md.atime_nsec()),
        (1_000_000_000, 123_456_789),
        "atime in the backing"
    );
    assert_eq!(
        (md.mtime(), md.mtime_nsec()),
        (1_500_000_000, 987_654_321),
        "mtime in the backing"
    );
    let mm = fs::metadata(&p).unwrap();
    assert_eq!(
        (mm.mtime(), mm.mtime_nsec()),
        (1_500_000_000, 987_654_321),
        "mtime through the mount"
    );

    // UTIME_OMIT leaves atime alone while mtime changes.
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: 1_600_000_000,
            tv_nsec: 5,
        },
    ];
    // SAFETY: as above.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) };
    assert_eq!(
        r,
        0,
        "utimensat with UTIME_OMIT: {}",
        io::Error::last_os_error()
    );
    let md = fs::metadata(b.backing.join("f")).unwrap();
    assert_eq!(
        (md.atime(), md.atime_nsec()),
        (1_000_000_000, 123_456_789),
        "UTIME_OMIT must keep atime"
    );
    assert_eq!(
        (md.mtime(), md.mtime_nsec()),
        (1_600_000_000, 5),
        "mtime after second utimensat"
    );

    // Attributes set in the backing show through a name the mount has not seen yet.
    fs::write(b.backing.join("g"), b"g").unwrap();
    fs::set_permissions(b.backing.join("g"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(b.backing.join("g"), Some(99), Some(98)).unwrap();
    let mg = fs::metadata(b.m.path("g")).unwrap();
    assert_eq!(
        (mg.mode() & 0o7777, mg.uid(), mg.gid(), mg.len()),
        (0o600, 99, 98, 1)
    );
}

fn statvfs(p: &Path) -> libc::statvfs {
    let c = cstr(p);
    // SAFETY: zeroed statvfs is a valid out-parameter.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-pointer.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    assert_eq!(
        r,
        0,
        "statvfs {}: {}",
        p.display(),
        io::Error::last_os_error()
    );
    s
}

#[test]
fn statfs_matches_backing() {
    if !common::require_root() {
        return;
    }
    let b = bed(&[]);
    let (mnt, back) = (statvfs(&b.m.mountpoint), statvfs(&b.backing));
    assert!(
        mnt.f_bsize > 0 && mnt.f_frsize > 0,
        "block sizes through the mount: {} {}",
        mnt.f_bsize,
        mnt.f_frsize
    );
    let total = |s: &libc::statvfs| s.f_blocks as u128 * s.f_frsize as u128;
    let avail = |s: &libc::statvfs| s.f_bavail as u128 * s.f_frsize as u128;
    assert_eq!(
        total(&mnt),
        total(&back),
        "total bytes through the mount vs the backing"
    );
    assert!(
        mnt.f_bavail <= mnt.f_bfree && mnt.f_bfree <= mnt.f_blocks,
        "free <= total"
    );
    // Other tests write in parallel: free space may move, but not by much.
    let diff = avail(&mnt).abs_diff(avail(&back));
    assert!(
        diff < 512 * MIB as u128,
        "available bytes differ by {diff} between mount and backing"
    );
    assert_eq!(mnt.f_files, back.f_files, "inode count through the mount");
    assert_eq!(
        mnt.f_namemax, back.f_namemax,
        "name length limit through the mount"
    );
}

#[test]
fn readdir_lists_entries() {
    if !common::require_root() {
        return;
    }
    let b = bed(&[]);
    fs::write(b.backing.join("back.img"), b"1").unwrap();
    fs::create_dir(b.backing.join("backdir")).unwrap();
    std::os::unix::fs::symlink("back.img", b.backing.join("backlink")).unwrap();
    fs::write(b.m.path("mnt.img"), b"2").unwrap();
    fs::create_dir(b.m.path("mntdir")).unwrap();
    fs::write(b.m.path("mntdir/inner"), b"3").unwrap();

    let want = vec!["back.img", "backdir", "backlink", "mnt.img", "mntdir"];
    assert_eq!(
        dir_names(&b.m.mountpoint),
        want,
        "root listing through the mount"
    );
    assert_eq!(dir_names(&b.backing), want, "root listing of the backing");
    assert_eq!(dir_names(&b.m.path("mntdir")), vec!["inner"]);
    assert!(dir_names(&b.m.path("backdir")).is_empty());
    for e in fs::read_dir(&b.m.mountpoint).unwrap() {
        let e = e.unwrap();
        let direct = fs::symlink_metadata(b.backing.join(e.file_name()))
            .unwrap()
            .file_type();
        assert_eq!(
            e.file_type().unwrap(),
            direct,
            "d_type of {:?}",
            e.file_name()
        );
    }
    assert!(
        b.m.path(".ctl").is_dir(),
        ".ctl must still be reachable by name"
    );
    fs::remove_file(b.backing.join("back.img")).unwrap();
    assert!(
        !dir_names(&b.m.mountpoint).contains(&"back.img".to_string()),
        "entry removed in the backing still listed"
    );
}

#[test]
fn readdir_1000_entries_each_once() {
    if !common::require_root() {
        return;
    }
    let b = bed(&[]);
    fs::create_dir(b.backing.join("many")).unwrap();
    // Long names so the listing needs many FUSE readdir replies and their
    // offsets must chain correctly.
    let want: Vec<String> = (0..1000)
        .map(|i| format!("an-image-file-with-a-rather-long-name-to-fill-buffers-{i:04}.qcow2"))
        .collect();
    for n in &want[..500] {
        File::create(b.backing.join("many").join(n)).unwrap();
    }
    for n in &want[500..] {
        File::create(b.m.path("many").join(n)).unwrap();
    }
    for round in 0..2 {
        let got = dir_names(&b.m.path("many"));
        let mut dedup = got.clone();
        dedup.dedup();
        assert_eq!(
            dedup.len(),
            got.len(),
            "round {round}: duplicate entries in a 1000-entry listing"
        );
        assert_eq!(got.len(), 1000, "round {round}: entries listed");
        assert_eq!(got, want, "round {round}: names listed");
    }
}

// --- fallocate, SEEK_DATA/SEEK_HOLE, copy_file_range -----------------------

fn fallocate(f: &File, mode: i32, off: usize, len: usize) {
    // SAFETY: plain syscall on an open fd.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) };
    assert_eq!(
        r,
        0,
        "fallocate mode={mode:#x} off={off} len={len}: {}",
        io::Error::last_os_error()
    );
}

/// lseek result, or minus the errno (ENXIO past the end).
fn seek(f: &File, off: usize, whence: i32) -> i64 {
    // SAFETY: plain syscall on an open fd.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as i64, whence) };
    if r < 0 {
        -(io::Error::last_os_error().raw_os_error().unwrap() as i64)
    } else {
        r
    }
}

fn seek_map(f: &File, end: usize) -> Vec<(usize, i64, i64)> {
    (0..=end)
        .step_by(128 * 1024)
        .chain([1, 4095, MIB + 1, end - 1])
        .map(|o| (o, seek(f, o, libc::SEEK_DATA), seek(f, o, libc::SEEK_HOLE)))
        .collect()
}

/// The same sequence of writes and fallocate modes, applied to `f`; returns
/// the expected content.
fn sparse_layout(f: &File) -> Vec<u8> {
    let mut model = vec![0x11u8; 4 * MIB];
    f.write_all_at(&model, 0).unwrap();
    f.sync_all().unwrap();
    // default mode over existing data must not change it
    fallocate(f, 0, 0, MIB);
    fallocate(
        f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        MIB,
        MIB,
    );
    model[MIB..2 * MIB].fill(0);
    fallocate(
        f,
        libc::FALLOC_FL_ZERO_RANGE,
        2 * MIB + 64 * 1024,
        64 * 1024,
    );
    model[2 * MIB + 64 * 1024..2 * MIB + 128 * 1024].fill(0);
    fallocate(f, libc::FALLOC_FL_KEEP_SIZE, 4 * MIB, 2 * MIB);
    assert_eq!(
        f.metadata().unwrap().len(),
        4 * MIB as u64,
        "KEEP_SIZE must not grow the file"
    );
    fallocate(f, 0, 6 * MIB, MIB);
    model.resize(7 * MIB, 0);
    assert_eq!(
        f.metadata().unwrap().len(),
        7 * MIB as u64,
        "default fallocate grows the file"
    );
    fallocate(f, libc::FALLOC_FL_ZERO_RANGE, 7 * MIB, MIB);
    model.resize(8 * MIB, 0);
    assert_eq!(
        f.metadata().unwrap().len(),
        8 * MIB as u64,
        "ZERO_RANGE without KEEP_SIZE grows the file"
    );
    let data = vec![0x22u8; 64 * 1024];
    f.write_all_at(&data, (7 * MIB + 256 * 1024) as u64)
        .unwrap();
    model[7 * MIB + 256 * 1024..7 * MIB + 320 * 1024].copy_from_slice(&data);
    f.sync_all().unwrap();
    model
}

fn check_fallocate_seek(io: &str) {
    let b = bed(&["--io", io]);
    let rw = |p: &Path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(p)
            .unwrap()
    };
    let reference = rw(&b.backing.join("ref.img"));
    let want = sparse_layout(&reference);
    let through = rw(&b.m.path("sparse.img"));
    let want2 = sparse_layout(&through);
    assert_eq!(want, want2);
    let direct = File::open(b.backing.join("sparse.img")).unwrap();

    assert_eq!(
        fs::metadata(b.backing.join("sparse.img")).unwrap().len(),
        8 * MIB as u64,
        "backing size"
    );
    assert_eq!(
        fs::metadata(b.backing.join("sparse.img")).unwrap().blocks(),
        fs::metadata(b.backing.join("ref.img")).unwrap().blocks(),
        "allocated blocks: the mount's fallocate modes must reach the backing as given"
    );

    // Before any read: ext4 reports unwritten extents that have pages in the
    // page cache as data, so reading first would change the answers.
    let compare_maps = |when: &str| {
        let via_mount = seek_map(&through, 8 * MIB);
        let on_backing = seek_map(&direct, 8 * MIB);
        let on_ref = seek_map(&reference, 8 * MIB);
        assert_eq!(
            via_mount, on_backing,
            "{when}: SEEK_DATA/SEEK_HOLE through the mount vs on the backing file"
        );
        assert_eq!(
            on_backing, on_ref,
            "{when}: the same operations made directly give another layout"
        );
    };
    compare_maps("before reads");
    // The punched range must really be a hole, not written zeros.
    assert_eq!(
        seek(&through, 0, libc::SEEK_HOLE),
        MIB as i64,
        "first hole through the mount"
    );
    assert_eq!(
        seek(&through, MIB, libc::SEEK_DATA),
        2 * MIB as i64,
        "data after the punched hole"
    );
    assert_eq!(
        seek(&through, 8 * MIB, libc::SEEK_DATA),
        -(libc::ENXIO as i64),
        "SEEK_DATA at EOF"
    );

    let content = fs::read(b.m.path("sparse.img")).unwrap();
    assert!(
        content == want,
        "content through the mount differs from the model"
    );
    assert!(
        fs::read(b.backing.join("sparse.img")).unwrap() == want,
        "backing content differs from the model"
    );
    assert!(
        fs::read(b.backing.join("ref.img")).unwrap() == want,
        "reference content differs from the model"
    );
    compare_maps("after reads");
}

#[test]
fn fallocate_and_seek_relay() {
    if !common::require_root() {
        return;
    }
    check_fallocate_seek("relay");
}

#[test]
fn fallocate_and_seek_passthrough() {
    if !common::require_root() {
        return;
    }
    check_fallocate_seek("passthrough");
}

fn check_copy_file_range(io: &str) {
    let b = bed(&["--io", io]);
    let src: Vec<u8> = (0..3 * MIB + 5).map(|i| (i % 251) as u8).collect();
    fs::write(b.m.path("src.img"), &src).unwrap();
    fs::create_dir(b.m.path("d")).unwrap();
    let fi = File::open(b.m.path("src.img")).unwrap();
    let fo = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(b.m.path("d/dst.img"))
        .unwrap();
    let (mut off_in, mut off_out): (i64, i64) = (4097, MIB as i64);
    let mut left = 2 * MIB;
    while left > 0 {
        // SAFETY: valid fds and offset pointers.
        let n = unsafe {
            libc::copy_file_range(
                fi.as_raw_fd(),
                &mut off_in,
                fo.as_raw_fd(),
                &mut off_out,
                left,
                0,
            )
        };
        assert!(
            n > 0,
            "copy_file_range through the mount returned {n}: {}",
            io::Error::last_os_error()
        );
        left -= n as usize;
    }
    fo.sync_all().unwrap();
    let mut want = vec![0u8; MIB];
    want.extend_from_slice(&src[4097..4097 + 2 * MIB]);
    let got = fs::read(b.backing.join("d/dst.img")).unwrap();
    assert_eq!(got.len(), want.len(), "destination size in the backing");
    assert!(got == want, "copy_file_range result in the backing differs");
    assert!(
        fs::read(b.m.path("d/dst.img")).unwrap() == want,
        "copy_file_range result through the mount differs"
    );
    assert!(
        fs::read(b.backing.join("src.img")).unwrap() == src,
        "source changed by copy_file_range"
    );
}

#[test]
fn copy_file_range_relay() {
    if !common::require_root() {
        return;
    }
    check_copy_file_range("relay");
}

#[test]
fn copy_file_range_passthrough() {
    if !common::require_root() {
        return;
    }
    check_copy_file_range("passthrough");
}

#[test]
fn fallocate_and_seek_cached() {
    if !common::require_root() {
        return;
    }
    check_fallocate_seek("cached");
}

/// Cached handles answer EOPNOTSUPP to the daemon's copy_file_range, so
/// the kernel copies through the mount's own read and write.
#[test]
fn copy_file_range_cached() {
    if !common::require_root() {
        return;
    }
    check_copy_file_range("cached");
}

/// `chown(path, -1, -1)` changes nothing but the ctime, on the backing as
/// on any Linux filesystem; the kernel sends it as a setattr with nothing
/// to set, which must still reach the backing (pjdfstest's `chown/00.t`
/// notes the Linux behaviour).
#[test]
fn chown_to_no_ids_updates_ctime_as_on_the_backing() {
    if !common::require_root() {
        return;
    }
    let b = bed(&[]);
    let local = b.backing.parent().unwrap().join("local");
    let through = b.m.path("f");
    fs::write(&local, b"x").unwrap();
    fs::write(&through, b"x").unwrap();
    let ctime = |p: &Path| {
        let md = fs::symlink_metadata(p).unwrap();
        (md.ctime(), md.ctime_nsec())
    };
    let before = [ctime(&local), ctime(&through)];
    std::thread::sleep(std::time::Duration::from_millis(50));
    for p in [&local, &through] {
        let c = cstr(p);
        // SAFETY: valid NUL-terminated path; -1 ids change neither owner.
        assert_eq!(unsafe { libc::chown(c.as_ptr(), u32::MAX, u32::MAX) }, 0);
    }
    let after = [ctime(&local), ctime(&through)];
    assert_ne!(
        after[0], before[0],
        "bed: a local chown(-1, -1) updates ctime"
    );
    assert_ne!(
        after[1], before[1],
        "chown(-1, -1) through the mount left the ctime as it was"
    );
    assert_eq!(
        ctime(&b.backing.join("f")),
        after[1],
        "the mount shows the backing's ctime"
    );
}
