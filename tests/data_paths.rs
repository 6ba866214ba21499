//! Data written through a migsafe mount must be the backing's data, byte for
//! byte, in both data paths and in both directions: migsafe is a window onto
//! the backing's page cache and never a second copy, otherwise a migration
//! handover could serve bytes the other host never wrote.

mod common;

use common::*;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::Command;

const MIB: usize = 1 << 20;

/// Position-dependent bytes, so a block landing at the wrong offset is caught
/// as well as a wrong byte.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i.wrapping_mul(2_654_435_761) >> 13) as u8) ^ seed ^ ((i >> 12) as u8))
        .collect()
}

/// A shared mapping of a whole file, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    /// Maps `f` shared, read-write; the error is the one mmap(2) gave.
    fn shared(f: &File, len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh mapping of an open fd; checked for MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is valid for len bytes while self lives.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    fn msync(&self) {
        // SAFETY: msync of the whole live mapping.
        let r = unsafe { libc::msync(self.ptr.cast(), self.len, libc::MS_SYNC) };
        assert_eq!(r, 0, "msync: {}", io::Error::last_os_error());
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in shared().
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Asserts equality of two large buffers without dumping megabytes on failure.
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: got {:#04x}, want {:#04x}",
            got[i], want[i]
        );
    }
}

/// True if the daemon log has a line that names `name` and `data path=<path>`.
fn log_has_open(log: &str, name: &str, path: &str) -> bool {
    let needle = format!("data path={path}");
    log.lines().any(|l| l.contains(name) && l.contains(&needle))
}

fn other_path(io: &str) -> &'static str {
    if io == "relay" {
        "passthrough"
    } else {
        "relay"
    }
}

/// Both directions for regular files of a directory backing, with buffered
/// and O_DIRECT I/O through the mount, in the data path `io`.
fn check_regular_files(io: &str) {
    let dir = scratch();
    let backing = dir.path().join("backing");
    fs::create_dir(&backing).unwrap();
    let m = Mount::start(dir.path(), &backing, &["--io", io]);

    // Mount -> backing, with an unaligned length so partial pages are covered.
    let len = 3 * MIB + 123;
    let mut want = pattern(len, 0x5a);
    {
        let mut f = File::create(m.path("data.bin")).unwrap();
        f.write_all(&want).unwrap();
        f.sync_all().unwrap();
    }
    assert_same(
        &fs::read(backing.join("data.bin")).unwrap(),
        &want,
        "backing after write through mount",
    );
    assert_same(
        &read_direct(&backing.join("data.bin"), 0, 3 * MIB),
        &want[..3 * MIB],
        "backing (O_DIRECT) after write through mount",
    );

    // An unaligned overwrite in the middle must touch only its own bytes.
    let patch = pattern(10_000, 0xc3);
    write_at_sync(&m.path("data.bin"), 4097, &patch);
    want[4097..4097 + patch.len()].copy_from_slice(&patch);
    assert_same(
        &fs::read(backing.join("data.bin")).unwrap(),
        &want,
        "backing after unaligned overwrite",
    );

    // Backing -> mount, same size (no attribute change to hide behind).
    let patch = pattern(MIB + 999, 0x17);
    write_at_sync(&backing.join("data.bin"), (MIB + 7) as u64, &patch);
    want[MIB + 7..MIB + 7 + patch.len()].copy_from_slice(&patch);
    assert_same(
        &fs::read(m.path("data.bin")).unwrap(),
        &want,
        "mount (fresh open) after write to backing",
    );

    // A file that appears in the backing behind the mount's back.
    let fresh = pattern(2 * MIB + 5, 0x99);
    fs::write(backing.join("fresh.bin"), &fresh).unwrap();
    assert_eq!(
        fs::metadata(m.path("fresh.bin")).unwrap().len(),
        fresh.len() as u64,
        "size through the mount of a file created in the backing"
    );
    assert_same(
        &fs::read(m.path("fresh.bin")).unwrap(),
        &fresh,
        "mount read of a file created in the backing",
    );

    // O_DIRECT through the mount, both directions.
    let d1 = pattern(MIB, 0x21);
    let d2 = pattern(64 * 1024, 0x42);
    write_direct(&m.path("direct.bin"), 0, &d1).expect("O_DIRECT write through the mount");
    write_direct(&m.path("direct.bin"), 2 * MIB as u64, &d2)
        .expect("O_DIRECT write at 2 MiB through the mount");
    let mut dwant = vec![0u8; 2 * MIB + d2.len()];
    dwant[..MIB].copy_from_slice(&d1);
    dwant[2 * MIB..].copy_from_slice(&d2);
    assert_same(
        &fs::read(backing.join("direct.bin")).unwrap(),
        &dwant,
        "backing after O_DIRECT writes through the mount",
    );
    let d3 = pattern(128 * 1024, 0x77);
    write_at_sync(&backing.join("direct.bin"), 512 * 1024, &d3);
    dwant[512 * 1024..512 * 1024 + d3.len()].copy_from_slice(&d3);
    assert_same(
        &read_direct(&m.path("direct.bin"), 0, dwant.len()),
        &dwant,
        "O_DIRECT read through the mount after a write to the backing",
    );
    assert_same(
        &read_direct(&m.path("data.bin"), 0, 2 * MIB),
        &want[..2 * MIB],
        "O_DIRECT read through the mount of data.bin",
    );

    // mmap through the mount, both directions (a relay mount without
    // direct-io mmap fails every shared mapping with ENODEV).
    let mm = pattern(MIB, 0x6d);
    {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(m.path("mmap.bin"))
            .unwrap();
        f.set_len(MIB as u64).unwrap();
        let mut map = Mapping::shared(&f, MIB).expect("shared mmap through the mount");
        map.bytes().copy_from_slice(&mm);
        map.msync();
    }
    assert_same(
        &fs::read(backing.join("mmap.bin")).unwrap(),
        &mm,
        "backing after writes through a shared mapping of the mount",
    );
    let mm2 = pattern(MIB, 0x4e);
    fs::write(backing.join("mmap2.bin"), &mm2).unwrap();
    {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.path("mmap2.bin"))
            .unwrap();
        let mut map = Mapping::shared(&f, MIB).expect("shared mmap through the mount");
        assert_same(
            map.bytes(),
            &mm2,
            "mapping through the mount of a file written in the backing",
        );
    }

    let log = m.log_text();
    assert!(
        log_has_open(&log, "data.bin", io),
        "log does not say `data path={io}` for data.bin:\n{log}"
    );
    assert!(
        !log.contains(&format!("data path={}", other_path(io))),
        "log names the other data path although --io {io} was given:\n{log}"
    );
}

#[test]
fn regular_files_relay() {
    if !common::require_root() {
        return;
    }
    check_regular_files("relay");
}

#[test]
fn regular_files_passthrough() {
    if !common::require_root() {
        return;
    }
    check_regular_files("passthrough");
}

fn blockdev_size(dev: &Path) -> u64 {
    run(Command::new("blockdev").arg("--getsize64").arg(dev))
        .trim()
        .parse()
        .expect("blockdev --getsize64 output")
}

/// A loop device given with `--device`: same data both ways, the device's
/// size, and the rules that keep an operator from damaging or hiding it.
fn check_device(extra: &[&str], want_path: &str) {
    let dir = scratch();
    let img = dir.path().join("disk.img");
    File::create(&img)
        .unwrap()
        .set_len(64 * MIB as u64)
        .unwrap();
    let lo = LoopDev::attach(&img);
    let backing = dir.path().join("backing");
    fs::create_dir(&backing).unwrap();
    let dev_arg = format!("disk={}", lo.path.display());
    let mut args = vec!["--device", dev_arg.as_str()];
    args.extend_from_slice(extra);
    let m = Mount::start(dir.path(), &backing, &args);
    let disk = m.path("disk");

    let size = blockdev_size(&lo.path);
    assert_eq!(size, 64 * MIB as u64, "loop device size");
    let md = fs::metadata(&disk).unwrap();
    assert!(
        md.is_file(),
        "device entry must look like a regular file: {md:?}"
    );
    assert_eq!(md.len(), size, "size of mnt/disk vs BLKGETSIZE64");
    let names = dir_names(&m.mountpoint);
    assert_eq!(
        names,
        vec!["disk".to_string()],
        "root listing of a mount with an empty backing and one device"
    );

    // Mount -> device.
    let a = pattern(MIB + 100, 0x3c);
    write_at_sync(&disk, 5 * MIB as u64, &a);
    assert_same(
        &read_at(&lo.path, 5 * MIB as u64, a.len()),
        &a,
        "device after write through mount",
    );
    assert_same(
        &read_direct(&lo.path, 5 * MIB as u64, MIB),
        &a[..MIB],
        "device (O_DIRECT) after write through mount",
    );

    // Device -> mount, fresh open.
    let b = pattern(3 * MIB / 2, 0xa5);
    write_at_sync(&lo.path, 20 * MIB as u64, &b);
    assert_same(
        &read_at(&disk, 20 * MIB as u64, b.len()),
        &b,
        "mount after write to device",
    );
    assert_same(
        &read_direct(&disk, 20 * MIB as u64, b.len()),
        &b,
        "mount (O_DIRECT) after write to device",
    );

    // O_DIRECT write through the mount.
    let c = pattern(256 * 1024, 0x0f);
    write_direct(&disk, 30 * MIB as u64, &c).expect("O_DIRECT write to mnt/disk");
    assert_same(
        &read_direct(&lo.path, 30 * MIB as u64, c.len()),
        &c,
        "device after O_DIRECT write through mount",
    );

    // The last block is writable; nothing after it is.
    let last = pattern(4096, 0xee);
    write_at_sync(&disk, size - 4096, &last);
    assert_same(
        &read_at(&lo.path, size - 4096, 4096),
        &last,
        "last block of the device",
    );
    {
        let f = OpenOptions::new().write(true).open(&disk).unwrap();
        assert_eq!(
            errno_of(f.write_at(&[1u8; 4096], size), "write at end of device"),
            libc::ENOSPC
        );
        assert_eq!(
            errno_of(
                f.write_at(&[1u8; 512], size + MIB as u64),
                "write past end of device"
            ),
            libc::ENOSPC
        );

        // Truncation can only keep the size.
        assert_eq!(
            errno_of(f.set_len(size / 2), "truncate device to half"),
            libc::EINVAL
        );
        assert_eq!(
            errno_of(f.set_len(size + 4096), "truncate device larger"),
            libc::EINVAL
        );
        f.set_len(size)
            .expect("truncate device to its own size is a no-op");
    }
    assert_eq!(
        errno_of(
            OpenOptions::new().write(true).truncate(true).open(&disk),
            "open device with O_TRUNC"
        ),
        libc::EINVAL
    );
    assert_eq!(
        fs::metadata(&disk).unwrap().len(),
        size,
        "device size after refused truncates"
    );
    assert_same(
        &read_at(&lo.path, 5 * MIB as u64, a.len()),
        &a,
        "device data after refused truncates",
    );

    // The entry cannot be removed or replaced.
    assert_eq!(
        errno_of(fs::remove_file(&disk), "unlink mnt/disk"),
        libc::EPERM
    );
    assert_eq!(
        errno_of(fs::rename(&disk, m.path("disk2")), "rename mnt/disk"),
        libc::EPERM
    );
    fs::write(m.path("other"), b"x").unwrap();
    assert_eq!(
        errno_of(fs::rename(m.path("other"), &disk), "rename onto mnt/disk"),
        libc::EPERM
    );
    assert_eq!(
        fs::metadata(&disk).unwrap().len(),
        size,
        "mnt/disk after refused unlink/rename"
    );
    assert!(
        !m.path("disk2").exists(),
        "refused rename must not create disk2"
    );
    let backing_names = dir_names(&backing);
    assert_eq!(
        backing_names,
        vec!["other".to_string()],
        "the device must never appear in BACKING_DIR"
    );

    let log = m.log_text();
    assert!(
        log_has_open(&log, "disk", want_path),
        "log does not say `data path={want_path}` for disk:\n{log}"
    );
    assert!(
        !log_has_open(&log, "disk", "passthrough"),
        "a device must never use passthrough:\n{log}"
    );
}

/// Devices default to the cached path; `--io` is for regular files only.
/// The cached path written through (the default; write-back is
/// `writeback_device_entry`).
#[test]
fn device_default_io() {
    if !common::require_root() {
        return;
    }
    check_device(&[], "cached");
}

#[test]
fn device_with_io_relay_stays_cached() {
    if !common::require_root() {
        return;
    }
    check_device(&["--io", "relay"], "cached");
}

/// `--writeback auto` on a mount that serves devices only (`--device`
/// entries and an empty backing directory): the kernel's writeback cache. A buffered
/// write is done once it is in this host's page cache; fsync puts it on the
/// device; O_DIRECT readers and writers see and reach the same bytes;
/// mapped writes too; the size rules of a device entry hold; and no regular
/// file can be created, since the kernel trusts its own size of every
/// regular file on such a connection.
#[test]
fn writeback_device_entry() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let img = dir.path().join("disk.img");
    File::create(&img)
        .unwrap()
        .set_len(64 * MIB as u64)
        .unwrap();
    let lo = LoopDev::attach(&img);
    let backing = dir.path().join("backing");
    fs::create_dir(&backing).unwrap();
    let dev_arg = format!("disk={}", lo.path.display());
    let m = Mount::start(
        dir.path(),
        &backing,
        &["--device", &dev_arg, "--writeback", "auto"],
    );
    assert_eq!(
        common::status(&m)["data_paths"]["writeback"],
        true,
        "a devices-only mount is write-back with --writeback auto:\n{}",
        m.log_text()
    );
    let disk = m.path("disk");
    let size = 64 * MIB as u64;

    // A buffered write stays in this host's cache until fsync.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .unwrap();
    let a = pattern(MIB + 100, 0x5a);
    f.write_all_at(&a, 3 * MIB as u64 + 10).unwrap();
    // Counted in this process: a `migsafe residency` child's close would
    // write the inode's dirty pages back (FLUSH).
    let dirty = page_state(&disk).dirty;
    assert!(
        dirty > 0,
        "write-back: the write is dirty in the FUSE inode (dirty={dirty})"
    );
    f.sync_all().unwrap();
    assert_eq!(
        page_state(&disk).dirty,
        0,
        "fsync wrote every dirty page back"
    );
    let span = (a.len() + 10).div_ceil(4096) * 4096;
    assert_same(
        &read_direct(&lo.path, 3 * MIB as u64, span)[10..10 + a.len()],
        &a,
        "device after fsync",
    );
    // O_DIRECT through the mount: reads what buffered writers wrote (still
    // dirty), and its writes are what buffered readers then read.
    let b = pattern(8192, 0x77);
    f.write_all_at(&b, 20 * MIB as u64).unwrap();
    assert_same(
        &read_direct(&disk, 20 * MIB as u64, 8192),
        &b,
        "O_DIRECT read of a dirty range through the mount",
    );
    let c = pattern(4096, 0x11);
    write_direct(&disk, 24 * MIB as u64, &c).expect("O_DIRECT write through the mount");
    assert_same(
        &read_at(&disk, 24 * MIB as u64, 4096),
        &c,
        "buffered read after O_DIRECT write",
    );
    // A shared mapping's writes reach the device at msync.
    {
        let d = pattern(4096, 0x42);
        let at = 30 * MIB;
        let mut map = Mapping::shared(&f, 32 * MIB).expect("shared mmap of a write-back device");
        map.bytes()[at..at + 4096].copy_from_slice(&d);
        map.msync();
        assert_same(
            &read_direct(&lo.path, at as u64, 4096),
            &d,
            "device after msync",
        );
    }
    // A device's size rules hold.
    assert_eq!(
        errno_of(f.set_len(size / 2), "truncate device to half"),
        libc::EINVAL
    );
    f.set_len(size)
        .expect("truncate to its own size is a no-op");
    assert_eq!(fs::metadata(&disk).unwrap().len(), size);
    drop(f);

    // No regular file: created or made with mknod.
    assert_eq!(
        errno_of(fs::write(m.path("other"), b"x"), "create a regular file"),
        libc::EPERM
    );
    assert!(
        m.log_text().contains("this mount serves devices only"),
        "{}",
        m.log_text()
    );
    assert!(
        dir_names(&backing).is_empty(),
        "nothing was created in the backing"
    );
    fs::create_dir(m.path("sub")).expect("directories are fine");
}

/// `--writeback on` where it cannot be: a clear start error; `auto` there
/// is write-through (and without `--writeback`, always).
#[test]
fn writeback_needs_a_devices_only_mount() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let img = dir.path().join("disk.img");
    File::create(&img).unwrap().set_len(4 * MIB as u64).unwrap();
    let lo = LoopDev::attach(&img);
    let backing = dir.path().join("backing");
    fs::create_dir(&backing).unwrap();
    fs::write(backing.join("notes.txt"), b"x").unwrap();
    let dev_arg = format!("disk={}", lo.path.display());
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let out = Command::new(common::BIN)
        .args(["mount", "--writeback", "on", "--device", &dev_arg])
        .arg(&backing)
        .arg(&mnt)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--writeback on") && err.contains("not empty") && err.contains("notes.txt"),
        "the error names the option, the reason and the entry: {err}"
    );
    let m = Mount::start(
        dir.path(),
        &backing,
        &["--device", &dev_arg, "--writeback", "auto"],
    );
    assert_eq!(common::status(&m)["data_paths"]["writeback"], false);
    assert!(
        m.log_text().contains("--writeback auto: off"),
        "{}",
        m.log_text()
    );
}

#[test]
fn device_io_relay() {
    if !common::require_root() {
        return;
    }
    check_device(&["--device-io", "relay"], "relay");
}

/// A `--device` that is a regular file: one whose size ends inside a block
/// cannot take the cached path (an aligned O_DIRECT write of its last block
/// would grow it), so it is served by relay; one on tmpfs (O_DIRECT since
/// Linux 6.6) takes the cached path. The same bytes both ways, and the file
/// never changes size.
#[test]
fn file_devices_keep_their_size_on_either_path() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let t = common::KMount::tmpfs(&dir.path().join("t"), "16m");
    let odd = dir.path().join("odd.img");
    let odd_len = MIB as u64 + 100;
    File::create(&odd).unwrap().set_len(odd_len).unwrap();
    let on_tmpfs = t.path.join("lun.img");
    File::create(&on_tmpfs)
        .unwrap()
        .set_len(MIB as u64)
        .unwrap();
    let backing = dir.path().join("backing");
    fs::create_dir(&backing).unwrap();
    let a = format!("odd={}", odd.display());
    let b = format!("tmp={}", on_tmpfs.display());
    let m = Mount::start(dir.path(), &backing, &["--device", &a, "--device", &b]);
    for (name, raw, len, path) in [
        ("odd", &odd, odd_len, "relay"),
        ("tmp", &on_tmpfs, MIB as u64, "cached"),
    ] {
        let data = pattern(300, 0x5e);
        write_at_sync(&m.path(name), len - 300, &data);
        assert_same(&read_at(raw, len - 300, 300), &data, name);
        assert_same(&read_at(&m.path(name), len - 300, 300), &data, name);
        assert_eq!(fs::metadata(raw).unwrap().len(), len, "{name} changed size");
        let log = m.log_text();
        assert!(
            log_has_open(&log, name, path),
            "{name} must use the {path} data path:\n{log}"
        );
    }
}

#[test]
fn regular_files_cached() {
    if !common::require_root() {
        return;
    }
    check_regular_files("cached");
}

/// A small deterministic generator (xorshift64*), so a failing sequence of
/// operations repeats exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// In `[lo, hi]`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

fn open_rw_at(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn read_range(f: &File, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) => panic!("read at {offset}: {e}"),
        }
    }
    buf.truncate(done);
    buf
}

/// The cached path on a regular file that grows and shrinks: appends,
/// unaligned writes that end past EOF (with and without a hole before
/// them), overwrites across EOF, truncates both ways, extending fallocate
/// and appends through fresh O_WRONLY|O_APPEND opens, each checked against
/// a model of the file: size through the mount and in the backing, every
/// byte of the changing region through the mount and in the backing, and
/// reads at and across EOF ending exactly there. Meanwhile a second thread
/// keeps writing unaligned pieces of the region before it, whose last block
/// is shared with the changing region, and checks each one.
#[test]
fn cached_file_follows_a_model_while_it_grows_and_shrinks() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let backing = dir.path().join("backing");
    fs::create_dir(&backing).unwrap();
    // The -o form of the option.
    let m = Mount::start(dir.path(), &backing, &["-o", "io=cached"]);
    let path = m.path("grow.img");
    let raw = backing.join("grow.img");
    // [0, floor) belongs to the second thread; the rest to the main one.
    let floor: u64 = MIB as u64 + 1000;
    let prefix = pattern(floor as usize, 0x31);
    fs::write(&path, &prefix).unwrap();

    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let other = s.spawn(|| {
            let f = open_rw_at(&path);
            let mut model = prefix.clone();
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            let mut writes = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || writes < 50 {
                let off = rng.range(0, floor - 1);
                let len = rng.range(1, 9000.min(floor - off)) as usize;
                let data = pattern(len, writes as u8);
                f.write_all_at(&data, off).unwrap();
                model[off as usize..off as usize + len].copy_from_slice(&data);
                assert_same(&read_range(&f, off, len), &data, "second thread: read-back");
                writes += 1;
            }
            assert_same(
                &read_range(&f, 0, floor as usize),
                &model,
                "second thread's region at the end",
            );
            model
        });

        // Stops the second thread also when an assertion below panics (the
        // scope waits for it).
        let stopper = common::SetOnDrop(&stop);
        let f = open_rw_at(&path);
        // O_DIRECT reads through the mount reach the daemon with the size
        // asked for, past EOF: the reply must still end exactly there.
        let fd = {
            use std::os::unix::fs::OpenOptionsExt;
            OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(&path)
                .unwrap()
        };
        let mut dbuf = common::AlignedBuf::zeroed(16384);
        let mut model: Vec<u8> = prefix.clone();
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for step in 0..400u32 {
            let size = model.len() as u64;
            let kind = rng.range(0, 7);
            let what = match kind {
                0 | 1 => {
                    let len = rng.range(1, 20_000) as usize;
                    let data = pattern(len, step as u8);
                    f.write_all_at(&data, size).unwrap();
                    model.extend_from_slice(&data);
                    format!("append {len}")
                }
                2 => {
                    let gap = rng.range(1, 10_000);
                    let len = rng.range(1, 10_000) as usize;
                    let data = pattern(len, step as u8 ^ 0x80);
                    f.write_all_at(&data, size + gap).unwrap();
                    model.resize((size + gap) as usize, 0);
                    model.extend_from_slice(&data);
                    format!("write {len} after a hole of {gap}")
                }
                3 => {
                    let back = rng.range(0, (size - floor).min(6000));
                    let len = rng.range(back + 1, back + 9000) as usize;
                    let off = size - back;
                    let data = pattern(len, step as u8 ^ 0x40);
                    f.write_all_at(&data, off).unwrap();
                    model.resize(off as usize, 0);
                    model.extend_from_slice(&data);
                    format!("write {len} at {off} across EOF")
                }
                4 => {
                    let new = rng.range(floor, size);
                    f.set_len(new).unwrap();
                    model.truncate(new as usize);
                    format!("truncate down to {new}")
                }
                5 => {
                    let new = size + rng.range(1, 12_000);
                    f.set_len(new).unwrap();
                    model.resize(new as usize, 0);
                    format!("truncate up to {new}")
                }
                6 => {
                    let off = rng.range(floor, size);
                    let len = size - off + rng.range(1, 9000);
                    // SAFETY: plain syscall on an open fd.
                    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, off as i64, len as i64) };
                    assert_eq!(r, 0, "fallocate: {}", io::Error::last_os_error());
                    model.resize((off + len) as usize, 0);
                    format!("fallocate {off}+{len}")
                }
                _ => {
                    let len = rng.range(1, 3000) as usize;
                    let data = pattern(len, step as u8 ^ 0x20);
                    let mut a = OpenOptions::new().append(true).open(&path).unwrap();
                    a.write_all(&data).unwrap();
                    drop(a);
                    model.extend_from_slice(&data);
                    format!("O_WRONLY|O_APPEND write {len}")
                }
            };
            let want = model.len() as u64;
            let ctx = format!("step {step} ({what}), model size {want}");
            assert_eq!(
                f.metadata().unwrap().len(),
                want,
                "{ctx}: size through the mount"
            );
            assert_eq!(
                fs::metadata(&path).unwrap().len(),
                want,
                "{ctx}: stat through the mount"
            );
            assert_eq!(
                fs::metadata(&raw).unwrap().len(),
                want,
                "{ctx}: size in the backing"
            );
            let tail = (want - floor) as usize;
            assert_same(
                &read_range(&f, floor, tail + 5000),
                &model[floor as usize..],
                &format!("{ctx}: bytes through the mount (read across EOF)"),
            );
            let b = File::open(&raw).unwrap();
            assert_same(
                &read_range(&b, floor, tail + 5000),
                &model[floor as usize..],
                &format!("{ctx}: bytes in the backing"),
            );
            assert!(
                read_range(&f, want, 4096).is_empty(),
                "{ctx}: a read at EOF returned bytes"
            );
            let at = (want - 7) / 4096 * 4096;
            if at >= floor {
                let n = fd.read_at(dbuf.as_mut_slice(), at).unwrap();
                assert_eq!(
                    n as u64,
                    want - at,
                    "{ctx}: O_DIRECT read across EOF at {at}"
                );
                assert_same(
                    &dbuf.as_slice()[..n],
                    &model[at as usize..],
                    &format!("{ctx}: O_DIRECT read across EOF"),
                );
            }
            let around = want.saturating_sub(7).max(floor);
            assert_eq!(
                read_range(&f, around, 100).len() as u64,
                want - around,
                "{ctx}: a read across EOF must end exactly at EOF"
            );
        }
        drop(stopper);
        let theirs = other.join().expect("second thread");
        assert_same(
            &read_range(&f, 0, floor as usize),
            &theirs,
            "the second thread's region after both finished",
        );
        assert_same(
            &read_range(&File::open(&raw).unwrap(), 0, floor as usize),
            &theirs,
            "the second thread's region in the backing",
        );
    });

    let log = m.log_text();
    assert!(
        log_has_open(&log, "grow.img", "cached"),
        "log does not say `data path=cached` for grow.img:\n{log}"
    );
    assert!(
        !log.contains("data path=relay") && !log.contains("data path=passthrough"),
        "a handle of an --io cached mount used another data path:\n{log}"
    );
}

/// The one cache of a cached regular file is the FUSE inode's: what is
/// written and read through the mount is resident there and the backing's
/// page cache holds nothing of it; status names the data path per handle.
#[test]
fn cached_file_has_one_cache_the_fuse_inodes() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let backing = dir.path().join("backing");
    fs::create_dir(&backing).unwrap();
    let m = Mount::start(dir.path(), &backing, &["--io", "cached"]);
    let path = m.path("one.img");
    let data = pattern(4 * MIB + 300, 0x6b);
    fs::write(&path, &data).unwrap();
    // Held open: residency's own open of the mount file is then a later
    // open, which keeps the FUSE cache it measures.
    let _holder = hold_open(&path);
    assert_same(
        &fs::read(&path).unwrap(),
        &data,
        "read back through the mount",
    );
    let fuse = residency(&path);
    assert!(
        fuse.cached >= (4 * MIB / 4096) as u64,
        "the FUSE inode must cache what was written and read (cached={})",
        fuse.cached
    );
    assert_eq!(fuse.dirty, 0, "write-through: no dirty FUSE pages");
    assert_eq!(
        residency(&backing.join("one.img")).cached,
        0,
        "the backing's page cache must hold nothing of a cached image"
    );
    let st = status_image(&m, "one.img");
    let paths: Vec<&str> = st["open_handles"]
        .as_array()
        .expect("open_handles")
        .iter()
        .map(|h| h["data_path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, vec!["cached"], "status: {st}");
    assert_eq!(st["cached_pages"], 0, "status: the backing's pages: {st}");
    assert!(
        st["fuse_cache"]["cached_pages"].as_u64().unwrap_or(0) >= (4 * MIB / 4096) as u64,
        "status must count the FUSE inode's pages of a cached file: {st}"
    );
    let doc = status(&m);
    assert_eq!(doc["data_paths"]["io"], "cached");
    // The cached path never registers passthrough backings, which would
    // need CAP_SYS_ADMIN.
    assert_eq!(doc["data_paths"]["passthrough_active"], false, "{doc}");
}

/// The invalidation a first open queues (the image's size may have changed
/// on another host) drops the kernel's attributes, never the pages: those
/// the open reply drops at once (no FOPEN_KEEP_CACHE). Queued, it may land
/// at any later moment; held 1.5 s here on the invalidation thread alone,
/// it lands after the opener has read the image through the cached path,
/// and what was read stays cached. (It used to drop them: a late drop of
/// fresh pages, and a status that counted fewer FUSE pages than were
/// read.)
#[test]
fn a_late_queued_invalidation_keeps_the_pages_read_since() {
    if !common::require_root() || !common::have_tool("strace") {
        return;
    }
    let dir = scratch();
    let backing = dir.path().join("backing");
    fs::create_dir(&backing).unwrap();
    let m = Mount::start(dir.path(), &backing, &["--io", "cached"]);
    let path = m.path("one.img");
    let data = pattern(4 * MIB, 0x5d);
    fs::write(&path, &data).unwrap();
    let pid = m.pid().unwrap();
    let tid = thread_named(pid, "migsafe-inval").expect("the invalidation thread");
    let held = Strace::inject_thread(tid, "write,writev", "delay_enter=1500000");
    // The first open since the write: it queues the invalidation.
    let _holder = hold_open(&path);
    assert_same(&fs::read(&path).unwrap(), &data, "read through the mount");
    let pages = (4 * MIB / 4096) as u64;
    let before = residency(&path).cached;
    assert!(before >= pages, "read pages cached: {before}");
    // Bed check: the invalidation is held in the thread's write to
    // /dev/fuse, not yet sent.
    let syscall_nr = || {
        fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<i64>().ok())
    };
    let nr = syscall_nr();
    assert!(
        nr == Some(libc::SYS_write) || nr == Some(libc::SYS_writev),
        "the invalidation was not held in its write: syscall {nr:?}"
    );
    drop(held);
    // Detached: the held write reaches the kernel and the thread waits for
    // the next request again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while syscall_nr() != Some(libc::SYS_futex) {
        assert!(
            std::time::Instant::now() < deadline,
            "the invalidation thread never went back to waiting: syscall {:?}",
            syscall_nr()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let after = residency(&path).cached;
    assert!(
        after >= pages,
        "the late invalidation dropped pages read after the open: {before} -> {after}"
    );
}

/// A backing that refuses O_DIRECT (ramfs) serves `--io cached` images by
/// relay, says so in the log, and keeps the data right.
#[test]
fn cached_falls_back_to_relay_where_o_direct_is_refused() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let ram = common::KMount::mount(&["-t", "ramfs", "ramfs"], &dir.path().join("ram"));
    let m = Mount::start(dir.path(), &ram.path, &["--io", "cached"]);
    let data = pattern(MIB + 77, 0x19);
    fs::write(m.path("r.img"), &data).unwrap();
    write_at_sync(&m.path("r.img"), 4097, &data[..5000]);
    let mut want = data.clone();
    want[4097..4097 + 5000].copy_from_slice(&data[..5000]);
    assert_same(
        &fs::read(ram.path.join("r.img")).unwrap(),
        &want,
        "ramfs backing",
    );
    assert_same(
        &fs::read(m.path("r.img")).unwrap(),
        &want,
        "through the mount",
    );
    let log = m.log_text();
    assert!(
        log.contains("cached data path unavailable") && log_has_open(&log, "r.img", "relay"),
        "the fallback to relay must be logged:\n{log}"
    );
    assert!(
        !log_has_open(&log, "r.img", "cached"),
        "no handle may use the cached path on ramfs:\n{log}"
    );
    drop(m);
}

/// While one thread appends unaligned pieces to a cached regular file,
/// nobody going through the mount may see the file padded to a whole block
/// (as an O_DIRECT write of the last block would make it; the daemon writes
/// a partial last block exactly, datapath/cached.rs). No append ends on a
/// 512-byte boundary, and the kernel splits a write only at page
/// boundaries, so an end of file seen by an O_DIRECT read (served by the
/// daemon) or by `stat` that is a multiple of 512 but not of 4096 is a
/// padded one (on ext4, which reports 512-byte O_DIRECT alignment).
#[test]
fn cached_readers_never_see_a_padded_length() {
    if !common::require_root() {
        return;
    }
    use std::os::unix::fs::OpenOptionsExt;
    let dir = scratch();
    let backing = dir.path().join("backing");
    fs::create_dir(&backing).unwrap();
    let m = Mount::start(dir.path(), &backing, &["--io", "cached"]);
    let path = m.path("odd.img");
    fs::write(&path, pattern(4097, 1)).unwrap();
    let padded = |len: u64| len.is_multiple_of(512) && !len.is_multiple_of(4096);
    let done = std::sync::atomic::AtomicBool::new(false);
    // How often the reader's O_DIRECT read ended at end of file. The writer
    // goes on until that has happened often enough to mean something (a
    // loaded machine may schedule the reader rarely), within a bound.
    let sightings = std::sync::atomic::AtomicU64::new(0);
    let seen = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let f = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(&path)
                .unwrap();
            let mut buf = common::AlignedBuf::zeroed(8192);
            let mut last = 4097u64;
            let mut seen = 0u64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let at = last / 4096 * 4096;
                let n = f.read_at(buf.as_mut_slice(), at).unwrap() as u64;
                if n < 8192 {
                    let eof = at + n;
                    assert!(
                        !padded(eof),
                        "an O_DIRECT read ended at {eof}: a padded length"
                    );
                    assert!(eof >= last, "end of file went back from {last} to {eof}");
                    last = eof;
                    seen += 1;
                    sightings.store(seen, std::sync::atomic::Ordering::Relaxed);
                } else {
                    last = at + 4096;
                }
                let st = fs::metadata(&path).unwrap().len();
                assert!(
                    !padded(st),
                    "stat through the mount said {st}: a padded length"
                );
            }
            seen
        });
        let _done = common::SetOnDrop(&done);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        let mut rng = Rng(0x5eed);
        let mut size = 4097u64;
        for i in 0..200_000u64 {
            if i >= 4000 && sightings.load(std::sync::atomic::Ordering::Relaxed) > 200 {
                break;
            }
            let mut len = rng.range(1, 200);
            if (size + len).is_multiple_of(512) {
                len += 1;
            }
            f.write_all(&pattern(len as usize, i as u8)).unwrap();
            size += len;
        }
        drop(_done);
        reader.join().expect("reader")
    });
    assert!(seen > 100, "the reader saw end of file only {seen} times");
    assert!(
        m.log_text().contains("dio_align=512"),
        "the bed must align O_DIRECT to 512 bytes for this test to see anything:\n{}",
        m.log_text()
    );
}
