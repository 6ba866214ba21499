//! Mapped writes across `inactivate` on the data paths whose mappings use
//! the FUSE inode's pages (relay and cached regular files): what the
//! command writes back, drops and counts must be the image's own FUSE
//! inode, also after the image was renamed on the backing; and a refused
//! handover must leave a mapping writer as it was.

mod common;

use common::{Mount, ctl_write_read, open_rw, scratch};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const PAGE: usize = 4096;
const PAGES: usize = 64;
const LEN: usize = PAGE * PAGES;

/// A shared read-write mapping of a whole file, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; the tests write it from one
// thread at a time and read it back only after that thread has stopped.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    fn shared(f: &File, len: usize) -> Mapping {
        // SAFETY: a fresh mapping of an open fd; checked for MAP_FAILED.
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
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            io::Error::last_os_error()
        );
        Mapping {
            ptr: ptr.cast(),
            len,
        }
    }

    /// Writes `byte` over the first 8 bytes of page `page`.
    fn write_page(&self, page: usize, byte: u8) {
        assert!(page * PAGE + 8 <= self.len);
        for i in 0..8 {
            // SAFETY: inside the live mapping (checked above).
            unsafe { std::ptr::write_volatile(self.ptr.add(page * PAGE + i), byte) };
        }
    }

    fn read_page(&self, page: usize) -> u8 {
        // SAFETY: inside the live mapping.
        unsafe { std::ptr::read_volatile(self.ptr.add(page * PAGE)) }
    }

    /// msync(MS_SYNC) of the whole mapping: the errno it gave.
    fn msync(&self) -> Result<(), i32> {
        // SAFETY: msync of the whole live mapping.
        let r = unsafe { libc::msync(self.ptr.cast(), self.len, libc::MS_SYNC) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error().raw_os_error().unwrap_or(0))
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in shared().
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The first byte of every page of `path` as storage has it (read on the
/// backing, whose page cache relay and cached keep coherent with storage).
fn storage_pages(path: &Path) -> Vec<u8> {
    let f = File::open(path).unwrap();
    (0..PAGES)
        .map(|p| {
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, (p * PAGE) as u64).unwrap();
            b[0]
        })
        .collect()
}

/// Maps `vm.img` through a `--io io` mount, writes every page through the
/// mapping, optionally renames the image on the backing to `old.img` and
/// creates a new `vm.img`, and runs `inactivate *`. Returns the command's
/// result and text, the first byte of every page of the image on storage,
/// and what msync gave afterwards.
struct Run {
    res: Result<(), i32>,
    out: String,
    /// The first byte of every page on storage after the command...
    stored: Vec<u8>,
    msync: Result<(), i32>,
    /// ...and after the msync that followed it.
    stored_after_msync: Vec<u8>,
}

/// `rename`: where the image goes on the backing's filesystem (relative to
/// the scratch directory; `back/` is the backing) before the command, a new
/// `vm.img` taking its old name.
fn rename_then_inactivate(io: &str, rename: Option<&str>) -> Run {
    let dir = scratch();
    let back = dir.path().join("back");
    fs::create_dir(&back).unwrap();
    common::make_file(&back.join("vm.img"), LEN, b'0');
    let m = Mount::start(dir.path(), &back, &["--io", io]);
    let f = open_rw(&m.path("vm.img"));
    let map = Mapping::shared(&f, LEN);
    for p in 0..PAGES {
        map.write_page(p, b'M');
    }
    let image = match rename {
        Some(to) => {
            fs::rename(back.join("vm.img"), dir.path().join(to)).unwrap();
            common::make_file(&back.join("vm.img"), LEN, b'N');
            dir.path().join(to)
        }
        None => back.join("vm.img"),
    };
    let (res, out) = ctl_write_read(&m.ctl("inactivate"), "*\n");
    let stored = storage_pages(&image);
    let msync = map.msync();
    let stored_after_msync = storage_pages(&image);
    drop(map);
    drop(f);
    Run {
        res,
        out,
        stored,
        msync,
        stored_after_msync,
    }
}

/// Item: `inactivate *` after the image was renamed on the backing and a
/// new file took its old name. The command must reach the image's own FUSE
/// inode (its mapped writes on storage) or fail; never ok with data lost.
/// Renamed inside the backing, it is found by its new name; moved out of
/// the backing, it cannot be reached and the command fails with ESTALE,
/// leaving the writer as it was. Negative control: without the rename all
/// mapped data is on storage, so the check can see it.
fn renamed_image(io: &str) {
    let r = rename_then_inactivate(io, None);
    assert_eq!(r.res, Ok(()), "{io}, control: {}", r.out);
    assert!(
        r.stored.iter().all(|&b| b == b'M'),
        "NEGATIVE CONTROL FAILED ({io}): without the rename the mapped writes are not all on storage: {:?}",
        String::from_utf8_lossy(&r.stored)
    );
    assert_eq!(r.msync, Ok(()), "{io}, control: msync");

    let r = rename_then_inactivate(io, Some("back/old.img"));
    let lost = r.stored.iter().filter(|&&b| b != b'M').count();
    assert_eq!(
        lost, 0,
        "{io}: inactivate * gave {:?} but {lost} of {PAGES} mapped pages are not on storage \
         (msync: {:?}): {}",
        r.res, r.msync, r.out
    );
    assert_eq!(r.res, Ok(()), "{io}: {}", r.out);
    assert_eq!(
        r.msync,
        Ok(()),
        "{io}: msync after an ok inactivate: {}",
        r.out
    );
    assert!(
        r.out.contains("image=old.img result=ok"),
        "{io}: the result names the image by its current name: {:?}",
        r.out
    );

    let r = rename_then_inactivate(io, Some("moved.img"));
    eprintln!("{io}, moved out of the backing: {}", r.out.trim_end());
    assert_eq!(
        r.res,
        Err(libc::ESTALE),
        "{io}: an image moved out of the backing, its name taken: {}",
        r.out
    );
    assert!(
        r.out.contains("image=vm.img") && r.out.contains("current path"),
        "{io}: the failure names the image and what to do: {:?}",
        r.out
    );
    assert_eq!(
        r.msync,
        Ok(()),
        "{io}: msync after the failed inactivate: {}",
        r.out
    );
    assert!(
        r.stored_after_msync.iter().all(|&b| b == b'M'),
        "{io}: the mapped writes are not on storage after msync: {:?}",
        String::from_utf8_lossy(&r.stored_after_msync)
    );
}

#[test]
fn inactivate_reaches_a_renamed_images_own_fuse_inode_relay() {
    if !common::require_root() {
        return;
    }
    renamed_image("relay");
}

#[test]
fn inactivate_reaches_a_renamed_images_own_fuse_inode_cached() {
    if !common::require_root() {
        return;
    }
    renamed_image("cached");
}

/// A writer thread dirtying every page of a mapping in a loop (a new value
/// each round, msync(MS_SYNC) every few rounds, as a guest flushing does)
/// until stopped. Records the first msync error.
struct Writer {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    msync_error: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(map: Arc<Mapping>) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let msync_error = Arc::new(AtomicU64::new(0));
        let (s, r, e) = (stop.clone(), rounds.clone(), msync_error.clone());
        let thread = std::thread::spawn(move || {
            let mut n: u64 = 0;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                let byte = b'a' + (n % 26) as u8;
                for p in 0..PAGES {
                    map.write_page(p, byte);
                }
                if n.is_multiple_of(8)
                    && let Err(errno) = map.msync()
                {
                    let _ =
                        e.compare_exchange(0, errno as u64, Ordering::Relaxed, Ordering::Relaxed);
                }
                r.store(n, Ordering::Relaxed);
            }
        });
        Writer {
            stop,
            rounds,
            msync_error,
            thread: Some(thread),
        }
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A process-level writer the daemon cannot fence: buffered pwrites to the
/// backing file itself, past the mapped range, in a loop until stopped.
/// Its dirty pages make every `inactivate` fail with EBUSY, reliably.
fn backing_writer(
    path: &Path,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    std::thread::spawn(move || {
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let off = (LEN + (n as usize % 16) * PAGE) as u64;
            f.write_all_at(&[b'B'; PAGE], off).unwrap();
            n += 1;
            count.store(n, Ordering::Relaxed);
            // Hundreds of writes per delayed fsync, without taking a core.
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    })
}

/// Every fsync(2) of the daemon returns 300 ms late (strace fault
/// injection): the backing's pages are synced at once, but the direct
/// writer then has 300 ms to dirty pages again before the daemon looks at
/// them, so its refusal does not hang on a microsecond race. Detaches
/// (strace killed by its pid) on drop.
struct SlowFsync(std::process::Child);

impl SlowFsync {
    fn attach(pid: u32) -> SlowFsync {
        let slow = SlowFsync(
            std::process::Command::new("strace")
                .args(["-f", "-qq", "-o", "/dev/null", "-e", "trace=fsync"])
                .args(["-e", "inject=fsync:delay_exit=300000", "-p"])
                .arg(pid.to_string())
                .stdin(std::process::Stdio::null())
                .spawn()
                .expect("spawn strace"),
        );
        // Attached once every thread of the daemon has a tracer.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let traced = fs::read_dir(format!("/proc/{pid}/task")).unwrap().all(|t| {
                fs::read_to_string(t.unwrap().path().join("status"))
                    .map(|s| {
                        s.lines()
                            .any(|l| l.starts_with("TracerPid:") && !l.ends_with("\t0"))
                    })
                    .unwrap_or(true)
            });
            if traced {
                return slow;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "strace did not attach to {pid}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for SlowFsync {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Item: an `inactivate` refused with EBUSY (a process writing the backing
/// directly keeps dirtying pages, which no fencing stops) must leave a
/// mapping writer through the mount as it was: no mapped write made during
/// the command is refused, msync succeeds and storage holds what the
/// mapping holds. Negative control: once both writers stopped, the
/// `inactivate` succeeds and does fence the mapping: a mapped write then
/// gets EROFS at msync, so the checks can see a refusal.
fn refused_handover(io: &str) {
    let dir = scratch();
    let back = dir.path().join("back");
    fs::create_dir(&back).unwrap();
    common::make_file(&back.join("vm.img"), LEN + 16 * PAGE, b'0');
    let m = Mount::start(dir.path(), &back, &["--io", io]);
    let f = open_rw(&m.path("vm.img"));
    let map = Arc::new(Mapping::shared(&f, LEN));
    let mut writer = Writer::start(map.clone());
    let stop_direct = Arc::new(AtomicBool::new(false));
    let _stop_direct = common::SetOnDrop(&stop_direct);
    let direct_writes = Arc::new(AtomicU64::new(0));
    let direct = backing_writer(
        &back.join("vm.img"),
        stop_direct.clone(),
        direct_writes.clone(),
    );
    while writer.rounds.load(Ordering::Relaxed) < 16 || direct_writes.load(Ordering::Relaxed) < 16 {
        std::thread::yield_now();
    }
    let slow = SlowFsync::attach(m.pid().expect("daemon pid"));
    let mut refused = 0;
    for i in 0..6 {
        let (res, out) = ctl_write_read(&m.ctl("inactivate"), "vm.img\n");
        assert_eq!(
            res,
            Err(libc::EBUSY),
            "{io}, attempt {i}: inactivate must be refused while the mapping is written \
             (the test needs that refusal): {out}"
        );
        refused += 1;
        let e = writer.msync_error.load(Ordering::Relaxed);
        assert_eq!(
            e,
            0,
            "{io}, attempt {i}: the writer's msync failed with errno {e} during a refused inactivate: {out}\nlog:\n{}",
            m.log_text()
        );
    }
    writer.stop();
    drop(slow);
    stop_direct.store(true, Ordering::Relaxed);
    direct.join().unwrap();
    eprintln!(
        "{io}: {refused} refused inactivates; mapping writer rounds {}, direct backing writes {}",
        writer.rounds.load(Ordering::Relaxed),
        direct_writes.load(Ordering::Relaxed)
    );
    assert_eq!(
        writer.msync_error.load(Ordering::Relaxed),
        0,
        "{io}: msync failed during the refused inactivates"
    );
    assert_eq!(
        map.msync(),
        Ok(()),
        "{io}: msync after {refused} refused inactivates\nlog:\n{}",
        m.log_text()
    );
    let want: Vec<u8> = (0..PAGES).map(|p| map.read_page(p)).collect();
    assert_eq!(
        storage_pages(&back.join("vm.img")),
        want,
        "{io}: storage does not hold what the mapping holds after refused inactivates"
    );

    // Negative control: a handover that succeeds does fence the mapping.
    let (res, out) = ctl_write_read(&m.ctl("inactivate"), "vm.img\n");
    assert_eq!(
        res,
        Ok(()),
        "{io}: inactivate with the writer stopped: {out}"
    );
    map.write_page(0, b'Z');
    assert_eq!(
        map.msync(),
        Err(libc::EROFS),
        "NEGATIVE CONTROL FAILED ({io}): a mapped write after a successful inactivate was not refused"
    );
    drop(writer);
    let (res, out) = ctl_write_read(&m.ctl("activate"), "vm.img\n");
    assert!(res.is_ok() || res == Err(libc::EBUSY), "{out}");
}

#[test]
fn a_refused_inactivate_leaves_a_mapping_writer_intact_relay() {
    if !common::require_root() {
        return;
    }
    refused_handover("relay");
}

#[test]
fn a_refused_inactivate_leaves_a_mapping_writer_intact_cached() {
    if !common::require_root() {
        return;
    }
    refused_handover("cached");
}
