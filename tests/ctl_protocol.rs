//! The control-directory protocol (docs/DESIGN.md §3 "The control directory" and the
//! interface contract): errnos, read-back lines, multi-image writes, `*`,
//! hiding and protection of `.ctl`, `--ctl-name`, settings, `status`,
//! invalidate-on-open, EROFS fencing of inactive images, and the `migsafe ctl`
//! client's exit codes.

mod common;

use common::{
    Mount, as_nobody, cstr, ctl_cli, ctl_write, ctl_write_read, dir_names, errno_result, hold_open,
    hold_open_rw, last_errno, make_file, open_rw, parse_line, read_at, read_text, residency,
    results, scratch, status, status_image,
};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
const COMMANDS: [&str; 5] = ["activate", "inactivate", "invalidate", "flush", "check"];
const SETTINGS: [(&str, &[&str], &str); 6] = [
    ("check-cache-dropped", &["on", "off"], "on"),
    ("drop-cache", &["on", "off"], "on"),
    ("fsync-on-close", &["on", "off"], "on"),
    ("invalidate-on-open", &["on", "warn", "off"], "on"),
    ("sync", &["fsync", "fdatasync"], "fsync"),
    ("inactive-writes", &["deny", "allow"], "deny"),
];

// ---------------------------------------------------------------------------
// Local helpers (not in tests/common).

fn fallocate(f: &File, mode: i32, off: i64, len: i64) -> Result<(), i32> {
    // SAFETY: plain syscall on a valid fd.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), mode, off, len) };
    if rc == 0 { Ok(()) } else { Err(last_errno()) }
}

fn copy_range(src: &File, dst: &File, len: usize) -> Result<(), i32> {
    let mut off_in: i64 = 0;
    let mut off_out: i64 = 0;
    // SAFETY: plain syscall on valid fds with valid offset pointers.
    let n = unsafe {
        libc::copy_file_range(
            src.as_raw_fd(),
            &mut off_in,
            dst.as_raw_fd(),
            &mut off_out,
            len,
            0,
        )
    };
    if n < 0 {
        Err(last_errno())
    } else if n as usize == len {
        Ok(())
    } else {
        panic!("copy_file_range copied {n} of {len}");
    }
}

fn backing_with(dir: &Path, files: &[(&str, usize)]) -> std::path::PathBuf {
    let back = dir.join("back");
    fs::create_dir_all(back.join("sub")).unwrap();
    for (name, len) in files {
        make_file(&back.join(name), *len, b'A');
    }
    back
}

/// Reads a whole file through the page cache (no O_DIRECT).
fn cache_whole(path: &Path) {
    let mut buf = Vec::new();
    File::open(path).unwrap().read_to_end(&mut buf).unwrap();
}

/// Runs a python snippet as uid/gid 65534 via setpriv; returns its stdout.
fn nobody_py(script: &str, args: &[&Path]) -> String {
    let mut argv = vec![
        OsStr::new("/usr/bin/python3"),
        OsStr::new("-c"),
        OsStr::new(script),
    ];
    argv.extend(args.iter().map(|p| p.as_os_str()));
    as_nobody(&argv).1.trim().to_string()
}

const PY_WRITE: &str = r#"
import errno, os, sys
try:
    fd = os.open(sys.argv[1], os.O_WRONLY)
    os.write(fd, sys.argv[2].encode())
    os.close(fd)
    print("OK")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)))
"#;

const PY_READ: &str = r#"
import errno, sys
try:
    print("OK" if len(open(sys.argv[1]).read()) > 0 else "EMPTY")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)))
"#;

// ---------------------------------------------------------------------------

#[test]
fn malformed_requests_get_the_documented_errnos() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let back = backing_with(dir.path(), &[("img", MIB), ("sub/img2", MIB)]);
    let m = Mount::start(dir.path(), &back, &[]);
    read_at(&m.path("img"), 0, 4096);
    let abs = format!("{}\n", m.path("img").display());
    let cases: Vec<(String, i32, &str)> = vec![
        ("nope\n".into(), libc::ENOENT, "unknown image"),
        (
            "sub/nope\n".into(),
            libc::ENOENT,
            "unknown image in a subdirectory",
        ),
        ("../img\n".into(), libc::EINVAL, "`..`"),
        ("sub/../img\n".into(), libc::EINVAL, "`..` inside"),
        ("/img\n".into(), libc::EINVAL, "absolute path"),
        (abs, libc::EINVAL, "absolute path into the mount"),
        ("img\0x\n".into(), libc::EINVAL, "NUL byte"),
        ("\n".into(), libc::EINVAL, "empty line"),
        (
            "img\n\nimg\n".into(),
            libc::EINVAL,
            "empty line between images",
        ),
        ("sub\n".into(), libc::EINVAL, "directory"),
        (".ctl\n".into(), libc::EINVAL, "the control directory"),
        (".ctl/status\n".into(), libc::EINVAL, "a control file"),
        ("img\n".repeat(17500), libc::EINVAL, "a write over 64 KiB"),
    ];
    for cmd in COMMANDS {
        for (body, want, what) in &cases {
            let (res, out) = ctl_write_read(&m.ctl(cmd), body);
            assert_eq!(
                res,
                Err(*want),
                "{cmd} with {what} ({:?}) must fail with errno {want}; read-back {out:?}\nlog tail:\n{}",
                &body[..body.len().min(60)],
                tail(&m.log_text())
            );
        }
    }
    // Nothing changed, the daemon is alive, and a good request still works.
    assert_eq!(status_image(&m, "img")["state"], "active");
    assert_eq!(ctl_write(&m.ctl("flush"), "img\n"), Ok(()));
    assert_eq!(ctl_write(&m.ctl("flush"), "sub/img2\n"), Ok(()));

    // Settings files accept only their words.
    for (file, _, default) in SETTINGS {
        let mut bad = vec!["maybe\n", "\n", "on off\n", "yes\n", "img\n"];
        bad.push(if file == "sync" || file == "inactive-writes" {
            "on\n"
        } else if file == "invalidate-on-open" {
            "fdatasync\n"
        } else {
            "warn\n"
        });
        for body in bad {
            assert_eq!(
                ctl_write(&m.ctl(file), body),
                Err(libc::EINVAL),
                "{file} must refuse {body:?} with EINVAL"
            );
            assert_eq!(
                read_text(&m.ctl(file)).trim(),
                default,
                "{file} changed by {body:?}"
            );
        }
        let big = "on\n".repeat(30000);
        assert_eq!(
            ctl_write(&m.ctl(file), &big),
            Err(libc::EINVAL),
            "{file}: overlong write"
        );
    }
    assert!(
        status(&m)["images"].is_array(),
        "daemon still serves status"
    );
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[test]
fn non_root_writer_gets_eacces_even_with_allow_other() {
    if !common::require_root() || !common::have_tool("setpriv") {
        return;
    }
    assert!(
        Path::new("/usr/bin/python3").exists(),
        "/usr/bin/python3 needed"
    );
    let dir = scratch();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let back = backing_with(dir.path(), &[("img", MIB)]);
    let m = Mount::start(dir.path(), &back, &["-o", "allow_other"]);
    fs::set_permissions(&m.mountpoint, fs::Permissions::from_mode(0o755)).unwrap();
    read_at(&m.path("img"), 0, 4096);

    // Control: uid 65534 reaches the mount and the control files.
    assert_eq!(
        nobody_py(PY_READ, &[&m.ctl("status")]),
        "OK",
        "nobody must be able to read status"
    );
    assert_eq!(
        nobody_py(PY_READ, &[&m.path("img")]),
        "OK",
        "nobody must be able to read img"
    );

    for cmd in COMMANDS {
        let got = nobody_py(PY_WRITE, &[&m.ctl(cmd), Path::new("img\n")]);
        assert_eq!(got, "EACCES", "non-root write to {cmd}");
    }
    // The plain-shell form scripts use fails too.
    let ctl = m.ctl("inactivate");
    let (ok, _, _) = as_nobody(&["sh", "-c", "echo img > \"$1\"", "sh", ctl.to_str().unwrap()]);
    assert!(!ok, "`echo img > .ctl/inactivate` as nobody must fail");
    assert_eq!(
        status_image(&m, "img")["state"],
        "active",
        "nobody must not inactivate"
    );

    for (file, values, default) in SETTINGS {
        let other = values.iter().find(|v| *v != &default).unwrap();
        let got = nobody_py(PY_WRITE, &[&m.ctl(file), Path::new(&format!("{other}\n"))]);
        assert_eq!(got, "EACCES", "non-root write to {file}");
        assert_eq!(
            read_text(&m.ctl(file)).trim(),
            default,
            "{file} changed by nobody"
        );
    }

    // Root may.
    assert_eq!(ctl_write(&m.ctl("inactivate"), "img\n"), Ok(()));
    assert_eq!(status_image(&m, "img")["state"], "inactive");
}

#[test]
fn inactive_image_refuses_relay_writes_with_erofs() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let back = backing_with(dir.path(), &[("img", MIB), ("src.bin", 64 << 10)]);
    let m = Mount::start(dir.path(), &back, &["--io", "relay"]);
    let img = m.path("img");
    let src = File::open(m.path("src.bin")).unwrap();

    // Control: all of these work on an active image.
    let f = open_rw(&img);
    assert_eq!(errno_result(f.write_all_at(&[b'W'; 4096], 0)), Ok(()));
    assert_eq!(errno_result(f.set_len(2 * MIB as u64)), Ok(()));
    assert_eq!(fallocate(&f, 0, 0, 3 * MIB as i64), Ok(()));
    assert_eq!(copy_range(&src, &f, 4096), Ok(()));
    assert_eq!(errno_result(f.sync_all()), Ok(()));
    drop(f);

    assert_eq!(ctl_write(&m.ctl("inactivate"), "img\n"), Ok(()));
    let before = fs::read(back.join("img")).unwrap();
    // A destination VMM opens its image read-write while inactive.
    let f = open_rw(&img);
    assert_eq!(
        errno_result(f.write_all_at(&[b'X'; 4096], 0)),
        Err(libc::EROFS),
        "write"
    );
    assert_eq!(
        errno_result(f.set_len(MIB as u64)),
        Err(libc::EROFS),
        "ftruncate"
    );
    let cpath = cstr(&img);
    // SAFETY: valid C string.
    let rc = unsafe { libc::truncate(cpath.as_ptr(), 5 * MIB as i64) };
    assert_eq!(
        (rc, if rc < 0 { last_errno() } else { 0 }),
        (-1, libc::EROFS),
        "truncate(2)"
    );
    assert_eq!(
        fallocate(&f, 0, 0, 4 * MIB as i64),
        Err(libc::EROFS),
        "fallocate"
    );
    assert_eq!(
        fallocate(
            &f,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            4096
        ),
        Err(libc::EROFS),
        "fallocate PUNCH_HOLE"
    );
    assert_eq!(
        fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 0, 4096),
        Err(libc::EROFS),
        "fallocate ZERO_RANGE"
    );
    assert_eq!(
        copy_range(&src, &f, 4096),
        Err(libc::EROFS),
        "copy_file_range"
    );
    // Reads still work, and nothing changed on the storage.
    let mut buf = [0u8; 4096];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(
        fs::read(back.join("img")).unwrap(),
        before,
        "inactive image was modified"
    );

    // inactive-writes = allow lets them through.
    assert_eq!(ctl_write(&m.ctl("inactive-writes"), "allow\n"), Ok(()));
    assert_eq!(
        errno_result(f.write_all_at(&[b'Y'; 4096], 0)),
        Ok(()),
        "write with allow"
    );
    assert_eq!(
        errno_result(f.set_len(2 * MIB as u64)),
        Ok(()),
        "ftruncate with allow"
    );
    assert_eq!(
        fallocate(&f, 0, 0, 3 * MIB as i64),
        Ok(()),
        "fallocate with allow"
    );
    assert_eq!(errno_result(f.sync_all()), Ok(()));
    assert_eq!(status_image(&m, "img")["state"], "inactive");
    assert_eq!(ctl_write(&m.ctl("inactive-writes"), "deny\n"), Ok(()));
    assert_eq!(
        errno_result(f.write_all_at(&[b'X'; 4096], 0)),
        Err(libc::EROFS),
        "deny again"
    );

    // After activate they succeed again.
    let (res, out) = ctl_write_read(&m.ctl("activate"), "img\n");
    assert_eq!(res, Ok(()), "activate: {out}\nlog:\n{}", m.log_text());
    assert_eq!(
        errno_result(f.write_all_at(&[b'Z'; 4096], 0)),
        Ok(()),
        "write after activate"
    );
    assert_eq!(
        errno_result(f.set_len(MIB as u64)),
        Ok(()),
        "ftruncate after activate"
    );
    assert_eq!(
        fallocate(&f, 0, 0, 2 * MIB as i64),
        Ok(()),
        "fallocate after activate"
    );
    assert_eq!(
        copy_range(&src, &f, 4096),
        Ok(()),
        "copy_file_range after activate"
    );
    assert_eq!(errno_result(f.sync_all()), Ok(()));
}

#[test]
fn multi_image_write_reports_every_result() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let back = backing_with(dir.path(), &[("img", MIB), ("img3", MIB)]);
    let m = Mount::start(dir.path(), &back, &[]);
    read_at(&m.path("img"), 0, 4096);
    read_at(&m.path("img3"), 0, 4096);

    let (res, out) = ctl_write_read(&m.ctl("inactivate"), "img\nnope\nimg3\n");
    assert_eq!(
        res,
        Err(libc::ENOENT),
        "write with one unknown image: {out}"
    );
    let r = results(&out);
    assert_eq!(r.len(), 3, "one line per image: {out:?}");
    assert_eq!(r["img"]["result"], "ok", "{out:?}");
    assert_eq!(r["img3"]["result"], "ok", "{out:?}");
    assert_eq!(r["nope"]["result"], "error", "{out:?}");
    assert_eq!(r["nope"]["errno"], "ENOENT", "{out:?}");
    assert_eq!(status_image(&m, "img")["state"], "inactive");
    assert_eq!(status_image(&m, "img3")["state"], "inactive");

    // All good: succeeds, all ok.
    let (res, out) = ctl_write_read(&m.ctl("activate"), "img\nimg3\n");
    assert_eq!(res, Ok(()), "{out}");
    let r = results(&out);
    assert_eq!(r.len(), 2, "{out:?}");
    assert!(r.values().all(|f| f["result"] == "ok"), "{out:?}");
}

#[test]
fn star_applies_to_every_seen_image() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let back = backing_with(dir.path(), &[("img", MIB), ("img3", MIB)]);
    let m = Mount::start(dir.path(), &back, &[]);
    read_at(&m.path("img"), 0, 4096);
    let _h = hold_open_rw(&m.path("img3"));

    let (res, out) = ctl_write_read(&m.ctl("inactivate"), "*\n");
    assert_eq!(res, Ok(()), "inactivate *: {out}\nlog:\n{}", m.log_text());
    let r = results(&out);
    assert!(r.contains_key("img") && r.contains_key("img3"), "{out:?}");
    assert!(r.values().all(|f| f["result"] == "ok"), "{out:?}");
    assert_eq!(status_image(&m, "img")["state"], "inactive");
    assert_eq!(status_image(&m, "img3")["state"], "inactive");

    let (res, out) = ctl_write_read(&m.ctl("activate"), "*\n");
    assert_eq!(res, Ok(()), "activate *: {out}\nlog:\n{}", m.log_text());
    assert_eq!(status_image(&m, "img")["state"], "active");
    assert_eq!(status_image(&m, "img3")["state"], "active");
}

#[test]
fn readback_lines_have_the_documented_format() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let back = backing_with(dir.path(), &[("img", MIB)]);
    let m = Mount::start(dir.path(), &back, &[]);
    read_at(&m.path("img"), 0, 4096);

    for cmd in COMMANDS {
        let (res, out) = ctl_write_read(&m.ctl(cmd), "img\n");
        if cmd == "check" {
            // The backing may hold pages from the read above: check reports them.
            assert!(
                res == Ok(()) || res == Err(libc::EBUSY),
                "check: {res:?} {out}"
            );
        } else {
            assert_eq!(res, Ok(()), "{cmd}: {out}\nlog:\n{}", m.log_text());
        }
        let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{cmd}: one line per image: {out:?}");
        assert!(
            lines[0].starts_with("image=img "),
            "{cmd}: line starts with image=: {out:?}"
        );
        let f = parse_line(lines[0]);
        assert_eq!(f["image"], "img");
        let ok = res.is_ok();
        assert_eq!(
            f["result"],
            if ok { "ok" } else { "error" },
            "{cmd}: {out:?}"
        );
        f["ms"]
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("{cmd}: ms not a number: {out:?}"));
        f["resident_pages"]
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("{cmd}: resident_pages not a number: {out:?}"));
        assert_eq!(
            f.contains_key("errno"),
            !ok,
            "{cmd}: errno only on error: {out:?}"
        );
    }

    let (res, out) = ctl_write_read(&m.ctl("check"), "nope\n");
    assert_eq!(res, Err(libc::ENOENT));
    let f = parse_line(out.lines().next().unwrap_or(""));
    assert_eq!(f["image"], "nope", "{out:?}");
    assert_eq!(f["result"], "error", "{out:?}");
    assert_eq!(f["errno"], "ENOENT", "{out:?}");
}

#[test]
fn ctl_dir_is_hidden_and_cannot_be_changed() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let back = backing_with(dir.path(), &[("img", MIB)]);
    let m = Mount::start(dir.path(), &back, &[]);
    let names = dir_names(&m.mountpoint);
    assert!(names.contains(&"img".to_string()), "{names:?}");
    assert!(
        !names.contains(&".ctl".to_string()),
        ".ctl must be hidden: {names:?}"
    );
    let ls = common::sh(&format!("ls -a '{}'", m.mountpoint.display()));
    assert!(!ls.lines().any(|l| l == ".ctl"), "ls -a shows .ctl: {ls}");

    let ctl = m.mountpoint.join(".ctl");
    assert!(
        fs::metadata(&ctl).unwrap().is_dir(),
        ".ctl must be a directory"
    );
    let files = dir_names(&ctl);
    let mut want: Vec<String> = COMMANDS
        .iter()
        .chain(SETTINGS.iter().map(|s| &s.0))
        .chain(["status"].iter())
        .map(|s| s.to_string())
        .collect();
    want.sort();
    assert_eq!(files, want, "ls .ctl");

    assert!(fs::create_dir(&ctl).is_err(), "mkdir .ctl");
    assert!(fs::remove_dir(&ctl).is_err(), "rmdir .ctl");
    assert!(fs::remove_dir_all(&ctl).is_err(), "rm -r .ctl");
    assert!(fs::rename(&ctl, m.path("x")).is_err(), "rename .ctl");
    fs::create_dir(m.path("d")).unwrap();
    assert!(fs::rename(m.path("d"), &ctl).is_err(), "rename onto .ctl");
    assert!(
        fs::rename(m.path("img"), &ctl).is_err(),
        "rename file onto .ctl"
    );
    assert!(fs::remove_file(m.ctl("status")).is_err(), "rm .ctl/status");
    assert!(
        fs::rename(m.ctl("status"), m.path("s")).is_err(),
        "mv .ctl/status out"
    );
    assert!(File::create(m.ctl("new")).is_err(), "create in .ctl");
    assert!(fs::create_dir(m.ctl("newdir")).is_err(), "mkdir in .ctl");
    assert!(
        fs::hard_link(m.path("img"), m.ctl("img")).is_err(),
        "link into .ctl"
    );
    assert!(
        std::os::unix::fs::symlink("x", &ctl).is_err(),
        "symlink .ctl"
    );

    // Still there, nothing leaked into the backing.
    assert!(fs::metadata(m.ctl("status")).is_ok());
    assert!(fs::metadata(m.path("img")).is_ok());
    assert!(fs::metadata(m.path("d")).unwrap().is_dir());
    assert!(
        !back.join(".ctl").exists(),
        ".ctl must not reach the backing"
    );
    assert!(!back.join("x").exists() && !back.join("s").exists());
}

#[test]
fn ctl_name_option_renames_the_control_directory() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let back = backing_with(dir.path(), &[("img", MIB)]);
    let m = Mount::start(dir.path(), &back, &["--ctl-name", ".migctl"]);
    read_at(&m.path("img"), 0, 4096);
    let ctl = m.mountpoint.join(".migctl");
    assert!(ctl.join("status").exists(), ".migctl/status");
    assert_eq!(
        fs::metadata(m.mountpoint.join(".ctl"))
            .map_err(|e| e.raw_os_error())
            .err(),
        Some(Some(libc::ENOENT)),
        ".ctl must not exist with --ctl-name"
    );
    let names = dir_names(&m.mountpoint);
    assert!(!names.contains(&".migctl".to_string()), "hidden: {names:?}");
    assert_eq!(ctl_write(&ctl.join("inactivate"), "img\n"), Ok(()));
    assert_eq!(
        ctl_write(&ctl.join("activate"), ".migctl\n"),
        Err(libc::EINVAL)
    );

    let out = Command::new(common::BIN)
        .args(["ctl", "--ctl-name", ".migctl"])
        .arg(&m.mountpoint)
        .args(["status", "--json"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json");
    let img = v["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["path"] == "img")
        .cloned()
        .expect("img in status");
    assert_eq!(img["state"], "inactive");
}

#[test]
fn settings_round_trip_and_start_values() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let back = backing_with(dir.path(), &[("img", MIB)]);
    let m = Mount::start(dir.path(), &back, &[]);
    for (file, values, default) in SETTINGS {
        assert_eq!(
            read_text(&m.ctl(file)),
            format!("{default}\n"),
            "default of {file}"
        );
        assert_eq!(
            status(&m)["settings"][file],
            default,
            "status settings.{file}"
        );
        for v in values.iter().chain([default].iter()) {
            assert_eq!(
                ctl_write(&m.ctl(file), &format!("{v}\n")),
                Ok(()),
                "{file} <- {v}"
            );
            assert_eq!(
                read_text(&m.ctl(file)),
                format!("{v}\n"),
                "{file} after writing {v}"
            );
            assert_eq!(status(&m)["settings"][file], *v, "status settings.{file}");
        }
        // Without the newline (echo -n) too.
        let v = values[1];
        assert_eq!(
            ctl_write(&m.ctl(file), v),
            Ok(()),
            "{file} <- {v} (no newline)"
        );
        assert_eq!(read_text(&m.ctl(file)).trim(), v);
        assert_eq!(ctl_write(&m.ctl(file), default), Ok(()));
    }
    drop(m);

    // Start values from the command line.
    let m = Mount::start(
        dir.path(),
        &back,
        &[
            "--check-cache-dropped",
            "off",
            "--drop-cache",
            "off",
            "--fsync-on-close",
            "off",
            "--invalidate-on-open",
            "warn",
            "--sync",
            "fdatasync",
            "--inactive-writes",
            "allow",
        ],
    );
    let want = [
        ("check-cache-dropped", "off"),
        ("drop-cache", "off"),
        ("fsync-on-close", "off"),
        ("invalidate-on-open", "warn"),
        ("sync", "fdatasync"),
        ("inactive-writes", "allow"),
    ];
    for (file, v) in want {
        assert_eq!(read_text(&m.ctl(file)).trim(), v, "--{file} {v}");
    }
    drop(m);

    // And from -o (the fstab form).
    let m = Mount::start(
        dir.path(),
        &back,
        &[
            "-o",
            "sync=fdatasync,inactive-writes=allow,invalidate-on-open=off",
        ],
    );
    assert_eq!(read_text(&m.ctl("sync")).trim(), "fdatasync");
    assert_eq!(read_text(&m.ctl("inactive-writes")).trim(), "allow");
    assert_eq!(read_text(&m.ctl("invalidate-on-open")).trim(), "off");
    assert_eq!(read_text(&m.ctl("drop-cache")).trim(), "on");
}

#[test]
fn status_json_matches_reality() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let back = backing_with(dir.path(), &[("img", MIB)]);
    let m = Mount::start(dir.path(), &back, &["--io", "relay"]);
    let v = status(&m);
    assert!(!v["version"].is_null(), "version: {v}");
    assert!(
        v["passthrough_supported"].is_boolean(),
        "passthrough_supported: {v}"
    );
    for (file, _, default) in SETTINGS {
        assert_eq!(v["settings"][file], default, "settings.{file}: {v}");
    }

    let holder = hold_open_rw(&m.path("img"));
    let pid = holder.0.id() as u64;
    read_at(&m.path("img"), 0, 64 << 10);
    let st = status_image(&m, "img");
    assert_eq!(st["state"], "active", "{st}");
    assert_eq!(st["size"], MIB as u64, "{st}");
    assert!(st["sticky_error"].is_null(), "{st}");
    assert_eq!(st["dirty_pages"], 0, "{st}");
    assert_eq!(st["writeback_pages"], 0, "{st}");
    assert_eq!(
        st["cached_pages"].as_u64(),
        Some(residency(&back.join("img")).cached),
        "cached_pages must match the backing file's page cache: {st}"
    );
    assert!(
        st["counters"]["reads"].as_u64().unwrap_or(0) > 0,
        "counters.reads: {st}"
    );
    assert_eq!(st["fencing"], "full", "relay fencing: {st}");
    let handles = st["open_handles"].as_array().expect("open_handles");
    let h = handles
        .iter()
        .find(|h| h["pid"] == pid)
        .unwrap_or_else(|| panic!("no open handle of holder pid {pid}: {st}"));
    assert_eq!(h["data_path"], "relay", "{st}");
    assert_eq!(h["writable"], true, "{st}");

    // Size changes show up.
    open_rw(&m.path("img")).set_len(3 * MIB as u64).unwrap();
    assert_eq!(status_image(&m, "img")["size"], 3 * MIB as u64);

    assert_eq!(ctl_write(&m.ctl("inactivate"), "img\n"), Ok(()));
    let st = status_image(&m, "img");
    assert_eq!(st["state"], "inactive", "{st}");
    assert_eq!(st["last_command"]["command"], "inactivate", "{st}");
    assert_eq!(st["last_command"]["result"], "ok", "{st}");
    assert!(st["last_command"]["ms"].is_u64(), "{st}");
    assert!(!st["last_command"]["at"].is_null(), "{st}");
    assert!(
        st["counters"]["inactivations"].as_u64().unwrap_or(0) >= 1,
        "{st}"
    );
    assert_eq!(st["cached_pages"], 0, "inactivate dropped the cache: {st}");

    assert_eq!(ctl_write(&m.ctl("activate"), "img\n"), Ok(()));
    let st = status_image(&m, "img");
    assert_eq!(st["state"], "active", "{st}");
    assert!(
        st["counters"]["activations"].as_u64().unwrap_or(0) >= 1,
        "{st}"
    );

    // Handles disappear after the holder exits.
    drop(holder);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = status_image(&m, "img");
        if st["open_handles"].as_array().map(|a| a.is_empty()) == Some(true) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "open_handles not empty after close: {st}"
        );
        sleep(Duration::from_millis(50));
    }
    drop(m);

    // A passthrough mount says so, and that fencing is partial.
    let m = Mount::start(dir.path(), &back, &["--io", "auto"]);
    if status(&m)["passthrough_supported"] == true {
        let _h = hold_open_rw(&m.path("img"));
        let st = status_image(&m, "img");
        let handles = st["open_handles"].as_array().expect("open_handles");
        assert_eq!(handles.len(), 1, "{st}");
        assert_eq!(handles[0]["data_path"], "passthrough", "{st}");
        assert_eq!(st["fencing"], "partial", "{st}");
    }
}

fn check_invalidate_on_open(m: &Mount, back: &Path, name: &str, expect_dropped: bool) {
    let backing = back.join(name);
    cache_whole(&backing);
    let total = residency(&backing).cached;
    assert_eq!(
        total,
        (4 * MIB / 4096) as u64,
        "precondition: {name} fully cached"
    );
    let f = File::open(m.path(name)).unwrap();
    let after = residency(&backing).cached;
    if expect_dropped {
        assert_eq!(
            after,
            0,
            "{name}: first open must drop the backing cache\nlog:\n{}",
            m.log_text()
        );
    } else {
        // Not an exact count: this machine's host reclaims a few clean page
        // cache pages now and then (measured: about 2% of a clean 64 MiB file
        // over 20 s with 23 GiB free), while a drop leaves none.
        assert!(
            after >= total * 9 / 10,
            "{name}: open must not drop the backing cache ({after} of {total} pages left)"
        );
    }
    drop(f);
}

#[test]
fn invalidate_on_open_drops_backing_cache_only_when_on() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let names = ["a.img", "b.img", "c.img", "d.img", "e.img"];
    let files: Vec<(&str, usize)> = names.iter().map(|n| (*n, 4 * MIB)).collect();
    let back = backing_with(dir.path(), &files);
    let m = Mount::start(dir.path(), &back, &[]);

    check_invalidate_on_open(&m, &back, "a.img", true);

    // Not the first open: another handle is open on this host.
    let h = File::open(m.path("d.img")).unwrap();
    check_invalidate_on_open(&m, &back, "d.img", false);
    drop(h);

    // Negative controls: off and warn leave the cache alone.
    assert_eq!(ctl_write(&m.ctl("invalidate-on-open"), "off\n"), Ok(()));
    check_invalidate_on_open(&m, &back, "b.img", false);
    assert_eq!(ctl_write(&m.ctl("invalidate-on-open"), "warn\n"), Ok(()));
    check_invalidate_on_open(&m, &back, "c.img", false);

    // Back on: a later first open drops again.
    assert_eq!(ctl_write(&m.ctl("invalidate-on-open"), "on\n"), Ok(()));
    check_invalidate_on_open(&m, &back, "e.img", true);
    drop(m);

    // Start value off from the command line.
    let m = Mount::start(dir.path(), &back, &["--invalidate-on-open", "off"]);
    check_invalidate_on_open(&m, &back, "a.img", false);
}

#[test]
fn ctl_client_exit_codes_and_json() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let back = backing_with(dir.path(), &[("img", MIB)]);
    let m = Mount::start(dir.path(), &back, &[]);
    read_at(&m.path("img"), 0, 4096);

    let (code, out, err) = ctl_cli(&m, &["inactivate", "img"]);
    assert_eq!(code, 0, "inactivate img: {out}{err}");
    assert!(out.contains("img"), "prints the result: {out:?}");
    assert_eq!(status_image(&m, "img")["state"], "inactive");

    let (code, out, err) = ctl_cli(&m, &["activate", "img", "--json"]);
    assert_eq!(code, 0, "activate img --json: {out}{err}");
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("--json output ({e}): {out:?}"));
    assert!(v.to_string().contains("img"), "{v}");

    let (code, out, err) = ctl_cli(&m, &["activate", "nope"]);
    assert_eq!(code, 1, "unknown image is a failed command: {out}{err}");
    assert!(
        format!("{out}{err}").contains("ENOENT"),
        "names the errno: {out}{err}"
    );
    let (code, out, err) = ctl_cli(&m, &["check", "img", "nope", "--json"]);
    assert_eq!(code, 1, "{out}{err}");
    serde_json::from_str::<serde_json::Value>(&out)
        .unwrap_or_else(|e| panic!("--json output on failure ({e}): {out:?}"));

    let (code, out, err) = ctl_cli(&m, &["status"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.trim().is_empty());
    let (code, out, err) = ctl_cli(&m, &["status", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("status --json");
    assert!(v["images"].is_array(), "{v}");

    let (code, out, err) = ctl_cli(&m, &["set", "sync", "fdatasync"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(read_text(&m.ctl("sync")).trim(), "fdatasync");
    let (code, _, _) = ctl_cli(&m, &["set", "sync", "bogus"]);
    assert_ne!(code, 0, "set sync bogus must fail");
    assert_eq!(read_text(&m.ctl("sync")).trim(), "fdatasync");

    for bad in [
        &["frobnicate", "img"][..],
        &["activate"][..],
        &["set", "sync"][..],
    ] {
        let (code, out, err) = ctl_cli(&m, bad);
        assert_eq!(code, 2, "usage error {bad:?}: {out}{err}");
    }
    let out = Command::new(common::BIN)
        .args(["ctl"])
        .arg(dir.path().join("not-a-mount"))
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "status on a non-mount is an I/O error"
    );
}

/// Every result line of `out` parsed with the protocol's strict parser.
fn strict_lines(out: &str) -> Vec<migsafe::protocol::Fields> {
    out.lines()
        .map(|l| {
            migsafe::protocol::parse_line(l)
                .unwrap_or_else(|e| panic!("read-back line {l:?} is malformed ({e}): {out:?}"))
        })
        .collect()
}

#[test]
fn hostile_file_names_cannot_forge_result_lines() {
    use std::os::unix::ffi::OsStrExt;
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let back = backing_with(dir.path(), &[]);
    let ghost = "zz\nimage=vm1.img result=ok resident_pages=0 ms=0";
    let names: Vec<&[u8]> = vec![
        ghost.as_bytes(),
        b"my disk.img",
        b"quo\"te",
        b"a=b",
        b"back\\slash",
        b"plain.img",
    ];
    for n in &names {
        make_file(&back.join(OsStr::from_bytes(n)), 4096, b'A');
    }
    // Bytes that are not UTF-8: the daemon's name of it is lossy today.
    let raw = OsStr::from_bytes(b"raw\xff.img");
    make_file(&back.join(raw), 4096, b'A');
    let m = Mount::start(dir.path(), &back, &[]);
    let mut holders = Vec::new();
    for n in &names {
        holders.push(hold_open(&m.mountpoint.join(OsStr::from_bytes(n))));
    }
    holders.push(hold_open(&m.mountpoint.join(raw)));

    let (res, out) = ctl_write_read(&m.ctl("inactivate"), "*\n");
    assert_eq!(res, Ok(()), "inactivate *: {out}\nlog:\n{}", m.log_text());
    let lines = strict_lines(&out);
    assert_eq!(lines.len(), names.len() + 1, "one line per image: {out:?}");
    let mut seen: Vec<Vec<u8>> = lines
        .iter()
        .map(|f| f.get("image").expect("image=").to_vec())
        .collect();
    seen.sort();
    assert!(
        !seen.iter().any(|n| n == b"vm1.img"),
        "a ghost line for vm1.img: {out:?}"
    );
    for n in &names {
        assert!(seen.iter().any(|s| s == n), "no line for {n:?}: {out:?}");
    }
    assert!(
        out.contains("image=plain.img result=ok "),
        "safe names stay bare: {out:?}"
    );
    assert!(
        out.contains("image=\"my disk.img\" result=ok "),
        "a name with a space is quoted: {out:?}"
    );
    let lossy: Vec<_> = lines
        .iter()
        .filter(|f| f.get("image_lossy") == Some(b"yes"))
        .collect();
    assert_eq!(
        lossy.len(),
        1,
        "the non-UTF-8 name is flagged lossy: {out:?}"
    );
    for f in &lines {
        assert_eq!(f.get_str("result"), Some("ok"), "{out:?}");
    }

    // Named in a request, with its detail quoted the same way.
    let (res, out) = ctl_write_read(&m.ctl("check"), "my disk.img\nno such\n");
    assert_eq!(res, Err(libc::ENOENT), "{out}");
    let lines = strict_lines(&out);
    assert_eq!(lines.len(), 2, "{out:?}");
    assert_eq!(lines[1].get("image"), Some(&b"no such"[..]), "{out:?}");
    assert_eq!(lines[1].get_str("errno"), Some("ENOENT"), "{out:?}");
    assert!(
        lines[1]
            .get_str("detail")
            .is_some_and(|d| d.contains("no such image")),
        "{out:?}"
    );
    drop(holders);
}
