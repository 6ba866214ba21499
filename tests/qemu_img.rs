//! QEMU's own image tools on the mount, in each data path: they use the calls
//! a VMM uses (O_DIRECT alignment probing, OFD locks, fallocate, SEEK_DATA,
//! PUNCH_HOLE for discard), so a gap in any of them shows up here first.

mod common;

use common::*;
use std::fs;
use std::path::Path;
use std::process::{Command, Output};

/// stdout and stderr of a finished command, for assertions and messages.
fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs qemu-io with `args`; panics (with the daemon log) unless it exits 0
/// and every pattern check passed.
fn qemu_io_ok(m: &Mount, args: &[&str], img: &Path) -> String {
    let out = qemu_io(args, img);
    let t = text(&out);
    assert!(
        out.status.success() && !t.contains("Pattern verification failed"),
        "qemu-io {args:?} {} failed ({}):\n{t}\n--- migsafe log ---\n{}",
        img.display(),
        out.status,
        m.log_text()
    );
    t
}

/// Runs qemu-io with `args` on `img`, whatever its exit status.
fn qemu_io(args: &[&str], img: &Path) -> Output {
    Command::new("qemu-io")
        .args(args)
        .arg(img)
        .output()
        .expect("spawn qemu-io")
}

/// Runs `qemu-img compare a b`, whatever its exit status.
fn qemu_img_compare(a: &Path, b: &Path) -> Output {
    Command::new("qemu-img")
        .arg("compare")
        .arg(a)
        .arg(b)
        .output()
        .unwrap()
}

/// Runs `qemu-img check`; panics unless it finds no errors (`when` is for the
/// message).
fn qemu_img_check(img: &Path, when: &str) {
    let out = run(Command::new("qemu-img").arg("check").arg(img));
    assert!(
        out.contains("No errors were found"),
        "qemu-img check {when}:\n{out}"
    );
}

fn region(p: &Path, off: usize, len: usize) -> Vec<u8> {
    read_at(p, off as u64, len)
}

fn check(io: &str) {
    if !have_tool("qemu-img") || !have_tool("qemu-io") {
        return;
    }
    let dir = scratch();
    let backing = dir.path().join("backing");
    fs::create_dir(&backing).unwrap();
    let m = Mount::start(dir.path(), &backing, &["--io", io]);
    let img = m.path("x.qcow2");
    let raw = m.path("x.raw");

    run(Command::new("qemu-img")
        .args(["create", "-f", "qcow2"])
        .arg(&img)
        .arg("64M"));
    qemu_img_check(&img, "of a new image");

    let t = qemu_io_ok(
        &m,
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "read -P 0xab 0 1M",
        ],
        &img,
    );
    assert!(t.contains("wrote 1048576/1048576 bytes at offset 0"), "{t}");
    assert!(t.contains("read 1048576/1048576 bytes at offset 0"), "{t}");

    // Negative control: the pattern check does fail on wrong data.
    let out = qemu_io(&["-f", "qcow2", "-c", "read -P 0xee 0 1M"], &img);
    assert!(
        text(&out).contains("Pattern verification failed"),
        "reading 0xab with pattern 0xee must fail verification:\n{}",
        text(&out)
    );

    // cache=none: QEMU opens with O_DIRECT and probes the alignment.
    let t = qemu_io_ok(
        &m,
        &[
            "-f",
            "qcow2",
            "--cache=none",
            "-c",
            "write -P 0xcd 2M 1M",
            "-c",
            "read -P 0xcd 2M 1M",
            "-c",
            "read -P 0xab 0 1M",
        ],
        &img,
    );
    assert!(
        t.contains("wrote 1048576/1048576 bytes at offset 2097152"),
        "{t}"
    );

    let t = qemu_io_ok(
        &m,
        &[
            "-f",
            "qcow2",
            "-t",
            "writeback",
            "-c",
            "write -P 0xef 4M 64k",
            "-c",
            "read -P 0xef 4M 64k",
            "-c",
            "read -P 0xcd 2M 1M",
        ],
        &img,
    );
    assert!(
        t.contains("wrote 65536/65536 bytes at offset 4194304"),
        "{t}"
    );

    qemu_img_check(&img, "after writes");

    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&img)
        .arg(&raw));
    let out = qemu_img_compare(&img, &raw);
    assert!(
        out.status.success(),
        "qemu-img compare through the mount:\n{}",
        text(&out)
    );
    assert!(
        text(&out).contains("Images are identical"),
        "{}",
        text(&out)
    );

    // The bytes really are in the backing, checked without QEMU.
    let braw = backing.join("x.raw");
    assert_eq!(
        fs::metadata(&braw).unwrap().len(),
        64 << 20,
        "raw image size in the backing"
    );
    assert!(
        region(&braw, 0, 1 << 20).iter().all(|&b| b == 0xab),
        "0xab region in the backing"
    );
    assert!(
        region(&braw, 1 << 20, 1 << 20).iter().all(|&b| b == 0),
        "unwritten region in the backing"
    );
    assert!(
        region(&braw, 2 << 20, 1 << 20).iter().all(|&b| b == 0xcd),
        "0xcd region in the backing"
    );
    assert!(
        region(&braw, 4 << 20, 64 << 10).iter().all(|&b| b == 0xef),
        "0xef region in the backing"
    );
    let out = qemu_img_compare(&backing.join("x.qcow2"), &braw);
    assert!(
        out.status.success(),
        "qemu-img compare on the backing files:\n{}",
        text(&out)
    );

    // Discard with unmap on the raw image punches a hole through the mount.
    qemu_io_ok(
        &m,
        &[
            "-f",
            "raw",
            "-d",
            "unmap",
            "-c",
            "write -z -u 0 1M",
            "-c",
            "read -P 0 0 1M",
            "-c",
            "read -P 0xcd 2M 1M",
        ],
        &raw,
    );
    assert!(
        region(&braw, 0, 1 << 20).iter().all(|&b| b == 0),
        "zeroed region in the backing"
    );
    let out = qemu_img_compare(&img, &raw);
    assert_eq!(
        out.status.code(),
        Some(1),
        "images must differ after zeroing the raw copy:\n{}",
        text(&out)
    );

    let log = m.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("x.qcow2") && l.contains(&format!("data path={io}"))),
        "log does not say x.qcow2 used data path={io}:\n{log}"
    );
}

#[test]
fn qemu_tools_relay() {
    if !common::require_root() {
        return;
    }
    check("relay");
}

#[test]
fn qemu_tools_passthrough() {
    if !common::require_root() {
        return;
    }
    check("passthrough");
}
