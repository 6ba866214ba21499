//! `strace -e inject=...` on a running daemon: a slow or failing syscall
//! made on purpose, without touching the code under test; or `strace -o`
//! alone, to count the calls it makes.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// `strace` attached with `-e trace=SYSCALLS -e inject=SYSCALLS:SPEC`
/// (SYSCALLS a comma-separated list); detached on drop (SIGINT, which ends
/// the injected delays in flight, then SIGKILL after 10 s).
pub struct Strace(Child);

impl Strace {
    /// On every thread of process `pid`, present and future (`-f`).
    pub fn inject(pid: u32, syscalls: &str, spec: &str) -> Strace {
        Self::attach(pid, true, syscalls, Some(spec), Path::new("/dev/null"))
    }

    /// On the one thread `tid` alone.
    pub fn inject_thread(tid: u32, syscalls: &str, spec: &str) -> Strace {
        Self::attach(tid, false, syscalls, Some(spec), Path::new("/dev/null"))
    }

    /// Records SYSCALLS made by every thread of process `pid` in `out`,
    /// one line per call (full paths), injecting nothing; `out` is
    /// complete once the guard is dropped.
    pub fn trace(pid: u32, syscalls: &str, out: &Path) -> Strace {
        Self::attach(pid, true, syscalls, None, out)
    }

    fn attach(id: u32, follow: bool, syscalls: &str, spec: Option<&str>, out: &Path) -> Strace {
        let mut cmd = Command::new("strace");
        if follow {
            cmd.arg("-f");
        }
        cmd.args(["-qq", "-p", &id.to_string()])
            .arg("-o")
            .arg(out)
            .arg("-e")
            .arg(format!("trace={syscalls}"));
        if let Some(spec) = spec {
            cmd.arg("-e").arg(format!("inject={syscalls}:{spec}"));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn strace");
        let guard = Strace(child);
        let tracer = guard.0.id().to_string();
        let traced = |status: &Path| {
            fs::read_to_string(status)
                .unwrap_or_default()
                .lines()
                .any(|l| l.split_whitespace().eq(["TracerPid:", tracer.as_str()]))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let done = if follow {
                let tasks: Vec<_> = fs::read_dir(format!("/proc/{id}/task"))
                    .expect("the traced process is gone")
                    .filter_map(|e| e.ok())
                    .collect();
                !tasks.is_empty() && tasks.iter().all(|t| traced(&t.path().join("status")))
            } else {
                traced(Path::new(&format!("/proc/{id}/status")))
            };
            if done {
                return guard;
            }
            assert!(Instant::now() < deadline, "strace did not attach to {id}");
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

/// The thread of process `pid` named `comm` (`/proc/PID/task/TID/comm`).
pub fn thread_named(pid: u32, comm: &str) -> Option<u32> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .filter_map(|e| e.ok())
        .find(|t| fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == comm))
        .and_then(|t| t.file_name().to_str()?.parse().ok())
}
