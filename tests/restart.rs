//! The mount outlives its serving process: `migsafe mount` keeps the FUSE
//! connection (and every fd its workers read on) and starts another serving
//! process when one dies, which takes the connection over with the nodes
//! and handles the kernel holds and asks the kernel to resend what the dead
//! one left unanswered. Each test crashes the serving process for real
//! (SIGKILL of the pid the pid file names) under load; each has a negative
//! control with `--no-restart`, where the same crash ends the mount.

mod common;

use common::*;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

fn sigkill(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::SIGKILL,
    )
    .unwrap();
}

/// SIGKILLs the serving process and waits until another one serves (its
/// "serving ... pid N)" line, logged once it took the connection over).
fn crash_and_wait(m: &Mount) -> u32 {
    let old = m.pid().expect("serving process");
    sigkill(old);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(new) = m.pid()
            && new != old
            && m.log_text().contains(&format!("pid {new})"))
        {
            return new;
        }
        assert!(
            Instant::now() < deadline,
            "no new serving process 20 s after killing {old}:\n{}",
            m.log_text()
        );
        sleep(Duration::from_millis(10));
    }
}

/// fio writing and verifying (crc32c) `file` for `secs` seconds: random 4 KiB
/// writes, each batch read back and checked while writing goes on, an fsync
/// every 32 writes (which reaches the daemon on every data path).
fn fio(file: &Path, direct: bool, secs: u32) -> Child {
    Command::new("fio")
        .current_dir(file.parent().unwrap().parent().unwrap())
        .args([
            "--name=restart",
            "--ioengine=psync",
            "--rw=randwrite",
            "--bs=4k",
            "--size=16m",
            "--verify=crc32c",
            "--verify_backlog=64",
            "--verify_fatal=1",
            "--fsync=32",
            "--time_based",
        ])
        .arg(format!("--runtime={secs}"))
        .arg(format!("--direct={}", direct as u8))
        .arg(format!("--filename={}", file.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fio")
}

/// Waits for fio: (success, its output).
fn fio_result(child: Child) -> (bool, String) {
    let out = child.wait_with_output().expect("wait fio");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // fio reports `err= 0` per job when no I/O failed.
    let job_errors = text.split("err=").skip(1).any(|rest| {
        rest.trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()
            != Some("0")
    });
    let ok = out.status.success() && !text.contains("verify: bad") && !job_errors;
    (ok, text)
}

/// fio on `image` of `m` while its serving process is SIGKILLed `kills`
/// times (each time as soon as the last one's successor serves and fio has
/// done I/O through it). Returns fio's result.
fn fio_under_kills(m: &Mount, image: &str, direct: bool, kills: usize) -> (bool, String) {
    let path = m.path(image);
    let fio = fio(&path, direct, 4 + kills as u32 / 2);
    sleep(Duration::from_millis(1500));
    for _ in 0..kills {
        crash_and_wait(m);
        sleep(Duration::from_millis(300));
    }
    fio_result(fio)
}

fn backing_with(dir: &Path, image: &str) -> PathBuf {
    let back = dir.join("back");
    fs::create_dir(&back).unwrap();
    make_file(&back.join(image), 16 * MIB, 0);
    back
}

fn survives_kills(args: &[&str], direct: bool) {
    if !require_root() || !have_tool("fio") {
        return;
    }
    let dir = scratch();
    let back = backing_with(dir.path(), "vm.img");
    let m = Mount::start(dir.path(), &back, args);
    let (ok, text) = fio_under_kills(&m, "vm.img", direct, 20);
    let log = m.log_text();
    assert!(
        ok,
        "fio failed across 20 crashes of the serving process ({args:?}):\n{text}\n--- log ---\n{log}"
    );
    assert_eq!(
        log.matches("died (signal: 9 (SIGKILL))").count(),
        20,
        "20 crashes, 20 restarts:\n{log}"
    );
    assert!(
        log.contains("restored 1 nodes and 1 open handles"),
        "the new serving process took fio's handle over:\n{log}"
    );
    // Negative control: the same crash without the keeper ends the mount
    // for fio.
    let dir = scratch();
    let back = backing_with(dir.path(), "vm.img");
    let mut control_args = args.to_vec();
    control_args.push("--no-restart");
    let m = Mount::start(dir.path(), &back, &control_args);
    let (ok, text) = fio_under_kills_once(&m, "vm.img", direct);
    assert!(
        !ok && (text.contains("Transport endpoint is not connected")
            || text.contains("Software caused connection abort")),
        "control: without the keeper a crash must fail fio with ENOTCONN/ECONNABORTED:\n{text}"
    );
}

/// The negative control's one crash: the serving process is the mount
/// process itself, so its mount dies with it.
fn fio_under_kills_once(m: &Mount, image: &str, direct: bool) -> (bool, String) {
    let fio = fio(&m.path(image), direct, 5);
    sleep(Duration::from_millis(1500));
    sigkill(m.pid().expect("daemon"));
    let result = fio_result(fio);
    let _ = Command::new("umount").arg("-l").arg(&m.mountpoint).status();
    result
}

#[test]
fn fio_survives_20_crashes_passthrough() {
    survives_kills(&["--io", "passthrough"], false);
}

#[test]
fn fio_survives_20_crashes_relay() {
    survives_kills(&["--io", "relay"], false);
}

#[test]
fn fio_survives_20_crashes_cached_buffered() {
    survives_kills(&["--io", "cached"], false);
}

#[test]
fn fio_survives_20_crashes_cached_direct() {
    survives_kills(&["--io", "cached"], true);
}

#[test]
fn fio_survives_20_crashes_cached_device() {
    if !require_root() || !have_tool("fio") {
        return;
    }
    let dir = scratch();
    let raw = dir.path().join("lun.raw");
    make_file(&raw, 16 * MIB, 0);
    let lun = LoopDev::attach(&raw);
    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let device = format!("disk={}", lun.path.display());
    let m = Mount::start(dir.path(), &empty, &["--device", &device]);
    let (ok, text) = fio_under_kills(&m, "disk", true, 20);
    assert!(
        ok,
        "fio on a cached device failed across 20 crashes:\n{text}\n{}",
        m.log_text()
    );
    drop(m);
    // Control.
    let m = Mount::start(dir.path(), &empty, &["--device", &device, "--no-restart"]);
    let (ok, text) = fio_under_kills_once(&m, "disk", true);
    assert!(
        !ok,
        "control: without the keeper the crash must fail fio:\n{text}"
    );
}

/// A write the dead process had read from the kernel but not answered
/// (held in its backing pwrite by strace) is sent again to the next one,
/// which completes it: the writer sees success and storage has the bytes.
/// Control: without the keeper the writer gets an error.
#[test]
fn a_write_in_flight_at_the_crash_is_resent_and_completes() {
    if !require_root() || !have_tool("strace") {
        return;
    }
    for keeper in [true, false] {
        let dir = scratch();
        let back = backing_with(dir.path(), "vm.img");
        let mut args = vec!["--io", "relay"];
        if !keeper {
            args.push("--no-restart");
        }
        let m = Mount::start(dir.path(), &back, &args);
        let f = open_rw(&m.path("vm.img"));
        let data = vec![0x5a_u8; 64 << 10];
        let pid = m.pid().unwrap();
        let strace = Strace::inject(pid, "pwrite64", "delay_exit=3000000");
        let raw = back.join("vm.img");
        let result = std::thread::scope(|s| {
            let writer = s.spawn(|| f.write_all_at(&data, 4096));
            // The delay is on the syscall's exit: once the bytes are in the
            // backing file, the request is inside the delayed pwrite64,
            // read from the kernel and not answered.
            let deadline = Instant::now() + Duration::from_secs(20);
            while read_at(&raw, 4096, data.len()) != data {
                assert!(
                    Instant::now() < deadline,
                    "the write never reached the backing"
                );
                sleep(Duration::from_millis(5));
            }
            sigkill(pid);
            writer.join().unwrap()
        });
        drop(strace);
        if keeper {
            assert!(
                result.is_ok(),
                "a write in flight at the crash failed: {result:?}\n{}",
                m.log_text()
            );
            let on_storage = fs::read(back.join("vm.img")).unwrap();
            assert!(
                on_storage[4096..4096 + data.len()] == data[..],
                "the resent write's bytes are not on storage"
            );
            assert!(m.log_text().contains("asked the kernel to resend"));
        } else {
            assert!(
                result.is_err(),
                "control: without the keeper the write in flight must fail"
            );
            let _ = Command::new("umount").arg("-l").arg(&m.mountpoint).status();
        }
    }
}

/// An image fenced by `inactivate` stays fenced across a crash of the
/// serving process: a writer that held it open before gets EROFS from the
/// new process, and `status` says inactive. Control: with `--state-file
/// none` the new process does not know the fence (the state file carries
/// it), and the write goes through.
#[test]
fn a_fence_holds_across_a_crash() {
    if !require_root() {
        return;
    }
    for state in [true, false] {
        let dir = scratch();
        let back = backing_with(dir.path(), "vm.img");
        let args: &[&str] = if state {
            &["--io", "relay"]
        } else {
            &["--io", "relay", "--state-file", "none"]
        };
        let m = Mount::start(dir.path(), &back, args);
        let held = open_rw(&m.path("vm.img"));
        let (res, out) = ctl_write_read(&m.ctl("inactivate"), "vm.img\n");
        assert_eq!(res, Ok(()), "inactivate: {out}");
        assert_eq!(
            held.write_at(&[1; 4096], 0)
                .err()
                .and_then(|e| e.raw_os_error()),
            Some(libc::EROFS),
            "fenced before the crash"
        );
        crash_and_wait(&m);
        let after = held
            .write_at(&[2; 4096], 0)
            .err()
            .and_then(|e| e.raw_os_error());
        let phase = status_image(&m, "vm.img")["state"].clone();
        if state {
            assert_eq!(after, Some(libc::EROFS), "the held writer after the crash");
            assert_eq!(
                write_errno(&m.path("vm.img")),
                Some(libc::EROFS),
                "a new writer"
            );
            assert_eq!(phase, "inactive", "status after the crash");
        } else {
            assert_eq!(
                after, None,
                "control: without the state file the fence is gone"
            );
        }
    }
}

/// A walk over 10 000 files, a crash, the walk again, then the kernel
/// drops every cached node: every FORGET names a node the serving process
/// knows, and the keeper's table (what a next process would take over)
/// is back to empty, so no lookup was counted twice or lost.
#[test]
fn lookup_counts_survive_a_crash() {
    if !require_root() {
        return;
    }
    let dir = scratch();
    let back = dir.path().join("back");
    for d in 0..100 {
        let sub = back.join(format!("d{d}"));
        fs::create_dir_all(&sub).unwrap();
        for f in 0..100 {
            File::create(sub.join(format!("f{f}"))).unwrap();
        }
    }
    let m = Mount::start(dir.path(), &back, &["--io", "relay"]);
    let walk = |m: &Mount| {
        let mut n = 0;
        for d in fs::read_dir(&m.mountpoint).unwrap() {
            let d = d.unwrap().path();
            for f in fs::read_dir(&d).unwrap() {
                fs::metadata(f.unwrap().path()).unwrap();
                n += 1;
            }
        }
        n
    };
    assert_eq!(walk(&m), 10_000);
    crash_and_wait(&m);
    let log = m.log_text();
    let taken: usize = log
        .lines()
        .filter(|l| l.contains("taking over the FUSE connection"))
        .filter_map(|l| l.split("restored ").nth(1))
        .filter_map(|r| r.split(' ').next()?.parse().ok())
        .next_back()
        .expect("a restore line");
    assert!(
        taken >= 10_100,
        "the new process took over every node: {taken}\n{log}"
    );
    assert_eq!(walk(&m), 10_000);
    // Every cached node is forgotten now.
    fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
    sleep(Duration::from_millis(500));
    crash_and_wait(&m);
    let log = m.log_text();
    assert!(
        !log.contains("which this daemon does not know"),
        "a FORGET named an unknown node:\n{log}"
    );
    let left: usize = log
        .lines()
        .filter(|l| l.contains("taking over the FUSE connection"))
        .filter_map(|l| l.split("restored ").nth(1))
        .filter_map(|r| r.split(' ').next()?.parse().ok())
        .next_back()
        .unwrap();
    assert!(
        left < 5,
        "after the kernel forgot its nodes, {left} remain counted (lookups counted twice?)"
    );
}

/// `migsafe upgrade` ten times under fio: each time the binary at the
/// keeper's path is replaced by another file (a copy, renamed over it as a
/// package upgrade does), and the keeper starts that file on the same
/// connection; fio sees no error and verifies, and each upgrade reports a
/// new serving process.
#[test]
fn upgrades_under_fio_keep_the_mount() {
    if !require_root() || !have_tool("fio") {
        return;
    }
    let dir = scratch();
    let back = backing_with(dir.path(), "vm.img");
    let installed = dir.path().join("migsafe");
    fs::copy(BIN, &installed).unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let log = dir.path().join("log");
    let keeper = Command::new(&installed)
        .args([
            "mount",
            "--io",
            "relay",
            "--state-file",
            "none",
            "--log-file",
        ])
        .arg(&log)
        .arg(&back)
        .arg(&mnt)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let _guard = ChildGuard(keeper);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("serving")
    {
        assert!(Instant::now() < deadline, "mount not live");
        sleep(Duration::from_millis(20));
    }
    let fio = fio(&mnt.join("vm.img"), false, 12);
    sleep(Duration::from_millis(1000));
    for i in 0..10 {
        let next = dir.path().join(format!("migsafe.new{i}"));
        fs::copy(BIN, &next).unwrap();
        fs::rename(&next, &installed).unwrap();
        let out = Command::new(BIN).arg("upgrade").arg(&mnt).output().unwrap();
        assert!(
            out.status.success(),
            "upgrade {i}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("serving process"));
        sleep(Duration::from_millis(300));
    }
    let (ok, text) = fio_result(fio);
    let log_text = fs::read_to_string(&log).unwrap_or_default();
    assert!(ok, "fio failed across 10 upgrades:\n{text}\n{log_text}");
    assert_eq!(
        log_text.matches("upgrade: starting").count(),
        10,
        "{log_text}"
    );
    umount_retrying(&mnt);
    // Control: a mount without a keeper cannot be upgraded in place, and
    // says so (exit 2) instead of pretending.
    fs::create_dir(dir.path().join("control")).unwrap();
    let back = backing_with(&dir.path().join("control"), "vm.img");
    let m = Mount::start(dir.path(), &back, &["--no-restart"]);
    let out = Command::new(BIN)
        .arg("upgrade")
        .arg(&m.mountpoint)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("without a keeper"),
        "{out:?}"
    );
}

/// The serving child's variable, set by hand or inherited with nonsense:
/// the start fails and names it, instead of mounting as if unset.
#[test]
fn a_malformed_serve_variable_refuses_the_start() {
    if !require_root() {
        return;
    }
    let dir = scratch();
    let back = backing_with(dir.path(), "vm.img");
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    for value in ["garbage", "900,901,902,1,/x"] {
        let mut child = Command::new(BIN)
            .args(["mount", "--state-file", "none"])
            .arg(&back)
            .arg(&mnt)
            .env("MIGSAFE_SERVE", value)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline || is_mounted(&mnt) {
                let _ = Command::new("umount").arg("-l").arg(&mnt).status();
                let _ = child.kill();
                let _ = child.wait();
                panic!("MIGSAFE_SERVE={value}: the start went on and mounted");
            }
            sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert_eq!(status.code(), Some(1), "MIGSAFE_SERVE={value}: {err}");
        assert!(
            err.contains("MIGSAFE_SERVE"),
            "the error names the variable: {err}"
        );
    }
}
