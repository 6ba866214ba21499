//! `inactivate`'s decision (docs/DESIGN.md §3): writes arriving while it
//! decides wait for it, so the command itself must never wait for the
//! mount it holds up, and a refused `inactivate` must leave the image as
//! it found it (an image already handed over stays fenced).
//!
//! The daemon's syscalls are slowed or failed with `strace` injections
//! (fsync held for a while, or failed with EIO), which makes the windows
//! these tests aim at as wide as needed without touching the code.

mod common;

use common::{Mount, Strace, ctl_write_read, field, make_file, scratch};
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Whether some thread of `pid` is inside syscall number `nr` now.
fn in_syscall(pid: u32, nr: i64) -> bool {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| e.ok()).any(|t| {
                fs::read_to_string(t.path().join("syscall"))
                    .ok()
                    .and_then(|s| s.split_whitespace().next()?.parse::<i64>().ok())
                    == Some(nr)
            })
        })
        .unwrap_or(false)
}

fn pwrite_errno(f: &fs::File, byte: u8) -> Option<i32> {
    f.write_at(&[byte; 4096], 0)
        .err()
        .map(|e| e.raw_os_error().unwrap_or(0))
}

/// An image handed over (inactive, its writes refused) is handed over for
/// good until `activate`: a second `inactivate` that fails (here its sync
/// fails with EIO) must not put it back to active, or the source's writes
/// reach storage the destination owns.
#[test]
fn a_failed_second_inactivate_keeps_the_image_fenced() {
    if !common::require_root() || !common::have_tool("strace") {
        return;
    }
    let dir = scratch();
    let backing = dir.path().join("backing");
    fs::create_dir(&backing).unwrap();
    make_file(&backing.join("vm.img"), 1 << 20, 0x11);
    let m = Mount::start(dir.path(), &backing, &["--io", "relay"]);
    let img = m.path("vm.img");
    // Not opened through the mount before the probe below: nothing of the
    // FUSE inode to write back, so the second inactivate's first sync is
    // the one of its decision.
    let (r, out) = ctl_write_read(&m.ctl("inactivate"), "vm.img\n");
    assert_eq!(r, Ok(()), "first inactivate: {out}");

    // The second inactivate fails: every fsync of the daemon fails with EIO.
    {
        let _eio = Strace::inject(m.pid().unwrap(), "fsync", "error=EIO");
        let (r, out) = ctl_write_read(&m.ctl("inactivate"), "vm.img\n");
        assert!(r.is_err(), "second inactivate must fail under EIO: {out}");
        assert_eq!(field(&out, "result").as_deref(), Some("error"), "{out}");
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    assert_eq!(
        pwrite_errno(&f, 3),
        Some(libc::EROFS),
        "a failed second inactivate put the handed-over image back to active: \
         the source's write was admitted"
    );

    // Negative control: the same write probe passes once the operator
    // activates the image (it can see an admitted write).
    let (r, out) = ctl_write_read(&m.ctl("activate"), "vm.img\n");
    assert_eq!(r, Ok(()), "activate: {out}");
    assert_eq!(pwrite_errno(&f, 4), None, "activate admits writes again");
}

/// More writers than FUSE request threads arrive while `inactivate`
/// decides (they all wait for the decision), on an image first opened
/// through the mount during that decision: the command must come to an
/// end (ok, writes refused; or refused, writes admitted), never wait for a
/// request of the mount whose every thread waits for it.
#[test]
fn inactivate_never_waits_for_the_mount_it_holds_up() {
    if !common::require_root() || !common::have_tool("strace") {
        return;
    }
    let dir = scratch();
    let backing = dir.path().join("backing");
    fs::create_dir(&backing).unwrap();
    make_file(&backing.join("vm.img"), 1 << 20, 0x11);
    let m = Mount::start(dir.path(), &backing, &["--io", "relay", "--threads", "2"]);
    let pid = m.pid().unwrap();
    // Every fsync of the daemon is held 2 s: the decision lasts that long.
    let strace = Strace::inject(pid, "fsync", "delay_exit=2000000");

    let ctl = m.ctl("inactivate");
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(ctl_write_read(&ctl, "vm.img\n"));
    });
    // The command is deciding once it syncs.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !in_syscall(pid, libc::SYS_fsync) {
        assert!(
            Instant::now() < deadline,
            "inactivate never reached its sync"
        );
        sleep(Duration::from_millis(5));
    }
    // The image's first open through the mount, then three writers: more
    // than the two request threads, each waiting for the decision.
    let f = std::sync::Arc::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.path("vm.img"))
            .unwrap(),
    );
    let (w_tx, w_rx) = mpsc::channel();
    for i in 0..3u8 {
        let f = f.clone();
        let w_tx = w_tx.clone();
        std::thread::spawn(move || {
            let _ = w_tx.send(pwrite_errno(&f, 0x20 + i));
        });
    }
    let held = in_syscall(pid, libc::SYS_fsync) && w_rx.try_recv().is_err();
    let outcome = done_rx.recv_timeout(Duration::from_secs(30));
    drop(strace);
    let Ok((r, out)) = outcome else {
        panic!(
            "inactivate hung: the command waits for the mount whose request threads all wait \
             for its decision (writes were waiting: {held})"
        );
    };
    let writes: Vec<Option<i32>> = (0..3)
        .map(|_| {
            w_rx.recv_timeout(Duration::from_secs(30))
                .expect("a write hung")
        })
        .collect();
    // The decision and the writes agree.
    match r {
        Ok(()) => assert!(
            writes.iter().all(|w| *w == Some(libc::EROFS)),
            "inactivate ok, but writes: {writes:?}"
        ),
        Err(_) => assert!(
            writes.iter().all(|w| w.is_none()),
            "inactivate refused ({out}), but writes: {writes:?}"
        ),
    }
    eprintln!("inactivate: {out} writes: {writes:?} (writes waited: {held})");
}
