//! The two-host beds of docs/DESIGN.md §1/§5: the same storage seen by two migsafe
//! mounts ("host A" = source, "host B" = destination), each with its own page
//! cache of the image.
//!
//! - Loop bed: one image file, two loop devices over it, `--device disk=LOOP`
//!   on each mount (SAN LUN model).
//! - mergerfs bed: two mergerfs `cache.files=full` mounts of one directory, a
//!   migsafe mount over each (NFS model), once per data-path pairing
//!   (the cached path of regular files included).
//!
//! Every test asserts the negative control (the destination reads stale data
//! when nobody activates) before asserting that `activate` fixes it.

mod common;

use common::{
    KMount, LoopBed, Mount, ctl_write_read, hold_open, make_file, pin_cached, read_at, read_direct,
    residency, scratch, status_image, write_at_sync,
};
use std::fs;
use std::path::Path;

const MIB: usize = 1 << 20;
/// Block X: 1 MiB at offset 4 MiB.
const X: u64 = 4 << 20;

// ---------------------------------------------------------------------------
// Local helpers (not in tests/common).

fn all(buf: &[u8], byte: u8) -> bool {
    buf.iter().all(|&b| b == byte)
}

fn describe(buf: &[u8]) -> String {
    let a = buf.iter().filter(|&&b| b == b'A').count();
    let b = buf.iter().filter(|&&b| b == b'B').count();
    format!("{} bytes: {a} x 'A' (old), {b} x 'B' (new)", buf.len())
}

/// `activate` of `image` on the destination mount `m2`; then `disk2` (the
/// image through it) reads the new data at X and the old data elsewhere.
fn activate_destination(m2: &Mount, image: &str, disk2: &Path) {
    let (res, out) = ctl_write_read(&m2.ctl("activate"), &format!("{image}\n"));
    assert_eq!(
        res,
        Ok(()),
        "activate on destination: {out}\nlog:\n{}",
        m2.log_text()
    );
    assert!(out.contains("result=ok"), "activate read-back: {out:?}");
    let after = read_at(disk2, X, MIB);
    assert!(all(&after, b'B'), "after activate: {}", describe(&after));
    // Data outside X is untouched.
    assert!(all(&read_at(disk2, 0, 4096), b'A'));
}

// ---------------------------------------------------------------------------

#[test]
fn loop_bed_destination_reads_stale_until_activate() {
    if !common::require_root() {
        return;
    }
    loop_bed("relay");
}

/// The cached device path: the one cache is the FUSE inode's, so that is
/// where the stale block sits and what inactivate/activate must drop.
#[test]
fn loop_bed_cached_destination_reads_stale_until_activate() {
    if !common::require_root() {
        return;
    }
    loop_bed("cached");
}

fn loop_bed(device_io: &str) {
    let io = ["--device-io", device_io];
    let bed = LoopBed::new(64, &io, &io);
    let (m1, m2, loop_a, loop_b) = (&bed.a, &bed.b, &bed.loop_a, &bed.loop_b);
    let disk1 = m1.path("disk");
    let disk2 = m2.path("disk");
    assert_eq!(fs::metadata(&disk2).unwrap().len(), 64 * MIB as u64);
    // Where each host caches the image: the device's page cache (relay) or
    // the FUSE inode's (cached, whose device fd is O_DIRECT).
    let (cache_a, cache_b) = if device_io == "cached" {
        (disk1.clone(), disk2.clone())
    } else {
        (loop_a.path.clone(), loop_b.path.clone())
    };

    // Each host's VMM holds the image open (keeps its cache alive, and makes
    // `migsafe residency`'s open of the FUSE file a later open, which keeps
    // the FUSE cache it measures).
    let _holder = hold_open(&disk2);
    let _source_vmm = hold_open(&disk1);

    // Destination reads X early: it lands in the destination's cache.
    let before = read_at(&disk2, X, MIB);
    assert!(all(&before, b'A'), "initial read: {}", describe(&before));
    // Held in the destination's cache until the negative control has read
    // it (common/pin.rs: the kernel may reclaim it meanwhile).
    let pin = pin_cached(&cache_b, X, MIB);
    let rb = residency(&cache_b);
    assert!(
        rb.cached >= (MIB / 4096) as u64,
        "precondition: block X must be cached in {} (cached={})",
        cache_b.display(),
        rb.cached
    );
    if device_io == "cached" {
        assert_eq!(
            residency(&loop_b.path).cached,
            0,
            "cached path: the device's own page cache must hold nothing"
        );
    }

    // Source writes X (with fsync) and inactivates.
    write_at_sync(&disk1, X, &vec![b'B'; MIB]);
    let held = pin_cached(&cache_a, X, MIB);
    assert!(
        residency(&cache_a).cached >= (MIB / 4096) as u64,
        "precondition: the source caches what it wrote in {}",
        cache_a.display()
    );
    // Unmapped before inactivate, which must drop these pages.
    drop(held);
    let (res, out) = ctl_write_read(&m1.ctl("inactivate"), "disk\n");
    assert_eq!(
        res,
        Ok(()),
        "inactivate on source: {out}\nlog:\n{}",
        m1.log_text()
    );
    assert!(out.contains("result=ok"), "inactivate read-back: {out:?}");
    let ra = residency(&cache_a);
    assert_eq!(ra.dirty, 0, "source still has dirty pages after inactivate");
    assert_eq!(
        ra.writeback, 0,
        "source still has writeback pages after inactivate"
    );
    assert_eq!(
        ra.cached, 0,
        "inactivate must drop the source's cached pages"
    );
    assert_eq!(status_image(m1, "disk")["state"], "inactive");

    // The new data is on the shared storage (read around loopB's cache).
    let on_storage = read_direct(&loop_b.path, X, MIB);
    assert!(
        all(&on_storage, b'B'),
        "O_DIRECT read of loopB: {}",
        describe(&on_storage)
    );

    // NEGATIVE CONTROL: without activate the destination reads stale data.
    let stale = read_at(&disk2, X, MIB);
    assert!(
        all(&stale, b'A'),
        "NEGATIVE CONTROL FAILED: destination did not read stale data before activate \
         ({}); the bed proves nothing",
        describe(&stale)
    );
    drop(pin);

    // Activate on the destination: now the new data.
    activate_destination(m2, "disk", &disk2);
    assert_eq!(status_image(m2, "disk")["state"], "active");

    // A failed migration re-activates the source: that must work too.
    let (res, out) = ctl_write_read(&m1.ctl("activate"), "disk\n");
    assert_eq!(
        res,
        Ok(()),
        "re-activate source: {out}\nlog:\n{}",
        m1.log_text()
    );
    assert_eq!(status_image(m1, "disk")["state"], "active");
    assert!(all(&read_at(&disk1, X, MIB), b'B'));
}

/// The NFS-like bed: `src_io` on the source mount, `dst_io` on the destination.
fn mergerfs_bed(src_io: &str, dst_io: &str) {
    let dir = scratch();
    let shared = dir.path().join("nfs");
    fs::create_dir(&shared).unwrap();
    make_file(&shared.join("disk.img"), 16 * MIB, b'A');
    let host_a = KMount::mergerfs(&shared, &dir.path().join("host-a"));
    let host_b = KMount::mergerfs(&shared, &dir.path().join("host-b"));
    let m1 = Mount::start(dir.path(), &host_a.path, &["--io", src_io]);
    let m2 = Mount::start(dir.path(), &host_b.path, &["--io", dst_io]);
    let disk1 = m1.path("disk.img");
    let disk2 = m2.path("disk.img");
    let backing_a = host_a.path.join("disk.img");
    let backing_b = host_b.path.join("disk.img");

    // Where each host caches the image: the backing's page cache (the
    // mergerfs mount's, as an NFS client's), or the FUSE inode's for cached,
    // whose backing fd is O_DIRECT.
    let cache_of = |io: &str, disk: &Path, backing: &Path| {
        if io == "cached" {
            disk.to_path_buf()
        } else {
            backing.to_path_buf()
        }
    };
    let cache_a = cache_of(src_io, &disk1, &backing_a);
    let cache_b = cache_of(dst_io, &disk2, &backing_b);

    // Both VMMs hold the image open (and `migsafe residency`'s own open of
    // a FUSE file is then a later open, which keeps the cache it measures).
    let _holder = hold_open(&disk2);
    let _source_vmm = hold_open(&disk1);
    let before = read_at(&disk2, X, MIB);
    assert!(all(&before, b'A'), "initial read: {}", describe(&before));
    // Held until the negative control has read it (common/pin.rs).
    let pin = pin_cached(&cache_b, X, MIB);
    let rb = residency(&cache_b);
    assert!(
        rb.cached >= (MIB / 4096) as u64,
        "precondition: block X must be cached in {} (cached={})",
        cache_b.display(),
        rb.cached
    );
    if dst_io == "cached" {
        assert_eq!(
            residency(&backing_b).cached,
            0,
            "cached path: the backing's page cache must hold nothing of the image"
        );
        // `check` reports what the destination holds: the FUSE inode's pages.
        let (res, out) = ctl_write_read(&m2.ctl("check"), "disk.img\n");
        assert_eq!(res, Err(libc::EBUSY), "check on the destination: {out}");
        assert!(
            out.contains("FUSE page cache") && !out.contains("resident_pages=0 "),
            "check must name the FUSE inode's resident pages: {out}"
        );
    }
    let log2 = m2.log_text();
    assert!(
        log2.contains(&format!("data path={dst_io}")),
        "destination must use the {dst_io} data path; log:\n{log2}"
    );

    write_at_sync(&disk1, X, &vec![b'B'; MIB]);
    let log1 = m1.log_text();
    assert!(
        log1.contains(&format!("data path={src_io}")),
        "source must use the {src_io} data path; log:\n{log1}"
    );
    let (res, out) = ctl_write_read(&m1.ctl("inactivate"), "disk.img\n");
    assert_eq!(
        res,
        Ok(()),
        "inactivate on source: {out}\nlog:\n{}",
        m1.log_text()
    );
    let ra = residency(&backing_a);
    assert_eq!(ra.dirty, 0, "source still has dirty pages after inactivate");
    assert_eq!(
        ra.writeback, 0,
        "source still has writeback pages after inactivate"
    );
    assert_eq!(status_image(&m1, "disk.img")["state"], "inactive");
    if src_io == "cached" {
        let fa = residency(&cache_a);
        assert_eq!(
            (fa.cached, fa.dirty, fa.writeback),
            (0, 0, 0),
            "inactivate must drop the source's FUSE inode pages"
        );
        assert_eq!(ra.cached, 0, "the source's backing cache holds nothing");
    }

    // The shared directory has the new data.
    let on_storage = read_direct(&shared.join("disk.img"), X, MIB);
    assert!(
        all(&on_storage, b'B'),
        "shared storage: {}",
        describe(&on_storage)
    );

    // NEGATIVE CONTROL.
    let stale = read_at(&disk2, X, MIB);
    assert!(
        all(&stale, b'A'),
        "NEGATIVE CONTROL FAILED on the mergerfs bed ({src_io} -> {dst_io}): the destination \
         did not read stale data before activate ({}); the bed proves nothing",
        describe(&stale)
    );
    drop(pin);

    if dst_io == "cached" {
        // invalidate alone drops and verifies the FUSE inode's pages.
        let (res, out) = ctl_write_read(&m2.ctl("invalidate"), "disk.img\n");
        assert_eq!(res, Ok(()), "invalidate on the destination: {out}");
        let fb = residency(&cache_b);
        assert_eq!(
            fb.cached, 0,
            "invalidate must drop the destination's FUSE inode pages"
        );
        let (res, out) = ctl_write_read(&m2.ctl("check"), "disk.img\n");
        assert_eq!(res, Ok(()), "check after invalidate: {out}");
    }
    activate_destination(&m2, "disk.img", &disk2);
    if dst_io == "cached" {
        let handles = status_image(&m2, "disk.img")["open_handles"].clone();
        assert!(
            handles
                .as_array()
                .is_some_and(|v| !v.is_empty() && v.iter().all(|h| h["data_path"] == "cached")),
            "status must list the destination's handles as cached: {handles}"
        );
    }
}

#[test]
fn mergerfs_bed_relay_to_passthrough() {
    if !common::require_root() || !common::have_tool("mergerfs") {
        return;
    }
    mergerfs_bed("relay", "passthrough");
}

#[test]
fn mergerfs_bed_passthrough_to_relay() {
    if !common::require_root() || !common::have_tool("mergerfs") {
        return;
    }
    mergerfs_bed("passthrough", "relay");
}

/// The cached path on both hosts: the stale block sits in the destination's
/// FUSE inode, and that is what inactivate drops on the source and activate
/// drops on the destination.
#[test]
fn mergerfs_bed_cached_to_cached() {
    if !common::require_root() || !common::have_tool("mergerfs") {
        return;
    }
    mergerfs_bed("cached", "cached");
}

#[test]
fn mergerfs_bed_relay_to_cached() {
    if !common::require_root() || !common::have_tool("mergerfs") {
        return;
    }
    mergerfs_bed("relay", "cached");
}
