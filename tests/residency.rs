//! `migsafe residency [--evict] [--json] FILE...` (docs/DESIGN.md §4): page-cache
//! figures for files and block devices, checked against util-linux `fincore`
//! for files and against an independent mmap + mincore count for block devices
//! (fincore 2.38 reports size 0 and 0 pages for any block device).

mod common;

use common::{ChildGuard, LoopDev, hold_open, make_file, read_pages, residency, scratch};
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};

const MIB: usize = 1 << 20;
const PAGE: u64 = 4096;

// ---------------------------------------------------------------------------
// Local helpers (not in tests/common).

fn residency_json(args: &[&str], files: &[&Path]) -> serde_json::Value {
    let mut cmd = Command::new(common::BIN);
    cmd.arg("residency").args(args);
    if !args.contains(&"--json") {
        cmd.arg("--json");
    }
    let out = common::run(cmd.args(files));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("residency json ({e}): {out}"))
}

/// (resident pages, size) from `fincore`.
fn fincore(path: &Path) -> (u64, u64) {
    let out = common::run(
        Command::new("fincore")
            .args(["--bytes", "--raw", "--noheadings", "--output", "PAGES,SIZE"])
            .arg(path),
    );
    let v: Vec<u64> = out
        .split_whitespace()
        .map(|t| {
            t.parse()
                .unwrap_or_else(|_| panic!("fincore output {out:?}"))
        })
        .collect();
    assert_eq!(v.len(), 2, "fincore output {out:?}");
    (v[0], v[1])
}

/// Per-page residency with mmap(PROT_READ) + mincore (maps, never faults).
fn mincore_pages(path: &Path, len: u64) -> Vec<bool> {
    let f = File::open(path).unwrap();
    // SAFETY: read-only shared mapping of a valid fd; unmapped below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED, "mmap {}", path.display());
    let n = len.div_ceil(PAGE) as usize;
    let mut vec = vec![0u8; n];
    // SAFETY: addr/len is the mapping above; vec has one byte per page.
    let rc = unsafe { libc::mincore(addr, len as usize, vec.as_mut_ptr()) };
    // SAFETY: unmapping the mapping created above.
    unsafe { libc::munmap(addr, len as usize) };
    assert_eq!(rc, 0, "mincore");
    vec.iter().map(|b| b & 1 == 1).collect()
}

fn ranges_of(pages: &[bool]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, &r) in pages.iter().chain([false].iter()).enumerate() {
        match (r, start) {
            (true, None) => start = Some(i as u64),
            (false, Some(s)) => {
                out.push((s * PAGE, i as u64 * PAGE));
                start = None;
            }
            _ => {}
        }
    }
    out
}

/// The resident_ranges of a residency JSON file entry, as end-exclusive ranges.
/// An end that is one less than a page boundary is read as inclusive.
fn json_ranges(file: &serde_json::Value) -> Vec<(u64, u64)> {
    file["resident_ranges"]
        .as_array()
        .unwrap_or_else(|| panic!("no resident_ranges: {file}"))
        .iter()
        .map(|r| {
            let s = r[0].as_u64().unwrap_or_else(|| panic!("range {r}"));
            let e = r[1].as_u64().unwrap_or_else(|| panic!("range {r}"));
            (s, if e % PAGE == PAGE - 1 { e + 1 } else { e })
        })
        .collect()
}

// ---------------------------------------------------------------------------

#[test]
fn file_figures_agree_with_fincore_and_evict_empties() {
    if !common::require_root() || !common::have_tool("fincore") {
        return;
    }
    let dir = scratch();
    let f = dir.path().join("data.bin");
    make_file(&f, 8 * MIB + 1000, b'A');
    let total = (8 * MIB as u64 + 1000).div_ceil(PAGE);

    let v = residency_json(&["--evict"], &[&f]);
    assert_eq!(
        v["files"][0]["cached_pages"], 0,
        "--evict reports after evicting: {v}"
    );
    assert_eq!(fincore(&f).0, 0, "fincore after --evict");

    // Read 3 MiB at 2 MiB.
    let mut buf = vec![0u8; 3 * MIB];
    File::open(&f)
        .unwrap()
        .read_exact_at(&mut buf, 2 << 20)
        .unwrap();
    let v = residency_json(&["--json"], &[&f]);
    let e = &v["files"][0];
    let (pages, size) = fincore(&f);
    assert_eq!(e["path"], f.to_str().unwrap(), "{e}");
    assert_eq!(e["size"], size, "size vs fincore: {e}");
    assert_eq!(e["total_pages"], total, "{e}");
    assert_eq!(e["cached_pages"], pages, "cached_pages vs fincore: {e}");
    assert!(
        pages >= 768,
        "at least the 3 MiB read are resident: {pages}"
    );
    assert_eq!(e["dirty_pages"], 0, "{e}");
    assert_eq!(e["writeback_pages"], 0, "{e}");

    // Whole file resident.
    let mut all = Vec::new();
    File::open(&f).unwrap().read_to_end(&mut all).unwrap();
    let r = residency(&f);
    assert_eq!(r.cached, total);
    assert_eq!(r.cached, fincore(&f).0);
    // The last page is partial: its range may end at the page or at EOF.
    let got = json_ranges(&r.json["files"][0]);
    assert!(
        got == vec![(0, total * PAGE)] || got == vec![(0, 8 * MIB as u64 + 1000)],
        "whole file resident: {got:?}"
    );

    // Dirty pages are reported as dirty.
    let w = fs::OpenOptions::new().write(true).open(&f).unwrap();
    w.write_all_at(&[b'D'; 8192], 0).unwrap();
    let r = residency(&f);
    assert!(
        r.dirty + r.writeback >= 1,
        "unsynced write must show dirty/writeback pages"
    );
    w.sync_all().unwrap();
    assert_eq!(residency(&f).dirty, 0);

    // --evict empties it (clean pages).
    let v = residency_json(&["--evict", "--json"], &[&f]);
    assert_eq!(v["files"][0]["cached_pages"], 0, "{v}");
    assert_eq!(residency(&f).cached, 0);
    assert_eq!(fincore(&f).0, 0, "fincore agrees after --evict");
}

#[test]
fn loop_device_figures_agree_with_mincore_and_evict_empties() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let img = dir.path().join("lun.img");
    make_file(&img, 16 * MIB, b'A');
    let lo = LoopDev::attach(&img);
    // A block device's cache is dropped at its last close: hold it open.
    let _holder = hold_open(&lo.path);
    common::evict(&lo.path);

    read_pages(&lo.path, &[0, 1, 2, 3, 100, 101]);
    let mut buf = vec![0u8; MIB];
    File::open(&lo.path)
        .unwrap()
        .read_exact_at(&mut buf, 8 << 20)
        .unwrap();

    let v = residency_json(&["--json"], &[&lo.path]);
    let e = &v["files"][0];
    let len = 16 * MIB as u64;
    let mc = mincore_pages(&lo.path, len);
    let mc_count = mc.iter().filter(|&&b| b).count() as u64;
    assert_eq!(e["size"], len, "device size: {e}");
    assert_eq!(e["total_pages"], len / PAGE, "{e}");
    assert_eq!(e["cached_pages"], mc_count, "cached_pages vs mincore: {e}");
    assert!(
        mc_count >= 256 + 6,
        "bed: the reads are resident ({mc_count})"
    );
    let want: Vec<(u64, u64)> = ranges_of(&mc).into_iter().take(16).collect();
    assert_eq!(json_ranges(e), want, "resident_ranges vs mincore: {e}");

    // fincore cannot measure block devices (documents why mincore is used).
    let (fpages, fsize) = fincore(&lo.path);
    eprintln!(
        "fincore on {}: pages={fpages} size={fsize}",
        lo.path.display()
    );

    let v = residency_json(&["--evict", "--json"], &[&lo.path]);
    assert_eq!(v["files"][0]["cached_pages"], 0, "{v}");
    assert!(
        mincore_pages(&lo.path, len).iter().all(|&b| !b),
        "mincore after --evict"
    );
}

#[test]
fn resident_ranges_of_a_sparse_read() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let f = dir.path().join("fresh.bin");
    make_file(&f, MIB, b'A');
    residency_json(&["--evict"], &[&f]);
    assert_eq!(residency(&f).cached, 0, "precondition: evicted");

    read_pages(&f, &[0, 1, 2, 3, 100, 101]);
    let r = residency(&f);
    assert_eq!(r.cached, 6, "{}", r.json);
    assert_eq!(
        json_ranges(&r.json["files"][0]),
        vec![(0, 4 * PAGE), (100 * PAGE, 102 * PAGE)],
        "{}",
        r.json
    );
    assert_eq!(
        ranges_of(&mincore_pages(&f, MIB as u64)),
        vec![(0, 4 * PAGE), (100 * PAGE, 102 * PAGE)],
        "bed: mincore sees the same"
    );
    if common::have_tool("fincore") {
        assert_eq!(fincore(&f).0, 6);
    }

    // Several files in one call, in order.
    let g = dir.path().join("other.bin");
    make_file(&g, 64 << 10, b'B');
    let v = residency_json(&["--json"], &[&f, &g]);
    let files = v["files"].as_array().expect("files");
    assert_eq!(files.len(), 2, "{v}");
    assert_eq!(files[0]["path"], f.to_str().unwrap());
    assert_eq!(files[1]["path"], g.to_str().unwrap());
    assert_eq!(files[0]["cached_pages"], 6);

    // More than 16 ranges: only the first 16 are listed.
    residency_json(&["--evict"], &[&f]);
    let pages: Vec<u64> = (0..40).map(|i| i * 2).collect();
    read_pages(&f, &pages);
    let r = residency(&f);
    assert_eq!(r.cached, 40);
    let got = json_ranges(&r.json["files"][0]);
    let want: Vec<(u64, u64)> = pages
        .iter()
        .take(16)
        .map(|p| (p * PAGE, (p + 1) * PAGE))
        .collect();
    assert_eq!(got, want, "first 16 ranges");
}

#[test]
fn holders_include_fd_and_mmap_users() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let f = dir.path().join("held.bin");
    make_file(&f, MIB, b'A');
    let holder = hold_open(&f);
    let fd_pid = holder.0.id() as u64;

    // A process that only maps the file (its fd is closed after mmap).
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(
            "import mmap,sys,time\n\
             f=open(sys.argv[1],'rb')\n\
             m=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ)\n\
             f.close()\n\
             m[0]\n\
             print('ready',flush=True)\n\
             time.sleep(600)\n",
        )
        .arg(&f)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    let out = child.stdout.take().unwrap();
    let mapper = ChildGuard(child);
    let map_pid = mapper.0.id() as u64;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");

    let v = residency_json(&["--json"], &[&f]);
    let holders = v["files"][0]["holders"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"));
    let h = holders
        .iter()
        .find(|h| h["pid"] == fd_pid)
        .unwrap_or_else(|| panic!("holder pid {fd_pid} (fd) missing: {v}"));
    assert_eq!(h["how"], "fd", "{v}");
    assert_eq!(h["comm"], "sleep", "{v}");
    let h = holders
        .iter()
        .find(|h| h["pid"] == map_pid)
        .unwrap_or_else(|| panic!("holder pid {map_pid} (mmap) missing: {v}"));
    assert_eq!(h["how"], "mmap", "{v}");
    assert!(!h["comm"].as_str().unwrap_or("").is_empty(), "{v}");
    assert!(
        !holders.iter().any(|h| h["pid"] == std::process::id()),
        "the test process does not hold the file: {v}"
    );

    // Control: after they exit, they are no longer listed.
    drop(holder);
    drop(mapper);
    let v = residency_json(&["--json"], &[&f]);
    let holders = v["files"][0]["holders"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        !holders
            .iter()
            .any(|h| h["pid"] == fd_pid || h["pid"] == map_pid),
        "exited processes still listed: {v}"
    );
}

/// `migsafe residency FILE... | head -1`: the closed pipe ends the output
/// quietly (no panic, exit 0); the reader got its first line.
#[test]
fn closed_pipe_ends_output_quietly() {
    let dir = common::scratch();
    let files: Vec<std::path::PathBuf> = (0..3000)
        .map(|i| {
            let p = dir.path().join(format!("f{i}"));
            std::fs::write(&p, b"x").unwrap();
            p
        })
        .collect();
    let mut child = std::process::Command::new(common::BIN)
        .arg("residency")
        .args(&files)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    {
        use std::io::BufRead;
        let mut r = std::io::BufReader::new(child.stdout.take().unwrap());
        r.read_line(&mut first).unwrap();
    } // the read end closes here, before all 3000 reports (more than a pipe holds) are written
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(first.contains("pages cached"), "{first:?}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}

/// On the cached device path the image's one cache is the FUSE inode's:
/// `migsafe residency` of the image through the mount (while a VMM-like
/// holder keeps it open, so no first open drops the cache) reports the
/// pages read there, in agreement with mincore on the same file, and the
/// device underneath holds none of them (its fd is O_DIRECT).
#[test]
fn cached_device_residency_through_the_mount_is_the_fuse_inodes() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let img = dir.path().join("lun.img");
    make_file(&img, 16 * MIB, b'A');
    let lo = LoopDev::attach(&img);
    let back = dir.path().join("back");
    fs::create_dir(&back).unwrap();
    let dev = format!("disk={}", lo.path.display());
    let m = common::Mount::start(dir.path(), &back, &["--device", &dev]);
    let disk = m.path("disk");
    let holder = File::open(&disk).unwrap();
    let mut buf = vec![0u8; MIB];
    let len = 16 * MIB as u64;
    // The first open also queues an asynchronous drop of the inode's
    // attributes and pages, which may land just after a read: read again
    // until the pages stay (a few tries at most).
    for _ in 0..20 {
        holder.read_exact_at(&mut buf, 8 << 20).unwrap();
        if mincore_pages(&disk, len).iter().filter(|&&b| b).count() >= 192 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    let v = residency_json(&["--json"], &[&disk]);
    let e = &v["files"][0];
    let mc = mincore_pages(&disk, len);
    let mc_count = mc.iter().filter(|&&b| b).count() as u64;
    assert!(
        mc_count >= 192,
        "bed: the 1 MiB read is resident in the FUSE inode ({mc_count} pages)"
    );
    assert_eq!(e["cached_pages"], mc_count, "cached_pages vs mincore: {e}");
    let read = (8u64 << 20)..(9u64 << 20);
    let overlaps = |&(s, end): &(u64, u64)| s < read.end && read.start < end;
    assert!(
        json_ranges(e).iter().any(overlaps),
        "residency does not show the read range: {e}"
    );
    // The device's own cache: nothing of the range read through the mount.
    let v = residency_json(&["--json"], &[&lo.path]);
    let on_dev = json_ranges(&v["files"][0]);
    assert!(
        !on_dev.iter().any(overlaps),
        "the device's page cache holds pages read through the cached path: {v}"
    );
    drop(holder);
}
