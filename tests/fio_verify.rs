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

/// How fio covers the file: `jobs` jobs of `mib` MiB / `jobs` each, one
/// after the other from byte `offset`.
#[derive(Clone, Copy)]
struct Layout {
    mib: u32,
    jobs: u32,
    offset: u64,
}

const ONE_JOB: Layout = Layout {
    mib: 64,
    jobs: 1,
    offset: 0,
};

/// Runs examples/fio/verify.fio over 64 MiB (or the layout's size) of `file`; panics with fio's output and the
/// daemon log when fio fails.
fn fio(m: &Mount, file: &Path, bs: &str, direct: bool, verify_only: bool) {
    fio_jobs(m, file, bs, direct, verify_only, ONE_JOB)
}

fn fio_jobs(m: &Mount, file: &Path, bs: &str, direct: bool, verify_only: bool, at: Layout) {
    // fio may drop state files into its working directory: keep them in scratch.
    let out = Command::new("fio")
        .current_dir(m.mountpoint.parent().unwrap())
        .arg(job_file())
        .env("FILENAME", file)
        .env("SIZE", format!("{}m", at.mib / at.jobs))
        .env("JOBS", at.jobs.to_string())
        .env("OFFSET", at.offset.to_string())
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
            "fio (file={} bs={bs} direct={direct} verify_only={verify_only} jobs={} offset={}) failed with {}:\n{text}\n--- migsafe log ---\n{}",
            file.display(),
            at.jobs,
            at.offset,
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
    let whole = format!("{}.0MiB", at.mib);
    assert_eq!(
        io_of("READ:").as_deref(),
        Some(whole.as_str()),
        "fio verified a different amount:\n{text}"
    );
    if !verify_only {
        assert_eq!(
            io_of("WRITE:").as_deref(),
            Some(whole.as_str()),
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
    check_dir_backing_jobs(io, bs, direct, ONE_JOB)
}

fn check_dir_backing_jobs(io: &str, bs: &str, direct: bool, at: Layout) {
    if !have_tool("fio") {
        return;
    }
    let dir = scratch();
    let backing = dir.path().join("backing");
    fs::create_dir(&backing).unwrap();
    let m = Mount::start(dir.path(), &backing, &["--io", io]);
    fio_jobs(&m, &m.path("fio.img"), bs, direct, false, at);
    fio_jobs(&m, &backing.join("fio.img"), bs, direct, true, at);
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

/// Four jobs at once, each in its own quarter of the file.
const FOUR_JOBS: Layout = Layout {
    mib: 64,
    jobs: 4,
    offset: 0,
};

#[test]
fn cached_4k_buffered() {
    if !common::require_root() {
        return;
    }
    check_dir_backing_jobs("cached", "4k", false, FOUR_JOBS);
}

#[test]
fn cached_4k_direct() {
    if !common::require_root() {
        return;
    }
    check_dir_backing_jobs("cached", "4k", true, FOUR_JOBS);
}

#[test]
fn cached_1m_buffered() {
    if !common::require_root() {
        return;
    }
    check_dir_backing_jobs("cached", "1m", false, FOUR_JOBS);
}

#[test]
fn cached_1m_direct() {
    if !common::require_root() {
        return;
    }
    check_dir_backing_jobs("cached", "1m", true, FOUR_JOBS);
}

/// 512-byte buffered writes 100 bytes off every block boundary: each one
/// is a read-modify-write of two blocks, and the jobs' neighbouring ranges
/// share a block.
#[test]
fn cached_512_unaligned_buffered() {
    if !common::require_root() {
        return;
    }
    check_dir_backing_jobs(
        "cached",
        "512",
        false,
        Layout {
            mib: 16,
            jobs: 4,
            offset: 100,
        },
    );
}

/// The NFS stand-in (a mergerfs `cache.files=full` mount) takes O_DIRECT
/// without reporting an alignment, so the cached path keeps it and aligns
/// to 4096: the same unaligned 512-byte writes are read-modify-writes of
/// 4 KiB blocks there. Verified again in the directory under mergerfs.
#[test]
fn cached_on_mergerfs_512_unaligned_buffered() {
    if !common::require_root() || !have_tool("fio") || !have_tool("mergerfs") {
        return;
    }
    let dir = scratch();
    let shared = dir.path().join("nfs");
    fs::create_dir(&shared).unwrap();
    let host = KMount::mergerfs(&shared, &dir.path().join("host"));
    let m = Mount::start(dir.path(), &host.path, &["--io", "cached"]);
    let at = Layout {
        mib: 16,
        jobs: 2,
        offset: 100,
    };
    fio_jobs(&m, &m.path("fio.img"), "512", false, false, at);
    fio_jobs(&m, &shared.join("fio.img"), "512", false, true, at);
    let log = m.log_text();
    assert!(
        log.lines().any(|l| l.contains("fio.img")
            && l.contains("data path=cached")
            && l.contains("dio_align=4096")),
        "fio.img on mergerfs must use the cached path aligned to 4096:\n{log}"
    );
    assert!(
        !log.contains("data path=relay"),
        "mergerfs takes O_DIRECT: no fallback to relay expected:\n{log}"
    );
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

/// A write-back device (`--writeback on`): fio jobs
/// writing buffered (into this host's cache, written back later) and fio
/// jobs writing `O_DIRECT` at the same time on ranges of their own, each
/// verified through the mount, then every range verified again on the
/// device itself with `O_DIRECT` once the writers closed the file (a close
/// writes the inode's dirty pages back).
fn device_writeback_mixed(bs: &str) {
    let dir = scratch();
    let img = dir.path().join("disk.img");
    File::create(&img).unwrap().set_len(64 << 20).unwrap();
    let lo = LoopDev::attach(&img);
    let backing = dir.path().join("backing");
    fs::create_dir(&backing).unwrap();
    let dev = format!("disk={}", lo.path.display());
    let m = Mount::start(
        dir.path(),
        &backing,
        &["--device", &dev, "--writeback", "on"],
    );
    assert_eq!(
        common::status(&m)["data_paths"]["writeback"],
        true,
        "{}",
        m.log_text()
    );
    let buffered = Layout {
        mib: 32,
        jobs: 4,
        offset: 0,
    };
    let direct = Layout {
        mib: 32,
        jobs: 4,
        offset: 32 << 20,
    };
    let disk = m.path("disk");
    std::thread::scope(|s| {
        s.spawn(|| fio_jobs(&m, &disk, bs, false, false, buffered));
        s.spawn(|| fio_jobs(&m, &disk, bs, true, false, direct));
    });
    fio_jobs(&m, &lo.path, bs, true, true, buffered);
    fio_jobs(&m, &lo.path, bs, true, true, direct);
}

#[test]
fn device_writeback_4k_buffered_and_direct() {
    if !common::require_root() || !have_tool("fio") {
        return;
    }
    device_writeback_mixed("4k");
}

#[test]
fn device_writeback_1m_buffered_and_direct() {
    if !common::require_root() || !have_tool("fio") {
        return;
    }
    device_writeback_mixed("1m");
}
