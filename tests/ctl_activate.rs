//! Destination-side safety of `activate` / `check` (docs/DESIGN.md §3):
//! - dirty pages of the image on this host: `activate` fails with EBUSY and
//!   drops nothing (DONTNEED would write them back over the source's data);
//! - another process keeps the image mapped: EBUSY naming that pid;
//! - `check` reports resident byte ranges and drops nothing.

mod common;

use common::{
    ChildGuard, LoopDev, Mount, ctl_write_read, evict, field, hold_open, make_file, read_at,
    read_pages, residency, scratch, status_image,
};
use std::fs::{self};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{ChildStdin, ChildStdout, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
const PAGE: u64 = 4096;

// ---------------------------------------------------------------------------
// Local helpers (not in tests/common).

/// All decimal integers in `s`.
fn numbers(s: &str) -> Vec<u64> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter(|t| !t.is_empty())
        .filter_map(|t| t.parse().ok())
        .collect()
}

/// A python3 process that writes to `dev` without syncing and holds it open;
/// on "sync\n" on its stdin it fsyncs and answers "synced".
struct DirtyWriter {
    _guard: ChildGuard,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl DirtyWriter {
    fn start(dev: &Path, offset: u64, len: usize) -> DirtyWriter {
        let script = r#"
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
os.pwrite(fd, b'D' * int(sys.argv[3]), int(sys.argv[2]))
print('written', flush=True)
for line in sys.stdin:
    if line.strip() == 'sync':
        os.fsync(fd)
        print('synced', flush=True)
"#;
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(dev)
            .arg(offset.to_string())
            .arg(len.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn python3");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let guard = ChildGuard(child);
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "written", "dirty writer did not write");
        DirtyWriter {
            _guard: guard,
            stdin,
            stdout,
        }
    }

    fn sync(&mut self) {
        self.stdin.write_all(b"sync\n").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "synced");
    }
}

// ---------------------------------------------------------------------------

#[test]
fn activate_refuses_when_destination_has_dirty_pages() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let img = dir.path().join("shared.img");
    make_file(&img, 64 * MIB, b'A');
    let loop_b = LoopDev::attach(&img);
    let back = dir.path().join("back-b");
    fs::create_dir(&back).unwrap();
    let dev = format!("disk={}", loop_b.path.display());
    let m2 = Mount::start(dir.path(), &back, &["--device", &dev]);
    let disk = m2.path("disk");
    let _holder = hold_open(&disk);

    // Destination flow step 1: inactivate first; then something caches X.
    let (res, out) = ctl_write_read(&m2.ctl("inactivate"), "disk\n");
    assert_eq!(res, Ok(()), "inactivate: {out}\nlog:\n{}", m2.log_text());
    read_at(&disk, 4 << 20, MIB);

    // A process on this host writes to the device without syncing.
    let mut writer = DirtyWriter::start(&loop_b.path, 16 << 20, MIB);
    let before = residency(&loop_b.path);
    assert!(
        before.dirty > 0,
        "precondition: {} must have dirty pages",
        loop_b.path.display()
    );

    let (res, out) = ctl_write_read(&m2.ctl("activate"), "disk\n");
    assert_eq!(
        res,
        Err(libc::EBUSY),
        "activate with dirty pages must fail with EBUSY; read-back: {out}\nlog:\n{}",
        m2.log_text()
    );
    assert!(out.contains("result=error"), "read-back: {out:?}");
    assert_eq!(
        field(&out, "errno").as_deref(),
        Some("EBUSY"),
        "read-back: {out:?}"
    );
    let after = residency(&loop_b.path);
    assert!(
        after.dirty > 0,
        "failed activate must not write back the dirty pages (dirty {} -> {}, writeback {})",
        before.dirty,
        after.dirty,
        after.writeback
    );
    assert!(
        after.cached >= before.cached,
        "failed activate must drop nothing (cached {} -> {})",
        before.cached,
        after.cached
    );
    let st = status_image(&m2, "disk");
    assert_eq!(
        st["state"], "inactive",
        "failed activate must not change the state: {st}"
    );

    // Control: once the writer has synced, activate succeeds and drops the cache.
    writer.sync();
    assert_eq!(residency(&loop_b.path).dirty, 0);
    let (res, out) = ctl_write_read(&m2.ctl("activate"), "disk\n");
    assert_eq!(
        res,
        Ok(()),
        "activate after sync: {out}\nlog:\n{}",
        m2.log_text()
    );
    assert_eq!(status_image(&m2, "disk")["state"], "active");
}

#[test]
fn activate_refuses_while_another_process_maps_the_image() {
    if !common::require_root() || !common::have_tool("vmtouch") {
        return;
    }
    let dir = scratch();
    let back = dir.path().join("back");
    fs::create_dir(&back).unwrap();
    let backing = back.join("vm.img");
    make_file(&backing, 8 * MIB, b'A');
    let m = Mount::start(dir.path(), &back, &[]);
    // The image is seen by the mount (a VMM opened it once).
    read_at(&m.path("vm.img"), 0, 4096);

    // Another process maps and locks every page of the backing file.
    let vm = Command::new("vmtouch")
        .arg("-l")
        .arg(&backing)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn vmtouch");
    let vm_pid = vm.id();
    let vm = ChildGuard(vm);
    let total = (8 * MIB) as u64 / PAGE;
    let deadline = Instant::now() + Duration::from_secs(10);
    while residency(&backing).cached < total {
        assert!(
            Instant::now() < deadline,
            "vmtouch -l did not load the file"
        );
        sleep(Duration::from_millis(50));
    }
    // Let vmtouch finish mlock (its pid must show the mapping).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fs::read_to_string(format!("/proc/{vm_pid}/maps"))
        .unwrap_or_default()
        .contains("vm.img")
    {
        assert!(Instant::now() < deadline, "vmtouch has not mapped the file");
        sleep(Duration::from_millis(20));
    }

    let (res, out) = ctl_write_read(&m.ctl("activate"), "vm.img\n");
    assert_eq!(
        res,
        Err(libc::EBUSY),
        "activate with a mapped image must fail with EBUSY; read-back: {out}\nlog:\n{}",
        m.log_text()
    );
    assert_eq!(
        field(&out, "errno").as_deref(),
        Some("EBUSY"),
        "read-back: {out:?}"
    );
    let resident: u64 = field(&out, "resident_pages")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no resident_pages in {out:?}"));
    assert!(resident > 0, "resident_pages must be > 0: {out:?}");
    assert!(
        numbers(&out).contains(&(vm_pid as u64)),
        "the result must name the mapping process (vmtouch pid {vm_pid}): {out:?}"
    );

    // Control: without the mapping process the same activate succeeds.
    drop(vm);
    let (res, out) = ctl_write_read(&m.ctl("activate"), "vm.img\n");
    assert_eq!(
        res,
        Ok(()),
        "activate after vmtouch exited: {out}\nlog:\n{}",
        m.log_text()
    );
    assert_eq!(
        residency(&backing).cached,
        0,
        "activate must leave nothing cached"
    );
}

#[test]
fn check_reports_resident_ranges_and_drops_nothing() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let back = dir.path().join("back");
    fs::create_dir(&back).unwrap();
    let backing = back.join("vm.img");
    make_file(&backing, 4 * MIB, b'A');
    let m = Mount::start(dir.path(), &back, &[]);
    read_at(&m.path("vm.img"), 0, 4096);

    // Nothing resident: check passes.
    evict(&backing);
    assert_eq!(residency(&backing).cached, 0, "evict {}", backing.display());
    let (res, out) = ctl_write_read(&m.ctl("check"), "vm.img\n");
    assert_eq!(
        res,
        Ok(()),
        "check with nothing cached: {out}\nlog:\n{}",
        m.log_text()
    );
    assert!(out.contains("result=ok"), "read-back: {out:?}");
    assert_eq!(
        field(&out, "resident_pages").as_deref(),
        Some("0"),
        "read-back: {out:?}"
    );

    // Pages 0-3 and 256-257 (bytes 0..16384 and 1048576..1056768) resident.
    read_pages(&backing, &[0, 1, 2, 3, 256, 257]);
    let before = residency(&backing);
    assert_eq!(before.cached, 6, "precondition: exactly 6 pages resident");

    let (res, out) = ctl_write_read(&m.ctl("check"), "vm.img\n");
    assert_eq!(
        res,
        Err(libc::EBUSY),
        "check with resident pages must fail with EBUSY; read-back: {out}\nlog:\n{}",
        m.log_text()
    );
    assert_eq!(
        field(&out, "resident_pages").as_deref(),
        Some("6"),
        "read-back: {out:?}"
    );
    let n = numbers(&out);
    assert!(
        (n.contains(&16384) || n.contains(&16383))
            && n.contains(&1048576)
            && (n.contains(&1056768) || n.contains(&1056767)),
        "the result must name the resident byte ranges 0-16384 and 1048576-1056768: {out:?}"
    );
    let after = residency(&backing);
    assert_eq!(after.cached, before.cached, "check must drop nothing");
    assert_eq!(
        after.json["files"][0]["resident_ranges"], before.json["files"][0]["resident_ranges"],
        "check must drop nothing"
    );
    let st = status_image(&m, "vm.img");
    assert_eq!(
        st["state"], "active",
        "check must not change the state: {st}"
    );
}
