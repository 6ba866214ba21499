//! What an operator's tools see of the daemon: the systemd unit (checked by
//! systemd-analyze and run as systemd would run it), sd_notify readiness,
//! the log in every start form, and the start-up refusals.

mod common;

use common::*;
use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// A migsafe process this test started, with the mountpoint it may have
/// mounted: unmounted (lazily if busy), killed and reaped on drop.
struct Daemon {
    child: Option<Child>,
    mountpoint: PathBuf,
}

impl Daemon {
    fn spawn(cmd: &mut Command, mountpoint: &Path) -> Daemon {
        Daemon {
            child: Some(cmd.spawn().expect("spawn migsafe")),
            mountpoint: mountpoint.to_path_buf(),
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// Waits up to 10 s for the process to exit; its exit code.
    fn wait_exit(&mut self) -> Option<i32> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status.code();
            }
            sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A mount stacked by a defect needs one umount per layer.
        for _ in 0..3 {
            if !is_mounted(&self.mountpoint) {
                break;
            }
            let _ = Command::new("umount").arg(&self.mountpoint).status();
            if is_mounted(&self.mountpoint) {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(&self.mountpoint)
                    .status();
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
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

fn backing_dir(scratch: &Path) -> PathBuf {
    let backing = scratch.join("backing");
    fs::create_dir_all(&backing).unwrap();
    fs::write(backing.join("disk.img"), b"image bytes").unwrap();
    backing
}

/// One datagram from `sock` within 15 s (EINTR retried), as text.
fn recv_text(sock: &UnixDatagram) -> Result<String, std::io::Error> {
    sock.set_read_timeout(Some(Duration::from_secs(15)))?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut buf = [0u8; 4096];
    loop {
        match sock.recv(&mut buf) {
            Ok(n) => return Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted && Instant::now() < deadline => {}
            Err(e) => return Err(e),
        }
    }
}

fn unit_text() -> String {
    read_text(&Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/migsafe@.service"))
}

/// Runs `systemd-analyze verify` on the unit with its binary path replaced
/// by `binary`; (success, output).
fn verify_unit(dir: &Path, binary: &str) -> (bool, String) {
    let unit = dir.join("migsafe@.service");
    fs::write(&unit, unit_text().replace("/usr/sbin/migsafe", binary)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn unit_file_passes_systemd_analyze_verify() {
    if !have_tool("systemd-analyze") {
        return;
    }
    let dir = scratch();
    let (ok, text) = verify_unit(dir.path(), BIN);
    assert!(ok, "systemd-analyze verify failed:\n{text}");
    assert!(
        !text.contains("migsafe@"),
        "systemd-analyze complains about the unit:\n{text}"
    );
    // Control: a binary that does not exist is caught.
    let missing = dir.path().join("no-such-migsafe");
    let (ok, text) = verify_unit(dir.path(), missing.to_str().unwrap());
    assert!(
        !ok && text.contains("no-such-migsafe"),
        "verify accepted a missing binary:\n{text}"
    );
}

/// systemd's expansion of one command line of the unit: `%f`/`%i`
/// specifiers, `$VAR` split into words, `${VAR}` as one word, a leading `-`
/// meaning "failure is ignored".
fn expand(line: &str, f: &Path, instance: &str, env: &[(String, String)]) -> (bool, Vec<String>) {
    let (ignore, line) = match line.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, line),
    };
    let lookup = |name: &str| {
        env.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let mut words = Vec::new();
    for word in line.split_whitespace() {
        let word = word
            .replace("%f", f.to_str().unwrap())
            .replace("%i", instance);
        if let Some(name) = word.strip_prefix("${").and_then(|w| w.strip_suffix('}')) {
            words.push(lookup(name));
        } else if let Some(name) = word.strip_prefix('$') {
            words.extend(lookup(name).split_whitespace().map(String::from));
        } else {
            words.push(word);
        }
    }
    (ignore, words)
}

/// The unit started the way systemd starts it, on a mountpoint that does not
/// exist yet (a /run path after boot): ExecStartPre lines in order, then
/// ExecStart with NOTIFY_SOCKET set. READY=1 must come, and only once the
/// mountpoint is a live fuse.migsafe mount; ExecStop then ends the daemon
/// with status 0.
#[test]
fn unit_starts_like_systemd_creates_mountpoint_and_notifies_ready() {
    if !require_root() {
        return;
    }
    let dir = scratch();
    let backing = backing_dir(dir.path());
    let mnt = dir.path().join("run/migsafe");
    let unit = unit_text();
    assert!(
        !unit.contains("ConditionPathIsDirectory"),
        "a ConditionPathIsDirectory skips /run mountpoints after boot"
    );
    assert!(unit.lines().any(|l| l == "Type=notify"), "{unit}");
    let conf = [
        ("MIGSAFE_BACKING".to_string(), backing.display().to_string()),
        (
            "MIGSAFE_OPTS".to_string(),
            "--io relay --ctl-name .ctl".to_string(),
        ),
    ];
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let mut service = false;
    let mut daemon = None;
    let mut stop = None;
    for line in unit.lines() {
        if line.starts_with('[') {
            service = line == "[Service]";
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if !service {
            continue;
        }
        let (ignore, argv) = expand(value, &mnt, "run-migsafe", &conf);
        match key {
            "ExecStartPre" => {
                let ok = Command::new(&argv[0])
                    .args(&argv[1..])
                    .stderr(Stdio::null())
                    .status()
                    .unwrap()
                    .success();
                assert!(ok || ignore, "ExecStartPre {argv:?} failed");
            }
            "ExecStart" => {
                assert_eq!(argv[0], "/usr/sbin/migsafe");
                let mut cmd = Command::new(BIN);
                cmd.args(&argv[1..])
                    .env("NOTIFY_SOCKET", &sock_path)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                daemon = Some(Daemon::spawn(&mut cmd, &mnt));
            }
            "ExecStop" => stop = Some(argv),
            _ => {}
        }
    }
    let mut daemon = daemon.expect("the unit has an ExecStart");
    let msg = recv_text(&sock).expect("no sd_notify message within 15 s");
    // Checked at the moment READY arrived: the mount is already live.
    assert_eq!(
        types_at(&mnt),
        ["fuse.migsafe"],
        "READY before the mount: {msg}"
    );
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
    assert!(
        msg.lines()
            .any(|l| l == format!("MAINPID={}", daemon.pid())),
        "{msg}"
    );
    assert_eq!(fs::read(mnt.join("disk.img")).unwrap(), b"image bytes");
    let stop = stop.expect("the unit has an ExecStop");
    run(Command::new(&stop[0]).args(&stop[1..]));
    assert_eq!(daemon.wait_exit(), Some(0), "exit status after ExecStop");
    assert!(!is_mounted(&mnt));
}

/// READY=1 reaches an abstract-namespace NOTIFY_SOCKET (`@name`, as systemd
/// also passes it) only once the mount is live, and SIGTERM sends STOPPING=1.
#[test]
fn ready_on_abstract_notify_socket_after_mount_then_stopping() {
    if !require_root() {
        return;
    }
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::SocketAddr;
    let dir = scratch();
    let backing = backing_dir(dir.path());
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let name = format!("migsafe-test-{}-{}", std::process::id(), line!());
    let sock = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
    let mut daemon = Daemon::spawn(
        Command::new(BIN)
            .args(["mount", "--io", "relay"])
            .arg(&backing)
            .arg(&mnt)
            .env("NOTIFY_SOCKET", format!("@{name}"))
            .stdin(Stdio::null())
            .stderr(Stdio::null()),
        &mnt,
    );
    let msg = recv_text(&sock).expect("no READY within 15 s");
    assert_eq!(types_at(&mnt), ["fuse.migsafe"], "READY before the mount");
    assert!(msg.starts_with("READY=1\n"), "{msg}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.pid()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let msg = recv_text(&sock).expect("no STOPPING within 15 s");
    assert_eq!(msg, "STOPPING=1");
    assert_eq!(daemon.wait_exit(), Some(0));
    assert!(!is_mounted(&mnt));
}

/// `--log-file` in the foreground gets the log (it used to be ignored
/// without `--daemon`), and a failed control command is logged at WARN with
/// the image's name and errno, a successful one (flush) at INFO (the
/// control).
#[test]
fn foreground_log_file_gets_the_log_and_failed_commands_warn() {
    if !require_root() {
        return;
    }
    let dir = scratch();
    let backing = backing_dir(dir.path());
    let log = dir.path().join("migsafe.log");
    let m = Mount::start(
        dir.path(),
        &backing,
        &["--io", "relay", "--log-file", log.to_str().unwrap()],
    );
    // The start line follows mount(2) by a moment: the mount can be live
    // (what Mount::start waits for) before it is written.
    let start = format!("serving {} on", backing.display());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut text = read_text(&log);
    while !text.contains(&start) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
        text = read_text(&log);
    }
    assert!(
        text.contains(&start),
        "--log-file lacks the start line:\n{text}"
    );
    assert!(
        !m.log_text().contains("serving"),
        "the log went to stderr too"
    );
    assert_eq!(ctl_write(&m.ctl("flush"), "disk.img\n"), Ok(()));
    assert_eq!(
        ctl_write(&m.ctl("activate"), "no-such.img\n"),
        Err(libc::ENOENT)
    );
    assert_eq!(m.stop(), Some(0));
    let text = read_text(&log);
    let lines: Vec<&str> = text.lines().collect();
    let warn: Vec<&&str> = lines
        .iter()
        .filter(|l| l.contains(" (1 targets): "))
        .collect();
    assert_eq!(warn.len(), 2, "{text}");
    assert!(
        warn[0].contains(" INFO ") && warn[0].contains(": ok in"),
        "success not at INFO: {}",
        warn[0]
    );
    assert!(
        warn[1].contains(" WARN ")
            && warn[1].contains("image=no-such.img")
            && warn[1].contains("ENOENT"),
        "failure not at WARN with name and errno: {}",
        warn[1]
    );
    assert!(text.contains("unmounted"), "{text}");
}

/// A detached daemon without `--log-file` logs to syslog: RFC 3164 datagrams
/// on the syslog socket, facility daemon, WARN as severity warning.
#[test]
fn detached_daemon_without_log_file_logs_to_syslog() {
    if !require_root() {
        return;
    }
    let dir = scratch();
    let backing = backing_dir(dir.path());
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let sock_path = dir.path().join("log.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let pid_file = dir.path().join("pid");
    let guard = Daemon {
        child: None,
        mountpoint: mnt.clone(),
    };
    let out = Command::new(BIN)
        .args(["mount", "--daemon", "--io", "relay", "--pid-file"])
        .arg(&pid_file)
        .arg(&backing)
        .arg(&mnt)
        .env("MIGSAFE_SYSLOG_SOCKET", &sock_path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let pid = read_text(&pid_file).trim().to_string();
    assert_eq!(
        ctl_write(&mnt.join(".ctl/activate"), "gone.img\n"),
        Err(libc::ENOENT)
    );
    // The request's INFO line comes first; every line carries the severity
    // its level maps to, and the failure arrives as a warning.
    let mut before = Vec::new();
    let msg = loop {
        let msg = recv_text(&sock).expect("no WARN syslog datagram within 15 s");
        if msg.contains(" WARN ") {
            break msg;
        }
        before.push(msg);
    };
    assert!(
        before
            .iter()
            .all(|m| m.starts_with(&format!("<30>migsafe[{pid}]: INFO "))),
        "lines before the warning not INFO at severity 6: {before:?}"
    );
    assert!(
        msg.starts_with(&format!("<28>migsafe[{pid}]: WARN "))
            && msg.contains("image=gone.img")
            && msg.contains("ENOENT"),
        "{msg}"
    );
    umount_retrying(&mnt);
    let mut seen = Vec::new();
    while let Ok(msg) = recv_text(&sock) {
        seen.push(msg.clone());
        if msg.contains("unmounted") {
            break;
        }
    }
    assert!(
        seen.last()
            .is_some_and(|m| m.starts_with(&format!("<30>migsafe[{pid}]: INFO "))),
        "no INFO unmount line: {seen:?}"
    );
    drop(guard);
}

/// Without a syslog socket the detached daemon says so on the caller's
/// stderr and names where the log goes instead.
#[test]
fn detached_daemon_without_syslog_says_where_the_log_goes() {
    if !require_root() {
        return;
    }
    let dir = scratch();
    let backing = backing_dir(dir.path());
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let guard = Daemon {
        child: None,
        mountpoint: mnt.clone(),
    };
    let out = Command::new(BIN)
        .args(["mount", "--daemon", "--io", "relay"])
        .arg(&backing)
        .arg(&mnt)
        .env("MIGSAFE_SYSLOG_SOCKET", dir.path().join("no-such-socket"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no syslog at") && stderr.contains("/var/log/migsafe.log"),
        "{stderr}"
    );
    umount_retrying(&mnt);
    let deadline = Instant::now() + Duration::from_secs(10);
    let want = format!("unmounted {}", mnt.display());
    while !read_text(Path::new("/var/log/migsafe.log")).contains(&want) {
        assert!(
            Instant::now() < deadline,
            "{want:?} not in /var/log/migsafe.log"
        );
        sleep(Duration::from_millis(20));
    }
    drop(guard);
}

/// Runs `migsafe mount ARGS...` expecting a start-up refusal: it must exit
/// within 10 s (a defect that mounts instead is unmounted and killed by the
/// guard). Returns (exit code, stderr).
fn start_refused(args: &[&std::ffi::OsStr], guard_mountpoint: &Path) -> (Option<i32>, String) {
    let dir = tempfile::NamedTempFile::new().unwrap();
    let mut daemon = Daemon::spawn(
        Command::new(BIN)
            .arg("mount")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(dir.reopen().unwrap()),
        guard_mountpoint,
    );
    let code = daemon.wait_exit();
    if code.is_some() {
        // It exited, so it holds no mount: whatever is mounted there
        // belongs to someone else.
        daemon.mountpoint = PathBuf::new();
    }
    (code, fs::read_to_string(dir.path()).unwrap_or_default())
}

/// A second `migsafe mount` on a live migsafe mountpoint is refused, naming
/// the running mount and the next step, and leaves the first one alone;
/// once that one is unmounted (the control) the same command mounts.
#[test]
fn second_mount_on_live_migsafe_mountpoint_is_refused() {
    if !require_root() {
        return;
    }
    let dir = scratch();
    let backing = backing_dir(dir.path());
    let other = dir.path().join("other");
    fs::create_dir(&other).unwrap();
    let first = Mount::start(dir.path(), &backing, &["--io", "relay"]);
    let mnt = first.mountpoint.clone();
    let args = [
        "--io".as_ref(),
        "relay".as_ref(),
        other.as_os_str(),
        mnt.as_os_str(),
    ];
    let (code, stderr) = start_refused(&args, &mnt);
    assert_eq!(code, Some(1), "second mount was not refused: {stderr}");
    assert!(
        stderr.contains(&format!(
            "{} is already a live migsafe mount",
            mnt.display()
        )) && stderr.contains(&format!("migsafe:{}", backing.display()))
            && stderr.contains("umount"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "not one line: {stderr}");
    assert_eq!(types_at(&mnt), ["fuse.migsafe"], "stacked anyway");
    assert_eq!(fs::read(mnt.join("disk.img")).unwrap(), b"image bytes");
    assert_eq!(first.stop(), Some(0));
    // Control: the mountpoint is free now.
    let mut second = Daemon::spawn(
        Command::new(BIN)
            .arg("mount")
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::null()),
        &mnt,
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while !is_mounted(&mnt) {
        assert!(Instant::now() < deadline, "control mount not live");
        sleep(Duration::from_millis(20));
    }
    umount_retrying(&mnt);
    assert_eq!(second.wait_exit(), Some(0));
}

/// A mountpoint beneath the backing directory, directly or through a bind
/// mount of it, is refused at start; mounting over the backing directory
/// itself (the control) works.
#[test]
fn mountpoint_inside_its_backing_is_refused() {
    if !require_root() {
        return;
    }
    let dir = scratch();
    let backing = backing_dir(dir.path());
    let nested = backing.join("sub/mnt");
    fs::create_dir_all(&nested).unwrap();
    let (code, stderr) = start_refused(&[backing.as_os_str(), nested.as_os_str()], &nested);
    assert_eq!(code, Some(1), "nested mount was not refused: {stderr}");
    assert!(
        stderr.contains(&format!(
            "mountpoint {} is inside the backing directory {}",
            nested.display(),
            backing.display()
        )) && stderr.contains("choose a mountpoint outside"),
        "{stderr}"
    );
    // The same directory reached through a bind mount of the backing.
    let bind = KMount::mount(
        &["--bind", backing.to_str().unwrap()],
        &dir.path().join("bind"),
    );
    let via_bind = bind.path.join("sub/mnt");
    let (code, stderr) = start_refused(&[backing.as_os_str(), via_bind.as_os_str()], &via_bind);
    assert_eq!(
        code,
        Some(1),
        "nested mount via bind was not refused: {stderr}"
    );
    assert!(
        stderr.contains("is inside the backing directory"),
        "{stderr}"
    );
    // Control: over the backing itself is served through the fd opened
    // before the mount.
    let mut over = Daemon::spawn(
        Command::new(BIN)
            .args(["mount", "--io", "relay"])
            .arg(&backing)
            .arg(&backing)
            .stdin(Stdio::null())
            .stderr(Stdio::null()),
        &backing,
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while !is_mounted(&backing) {
        assert!(Instant::now() < deadline, "mount over the backing not live");
        sleep(Duration::from_millis(20));
    }
    assert_eq!(fs::read(backing.join("disk.img")).unwrap(), b"image bytes");
    run(Command::new("umount").arg(&backing));
    assert_eq!(over.wait_exit(), Some(0));
}

#[test]
fn threads_zero_is_an_error() {
    if !require_root() {
        return;
    }
    let dir = scratch();
    let backing = backing_dir(dir.path());
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    for args in [vec!["--threads", "0"], vec!["-o", "threads=0"]] {
        let mut all: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        all.push(backing.as_os_str());
        all.push(mnt.as_os_str());
        let (code, stderr) = start_refused(&all, &mnt);
        assert_eq!(code, Some(1), "{args:?} accepted: {stderr}");
        assert!(stderr.contains("--threads 0"), "{args:?}: {stderr}");
        assert!(!is_mounted(&mnt));
    }
}

/// `--ctl-name` and a `--device` entry's name must be one path component
/// (not empty, `.`, `..`, nor holding `/`): each such name is refused at
/// start, naming it. The control: names next to them (`...`, `.x`) mount,
/// and show up at the mount root.
#[test]
fn names_that_are_not_one_component_are_refused() {
    if !require_root() {
        return;
    }
    let dir = scratch();
    let backing = backing_dir(dir.path());
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let lun = dir.path().join("lun.raw");
    fs::write(&lun, vec![0u8; 4096]).unwrap();
    // (option, its value, what the refusal says)
    let mut cases: Vec<(&str, String, String)> = ["", ".", "..", "a/b"]
        .into_iter()
        .map(|n| {
            (
                "--ctl-name",
                n.to_string(),
                format!("invalid --ctl-name {n:?}"),
            )
        })
        .collect();
    for n in [".", "..", "a/b"] {
        let entry = format!("{n}={}", lun.display());
        cases.push(("--device", entry, format!("invalid name {n:?}")));
    }
    for (option, value, says) in &cases {
        let args = [
            option.as_ref(),
            value.as_ref(),
            backing.as_os_str(),
            mnt.as_os_str(),
        ];
        let (code, stderr) = start_refused(&args, &mnt);
        assert_eq!(code, Some(1), "{option} {value:?} accepted: {stderr}");
        assert!(stderr.contains(says), "{option} {value:?}: {stderr}");
    }
    assert!(!is_mounted(&mnt));
    // Control: one component each, however dotted.
    let entry = format!("...={}", lun.display());
    let m = Mount::start(
        dir.path(),
        &backing,
        &["--ctl-name", ".x", "--device", &entry],
    );
    assert!(m.path(".x/status").is_file(), "control directory .x");
    assert_eq!(fs::metadata(m.path("...")).unwrap().len(), 4096);
    assert_eq!(m.stop(), Some(0));
}

/// Warnings, not refusals: a non-empty mountpoint, and a backing another
/// migsafe mount on this host already serves. A first, clean mount (the
/// control) warns about neither.
#[test]
fn nonempty_mountpoint_and_backing_mounted_twice_warn() {
    if !require_root() {
        return;
    }
    let dir = scratch();
    let backing = backing_dir(dir.path());
    let first = Mount::start(dir.path(), &backing, &["--io", "relay"]);
    let log = first.log_text();
    assert!(!log.contains("WARN"), "a clean mount warned:\n{log}");
    let full = dir.path().join("full");
    fs::create_dir(&full).unwrap();
    fs::write(full.join("hidden"), b"x").unwrap();
    let mut second = Daemon::spawn(
        Command::new(BIN)
            .args(["mount", "--io", "relay", "--log-file"])
            .arg(dir.path().join("second.log"))
            .arg(&backing)
            .arg(&full)
            .stdin(Stdio::null())
            .stderr(Stdio::null()),
        &full,
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while !is_mounted(&full) {
        assert!(Instant::now() < deadline, "second mount not live");
        sleep(Duration::from_millis(20));
    }
    let log = read_text(&dir.path().join("second.log"));
    assert!(
        log.contains(&format!(
            "mountpoint {} is not empty (1 entries)",
            full.display()
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "backing {} is already mounted by migsafe on {}",
            backing.display(),
            first.mountpoint.display()
        )),
        "{log}"
    );
    run(Command::new("umount").arg(&full));
    assert_eq!(second.wait_exit(), Some(0));
    assert_eq!(first.stop(), Some(0));
}

/// A user who cannot open /dev/fuse is told so, with the device's mode. Run
/// as nobody in a private mount namespace where /dev/fuse is a 0600 node
/// (the host's stays as it is). The control, the same user with a 0666 node,
/// gets past /dev/fuse and mounts through fusermount3, also as type
/// fuse.migsafe.
#[test]
fn user_without_dev_fuse_access_is_told_its_mode() {
    if !require_root() || !have_tool("unshare") || !have_tool("fusermount3") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let backing = backing_dir(dir.path());
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    fs::set_permissions(&mnt, fs::Permissions::from_mode(0o777)).unwrap();
    for mode in ["0600", "0666"] {
        let node = dir.path().join(format!("fuse-{mode}"));
        let log = dir.path().join(format!("log-{mode}"));
        // The daemon lives in the namespace: when the script ends (or
        // `timeout` kills it) the namespace and any mount in it are gone.
        let script = format!(
            "mknod -m {mode} {node} c 10 229\n\
             mount --bind {node} /dev/fuse\n\
             setpriv --reuid=65534 --regid=65534 --clear-groups \
               timeout 20 {BIN} mount --io relay {b} {m} >{log} 2>&1 </dev/null &\n\
             pid=$!\n\
             for i in $(seq 100); do kill -0 $pid 2>/dev/null || break; \
               findmnt -n -o FSTYPE,OPTIONS {m} && break; sleep 0.1; done\n\
             umount {m} 2>/dev/null || true\n\
             wait $pid || true\n\
             cat {log}",
            node = node.display(),
            log = log.display(),
            b = backing.display(),
            m = mnt.display()
        );
        let out = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-ec", &script])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let _ = fs::remove_file(&node);
        let _ = fs::remove_file(&log);
        if mode == "0600" {
            assert!(
                text.contains("cannot open /dev/fuse (mode 0600, owner 0:0)")
                    && text.contains("read-write access to /dev/fuse"),
                "{text}"
            );
        } else {
            assert!(!text.contains("cannot open /dev/fuse"), "{text}");
            assert!(
                text.starts_with("fuse.migsafe ") && text.contains("user_id=65534"),
                "non-root mount via fusermount3:\n{text}"
            );
        }
    }
}

/// A mountpoint whose daemon died (ENOTCONN) is named as a dead mount with
/// the way out, not as a bare "Transport endpoint is not connected".
#[test]
fn dead_mountpoint_is_named_with_the_way_out() {
    if !require_root() {
        return;
    }
    let dir = scratch();
    let backing = backing_dir(dir.path());
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut dead = Daemon::spawn(
        Command::new(BIN)
            .args(["mount", "--io", "relay"])
            .arg(&backing)
            .arg(&mnt)
            .stdin(Stdio::null())
            .stderr(Stdio::null()),
        &mnt,
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while !is_mounted(&mnt) {
        assert!(Instant::now() < deadline, "mount not live");
        sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(dead.pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Killed by a signal: no exit code, but reaped.
    let _ = dead.wait_exit();
    assert!(dead.child.is_none(), "SIGKILLed daemon still running");
    let err = fs::metadata(&mnt).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    let (code, stderr) = start_refused(&[backing.as_os_str(), mnt.as_os_str()], &mnt);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("is a dead FUSE mount") && stderr.contains("umount -l"),
        "{stderr}"
    );
    run(Command::new("umount").arg("-l").arg(&mnt));
}
