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
use std::process::Command;

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
