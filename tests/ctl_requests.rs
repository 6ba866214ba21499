//! What a command request names: never a piece of a request, always the
//! image's current name, and every image `*` stands for.

mod common;

use common::{Mount, ctl_write, ctl_write_read, make_file, scratch, status};
use std::fs::{self, OpenOptions};
use std::io::{IoSlice, Read, Write};
use std::os::unix::fs::symlink;

fn image_status(m: &Mount, path: &str) -> Option<serde_json::Value> {
    status(m)["images"]
        .as_array()
        .expect("images")
        .iter()
        .find(|i| i["path"] == path)
        .cloned()
}

/// A writev of more segments than the kernel puts in one FUSE write reaches
/// the daemon in pieces. A piece that ends inside a line (`sub/c` of
/// `sub/c.img`) must never be acted on: the request rule is that it ends
/// with a newline.
#[test]
fn a_piece_of_a_split_write_is_never_acted_on() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let back = dir.path().join("back");
    fs::create_dir_all(back.join("sub")).unwrap();
    make_file(&back.join("sub/c.img"), 4096, b'c');
    make_file(&back.join("sub/c"), 4096, b'x');
    let m = Mount::start(dir.path(), &back, &[]);

    // Without its newline a request is refused, with a message that says so.
    let (res, out) = ctl_write_read(&m.ctl("check"), "sub/c.img");
    assert_eq!(res, Err(libc::EINVAL), "{out}");
    assert!(out.contains("newline"), "{out:?}");

    // 600 one-byte segments: "sub/c.img\n" 60 times. Wherever the kernel
    // splits it, a piece ending in "sub/c" must not activate `sub/c`.
    let body = "sub/c.img\n".repeat(60);
    for shift in 0..10 {
        let body = format!("sub/c.img\n{}", &body[shift * 10..]);
        let slices: Vec<IoSlice<'_>> = body.as_bytes().chunks(1).map(IoSlice::new).collect();
        let mut f = OpenOptions::new()
            .write(true)
            .open(m.ctl("activate"))
            .unwrap();
        let res = f.write_vectored(&slices);
        match res {
            Ok(_) => {}
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "writev: {e}"),
        }
    }
    if let Some(st) = image_status(&m, "sub/c") {
        assert!(
            st["last_command"].is_null(),
            "a piece of a request acted on sub/c: {st}"
        );
    }
    assert!(
        !m.log_text().contains("activate sub/c:"),
        "log shows sub/c activated:\n{}",
        m.log_text()
    );
}

/// After `mv sub sub2` on the backing, the image is named by its new path;
/// before anyone names it, `check *` and status still list it, with its
/// error, instead of leaving it out. A symlink to an image does not rename it.
#[test]
fn image_paths_follow_renames_and_star_lists_lost_images() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let back = dir.path().join("back");
    fs::create_dir_all(back.join("sub")).unwrap();
    make_file(&back.join("sub/c.img"), 4096, b'c');
    let m = Mount::start(dir.path(), &back, &[]);
    assert_eq!(ctl_write(&m.ctl("inactivate"), "sub/c.img\n"), Ok(()));

    fs::rename(back.join("sub"), back.join("sub2")).unwrap();
    let (_, out) = ctl_write_read(&m.ctl("check"), "*\n");
    assert!(
        out.lines()
            .any(|l| l.contains("image=sub/c.img") && l.contains("errno=ENOENT")),
        "check * must list the image it can no longer find, with ENOENT: {out:?}"
    );
    let st = image_status(&m, "sub/c.img").expect("status must still list the lost image");
    assert!(st["error"].is_string(), "{st}");

    let (res, out) = ctl_write_read(&m.ctl("activate"), "sub2/c.img\n");
    assert_eq!(res, Ok(()), "activate by the new path: {out}");
    assert!(out.contains("image=sub2/c.img result=ok"), "{out:?}");
    let st = image_status(&m, "sub2/c.img").expect("status under the new path");
    assert_eq!(st["state"], "active", "{st}");
    assert!(st["error"].is_null(), "{st}");
    assert!(image_status(&m, "sub/c.img").is_none());

    symlink("c.img", back.join("sub2/link.img")).unwrap();
    let (res, out) = ctl_write_read(&m.ctl("check"), "sub2/link.img\n");
    assert_eq!(res, Ok(()), "{out}");
    assert!(
        image_status(&m, "sub2/c.img").is_some(),
        "a symlink must not rename the image: {}",
        status(&m)
    );
}

/// A command naming an image the mount has not seen yet through a symlink
/// inside the backing acts on the link's target, and status lists the
/// image by its own name, never the alias. A link created by an
/// unprivileged user works the same, and one leading outside the backing
/// is still refused.
#[test]
fn a_symlink_names_its_target_image() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let back = dir.path().join("back");
    fs::create_dir_all(back.join("sub")).unwrap();
    fs::create_dir_all(back.join("pub")).unwrap();
    // A world-writable sticky directory where an unprivileged user links.
    use std::os::unix::fs::PermissionsExt;
    for (p, mode) in [
        (dir.path(), 0o755),
        (&back, 0o755),
        (&back.join("pub"), 0o1777),
    ] {
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    }
    make_file(&back.join("a.img"), 4096, b'a');
    make_file(&back.join("sub/b.img"), 4096, b'b');
    make_file(&dir.path().join("outside.img"), 4096, b'o');
    symlink("a.img", back.join("alias.img")).unwrap();
    let m = Mount::start(dir.path(), &back, &[]);

    let (res, out) = ctl_write_read(&m.ctl("activate"), "alias.img\n");
    assert_eq!(res, Ok(()), "activate through a symlink: {out}");
    assert!(out.contains("image=a.img result=ok"), "{out:?}");
    let st = image_status(&m, "a.img").expect("status lists the image by its own name");
    assert_eq!(st["state"], "active", "{st}");
    assert!(st["error"].is_null(), "{st}");
    assert!(
        image_status(&m, "alias.img").is_none(),
        "status lists the alias: {}",
        status(&m)
    );
    let (res, out) = ctl_write_read(&m.ctl("inactivate"), "alias.img\n");
    assert_eq!(res, Ok(()), "{out}");
    assert_eq!(image_status(&m, "a.img").unwrap()["state"], "inactive");

    // Linked by an unprivileged user, relative, through a directory.
    let (ok, _, err) = common::as_nobody(&[
        "ln",
        "-s",
        "../sub/b.img",
        &back.join("pub/b-link.img").to_string_lossy(),
    ]);
    assert!(ok, "ln as nobody: {err}");
    let (ok, _, err) = common::as_nobody(&[
        "ln",
        "-s",
        "../../outside.img",
        &back.join("pub/out.img").to_string_lossy(),
    ]);
    assert!(ok, "ln as nobody: {err}");
    let (res, out) = ctl_write_read(&m.ctl("activate"), "pub/b-link.img\n");
    assert_eq!(res, Ok(()), "{out}");
    assert!(out.contains("image=sub/b.img result=ok"), "{out:?}");
    assert!(image_status(&m, "sub/b.img").is_some(), "{}", status(&m));
    assert!(
        image_status(&m, "pub/b-link.img").is_none(),
        "{}",
        status(&m)
    );
    let (res, out) = ctl_write_read(&m.ctl("activate"), "pub/out.img\n");
    assert_eq!(res, Err(libc::EINVAL), "a link leading outside: {out}");
    assert!(out.contains("outside"), "{out:?}");

    // The earlier rule holds: a symlink to a known image does not rename it.
    symlink("a.img", back.join("again.img")).unwrap();
    let (res, out) = ctl_write_read(&m.ctl("activate"), "again.img\n");
    assert_eq!(res, Ok(()), "{out}");
    assert!(image_status(&m, "a.img").is_some(), "{}", status(&m));
}

/// A writev of whole lines, more segments than the kernel puts in one FUSE
/// write: the kernel splits it at segment ends, which are line ends, and
/// every piece runs as a request of its own. Reading the open file back
/// must show the result of every line, not only the last piece's.
#[test]
fn every_line_of_a_writev_split_at_line_ends_has_its_result() {
    if !common::require_root() {
        return;
    }
    const LINES: usize = 1000;
    let dir = scratch();
    let back = dir.path().join("back");
    fs::create_dir_all(&back).unwrap();
    let names: Vec<String> = (0..LINES).map(|i| format!("i{i:04}.img")).collect();
    for n in &names {
        make_file(&back.join(n), 4096, b'i');
    }
    let m = Mount::start(dir.path(), &back, &[]);
    let lines: Vec<String> = names.iter().map(|n| format!("{n}\n")).collect();
    let slices: Vec<IoSlice<'_>> = lines.iter().map(|l| IoSlice::new(l.as_bytes())).collect();
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.ctl("activate"))
        .unwrap();
    let total: usize = lines.iter().map(String::len).sum();
    let n = f.write_vectored(&slices).expect("writev");
    assert_eq!(n, total, "short writev");
    let mut out = String::new();
    f.read_to_string(&mut out).unwrap();
    // The kernel did split it: the daemon logged several requests.
    let requests = m.log_text().matches("activate (").count();
    assert!(
        requests > 1,
        "the writev reached the daemon in one piece, so this test proves nothing; log:\n{}",
        m.log_text()
    );
    let got: Vec<&str> = out.lines().collect();
    assert_eq!(
        got.len(),
        LINES,
        "{requests} pieces: every line's result must be readable, got {} lines, first {:?}",
        got.len(),
        got.first()
    );
    for (line, name) in got.iter().zip(&names) {
        assert!(
            line.starts_with(&format!("image={name} result=ok ")),
            "results in request order: {line:?} for {name}"
        );
    }
    // A read ends one answer: the next write's results replace it.
    f.write_all(b"i0000.img\n").unwrap();
    let mut again = String::new();
    f.read_to_string(&mut again).unwrap();
    assert_eq!(again.lines().count(), 1, "{again:?}");
}

/// Commands on one image run one at a time, in the order their requests
/// reached the daemon: the later arrival decides the final state. Each
/// round starts the first command, waits until the daemon logged its
/// arrival, then sends the second; the first is slowed down (every
/// fadvise of the daemon takes 200 ms under strace) so the two overlap.
/// Run concurrently, `activate` then `inactivate` would end active: the
/// activate, slow in its cache drop, marks the image active after the
/// inactivate has marked it inactive and returned.
#[test]
fn commands_on_one_image_take_effect_in_arrival_order() {
    if !common::require_root() || !common::have_tool("strace") {
        return;
    }
    const ROUNDS: usize = 8;
    let dir = scratch();
    let back = dir.path().join("back");
    fs::create_dir_all(&back).unwrap();
    make_file(&back.join("a.img"), 1 << 20, b'a');
    let m = Mount::start(dir.path(), &back, &[]);
    assert_eq!(ctl_write(&m.ctl("activate"), "a.img\n"), Ok(()));
    let pid = m.pid().expect("daemon pid");
    let strace = common::ChildGuard(
        std::process::Command::new("strace")
            .args(["-f", "-qq", "-o", "/dev/null", "-e", "trace=fadvise64"])
            .args(["-e", "inject=fadvise64:delay_exit=200000", "-p"])
            .arg(pid.to_string())
            .spawn()
            .expect("spawn strace"),
    );
    let traced = || {
        fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with("TracerPid:") && l.trim() != "TracerPid:\t0")
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !traced() {
        assert!(
            std::time::Instant::now() < deadline,
            "strace did not attach"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));

    let arrivals = |m: &Mount| m.log_text().matches(" request #").count();
    for round in 0..ROUNDS {
        let (first, second, expect) = if round % 2 == 0 {
            ("activate", "inactivate", "inactive")
        } else {
            ("inactivate", "activate", "active")
        };
        // Pages of the image in this host's cache: both commands drop them.
        common::read_at(&back.join("a.img"), 0, 1 << 20);
        let before = arrivals(&m);
        let (second_res, second_out, first_res, first_out) = std::thread::scope(|s| {
            let a = s.spawn(|| ctl_write_read(&m.ctl(first), "a.img\n"));
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while arrivals(&m) == before {
                assert!(
                    std::time::Instant::now() < deadline,
                    "round {round}: the daemon never logged the arrival of {first}; log:\n{}",
                    m.log_text()
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            // Control: the two overlap, else this round proves nothing.
            assert!(
                !a.is_finished(),
                "round {round}: {first} returned before {second} was sent"
            );
            let (res, out) = ctl_write_read(&m.ctl(second), "a.img\n");
            let (fres, fout) = a.join().unwrap();
            (res, out, fres, fout)
        });
        assert_eq!(first_res, Ok(()), "round {round}: {first}: {first_out}");
        assert_eq!(second_res, Ok(()), "round {round}: {second}: {second_out}");
        let st = image_status(&m, "a.img").expect("a.img in status");
        assert_eq!(
            st["state"], expect,
            "round {round}: {first} then {second} (arrived last) must leave the image {expect}: {st}"
        );
    }
    let mut strace = strace;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(strace.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = strace.0.wait();
}
