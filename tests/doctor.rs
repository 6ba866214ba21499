//! `migsafe doctor` on this machine, and with each piece it checks taken
//! away for real in a private mount namespace (invisible to the rest of the
//! host): a /dev/fuse the caller may not open, a fusermount3 or mount.fuse3
//! that is not an executable, a `migsafe` that mount(8)'s helper cannot run.
//! Each shows its line and the exit status; the same run without the change
//! is the control.

mod common;

use common::*;
use std::fs;
use std::path::Path;
use std::process::Command;

/// `migsafe doctor --json` run by `sh -c SETUP; exec doctor` inside a new
/// mount namespace, optionally as uid/gid 4242: (exit code, document).
fn doctor_in_ns(setup: &str, unprivileged: bool) -> (i32, serde_json::Value) {
    let run_as = if unprivileged {
        "setpriv --reuid=4242 --regid=4242 --clear-groups "
    } else {
        ""
    };
    let script = format!("{setup}\nexec {run_as}{BIN} doctor --json");
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-ec", &script])
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json: {e}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), doc)
}

fn line(doc: &serde_json::Value, name: &str) -> serde_json::Value {
    doc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == name)
        .unwrap_or_else(|| panic!("no {name} line: {doc:#}"))
        .clone()
}

fn level(doc: &serde_json::Value, name: &str) -> String {
    line(doc, name)["level"].as_str().unwrap().to_string()
}

fn usable() -> bool {
    require_root() && have_tool("unshare") && have_tool("setpriv") && have_tool("fusermount3")
}

/// This machine: the FUSE pieces are there, so no line fails; every line
/// that is not ok carries a next step; the text form prints the same lines.
#[test]
fn doctor_on_this_machine_passes() {
    if !usable() {
        return;
    }
    let (code, doc) = doctor_in_ns("true", false);
    for name in [
        "kernel",
        "cachestat",
        "dev_fuse",
        "fusermount3",
        "mount.fuse3",
    ] {
        assert_eq!(level(&doc, name), "ok", "{doc:#}");
    }
    for c in doc["checks"].as_array().unwrap() {
        assert_ne!(c["level"], "fail", "{doc:#}");
        if c["level"] != "ok" {
            assert!(c["next"].as_str().is_some_and(|n| !n.is_empty()), "{c:#}");
        }
    }
    assert_eq!(doc["ok"], true);
    assert_eq!(code, 0);
    // QEMU 7.2 (what install-deps.sh installs) has drop-cache, on by default.
    if Path::new("/usr/bin/qemu-system-x86_64").exists() {
        let l = line(&doc, "qemu");
        assert_eq!(l["level"], "ok", "{doc:#}");
        assert!(
            l["what"].as_str().unwrap().contains("drop-cache is on"),
            "{doc:#}"
        );
    }
    // libvirt 9.0 (Debian 12) has no shared_filesystems: --unsafe it is.
    let qemu_conf = fs::read_to_string("/etc/libvirt/qemu.conf").unwrap_or_default();
    if Path::new("/usr/bin/virsh").exists() && !qemu_conf.contains("shared_filesystems") {
        let l = line(&doc, "libvirt");
        assert_eq!(l["level"], "warn", "{doc:#}");
        assert!(l["next"].as_str().unwrap().contains("--unsafe"), "{doc:#}");
    }
    let out = Command::new(BIN).arg("doctor").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().any(|l| l.starts_with("ok   dev_fuse ")),
        "{text}"
    );
    assert_eq!(out.status.code(), Some(0), "{text}");
}

/// A /dev/fuse that the caller may not open (mode 0600, as a host without
/// fuse3's udev rule has it) fails the check for an unprivileged caller,
/// with exit status 1; the control, a 0666 node, passes.
#[test]
fn doctor_fails_on_dev_fuse_without_permission() {
    if !usable() {
        return;
    }
    let dir = scratch();
    let node = |mode: &str| {
        let p = dir.path().join(format!("fuse-{mode}"));
        format!(
            "mknod -m {mode} {p} c 10 229\nmount --bind {p} /dev/fuse",
            p = p.display()
        )
    };
    let (code, doc) = doctor_in_ns(&node("0600"), true);
    let l = line(&doc, "dev_fuse");
    assert_eq!(l["level"], "fail", "{doc:#}");
    assert!(l["what"].as_str().unwrap().contains("uid 4242"), "{doc:#}");
    assert!(
        l["next"].as_str().unwrap().contains("chmod 0666 /dev/fuse"),
        "{doc:#}"
    );
    assert_eq!(code, 1, "{doc:#}");
    assert_eq!(doc["ok"], false);
    // Control: the same caller with a node it may open.
    let (code, doc) = doctor_in_ns(&node("0666"), true);
    assert_eq!(level(&doc, "dev_fuse"), "ok", "{doc:#}");
    assert_eq!(code, 0, "{doc:#}");
}

/// fusermount3 or mount.fuse3 that is not an executable (a plain file laid
/// over it) fails its line and the exit status; the control is the run
/// above on the untouched host.
#[test]
fn doctor_fails_without_fuse3_helpers() {
    if !usable() || !have_tool("mount.fuse3") {
        return;
    }
    let dir = scratch();
    let plain = dir.path().join("plain");
    fs::write(&plain, b"").unwrap();
    for (name, path) in [
        (
            "fusermount3",
            run(Command::new("sh").args(["-c", "command -v fusermount3"])),
        ),
        (
            "mount.fuse3",
            run(Command::new("sh")
                .args(["-c", "PATH=/sbin:/usr/sbin:$PATH command -v mount.fuse3"])),
        ),
    ] {
        let path = fs::canonicalize(path.trim()).unwrap();
        let (code, doc) = doctor_in_ns(
            &format!("mount --bind {} {}", plain.display(), path.display()),
            false,
        );
        let l = line(&doc, name);
        assert_eq!(l["level"], "fail", "{doc:#}");
        assert!(l["next"].as_str().unwrap().contains("fuse3"), "{doc:#}");
        assert_eq!(code, 1, "{doc:#}");
        // Control: the other helper's line is untouched.
        let other = if name == "fusermount3" {
            "mount.fuse3"
        } else {
            "fusermount3"
        };
        assert_ne!(level(&doc, other), "fail", "{doc:#}");
    }
}

/// mount(8)'s helper runs `migsafe` through `/bin/sh` without PATH: with
/// this build laid over /usr/sbin the binary line is ok; with a `migsafe`
/// there that is not executable (or none) it warns, names the next step,
/// and the exit status stays 0 (the unit still works).
#[test]
fn doctor_warns_when_mount8_cannot_find_migsafe() {
    if !usable() {
        return;
    }
    let dir = scratch();
    let good = dir.path().join("good");
    let bad = dir.path().join("bad");
    fs::create_dir(&good).unwrap();
    fs::create_dir(&bad).unwrap();
    fs::copy(BIN, good.join("migsafe")).unwrap();
    fs::write(bad.join("migsafe"), b"").unwrap();
    let overlay = |d: &Path| {
        format!(
            "mount -t overlay overlay -o lowerdir={}:/usr/sbin /usr/sbin",
            d.display()
        )
    };
    let (code, doc) = doctor_in_ns(&overlay(&good), false);
    let l = line(&doc, "binary");
    assert_eq!(l["level"], "ok", "{doc:#}");
    assert!(
        l["what"].as_str().unwrap().contains("/usr/sbin/migsafe"),
        "{doc:#}"
    );
    assert_eq!(code, 0, "{doc:#}");
    let (code, doc) = doctor_in_ns(&overlay(&bad), false);
    let l = line(&doc, "binary");
    assert_eq!(l["level"], "warn", "{doc:#}");
    assert!(l["next"].as_str().unwrap().contains("/usr/sbin"), "{doc:#}");
    assert_eq!(code, 0, "{doc:#}");
}
