//! A hung image must not hold up commands on other images
//! (docs/DESIGN.md §3, "Order" and "Load"). The bed: a backing directory
//! with `b.img` in it and a subdirectory `slow/` that is itself a mergerfs
//! mount (`cache.files=off`) holding `slow/a.img`; strace delays the syscalls
//! of that mergerfs process, so `slow/a.img` sits on a hung backing while
//! `b.img` stays healthy.
//!
//! - A flush of `slow/a.img` hangs in its fsync and 40 more commands on it
//!   wait for their turn: `activate b.img` (and more) must still return
//!   while every one of them is pending.
//! - A command resolving `slow/a.img` hangs in the lookup (mergerfs's
//!   `newfstatat`): a later `activate b.img` must still return while it is
//!   pending.
//!
//! Each test first runs the same commands without the delay (the control:
//! they all finish), and ends the delay at the end to see the held-up
//! commands finish too. No duration is asserted: only what returned while
//! what was still pending, with generous limits that fail the test if a
//! command never returns.

mod common;

use common::{ChildGuard, KMount, Mount, ctl_write_read, make_file, scratch};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

/// How late the slow backing answers: far longer than any limit below, so
/// the held-up commands stay pending until the test ends the delay.
const HUNG_US: u64 = 600_000_000;
/// How long a command that must not be held up may take before the test
/// fails (it returns in milliseconds when it is not held up).
const LIMIT: Duration = Duration::from_secs(60);
/// Commands sent on the hung image: more than the daemon's command
/// threads (16).
const HELD: usize = 40;

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

/// strace delaying the return of `syscalls` (comma-separated) in every
/// thread of `pid` by `delay_us`. On drop it is stopped with SIGTERM (it
/// detaches, and the delayed calls return), then killed by its pid if it
/// lingers, so a failing test never leaves the backing hung.
struct Strace(ChildGuard);

impl Strace {
    fn delay(pid: u32, syscalls: &str, delay_us: u64, log: &Path) -> Strace {
        let child = Command::new("strace")
            .args(["-f", "-qq", "-o", "/dev/null", "-e"])
            .arg(format!("trace={syscalls}"))
            .arg("-e")
            .arg(format!("inject={syscalls}:delay_exit={delay_us}"))
            .arg("-p")
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .stderr(File::create(log).unwrap())
            .spawn()
            .expect("spawn strace");
        let guard = Strace(ChildGuard(child));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let tasks: Vec<_> = fs::read_dir(format!("/proc/{pid}/task"))
                .unwrap()
                .flatten()
                .collect();
            let traced = tasks
                .iter()
                .filter(|t| {
                    fs::read_to_string(t.path().join("status"))
                        .unwrap_or_default()
                        .lines()
                        .any(|l| {
                            l.starts_with("TracerPid:") && l.split_whitespace().nth(1) != Some("0")
                        })
                })
                .count();
            if traced == tasks.len() {
                return guard;
            }
            assert!(
                Instant::now() < deadline,
                "strace did not attach to {pid}: {}",
                fs::read_to_string(log).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Strace {
    fn drop(&mut self) {
        let child = &mut (self.0).0;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        // ChildGuard kills and reaps it.
    }
}

/// Whether a thread of `pid` is in one of `syscalls` (or stopped at its
/// exit by strace).
fn in_syscall(pid: u32, syscalls: &[i64]) -> bool {
    let nrs: Vec<String> = syscalls.iter().map(|n| n.to_string()).collect();
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks.flatten().any(|t| {
                fs::read_to_string(t.path().join("syscall")).is_ok_and(|s| {
                    s.split_whitespace()
                        .next()
                        .is_some_and(|n| nrs.iter().any(|w| w == n))
                })
            })
        })
        .unwrap_or(false)
}

fn threads_of(pid: u32) -> usize {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The bed. Drop order: the migsafe mount (whose connection is aborted if
/// the test failed), then the mergerfs mount of `slow/`, then the dir.
/// Declare a test's [`Strace`] after the bed, so it goes first and the
/// backing answers again before anything is unmounted.
struct Bed {
    m: Mount,
    slow: KMount,
    dir: common::Scratch,
}

impl Bed {
    fn new() -> Bed {
        let dir = scratch();
        let back = dir.path().join("back");
        let src = dir.path().join("slow-src");
        fs::create_dir_all(back.join("slow")).unwrap();
        fs::create_dir_all(&src).unwrap();
        make_file(&src.join("a.img"), 1 << 20, b'a');
        make_file(&back.join("b.img"), 1 << 20, b'b');
        let slow = back.join("slow");
        common::run(
            Command::new("mergerfs")
                .args(["-o", "cache.files=off"])
                .arg(&src)
                .arg(&slow),
        );
        let slow = KMount { path: slow };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !common::is_mounted(&slow.path) {
            assert!(Instant::now() < deadline, "mergerfs on slow/ not live");
            thread::sleep(Duration::from_millis(20));
        }
        let m = Mount::start(dir.path(), &back, &[]);
        Bed { m, slow, dir }
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Requests of `command` the daemon has logged as received.
    fn arrivals(&self, command: &str) -> usize {
        self.m
            .log_text()
            .matches(&format!("{command} request #"))
            .count()
    }

    /// Sends `body` to `command` on a thread of its own (not scoped: a
    /// failing test must not wait for it); the result comes on the channel.
    fn send(&self, command: &str, body: &str) -> Receiver<(Result<(), i32>, String)> {
        let (tx, rx) = mpsc::channel();
        let path = self.m.ctl(command);
        let body = body.to_string();
        thread::spawn(move || {
            let _ = tx.send(ctl_write_read(&path, &body));
        });
        rx
    }

    /// `command` on `image`, which must return ok within [`LIMIT`].
    fn run_ok(&self, command: &str, image: &str, context: &str) {
        let rx = self.send(command, &format!("{image}\n"));
        match rx.recv_timeout(LIMIT) {
            Ok((res, out)) => {
                assert_eq!(res, Ok(()), "{command} {image} {context}: {out}");
                assert!(out.contains("result=ok"), "{command} {image}: {out}");
            }
            Err(_) => panic!(
                "{command} {image} did not return within {LIMIT:?} {context}; log:\n{}",
                self.m.log_text()
            ),
        }
    }

    /// Waits until the slow backing sits in one of `syscalls` and the
    /// daemon has logged `n` requests of `command` (they are all in the
    /// daemon, not held up in the kernel).
    fn wait_held(&self, command: &str, n: usize, syscalls: &[i64], what: &str) {
        let pid = mergerfs_pid(&self.slow.path);
        let deadline = Instant::now() + LIMIT;
        while !in_syscall(pid, syscalls) {
            assert!(
                Instant::now() < deadline,
                "bed: the slow backing never sat in {what}; log:\n{}",
                self.m.log_text()
            );
            thread::sleep(Duration::from_millis(10));
        }
        while self.arrivals(command) < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} {command} requests reached the daemon while one hangs in \
                 {what}: the others wait in the kernel for the control file; log:\n{}",
                self.arrivals(command),
                self.m.log_text()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Collects `n` results from `rx` (each within [`LIMIT`]); all must be ok.
fn all_ok(rx: &Receiver<(Result<(), i32>, String)>, n: usize, what: &str, m: &Mount) {
    for i in 0..n {
        match rx.recv_timeout(LIMIT) {
            Ok((res, out)) => assert_eq!(res, Ok(()), "{what} #{i}: {out}"),
            Err(e) => panic!(
                "{what}: {i} of {n} returned ({e:?}); log:\n{}",
                m.log_text()
            ),
        }
    }
}

/// `HELD` concurrent flushes of `slow/a.img`, the results on one channel.
fn flood(bed: &Bed, body: &str) -> Receiver<(Result<(), i32>, String)> {
    let (tx, rx) = mpsc::channel();
    for _ in 0..HELD {
        let path = bed.m.ctl("flush");
        let body = body.to_string();
        let tx = tx.clone();
        thread::spawn(move || {
            let _ = tx.send(ctl_write_read(&path, &body));
        });
    }
    rx
}

/// One flush of `slow/a.img` hangs in the slow backing's fsync and 40 more
/// wait for their turn behind it (more than the daemon's 16 command
/// threads), all written to `.ctl/flush` through opens of their own:
/// `activate`, `check`, `flush`, `inactivate` and `activate` of `b.img`
/// each return while every flush of `slow/a.img` is still pending, and the
/// daemon does not grow a thread per waiting command. Control: without the
/// delay the same flushes all finish. Before the fix the kernel ran one
/// write per control file at a time (only one flush reached the daemon,
/// and `flush b.img` would have waited behind it), and once writes ran in
/// parallel every command thread waited for `slow/a.img`'s turn and
/// `activate b.img` waited behind them.
#[test]
fn commands_waiting_for_a_hung_image_do_not_hold_up_other_images() {
    if !common::require_root() || !common::have_tool("mergerfs") || !common::have_tool("strace") {
        return;
    }
    let bed = Bed::new();
    bed.run_ok("activate", "slow/a.img", "(setup)");
    bed.run_ok("activate", "b.img", "(setup)");
    let pid = bed.m.pid().expect("daemon pid");

    // Control: the backing answers at once; the flushes all finish.
    let before = bed.arrivals("flush");
    let rx = flood(&bed, "slow/a.img\n");
    all_ok(&rx, HELD, "flush slow/a.img, no delay", &bed.m);
    assert_eq!(bed.arrivals("flush"), before + HELD);
    // Give the command threads time to go idle before counting.
    thread::sleep(Duration::from_millis(500));
    let idle_threads = threads_of(pid);

    let fsyncs = [libc::SYS_fsync, libc::SYS_fdatasync];
    let strace = Strace::delay(
        mergerfs_pid(&bed.slow.path),
        "fsync,fdatasync",
        HUNG_US,
        &bed.log("strace-fsync.log"),
    );
    let before = bed.arrivals("flush");
    let held = flood(&bed, "slow/a.img\n");
    bed.wait_held("flush", before + HELD, &fsyncs, "fsync");
    let most_threads = threads_of(pid);
    for (command, context) in [
        ("activate", "while slow/a.img hangs"),
        ("check", "while slow/a.img hangs"),
        ("flush", "while flushes of slow/a.img hang"),
        ("inactivate", "while slow/a.img hangs"),
        ("activate", "while slow/a.img hangs, again"),
    ] {
        bed.run_ok(command, "b.img", context);
        match held.try_recv() {
            Err(mpsc::TryRecvError::Empty) => {}
            other => panic!(
                "bed: a flush of slow/a.img returned while its backing hangs ({other:?}); \
                 the commands on b.img did not run alongside it"
            ),
        }
    }
    let most_threads = most_threads.max(threads_of(pid));
    println!(
        "daemon threads: {idle_threads} idle, {most_threads} with {HELD} flushes of a hung \
         image pending"
    );
    assert!(
        most_threads <= idle_threads + 16,
        "the daemon grew from {idle_threads} to {most_threads} threads for {HELD} waiting commands"
    );
    assert!(
        in_syscall(mergerfs_pid(&bed.slow.path), &fsyncs),
        "bed: the slow backing's fsync ended during the test"
    );

    // The backing answers again: every held-up flush finishes.
    drop(strace);
    all_ok(&held, HELD, "flush slow/a.img after the delay", &bed.m);
}

/// A command resolving `slow/a.img` hangs in the slow backing's lookup:
/// a later `activate b.img` (and `check`, `flush` of it) returns while it
/// is pending, and the held-up request, resolved once the backing answers,
/// still runs (also on `b.img`, which it names too: behind the commands
/// that passed it). Control: without the delay the same request returns.
/// Before the fix every later request waited for the hung one to queue.
#[test]
fn a_request_hung_resolving_its_paths_does_not_hold_up_later_requests() {
    if !common::require_root() || !common::have_tool("mergerfs") || !common::have_tool("strace") {
        return;
    }
    let bed = Bed::new();
    bed.run_ok("activate", "b.img", "(setup)");
    let body = "slow/a.img\nb.img\n";

    // Control: the backing answers at once; the request returns.
    let rx = bed.send("flush", body);
    all_ok(&rx, 1, "flush slow/a.img b.img, no delay", &bed.m);
    // The lookup of slow/a.img is asked of mergerfs again once the kernel's
    // entry for it (1 s in mergerfs) has expired.
    thread::sleep(Duration::from_secs(2));

    let lookups = [libc::SYS_newfstatat, libc::SYS_statx];
    let strace = Strace::delay(
        mergerfs_pid(&bed.slow.path),
        "newfstatat,statx",
        HUNG_US,
        &bed.log("strace-lookup.log"),
    );
    let before = bed.arrivals("flush");
    let held = bed.send("flush", body);
    bed.wait_held("flush", before + 1, &lookups, "newfstatat/statx");
    for command in ["activate", "check", "flush"] {
        bed.run_ok(
            command,
            "b.img",
            "while a request resolving slow/a.img hangs",
        );
        assert!(
            matches!(held.try_recv(), Err(mpsc::TryRecvError::Empty)),
            "bed: the request naming slow/a.img returned while its lookup hangs"
        );
    }
    assert!(
        in_syscall(mergerfs_pid(&bed.slow.path), &lookups),
        "bed: the slow backing's lookup ended during the test"
    );
    let log = bed.m.log_text();
    assert!(
        log.contains("activate request #") && log.contains("passes request #"),
        "the pass is logged: {log}"
    );

    drop(strace);
    match held.recv_timeout(LIMIT) {
        Ok((res, out)) => {
            assert_eq!(res, Ok(()), "flush after the delay: {out}");
            assert_eq!(out.matches("result=ok").count(), 2, "{out}");
        }
        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => panic!(
            "the held-up request did not return after the delay; log:\n{}",
            bed.m.log_text()
        ),
    }
}

/// Requests naming several images in opposite orders, and `*`, from 6
/// writers at once while every fsync of the slow backing takes 50 ms: the
/// requests overlap on every image, so most of them park waiting for a
/// turn and are resumed on another command thread. Every request must
/// return with one ok line per image it names (a deadlock between two
/// requests, or a parked command never resumed, fails the limit).
#[test]
fn overlapping_requests_in_opposite_orders_and_star_all_finish() {
    if !common::require_root() || !common::have_tool("mergerfs") || !common::have_tool("strace") {
        return;
    }
    const WRITERS: usize = 6;
    const ROUNDS: usize = 8;
    let bed = Bed::new();
    make_file(&bed.dir.path().join("slow-src/c.img"), 1 << 20, b'c');
    let forward = "slow/a.img\nb.img\nslow/c.img\n";
    let backward = "slow/c.img\nb.img\nslow/a.img\n";
    let (res, out) = ctl_write_read(&bed.m.ctl("activate"), forward);
    assert_eq!(res, Ok(()), "{out}");
    let _strace = Strace::delay(
        mergerfs_pid(&bed.slow.path),
        "fsync,fdatasync",
        50_000,
        &bed.log("strace-race.log"),
    );
    let (tx, rx) = mpsc::channel();
    for w in 0..WRITERS {
        let m_ctl = |f: &str| bed.m.ctl(f);
        let (flush, check) = (m_ctl("flush"), m_ctl("check"));
        let tx = tx.clone();
        thread::spawn(move || {
            for r in 0..ROUNDS {
                let (file, body) = match (w + r) % 3 {
                    0 => (&flush, forward),
                    1 => (&flush, backward),
                    _ => (if r % 2 == 0 { &flush } else { &check }, "*\n"),
                };
                let (res, out) = ctl_write_read(file, body);
                if tx.send((w, r, body, res, out)).is_err() {
                    return;
                }
            }
        });
    }
    for i in 0..WRITERS * ROUNDS {
        match rx.recv_timeout(LIMIT) {
            Ok((w, r, body, res, out)) => {
                assert_eq!(res, Ok(()), "writer {w} round {r} {body:?}: {out}");
                assert_eq!(
                    out.matches("result=ok").count(),
                    3,
                    "writer {w} round {r} {body:?}: {out}"
                );
            }
            Err(e) => panic!(
                "{i} of {} requests returned ({e:?}): a deadlock or a command never \
                 resumed; log:\n{}",
                WRITERS * ROUNDS,
                bed.m.log_text()
            ),
        }
    }
}
