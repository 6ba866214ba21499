//! A restarted daemon remembers which images were fenced and their sticky
//! errors (docs/DESIGN.md §3, "Durability"; one slice of issue 16). Each
//! test crashes a real daemon with SIGKILL, takes its dead mount away and
//! mounts the same backing again with the same `--state-file`.
//!
//! The negative controls run the same steps with `--state-file none`: the
//! restarted daemon then starts every image active, which is what every
//! restart did before the state file existed (then the option did not
//! exist: the control is also the before-fix behaviour).

mod common;

use common::{KMount, Strace};
use common::{Mount, ctl_write_read, make_file, scratch, status, status_image, write_errno};
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

/// SIGKILLs the daemon, then takes its dead mount away and reaps it (the
/// helper's stop: umount, lazily if busy).
fn crash(m: Mount) {
    let pid = m.keeper_pid().expect("daemon pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::SIGKILL,
    )
    .unwrap();
    m.stop();
}

fn backing(dir: &Path) -> PathBuf {
    let back = dir.join("back");
    fs::create_dir(&back).unwrap();
    make_file(&back.join("vm.img"), MIB, 0x11);
    back
}

fn ok(m: &Mount, command: &str, image: &str) {
    let (res, out) = ctl_write_read(&m.ctl(command), &format!("{image}\n"));
    assert_eq!(
        res,
        Ok(()),
        "{command} {image}: {out}\nlog:\n{}",
        m.log_text()
    );
}

/// inactivate, crash, remount: the fence is back (EROFS, `status` says
/// inactive and restored) until `activate`. Passthrough handles bypass the
/// daemon's fencing by design (docs/DESIGN.md §3), so that mount refuses
/// writable opens of inactive images (`strict`), as an operator fencing
/// passthrough does.
/// `fstab_form`: the state file given as `-o state-file=PATH`, as an fstab
/// line or mount(8) passes it.
fn fence_survives_a_crash(io: &str, writes: &str, fstab_form: bool) {
    let dir = scratch();
    let back = backing(dir.path());
    let state = dir.path().join("state").join("mnt.json");
    let state_s = state.to_str().unwrap();
    let option = format!("state-file={state_s}");
    let args = if fstab_form {
        ["--io", io, "--inactive-writes", writes, "-o", &option]
    } else {
        [
            "--io",
            io,
            "--inactive-writes",
            writes,
            "--state-file",
            state_s,
        ]
    };
    let m = Mount::start(dir.path(), &back, &args);
    // Opened (and so known to the mount) before the handover, as a VMM's
    // image is.
    assert_eq!(write_errno(&m.path("vm.img")), None, "active image");
    ok(&m, "inactivate", "vm.img");
    let text = fs::read_to_string(&state).expect("state file written by inactivate");
    assert!(text.contains("\"inactive\""), "{text}");
    let mode = fs::metadata(&state).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    crash(m);
    let before = fs::read(back.join("vm.img")).unwrap();

    let m = Mount::start(dir.path(), &back, &args);
    assert!(
        m.log_text()
            .contains("restored 1 images inactive, 0 sticky errors"),
        "{}",
        m.log_text()
    );
    let st = status_image(&m, "vm.img");
    assert_eq!(st["state"], "inactive", "{st}");
    assert_eq!(st["restored"], true, "{st}");
    assert_eq!(st["last_command"]["result"], "restored at start", "{st}");
    assert_eq!(status(&m)["state_file"], state_s);
    let (code, text, _) = common::ctl_cli(&m, &["status"]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains(&format!("state file: {state_s}"))
            && text.contains("inactivate restored at start"),
        "{text}"
    );
    assert_eq!(
        write_errno(&m.path("vm.img")),
        Some(libc::EROFS),
        "{io}: a write to the image fenced before the crash"
    );
    assert_eq!(fs::read(back.join("vm.img")).unwrap(), before);
    ok(&m, "activate", "vm.img");
    assert_eq!(write_errno(&m.path("vm.img")), None, "after activate");
    let st = status_image(&m, "vm.img");
    assert_eq!(
        (&st["state"], &st["restored"]),
        (&"active".into(), &false.into())
    );
    assert!(!fs::read_to_string(&state).unwrap().contains("vm.img"));
    // activate's update is durable too: a restart now starts it active.
    crash(m);
    let m = Mount::start(dir.path(), &back, &args);
    assert_eq!(
        write_errno(&m.path("vm.img")),
        None,
        "activated before the crash"
    );
    m.stop();

    // Negative control: the same steps without a state file.
    let none = [
        "--io",
        io,
        "--inactive-writes",
        writes,
        "--state-file",
        "none",
    ];
    let m = Mount::start(dir.path(), &back, &none);
    assert_eq!(write_errno(&m.path("vm.img")), None);
    ok(&m, "inactivate", "vm.img");
    assert_eq!(write_errno(&m.path("vm.img")), Some(libc::EROFS));
    assert_eq!(status(&m)["state_file"], serde_json::Value::Null);
    crash(m);
    let m = Mount::start(dir.path(), &back, &none);
    assert_eq!(
        write_errno(&m.path("vm.img")),
        None,
        "{io}: without a state file the fence is forgotten (the bug this fixes)"
    );
    assert_eq!(status_image(&m, "vm.img")["state"], "active");
}

#[test]
fn a_relay_fence_survives_a_crash() {
    if common::require_root() {
        fence_survives_a_crash("relay", "deny", false);
    }
}

#[test]
fn a_passthrough_fence_survives_a_crash() {
    if common::require_root() {
        fence_survives_a_crash("passthrough", "strict", true);
    }
}

fn fsync_errno(path: &Path) -> Option<i32> {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&[b'S'; 4096], 0).unwrap();
    f.sync_data().err().map(|e| e.raw_os_error().unwrap_or(0))
}

/// A sync that failed (EIO injected into the daemon's fdatasync) leaves a
/// sticky error; after a crash and remount it is still there: syncs keep
/// failing until `activate`. The mount syncs images with fdatasync
/// (`--sync fdatasync`) so the injection hits the image's sync and not the
/// state file's own fsync (which would fail the record, logged as an error).
#[test]
fn a_sticky_error_survives_a_crash() {
    if !common::require_root() || !common::have_tool("strace") {
        return;
    }
    let dir = scratch();
    let back = backing(dir.path());
    let state = dir.path().join("state.json");
    for (file, restored) in [(state.to_str().unwrap(), true), ("none", false)] {
        let args = ["--io", "relay", "--sync", "fdatasync", "--state-file", file];
        let m = Mount::start(dir.path(), &back, &args);
        let img = m.path("vm.img");
        assert_eq!(fsync_errno(&img), None, "healthy");
        {
            let _eio = Strace::inject(m.pid().unwrap(), "fdatasync", "error=EIO");
            assert_eq!(fsync_errno(&img), Some(libc::EIO), "injected");
        }
        assert_eq!(fsync_errno(&img), Some(libc::EIO), "sticky");
        assert_eq!(status_image(&m, "vm.img")["sticky_error"], "EIO");
        crash(m);

        let m = Mount::start(dir.path(), &back, &args);
        let img = m.path("vm.img");
        if restored {
            assert!(
                m.log_text()
                    .contains("restored 0 images inactive, 1 sticky errors"),
                "{}",
                m.log_text()
            );
            let st = status_image(&m, "vm.img");
            assert_eq!(
                (&st["sticky_error"], &st["restored"]),
                (&"EIO".into(), &true.into()),
                "{st}"
            );
            assert_eq!(st["state"], "active", "{st}");
            assert_eq!(fsync_errno(&img), Some(libc::EIO), "sticky after restart");
            // The storage is back: this host's dirty pages (the sticky
            // error let no sync through) reach it, then the operator
            // activates.
            fs::File::open(back.join("vm.img"))
                .unwrap()
                .sync_all()
                .unwrap();
            ok(&m, "activate", "vm.img");
            assert_eq!(fsync_errno(&img), None, "after activate");
        } else {
            // Negative control: the error is forgotten, fsync says ok.
            assert_eq!(fsync_errno(&img), None, "without a state file");
            assert_eq!(
                status_image(&m, "vm.img")["sticky_error"],
                serde_json::Value::Null
            );
        }
        m.stop();
    }
}

/// While no daemon ran, the fenced image was renamed away and a new file
/// created at its path: the new file is not the fenced image and must not
/// inherit its fence; the log names the image and why.
#[test]
fn a_replaced_image_is_not_fenced_after_restart() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let back = backing(dir.path());
    let state = dir.path().join("state.json");
    let args = ["--io", "relay", "--state-file", state.to_str().unwrap()];
    let m = Mount::start(dir.path(), &back, &args);
    ok(&m, "inactivate", "vm.img");
    crash(m);
    fs::rename(back.join("vm.img"), back.join("old.img")).unwrap();
    make_file(&back.join("vm.img"), MIB, 0x22);

    let m = Mount::start(dir.path(), &back, &args);
    let log = m.log_text();
    assert!(
        log.contains("image vm.img (inactive) not restored: another file is at its path now"),
        "{log}"
    );
    assert!(
        log.contains("restored 0 images inactive, 0 sticky errors (1 of 1 records dropped)"),
        "{log}"
    );
    assert_eq!(
        write_errno(&m.path("vm.img")),
        None,
        "the new file is not fenced"
    );
    assert_eq!(status_image(&m, "vm.img")["state"], "active");
    // The dropped record is gone from the file.
    assert!(!fs::read_to_string(&state).unwrap().contains("vm.img"));
    m.stop();

    // Control: the record did fence the same file (a restart of the
    // original file keeps the fence, see a_relay_fence_survives_a_crash);
    // here: a fresh fence of the new file is restored.
    let m = Mount::start(dir.path(), &back, &args);
    ok(&m, "inactivate", "vm.img");
    crash(m);
    let m = Mount::start(dir.path(), &back, &args);
    assert_eq!(write_errno(&m.path("vm.img")), Some(libc::EROFS));
}

/// A state file that cannot be trusted refuses the mount, naming the file:
/// starting with every image active would drop fences silently.
#[test]
fn an_untrusted_state_file_refuses_the_mount() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let back = backing(dir.path());
    let state = dir.path().join("state.json");
    let args = ["--io", "relay", "--state-file", state.to_str().unwrap()];
    let set_mode = |mode| {
        fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap()
    };
    for (content, mode, why) in [
        (
            "{\"version\": 1, \"images\": [",
            0o600,
            "not a migsafe state file",
        ),
        (
            "{\"version\": 1, \"images\": [{\"path\": 1}]}",
            0o600,
            "record 0 is malformed",
        ),
        ("{\"version\": 1, \"images\": []}", 0o644, "wider than 0600"),
    ] {
        fs::write(&state, content).unwrap();
        set_mode(mode);
        let e = Mount::try_start(dir.path(), &back, &args)
            .err()
            .unwrap_or_else(|| panic!("a state file {content:?} mode {mode:o} was accepted"));
        assert!(
            e.contains(&format!("state file {}", state.display())) && e.contains(why),
            "{e}"
        );
        assert!(e.contains("remove it"), "the next step: {e}");
    }
    // Control: the same file, valid and 0600, mounts.
    fs::write(&state, "{\"version\": 1, \"images\": []}").unwrap();
    set_mode(0o600);
    Mount::start(dir.path(), &back, &args).stop();
}

/// An inactivate whose fence cannot be recorded (the state file's
/// filesystem went read-only) fails with the errno and names the state
/// file, and the image stays fenced.
#[test]
fn inactivate_fails_when_its_fence_cannot_be_recorded() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let back = backing(dir.path());
    let sdir = dir.path().join("sdir");
    let tmpfs = KMount::tmpfs(&sdir, "1m");
    let state = sdir.join("state.json");
    let args = ["--io", "relay", "--state-file", state.to_str().unwrap()];
    let m = Mount::start(dir.path(), &back, &args);
    make_file(&back.join("other.img"), MIB, 0x33);
    // Control: recording works while the filesystem is writable.
    ok(&m, "inactivate", "other.img");
    common::run(
        Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(&tmpfs.path),
    );
    assert_eq!(write_errno(&m.path("vm.img")), None);
    let (res, out) = ctl_write_read(&m.ctl("inactivate"), "vm.img\n");
    assert_eq!(res, Err(libc::EROFS), "{out}");
    assert!(
        out.contains("errno=EROFS")
            && out.contains(&format!("state file {}", state.display()))
            && out.contains("run inactivate again"),
        "{out}"
    );
    assert_eq!(status_image(&m, "vm.img")["state"], "inactive");
    assert_eq!(write_errno(&m.path("vm.img")), Some(libc::EROFS));
    // One request over several images writes the file once at its end:
    // each image whose fence is not on disk fails, and only those (the
    // fence of other.img is).
    make_file(&back.join("third.img"), MIB, 0x33);
    let (res, out) = ctl_write_read(&m.ctl("inactivate"), "other.img\nvm.img\nthird.img\n");
    assert_eq!(res, Err(libc::EROFS), "{out}");
    let lines: Vec<_> = out.lines().map(common::parse_line).collect();
    let results: Vec<_> = lines
        .iter()
        .map(|l| (l["image"].as_str(), l["result"].as_str()))
        .collect();
    assert_eq!(
        results,
        [
            ("other.img", "ok"),
            ("vm.img", "error"),
            ("third.img", "error")
        ],
        "{out}"
    );
    assert_eq!(status_image(&m, "third.img")["state"], "inactive");
    // Writable again: the same command records the fence and says ok.
    common::run(
        Command::new("mount")
            .args(["-o", "remount,rw"])
            .arg(&tmpfs.path),
    );
    ok(&m, "inactivate", "vm.img");
    assert!(fs::read_to_string(&state).unwrap().contains("vm.img"));
    m.stop();
}

/// The same for a `--device` entry (a LUN on a loop device, cached data
/// path): its record is found again by its name and the device's identity.
/// Control: with `--state-file none` the restarted daemon lets the write
/// through.
#[test]
fn a_device_fence_survives_a_crash() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let raw = dir.path().join("lun.raw");
    make_file(&raw, 4 * MIB, 0x44);
    let lo = common::LoopDev::attach(&raw);
    let back = dir.path().join("empty");
    fs::create_dir(&back).unwrap();
    let device = format!("lun={}", lo.path.display());
    let state = dir.path().join("state.json");
    for (file, fenced) in [(state.to_str().unwrap(), true), ("none", false)] {
        let args = ["--device", &device, "--state-file", file];
        let m = Mount::start(dir.path(), &back, &args);
        ok(&m, "inactivate", "lun");
        assert_eq!(write_errno(&m.path("lun")), Some(libc::EROFS));
        crash(m);
        let m = Mount::start(dir.path(), &back, &args);
        if fenced {
            let st = status_image(&m, "lun");
            assert_eq!(
                (&st["state"], &st["restored"]),
                (&"inactive".into(), &true.into()),
                "{st}"
            );
            assert_eq!(
                write_errno(&m.path("lun")),
                Some(libc::EROFS),
                "restored fence"
            );
            ok(&m, "activate", "lun");
        }
        assert_eq!(write_errno(&m.path("lun")), None, "fenced={fenced}");
        m.stop();
    }
}

/// Mounts BACK on MNT as nobody (uid/gid 65534: fusermount3 needs a user
/// name) (`--io relay`, XDG_RUNTIME_DIR
/// removed, then `xdg` set if given), inactivates vm.img as that user and
/// unmounts; returns the daemon's log. Runs in a private mount namespace
/// with a 0666 /dev/fuse bound over the host's (0600 here): when the script
/// ends (or `timeout` kills the daemon) the namespace and its mount are gone.
fn as_user(dir: &Path, back: &Path, mnt: &Path, xdg: Option<&Path>) -> String {
    let node = dir.join("fuse-node");
    let log = dir.join("user.log");
    let user = "setpriv --reuid=65534 --regid=65534 --clear-groups env -u XDG_RUNTIME_DIR";
    let env = xdg
        .map(|x| format!("XDG_RUNTIME_DIR={}", x.display()))
        .unwrap_or_default();
    let script = format!(
        "rm -f {node}\n\
         mknod -m 0666 {node} c 10 229\n\
         mount --bind {node} /dev/fuse\n\
         {user} {env} RUST_LOG=info timeout 20 {bin} mount --io relay {b} {m} >{log} 2>&1 </dev/null &\n\
         pid=$!\n\
         for i in $(seq 100); do kill -0 $pid 2>/dev/null || break; \
           findmnt -n {m} >/dev/null && break; sleep 0.1; done\n\
         {user} sh -c 'printf \"vm.img\\n\" > {m}/.ctl/inactivate' || echo INACTIVATE-FAILED\n\
         umount {m} 2>/dev/null || true\n\
         wait $pid || true\n\
         cat {log}",
        node = node.display(),
        log = log.display(),
        bin = common::BIN,
        b = back.display(),
        m = mnt.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-ec", &script])
        .output()
        .unwrap();
    let _ = fs::remove_file(&node);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A mount by another user keeps its state file in its
/// `$XDG_RUNTIME_DIR/migsafe/`, owned by it and 0600; without
/// XDG_RUNTIME_DIR it keeps none and says so at start.
#[test]
fn an_unprivileged_mount_keeps_its_state_in_its_runtime_dir() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if !common::require_root() || !common::have_tool("setpriv") || !common::have_tool("unshare") {
        return;
    }
    let dir = scratch();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let back = backing(dir.path());
    for p in [&back, &back.join("vm.img")] {
        std::os::unix::fs::chown(p, Some(65534), Some(65534)).unwrap();
    }
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    std::os::unix::fs::chown(&mnt, Some(65534), Some(65534)).unwrap();
    let xdg = dir.path().join("xdg");
    fs::create_dir(&xdg).unwrap();
    fs::set_permissions(&xdg, fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&xdg, Some(65534), Some(65534)).unwrap();

    let log = as_user(dir.path(), &back, &mnt, None);
    assert!(
        log.contains("no state file: XDG_RUNTIME_DIR is not set")
            && !log.contains("INACTIVATE-FAILED"),
        "{log}"
    );

    let log = as_user(dir.path(), &back, &mnt, Some(&xdg));
    assert!(
        !log.contains("no state file") && log.contains("inactivate (1 targets): ok"),
        "{log}"
    );
    let files: Vec<PathBuf> = fs::read_dir(xdg.join("migsafe"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let canon = fs::canonicalize(&mnt).unwrap();
    let want = Command::new("systemd-escape")
        .arg("--path")
        .arg(&canon)
        .output()
        .unwrap();
    let want = format!("{}.json", String::from_utf8_lossy(&want.stdout).trim());
    assert_eq!(files[0].file_name().unwrap().to_string_lossy(), want);
    let meta = fs::metadata(&files[0]).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (65534, 0o600));
    assert!(fs::read_to_string(&files[0]).unwrap().contains("vm.img"));
}

/// While no daemon ran, the fenced image was deleted and a new file got its
/// inode number at the same path (ext4 gives a freed number to the next
/// file at once): same (dev, ino), another incarnation. It must not inherit
/// the fence. Control: the original file (same incarnation) is fenced, see
/// a_relay_fence_survives_a_crash.
#[test]
fn a_new_file_on_a_reused_inode_number_is_not_fenced() {
    use std::os::unix::fs::MetadataExt;
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let back = backing(dir.path());
    let state = dir.path().join("state.json");
    let args = ["--io", "relay", "--state-file", state.to_str().unwrap()];
    let m = Mount::start(dir.path(), &back, &args);
    ok(&m, "inactivate", "vm.img");
    crash(m);
    let ino = fs::metadata(back.join("vm.img")).unwrap().ino();
    fs::remove_file(back.join("vm.img")).unwrap();
    // Files created until one gets the freed number; it becomes vm.img.
    let mut reused = false;
    for i in 0..50 {
        let p = back.join(format!("n{i}"));
        make_file(&p, MIB, 0x22);
        if fs::metadata(&p).unwrap().ino() == ino {
            fs::rename(&p, back.join("vm.img")).unwrap();
            reused = true;
            break;
        }
    }
    if !reused {
        eprintln!("SKIPPED: the backing filesystem did not reuse inode {ino}");
        return;
    }
    let m = Mount::start(dir.path(), &back, &args);
    let log = m.log_text();
    assert!(
        log.contains("image vm.img (inactive) not restored: a new file got its inode number"),
        "{log}"
    );
    assert_eq!(write_errno(&m.path("vm.img")), None, "the new file");
    assert_eq!(status_image(&m, "vm.img")["state"], "active");
}

/// An inactive image renamed through the mount keeps its record under its
/// new name: after a crash the fence is found there. Control: the state
/// file named the old path before the rename.
#[test]
fn a_fenced_image_renamed_through_the_mount_stays_fenced() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let back = backing(dir.path());
    let state = dir.path().join("state.json");
    let args = ["--io", "relay", "--state-file", state.to_str().unwrap()];
    let m = Mount::start(dir.path(), &back, &args);
    ok(&m, "inactivate", "vm.img");
    assert!(fs::read_to_string(&state).unwrap().contains("\"vm.img\""));
    fs::rename(m.path("vm.img"), m.path("moved.img")).unwrap();
    let text = fs::read_to_string(&state).unwrap();
    assert!(
        text.contains("\"moved.img\"") && !text.contains("\"vm.img\""),
        "{text}"
    );
    crash(m);
    let m = Mount::start(dir.path(), &back, &args);
    assert_eq!(write_errno(&m.path("moved.img")), Some(libc::EROFS));
    assert_eq!(status_image(&m, "moved.img")["state"], "inactive");
}

/// Detaches whatever is mounted on a path on drop.
struct UnmountOnDrop(PathBuf);

impl Drop for UnmountOnDrop {
    fn drop(&mut self) {
        if common::is_mounted(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Removes a file on drop (also when the test panics).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Without `--state-file`, root's mount keeps its state in
/// /run/migsafe-state/, named after the mountpoint as `systemd-escape
/// --path` names it (the name of the unit instance), and restores it.
#[test]
fn root_keeps_its_state_in_run_named_after_the_mountpoint() {
    use std::os::unix::fs::MetadataExt;
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let back = backing(dir.path());
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let escaped = Command::new("systemd-escape")
        .arg("--path")
        .arg(fs::canonicalize(&mnt).unwrap())
        .output()
        .unwrap();
    let state = Path::new("/run/migsafe-state").join(format!(
        "{}.json",
        String::from_utf8_lossy(&escaped.stdout).trim()
    ));
    let _cleanup = RemoveOnDrop(state.clone());
    // Declared before the daemons: dropped after them, it takes a mount a
    // panicking test left (dead once its daemon is killed) away.
    let _unmount = UnmountOnDrop(mnt.clone());
    let serve = || {
        let child = Command::new(common::BIN)
            .args(["mount", "--io", "relay"])
            .arg(&back)
            .arg(&mnt)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let guard = common::ChildGuard(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while !common::is_mounted(&mnt) {
            assert!(Instant::now() < deadline, "mount not live");
            sleep(Duration::from_millis(20));
        }
        guard
    };
    let daemon = serve();
    let (res, out) = ctl_write_read(&mnt.join(".ctl/inactivate"), "vm.img\n");
    assert_eq!(res, Ok(()), "{out}");
    let meta = fs::metadata(&state).expect("state file in /run/migsafe-state");
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o600));
    let st: serde_json::Value =
        serde_json::from_str(&common::read_text(&mnt.join(".ctl/status"))).unwrap();
    assert_eq!(st["state_file"], state.to_str().unwrap());
    drop(daemon); // SIGKILL
    let _ = Command::new("umount").arg("-l").arg(&mnt).status();
    let daemon = serve();
    assert_eq!(write_errno(&mnt.join("vm.img")), Some(libc::EROFS));
    common::umount_retrying(&mnt);
    drop(daemon);
}

/// `n` images of 64 KiB, img00.img.., in a new backing directory.
fn many_images(dir: &Path, n: usize) -> (PathBuf, Vec<String>) {
    let back = dir.join("back");
    fs::create_dir(&back).unwrap();
    let names: Vec<String> = (0..n).map(|i| format!("img{i:02}.img")).collect();
    for name in &names {
        make_file(&back.join(name), 64 << 10, 0x55);
    }
    (back, names)
}

/// Every file of the mount looked up through it (as `ls -l` does), so the
/// mount knows it: `*` names the images the mount has seen.
fn look_up_all(m: &Mount) {
    for e in fs::read_dir(m.path("")).unwrap() {
        e.unwrap().metadata().unwrap();
    }
}

/// The images the state file on disk records inactive (none: no file).
fn recorded_inactive(state: &Path) -> Vec<String> {
    let Ok(text) = fs::read_to_string(state) else {
        return Vec::new();
    };
    let doc: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("state file ({e}): {text}"));
    doc["images"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["phase"] == "inactive")
        .map(|r| r["path"].as_str().unwrap().to_string())
        .collect()
}

/// After a restart: each image's state in `status` and what a write to it
/// gets, all `inactive` and EROFS (`fenced`) or all `active` and ok.
fn assert_all(m: &Mount, names: &[String], fenced: bool, why: &str) {
    look_up_all(m);
    let st = status(m);
    let images = st["images"].as_array().unwrap();
    let (want, errno) = if fenced {
        ("inactive", Some(libc::EROFS))
    } else {
        ("active", None)
    };
    let wrong: Vec<String> = names
        .iter()
        .filter(|name| {
            let state = images.iter().find(|i| i["path"] == name.as_str());
            state.is_none_or(|i| i["state"] != want) || write_errno(&m.path(name)) != errno
        })
        .cloned()
        .collect();
    assert!(
        wrong.is_empty(),
        "{why}: {} of {} images not {want}: {wrong:?}\nlog:\n{}",
        wrong.len(),
        names.len(),
        m.log_text()
    );
}

/// `inactivate *` over many images writes the state file once for all of
/// them (one rename over it, counted with strace; before, every image
/// rewrote it), reports ok only once every fence is in the file, and every
/// fence survives a crash. Negative control: the same steps with
/// `--state-file none` bring every image back active.
#[test]
fn inactivate_all_records_every_fence_in_one_write() {
    if !common::require_root() || !common::have_tool("strace") {
        return;
    }
    const N: usize = 40;
    let dir = scratch();
    let (back, names) = many_images(dir.path(), N);
    let state = dir.path().join("state.json");
    let trace = dir.path().join("renames.trace");
    for (file, recorded) in [(state.to_str().unwrap(), true), ("none", false)] {
        let args = ["--io", "relay", "--state-file", file];
        let m = Mount::start(dir.path(), &back, &args);
        look_up_all(&m);
        let (res, out) = {
            let _trace = Strace::trace(m.pid().unwrap(), "rename,renameat,renameat2", &trace);
            ctl_write_read(&m.ctl("inactivate"), "*\n")
        };
        assert_eq!(res, Ok(()), "{out}");
        assert_eq!(
            out.lines().filter(|l| l.contains(" result=ok ")).count(),
            N,
            "{out}"
        );
        let renames = fs::read_to_string(&trace)
            .unwrap()
            .lines()
            .filter(|l| l.contains(".state.json.tmp"))
            .count();
        let mut on_disk = recorded_inactive(&state);
        on_disk.sort();
        if recorded {
            assert_eq!(renames, 1, "state file rewrites for one `inactivate *`");
            assert_eq!(on_disk, names, "every fence is on disk once ok is read");
        } else {
            assert_eq!((renames, on_disk.len()), (0, 0), "no state file");
        }
        crash(m);
        let m = Mount::start(dir.path(), &back, &args);
        if recorded {
            assert!(
                m.log_text()
                    .contains(&format!("restored {N} images inactive, 0 sticky errors")),
                "{}",
                m.log_text()
            );
        }
        assert_all(
            &m,
            &names,
            recorded,
            if recorded {
                "fenced by `inactivate *` before the crash"
            } else {
                "without a state file every fence is forgotten"
            },
        );
        if recorded {
            // Lifted the same way: one rewrite, and a restart starts them
            // active.
            let (res, out) = {
                let _trace = Strace::trace(m.pid().unwrap(), "rename,renameat,renameat2", &trace);
                ctl_write_read(&m.ctl("activate"), "*\n")
            };
            assert_eq!(res, Ok(()), "{out}");
            let renames = fs::read_to_string(&trace)
                .unwrap()
                .lines()
                .filter(|l| l.contains(".state.json.tmp"))
                .count();
            assert_eq!(renames, 1, "state file rewrites for one `activate *`");
            assert!(recorded_inactive(&state).is_empty());
            crash(m);
            let m = Mount::start(dir.path(), &back, &args);
            assert_all(
                &m,
                &names,
                false,
                "activated by `activate *` before the crash",
            );
            m.stop();
        } else {
            m.stop();
        }
    }
}

/// Runs `command` on `names` from `THREADS` threads at once, each on its
/// own images: one request per image, then one request naming several.
/// After each `inactivate` ok, the state file on disk already records
/// every image of that thread ok'ed so far (ok only once durable).
fn concurrently(m: &Mount, command: &str, names: &[String], state: Option<&Path>) {
    const THREADS: usize = 4;
    let ctl = m.ctl(command);
    std::thread::scope(|s| {
        for mine in names.chunks(names.len().div_ceil(THREADS)) {
            let ctl = &ctl;
            s.spawn(move || {
                let (single, several) = mine.split_at(mine.len() * 2 / 3);
                let requests = single
                    .iter()
                    .map(|n| vec![n.clone()])
                    .chain([several.to_vec()]);
                let mut done: Vec<String> = Vec::new();
                for request in requests {
                    let (res, out) = ctl_write_read(ctl, &format!("{}\n", request.join("\n")));
                    assert_eq!(res, Ok(()), "{command} {request:?}: {out}");
                    assert_eq!(
                        out.lines().filter(|l| l.contains(" result=ok ")).count(),
                        request.len(),
                        "{out}"
                    );
                    done.extend(request);
                    if let (Some(state), "inactivate") = (state, command) {
                        let on_disk = recorded_inactive(state);
                        let missing: Vec<_> =
                            done.iter().filter(|n| !on_disk.contains(n)).collect();
                        assert!(
                            missing.is_empty(),
                            "ok, but not in the state file: {missing:?}"
                        );
                    }
                }
            });
        }
    });
}

/// Commands running at the same time on different images share the state
/// file and lose none of each other's records: 4 threads inactivate 15
/// images each, SIGKILL, restart: every image is inactive; the same for
/// activating them all, then inactivating them again. Negative control:
/// with `--state-file none` the concurrently fenced images come back
/// active.
#[test]
fn concurrent_commands_lose_no_record() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let (back, names) = many_images(dir.path(), 60);
    let state = dir.path().join("state.json");
    let args = ["--io", "relay", "--state-file", state.to_str().unwrap()];
    let mut m = Mount::start(dir.path(), &back, &args);
    for (command, fenced) in [
        ("inactivate", true),
        ("activate", false),
        ("inactivate", true),
    ] {
        concurrently(&m, command, &names, Some(&state));
        crash(m);
        m = Mount::start(dir.path(), &back, &args);
        assert_all(
            &m,
            &names,
            fenced,
            &format!("{command} from 4 threads, then a crash"),
        );
    }
    m.stop();

    let none = ["--io", "relay", "--state-file", "none"];
    let m = Mount::start(dir.path(), &back, &none);
    concurrently(&m, "inactivate", &names, None);
    crash(m);
    let m = Mount::start(dir.path(), &back, &none);
    assert_all(
        &m,
        &names,
        false,
        "without a state file concurrent fences are forgotten",
    );
    m.stop();
}
