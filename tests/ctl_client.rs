//! `migsafe ctl`, the client over the control files: names with any bytes,
//! exit status (0 ok / 1 command failed / 2 usage or I/O error, never 0 for
//! a result it cannot read), broken pipes, human and JSON output, messages
//! for the errors an operator meets, and `metrics`.

mod common;

use common::{Mount, ctl_cli, hold_open, make_file, scratch, status_image};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Command, Stdio};

const MIB: usize = 1 << 20;

fn backing(dir: &Path, files: &[&[u8]]) -> std::path::PathBuf {
    let back = dir.join("back");
    fs::create_dir_all(&back).unwrap();
    for name in files {
        make_file(&back.join(OsStr::from_bytes(name)), MIB, b'A');
    }
    back
}

#[test]
fn names_with_spaces_and_newlines() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let back = backing(
        dir.path(),
        &[b"my disk.img", b"new\nline.img", b"plain.img"],
    );
    let m = Mount::start(dir.path(), &back, &[]);
    let spaced = m.path("my disk.img");
    let _h1 = hold_open(&spaced);
    let _h2 = hold_open(&m.mountpoint.join(OsStr::from_bytes(b"new\nline.img")));

    let (code, out, err) = ctl_cli(&m, &["inactivate", "my disk.img"]);
    assert_eq!(code, 0, "inactivate \"my disk.img\": {out}{err}");
    assert!(
        out.starts_with("inactivate \"my disk.img\": ok (") && out.lines().count() == 1,
        "one ok line naming the image: {out}{err}"
    );
    assert_eq!(status_image(&m, "my disk.img")["state"], "inactive");
    let (code, out, err) = ctl_cli(&m, &["activate", "my disk.img"]);
    assert_eq!(code, 0, "activate \"my disk.img\": {out}{err}");
    assert!(
        out.starts_with("activate \"my disk.img\": ok ("),
        "{out}{err}"
    );
    assert_eq!(status_image(&m, "my disk.img")["state"], "active");

    // An ordinary name prints as it always did.
    let (code, out, err) = ctl_cli(&m, &["flush", "plain.img"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("flush plain.img: ok ("), "{out}{err}");

    // A missing image with a space: failed command, the name whole.
    let (code, out, err) = ctl_cli(&m, &["activate", "no such.img"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.starts_with("activate \"no such.img\": FAILED ENOENT: no such image"),
        "{out}{err}"
    );

    // A newline cannot be put in a request (one path per line): usage error,
    // and nothing is sent (two targets `new` and `line.img` would be).
    let (code, out, err) = ctl_cli(&m, &["inactivate", "new\nline.img"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("newline") && err.contains("'*'"), "{err}");
    assert_eq!(status_image(&m, "new\nline.img")["state"], "active");

    // Reached with '*': one line per image, the newline escaped.
    let (code, out, err) = ctl_cli(&m, &["inactivate", "*"]);
    assert_eq!(code, 0, "inactivate *: {out}{err}\n{}", m.log_text());
    assert_eq!(out.lines().count(), 3, "one line per image: {out:?}");
    assert!(
        out.contains("inactivate \"new\\nline.img\": ok ("),
        "newline shown escaped: {out:?}"
    );
    assert_eq!(status_image(&m, "new\nline.img")["state"], "inactive");
    let (code, out, err) = ctl_cli(&m, &["activate", "*", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["image"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["my disk.img", "new\nline.img", "plain.img"],
        "JSON names are exact: {out}"
    );
}

/// A directory that only looks like a mount: its `.ctl/activate` is a plain
/// file whose tail (after what the client writes) is what it reads back.
fn fake_mount(dir: &Path, images: &[&str], readback: &str) -> std::path::PathBuf {
    let mnt = dir.join("fake");
    fs::create_dir_all(mnt.join(".ctl")).unwrap();
    let pad = "#".repeat(images.iter().map(|i| i.len() + 1).sum());
    fs::write(mnt.join(".ctl/activate"), format!("{pad}{readback}")).unwrap();
    mnt
}

fn ctl_at(mnt: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(common::BIN)
        .arg("ctl")
        .arg(mnt)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_result_that_does_not_parse_is_never_exit_0() {
    let dir = scratch();
    // Nothing read back after a successful write.
    let (code, out, err) = ctl_at(
        &fake_mount(dir.path(), &["x.img"], ""),
        &["activate", "x.img"],
    );
    assert_eq!(code, 2, "no result: {out}{err}");
    fs::remove_dir_all(dir.path().join("fake")).unwrap();
    for garbage in [
        "garbage\n",
        // The old, unquoted form of a name with a space.
        "image=my disk.img result=ok resident_pages=0 ms=0\n",
        "image=x.img result=error errno=EIO resident_pages=0 ms=0\n",
        "image=\"x.img result=ok\n",
        "image=x.img result=ok resident_pages=0 ms=0\r\n",
        "image=x.img result=ok resident_pages=0 ms=0",
        "image=x.img result=maybe resident_pages=0 ms=0\n",
        "image=x.img result=ok resident_pages=zero ms=0\n",
    ] {
        let mnt = fake_mount(dir.path(), &["x.img"], garbage);
        let (code, out, err) = ctl_at(&mnt, &["activate", "x.img"]);
        assert_eq!(code, 2, "{garbage:?}: {out}{err}");
        assert!(!err.is_empty(), "says why: {garbage:?}");
        fs::remove_dir_all(&mnt).unwrap();
    }
    // Control: a well-formed ok line for the one image is exit 0.
    let mnt = fake_mount(
        dir.path(),
        &["x.img"],
        "image=x.img result=ok resident_pages=0 ms=0\n",
    );
    let (code, out, err) = ctl_at(&mnt, &["activate", "x.img"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out, "activate x.img: ok (0 ms)\n");
    fs::remove_dir_all(&mnt).unwrap();
    // One line for two images is not a whole result.
    let mnt = fake_mount(
        dir.path(),
        &["x.img", "y.img"],
        "image=x.img result=ok resident_pages=0 ms=0\n",
    );
    let (code, out, err) = ctl_at(&mnt, &["activate", "x.img", "y.img"]);
    assert_eq!(code, 2, "{out}{err}");
    fs::remove_dir_all(&mnt).unwrap();
}

/// Runs `migsafe ctl MNT args` with stdout on a pipe whose reader is
/// already closed (like `| head -1` after its line); returns (code, stderr).
fn ctl_into_closed_pipe(m: &Mount, args: &[&str]) -> (i32, String) {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(common::BIN)
        .arg("ctl")
        .arg(&m.mountpoint)
        .args(args)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn broken_pipe_exits_quietly_and_full_disk_does_not() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let back = backing(dir.path(), &[b"a.img"]);
    let m = Mount::start(dir.path(), &back, &[]);
    common::read_at(&m.path("a.img"), 0, 4096);

    for args in [
        &["status"][..],
        &["status", "--json"],
        &["metrics"],
        &["flush", "a.img"],
        &["flush", "a.img", "--json"],
    ] {
        let (code, err) = ctl_into_closed_pipe(&m, args);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(err, "", "{args:?}: quiet on a closed pipe");
        assert_eq!(code, 0, "{args:?}: the command itself succeeded");
    }
    // The command's own result still decides the status.
    let (code, err) = ctl_into_closed_pipe(&m, &["activate", "nope"]);
    assert_eq!(code, 1, "{err}");

    // Not a pipe: a write error of the output is an I/O error, said once.
    let full = fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = Command::new(common::BIN)
        .arg("ctl")
        .arg(&m.mountpoint)
        .arg("status")
        .stdout(full)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(!err.contains("panicked") && err.contains("output"), "{err}");

    // A real `| head -1` in a shell.
    let script = format!(
        "{} ctl {} status | head -1; echo \"rc=${{PIPESTATUS[0]}}\"",
        common::BIN,
        m.mountpoint.display()
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(text.starts_with("migsafe "), "{text}{err}");
    assert!(text.contains("rc=0"), "{text}{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn json_numbers_are_numbers_and_status_is_readable() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let back = backing(dir.path(), &[b"a.img", b"two words.img"]);
    fs::write(back.join("small.img"), b"x").unwrap();
    let m = Mount::start(dir.path(), &back, &["--io", "relay"]);
    common::read_at(&m.path("a.img"), 0, 64 * 1024);
    common::read_at(&m.path("small.img"), 0, 1);
    let _h = common::hold_open_rw(&m.path("two words.img"));

    let (code, out, err) = ctl_cli(&m, &["check", "a.img", "--json"]);
    assert!(code == 0 || code == 1, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let r = &v["results"][0];
    assert!(r["ms"].is_u64(), "ms is a JSON number: {out}");
    assert!(
        r["resident_pages"].is_u64(),
        "resident_pages is a number: {out}"
    );
    assert_eq!(r["image"], "a.img");

    let (code, out, err) = ctl_cli(&m, &["status"]);
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    let backing_line = format!("backing: {}", back.display());
    assert!(
        lines.iter().any(|l| *l == backing_line),
        "names the backing: {out}"
    );
    let header = lines
        .iter()
        .find(|l| l.starts_with("IMAGE"))
        .unwrap_or_else(|| panic!("no table header: {out}"));
    assert!(header.contains("FENCING"), "{header}");
    let row = |name: &str| {
        let row = lines
            .iter()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no row for {name}: {out}"));
        row.split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    // a.img: 1 MiB, 64 KiB read (at least: readahead may bring more).
    let a = row("a.img ");
    assert_eq!(a[1], "active", "{out}");
    assert_eq!(a[2], "full", "{out}");
    assert_eq!(&a[3..5], ["1.0", "MiB"], "size in human units: {out}");
    assert!(
        a[6] == "KiB" || a[6] == "MiB",
        "cached amount in human units: {out}"
    );
    let small = row("small.img ");
    assert_eq!(&small[3..5], ["1", "B"], "{out}");
    let two = row("\"two words.img\" ");
    // The quoted name is two words: the columns move by one.
    assert_eq!(two[3], "full", "relay handles are fenced: {out}");
    assert_eq!(two[4], "1.0", "{out}");
}

/// Runs `migsafe ctl MNT args` as uid/gid 65534 without groups.
fn ctl_as_nobody(m: &Mount, args: &[&str]) -> (i32, String, String) {
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(common::BIN)
        .arg("ctl")
        .arg(&m.mountpoint)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn eacces_says_who_may_write_control_files() {
    use std::os::unix::fs::PermissionsExt;
    if !common::require_root() || !common::have_tool("setpriv") {
        return;
    }
    let dir = scratch();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let back = backing(dir.path(), &[b"a.img"]);
    let m = Mount::start(dir.path(), &back, &["-o", "allow_other"]);
    fs::set_permissions(&m.mountpoint, fs::Permissions::from_mode(0o755)).unwrap();
    common::read_at(&m.path("a.img"), 0, 4096);

    // Control: nobody reaches the mount and may read status.
    let (code, out, err) = ctl_as_nobody(&m, &["status"]);
    assert_eq!(code, 0, "nobody reads status: {out}{err}");
    assert!(out.contains("a.img"), "{out}");

    for args in [&["inactivate", "a.img"][..], &["set", "sync", "fdatasync"]] {
        let (code, out, err) = ctl_as_nobody(&m, args);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(
            err.contains("only root or the user who mounted"),
            "{args:?}: names who may write: {err}"
        );
        assert!(
            !err.contains("a migsafe mount?"),
            "{args:?}: not the not-a-mount hint: {err}"
        );
    }
    assert_eq!(status_image(&m, "a.img")["state"], "active");
    assert_eq!(common::read_text(&m.ctl("sync")).trim(), "fsync");
    // Root may.
    let (code, out, err) = ctl_cli(&m, &["inactivate", "a.img"]);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn enotconn_says_the_daemon_is_gone_and_what_to_do() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let back = backing(dir.path(), &[b"a.img"]);
    let m = Mount::start(dir.path(), &back, &[]);
    common::read_at(&m.path("a.img"), 0, 4096);
    // Control: a live daemon answers.
    let (code, out, err) = ctl_cli(&m, &["flush", "a.img"]);
    assert_eq!(code, 0, "{out}{err}");

    let pid = m.keeper_pid().expect("daemon pid") as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while fs::metadata(&m.mountpoint)
        .err()
        .and_then(|e| e.raw_os_error())
        != Some(libc::ENOTCONN)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "mount never became ENOTCONN"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mnt = m.mountpoint.display().to_string();
    for args in [
        &["flush", "a.img"][..],
        &["status"],
        &["status", "--json"],
        &["metrics"],
        &["set", "sync", "fsync"],
    ] {
        let (code, out, err) = ctl_cli(&m, args);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(err.contains("daemon"), "{args:?}: {err}");
        assert!(
            err.contains(&format!("umount -l {mnt}")),
            "{args:?}: says how to unmount: {err}"
        );
        assert!(
            err.contains("reopen"),
            "{args:?}: says VMs must reopen: {err}"
        );
    }
    // The guard unmounts (lazily) and reaps the killed daemon.
}

/// Parses Prometheus text with the reference parser (python3-prometheus-client)
/// into (sample name, labels, value).
fn parse_metrics(text: &str) -> Vec<(String, serde_json::Map<String, serde_json::Value>, f64)> {
    const PY: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;
    use std::io::Write;
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", PY])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the parser rejects the metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Vec<(String, serde_json::Map<String, serde_json::Value>, f64)> =
        serde_json::from_slice(&out.stdout).unwrap();
    v
}

/// The value of the one sample `name` whose labels include `labels`.
fn value(
    samples: &[(String, serde_json::Map<String, serde_json::Value>, f64)],
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    let hits: Vec<f64> = samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).and_then(|x| x.as_str()) == Some(*v))
        })
        .map(|(_, _, v)| *v)
        .collect();
    assert!(hits.len() <= 1, "{name} {labels:?}: {} samples", hits.len());
    hits.first().copied()
}

fn have_prometheus_parser() -> bool {
    let ok = Command::new("/usr/bin/python3")
        .args(["-c", "import prometheus_client.parser"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("python3-prometheus-client is not installed but CI must provide it");
        }
        eprintln!("SKIPPED: python3-prometheus-client is not installed");
    }
    ok
}

#[test]
fn metrics_parse_and_match_the_mount() {
    if !common::require_root() || !have_prometheus_parser() {
        return;
    }
    let dir = scratch();
    let hostile: &[u8] = b"q\"uo\\te\nl.img";
    let back = backing(dir.path(), &[b"a.img", hostile]);
    let m = Mount::start(dir.path(), &back, &["--io", "relay"]);
    let _h = common::hold_open_rw(&m.path("a.img"));
    let _h2 = hold_open(&m.mountpoint.join(OsStr::from_bytes(hostile)));
    let hostile = std::str::from_utf8(hostile).unwrap();
    let mnt = fs::canonicalize(&m.mountpoint).unwrap();
    let mnt = mnt.to_str().unwrap();
    let metrics = || {
        let (code, out, err) = ctl_cli(&m, &["metrics"]);
        assert_eq!(code, 0, "{out}{err}");
        parse_metrics(&out)
    };

    let s = metrics();
    assert_eq!(value(&s, "migsafe_up", &[("mountpoint", mnt)]), Some(1.0));
    for path in ["a.img", hostile] {
        let l = [("mountpoint", mnt), ("path", path)];
        assert_eq!(
            value(&s, "migsafe_image_activations_total", &l),
            Some(0.0),
            "{path:?}"
        );
        assert_eq!(
            value(&s, "migsafe_image_inactivations_total", &l),
            Some(0.0)
        );
        assert_eq!(value(&s, "migsafe_image_size_bytes", &l), Some(MIB as f64));
        assert_eq!(value(&s, "migsafe_image_active", &l), Some(1.0));
        assert_eq!(value(&s, "migsafe_image_sticky_error", &l), Some(0.0));
        assert_eq!(value(&s, "migsafe_image_sync_errors_total", &l), Some(0.0));
        assert!(value(&s, "migsafe_image_dirty_pages", &l).is_some());
        assert!(value(&s, "migsafe_image_writeback_pages", &l).is_some());
        assert!(value(&s, "migsafe_image_cached_pages", &l).is_some());
        assert!(value(&s, "migsafe_image_fuse_cached_pages", &l).is_some());
        assert!(value(&s, "migsafe_image_fuse_dirty_pages", &l).is_some());
    }
    let handles = |s: &[_], dp: &str, w: &str| {
        value(
            s,
            "migsafe_open_handles",
            &[("data_path", dp), ("writable", w)],
        )
    };
    assert_eq!(handles(&s, "relay", "true"), Some(1.0), "the rw holder");
    assert_eq!(handles(&s, "relay", "false"), Some(1.0), "the ro holder");
    assert_eq!(handles(&s, "passthrough", "true"), Some(0.0));

    // One handover out and in of a.img.
    let (code, out, err) = ctl_cli(&m, &["inactivate", "a.img"]);
    assert_eq!(code, 0, "{out}{err}");
    let s = metrics();
    let a = [("path", "a.img")];
    assert_eq!(
        value(&s, "migsafe_image_inactivations_total", &a),
        Some(1.0)
    );
    assert_eq!(value(&s, "migsafe_image_active", &a), Some(0.0));
    let (code, out, err) = ctl_cli(&m, &["activate", "a.img"]);
    assert_eq!(code, 0, "{out}{err}");
    let s = metrics();
    assert_eq!(value(&s, "migsafe_image_activations_total", &a), Some(1.0));
    assert_eq!(value(&s, "migsafe_image_active", &a), Some(1.0));
    let last = value(
        &s,
        "migsafe_image_last_command_seconds",
        &[("path", "a.img"), ("command", "activate"), ("result", "ok")],
    );
    assert!(last.is_some_and(|v| v >= 0.0), "last handover duration");
    assert_eq!(
        value(&s, "migsafe_image_activations_total", &[("path", hostile)]),
        Some(0.0),
        "the other image did not move"
    );
    // Reached by '*', the hostile name's label comes back exact.
    let (code, out, err) = ctl_cli(&m, &["activate", "*"]);
    assert_eq!(code, 0, "{out}{err}");
    let s = metrics();
    assert_eq!(value(&s, "migsafe_image_activations_total", &a), Some(2.0));
    assert_eq!(
        value(&s, "migsafe_image_activations_total", &[("path", hostile)]),
        Some(1.0)
    );

    // A failed command counts under its errno: `check` after a read through
    // the relay mount finds the backing's cached pages (EBUSY).
    let fails = |s: &[_], errno: &str| {
        value(
            s,
            "migsafe_image_command_failures_total",
            &[("path", "a.img"), ("errno", errno)],
        )
    };
    assert_eq!(fails(&metrics(), "EBUSY"), None, "no failure yet");
    let _ = fs::read(m.path("a.img")).unwrap();
    let (code, out, err) = ctl_cli(&m, &["check", "a.img"]);
    assert_eq!(code, 1, "check must find the cached pages: {out}{err}");
    assert_eq!(fails(&metrics(), "EBUSY"), Some(1.0));
}

#[test]
fn status_fencing_column_shows_partial_for_writable_passthrough() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let back = backing(dir.path(), &[b"a.img"]);
    let m = Mount::start(dir.path(), &back, &["--io", "passthrough"]);
    if common::status(&m)["passthrough_supported"] != true {
        eprintln!("SKIPPED: this kernel offers no FUSE passthrough");
        return;
    }
    let row = || {
        let (code, out, err) = ctl_cli(&m, &["status"]);
        assert_eq!(code, 0, "{out}{err}");
        out.lines()
            .find(|l| l.starts_with("a.img "))
            .unwrap_or_else(|| panic!("no row: {out}"))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let h = common::hold_open(&m.path("a.img"));
    assert_eq!(row()[2], "full", "a read-only handle is fenced");
    drop(h);
    let _h = common::hold_open_rw(&m.path("a.img"));
    assert_eq!(
        common::status_image(&m, "a.img")["fencing"],
        "partial",
        "control: the daemon reports it"
    );
    assert_eq!(row()[2], "partial", "a writable passthrough handle is not");
}
