//! fio with crc32c verification through the mount, in each data path, buffered
//! and O_DIRECT, small and large blocks: the workload shapes a VMM produces.
//! Each run is verified twice: by fio in the same job through the mount, and
//! by a second fio (`verify_only`) reading the backing file or device
//! directly, so data that only looks right through the mount is caught too.

mod common;

use common::*;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;

fn job_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/fio/verify.fio")
}

/// Runs examples/fio/verify.fio over 64 MiB of `file`; panics with fio's output and the
/// daemon log when fio fails.
fn fio(m: &Mount, file: &Path, bs: &str, direct: bool, verify_only: bool) {
    // fio may drop state files into its working directory: keep them in scratch.
    let out = Command::new("fio")
        .current_dir(m.mountpoint.parent().unwrap())
        .arg(job_file())
        .env("FILENAME", file)
        .env("SIZE", "64m")
        .env("BS", bs)
        .env("DIRECT", if direct { "1" } else { "0" })
        .env("VERIFY_ONLY", if verify_only { "1" } else { "0" })
        .output()
        .expect("spawn fio");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        panic!(
            "fio (file={} bs={bs} direct={direct} verify_only={verify_only}) failed with {}:\n{text}\n--- migsafe log ---\n{}",
            file.display(),
            out.status,
            m.log_text()
        );
    }
    assert!(
        !text.contains("verify: bad"),
        "fio reported a verify failure:\n{text}"
    );
    // The whole file must have been written and read back (not cut short by
    // the runtime bound, not skipped by a job file that did nothing).
    let io_of = |kind: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(kind))
            .and_then(|l| l.split("io=").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .map(str::to_owned)
    };
    assert_eq!(
        io_of("READ:").as_deref(),
        Some("64.0MiB"),
        "fio verified a different amount:\n{text}"
    );
    if !verify_only {
        assert_eq!(
            io_of("WRITE:").as_deref(),
            Some("64.0MiB"),
            "fio wrote a different amount:\n{text}"
        );
    }
}

/// fio writes and verifies `through` (a file of mount `m`), then a second fio
/// only verifies `direct` (the same data read from the backing file or device
/// itself).
fn fio_and_verify(m: &Mount, through: &Path, direct_path: &Path, bs: &str, direct: bool) {
    fio(m, through, bs, direct, false);
    fio(m, direct_path, bs, direct, true);
}

fn check_dir_backing(io: &str, bs: &str, direct: bool) {
    if !have_tool("fio") {
        return;
    }
    let dir = scratch();
    let backing = dir.path().join("backing");
    fs::create_dir(&backing).unwrap();
    let m = Mount::start(dir.path(), &backing, &["--io", io]);
    fio_and_verify(&m, &m.path("fio.img"), &backing.join("fio.img"), bs, direct);
    let log = m.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("fio.img") && l.contains(&format!("data path={io}"))),
        "log does not say fio.img used data path={io}:\n{log}"
    );
}

#[test]
fn relay_4k_buffered() {
    if !common::require_root() {
        return;
    }
    check_dir_backing("relay", "4k", false);
}

#[test]
fn relay_4k_direct() {
    if !common::require_root() {
        return;
    }
    check_dir_backing("relay", "4k", true);
}

#[test]
fn relay_1m_buffered() {
    if !common::require_root() {
        return;
    }
    check_dir_backing("relay", "1m", false);
}

#[test]
fn relay_1m_direct() {
    if !common::require_root() {
        return;
    }
    check_dir_backing("relay", "1m", true);
}

#[test]
fn passthrough_4k_buffered() {
    if !common::require_root() {
        return;
    }
    check_dir_backing("passthrough", "4k", false);
}

#[test]
fn passthrough_4k_direct() {
    if !common::require_root() {
        return;
    }
    check_dir_backing("passthrough", "4k", true);
}

#[test]
fn passthrough_1m_buffered() {
    if !common::require_root() {
        return;
    }
    check_dir_backing("passthrough", "1m", false);
}

#[test]
fn passthrough_1m_direct() {
    if !common::require_root() {
        return;
    }
    check_dir_backing("passthrough", "1m", true);
}

#[test]
fn device_64k_direct() {
    if !common::require_root() || !have_tool("fio") {
        return;
    }
    let dir = scratch();
    let img = dir.path().join("disk.img");
    File::create(&img).unwrap().set_len(64 << 20).unwrap();
    let lo = LoopDev::attach(&img);
    let backing = dir.path().join("backing");
    fs::create_dir(&backing).unwrap();
    let dev = format!("disk={}", lo.path.display());
    let m = Mount::start(dir.path(), &backing, &["--device", &dev]);
    fio_and_verify(&m, &m.path("disk"), &lo.path, "64k", true);
}
