//! Writes of a cached regular file that cover a block only partly (an
//! unaligned tail at end of file, an unaligned piece inside it) against
//! another host's writes and truncates of the same file, and against a
//! crash of the daemon in the middle of such a write (docs/DESIGN.md §2,
//! "cached").
//!
//! "Hosts" are two migsafe mounts with `--io cached` of one backing
//! directory (a local one, and the NFS-like mergerfs bed of §1). The
//! windows these tests aim at are a few microseconds wide in a daemon left
//! alone, so the daemon of host A runs under `strace`, which holds every
//! backing read and write of it (pread64/pwrite64) for a while after the
//! syscall has done its work; host B acts while A's write is held there.
//! Every iteration checks that both hosts' acknowledged changes are on
//! storage, and counts that B really acted while A's write was in flight.

mod common;

use common::{KMount, Mount, residency, scratch};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i.wrapping_mul(2_654_435_761) >> 13) as u8) ^ seed ^ 0x5a)
        .map(|b| if b == 0 { 1 } else { b })
        .collect()
}

/// A small deterministic generator (xorshift64*).
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

/// `strace` attached to every thread of a daemon, holding each listed
/// syscall of it for `delay_us` after the syscall returned. Detached
/// (SIGINT, then SIGKILL) on drop.
struct Strace(Child);

impl Strace {
    fn delay(pid: u32, syscalls: &[&str], delay_us: u64) -> Strace {
        let mut cmd = Command::new("strace");
        cmd.args(["-f", "-qq", "-o", "/dev/null", "-p", &pid.to_string()])
            .arg("-e")
            .arg(format!("trace={}", syscalls.join(",")));
        for s in syscalls {
            cmd.arg("-e")
                .arg(format!("inject={s}:delay_exit={delay_us}"));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn strace");
        let guard = Strace(child);
        let tracer = guard.0.id();
        // Attached once every thread of the daemon names strace as tracer.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let tasks: Vec<_> = fs::read_dir(format!("/proc/{pid}/task"))
                .unwrap()
                .filter_map(|e| e.ok())
                .collect();
            let traced = tasks.iter().all(|t| {
                fs::read_to_string(t.path().join("status"))
                    .unwrap_or_default()
                    .lines()
                    .any(|l| l.split_whitespace().eq(["TracerPid:", &tracer.to_string()]))
            });
            if traced && !tasks.is_empty() {
                return guard;
            }
            assert!(Instant::now() < deadline, "strace did not attach to {pid}");
            sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Strace {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn open_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// A file on storage with `data`, synced, and none of it in this host's
/// page cache (so the first opens through the mounts start clean).
fn make_on_storage(path: &Path, data: &[u8]) {
    let f = File::create(path).unwrap();
    f.write_all_at(data, 0).unwrap();
    f.sync_all().unwrap();
    // SAFETY: a valid fd; advice only.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0);
}

/// Where the first difference between `got` and `want` is, in words.
fn difference(got: &[u8], want: &[u8]) -> Option<String> {
    if got == want {
        return None;
    }
    let first = got.iter().zip(want).position(|(a, b)| a != b);
    Some(match first {
        Some(i) => format!(
            "{} bytes (want {}); first difference at byte {i}: {:#04x}, want {:#04x}",
            got.len(),
            want.len(),
            got[i],
            want[i]
        ),
        None => format!("{} bytes, want {}", got.len(), want.len()),
    })
}

#[derive(Clone, Copy, Debug)]
enum HostB {
    /// B truncates the file to 8192 (past A's tail).
    Truncate,
    /// B writes 100 bytes at 2000 (past A's tail) and fsyncs.
    WritePastTail,
    /// The file is 3000 bytes; A writes inside it and B writes other bytes
    /// of the same block and fsyncs.
    SameBlock,
}

/// Host A writes while host B changes the same file, `rounds` times per
/// kind of change, each on a fresh file; after each, storage must hold
/// both changes. `storage` is where the test reads the truth; `backing_a`
/// and `backing_b` are what the two mounts serve.
fn race(dir: &Path, storage: &Path, backing_a: &Path, backing_b: &Path, rounds: u64) {
    let a = Mount::start(dir, backing_a, &["--io", "cached"]);
    let b = Mount::start(dir, backing_b, &["--io", "cached"]);
    let _strace = Strace::delay(a.pid().unwrap(), &["pread64", "pwrite64"], 150_000);
    let mut rng = Rng(0x7a11_5eed);
    let mut in_window = 0u64;
    let mut lost = Vec::new();
    let kinds = [HostB::Truncate, HostB::WritePastTail, HostB::SameBlock];
    for i in 0..rounds * kinds.len() as u64 {
        let kind = kinds[(i % kinds.len() as u64) as usize];
        let name = format!("r{i}.img");
        let (old, a_off, a_len) = match kind {
            HostB::SameBlock => (3000u64, rng.range(1025, 1100), rng.range(20, 150)),
            _ => {
                let mut old = rng.range(1025, 1500);
                if old.is_multiple_of(512) {
                    old += 1;
                }
                (old, old, rng.range(20, 300))
            }
        };
        let original = pattern(old as usize, i as u8);
        make_on_storage(&storage.join(&name), &original);
        let a_data = pattern(a_len as usize, 0x80 ^ i as u8);
        let b_data = pattern(100, 0x40 ^ i as u8);
        let fa = open_rw(&a.path(&name));
        let fb = open_rw(&b.path(&name));
        let a_done = AtomicBool::new(false);
        let a_started = AtomicBool::new(false);
        let b_inside = std::thread::scope(|s| {
            let writer = s.spawn(|| {
                a_started.store(true, Ordering::SeqCst);
                let r = fa.write_all_at(&a_data, a_off);
                a_done.store(true, Ordering::SeqCst);
                r
            });
            while !a_started.load(Ordering::SeqCst) {
                std::hint::spin_loop();
            }
            // Let A's request reach its daemon's (held) syscalls.
            sleep(Duration::from_millis(30));
            match kind {
                HostB::Truncate => fb.set_len(8192).unwrap(),
                HostB::WritePastTail => {
                    fb.write_all_at(&b_data, 2000).unwrap();
                    fb.sync_all().unwrap();
                }
                HostB::SameBlock => {
                    fb.write_all_at(&b_data, 1300).unwrap();
                    fb.sync_all().unwrap();
                }
            }
            let inside = !a_done.load(Ordering::SeqCst);
            writer.join().unwrap().expect("host A's write");
            inside
        });
        in_window += b_inside as u64;
        // Both changes acknowledged; in either order they give one result.
        let mut want = original.clone();
        let a_end = (a_off + a_len) as usize;
        if want.len() < a_end {
            want.resize(a_end, 0);
        }
        want[a_off as usize..a_end].copy_from_slice(&a_data);
        match kind {
            HostB::Truncate => want.resize(8192, 0),
            HostB::WritePastTail => {
                want.resize(2100, 0);
                want[2000..2100].copy_from_slice(&b_data);
            }
            HostB::SameBlock => want[1300..1400].copy_from_slice(&b_data),
        }
        // The backings' own caches hold nothing of the image once the
        // writes returned (the handover relies on it).
        for backing in [backing_a, backing_b] {
            if matches!(kind, HostB::Truncate) && backing == storage {
                // ext4 zeroes the rest of the block at the old end of file
                // through its page cache when B's truncate grows the file:
                // a page of storage's cache that no write of A put there.
                continue;
            }
            let r = residency(&backing.join(&name));
            assert_eq!(
                (r.cached, r.dirty),
                (0, 0),
                "{name} ({kind:?}): {} caches pages of a cached image",
                backing.display()
            );
        }
        let got = fs::read(storage.join(&name)).unwrap();
        if let Some(d) = difference(&got, &want) {
            lost.push(format!(
                "{name} ({kind:?}, A wrote {a_len} at {a_off} of {old}, B inside A's write: {b_inside}): {d}"
            ));
        }
        drop((fa, fb));
    }
    assert!(
        lost.is_empty(),
        "{} of {} rounds lost a change that was acknowledged:\n{}\nlog of host A:\n{}",
        lost.len(),
        rounds * kinds.len() as u64,
        lost.join("\n"),
        a.log_text()
    );
    // The race was real: B acted while A's write was in flight.
    assert!(
        in_window >= rounds,
        "host B acted inside host A's write in only {in_window} rounds"
    );
    let log = a.log_text();
    assert!(
        log.contains("data path=cached") && !log.contains("data path=relay"),
        "host A must serve the files by the cached path:\n{log}"
    );
}

/// Two mounts of one local directory.
#[test]
fn two_mounts_keep_each_others_writes_and_truncates() {
    if !common::require_root() || !common::have_tool("strace") {
        return;
    }
    let dir = scratch();
    let shared = dir.path().join("shared");
    fs::create_dir(&shared).unwrap();
    race(dir.path(), &shared, &shared, &shared, 12);
}

/// Two mounts over the NFS-like bed: each over its own mergerfs mount (its
/// own page cache) of one directory.
#[test]
fn mergerfs_hosts_keep_each_others_writes_and_truncates() {
    if !common::require_root() || !common::have_tool("strace") || !common::have_tool("mergerfs") {
        return;
    }
    let dir = scratch();
    let shared = dir.path().join("nfs");
    fs::create_dir(&shared).unwrap();
    let host_a = KMount::mergerfs(&shared, &dir.path().join("host-a"));
    let host_b = KMount::mergerfs(&shared, &dir.path().join("host-b"));
    race(dir.path(), &shared, &host_a.path, &host_b.path, 12);
}

/// A write through mount A of `len` bytes at `offset` into a file of `old`
/// bytes, and a SIGKILL of A's daemon while a backing write of it is held
/// (strace), the first one after which storage is at least `kill_at`
/// bytes long: after the crash, storage holds no byte the writer did not
/// write, so the file ends at most where the write does and nothing past
/// the old end but the write's own bytes (and the hole before them) is
/// there.
fn crash_inside_write(old: u64, offset: u64, len: u64, kill_at: u64) {
    let dir = scratch();
    let backing = dir.path().join("backing");
    fs::create_dir(&backing).unwrap();
    let a = Mount::start(dir.path(), &backing, &["--io", "cached"]);
    let name = "crash.img";
    let raw: PathBuf = backing.join(name);
    let original = pattern(old as usize, 3);
    make_on_storage(&raw, &original);
    let data = pattern(len as usize, 0x99);
    let f = open_rw(&a.path(name));
    let pid = a.pid().unwrap();
    let strace = Strace::delay(pid, &["pwrite64"], 2_000_000);
    let result = std::thread::scope(|s| {
        let writer = s.spawn(|| f.write_all_at(&data, offset));
        let deadline = Instant::now() + Duration::from_secs(30);
        while fs::metadata(&raw).unwrap().len() < kill_at {
            assert!(
                Instant::now() < deadline,
                "the daemon never wrote to the backing"
            );
            sleep(Duration::from_millis(5));
        }
        // The whole daemon: a keeper would restart the serving process,
        // which completes the resent write (tests/restart.rs).
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(a.keeper_pid().unwrap() as i32),
            nix::sys::signal::SIGKILL,
        )
        .unwrap();
        writer.join().unwrap()
    });
    drop(strace);
    // The crash happened inside the write: it was never acknowledged.
    assert!(
        result.is_err(),
        "the write completed before the daemon was killed"
    );
    drop(f);
    drop(a);
    let got = fs::read(&raw).unwrap();
    let end = offset + len;
    let size = got.len() as u64;
    assert!(
        size <= end,
        "after a crash inside a write of {len} bytes at {offset} (ends at {end}), the file is \
         {size} bytes: {} bytes past the write's end that nobody wrote",
        size - end
    );
    for (i, &byte) in got.iter().enumerate() {
        let i = i as u64;
        let want = if i < old.min(offset) {
            original[i as usize]
        } else if i >= offset && i < end {
            data[(i - offset) as usize]
        } else if i < old {
            original[i as usize]
        } else {
            0
        };
        assert_eq!(
            byte, want,
            "after the crash byte {i} of {size} is {byte:#04x}, want {want:#04x} \
             (old size {old}, write of {len} at {offset})"
        );
    }
}

/// An append inside the last block (1100 -> 1200 bytes).
#[test]
fn crash_inside_a_tail_append_leaves_no_padding() {
    if !common::require_root() || !common::have_tool("strace") {
        return;
    }
    crash_inside_write(1100, 1100, 100, 1101);
}

/// An append that spans whole pages (1100 -> 10100 bytes). The kernel
/// sends it as two writes, split after the first page (which it does not
/// hold up to date); the crash comes inside the second, [4096, 10100),
/// which ends the file (a whole page, then a partial one).
#[test]
fn crash_inside_a_long_unaligned_append_leaves_no_padding() {
    if !common::require_root() || !common::have_tool("strace") {
        return;
    }
    crash_inside_write(1100, 1100, 9000, 4097);
}

/// A write past end of file after a hole (1100 bytes, write at 3000).
#[test]
fn crash_inside_a_write_past_a_hole_leaves_no_padding() {
    if !common::require_root() || !common::have_tool("strace") {
        return;
    }
    crash_inside_write(1100, 3000, 100, 1101);
}
