//! Helper processes: holders that keep an image open like a VMM, and commands
//! run as an unprivileged user. Each is owned by a guard killed on drop.

use super::ChildGuard;
use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Keeps `path` open read-only on fd 3 of a `sleep` process (as a VMM holds
/// its image), and returns once the open has happened. The opener's pid is
/// the guard's pid (sh execs sleep).
pub fn hold_open(path: &Path) -> ChildGuard {
    hold_with(path, "<")
}

/// Like [`hold_open`], but the file is open read-write (a writable handle).
pub fn hold_open_rw(path: &Path) -> ChildGuard {
    hold_with(path, "<>")
}

fn hold_with(path: &Path, redirect: &str) -> ChildGuard {
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!("exec 3{redirect}\"$1\"; exec sleep 600"))
        .arg("sh")
        .arg(path)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn holder");
    let pid = child.id();
    let guard = ChildGuard(child);
    // `exec sleep` only runs after the redirection succeeded.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "sleep" {
            return guard;
        }
        if Instant::now() > deadline {
            panic!("holder of {} did not start (comm={comm:?})", path.display());
        }
        sleep(Duration::from_millis(10));
    }
}

/// Runs `argv` as user nobody (uid/gid 65534, no groups) in the C locale;
/// returns (success, stdout, stderr).
pub fn as_nobody<S: AsRef<OsStr>>(argv: &[S]) -> (bool, String, String) {
    let out = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .args(argv)
        .env("LC_ALL", "C")
        .output()
        .expect("run setpriv");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `n` idle processes (`sleep 600`), as the other processes of a busy
/// virtualization host; killed and reaped by pid on drop, also on panic.
pub struct IdleProcs(Vec<std::process::Child>);

impl IdleProcs {
    pub fn spawn(n: usize) -> IdleProcs {
        let mut procs = IdleProcs(Vec::with_capacity(n));
        for _ in 0..n {
            let child = Command::new("sleep")
                .arg("600")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn an idle process");
            procs.0.push(child);
        }
        procs
    }
}

impl Drop for IdleProcs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}
