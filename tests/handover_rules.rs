//! The handover rules under load and in the corners: fencing of writes in
//! flight at `inactivate`, the fsync-on-close rule after an fsync, writers
//! that bypass fencing, and first opens racing each other.
//!
//! Every test that shows a rule holding also shows, with the safety step
//! left out, that its check would catch the failure.

mod common;

use common::{
    LoopBed, Mount, ctl_write_read, errno_result, make_file, open_rw, page_state, read_at,
    read_direct, scratch, status_image,
};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
const PAGE: usize = 4096;

/// Writer threads that write `byte` pages at random offsets through `path`
/// until stopped; they count successful writes and EROFS answers and stop
/// on EROFS (the fencing answer) after `stop` is set or on their own.
struct Writers {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    erofs: Arc<AtomicU64>,
    threads: Vec<thread::JoinHandle<Option<String>>>,
}

impl Writers {
    fn start(path: &Path, n: usize, pages: u64, byte: u8) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let erofs = Arc::new(AtomicU64::new(0));
        let threads = (0..n)
            .map(|t| {
                let (stop, ok, erofs) = (stop.clone(), ok.clone(), erofs.clone());
                let f = open_rw(path);
                thread::spawn(move || {
                    let buf = vec![byte; PAGE];
                    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (t as u64 + 1);
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let off = (x % pages) * PAGE as u64;
                        match f.write_at(&buf, off) {
                            Ok(_) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) if e.raw_os_error() == Some(libc::EROFS) => {
                                erofs.fetch_add(1, Ordering::Relaxed);
                                thread::sleep(Duration::from_millis(1));
                            }
                            Err(e) => return Some(format!("write at {off}: {e}")),
                        }
                    }
                    None
                })
            })
            .collect();
        Writers {
            stop,
            ok,
            erofs,
            threads,
        }
    }

    fn wait_for_writes(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.ok.load(Ordering::Relaxed) < n {
            assert!(Instant::now() < deadline, "writers made no progress");
            thread::sleep(Duration::from_millis(1));
        }
    }

    fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            if let Some(err) = t.join().expect("writer panicked") {
                panic!("writer failed: {err}");
            }
        }
    }
}

/// Issue: inactivate synced before it fenced, so writes admitted in between
/// stayed dirty on host A and were written back later over host B's data.
/// 50 rounds with two writers in flight on A: after every `inactivate` ok,
/// A holds no dirty or writeback page of the LUN and every later write gets
/// EROFS; then B takes over, writes every block and fsyncs, A's host writes
/// back whatever it has, and B's data must be intact.
#[test]
fn inactivate_fences_writes_in_flight_relay() {
    if !common::require_root() {
        return;
    }
    fences_writes_in_flight("relay");
}

/// The same on the cached device path (written through, the default),
/// whose O_DIRECT writes leave no dirty page: what matters there is that none is still in
/// flight.
#[test]
fn inactivate_fences_writes_in_flight_cached() {
    if !common::require_root() {
        return;
    }
    fences_writes_in_flight("cached");
}

fn fences_writes_in_flight(device_io: &str) {
    let bed = LoopBed::new(16, &["--device-io", device_io], &[]);
    let disk_a = bed.a.path("disk");
    let pages = (16 * MIB / PAGE) as u64;
    for round in 0..50 {
        let (res, out) = ctl_write_read(&bed.a.ctl("activate"), "disk\n");
        assert_eq!(res, Ok(()), "round {round}: activate on A: {out}");
        let writers = Writers::start(&disk_a, 2, pages, b'W');
        writers.wait_for_writes(20);
        let (res, out) = ctl_write_read(&bed.a.ctl("inactivate"), "disk\n");
        assert_eq!(
            res,
            Ok(()),
            "round {round}: inactivate: {out}\nlog:\n{}",
            bed.a.log_text()
        );
        let left = page_state(&bed.loop_a.path);
        assert_eq!(
            (left.dirty, left.writeback),
            (0, 0),
            "round {round}: inactivate said ok but host A still holds dirty/writeback pages of the LUN"
        );
        // Every write after the ok is refused.
        let before = writers.ok.load(Ordering::Relaxed);
        let erofs_before = writers.erofs.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(5);
        while writers.erofs.load(Ordering::Relaxed) < erofs_before + 4 {
            assert!(
                Instant::now() < deadline,
                "round {round}: writers got no EROFS"
            );
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            writers.ok.load(Ordering::Relaxed),
            before,
            "round {round}: a write succeeded after inactivate returned ok"
        );
        writers.finish();
        let left = page_state(&bed.loop_a.path);
        assert_eq!(
            (left.dirty, left.writeback),
            (0, 0),
            "round {round}: dirty pages appeared on A after inactivate"
        );
    }

    // Handover: B activates, writes every block with 'B' and fsyncs.
    let (res, out) = ctl_write_read(&bed.b.ctl("activate"), "disk\n");
    assert_eq!(res, Ok(()), "activate on B: {out}");
    let disk_b = bed.b.path("disk");
    let fb = open_rw(&disk_b);
    fb.write_all_at(&vec![b'B'; 16 * MIB], 0).unwrap();
    fb.sync_all().unwrap();
    drop(fb);
    // Host A flushes everything it still has for the LUN.
    open_rw(&bed.loop_a.path).sync_all().unwrap();
    let data = read_at(&bed.b.backing.join("..").join("shared.img"), 0, 16 * MIB);
    let lost = data
        .chunks(PAGE)
        .filter(|p| p.iter().any(|&c| c != b'B'))
        .count();
    assert_eq!(
        lost, 0,
        "{lost} of B's fsync'd blocks were overwritten by host A"
    );
}

/// Writer threads on a write-back device: buffered page writes at random
/// offsets until stopped, each page recorded once a write returned
/// (acknowledged, in this host's cache); at the end each fsyncs its fd,
/// which says whether all its acknowledged writes reached the device.
struct CacheWriters {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    threads: Vec<thread::JoinHandle<(Vec<bool>, std::io::Result<()>)>>,
}

impl CacheWriters {
    fn start(path: &Path, n: usize, pages: u64, seed: u64) -> CacheWriters {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let threads = (0..n)
            .map(|t| {
                let (stop, ok) = (stop.clone(), ok.clone());
                let f = open_rw(path);
                thread::spawn(move || {
                    let buf = vec![b'W'; PAGE];
                    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (t as u64 + 1);
                    let mut acked = vec![false; pages as usize];
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let page = x % pages;
                        if let Err(e) = f.write_at(&buf, page * PAGE as u64) {
                            return (acked, Err(e));
                        }
                        acked[page as usize] = true;
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    let synced = f.sync_all();
                    (acked, synced)
                })
            })
            .collect();
        CacheWriters { stop, ok, threads }
    }

    fn wait_for_writes(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.ok.load(Ordering::Relaxed) < n {
            assert!(Instant::now() < deadline, "writers made no progress");
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Stops the writers; the pages each had a write acknowledged in, and
    /// its fsync result.
    fn finish(self) -> Vec<(Vec<bool>, std::io::Result<()>)> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|t| t.join().expect("writer panicked"))
            .collect()
    }
}

/// The in-flight writers race on a write-back device (`--writeback on`). A buffered write is acknowledged from this host's
/// cache, which the daemon cannot hold back, so `inactivate` with writers
/// still writing either finds pages dirtied after its write-back and
/// refuses (EBUSY, the image stays active, nothing is lost), or is ok. 50
/// rounds: writers in flight, `inactivate`, the writers stop and fsync:
/// after an EBUSY every fsync is clean and a second `inactivate` is ok.
/// After every ok: no dirty or writeback page of the image on A, in the
/// FUSE inode or the device; every write a writer's clean fsync vouches for
/// is on the shared storage; a write after the ok fails with EROFS and
/// never reaches the storage. Then B takes over and none of its blocks is
/// overwritten by A.
#[test]
fn inactivate_with_writers_in_flight_writeback() {
    if !common::require_root() {
        return;
    }
    let bed = LoopBed::new(16, &["--writeback", "on"], &["--writeback", "on"]);
    assert_eq!(
        common::status(&bed.a)["data_paths"]["writeback"],
        true,
        "the bed's mounts are write-back"
    );
    let disk_a = bed.a.path("disk");
    let pages = (16 * MIB / PAGE) as u64;
    let (mut busy, mut live_ok) = (0, 0);
    for round in 0..50u64 {
        let (res, out) = ctl_write_read(&bed.a.ctl("activate"), "disk\n");
        assert_eq!(res, Ok(()), "round {round}: activate on A: {out}");
        let writers = CacheWriters::start(&disk_a, 2, pages, round + 1);
        writers.wait_for_writes(20);
        let (first, out) = ctl_write_read(&bed.a.ctl("inactivate"), "disk\n");
        match first {
            Ok(()) => live_ok += 1,
            Err(libc::EBUSY) => {
                busy += 1;
                assert!(
                    out.contains("dirty"),
                    "round {round}: EBUSY says why: {out}"
                );
                assert_eq!(
                    status_image(&bed.a, "disk")["state"],
                    "active",
                    "round {round}: a refused inactivate leaves the image active"
                );
            }
            Err(e) => panic!("round {round}: inactivate: errno {e}: {out}"),
        }
        let results = writers.finish();
        if first.is_err() {
            for (_, synced) in &results {
                assert!(
                    synced.is_ok(),
                    "round {round}: a writer's fsync failed while the image stayed active: {synced:?}"
                );
            }
            let (res, out) = ctl_write_read(&bed.a.ctl("inactivate"), "disk\n");
            assert_eq!(
                res,
                Ok(()),
                "round {round}: inactivate once the writers stopped: {out}\nlog:\n{}",
                bed.a.log_text()
            );
        }
        for path in [&disk_a, &bed.loop_a.path] {
            let left = page_state(path);
            assert_eq!(
                (left.dirty, left.writeback),
                (0, 0),
                "round {round}: inactivate said ok but {} still holds dirty/writeback pages",
                path.display()
            );
        }
        // What a clean fsync vouched for is on the shared storage.
        let storage = read_direct(&bed.loop_b.path, 0, 16 * MIB);
        for (acked, synced) in &results {
            if synced.is_err() {
                continue;
            }
            for (page, _) in acked.iter().enumerate().filter(|(_, a)| **a) {
                let at = page * PAGE;
                assert!(
                    storage[at..at + PAGE].iter().all(|&c| c == b'W'),
                    "round {round}: an acknowledged write at {at} whose fsync was clean is not on the storage"
                );
            }
        }
        // A write after the ok fails with EROFS (the kernel asks for
        // attributes before it copies a write into its cache, and the daemon
        // refuses a fenced image's writer there), and never reaches the
        // storage.
        let late = 7 * PAGE as u64;
        let f = open_rw(&disk_a);
        assert_eq!(
            errno_result(f.write_all_at(&vec![b'Z'; PAGE], late)),
            Err(libc::EROFS),
            "round {round}: a write past the fence"
        );
        drop(f);
        assert!(
            read_direct(&bed.loop_b.path, late, PAGE)
                .iter()
                .all(|&c| c != b'Z'),
            "round {round}: a write after inactivate's ok reached the storage"
        );
    }
    eprintln!("{busy} rounds refused with writers in flight, {live_ok} ok with them");

    let (res, out) = ctl_write_read(&bed.b.ctl("activate"), "disk\n");
    assert_eq!(res, Ok(()), "activate on B: {out}");
    let fb = open_rw(&bed.b.path("disk"));
    fb.write_all_at(&vec![b'B'; 16 * MIB], 0).unwrap();
    fb.sync_all().unwrap();
    drop(fb);
    // Host A writes back whatever it still has of the LUN.
    let _ = open_rw(&disk_a).sync_all();
    open_rw(&bed.loop_a.path).sync_all().unwrap();
    let data = read_at(&bed.b.backing.join("..").join("shared.img"), 0, 16 * MIB);
    let lost = data
        .chunks(PAGE)
        .filter(|p| p.iter().any(|&c| c != b'B'))
        .count();
    assert_eq!(
        lost, 0,
        "{lost} of B's fsync'd blocks were overwritten by host A"
    );
}

/// Negative control of the write-back check above: without the fence
/// (`inactive-writes allow`) a write after `inactivate`'s ok is written
/// back and its fsync is clean, and the check finds it on the storage.
#[test]
fn writeback_write_after_inactivate_without_fence_negative_control() {
    if !common::require_root() {
        return;
    }
    let bed = LoopBed::new(
        16,
        &["--writeback", "on", "--inactive-writes", "allow"],
        &[],
    );
    assert_eq!(common::status(&bed.a)["data_paths"]["writeback"], true);
    let disk_a = bed.a.path("disk");
    let (res, out) = ctl_write_read(&bed.a.ctl("inactivate"), "disk\n");
    assert_eq!(res, Ok(()), "inactivate: {out}");
    let late = 7 * PAGE as u64;
    let f = open_rw(&disk_a);
    f.write_all_at(&vec![b'Z'; PAGE], late).unwrap();
    assert_eq!(
        errno_result(f.sync_all()),
        Ok(()),
        "unfenced: fsync is clean"
    );
    assert!(
        read_direct(&bed.loop_b.path, late, PAGE)
            .iter()
            .all(|&c| c == b'Z'),
        "control: the unfenced write must reach the storage"
    );
}

/// Negative control of `inactivate_fences_writes_in_flight_relay`: with
/// `inactive-writes allow` the daemon does not fence, and the same check
/// finds writes after the ok.
#[test]
fn inactivate_without_fencing_lets_writes_through_negative_control() {
    if !common::require_root() {
        return;
    }
    let bed = LoopBed::new(
        16,
        &["--device-io", "relay", "--inactive-writes", "allow"],
        &[],
    );
    let disk_a = bed.a.path("disk");
    let writers = Writers::start(&disk_a, 2, (16 * MIB / PAGE) as u64, b'W');
    writers.wait_for_writes(20);
    let (res, out) = ctl_write_read(&bed.a.ctl("inactivate"), "disk\n");
    assert_eq!(res, Ok(()), "inactivate: {out}");
    let before = writers.ok.load(Ordering::Relaxed);
    writers.wait_for_writes(before + 50);
    let left = page_state(&bed.loop_a.path);
    assert!(
        left.dirty + left.writeback > 0,
        "control: unfenced writers after inactivate must leave dirty pages on A ({} dirty, {} writeback)",
        left.dirty,
        left.writeback
    );
    writers.finish();
    drop(bed.loop_b);
}

fn backing_dirty(path: &Path) -> u64 {
    let r = page_state(path);
    r.dirty + r.writeback
}

/// write 1 MiB, fsync, write 1 MiB more, close: the second MiB is synced at
/// close too. Issue: in passthrough the handle counted as clean after the
/// fsync and its later writes (which never reach the daemon) were left dirty.
fn close_after_fsync_syncs(io: &str) {
    let dir = scratch();
    let back = dir.path().join("back");
    fs::create_dir(&back).unwrap();
    let m = Mount::start(dir.path(), &back, &["--io", io]);
    let img = m.path("vm.img");
    File::create(&img).unwrap().set_len(4 * MIB as u64).unwrap();
    let f = open_rw(&img);
    f.write_all_at(&vec![1u8; MIB], 0).unwrap();
    f.sync_all().unwrap();
    f.write_all_at(&vec![2u8; MIB], MIB as u64).unwrap();
    let raw = back.join("vm.img");
    assert!(
        backing_dirty(&raw) > 0,
        "bed: the second write must be dirty on the backing before close"
    );
    drop(f);
    assert_eq!(
        backing_dirty(&raw),
        0,
        "{io}: close() returned with dirty pages on the backing\nlog:\n{}",
        m.log_text()
    );
    assert!(
        m.log_text().contains(&format!("data path={io}")),
        "expected the {io} data path"
    );

    // Negative control: with fsync-on-close off the same steps leave the
    // pages dirty, so the check above can see a missed sync.
    let (res, _) = ctl_write_read(&m.ctl("fsync-on-close"), "off\n");
    assert_eq!(res, Ok(()));
    let f = open_rw(&img);
    f.write_all_at(&vec![3u8; MIB], 0).unwrap();
    f.sync_all().unwrap();
    f.write_all_at(&vec![4u8; MIB], MIB as u64).unwrap();
    drop(f);
    assert!(
        backing_dirty(&raw) > 0,
        "control: without fsync-on-close the pages must stay dirty"
    );
}

#[test]
fn passthrough_close_after_fsync_syncs_later_writes() {
    if !common::require_root() {
        return;
    }
    close_after_fsync_syncs("passthrough");
}

#[test]
fn relay_close_after_fsync_syncs_later_writes() {
    if !common::require_root() {
        return;
    }
    close_after_fsync_syncs("relay");
}

fn open_wo(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().write(true).open(path)
}

/// Writable passthrough handles bypass fencing: they stay possible (an
/// incoming VMM opens its image read-write before activation) but are named
/// in the results, the log and status; relay writes get EROFS; `strict`
/// refuses the open. Round trip: the image left this host (inactive), comes
/// back, is opened read-write before activation and activated.
#[test]
fn writers_that_bypass_fencing_are_named() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let back = dir.path().join("back");
    fs::create_dir(&back).unwrap();
    let m = Mount::start(dir.path(), &back, &[]);
    let img = m.path("vm.img");
    File::create(&img).unwrap().set_len(MIB as u64).unwrap();

    // A writer opened before inactivate.
    let early = open_rw(&img);
    let (res, out) = ctl_write_read(&m.ctl("inactivate"), "vm.img\n");
    assert_eq!(res, Ok(()), "inactivate: {out}");
    assert!(
        out.contains("fencing=partial") && out.contains("opened before inactivate"),
        "inactivate must name the writable passthrough handle: {out:?}"
    );
    assert!(
        out.contains(&format!("{}(", std::process::id())),
        "the result names the writer's pid: {out:?}"
    );
    let st = status_image(&m, "vm.img");
    assert_eq!(st["fencing"], "partial", "{st}");

    // A writable open of the inactive image works (incoming VMM) and is
    // logged with its pid.
    let late = open_wo(&img).expect("writable open of an inactive image must stay possible");
    let log = m.log_text();
    assert!(
        log.contains("writable open of an inactive image")
            && log.contains(&format!("pid {}", std::process::id())),
        "the open must be logged with its pid:\n{log}"
    );
    let (res, out) = ctl_write_read(&m.ctl("inactivate"), "vm.img\n");
    assert_eq!(res, Ok(()), "re-inactivate: {out}");
    assert!(out.contains("opened after inactivate"), "{out:?}");
    drop(early);
    drop(late);
    // close() waits for FLUSH, not for RELEASE, which the kernel sends on
    // its own afterwards: the handles are gone once the daemon had it
    // (seen in CI: an inactivate right after the close still named one).
    let deadline = Instant::now() + Duration::from_secs(5);
    while status_image(&m, "vm.img")["fencing"] != "full" {
        assert!(
            Instant::now() < deadline,
            "the closed handles were never released"
        );
        thread::sleep(Duration::from_millis(10));
    }

    // With no writer left, fencing is full again.
    let (res, out) = ctl_write_read(&m.ctl("inactivate"), "vm.img\n");
    assert_eq!(res, Ok(()), "{out}");
    assert!(!out.contains("fencing=partial"), "{out:?}");
    assert_eq!(status_image(&m, "vm.img")["fencing"], "full");

    // strict refuses writable opens of the inactive image, not read-only ones.
    let (res, _) = ctl_write_read(&m.ctl("inactive-writes"), "strict\n");
    assert_eq!(res, Ok(()));
    assert_eq!(
        errno_result(open_wo(&img).map(|_| ())),
        Err(libc::EROFS),
        "strict must refuse a writable open of an inactive image"
    );
    File::open(&img).expect("read-only open stays possible");

    // Coming back: activate, then writes work.
    let (res, out) = ctl_write_read(&m.ctl("activate"), "vm.img\n");
    assert_eq!(res, Ok(()), "activate: {out}");
    let f = open_rw(&img);
    f.write_all_at(b"back", 0).unwrap();
    f.sync_all().unwrap();
}

/// Relay writers on an inactive image get EROFS (the daemon fences them).
#[test]
fn relay_writes_to_an_inactive_image_get_erofs() {
    if !common::require_root() {
        return;
    }
    writes_to_an_inactive_image_get_erofs("relay");
}

/// So do writers of a cached regular file: every write reaches the daemon.
#[test]
fn cached_writes_to_an_inactive_image_get_erofs() {
    if !common::require_root() {
        return;
    }
    writes_to_an_inactive_image_get_erofs("cached");
}

fn writes_to_an_inactive_image_get_erofs(io: &str) {
    let dir = scratch();
    let back = dir.path().join("back");
    fs::create_dir(&back).unwrap();
    let m = Mount::start(dir.path(), &back, &["--io", io]);
    let img = m.path("vm.img");
    File::create(&img).unwrap().set_len(MIB as u64).unwrap();
    let (res, out) = ctl_write_read(&m.ctl("inactivate"), "vm.img\n");
    assert_eq!(res, Ok(()), "{out}");
    assert!(!out.contains("fencing=partial"), "{out:?}");
    let f = open_wo(&img).unwrap();
    assert_eq!(
        errno_result(f.write_at(b"x", 0).map(|_| ())),
        Err(libc::EROFS)
    );
    assert_eq!(errno_result(f.set_len(0)), Err(libc::EROFS));
    assert_eq!(
        errno_result(f.write_at(b"y", 2 * MIB as u64).map(|_| ())),
        Err(libc::EROFS),
        "{io}: an extending write"
    );
    assert_eq!(
        fs::metadata(back.join("vm.img")).unwrap().len(),
        MIB as u64,
        "{io}: refused writes must leave the size"
    );
    assert!(
        m.log_text().contains(&format!("data path={io}")),
        "expected the {io} data path:\n{}",
        m.log_text()
    );
}

/// Issue: two threads opening one image 600 times each got EBUSY from
/// close-to-open invalidation, which found the pages the other thread had
/// just read from storage. Pages read after the drop are current; only
/// pages that survive it (mapped, dirty) may refuse an open.
#[test]
fn racing_first_opens_never_get_ebusy() {
    if !common::require_root() {
        return;
    }
    for io in ["passthrough", "relay", "cached"] {
        let dir = scratch();
        let back = dir.path().join("back");
        fs::create_dir(&back).unwrap();
        let m = Mount::start(dir.path(), &back, &["--io", io]);
        let img = m.path("vm.img");
        make_file(&back.join("vm.img"), 4 * MIB, b'A');
        let failures: Vec<String> = (0..4)
            .map(|t| {
                let img = img.clone();
                thread::spawn(move || {
                    let mut buf = vec![0u8; 256 << 10];
                    let mut errs = Vec::new();
                    for i in 0..600 {
                        match File::open(&img) {
                            Ok(f) => {
                                let off = (((i + t * 7) % 16) as u64) * (256 << 10);
                                let _ = f.read_at(&mut buf, off);
                            }
                            Err(e) => errs.push(format!("open {i}: {e}")),
                        }
                    }
                    errs
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        assert!(
            failures.is_empty(),
            "{io}: {} failed opens, first: {:?}\nlog:\n{}",
            failures.len(),
            failures.first(),
            m.log_text()
        );
    }
}

/// A reader of the backing outside the mount (a udev probe of a fresh LUN)
/// keeps reading while `activate` runs: its pages come from storage after
/// the drop and must not fail activate. A mapping that holds touched pages
/// must still fail it (negative control: the check still refuses what it
/// must).
#[test]
fn activate_tolerates_rereads_but_not_mappings() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let back = dir.path().join("back");
    fs::create_dir(&back).unwrap();
    let m = Mount::start(dir.path(), &back, &[]);
    let raw: PathBuf = back.join("vm.img");
    make_file(&raw, 8 * MIB, b'A');
    let _ = fs::metadata(m.path("vm.img")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (raw, stop) = (raw.clone(), stop.clone());
        thread::spawn(move || {
            let f = File::open(&raw).unwrap();
            let mut buf = vec![0u8; 256 << 10];
            let mut off = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _ = f.read_at(&mut buf, off);
                off = (off + buf.len() as u64) % (8 * MIB as u64);
            }
        })
    };
    for round in 0..20 {
        let (res, out) = ctl_write_read(&m.ctl("activate"), "vm.img\n");
        assert_eq!(
            res,
            Ok(()),
            "round {round}: a reader outside the mount failed activate: {out}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();

    let f = File::open(&raw).unwrap();
    let len = std::num::NonZeroUsize::new(64 << 10).unwrap();
    // SAFETY: a fresh shared read-only mapping of a file that stays open and
    // is not truncated while mapped; it is only read, then unmapped.
    let map = unsafe {
        nix::sys::mman::mmap(
            None,
            len,
            nix::sys::mman::ProtFlags::PROT_READ,
            nix::sys::mman::MapFlags::MAP_SHARED,
            &f,
            0,
        )
    }
    .expect("mmap");
    let mut sum = 0u64;
    for off in (0..len.get()).step_by(PAGE) {
        // SAFETY: off is inside the mapping.
        sum += unsafe { std::ptr::read_volatile((map.as_ptr() as *const u8).add(off)) } as u64;
    }
    assert_eq!(sum, (len.get() / PAGE) as u64 * b'A' as u64);
    let (res, out) = ctl_write_read(&m.ctl("activate"), "vm.img\n");
    // SAFETY: unmapping exactly the mapping made above.
    unsafe { nix::sys::mman::munmap(map, len.get()) }.unwrap();
    assert_eq!(
        res,
        Err(libc::EBUSY),
        "a mapping with touched pages must still fail activate: {out}"
    );
    assert!(
        out.contains("mmap"),
        "the result names the mapping: {out:?}"
    );
}

/// A shared mapping of the image, on both hosts, across repeated handovers:
/// the source's mapped writes are on storage when `inactivate` returns, and
/// the destination's existing mapping never reads stale data once
/// `activate` returned. The FUSE inode's page cache holds mapped pages on
/// the cached path and (direct-io mmap) on relay, so both must drop it.
fn mapped_handover(device_io: &str) {
    let bed = LoopBed::new(16, &["--device-io", device_io], &["--device-io", device_io]);
    let len = 16 * MIB;
    let map = |path: &Path, write: bool| {
        let f = if write {
            open_rw(path)
        } else {
            File::open(path).unwrap()
        };
        let prot = if write {
            nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE
        } else {
            nix::sys::mman::ProtFlags::PROT_READ
        };
        // SAFETY: a fresh shared mapping of a device entry whose size never
        // changes, kept with its file until the test unmaps it.
        let p = unsafe {
            nix::sys::mman::mmap(
                None,
                std::num::NonZeroUsize::new(len).unwrap(),
                prot,
                nix::sys::mman::MapFlags::MAP_SHARED,
                &f,
                0,
            )
        }
        .expect("mmap");
        (f, p.as_ptr() as *mut u8)
    };
    let (_fa, pa) = map(&bed.a.path("disk"), true);
    let (_fb, pb) = map(&bed.b.path("disk"), false);
    let raw = bed.loop_a.path.clone();
    let (src, dst) = ((&bed.a, pa), (&bed.b, pb));
    let mut stale_seen = 0;
    for round in 0..6u8 {
        // Alternate the direction: A -> B, B -> A would need B writable;
        // keep A the writer and B the reader, and hand over each round.
        let (s, sp) = src;
        let (d, dp) = dst;
        let page = 4096 * (1 + round as usize * 37);
        // The destination reads the page early (caches the old byte).
        // SAFETY: page < len, inside both mappings.
        let old = unsafe { std::ptr::read_volatile(dp.add(page)) };
        let new = b'a' + round;
        assert_ne!(old, new);
        let (res, out) = ctl_write_read(&s.ctl("activate"), "disk\n");
        assert_eq!(res, Ok(()), "round {round}: activate source: {out}");
        // SAFETY: page < len, inside the writable mapping.
        unsafe { std::ptr::write_volatile(sp.add(page), new) };
        let (res, out) = ctl_write_read(&s.ctl("inactivate"), "disk\n");
        assert_eq!(
            res,
            Ok(()),
            "round {round}: inactivate source: {out}\nlog:\n{}",
            s.log_text()
        );
        let on_storage = common::read_direct(&raw, page as u64, 4096);
        assert_eq!(
            on_storage[0], new,
            "round {round} ({device_io}): the source's mapped write is not on storage after inactivate said ok"
        );
        // SAFETY: as above.
        if unsafe { std::ptr::read_volatile(dp.add(page)) } == old {
            stale_seen += 1;
        }
        let (res, out) = ctl_write_read(&d.ctl("activate"), "disk\n");
        assert_eq!(res, Ok(()), "round {round}: activate destination: {out}");
        for _ in 0..50 {
            // SAFETY: as above.
            let got = unsafe { std::ptr::read_volatile(dp.add(page)) };
            assert_eq!(
                got, new,
                "round {round} ({device_io}): stale read through the destination's mapping after activate returned"
            );
        }
        let (res, out) = ctl_write_read(&d.ctl("inactivate"), "disk\n");
        assert_eq!(res, Ok(()), "round {round}: inactivate destination: {out}");
    }
    // Negative control: before activate the destination's mapping did show
    // the old byte (its cache really was stale), so the checks above mean
    // something.
    assert!(
        stale_seen > 0,
        "NEGATIVE CONTROL FAILED ({device_io}): the destination's mapping never read stale data before activate"
    );
    // SAFETY: unmapping exactly the two mappings made above.
    unsafe {
        nix::sys::mman::munmap(std::ptr::NonNull::new(pa.cast()).unwrap(), len).unwrap();
        nix::sys::mman::munmap(std::ptr::NonNull::new(pb.cast()).unwrap(), len).unwrap();
    }
}

#[test]
fn mapped_writes_and_reads_across_handovers_cached() {
    if !common::require_root() {
        return;
    }
    mapped_handover("cached");
}

#[test]
fn mapped_writes_and_reads_across_handovers_relay() {
    if !common::require_root() {
        return;
    }
    mapped_handover("relay");
}

/// After a daemon crash, a process that opened the image through the dead
/// mount keeps writing the backing (passthrough): a new instance cannot
/// fence it, and must say so instead of claiming full fencing. Likewise a
/// process writing the backing file directly. Negative control: once those
/// writers are gone, fencing is full again.
#[test]
fn writers_outside_this_mount_are_named_after_a_crash() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let back = dir.path().join("back");
    fs::create_dir(&back).unwrap();
    make_file(&back.join("vm.img"), MIB, b'A');
    let old = Mount::start(dir.path(), &back, &[]);
    let through_dead_mount = common::hold_open_rw(&old.path("vm.img"));
    assert!(old.log_text().contains("data path=passthrough"));
    let pid = old.keeper_pid().expect("daemon pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = std::process::Command::new("umount")
        .arg("-l")
        .arg(&old.mountpoint)
        .status();

    let m = Mount::start(dir.path(), &back, &[]);
    let (res, out) = ctl_write_read(&m.ctl("inactivate"), "vm.img\n");
    assert_eq!(res, Ok(()), "inactivate: {out}");
    assert!(
        out.contains("fencing=partial")
            && out.contains(&format!("{}(", through_dead_mount.0.id()))
            && out.contains("writer-through-another-mount"),
        "inactivate must name the writer that holds the image through the crashed mount: {out:?}"
    );
    assert_eq!(status_image(&m, "vm.img")["fencing"], "partial");

    drop(through_dead_mount);
    let direct = common::hold_open_rw(&back.join("vm.img"));
    let (res, out) = ctl_write_read(&m.ctl("inactivate"), "vm.img\n");
    assert_eq!(res, Ok(()), "{out}");
    assert!(
        out.contains("backing-writer") && out.contains(&format!("{}(", direct.0.id())),
        "a process writing the backing directly is named: {out:?}"
    );
    drop(direct);

    // Negative control: nobody writes outside the mount any more.
    let (res, out) = ctl_write_read(&m.ctl("inactivate"), "vm.img\n");
    assert_eq!(res, Ok(()), "{out}");
    assert!(!out.contains("fencing=partial"), "{out:?}");
    assert_eq!(status_image(&m, "vm.img")["fencing"], "full");
    drop(old);
}

/// `status` reports the FUSE inode's cache of a cached device, the one
/// cache the handover drops and verifies: pages read, pages a mapping
/// dirtied, and none once `inactivate` dropped them. Negative control: a
/// relay device, whose reads fill the device's own cache and not the FUSE
/// inode's, reports no pages there and the device's pages instead.
#[test]
fn status_reports_the_fuse_inodes_cache_of_cached_devices() {
    if !common::require_root() {
        return;
    }
    let bed = LoopBed::new(16, &[], &["--device-io", "relay"]);
    let fuse = |m: &Mount| status_image(m, "disk")["fuse_cache"].clone();
    let (res, out) = ctl_write_read(&bed.a.ctl("activate"), "disk\n");
    assert_eq!(res, Ok(()), "activate: {out}");
    let read_4m = |path: &Path| {
        let f = File::open(path).unwrap();
        let mut buf = vec![0u8; 4 * MIB];
        f.read_exact_at(&mut buf, 0).unwrap();
        f
    };
    let want = (4 * MIB / PAGE) as u64 * 3 / 4;
    {
        let _f = read_4m(&bed.a.path("disk"));
        let fc = fuse(&bed.a);
        assert!(
            fc["cached_pages"].as_u64().unwrap_or(0) >= want,
            "cached device: status does not show the pages read in the FUSE inode: {fc}"
        );
        let rw = open_rw(&bed.a.path("disk"));
        // SAFETY: a fresh shared mapping of one page of a device entry whose
        // size never changes, unmapped below before its file is closed.
        let p = unsafe {
            nix::sys::mman::mmap(
                None,
                std::num::NonZeroUsize::new(PAGE).unwrap(),
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
                &rw,
                0,
            )
        }
        .expect("mmap");
        // SAFETY: inside the one-page mapping.
        unsafe { std::ptr::write_volatile(p.as_ptr() as *mut u8, b'z') };
        let fc = fuse(&bed.a);
        assert!(
            fc["dirty_pages"].as_u64().unwrap_or(0) >= 1,
            "cached device: a mapped write's dirty page is not in status: {fc}"
        );
        // SAFETY: syncing and unmapping exactly the mapping made above.
        unsafe {
            nix::sys::mman::msync(p, PAGE, nix::sys::mman::MsFlags::MS_SYNC).unwrap();
            nix::sys::mman::munmap(p, PAGE).unwrap();
        }
    }
    let (res, out) = ctl_write_read(&bed.a.ctl("inactivate"), "disk\n");
    assert_eq!(res, Ok(()), "inactivate: {out}");
    let fc = fuse(&bed.a);
    assert_eq!(
        fc["cached_pages"].as_u64(),
        Some(0),
        "cached device: the FUSE inode still holds pages after inactivate: {fc}"
    );
    assert_eq!(
        common::read_direct(&bed.loop_a.path, 0, PAGE)[0],
        b'z',
        "the mapped write is not on the device"
    );
    // Negative control: relay, no mapping.
    let _f = read_4m(&bed.b.path("disk"));
    let img = status_image(&bed.b, "disk");
    assert!(
        img["fuse_cache"].is_null() || img["fuse_cache"]["cached_pages"] == 0,
        "relay device without mappings: status claims pages in the FUSE inode: {img}"
    );
    assert!(
        img["cached_pages"].as_u64().unwrap_or(0) >= want,
        "relay device: status does not show the device's cached pages: {img}"
    );
}

/// Issue: images were keyed by (device, inode) alone. An image inactivated
/// on this host (never opened here) was deleted on the shared storage and a
/// new image created there took its freed inode number: the new image was
/// born inactive, its writes got EROFS. A small ext4 on a loop device reuses
/// a freed inode number at once; the test asserts that it did (else it
/// proves nothing). Once under a new name, once under the same name (status
/// looked that one up by its last path). Negative control: an image
/// inactivated the same way that is still there keeps EROFS.
#[test]
fn a_new_image_on_a_reused_inode_number_starts_active_relay() {
    if !common::require_root() || !common::have_tool("mkfs.ext4") {
        return;
    }
    new_image_on_a_reused_inode_number("relay");
}

#[test]
fn a_new_image_on_a_reused_inode_number_starts_active_cached() {
    if !common::require_root() || !common::have_tool("mkfs.ext4") {
        return;
    }
    new_image_on_a_reused_inode_number("cached");
}

fn new_image_on_a_reused_inode_number(io: &str) {
    use std::os::unix::fs::MetadataExt;
    let dir = scratch();
    let fs_img = dir.path().join("ext4.img");
    File::create(&fs_img)
        .unwrap()
        .set_len(64 * MIB as u64)
        .unwrap();
    common::run(
        std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&fs_img),
    );
    let lo = common::LoopDev::attach(&fs_img);
    let ext = common::KMount::dev(&lo.path, &dir.path().join("ext"));
    let back = ext.path.clone();
    make_file(&back.join("vm1.img"), MIB, 1);
    make_file(&back.join("same.img"), MIB, 1);
    make_file(&back.join("control.img"), MIB, 1);
    let m = Mount::start(dir.path(), &back, &["--io", io]);
    let (res, out) = ctl_write_read(&m.ctl("inactivate"), "vm1.img\nsame.img\ncontrol.img\n");
    assert_eq!(res, Ok(()), "{out}");
    assert_eq!(status_image(&m, "vm1.img")["state"], "inactive");
    assert_eq!(status_image(&m, "same.img")["state"], "inactive");

    // Another host deletes vm1.img and creates vm2.img on the storage.
    let ino1 = fs::metadata(back.join("vm1.img")).unwrap().ino();
    fs::remove_file(back.join("vm1.img")).unwrap();
    make_file(&back.join("vm2.img"), MIB, 2);
    let ino2 = fs::metadata(back.join("vm2.img")).unwrap().ino();
    assert_eq!(
        ino1, ino2,
        "the backing did not reuse the inode number: the test proves nothing"
    );

    let f = open_wo(&m.path("vm2.img")).unwrap();
    assert_eq!(
        errno_result(f.write_at(b"new", 0).map(|_| ())),
        Ok(()),
        "{io}: a new image must not inherit the inactive state of a deleted one"
    );
    drop(f);
    let st = status_image(&m, "vm2.img");
    assert_eq!(st["state"], "active", "{io}: {st}");
    assert_eq!(read_at(&back.join("vm2.img"), 0, 3), b"new");
    let listed = common::status(&m)["images"].to_string();
    assert!(
        !listed.contains("\"vm1.img\""),
        "{io}: the deleted image is still listed: {listed}"
    );

    // The same name again: deleted and created anew, same inode number.
    let ino1 = fs::metadata(back.join("same.img")).unwrap().ino();
    fs::remove_file(back.join("same.img")).unwrap();
    make_file(&back.join("same.img"), MIB, 2);
    assert_eq!(
        fs::metadata(back.join("same.img")).unwrap().ino(),
        ino1,
        "the backing did not reuse the inode number: the test proves nothing"
    );
    // Not seen by this mount yet: not listed, or listed active.
    let listed = common::status(&m)["images"].clone();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["path"] != "same.img" || i["state"] == "active"),
        "{io}: the new same.img is listed inactive: {listed}"
    );
    let f = open_wo(&m.path("same.img")).unwrap();
    assert_eq!(
        errno_result(f.write_at(b"new", 0).map(|_| ())),
        Ok(()),
        "{io}: same name"
    );
    drop(f);
    assert_eq!(status_image(&m, "same.img")["state"], "active", "{io}");

    // Negative control: an inactivated image that is still there.
    let f = open_wo(&m.path("control.img")).unwrap();
    assert_eq!(
        errno_result(f.write_at(b"x", 0).map(|_| ())),
        Err(libc::EROFS),
        "NEGATIVE CONTROL FAILED ({io}): an inactive image took a write"
    );
}

/// The other side of the check above: the same file is never taken for a
/// new one. An inactivated image reached by a hard link made on the
/// storage, and after a rename there, is still the inactive image; a copy
/// is a new file and takes writes (the negative control).
#[test]
fn the_same_file_keeps_its_state_under_other_names() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let back = dir.path().join("back");
    fs::create_dir(&back).unwrap();
    make_file(&back.join("vm.img"), MIB, 1);
    let m = Mount::start(dir.path(), &back, &["--io", "relay"]);
    let (res, out) = ctl_write_read(&m.ctl("inactivate"), "vm.img\n");
    assert_eq!(res, Ok(()), "{out}");
    fs::hard_link(back.join("vm.img"), back.join("link.img")).unwrap();
    let f = open_wo(&m.path("link.img")).unwrap();
    assert_eq!(
        errno_result(f.write_at(b"x", 0).map(|_| ())),
        Err(libc::EROFS),
        "a hard link of an inactive image took a write"
    );
    drop(f);
    fs::rename(back.join("vm.img"), back.join("moved.img")).unwrap();
    let (res, out) = ctl_write_read(&m.ctl("check"), "moved.img\n");
    assert_eq!(res, Ok(()), "{out}");
    let f = open_wo(&m.path("moved.img")).unwrap();
    assert_eq!(
        errno_result(f.write_at(b"x", 0).map(|_| ())),
        Err(libc::EROFS),
        "a renamed inactive image took a write"
    );
    drop(f);
    let images = common::status(&m)["images"].clone();
    let states: Vec<_> = images
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["path"].as_str().unwrap_or("").to_string(),
                i["state"].clone(),
            )
        })
        .collect();
    assert_eq!(states.len(), 1, "one file, one image: {images}");
    assert_eq!(states[0].1, "inactive", "{images}");
    // Negative control: another file (a copy, not a link) takes writes.
    fs::copy(back.join("moved.img"), back.join("copy.img")).unwrap();
    let f = open_wo(&m.path("copy.img")).unwrap();
    assert_eq!(
        errno_result(f.write_at(b"x", 0).map(|_| ())),
        Ok(()),
        "NEGATIVE CONTROL FAILED: a new file was fenced"
    );
}

/// Issue 20: a writer of the backing is still found and named when the
/// host runs thousands of other processes (the naming scan reads them
/// all; the kernel's writable-open count decides whether it runs).
/// Negative control: the same steps without the writer report full
/// fencing, and the writer's pid in the partial report is the writer's.
#[test]
fn a_backing_writer_among_5000_processes_is_named() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let back = dir.path().join("back");
    fs::create_dir(&back).unwrap();
    make_file(&back.join("vm.img"), MIB, b'A');
    make_file(&back.join("other.img"), MIB, b'B');
    let m = Mount::start(dir.path(), &back, &[]);
    for name in ["vm.img", "other.img"] {
        fs::metadata(m.path(name)).unwrap();
    }
    let idle = common::IdleProcs::spawn(5000);

    // Control: nobody writes the backing: full, for one image and for `*`.
    let (res, out) = ctl_write_read(&m.ctl("inactivate"), "vm.img\n");
    assert_eq!(res, Ok(()), "inactivate: {out}");
    assert!(
        !out.contains("fencing=partial"),
        "no writer exists: {out:?}"
    );
    let (res, out) = ctl_write_read(&m.ctl("activate"), "*\n");
    assert_eq!(res, Ok(()), "activate *: {out}");
    assert!(
        !out.contains("fencing=partial"),
        "no writer exists: {out:?}"
    );

    let writer = common::hold_open_rw(&back.join("vm.img"));
    let named = format!("{}(sleep) backing-writer", writer.0.id());
    for (cmd, body) in [("inactivate", "vm.img\n"), ("activate", "vm.img\n")] {
        let (res, out) = ctl_write_read(&m.ctl(cmd), body);
        assert_eq!(res, Ok(()), "{cmd}: {out}");
        assert!(
            out.contains("fencing=partial") && out.contains(&named),
            "{cmd} must name the writer among 5000 processes ({named}): {out:?}"
        );
    }
    let (res, out) = ctl_write_read(&m.ctl("inactivate"), "*\n");
    assert_eq!(res, Ok(()), "inactivate *: {out}");
    let lines = common::results(&out);
    assert!(
        lines["vm.img"].get("fencing").map(String::as_str) == Some("partial")
            && lines["vm.img"]["detail"].contains(&named),
        "inactivate * must name the writer on vm.img's line: {out:?}"
    );
    assert_eq!(
        lines["other.img"].get("fencing"),
        None,
        "other.img has no writer: {out:?}"
    );
    let st = status_image(&m, "vm.img");
    assert_eq!(st["fencing"], "partial", "{st}");
    assert!(
        st["unfenced"].as_str().unwrap_or("").contains(&named),
        "{st}"
    );

    drop(writer);
    let (res, out) = ctl_write_read(&m.ctl("inactivate"), "vm.img\n");
    assert_eq!(res, Ok(()), "{out}");
    assert!(
        !out.contains("fencing=partial"),
        "the writer is gone: {out:?}"
    );
    assert_eq!(status_image(&m, "vm.img")["fencing"], "full");
    drop(idle);
}

/// `strace` attached to every thread of the daemon, recording its opens.
struct OpenTrace {
    child: common::ChildGuard,
    out: PathBuf,
    daemon: u32,
}

impl OpenTrace {
    fn attach(pid: u32, out: PathBuf) -> OpenTrace {
        let child = std::process::Command::new("strace")
            .args(["-f", "-qq", "-s", "256", "-e", "trace=openat,openat2"])
            .arg("-o")
            .arg(&out)
            .arg("-p")
            .arg(pid.to_string())
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("spawn strace");
        let trace = OpenTrace {
            child: common::ChildGuard(child),
            out,
            daemon: pid,
        };
        // Attached once every thread of the daemon has a tracer.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let traced = fs::read_dir(format!("/proc/{pid}/task"))
                .unwrap()
                .flatten()
                .all(|t| {
                    fs::read_to_string(t.path().join("status"))
                        .unwrap_or_default()
                        .lines()
                        .any(|l| l.starts_with("TracerPid:") && l.trim_end() != "TracerPid:\t0")
                });
            if traced {
                return trace;
            }
            assert!(Instant::now() < deadline, "strace did not attach to {pid}");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Detaches and returns, per process, how many times the daemon opened
    /// that process's `/proc/PID/fdinfo` directory (one per /proc pass).
    fn fdinfo_passes(self) -> std::collections::HashMap<u32, usize> {
        self.passes("fdinfo")
    }

    /// Like `fdinfo_passes`, for `/proc/PID/<what>`. Reads by the
    /// daemon's background thread (`writers-bg`, which refreshes kept
    /// answers off the commands' path) are left out: they are not the
    /// command's.
    fn passes(self, what: &str) -> std::collections::HashMap<u32, usize> {
        let pid = nix::unistd::Pid::from_raw(self.child.0.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
        let mut child = self.child;
        let _ = child.0.wait();
        let background: Vec<String> = fs::read_dir(format!("/proc/{}/task", self.daemon))
            .unwrap()
            .flatten()
            .filter(|t| {
                fs::read_to_string(t.path().join("comm"))
                    .unwrap_or_default()
                    .trim()
                    == "writers-bg"
            })
            .map(|t| t.file_name().to_string_lossy().into_owned())
            .collect();
        let text = fs::read_to_string(&self.out).unwrap_or_default();
        let mut passes = std::collections::HashMap::new();
        for line in text.lines() {
            let tid = line.split_whitespace().next().unwrap_or("");
            if background.iter().any(|b| b == tid) {
                continue;
            }
            let Some(rest) = line.split("\"/proc/").nth(1) else {
                continue;
            };
            if let Some(p) = proc_file_pid(rest, what) {
                *passes.entry(p).or_insert(0) += 1;
            }
        }
        passes
    }
}

/// (`1234/fdinfo", O_RDONLY...`, "fdinfo") -> 1234 (the directory, not a
/// file in it).
fn proc_file_pid(path_rest: &str, what: &str) -> Option<u32> {
    let (pid, rest) = path_rest.split_once('/')?;
    if rest.strip_prefix(what)?.starts_with('"') {
        pid.parse().ok()
    } else {
        None
    }
}

/// Issue 20: a command over many images reads each process's open files
/// at most once (one /proc pass serves every image; a writer named by a
/// kept answer is read once more to check it), not at all when the kernel
/// says no file of an image is open for writing, and only the named
/// writers once every image has a kept answer. Seen with
/// strace on the daemon: before, `inactivate *` over 20 images opened
/// every process's fdinfo 20 times. The pass with writers present is the
/// control that the trace does see the scan when there is one.
#[test]
fn one_proc_pass_per_command_and_none_without_writers() {
    if !common::require_root() || !common::have_tool("strace") {
        return;
    }
    let dir = scratch();
    let back = dir.path().join("back");
    fs::create_dir(&back).unwrap();
    let names: Vec<String> = (0..20).map(|i| format!("img{i:02}.raw")).collect();
    for n in &names {
        make_file(&back.join(n), MIB, b'A');
    }
    let m = Mount::start(dir.path(), &back, &[]);
    for n in &names {
        fs::metadata(m.path(n)).unwrap();
    }
    let _idle = common::IdleProcs::spawn(100);
    let daemon = m.pid().expect("daemon pid");

    // Writers on two images: one pass names both.
    let w1 = common::hold_open_rw(&back.join("img03.raw"));
    let w2 = common::hold_open_rw(&back.join("img17.raw"));
    let trace = OpenTrace::attach(daemon, dir.path().join("trace1"));
    let (res, out) = ctl_write_read(&m.ctl("inactivate"), "*\n");
    let passes = trace.fdinfo_passes();
    assert_eq!(res, Ok(()), "inactivate *: {out}");
    let lines = common::results(&out);
    for (img, w) in [("img03.raw", &w1), ("img17.raw", &w2)] {
        assert!(
            lines[img]["detail"].contains(&format!("{}(sleep) backing-writer", w.0.id())),
            "{img}'s writer is not named: {out:?}"
        );
    }
    assert_eq!(
        lines.values().filter(|l| l.contains_key("fencing")).count(),
        2,
        "only the two written images are partial: {out:?}"
    );
    assert!(
        passes.len() >= 100,
        "the trace must see the one pass over the 100+ processes: {passes:?}"
    );
    let most = passes.values().max().copied().unwrap_or(0);
    assert_eq!(
        most, 1,
        "a process's fdinfo was read {most} times in one `inactivate *` over 20 images"
    );

    // `status`: one pass for the whole document as well (or none, if the
    // daemon's background pass has kept img17's answer by then). A writer
    // named by a kept answer (img03's, from the pass above) is read once
    // more to check that answer: the writers at most twice, everyone else
    // once.
    let writers = [w1.0.id(), w2.0.id()];
    let trace = OpenTrace::attach(daemon, dir.path().join("trace2"));
    assert_eq!(status_image(&m, "img03.raw")["fencing"], "partial");
    let passes = trace.fdinfo_passes();
    assert!(
        passes
            .iter()
            .all(|(p, n)| *n == 1 || (*n == 2 && writers.contains(p))),
        "status: {passes:?}"
    );

    // Both images now have kept answers: the next command reads only the
    // writers they name (docs/DESIGN.md §3), and still names them.
    let trace = OpenTrace::attach(daemon, dir.path().join("trace2b"));
    let (res, out) = ctl_write_read(&m.ctl("inactivate"), "*\n");
    let passes = trace.fdinfo_passes();
    assert_eq!(res, Ok(()), "inactivate *: {out}");
    let lines = common::results(&out);
    for (img, w) in [("img03.raw", &w1), ("img17.raw", &w2)] {
        assert!(
            lines[img]["detail"].contains(&format!("{}(sleep) backing-writer", w.0.id())),
            "{img}'s writer is not named from the kept answer: {out:?}"
        );
    }
    assert!(
        passes.keys().all(|p| writers.contains(p)) && passes.values().all(|n| *n == 1),
        "kept answers: only the named writers are read, once: {passes:?}"
    );

    // Nobody writes any image: no pass at all.
    drop(w1);
    drop(w2);
    let trace = OpenTrace::attach(daemon, dir.path().join("trace3"));
    let (res, out) = ctl_write_read(&m.ctl("inactivate"), "*\n");
    let passes = trace.fdinfo_passes();
    assert_eq!(res, Ok(()), "inactivate *: {out}");
    assert!(!out.contains("fencing=partial"), "{out:?}");
    assert!(
        passes.is_empty(),
        "no image is open for writing, yet /proc was scanned: {} processes read",
        passes.len()
    );
}

/// Issue 20: the page-cache holders (a pass over every process's fds and
/// mappings) are named once, in the failing outcome that reports them, not
/// at every retry of the residency check. Before, an activate that failed
/// on a mapped page read every process's maps three times.
#[test]
fn holders_of_surviving_pages_are_scanned_once() {
    if !common::require_root() || !common::have_tool("strace") {
        return;
    }
    let dir = scratch();
    let back = dir.path().join("back");
    fs::create_dir(&back).unwrap();
    make_file(&back.join("vm.img"), MIB, b'A');
    let m = Mount::start(dir.path(), &back, &[]);
    fs::metadata(m.path("vm.img")).unwrap();
    let _idle = common::IdleProcs::spawn(50);
    // A mapped, touched page of the backing survives every drop.
    let f = File::open(back.join("vm.img")).unwrap();
    let len = std::num::NonZeroUsize::new(PAGE).unwrap();
    // SAFETY: a fresh read-only shared mapping of one page of a 1 MiB file
    // nobody truncates, unmapped below.
    let p = unsafe {
        nix::sys::mman::mmap(
            None,
            len,
            nix::sys::mman::ProtFlags::PROT_READ,
            nix::sys::mman::MapFlags::MAP_SHARED,
            &f,
            0,
        )
    }
    .expect("mmap");
    // SAFETY: inside the one-page mapping.
    assert_eq!(
        unsafe { std::ptr::read_volatile(p.as_ptr() as *const u8) },
        b'A'
    );

    let trace = OpenTrace::attach(m.pid().expect("daemon pid"), dir.path().join("trace"));
    let (res, out) = ctl_write_read(&m.ctl("activate"), "vm.img\n");
    let passes = trace.passes("maps");
    // SAFETY: unmaps exactly the mapping made above.
    unsafe { nix::sys::mman::munmap(p, PAGE) }.unwrap();
    assert_eq!(res, Err(libc::EBUSY), "a mapped page must refuse: {out}");
    assert!(
        out.contains(&format!("{}(", std::process::id())) && out.contains(":mmap)"),
        "the mapping process is named: {out:?}"
    );
    assert!(
        passes.len() >= 50,
        "the trace must see the holder scan: {passes:?}"
    );
    let most = passes.values().max().copied().unwrap_or(0);
    assert_eq!(most, 1, "every process's maps were read {most} times");
}

/// Issue 20, an image held open through the mount: the kernel's answer is
/// always "open for writing" (the daemon's own backing files), so the
/// answer of a /proc pass is kept until another process opens the backing
/// (docs/DESIGN.md §3). A writer that opens after a command found none is
/// named by the next command: directly on the backing, through another
/// migsafe mount, or handed to a child by an opener that then exited; a
/// writer that exits is no longer named. Control: the trace shows that the
/// commands before each writer really were answered without a pass (so
/// the later ones exercise the kept answer, not a fresh scan), and the same
/// commands report full fencing before each writer and after it is gone.
#[test]
fn writers_opening_after_a_kept_answer_are_named_passthrough() {
    kept_answer_case(&[], false);
}

/// The same with a relay mount and a writable handle (the daemon's own
/// writable backing fd makes the kernel's answer "open for writing").
#[test]
fn writers_opening_after_a_kept_answer_are_named_relay() {
    kept_answer_case(&["--io", "relay"], true);
}

/// Kills a process by pid on drop (a child of a process that exited).
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

fn kept_answer_case(args: &[&str], rw: bool) {
    if !common::require_root() || !common::have_tool("strace") {
        return;
    }
    let dir = scratch();
    let back = dir.path().join("back");
    fs::create_dir(&back).unwrap();
    make_file(&back.join("vm.img"), MIB, b'A');
    let m = Mount::start(dir.path(), &back, args);
    let _idle = common::IdleProcs::spawn(50);
    let vmm = if rw {
        common::hold_open_rw(&m.path("vm.img"))
    } else {
        common::hold_open(&m.path("vm.img"))
    };
    let daemon = m.pid().expect("daemon pid");
    let activate = |what: &str| {
        let (res, out) = ctl_write_read(&m.ctl("activate"), "vm.img\n");
        assert_eq!(res, Ok(()), "activate ({what}): {out}");
        out
    };
    let full = |what: &str| {
        let out = activate(what);
        assert!(!out.contains("fencing=partial"), "{what}: {out:?}");
    };
    let named = |what: &str, pid: u32, how: &str| {
        let out = activate(what);
        assert!(
            out.contains("fencing=partial")
                && out.contains(&format!("{pid}("))
                && out.contains(how),
            "{what}: {pid} must be named as {how}: {out:?}"
        );
    };
    // Answered without a pass: at most the processes that opened the
    // backing (the holder, through passthrough) are read.
    let kept = |what: &str, step: &dyn Fn(&str)| {
        let trace = OpenTrace::attach(daemon, dir.path().join(format!("trace-{what}")));
        step(what);
        let passes = trace.fdinfo_passes();
        assert!(
            passes.keys().all(|p| *p == vmm.0.id()),
            "{what}: answered with a /proc pass, not the kept answer: {passes:?}"
        );
    };

    full("first, a pass");
    kept("kept, nobody outside", &|w| full(w));

    // A direct writer opens after that answer.
    let direct = common::hold_open_rw(&back.join("vm.img"));
    named("direct writer", direct.0.id(), "backing-writer");
    named("direct writer, again", direct.0.id(), "backing-writer");
    drop(direct);
    full("direct writer gone");
    kept("kept after the direct writer", &|w| full(w));

    // A writer through another migsafe mount of the same backing.
    let m2 = Mount::start(dir.path(), &back, args);
    let other = common::hold_open_rw(&m2.path("vm.img"));
    named(
        "through another mount",
        other.0.id(),
        "writer-through-another-mount",
    );
    drop(other);
    drop(m2);
    full("other mount gone");
    kept("kept after the other mount", &|w| full(w));

    // An opener that hands its file to a child and exits before the next
    // command: the child is named.
    let mut sh = std::process::Command::new("sh")
        .arg("-c")
        .arg("exec 3<>\"$1\"; sleep 600 & echo $!")
        .arg("sh")
        .arg(back.join("vm.img"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(sh.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let child: u32 = line.trim().parse().unwrap();
    let _child = KillOnDrop(child as i32);
    assert!(sh.wait().unwrap().success());
    named("a child of an opener that exited", child, "backing-writer");
    drop(_child);
    drop(vmm);
}

/// Found as a hang of the write-back race test beside another: while
/// `inactivate` decides, writes of the image wait, and a process whose
/// close-on-exec of an image fd writes its dirty pages back waits inside
/// exec for them, holding its exec lock; a /proc read of that process (its
/// `maps` for the holders, its `stat` for the writers) waits for that lock.
/// The old code named writers and holders from /proc inside the decision:
/// the command, the exec and every later request of the image waited for
/// each other. Now /proc is read once the decision is over. Here children
/// that each open the write-back device, write into its cache and exec
/// (closing the fd: a write-back at exec) run in a loop while `inactivate`
/// runs again and again; every `inactivate` must answer (ok or EBUSY).
#[test]
fn inactivate_answers_while_processes_exec_with_dirty_pages() {
    if !common::require_root() {
        return;
    }
    let bed = LoopBed::new(16, &["--writeback", "on"], &["--writeback", "on"]);
    assert_eq!(common::status(&bed.a)["data_paths"]["writeback"], true);
    let disk = bed.a.path("disk");
    let script = r#"
import os, random, sys, time
path, until = sys.argv[1], time.time() + float(sys.argv[2])
buf = b'E' * 65536
while time.time() < until:
    pid = os.fork()
    if pid == 0:
        fd = os.open(path, os.O_RDWR)  # close-on-exec
        os.pwrite(fd, buf, random.randrange(256) * 65536)
        os.execv('/bin/true', ['true'])
    os.waitpid(pid, 0)
"#;
    let mut loop_ = common::ChildGuard(
        std::process::Command::new("/usr/bin/python3")
            .args(["-c", script])
            .arg(&disk)
            .arg("20")
            .spawn()
            .expect("spawn the exec loop"),
    );
    let (mut ok, mut busy) = (0, 0);
    for round in 0..50 {
        let ctl = bed.a.ctl("inactivate");
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send(ctl_write_read(&ctl, "disk\n"));
        });
        let (res, out) = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                panic!(
                    "round {round}: inactivate did not answer in 30 s while processes exec with \
                 dirty pages of the image\nlog:\n{}",
                    bed.a.log_text()
                )
            });
        match res {
            Ok(()) => ok += 1,
            Err(libc::EBUSY) => busy += 1,
            Err(e) => panic!("round {round}: inactivate: errno {e}: {out}"),
        }
        // activate refuses while the children's pages are dirty or being
        // written back: retried until a moment without them.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (res, out) = ctl_write_read(&bed.a.ctl("activate"), "disk\n");
            match res {
                Ok(()) => break,
                Err(libc::EBUSY) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(5))
                }
                Err(_) => panic!("round {round}: activate: {out}"),
            }
        }
    }
    eprintln!("{ok} ok, {busy} EBUSY");
    let _ = loop_.0.kill();
}
