//! "Cannot verify" is a failure on every command (docs/DESIGN.md §3): an
//! image whose page cache cannot be measured must fail `inactivate`, as it
//! fails `invalidate`, `activate` and `check`, never pass as "0 dirty".
//!
//! The backing is real: a hugetlbfs directory, whose files cachestat(2)
//! refuses with EOPNOTSUPP. Control: the same commands on the same kind of
//! image in a directory cachestat can measure succeed, so the failures come
//! from the measurement alone.

mod common;

use common::{KMount, Mount, ctl_write_read, field, scratch};
use std::fs::{self, File};

fn commands_on(m: &Mount) -> Vec<(&'static str, Result<(), i32>, String)> {
    ["inactivate", "invalidate", "activate", "check"]
        .into_iter()
        .map(|cmd| {
            let (res, out) = ctl_write_read(&m.ctl(cmd), "vm.img\n");
            (cmd, res, out)
        })
        .collect()
}

#[test]
fn every_command_fails_when_the_page_cache_cannot_be_measured() {
    if !common::require_root() {
        return;
    }
    let dir = scratch();
    let huge = KMount::mount(&["-t", "hugetlbfs", "none"], &dir.path().join("huge"));
    File::create(huge.path.join("vm.img")).unwrap();
    let m = Mount::start(dir.path(), &huge.path, &["--io", "relay"]);
    fs::metadata(m.path("vm.img")).unwrap();
    for (cmd, res, out) in commands_on(&m) {
        assert_eq!(
            res,
            Err(libc::EOPNOTSUPP),
            "{cmd} on an image whose page cache cannot be measured must fail: {out}\nlog:\n{}",
            m.log_text()
        );
        assert_eq!(
            field(&out, "errno").as_deref(),
            Some("EOPNOTSUPP"),
            "{cmd}: {out:?}"
        );
        assert!(out.contains("cannot verify"), "{cmd} says why: {out:?}");
        if cmd == "inactivate" {
            let st = common::status_image(&m, "vm.img");
            assert_eq!(
                st["state"], "active",
                "a failed inactivate leaves the image active: {st}"
            );
        }
    }
    drop(m);

    // Control: a directory whose files cachestat measures.
    let back = dir.path().join("back");
    fs::create_dir(&back).unwrap();
    File::create(back.join("vm.img")).unwrap();
    let m = Mount::start(dir.path(), &back, &["--io", "relay"]);
    fs::metadata(m.path("vm.img")).unwrap();
    for (cmd, res, out) in commands_on(&m) {
        assert_eq!(res, Ok(()), "control: {cmd} on a measurable image: {out}");
    }
}
