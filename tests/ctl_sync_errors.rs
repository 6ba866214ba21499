//! Sticky sync errors (docs/DESIGN.md §3): once a backing sync of an image fails,
//! every later fsync, close-sync and `inactivate` fails with the same errno
//! until `activate`; a failed `inactivate` leaves the image active.
//!
//! The failing storage: a loop device over a sparse 64 MiB file on a 4-6 MiB
//! tmpfs. Writes fit the page cache; writeback runs out of tmpfs space and the
//! loop device fails it, so the error appears at fsync time (device-mapper is
//! not available on this kernel). Measured here: raw fsync on such a device
//! fails once with EIO and the next fsync "succeeds" (the kernel marks the lost
//! pages clean) — the negative control that makes stickiness necessary.

mod common;

use common::{
    KMount, LoopDev, Mount, ctl_write_read, errno_result, last_errno, open_rw, residency, scratch,
    status, status_image,
};
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::os::unix::io::IntoRawFd;
use std::path::Path;
use std::process::Command;

const MIB: usize = 1 << 20;

// ---------------------------------------------------------------------------
// Local helpers (not in tests/common).

fn errno_name(e: i32) -> &'static str {
    match e {
        libc::EIO => "EIO",
        libc::ENOSPC => "ENOSPC",
        libc::EBUSY => "EBUSY",
        libc::EROFS => "EROFS",
        libc::EDQUOT => "EDQUOT",
        _ => "other",
    }
}

/// close(2) and its result (File's Drop ignores it).
fn close_errno(f: File) -> Result<(), i32> {
    let fd = f.into_raw_fd();
    // SAFETY: fd is owned and closed exactly once here.
    let rc = unsafe { libc::close(fd) };
    if rc == 0 { Ok(()) } else { Err(last_errno()) }
}

/// Writes `len` bytes of `byte` at `offset` in 1 MiB chunks (no sync).
fn fill(f: &File, offset: u64, len: usize, byte: u8) {
    let chunk = vec![byte; MIB];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(MIB);
        f.write_all_at(&chunk[..n], offset + done as u64)
            .unwrap_or_else(|e| panic!("buffered write at {}: {e}", offset + done as u64));
        done += n;
    }
}

/// Tests of this file run one at a time: each fills a small tmpfs to make
/// writeback fail, and with several at once (measured: about one run in
/// five) one bed's writeback could succeed where it must fail.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// A loop device over a sparse 64 MiB file on a tmpfs of `size`.
fn failing_device(dir: &Path, name: &str, size: &str) -> (KMount, LoopDev) {
    let t = KMount::tmpfs(&dir.join(name), size);
    let file = t.path.join("lun");
    File::create(&file)
        .unwrap()
        .set_len(64 * MIB as u64)
        .unwrap();
    let lo = LoopDev::attach(&file);
    (t, lo)
}

/// The storage recovers (the tmpfs grows). The error stays sticky through the
/// mount; once this host's leftover dirty pages are written out (outside
/// migsafe: a fresh fd does not see the old error), `activate` clears it and
/// fsync / inactivate work again.
fn recover_and_activate(m: &Mount, image: &str, t: &KMount, raw: &Path, e: i32) {
    let name = errno_name(e);
    t.remount_size("256m");
    let w = open_rw(&m.path(image));
    assert_eq!(
        errno_result(w.sync_all()),
        Err(e),
        "fsync must stay failed with {name} after the storage recovered, until activate\nlog:\n{}",
        m.log_text()
    );
    drop(w);
    let r = residency(raw);
    eprintln!(
        "left on this host after the failure: {} dirty, {} writeback pages",
        r.dirty, r.writeback
    );
    // Bed repair, not the subject: writeback that was already in flight
    // when the storage grew can still end with EIO and be reported to a fd
    // opened before it ended, so let it drain and retry a few times.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while residency(raw).writeback > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut repaired = Err(None);
    for _ in 0..5 {
        repaired = open_rw(raw).sync_all().map_err(|e| e.raw_os_error());
        if repaired.is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(
        repaired,
        Ok(()),
        "bed: a fresh sync of {} must work once the storage has room",
        raw.display()
    );
    let st = status_image(m, image);
    assert_eq!(
        st["sticky_error"], name,
        "still sticky before activate: {st}"
    );

    let (res, out) = ctl_write_read(&m.ctl("activate"), &format!("{image}\n"));
    assert_eq!(res, Ok(()), "activate: {out}\nlog:\n{}", m.log_text());
    let st = status_image(m, image);
    assert!(
        st["sticky_error"].is_null(),
        "activate must clear the sticky {name}: {st}"
    );
    assert_eq!(st["state"], "active");

    // Cleared: write + fsync, close and inactivate work again.
    let w = open_rw(&m.path(image));
    w.write_all_at(&[b'R'; 4096], 0).unwrap();
    assert_eq!(
        errno_result(w.sync_all()),
        Ok(()),
        "fsync after activate\nlog:\n{}",
        m.log_text()
    );
    assert_eq!(close_errno(w), Ok(()), "close after activate");
    let (res, out) = ctl_write_read(&m.ctl("inactivate"), &format!("{image}\n"));
    assert_eq!(
        res,
        Ok(()),
        "inactivate after activate: {out}\nlog:\n{}",
        m.log_text()
    );
    assert_eq!(status_image(m, image)["state"], "inactive");
}

// ---------------------------------------------------------------------------

/// The common part: `w1` (already written, unsynced, over capacity) fsyncs,
/// `w2` writes and closes, then `inactivate`, then `activate`.
fn sticky_flow(m: &Mount, image: &str, w1: File, w2: File) -> i32 {
    let e = errno_result(w1.sync_all()).expect_err(
        "fsync after writing beyond the storage's capacity must fail (the bed is broken)",
    );
    assert!(
        e == libc::EIO || e == libc::ENOSPC,
        "fsync failed with errno {e}, expected EIO or ENOSPC"
    );
    let name = errno_name(e);
    eprintln!("first fsync failed with {name}");

    // Sticky: the kernel would now report success; migsafe must not.
    assert_eq!(
        errno_result(w1.sync_all()),
        Err(e),
        "second fsync must fail with the same errno {name}\nlog:\n{}",
        m.log_text()
    );

    // Another writer handle: write a little (where the storage has room), close.
    w2.write_all_at(&[b'Z'; 4096], 0)
        .expect("small buffered write");
    assert_eq!(
        close_errno(w2),
        Err(e),
        "close of another writer must fail with the sticky {name}\nlog:\n{}",
        m.log_text()
    );

    let (res, out) = ctl_write_read(&m.ctl("inactivate"), &format!("{image}\n"));
    assert_eq!(
        res,
        Err(e),
        "inactivate must fail with the sticky {name}; read-back: {out}\nlog:\n{}",
        m.log_text()
    );
    assert!(out.contains("result=error"), "read-back: {out:?}");
    assert!(out.contains(&format!("errno={name}")), "read-back: {out:?}");
    let st = status_image(m, image);
    assert_eq!(
        st["state"], "active",
        "failed inactivate must leave the image active: {st}"
    );
    assert_eq!(
        st["sticky_error"], name,
        "status must show the sticky error: {st}"
    );

    // Still sticky for a third fsync after the failed inactivate.
    assert_eq!(
        errno_result(w1.sync_all()),
        Err(e),
        "fsync after failed inactivate"
    );

    // `invalidate` (whatever its own result) never clears it: only activate
    // does. Otherwise the next inactivate would say ok for data that never
    // reached storage.
    let (_, out) = ctl_write_read(&m.ctl("invalidate"), &format!("{image}\n"));
    let st = status_image(m, image);
    assert_eq!(
        st["sticky_error"], name,
        "invalidate must not clear the sticky error (invalidate said {out:?}): {st}"
    );
    let (res, out) = ctl_write_read(&m.ctl("inactivate"), &format!("{image}\n"));
    assert_eq!(
        res,
        Err(e),
        "inactivate after invalidate must still fail with {name}: {out}"
    );
    drop(w1);
    e
}

#[test]
fn raw_device_forgets_the_error_negative_control() {
    if !common::require_root() {
        return;
    }
    let _serial = serial();
    let dir = scratch();
    let (_t, lo) = failing_device(dir.path(), "t", "4m");
    let f = open_rw(&lo.path);
    fill(&f, 0, 8 * MIB, b'X');
    assert!(
        errno_result(f.sync_all()).is_err(),
        "bed: raw fsync must fail"
    );
    assert_eq!(
        errno_result(f.sync_all()),
        Ok(()),
        "bed: the kernel reports success on the second fsync (which is why migsafe is sticky)"
    );
}

#[test]
fn device_image_sync_error_is_sticky_until_activate() {
    if !common::require_root() {
        return;
    }
    let _serial = serial();
    let dir = scratch();
    let (t, lo) = failing_device(dir.path(), "t", "4m");
    let back = dir.path().join("back");
    fs::create_dir(&back).unwrap();
    let dev = format!("img={}", lo.path.display());
    // relay: the device's page cache holds the writes until writeback, which
    // is where the sticky rules apply (cached writes are O_DIRECT and fail
    // at write time: see cached_device_write_error_reaches_the_writer).
    let m = Mount::start(
        dir.path(),
        &back,
        &["--device", &dev, "--device-io", "relay"],
    );
    let img = m.path("img");

    let w2 = open_rw(&img);
    let w1 = open_rw(&img);
    fill(&w1, 0, 8 * MIB, b'X');
    let e = sticky_flow(&m, "img", w1, w2);
    recover_and_activate(&m, "img", &t, &lo.path, e);
}

/// Directory backing: ext4 (no journal) on the failing loop device.
fn dir_image_sticky(io: &str) {
    let dir = scratch();
    let (t, lo) = failing_device(dir.path(), "t", "6m");
    common::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-O", "^has_journal", "-E", "lazy_itable_init=0"])
            .arg(&lo.path),
    );
    let ext = KMount::dev(&lo.path, &dir.path().join("ext"));
    let m = Mount::start(dir.path(), &ext.path, &["--io", io]);
    let img = m.path("vm.img");
    File::create(&img).unwrap();
    let w2 = open_rw(&img);
    let w1 = open_rw(&img);
    fill(&w1, 0, 16 * MIB, b'X');
    let log = m.log_text();
    assert!(
        log.contains(&format!("data path={io}")),
        "expected the {io} data path; log:\n{log}"
    );
    let e = sticky_flow(&m, "vm.img", w1, w2);
    recover_and_activate(&m, "vm.img", &t, &ext.path.join("vm.img"), e);
}

#[test]
fn dir_image_relay_sync_error_is_sticky_until_activate() {
    if !common::require_root() || !common::have_tool("mkfs.ext4") {
        return;
    }
    let _serial = serial();
    dir_image_sticky("relay");
}

#[test]
fn dir_image_passthrough_sync_error_is_sticky_until_activate() {
    if !common::require_root() || !common::have_tool("mkfs.ext4") {
        return;
    }
    let _serial = serial();
    dir_image_sticky("passthrough");
}

/// With fsync-on-close off, a writeback error that happens after the last
/// handle closed must still fail the next `inactivate` (the daemon keeps an
/// fd whose error sequence predates the writes). A fresh fd, as used before,
/// never sees it: the control is the raw device, whose fresh fd syncs ok.
#[test]
fn writeback_error_with_no_handle_open_fails_inactivate() {
    if !common::require_root() {
        return;
    }
    let _serial = serial();
    let dir = scratch();
    let (_t, lo) = failing_device(dir.path(), "t", "4m");
    let back = dir.path().join("back");
    fs::create_dir(&back).unwrap();
    let dev = format!("img={}", lo.path.display());
    let m = Mount::start(
        dir.path(),
        &back,
        &[
            "--device",
            &dev,
            "--device-io",
            "relay",
            "--fsync-on-close",
            "off",
        ],
    );
    let w = open_rw(&m.path("img"));
    fill(&w, 0, 8 * MIB, b'X');
    assert_eq!(close_errno(w), Ok(()), "close without fsync-on-close");
    // The host writes the pages back while nobody has the image open; the
    // error lands in the device's error sequence (this fd sees it once).
    let raw = open_rw(&lo.path);
    let e = errno_result(raw.sync_all()).expect_err("bed: writeback beyond capacity must fail");
    drop(raw);
    assert_eq!(
        errno_result(open_rw(&lo.path).sync_all()),
        Ok(()),
        "control: a fresh fd opened after the error syncs ok"
    );
    let (res, out) = ctl_write_read(&m.ctl("inactivate"), "img\n");
    assert_eq!(
        res,
        Err(e),
        "inactivate must report the writeback error of data written through the mount: {out}\nlog:\n{}",
        m.log_text()
    );
    assert_eq!(status_image(&m, "img")["sticky_error"], errno_name(e));
}

/// `invalidate` succeeding after a failed sync must not clear the sticky
/// error (only `activate` does): otherwise the next `inactivate` says ok
/// although the data never reached storage.
#[test]
fn invalidate_keeps_the_sticky_error() {
    if !common::require_root() {
        return;
    }
    let _serial = serial();
    let dir = scratch();
    let (_t, lo) = failing_device(dir.path(), "t", "4m");
    let back = dir.path().join("back");
    fs::create_dir(&back).unwrap();
    let dev = format!("img={}", lo.path.display());
    // relay: the device's page cache holds the writes until writeback, which
    // is where the sticky rules apply (cached writes are O_DIRECT and fail
    // at write time: see cached_device_write_error_reaches_the_writer).
    let m = Mount::start(
        dir.path(),
        &back,
        &["--device", &dev, "--device-io", "relay"],
    );
    let w = open_rw(&m.path("img"));
    fill(&w, 0, 8 * MIB, b'X');
    let e = errno_result(w.sync_all()).expect_err("bed: fsync beyond capacity must fail");
    drop(w);
    let (res, out) = ctl_write_read(&m.ctl("invalidate"), "img\n");
    assert_eq!(
        res,
        Ok(()),
        "bed: invalidate must succeed here (no dirty page is left after the failed sync): {out}"
    );
    let st = status_image(&m, "img");
    assert_eq!(
        st["sticky_error"],
        errno_name(e),
        "invalidate cleared the sticky error: {st}"
    );
    let (res, out) = ctl_write_read(&m.ctl("inactivate"), "img\n");
    assert_eq!(res, Err(e), "inactivate after invalidate: {out}");
}

/// On the cached device path written through (the default) the
/// backing fd is O_DIRECT: a write the storage cannot take fails in the
/// write itself, with the backing's errno, and nothing is acknowledged that
/// could be lost later.
#[test]
fn cached_device_write_error_reaches_the_writer() {
    if !common::require_root() {
        return;
    }
    let _serial = serial();
    let dir = scratch();
    let (_t, lo) = failing_device(dir.path(), "t", "4m");
    let back = dir.path().join("back");
    fs::create_dir(&back).unwrap();
    let dev = format!("img={}", lo.path.display());
    let m = Mount::start(dir.path(), &back, &["--device", &dev]);
    let w = open_rw(&m.path("img"));
    let chunk = vec![b'X'; MIB];
    let mut failed = None;
    for i in 0..16u64 {
        if let Err(e) = w.write_all_at(&chunk, i * MIB as u64) {
            failed = Some(e.raw_os_error());
            break;
        }
    }
    assert_eq!(
        failed,
        Some(Some(libc::ENOSPC)),
        "a write beyond the storage's room must fail with ENOSPC\nlog:\n{}",
        m.log_text()
    );
    assert!(
        m.log_text().contains("data path=cached"),
        "{}",
        m.log_text()
    );
}

/// Write-back devices: a buffered write is acknowledged once it is in this
/// host's page cache, so the storage's refusal of it at write-back reaches
/// the writer's next fsync (the kernel's one report), and then every later
/// fsync and `status` until `activate`: the pages were marked clean, so a
/// later clean fsync would say data is on the device that is not. The
/// write-through twin above is the control: there the write itself fails.
#[test]
fn writeback_device_write_error_reaches_fsync_and_stays_sticky() {
    if !common::require_root() {
        return;
    }
    let _serial = serial();
    let dir = scratch();
    let (_t, lo) = failing_device(dir.path(), "t", "4m");
    let back = dir.path().join("back");
    fs::create_dir(&back).unwrap();
    let dev = format!("img={}", lo.path.display());
    let m = Mount::start(dir.path(), &back, &["--device", &dev, "--writeback", "on"]);
    assert_eq!(
        status(&m)["data_paths"]["writeback"],
        true,
        "{}",
        m.log_text()
    );
    let w = open_rw(&m.path("img"));
    let chunk = vec![b'X'; MIB];
    for i in 0..16u64 {
        w.write_all_at(&chunk, i * MIB as u64)
            .unwrap_or_else(|e| panic!("a write-back write is acknowledged from the cache: {e}"));
    }
    let first =
        errno_result(w.sync_all()).expect_err("fsync after writes beyond the storage's room");
    assert_eq!(first, libc::ENOSPC, "{}", m.log_text());
    let again = errno_result(w.sync_all()).expect_err("the write-back error must stay sticky");
    assert_eq!(again, libc::ENOSPC);
    let other = open_rw(&m.path("img"));
    assert_eq!(
        errno_result(other.sync_all()),
        Err(libc::ENOSPC),
        "a fresh fd's fsync reports it too"
    );
    assert_eq!(status_image(&m, "img")["sticky_error"], "ENOSPC");
    let (res, out) = ctl_write_read(&m.ctl("inactivate"), "img\n");
    assert_eq!(
        res,
        Err(libc::ENOSPC),
        "inactivate must not report ok: {out}"
    );
}
