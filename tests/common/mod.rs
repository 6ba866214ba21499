//! Shared helpers for integration tests that mount migsafe for real.
//!
//! Every resource a test creates (temp dirs, loop devices, mounts, daemons,
//! child processes) is owned by a guard whose `Drop` releases it, so a failing
//! assertion or a panic still unmounts, detaches and kills what it started.
#![allow(dead_code)]

mod direct;
mod errno;
mod kmount;
mod loopbed;
mod pages;
mod pin;
mod procs;
mod status;
mod strace;

// Re-exported so tests write `common::X` whatever file X lives in; each test
// binary uses a subset, so a glob may be unused in one of them.
#[allow(unused_imports)]
pub use {
    direct::*, errno::*, kmount::*, loopbed::*, pages::*, pin::*, procs::*, status::*, strace::*,
};

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_migsafe");

/// Sets its flag when dropped: stops a test's helper thread also when an
/// assertion of the main thread panics (a thread scope waits for it).
pub struct SetOnDrop<'a>(pub &'a std::sync::atomic::AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Tests mount filesystems and attach loop devices: they need root.
/// CI runs as root; elsewhere the test is reported and skipped loudly.
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        true
    } else {
        eprintln!("SKIPPED: this test needs root (it mounts FUSE and attaches loop devices)");
        false
    }
}

/// True if `prog` is on PATH; tests that need an external tool fail loudly
/// under CI (which installs it) and skip with a message elsewhere.
pub fn have_tool(prog: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {prog}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!("{prog} is not installed but CI must provide it (see .ci/run)");
        }
        eprintln!("SKIPPED: {prog} is not installed");
    }
    found
}

/// A unique scratch directory, removed on drop (after mounts inside it are gone,
/// because guards are declared after it and so dropped first).
pub fn scratch() -> Scratch {
    let dir = tempfile::Builder::new()
        .prefix("migsafe-test-")
        .tempdir_in(std::env::temp_dir())
        .expect("create temp dir");
    Scratch {
        _state: StateFilesGone::new(dir.path()),
        dir,
    }
}

/// A test's temp dir; dropping it also removes the state files that mounts
/// beneath it left in root's default place (a daemon started without
/// `--state-file` records fences in `/run/migsafe-state`).
pub struct Scratch {
    // Dropped first: the state files go before the directory.
    _state: StateFilesGone,
    dir: tempfile::TempDir,
}

impl std::ops::Deref for Scratch {
    type Target = tempfile::TempDir;
    fn deref(&self) -> &tempfile::TempDir {
        &self.dir
    }
}

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a shell snippet with `sh -c`, panicking with its output if it fails.
pub fn sh(script: &str) -> String {
    run(Command::new("sh").arg("-c").arg(script))
}

/// A loop device over a file, detached on drop.
pub struct LoopDev {
    pub path: PathBuf,
}

impl LoopDev {
    pub fn attach(file: &Path) -> LoopDev {
        let out = run(Command::new("losetup").args(["--find", "--show"]).arg(file));
        LoopDev {
            path: PathBuf::from(out.trim()),
        }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        // A device still opened by a dying daemon refuses detach for a moment.
        for _ in 0..50 {
            let ok = Command::new("losetup")
                .arg("-d")
                .arg(&self.path)
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok || !self.path.exists() {
                return;
            }
            sleep(Duration::from_millis(100));
        }
        eprintln!("warning: could not detach {}", self.path.display());
    }
}

/// A running `migsafe mount` in the foreground, unmounted and killed on drop.
pub struct Mount {
    pub mountpoint: PathBuf,
    pub backing: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    /// The spawned process is a keeper whose child serves (not
    /// `--no-restart`).
    keeper: bool,
    /// The FUSE connection's number (the mount's st_dev), for an abort when
    /// a failed test left the daemon unable to answer.
    conn: Option<u64>,
}

impl Mount {
    /// Mounts `backing` on a fresh mountpoint under `scratch` with extra CLI args
    /// (placed before the positional arguments), and waits until it is live.
    pub fn start(scratch: &Path, backing: &Path, args: &[&str]) -> Mount {
        Self::try_start(scratch, backing, args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like `start`, but returns the daemon's log as the error when it exits
    /// before the mount is live (for tests of start-up failures).
    pub fn try_start(scratch: &Path, backing: &Path, args: &[&str]) -> Result<Mount, String> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mountpoint = scratch.join(format!("mnt{n}"));
        fs::create_dir_all(&mountpoint).expect("mkdir mountpoint");
        let log = scratch.join(format!("mnt{n}.log"));
        let log_file = File::create(&log).expect("create log");
        // The state file goes to the scratch directory (removed with it)
        // unless the test names one: the default place is the host's
        // /run/migsafe-state, which tests must not fill.
        let mut args: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
        if !args
            .iter()
            .any(|a| a.to_string_lossy().contains("state-file"))
        {
            args.push("--state-file".into());
            args.push(scratch.join(format!("mnt{n}.state.json")).into());
        }
        let child = Command::new(BIN)
            .arg("mount")
            .args(&args)
            .arg(backing)
            .arg(&mountpoint)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("spawn migsafe");
        let keeper = !args.iter().any(|a| a == "--no-restart");
        let mut mount = Mount {
            mountpoint,
            backing: backing.to_path_buf(),
            log,
            child: Some(child),
            keeper,
            conn: None,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if is_mounted(&mount.mountpoint) {
                mount.conn = fs::metadata(&mount.mountpoint).ok().map(|m| m.dev());
                return Ok(mount);
            }
            if let Some(status) = mount.child.as_mut().unwrap().try_wait().unwrap() {
                mount.child = None;
                return Err(format!(
                    "migsafe exited ({status}) before mounting:\n{}",
                    mount.log_text()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!("mount not live after 15s:\n{}", mount.log_text()));
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// The process serving requests now: the keeper's child (a new one
    /// after each restart), or the spawned process with `--no-restart`.
    /// Waits up to 10 s for a keeper to have one.
    pub fn pid(&self) -> Option<u32> {
        let keeper = self.keeper_pid()?;
        if !self.keeper {
            return Some(keeper);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(p) = serving_child(keeper) {
                return Some(p);
            }
            if Instant::now() > deadline {
                return None;
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// The spawned `migsafe mount` process: the keeper (killing it ends the
    /// mount: its serving child dies with it).
    pub fn keeper_pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel)
    }

    /// Path of a control file (default control directory name).
    pub fn ctl(&self, file: &str) -> PathBuf {
        self.mountpoint.join(".ctl").join(file)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Unmounts and waits for the daemon to exit; returns its exit status code.
    pub fn stop(mut self) -> Option<i32> {
        self.teardown()
    }

    fn teardown(&mut self) -> Option<i32> {
        // A failing test may have left every request thread waiting (or a
        // request of the daemon's own waiting on its mount): umount and kill
        // would wait with it, in uninterruptible sleep. Abort the connection
        // first; its requests fail with ENOTCONN and everything can exit.
        if std::thread::panicking() {
            self.abort_connection();
        }
        if is_mounted(&self.mountpoint) {
            let _ = Command::new("umount")
                .arg(&self.mountpoint)
                .stderr(Stdio::null())
                .status();
            if is_mounted(&self.mountpoint) {
                // Busy (a test left a file open): detach lazily so nothing stays.
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(&self.mountpoint)
                    .status();
            }
        }
        let mut child = self.child.take()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().ok().flatten() {
                return status.code();
            }
            if Instant::now() > deadline {
                self.abort_connection();
                let _ = child.kill();
                return child.wait().ok().and_then(|s| s.code());
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// Aborts the mount's FUSE connection through fusectl (mounted here if
    /// it is not yet).
    fn abort_connection(&self) {
        let Some(conn) = self.conn else { return };
        let dir = Path::new("/sys/fs/fuse/connections");
        if fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none()) {
            let _ = Command::new("mount")
                .args(["-t", "fusectl", "fusectl"])
                .arg(dir)
                .stderr(Stdio::null())
                .status();
        }
        let _ = fs::write(dir.join(conn.to_string()).join("abort"), "1");
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// `umount PATH`, retried for up to 5 s: another test of the same binary
/// may fork while this one still holds an fd of the mount (the child has
/// it until its exec), which makes one umount fail with EBUSY.
pub fn umount_retrying(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = Command::new("umount")
            .arg(path)
            .output()
            .expect("run umount");
        if out.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "umount {} kept failing: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        sleep(Duration::from_millis(50));
    }
}

/// The `migsafe` child of `keeper` that serves its mount, if one runs.
pub fn serving_child(keeper: u32) -> Option<u32> {
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces and parentheses.
        let Some((head, tail)) = stat.rsplit_once(')') else {
            continue;
        };
        let ppid = tail
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        let state = tail.split_whitespace().next();
        if ppid == Some(keeper) && head.ends_with("(migsafe") && state != Some("Z") {
            return Some(pid);
        }
    }
    None
}

/// True if `path` is a mountpoint of a FUSE filesystem right now.
pub fn is_mounted(path: &Path) -> bool {
    mount_types(path).iter().any(|t| t.starts_with("fuse"))
}

/// The filesystem types of the mounts on `path` right now (empty if none).
fn mount_types(path: &Path) -> Vec<String> {
    let want = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, mp, ty) = (f.next(), f.next()?, f.next()?);
            (Path::new(&unescape_mount_path(mp)) == want).then(|| ty.to_string())
        })
        .collect()
}

fn unescape_mount_path(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Asserts that a script run under `dir` left no mount, loop device or file
/// there (scripts clean up with traps; this proves they did). `context` is
/// appended to each failure message (the script's output).
pub fn assert_nothing_left(dir: &Path, context: &str) {
    let prefix = dir.to_string_lossy().into_owned();
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let left: Vec<&str> = mounts.lines().filter(|l| l.contains(&prefix)).collect();
    assert!(left.is_empty(), "mounts left behind: {left:?}\n{context}");
    let loops = sh("losetup -a");
    assert!(
        !loops.contains(&prefix),
        "loop devices left behind:\n{loops}\n{context}"
    );
    let entries: Vec<_> = fs::read_dir(dir).unwrap().collect();
    assert!(
        entries.is_empty(),
        "temp files left behind: {entries:?}\n{context}"
    );
}

/// A child process (reader, holder) killed and reaped on drop.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Creates a file of `len` bytes filled with `byte`.
pub fn make_file(path: &Path, len: usize, byte: u8) {
    let mut f = File::create(path).unwrap();
    let chunk = vec![byte; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len());
        f.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
    f.sync_all().unwrap();
}

/// Reads `len` bytes at `offset` with plain buffered I/O.
pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

/// Opens `path` read-write (no create).
pub fn open_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open rw {}: {e}", path.display()))
}

/// Reads single pages at `pages` with readahead disabled (POSIX_FADV_RANDOM),
/// so exactly those pages become resident.
pub fn read_pages(path: &Path, pages: &[u64]) {
    use std::os::unix::fs::FileExt;
    const PAGE: u64 = 4096;
    let f = File::open(path).unwrap();
    // SAFETY: valid fd; advice only.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    assert_eq!(rc, 0);
    let mut buf = vec![0u8; PAGE as usize];
    for &p in pages {
        f.read_exact_at(&mut buf, p * PAGE).unwrap();
    }
}

/// The names in directory `dir`, sorted.
pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Writes `data` at `offset` and fsyncs.
pub fn write_at_sync(path: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

/// Writes `body` to a control file in one write(2); returns the errno on failure.
pub fn ctl_write(path: &Path, body: &str) -> Result<(), i32> {
    ctl_write_read(path, body).0
}

/// Writes `body` to a control file and reads the result back on the same open
/// file (the protocol's read-back), whatever the write returned.
pub fn ctl_write_read(path: &Path, body: &str) -> (Result<(), i32>, String) {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let res = match f.write(body.as_bytes()) {
        Ok(_) => Ok(()),
        Err(e) => Err(e.raw_os_error().unwrap_or(0)),
    };
    let mut out = String::new();
    let _ = f.read_to_string(&mut out);
    (res, out)
}

/// Reads a whole control (or any) file as text.
pub fn read_text(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Page-cache figures for a file or block device, from `migsafe residency --json`.
pub struct Residency {
    pub cached: u64,
    pub dirty: u64,
    pub writeback: u64,
    pub json: serde_json::Value,
}

/// `migsafe residency --evict`: drops the page cache of `path` (clean pages).
pub fn evict(path: &Path) {
    run(Command::new(BIN)
        .args(["residency", "--evict", "--json"])
        .arg(path));
}

pub fn residency(path: &Path) -> Residency {
    let out = run(Command::new(BIN).args(["residency", "--json"]).arg(path));
    let v: serde_json::Value = serde_json::from_str(&out).expect("residency json");
    let f = &v["files"][0];
    Residency {
        cached: f["cached_pages"].as_u64().expect("cached_pages"),
        dirty: f["dirty_pages"].as_u64().expect("dirty_pages"),
        writeback: f["writeback_pages"].as_u64().expect("writeback_pages"),
        json: v,
    }
}

/// `migsafe ctl MOUNTPOINT args...`: returns (exit code, stdout, stderr).
pub fn ctl_cli<S: AsRef<OsStr>>(mount: &Mount, args: &[S]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("ctl")
        .arg(&mount.mountpoint)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Removes, on drop, the state files that mounts under `dir` left in root's
/// default place (`/run/migsafe-state`): scripts that mount without
/// `--state-file` (the examples) record fences there, and a test leaves
/// nothing behind on the machine.
pub struct StateFilesGone(PathBuf);

impl StateFilesGone {
    pub fn new(dir: &Path) -> StateFilesGone {
        StateFilesGone(fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf()))
    }
}

impl Drop for StateFilesGone {
    fn drop(&mut self) {
        let prefix = format!("{}-", migsafe::mount::systemd_escape_path(&self.0));
        let Ok(entries) = fs::read_dir("/run/migsafe-state") else {
            return;
        };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// errno of a 4 KiB write at offset 0 through a writable open (the open's
/// own errno when it is refused, as `strict` does).
pub fn write_errno(path: &Path) -> Option<i32> {
    use std::os::unix::fs::FileExt;
    let f = match OpenOptions::new().write(true).open(path) {
        Ok(f) => f,
        Err(e) => return Some(e.raw_os_error().unwrap_or(0)),
    };
    f.write_at(&[b'W'; 4096], 0)
        .err()
        .map(|e| e.raw_os_error().unwrap_or(0))
}
