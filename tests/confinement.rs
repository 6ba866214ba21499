//! migsafe runs as root over shared storage: a path it resolves by itself (a
//! control command's image) must never leave BACKING_DIR, or a symlink planted
//! in an NFS directory would let anyone drop or probe the page cache of any
//! file on the host. And errors of the backing must reach the caller unchanged,
//! because VMMs and scripts act on the errno.

mod common;

use common::*;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Fills the page cache of `p` by reading it, and returns the cached pages.
fn fill_cache(p: &Path) -> u64 {
    let _ = fs::read(p).unwrap();
    let r = residency(p);
    assert!(
        r.cached > 0,
        "reading {} did not cache it: {}",
        p.display(),
        r.json
    );
    r.cached
}

const CTL_ERRNOS: [i32; 3] = [libc::ENOENT, libc::EINVAL, libc::ELOOP];

#[test]
fn symlinks_out_of_backing_never_resolved_by_control_commands() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let backing = dir.path().join("backing");
    let outside = dir.path().join("outside");
    let outdir = dir.path().join("outdir");
    fs::create_dir(&backing).unwrap();
    fs::create_dir(&outdir).unwrap();
    make_file(&outside, 4 << 20, 0x0a);
    make_file(&outdir.join("victim.img"), 4 << 20, 0x0b);
    make_file(&backing.join("inside.img"), 4 << 20, 0x0c);
    std::os::unix::fs::symlink(&outside, backing.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("../outside", backing.join("rel-link")).unwrap();
    std::os::unix::fs::symlink(&outdir, backing.join("dir-link")).unwrap();
    let m = Mount::start(dir.path(), &backing, &[]);

    // Through the mount the kernel resolves symlinks itself, in the caller's
    // namespace: that is normal and must keep working.
    assert_eq!(fs::read_link(m.path("abs-link")).unwrap(), outside);
    assert_eq!(
        fs::read_link(m.path("rel-link")).unwrap(),
        Path::new("../outside")
    );
    assert_eq!(fs::read(m.path("abs-link")).unwrap(), vec![0x0au8; 4 << 20]);

    // Positive control: the same command on an inside image does drop its cache,
    // so "still cached" below means "not touched", not "command is a no-op".
    let _ = fs::read(m.path("inside.img")).unwrap();
    fill_cache(&backing.join("inside.img"));
    let (res, out) = ctl_write_read(&m.ctl("invalidate"), "inside.img\n");
    assert_eq!(
        res,
        Ok(()),
        "invalidate of an inside image failed: {out}\n{}",
        m.log_text()
    );
    let r = residency(&backing.join("inside.img"));
    assert_eq!(
        r.cached, 0,
        "invalidate left the inside image cached: {}",
        r.json
    );

    let cases: [(&str, &Path); 3] = [
        ("abs-link", &outside),
        ("rel-link", &outside),
        ("dir-link/victim.img", &outdir.join("victim.img")),
    ];
    for (name, target) in cases {
        for cmd in ["check", "invalidate", "activate", "inactivate", "flush"] {
            let before = fill_cache(target);
            let (res, out) = ctl_write_read(&m.ctl(cmd), &format!("{name}\n"));
            match res {
                Err(e) if CTL_ERRNOS.contains(&e) => {}
                other => panic!(
                    "`echo {name} > .ctl/{cmd}` must fail with ENOENT/EINVAL/ELOOP, got {other:?}; read-back: {out}\nlog:\n{}",
                    m.log_text()
                ),
            }
            let after = residency(target);
            assert_eq!(
                after.cached,
                before,
                "`{cmd} {name}` changed the page cache of {} outside BACKING_DIR: {}",
                target.display(),
                after.json
            );
        }
    }
    assert_eq!(
        fs::read(&outside).unwrap(),
        vec![0x0au8; 4 << 20],
        "outside file changed"
    );
}

#[test]
fn dotdot_and_absolute_control_paths_are_einval() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let backing = dir.path().join("backing");
    fs::create_dir_all(backing.join("sub")).unwrap();
    make_file(&backing.join("img"), 1 << 20, 1);
    let m = Mount::start(dir.path(), &backing, &[]);
    let _ = fs::read(m.path("img")).unwrap();
    // Positive control: the plain name is a valid request for both commands
    // (invalidate first: check fails with EBUSY while pages are cached).
    assert_eq!(
        ctl_write(&m.ctl("invalidate"), "img\n"),
        Ok(()),
        "invalidate img: {}",
        m.log_text()
    );
    assert_eq!(
        ctl_write(&m.ctl("check"), "img\n"),
        Ok(()),
        "check img: {}",
        m.log_text()
    );

    let abs = m.path("img").display().to_string();
    for body in [
        "../img\n",
        "sub/../img\n",
        "sub/../../backing/img\n",
        "..\n",
        "sub/..\n",
        "/etc/passwd\n",
        &format!("{abs}\n"),
    ] {
        for cmd in ["check", "invalidate"] {
            assert_eq!(
                ctl_write(&m.ctl(cmd), body),
                Err(libc::EINVAL),
                "`{}` written to .ctl/{cmd} must be EINVAL",
                body.trim_end()
            );
        }
    }
}

#[test]
fn eacces_from_backing_reaches_unprivileged_caller() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    // nobody must be able to reach the mountpoint at all, or EACCES proves nothing.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let backing = dir.path().join("backing");
    fs::create_dir(&backing).unwrap();
    fs::set_permissions(&backing, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(backing.join("public"), b"public data\n").unwrap();
    fs::set_permissions(backing.join("public"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(backing.join("secret"), b"secret data\n").unwrap();
    fs::set_permissions(backing.join("secret"), fs::Permissions::from_mode(0o000)).unwrap();
    let m = Mount::start(dir.path(), &backing, &["-o", "allow_other"]);
    let (public, secret) = (m.path("public"), m.path("secret"));
    let (public, secret) = (public.to_str().unwrap(), secret.to_str().unwrap());

    let (ok, out, err) = as_nobody(&["cat", public]);
    assert!(
        ok,
        "control: nobody must read a 0644 file through the mount: {err}"
    );
    assert_eq!(out, "public data\n");

    let (ok, out, err) = as_nobody(&["cat", secret]);
    assert!(
        !ok,
        "nobody read a mode 000 file through the mount: {out:?}"
    );
    assert!(
        err.contains("Permission denied"),
        "expected EACCES, got: {err}"
    );

    let (ok, _, err) = as_nobody(&["sh", "-c", &format!("echo pwned >> '{public}'")]);
    assert!(
        !ok,
        "nobody appended to a root-owned 0644 file through the mount"
    );
    assert!(
        err.contains("Permission denied"),
        "expected EACCES on write, got: {err}"
    );
    assert_eq!(
        fs::read(backing.join("public")).unwrap(),
        b"public data\n",
        "backing changed"
    );

    let (ok, _, err) = as_nobody(&["touch", m.path("newfile").to_str().unwrap()]);
    assert!(
        !ok,
        "nobody created a file in a root-owned 0755 directory through the mount"
    );
    assert!(
        err.contains("Permission denied"),
        "expected EACCES on create, got: {err}"
    );
    assert!(!backing.join("newfile").exists());
}

#[test]
fn enoent_and_enotdir_unchanged() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let backing = dir.path().join("backing");
    fs::create_dir(&backing).unwrap();
    fs::write(backing.join("file"), b"x").unwrap();
    let m = Mount::start(dir.path(), &backing, &[]);
    assert_eq!(
        errno_of(File::open(m.path("missing")), "open missing"),
        libc::ENOENT
    );
    assert_eq!(
        errno_of(fs::metadata(m.path("nodir/x")), "stat in missing dir"),
        libc::ENOENT
    );
    assert_eq!(
        errno_of(File::create(m.path("nodir/x")), "create in missing dir"),
        libc::ENOENT
    );
    assert_eq!(
        errno_of(File::open(m.path("file/x")), "open below a file"),
        libc::ENOTDIR
    );
    assert_eq!(
        errno_of(fs::remove_file(m.path("missing")), "unlink missing"),
        libc::ENOENT
    );
    assert_eq!(
        ctl_write(&m.ctl("check"), "missing.img\n"),
        Err(libc::ENOENT),
        "control command on a missing image"
    );
}

/// Writes through the mount until the small backing is full.
fn fill_until_error(p: &Path) -> (u64, io::Error) {
    let mut f = File::create(p).unwrap();
    let chunk = vec![0x5au8; 64 * 1024];
    let mut written = 0u64;
    for _ in 0..256 {
        if let Err(e) = f.write_all(&chunk) {
            return (written, e);
        }
        written += chunk.len() as u64;
    }
    match f.sync_all() {
        Err(e) => (written, e),
        Ok(()) => panic!("wrote {written} bytes to a 4 MiB filesystem without an error"),
    }
}

#[test]
fn enospc_from_full_backing() {
    if !common::require_root() || !have_tool("mkfs.ext4") {
        return;
    }
    let dir = scratch();
    let img = dir.path().join("small.ext4");
    File::create(&img).unwrap().set_len(4 << 20).unwrap();
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img));
    let lo = LoopDev::attach(&img);
    let fsm = KMount::dev(&lo.path, &dir.path().join("small"));
    for io in ["relay", "passthrough"] {
        let m = Mount::start(dir.path(), &fsm.path, &["--io", io]);
        let (written, e) = fill_until_error(&m.path("fill"));
        assert_eq!(
            e.raw_os_error(),
            Some(libc::ENOSPC),
            "--io {io}: filling the backing through the mount after {written} bytes gave {e}"
        );
        assert!(written > 0, "--io {io}: nothing could be written at all");
        let on_disk = fs::metadata(fsm.path.join("fill")).unwrap().len();
        assert!(
            on_disk >= written,
            "--io {io}: backing has {on_disk} bytes, {written} were accepted"
        );
        fs::remove_file(m.path("fill")).unwrap();
        drop(m);
    }
}

#[test]
fn erofs_from_readonly_backing_and_ro_mount() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("img"), b"read-only data").unwrap();
    fs::create_dir(src.join("sub")).unwrap();
    let ro = dir.path().join("ro");
    let bind = KMount::mount(&["--bind", src.to_str().unwrap()], &ro);
    run(Command::new("mount")
        .args(["-o", "remount,bind,ro"])
        .arg(&bind.path));
    {
        let m = Mount::start(dir.path(), &bind.path, &[]);
        assert_eq!(
            fs::read(m.path("img")).unwrap(),
            b"read-only data",
            "reads still work"
        );
        assert_eq!(
            errno_of(
                OpenOptions::new().write(true).open(m.path("img")),
                "open for write on a ro backing"
            ),
            libc::EROFS
        );
        assert_eq!(
            errno_of(File::create(m.path("new")), "create on a ro backing"),
            libc::EROFS
        );
        assert_eq!(
            errno_of(fs::create_dir(m.path("d")), "mkdir on a ro backing"),
            libc::EROFS
        );
        assert_eq!(
            errno_of(fs::remove_file(m.path("img")), "unlink on a ro backing"),
            libc::EROFS
        );
        assert_eq!(
            errno_of(fs::remove_dir(m.path("sub")), "rmdir on a ro backing"),
            libc::EROFS
        );
        assert_eq!(
            errno_of(
                fs::set_permissions(m.path("img"), fs::Permissions::from_mode(0o600)),
                "chmod on a ro backing"
            ),
            libc::EROFS
        );
    }
    {
        let m = Mount::start(dir.path(), &src, &["-o", "ro"]);
        assert_eq!(fs::read(m.path("img")).unwrap(), b"read-only data");
        assert_eq!(
            errno_of(
                OpenOptions::new().write(true).open(m.path("img")),
                "open for write on -o ro"
            ),
            libc::EROFS
        );
        assert_eq!(
            errno_of(File::create(m.path("new")), "create on -o ro"),
            libc::EROFS
        );
        assert!(!src.join("new").exists());
    }
    assert_eq!(
        fs::read(src.join("img")).unwrap(),
        b"read-only data",
        "backing changed"
    );
}

fn assert_start_fails(res: Result<Mount, String>, must_name: &str, what: &str) {
    match res {
        Ok(m) => panic!("{what}: migsafe mounted anyway:\n{}", m.log_text()),
        Err(msg) => {
            assert!(
                msg.contains("exit status: 1"),
                "{what}: exit status must be 1:\n{msg}"
            );
            assert!(
                msg.contains(must_name),
                "{what}: the message must name `{must_name}`:\n{msg}"
            );
        }
    }
}

#[test]
fn startup_errors_name_the_path() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let missing = dir.path().join("no-such-backing");
    assert_start_fails(
        Mount::try_start(dir.path(), &missing, &[]),
        missing.to_str().unwrap(),
        "missing BACKING_DIR",
    );

    let file = dir.path().join("backing-is-a-file");
    fs::write(&file, b"x").unwrap();
    assert_start_fails(
        Mount::try_start(dir.path(), &file, &[]),
        file.to_str().unwrap(),
        "BACKING_DIR is a file",
    );

    let backing = dir.path().join("backing");
    fs::create_dir(&backing).unwrap();
    let bad_dev = dir.path().join("no-such-device");
    assert_start_fails(
        Mount::try_start(
            dir.path(),
            &backing,
            &["--device", &format!("disk={}", bad_dev.display())],
        ),
        bad_dev.to_str().unwrap(),
        "--device with a missing path",
    );

    // MOUNTPOINT missing: Mount::try_start always creates one, so run it here.
    let nomnt = dir.path().join("no-such-mountpoint");
    let child = Command::new(BIN)
        .arg("mount")
        .arg(&backing)
        .arg(&nomnt)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = ChildGuard(child);
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "migsafe with a missing MOUNTPOINT still runs after 15 s"
        );
        sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(
        status.code(),
        Some(1),
        "exit status with a missing MOUNTPOINT; stderr: {stderr}"
    );
    assert!(
        stderr.contains(nomnt.to_str().unwrap()),
        "the error must name the missing MOUNTPOINT: {stderr}"
    );
}

#[test]
fn device_name_colliding_with_backing_entry_is_an_error() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let img = dir.path().join("dev.img");
    File::create(&img).unwrap().set_len(8 << 20).unwrap();
    let lo = LoopDev::attach(&img);
    let backing = dir.path().join("backing");
    fs::create_dir(&backing).unwrap();
    fs::write(
        backing.join("vmdisk"),
        b"a backing file with the device's name",
    )
    .unwrap();
    let dev = format!("vmdisk={}", lo.path.display());
    assert_start_fails(
        Mount::try_start(dir.path(), &backing, &["--device", &dev]),
        "vmdisk",
        "device name colliding with a backing entry",
    );
    // Control: the same device under a free name mounts.
    let ok = format!("other={}", lo.path.display());
    let m = Mount::start(dir.path(), &backing, &["--device", &ok]);
    assert_eq!(fs::metadata(m.path("other")).unwrap().len(), 8 << 20);
}
