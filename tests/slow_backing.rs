//! The handover while the destination's backing is slow: a read of the image
//! that B's backing started before the source wrote is still in flight when
//! B activates (docs/DESIGN.md §3, step 4). On the mergerfs bed (two
//! `cache.files=full` mounts of one directory, the NFS model of §1), B's
//! mergerfs answers every `pread64` 7 s late (strace delay injection), so
//! B's page of the image is in the page cache, locked and not uptodate, while
//! A writes, fsyncs and inactivates. The delayed read then lands with the
//! bytes it read before A's write: A writes only once strace's trace shows
//! B's mergerfs held at the exit of `pread64`s covering the range, that is
//! with their bytes already read (`held_reads`).
//!
//! Required: once `activate` says ok, B reads the new bytes through the fd
//! that had the read in flight and through a new one; or `activate` says
//! EBUSY, and a retry after the read landed succeeds and B reads the new
//! bytes. Negative control in the same test: the same steps without
//! activate leave B reading the old bytes.

mod common;

use common::{
    ChildGuard, KMount, Mount, ctl_write_read, evict, hold_open, make_file, read_at, residency,
    scratch,
};
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
const LEN: usize = 64 << 10;
/// How late B's backing answers each read: inside activate's 10 s limit
/// for reads in flight (and long enough for A's write, fsync and
/// inactivate on a loaded machine), and well past it.
const DELAY_US: u64 = 7_000_000;
const LONG_DELAY_US: u64 = 16_000_000;

fn all(buf: &[u8], byte: u8) -> bool {
    buf.iter().all(|&b| b == byte)
}

fn describe(buf: &[u8]) -> String {
    let a = buf.iter().filter(|&&b| b == b'A').count();
    let b = buf.iter().filter(|&&b| b == b'B').count();
    format!("{} bytes: {a} x 'A' (old), {b} x 'B' (new)", buf.len())
}

/// The pid of the mergerfs process serving `mnt`.
fn mergerfs_pid(mnt: &Path) -> u32 {
    let want = mnt.to_string_lossy().into_owned();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first().is_some_and(|a| a.ends_with("mergerfs")) && args.contains(&want) {
            return pid;
        }
    }
    panic!("no mergerfs process serves {want}");
}

/// strace on B's mergerfs, delaying the return of each `pread64`; its
/// trace tells which reads are held and what they read (`preads`).
struct SlowPreads {
    _strace: ChildGuard,
    trace: PathBuf,
}

/// strace attached to every thread of `pid`, delaying the return of each
/// `pread64` by `delay_us`, recording each call in `log` with `.trace` for
/// extension; detached (killed by its own pid) on drop.
fn slow_preads(pid: u32, delay_us: u64, log: &Path) -> SlowPreads {
    let trace = log.with_extension("trace");
    let child = Command::new("strace")
        .args(["-f", "-qq", "-tt", "-s", "4", "-e", "trace=pread64"])
        .arg("-o")
        .arg(&trace)
        .arg("-e")
        .arg(format!("inject=pread64:delay_exit={delay_us}"))
        .arg("-p")
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stderr(File::create(log).unwrap())
        .spawn()
        .expect("spawn strace");
    let guard = ChildGuard(child);
    // Attached once every thread of the process is traced.
    let threads = fs::read_dir(format!("/proc/{pid}/task")).unwrap().count();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let traced = fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .filter(|t| {
                fs::read_to_string(t.path().join("status"))
                    .unwrap_or_default()
                    .lines()
                    .any(|l| {
                        l.starts_with("TracerPid:") && l.split_whitespace().nth(1) != Some("0")
                    })
            })
            .count();
        if traced >= threads {
            return SlowPreads {
                _strace: guard,
                trace,
            };
        }
        assert!(
            Instant::now() < deadline,
            "strace did not attach to {pid}: {}",
            fs::read_to_string(log).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// A `pread64` of B's mergerfs as strace recorded it. strace prints a call
/// when the syscall returns, before it holds the thread for the injected
/// delay (the line ends in `(DELAYED)`): a read in the trace has taken its
/// bytes from the file by the time the line is there. A thread merely seen
/// in `pread64` in /proc may not have: /proc shows the call at the
/// syscall-entry stop too, where a loaded tracer can keep it for long.
#[derive(Debug, Clone, PartialEq)]
struct Pread {
    offset: u64,
    len: u64,
    /// The first bytes read (`-s 4`).
    head: String,
    line: String,
}

impl Pread {
    fn overlaps(&self, off: u64, len: u64) -> bool {
        self.offset < off + len && off < self.offset + self.len
    }
}

/// The `pread64`s that returned data, in the order strace printed them.
fn preads(trace: &Path) -> Vec<Pread> {
    let text = fs::read_to_string(trace).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("pread64") && l.ends_with("(DELAYED)"))
        .filter_map(|l| {
            // `... pread64(8, "AAAA"..., 65536, 10485760) = 65536 (DELAYED)`,
            // or `<... pread64 resumed>"AAAA"..., 65536, 10485760) = ...`.
            let (call, ret) = l.rsplit_once(") = ")?;
            let len: u64 = ret.split_whitespace().next()?.parse().ok()?;
            let mut args = call.rsplitn(3, ", ");
            let offset: u64 = args.next()?.parse().ok()?;
            let _count = args.next()?;
            let head = args.next()?.split('"').nth(1)?.to_string();
            Some(Pread {
                offset,
                len,
                head,
                line: l.to_string(),
            })
        })
        .filter(|r| r.len > 0)
        .collect()
}

/// The held reads of `trace` once together they cover `[off, off + len)`.
fn held_reads(trace: &Path, off: u64, len: u64) -> Option<Vec<Pread>> {
    let reads: Vec<Pread> = preads(trace)
        .into_iter()
        .filter(|r| r.overlaps(off, len))
        .collect();
    let mut pos = off;
    while pos < off + len {
        pos = reads
            .iter()
            .filter(|r| r.offset <= pos && pos < r.offset + r.len)
            .map(|r| r.offset + r.len)
            .max()?;
    }
    Some(reads)
}

/// Waits until B's mergerfs is held at the exit of `pread64`s covering
/// `[off, off + len)`, their bytes read; checks those are the old ones.
fn wait_held_reads(
    trace: &Path,
    off: u64,
    len: u64,
    deadline: Instant,
    reader: &thread::JoinHandle<Vec<u8>>,
) -> Vec<Pread> {
    loop {
        if let Some(held) = held_reads(trace, off, len) {
            assert!(
                held.iter().all(|r| r.head.bytes().all(|b| b == b'A')),
                "bed: B's mergerfs read other than the old bytes before A wrote: {held:#?}"
            );
            return held;
        }
        assert!(
            Instant::now() < deadline && !reader.is_finished(),
            "bed: B's mergerfs never held reads of [{off}, +{len}) with their bytes read; \
             trace:\n{}",
            fs::read_to_string(trace).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// Whether each page of `buf` is all old or all new bytes.
fn pagewise_old_or_new(buf: &[u8]) -> bool {
    buf.chunks(4096).all(|p| all(p, b'A') || all(p, b'B'))
}

/// Pages of `backing` in the page cache but not uptodate: under read.
fn pages_under_read(backing: &Path) -> u64 {
    let r = residency(backing);
    let uptodate: u64 = r.json["files"][0]["resident_ranges"]
        .as_array()
        .map(|v| {
            v.iter()
                .map(|p| (p[1].as_u64().unwrap() - p[0].as_u64().unwrap()).div_ceil(4096))
                .sum()
        })
        .unwrap_or(0);
    r.cached.saturating_sub(uptodate)
}

struct Bed {
    // Drop order: migsafe mounts, then the mergerfs mounts, then the dir.
    m1: Mount,
    m2: Mount,
    _host_a: KMount,
    host_b: KMount,
    dir: common::Scratch,
}

impl Bed {
    fn new(dst_io: &str) -> Bed {
        let dir = scratch();
        let shared = dir.path().join("nfs");
        fs::create_dir(&shared).unwrap();
        make_file(&shared.join("disk.img"), 16 * MIB, b'A');
        let host_a = KMount::mergerfs(&shared, &dir.path().join("host-a"));
        let host_b = KMount::mergerfs(&shared, &dir.path().join("host-b"));
        let m1 = Mount::start(dir.path(), &host_a.path, &["--io", "relay"]);
        let m2 = Mount::start(dir.path(), &host_b.path, &["--io", dst_io]);
        Bed {
            m1,
            m2,
            _host_a: host_a,
            host_b,
            dir,
        }
    }
}

/// One handover at `off` with B's read of it in flight, B's backing
/// answering `delay_us` late; `activate`: whether B activates while the read
/// is in flight (false = the negative control). Returns that activate's
/// result.
fn round(
    bed: &Bed,
    dst_io: &str,
    off: u64,
    delay_us: u64,
    activate: bool,
) -> Option<Result<(), i32>> {
    let disk1 = bed.m1.path("disk.img");
    let disk2 = bed.m2.path("disk.img");
    let backing_b = bed.host_b.path.join("disk.img");
    evict(&backing_b);
    let f2 = File::open(&disk2).unwrap();
    let strace = slow_preads(
        mergerfs_pid(&bed.host_b.path),
        delay_us,
        &bed.dir.path().join("strace.log"),
    );

    // B starts reading; its backing answers `delay_us` late.
    let reader = {
        let f2 = f2.try_clone().unwrap();
        thread::spawn(move || {
            let mut buf = vec![0u8; LEN];
            f2.read_exact_at(&mut buf, off).unwrap();
            buf
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while pages_under_read(&backing_b) == 0 {
        assert!(
            Instant::now() < deadline && !reader.is_finished(),
            "bed: B's read never showed up as under read in {}",
            backing_b.display()
        );
        thread::sleep(Duration::from_millis(5));
    }
    // B's mergerfs has read the old bytes of the range and is held by strace
    // at the return of those reads: only now is the read in flight stale.
    let held = wait_held_reads(&strace.trace, off, LEN as u64, deadline, &reader);

    // A writes, fsyncs and inactivates while B's read is in flight.
    {
        let f = fs::OpenOptions::new().write(true).open(&disk1).unwrap();
        f.write_all_at(&vec![b'B'; LEN], off).unwrap();
        f.sync_all().unwrap();
    }
    let (res, out) = ctl_write_read(&bed.m1.ctl("inactivate"), "disk.img\n");
    assert_eq!(res, Ok(()), "inactivate on A: {out}");
    assert!(
        !reader.is_finished(),
        "bed: B's read landed before A had inactivated; the delay is too short"
    );

    let mut activated: Option<(Result<(), i32>, String)> = None;
    if activate {
        let t = Instant::now();
        let (res, out) = ctl_write_read(&bed.m2.ctl("activate"), "disk.img\n");
        eprintln!(
            "{dst_io}: activate with a read in flight: {res:?} after {} ms, read {}: {}",
            t.elapsed().as_millis(),
            if reader.is_finished() {
                "landed"
            } else {
                "still in flight"
            },
            out.trim()
        );
        activated = Some((res, out));
    }
    let in_flight = reader.join().unwrap();
    // The held reads landed the old bytes in B's page cache. The reader,
    // woken when they land, looks its pages up again; activate drops them
    // as soon as they are unlocked, and when it gets there first (often on
    // a loaded machine) the reader reads them again, after A's write: new
    // bytes, which the trace must show as a second read of the range.
    // Without activate nothing drops them: the reader gets the stale bytes.
    let again: Vec<Pread> = preads(&strace.trace)
        .into_iter()
        .filter(|r| r.overlaps(off, LEN as u64) && !held.contains(r))
        .collect();
    eprintln!(
        "{dst_io}: the read in flight returned {}; held reads {:?}, read again {:?}",
        describe(&in_flight),
        held.iter().map(|r| &r.line).collect::<Vec<_>>(),
        again.iter().map(|r| &r.line).collect::<Vec<_>>()
    );
    assert!(
        all(&in_flight, b'A') || (activate && pagewise_old_or_new(&in_flight) && !again.is_empty()),
        "bed: the in-flight read must carry the bytes read before A's write{}: {}",
        if activate {
            ", or pages read again after activate dropped them"
        } else {
            ""
        },
        describe(&in_flight)
    );
    // B's backing answers promptly again.
    drop(strace);

    let read_both = |what: &str| {
        let mut same = vec![0u8; LEN];
        f2.read_exact_at(&mut same, off).unwrap();
        let new = read_at(&disk2, off, LEN);
        eprintln!(
            "{dst_io} {what}: same fd {}; new fd {}",
            describe(&same),
            describe(&new)
        );
        (same, new)
    };
    let first = activated.as_ref().map(|(res, _)| *res);
    match activated {
        None => {
            // NEGATIVE CONTROL: without activate, B serves the old bytes.
            let (same, new) = read_both("without activate");
            assert!(
                all(&same, b'A') && all(&new, b'A'),
                "NEGATIVE CONTROL FAILED ({dst_io}): without activate B did not read the old \
                 bytes (same fd {}, new fd {}); the bed proves nothing",
                describe(&same),
                describe(&new)
            );
            let (res, out) = ctl_write_read(&bed.m2.ctl("activate"), "disk.img\n");
            assert_eq!(res, Ok(()), "activate once the read landed: {out}");
        }
        Some((Ok(()), out)) => {
            assert!(out.contains("result=ok"), "activate read-back: {out:?}");
        }
        Some((Err(libc::EBUSY), out)) => {
            assert!(
                out.contains("under read"),
                "EBUSY must name the pages under read: {out}"
            );
            let (res, out) = ctl_write_read(&bed.m2.ctl("activate"), "disk.img\n");
            assert_eq!(res, Ok(()), "activate retried after the read landed: {out}");
        }
        Some((Err(e), out)) => panic!("activate failed with errno {e}: {out}"),
    }
    let (same, new) = read_both("after activate");
    assert!(
        all(&same, b'B') && all(&new, b'B'),
        "{dst_io}: after activate said ok, B read old bytes: same fd {}, new fd {}\nB log:\n{}",
        describe(&same),
        describe(&new),
        bed.m2.log_text()
    );
    // A takes the image back for the next round.
    let (res, out) = ctl_write_read(&bed.m1.ctl("activate"), "disk.img\n");
    assert_eq!(res, Ok(()), "re-activate A: {out}");
    first
}

fn slow_backing_handover(dst_io: &str) {
    let bed = Bed::new(dst_io);
    // Both VMMs hold the image open (later opens are not first opens).
    let _vmm_b = hold_open(&bed.m2.path("disk.img"));
    let _vmm_a = hold_open(&bed.m1.path("disk.img"));
    assert!(
        bed.m2.log_text().contains(&format!("data path={dst_io}")),
        "B must use the {dst_io} data path; log:\n{}",
        bed.m2.log_text()
    );
    round(&bed, dst_io, 4 << 20, DELAY_US, false);
    round(&bed, dst_io, 10 << 20, DELAY_US, true);
}

#[test]
fn activate_waits_out_a_slow_backing_read_relay() {
    if !common::require_root() || !common::have_tool("mergerfs") || !common::have_tool("strace") {
        return;
    }
    slow_backing_handover("relay");
}

#[test]
fn activate_waits_out_a_slow_backing_read_passthrough() {
    if !common::require_root() || !common::have_tool("mergerfs") || !common::have_tool("strace") {
        return;
    }
    slow_backing_handover("passthrough");
}

/// A read in flight that does not land within activate's limit (10 s):
/// activate must refuse with EBUSY naming the pages under read, and succeed
/// once the read has landed (the retry inside `round`), B then reading the
/// new bytes.
#[test]
fn activate_refuses_a_read_in_flight_past_its_limit() {
    if !common::require_root() || !common::have_tool("mergerfs") || !common::have_tool("strace") {
        return;
    }
    let bed = Bed::new("relay");
    let _vmm_b = hold_open(&bed.m2.path("disk.img"));
    let _vmm_a = hold_open(&bed.m1.path("disk.img"));
    let first = round(&bed, "relay", 6 << 20, LONG_DELAY_US, true);
    assert_eq!(
        first,
        Some(Err(libc::EBUSY)),
        "activate with a read in flight for 16 s must refuse after its 10 s limit"
    );
}

/// Races as races: B's backing answers every read 150 ms late while a
/// reader on B keeps re-reading a block, dropping its backing pages first
/// (as memory pressure would), so reads of it are in flight nearly all the
/// time, also while `activate` runs. Each iteration A writes a new
/// generation, fsyncs and inactivates; B activates, which must succeed (a
/// process steadily re-reading the image must not make it fail: every page
/// it reads again was read after the command started), and B must then read
/// that generation through a long-open fd and a new one.
///
/// Bed check instead of a stale-read control (which needs a read issued
/// before A's write still in flight at activate: the single-shot tests
/// above): reads of the block must be seen under read just before activate
/// in most iterations, or the loop raced nothing. Before step 4 waited for
/// such reads with a read of its own, this loop made activate fail with
/// EBUSY after 10 s: probes caught the block under read every time.
fn reread_race(dst_io: &str) {
    use std::sync::atomic::{AtomicBool, Ordering};
    const ITERATIONS: usize = 12;
    let bed = Bed::new(dst_io);
    let _vmm_b = hold_open(&bed.m2.path("disk.img"));
    let _vmm_a = hold_open(&bed.m1.path("disk.img"));
    let off: u64 = 12 << 20;
    let disk1 = bed.m1.path("disk.img");
    let disk2 = bed.m2.path("disk.img");
    let backing_b = bed.host_b.path.join("disk.img");
    let _strace = slow_preads(
        mergerfs_pid(&bed.host_b.path),
        150_000,
        &bed.dir.path().join("strace-loop.log"),
    );
    let stop = AtomicBool::new(false);
    let raced = thread::scope(|s| {
        let _stop = common::SetOnDrop(&stop);
        s.spawn(|| {
            let f = File::open(&disk2).unwrap();
            let raw = File::open(&backing_b).unwrap();
            let mut buf = vec![0u8; LEN];
            while !stop.load(Ordering::Relaxed) {
                let _ = nix::fcntl::posix_fadvise(
                    &raw,
                    off as i64,
                    LEN as i64,
                    nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
                );
                let _ = f.read_at(&mut buf, off);
            }
        });
        let same = File::open(&disk2).unwrap();
        let mut raced = 0;
        for i in 0..ITERATIONS {
            let generation = b'a' + i as u8;
            {
                let f = fs::OpenOptions::new().write(true).open(&disk1).unwrap();
                f.write_all_at(&vec![generation; LEN], off).unwrap();
                f.sync_all().unwrap();
            }
            let (res, out) = ctl_write_read(&bed.m1.ctl("inactivate"), "disk.img\n");
            assert_eq!(res, Ok(()), "iteration {i}: inactivate on A: {out}");
            if pages_under_read(&backing_b) > 0 {
                raced += 1;
            }
            let t = Instant::now();
            let (res, out) = ctl_write_read(&bed.m2.ctl("activate"), "disk.img\n");
            eprintln!(
                "{dst_io} iteration {i}: activate {res:?} in {} ms",
                t.elapsed().as_millis()
            );
            assert_eq!(
                res,
                Ok(()),
                "iteration {i}: a reader re-reading through a slow backing failed activate: {out}"
            );
            let mut a = vec![0u8; LEN];
            same.read_exact_at(&mut a, off).unwrap();
            let b = read_at(&disk2, off, LEN);
            let old = |buf: &[u8]| buf.iter().filter(|&&x| x != generation).count();
            assert!(
                old(&a) == 0 && old(&b) == 0,
                "iteration {i}: after activate said ok, B read an older generation: {} of {LEN} \
                 bytes through the open fd, {} through a new fd\nB log:\n{}",
                old(&a),
                old(&b),
                bed.m2.log_text()
            );
            let (res, out) = ctl_write_read(&bed.m1.ctl("activate"), "disk.img\n");
            assert_eq!(res, Ok(()), "iteration {i}: re-activate A: {out}");
        }
        raced
    });
    eprintln!(
        "{dst_io}: reads in flight just before activate in {raced} of {ITERATIONS} iterations"
    );
    assert!(
        raced * 2 >= ITERATIONS,
        "bed: reads in flight just before activate in only {raced} of {ITERATIONS} iterations; \
         the loop raced nothing"
    );
}

#[test]
fn activate_races_slow_rereads_relay() {
    if !common::require_root() || !common::have_tool("mergerfs") || !common::have_tool("strace") {
        return;
    }
    reread_race("relay");
}

#[test]
fn activate_races_slow_rereads_passthrough() {
    if !common::require_root() || !common::have_tool("mergerfs") || !common::have_tool("strace") {
        return;
    }
    reread_race("passthrough");
}

/// How late B's backing answers in `retries_share_one_settle_read`: longer
/// than the whole test, so the read is hung until strace is killed.
const HUNG_US: u64 = 120_000_000;

/// `Threads:` of `/proc/PID/status`, and how many of those threads are
/// named `name`.
fn threads_of(pid: u32, name: &str) -> (usize, usize) {
    let total = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let named = fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .filter(|t| {
                    fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name)
                })
                .count()
        })
        .unwrap_or(0);
    (total, named)
}

/// The daemon's thread count once no command worker is left (a worker ends
/// once the queue is empty, just after the command's reply), and how many
/// of its threads are settle reads.
fn quiet_threads(pid: u32) -> (usize, usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while threads_of(pid, "migsafe-command").1 > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    threads_of(pid, "settle-read")
}

/// Retries of `activate` while B's backing hangs on a read of the image
/// (operators and scripts retry on EBUSY): each attempt fails with EBUSY
/// naming the pages under read, and the daemon must not leave one more
/// blocked thread behind per attempt. Step 4 waits for the read in flight
/// with a read of its own in a helper thread; a later wait for the same page
/// joins that read instead of starting another. Before that, three attempts
/// left three `settle-read` threads blocked on the hung page. Control: once
/// the backing answers again (strace killed), the settle reads end, activate
/// succeeds and B reads the new bytes.
#[test]
fn retries_share_one_settle_read() {
    if !common::require_root() || !common::have_tool("mergerfs") || !common::have_tool("strace") {
        return;
    }
    const ATTEMPTS: usize = 3;
    let bed = Bed::new("relay");
    let _vmm_b = hold_open(&bed.m2.path("disk.img"));
    let _vmm_a = hold_open(&bed.m1.path("disk.img"));
    let daemon_b = bed.m2.pid().expect("B's daemon runs");
    let off: u64 = 8 << 20;
    let disk1 = bed.m1.path("disk.img");
    let disk2 = bed.m2.path("disk.img");
    let backing_b = bed.host_b.path.join("disk.img");
    evict(&backing_b);
    let f2 = File::open(&disk2).unwrap();
    let strace = slow_preads(
        mergerfs_pid(&bed.host_b.path),
        HUNG_US,
        &bed.dir.path().join("strace-hung.log"),
    );

    // B starts reading; its backing does not answer.
    let reader = {
        let f2 = f2.try_clone().unwrap();
        thread::spawn(move || {
            let mut buf = vec![0u8; LEN];
            f2.read_exact_at(&mut buf, off).unwrap();
            buf
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while pages_under_read(&backing_b) == 0 {
        assert!(
            Instant::now() < deadline && !reader.is_finished(),
            "bed: B's read never showed up as under read in {}",
            backing_b.display()
        );
        thread::sleep(Duration::from_millis(5));
    }
    wait_held_reads(&strace.trace, off, LEN as u64, deadline, &reader);

    // A writes, fsyncs and inactivates while B's read hangs.
    {
        let f = fs::OpenOptions::new().write(true).open(&disk1).unwrap();
        f.write_all_at(&vec![b'B'; LEN], off).unwrap();
        f.sync_all().unwrap();
    }
    let (res, out) = ctl_write_read(&bed.m1.ctl("inactivate"), "disk.img\n");
    assert_eq!(res, Ok(()), "inactivate on A: {out}");

    let (before, settle_before) = quiet_threads(daemon_b);
    eprintln!("B's daemon before activate: {before} threads, {settle_before} settle reads");
    assert_eq!(
        settle_before, 0,
        "bed: no settle read before the first activate"
    );
    let mut counts = Vec::new();
    for attempt in 1..=ATTEMPTS {
        let t = Instant::now();
        let (res, out) = ctl_write_read(&bed.m2.ctl("activate"), "disk.img\n");
        let (threads, settle) = quiet_threads(daemon_b);
        eprintln!(
            "attempt {attempt}: activate {res:?} after {} ms; B's daemon: {threads} threads, \
             {settle} settle reads; {}",
            t.elapsed().as_millis(),
            out.trim()
        );
        assert!(
            !reader.is_finished(),
            "bed: B's read landed during attempt {attempt}; the backing must hang"
        );
        assert_eq!(
            res,
            Err(libc::EBUSY),
            "attempt {attempt}: activate with a hung read in flight must refuse: {out}"
        );
        assert!(
            out.contains("under read"),
            "attempt {attempt}: EBUSY must name the pages under read: {out}"
        );
        assert!(
            settle >= 1,
            "bed: attempt {attempt} left no settle read blocked on the hung page"
        );
        counts.push((threads, settle));
    }
    let (after, settle_after) = *counts.last().unwrap();
    assert!(
        after <= before + 1 && settle_after <= 1,
        "{ATTEMPTS} activate attempts on a hung backing grew B's daemon from {before} to \
         {after} threads ({settle_after} settle reads blocked; per attempt: {counts:?}): \
         one blocked thread per retry"
    );

    // CONTROL: the backing answers again; the read lands with the old bytes,
    // the settle read ends, activate succeeds and B reads the new bytes.
    drop(strace);
    let in_flight = reader.join().unwrap();
    assert!(
        all(&in_flight, b'A'),
        "bed: the hung read must carry the bytes read before A's write: {}",
        describe(&in_flight)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut left = threads_of(daemon_b, "settle-read").1;
    while left > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
        left = threads_of(daemon_b, "settle-read").1;
    }
    assert_eq!(
        left, 0,
        "settle reads still blocked once the backing answered"
    );
    let (res, out) = ctl_write_read(&bed.m2.ctl("activate"), "disk.img\n");
    assert_eq!(res, Ok(()), "activate once the backing answers: {out}");
    let mut same = vec![0u8; LEN];
    f2.read_exact_at(&mut same, off).unwrap();
    let new = read_at(&disk2, off, LEN);
    assert!(
        all(&same, b'B') && all(&new, b'B'),
        "after activate said ok, B read old bytes: same fd {}, new fd {}\nB log:\n{}",
        describe(&same),
        describe(&new),
        bed.m2.log_text()
    );
    let (threads, settle) = quiet_threads(daemon_b);
    eprintln!("B's daemon at the end: {threads} threads, {settle} settle reads");
    assert_eq!(settle, 0, "activate left a settle read behind");
}
