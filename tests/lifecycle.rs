//! The daemon's life cycle as an operator drives it: foreground mounts end
//! cleanly on SIGTERM/SIGINT, `--daemon` returns only once the mount is live
//! (and leaves the caller's stdio), and the fuse3 mount-helper form works.

mod common;

use common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// A mount made by a daemonized migsafe: unmounted, and its process killed by
/// pid, on drop.
struct DaemonMount {
    mountpoint: PathBuf,
    pid_file: PathBuf,
}

impl DaemonMount {
    fn pid(&self) -> Option<i32> {
        fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }
}

impl Drop for DaemonMount {
    fn drop(&mut self) {
        if is_mounted(&self.mountpoint) {
            let _ = Command::new("umount").arg(&self.mountpoint).status();
            if is_mounted(&self.mountpoint) {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(&self.mountpoint)
                    .status();
            }
        }
        if let Some(pid) = self.pid()
            && !wait_gone(pid)
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Waits up to 10 s for `pid` to exit; true once it has.
fn wait_gone(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while process_alive(pid) && Instant::now() < deadline {
        sleep(Duration::from_millis(20));
    }
    !process_alive(pid)
}

fn process_alive(pid: i32) -> bool {
    // A zombie still has /proc/PID; its state letter is Z.
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.split(") ").nth(1).unwrap_or("").starts_with('Z'))
        .unwrap_or(false)
}

fn dirs(scratch: &Path) -> (PathBuf, PathBuf) {
    let backing = scratch.join("backing");
    let mnt = scratch.join("mnt");
    fs::create_dir_all(&backing).unwrap();
    fs::create_dir_all(&mnt).unwrap();
    fs::write(backing.join("disk.img"), b"image bytes").unwrap();
    (backing, mnt)
}

fn signal_unmounts(signal: nix::sys::signal::Signal) {
    let dir = scratch();
    let (backing, _) = dirs(dir.path());
    let m = Mount::start(dir.path(), &backing, &[]);
    assert_eq!(fs::read(m.path("disk.img")).unwrap(), b"image bytes");
    let pid = m.pid().expect("foreground daemon pid") as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).unwrap();
    // The daemon exits only after its unmount completed.
    assert!(wait_gone(pid), "daemon still running after {signal:?}");
    assert!(!is_mounted(&m.mountpoint), "still mounted after {signal:?}");
    let log = m.log_text();
    assert!(log.contains("unmounting"), "no unmount line in log:\n{log}");
    assert_eq!(m.stop(), Some(0), "exit status after {signal:?}");
}

#[test]
fn sigterm_unmounts_and_exits_zero() {
    if !require_root() {
        return;
    }
    signal_unmounts(nix::sys::signal::Signal::SIGTERM);
}

#[test]
fn sigint_unmounts_and_exits_zero() {
    if !require_root() {
        return;
    }
    signal_unmounts(nix::sys::signal::Signal::SIGINT);
}

/// `--daemon` must return only when the mount serves requests, and must not
/// keep the caller's stdout: `$(migsafe mount --daemon ...)` and ssh would
/// otherwise hang until unmount.
#[test]
fn daemon_returns_once_live_and_leaves_callers_stdio() {
    if !require_root() {
        return;
    }
    let dir = scratch();
    let (backing, mnt) = dirs(dir.path());
    let guard = DaemonMount {
        mountpoint: mnt.clone(),
        pid_file: dir.path().join("pid"),
    };
    let log = dir.path().join("daemon.log");
    let mut child = Command::new(BIN)
        .args(["mount", "--daemon", "--io", "relay", "--pid-file"])
        .arg(&guard.pid_file)
        .arg("--log-file")
        .arg(&log)
        .arg(&backing)
        .arg(&mnt)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "--daemon failed: {status:?}");
    // EOF on the caller's pipes must come now, not at unmount: read them on
    // a thread and give up after 10 s instead of hanging the suite.
    let (mut stdout, mut stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut sink = Vec::new();
        let _ = stdout.read_to_end(&mut sink);
        let _ = stderr.read_to_end(&mut sink);
        let _ = tx.send(());
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(10)).is_ok(),
        "the daemon kept the caller's stdout/stderr open after --daemon returned"
    );
    assert!(
        is_mounted(&mnt),
        "--daemon returned before the mount was live"
    );
    assert_eq!(fs::read(mnt.join("disk.img")).unwrap(), b"image bytes");
    let pid = guard.pid().expect("pid file written");
    assert!(process_alive(pid));
    assert_ne!(pid as u32, std::process::id());
    umount_retrying(&mnt);
    assert!(wait_gone(pid), "daemon did not exit after umount");
    let text = fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("unmounted"),
        "--log-file lacks the unmount line:\n{text}"
    );
}

/// A start-up error in `--daemon` mode reaches the caller as exit status 1
/// with the message, not as a silent background failure.
#[test]
fn daemon_start_error_is_reported_to_the_caller() {
    if !require_root() {
        return;
    }
    let dir = scratch();
    let (backing, _) = dirs(dir.path());
    let missing = dir.path().join("no-such-mountpoint");
    let out = Command::new(BIN)
        .args(["mount", "--daemon"])
        .arg(&backing)
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no-such-mountpoint"),
        "message does not name the path: {stderr}"
    );
}

/// `mount -t fuse.migsafe SRC DIR -o ...` runs `migsafe SRC DIR -o ...`:
/// that form daemonizes and takes migsafe's own options from `-o`.
#[test]
fn mount_helper_form_daemonizes_with_o_options() {
    if !require_root() {
        return;
    }
    let dir = scratch();
    let (backing, mnt) = dirs(dir.path());
    let guard = DaemonMount {
        mountpoint: mnt.clone(),
        pid_file: dir.path().join("pid"),
    };
    let opts = format!(
        "rw,nosuid,nodev,io=relay,ctl-name=.mctl,no_such_option=x,log={},pid-file={}",
        dir.path().join("log").display(),
        guard.pid_file.display()
    );
    // An unknown option is refused, naming it.
    let bad = Command::new(BIN)
        .arg(&backing)
        .arg(&mnt)
        .args(["-o", &opts])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no_such_option"));
    assert!(!is_mounted(&mnt));

    let opts = opts.replace(",no_such_option=x", "");
    let out = Command::new(BIN)
        .arg(&backing)
        .arg(&mnt)
        .args(["-o", &opts])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(is_mounted(&mnt));
    let status = read_text(&mnt.join(".mctl/status"));
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["data_paths"]["io"], "relay");
    assert_eq!(v["ctl_name"], ".mctl");
    assert!(
        guard.pid().is_some_and(process_alive),
        "pid-file= names the daemon"
    );
    drop(guard);
    assert!(!is_mounted(&mnt));
}

/// The types of the mounts on `path` in this mount namespace, bottom first.
fn types_at(path: &Path) -> Vec<String> {
    let want = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && Path::new(f[1]) == want).then(|| f[2].to_string())
        })
        .collect()
}

/// Operators' tools (findmnt -t, libvirt) recognise a mount by its type:
/// a foreground mount must be `fuse.migsafe`, not plain `fuse`.
#[test]
fn foreground_mount_has_type_fuse_migsafe() {
    if !require_root() {
        return;
    }
    let dir = scratch();
    let (backing, _) = dirs(dir.path());
    let m = Mount::start(dir.path(), &backing, &["--io", "relay"]);
    assert_eq!(types_at(&m.mountpoint), ["fuse.migsafe"]);
    let found = run(Command::new("findmnt")
        .args(["-n", "-t", "fuse.migsafe", "-o", "TARGET"])
        .arg(&m.mountpoint));
    assert_eq!(found.trim(), m.mountpoint.to_str().unwrap());
    assert_eq!(fs::read(m.path("disk.img")).unwrap(), b"image bytes");
    assert_eq!(m.stop(), Some(0));
}

#[test]
fn daemon_mount_has_type_fuse_migsafe() {
    if !require_root() {
        return;
    }
    let dir = scratch();
    let (backing, mnt) = dirs(dir.path());
    let guard = DaemonMount {
        mountpoint: mnt.clone(),
        pid_file: dir.path().join("pid"),
    };
    run(Command::new(BIN)
        .args(["mount", "--daemon", "--io", "relay", "--pid-file"])
        .arg(&guard.pid_file)
        .arg(&backing)
        .arg(&mnt)
        .stdin(Stdio::null()));
    assert_eq!(types_at(&mnt), ["fuse.migsafe"]);
    assert_eq!(fs::read(mnt.join("disk.img")).unwrap(), b"image bytes");
    let pid = guard.pid().expect("pid file");
    umount_retrying(&mnt);
    assert!(wait_gone(pid), "daemon did not exit after umount");
}

/// Runs `script` with `sh -e` in a private mount namespace where the
/// directory `bin_dir` is laid over /usr/sbin (an overlay, invisible to the
/// rest of the host): there mount(8) and mount.fuse3, which run helpers
/// with a fixed PATH, find the `migsafe` under test. Returns stdout+stderr.
fn in_namespace_with_sbin(bin_dir: &Path, script: &str) -> (bool, String) {
    let full = format!(
        "mount -t overlay overlay -o lowerdir={}:/usr/sbin /usr/sbin\n{script}",
        bin_dir.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-ec", &full])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `mount -t fuse.migsafe SRC DIR -o ...` goes through mount(8) and fuse3's
/// mount.fuse3 to `migsafe SRC DIR -o ...`: the result is `fuse.migsafe`.
#[test]
fn mount_helper_via_mount8_has_type_fuse_migsafe() {
    if !require_root() || !have_tool("unshare") {
        return;
    }
    let dir = scratch();
    let (backing, mnt) = dirs(dir.path());
    let bin_dir = dir.path().join("sbin");
    fs::create_dir(&bin_dir).unwrap();
    fs::copy(BIN, bin_dir.join("migsafe")).unwrap();
    // The daemon lives in the namespace; killing it by pid on failure takes
    // the namespace and its mount with it.
    let guard = DaemonMount {
        mountpoint: mnt.clone(),
        pid_file: dir.path().join("pid"),
    };
    let (ok, text) = in_namespace_with_sbin(
        &bin_dir,
        &format!(
            "mount -t fuse.migsafe -o io=relay,pid-file={pid} {b} {m}\n\
             findmnt -n -o FSTYPE,SOURCE {m}\n\
             cat {m}/disk.img; echo\n\
             umount {m}\n",
            pid = guard.pid_file.display(),
            b = backing.display(),
            m = mnt.display()
        ),
    );
    assert!(ok, "mount(8) helper form failed:\n{text}");
    let mut lines = text.lines();
    let fstype = lines.next().unwrap_or("");
    assert!(
        fstype.starts_with("fuse.migsafe "),
        "type via mount(8) is not fuse.migsafe:\n{text}"
    );
    assert_eq!(lines.next(), Some("image bytes"), "{text}");
    let pid = guard.pid().expect("pid file");
    assert!(wait_gone(pid), "daemon did not exit after umount");
}

/// `scripts/install.sh` puts the binary where mount(8)'s helper finds it
/// (mount.fuse3 runs `sh -c migsafe ...` with no PATH of its own) and the unit
/// beside it, naming that binary. Staged under DESTDIR, then laid over
/// /usr/sbin in a private namespace, `mount -t fuse.migsafe` works; with an
/// empty /usr/sbin overlay (the control) mount fails with `not found`.
#[test]
fn install_script_puts_migsafe_where_mount8_finds_it() {
    if !require_root() || !have_tool("unshare") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch();
    let (backing, mnt) = dirs(dir.path());
    let dest = dir.path().join("root");
    let out = run(Command::new(script_path()).arg(BIN).env("DESTDIR", &dest));
    let installed = dest.join("usr/sbin/migsafe");
    assert!(out.contains("usr/sbin/migsafe"), "{out}");
    assert_eq!(fs::read(&installed).unwrap(), fs::read(BIN).unwrap());
    assert_eq!(
        fs::metadata(&installed).unwrap().permissions().mode() & 0o7777,
        0o755
    );
    let unit = read_text(&dest.join("etc/systemd/system/migsafe@.service"));
    assert!(
        unit.lines()
            .any(|l| l.starts_with("ExecStart=/usr/sbin/migsafe mount ")),
        "unit does not run the installed binary:\n{unit}"
    );
    assert!(dest.join("etc/migsafe").is_dir());

    let guard = DaemonMount {
        mountpoint: mnt.clone(),
        pid_file: dir.path().join("pid"),
    };
    let script = format!(
        "mount -t fuse.migsafe -o io=relay,pid-file={pid} {b} {m}\n\
         findmnt -n -o FSTYPE {m}\n\
         umount {m}\n",
        pid = guard.pid_file.display(),
        b = backing.display(),
        m = mnt.display()
    );
    // Control: nothing installed, so the helper cannot find migsafe.
    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let (ok, text) = in_namespace_with_sbin(&empty, &script);
    assert!(
        !ok && text.contains("migsafe: not found"),
        "mount(8) found a migsafe that was not installed:\n{text}"
    );
    let (ok, text) = in_namespace_with_sbin(&dest.join("usr/sbin"), &script);
    assert!(ok, "mount(8) with the installed binary failed:\n{text}");
    assert_eq!(text.lines().next(), Some("fuse.migsafe"), "{text}");
    let pid = guard.pid().expect("pid file");
    assert!(wait_gone(pid), "daemon did not exit after umount");

    // A directory outside the helper's PATH is installed with a warning.
    let out = Command::new(script_path())
        .arg(BIN)
        .env("DESTDIR", dir.path().join("root2"))
        .env("SBINDIR", "/opt/migsafe/bin")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not on mount(8)'s helper PATH"),
        "{out:?}"
    );
}

fn script_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install.sh")
}

/// A `--pid-file` that cannot be written fails the start with a message
/// naming it (a unit or script would not find the daemon otherwise), in
/// the foreground and with `--daemon`, and leaves nothing mounted.
#[test]
fn unwritable_pid_file_fails_the_start() {
    if !require_root() {
        return;
    }
    let dir = scratch();
    let (backing, mnt) = dirs(dir.path());
    let pid_file = dir.path().join("no-such-dir").join("migsafe.pid");
    for daemon in [false, true] {
        let mut cmd = Command::new(BIN);
        cmd.arg("mount");
        if daemon {
            cmd.arg("--daemon");
        }
        let mut child = cmd
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(&backing)
            .arg(&mnt)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // A start that ignores the error would serve (foreground) instead
        // of exiting: give up after 10 s rather than hang the suite.
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break Some(st);
            }
            if Instant::now() > deadline {
                let _ = Command::new("umount").arg("-l").arg(&mnt).status();
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        use std::io::Read;
        let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(1),
            "daemon={daemon}: the start did not fail: {stderr}"
        );
        assert!(
            stderr.contains("--pid-file") && stderr.contains("no-such-dir"),
            "daemon={daemon}: message does not name the pid file: {stderr}"
        );
        assert!(!is_mounted(&mnt), "daemon={daemon}: left a mount behind");
    }
}

/// A daemon started with SIGINT ignored (a background job of a shell without
/// job control, as a CI runner or a script may start it) still unmounts on
/// SIGINT: an ignored signal would be discarded, never waited for.
#[test]
fn sigint_unmounts_even_when_started_with_sigint_ignored() {
    if !require_root() {
        return;
    }
    let dir = scratch();
    let (backing, mnt) = dirs(dir.path());
    let guard = DaemonMount {
        mountpoint: mnt.clone(),
        pid_file: dir.path().join("pid"),
    };
    let status = Command::new("sh")
        .arg("-c")
        .arg("trap '' INT; exec \"$0\" mount --daemon --pid-file \"$1\" \"$2\" \"$3\"")
        .arg(BIN)
        .arg(&guard.pid_file)
        .arg(&backing)
        .arg(&mnt)
        .stdin(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "--daemon failed: {status:?}");
    let pid = guard.pid().expect("pid file written");
    let ignored = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap();
    assert_eq!(
        ignored & (1 << (libc::SIGINT - 1)),
        0,
        "SIGINT still ignored"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    assert!(wait_gone(pid), "daemon ignored SIGINT");
    assert!(!is_mounted(&mnt), "still mounted after SIGINT");
}
