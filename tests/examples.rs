//! The shell scripts in examples/ and scripts/ parse (`bash -n`) and pass
//! shellcheck when it is installed, and the two-host demo runs for real: it
//! must show the stale read without `activate` and the fresh read with it, and
//! leave nothing mounted or attached.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn shell_scripts() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    for dir in ["examples", "scripts"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "sh") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn shellcheck_installed() -> bool {
    Command::new("sh")
        .args(["-c", "command -v shellcheck"])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[test]
fn shell_scripts_parse_and_pass_shellcheck() {
    let scripts = shell_scripts();
    assert!(
        scripts
            .iter()
            .any(|p| p.ends_with("examples/two-host-demo.sh")),
        "examples/two-host-demo.sh is missing: {scripts:?}"
    );
    let shellcheck = shellcheck_installed();
    if !shellcheck {
        eprintln!("shellcheck not installed: only `bash -n` is checked");
    }
    let mut failures = Vec::new();
    for script in &scripts {
        let out = Command::new("bash").arg("-n").arg(script).output().unwrap();
        if !out.status.success() {
            failures.push(format!(
                "bash -n {}:\n{}",
                script.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        if shellcheck {
            let out = Command::new("shellcheck")
                .args(["-s", "bash"])
                .arg(script)
                .output()
                .unwrap();
            if !out.status.success() {
                failures.push(format!(
                    "shellcheck {}:\n{}",
                    script.display(),
                    String::from_utf8_lossy(&out.stdout)
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn systemd_unit_and_fstab_example_are_complete() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let unit = read_text(&root.join("migsafe@.service"));
    for needle in [
        "[Unit]",
        "[Service]",
        "[Install]",
        "Type=notify",
        "ExecStart=",
        "migsafe mount",
        "%f",
        "ExecStop=/bin/umount %f",
    ] {
        assert!(unit.contains(needle), "migsafe@.service lacks {needle:?}");
    }
    let fstab = read_text(&root.join("fstab.example"));
    let entries: Vec<&str> = fstab
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .collect();
    assert!(!entries.is_empty(), "fstab.example has no entry");
    for e in entries {
        let fields: Vec<&str> = e.split_whitespace().collect();
        assert_eq!(fields.len(), 6, "fstab line needs 6 fields: {e}");
        assert_eq!(fields[2], "fuse.migsafe", "{e}");
    }
}

#[test]
fn two_host_demo_shows_stale_then_fresh_and_cleans_up() {
    if !require_root() {
        return;
    }
    let tmp = scratch();
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/two-host-demo.sh");
    let out = Command::new("bash")
        .arg(&demo)
        .env("MIGSAFE", BIN)
        .env("TMPDIR", tmp.path())
        .output()
        .expect("run two-host-demo.sh");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let describe = format!(
        "exit status {:?}\n--- stdout ---\n{stdout}\n--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{describe}");
    assert!(out.status.success(), "{describe}");
    assert!(
        stdout.contains("<- STALE read"),
        "no stale read shown without activate\n{describe}"
    );
    assert!(
        stdout.contains("<- FRESH read"),
        "no fresh read shown after activate\n{describe}"
    );
    assert!(
        stdout.contains("without activate the stale read was seen; with activate the fresh data"),
        "{describe}"
    );

    assert_nothing_left(tmp.path(), &describe);
}

/// Unmounts (lazily if busy) on drop.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = Command::new("umount").arg(&self.0).status();
            if is_mounted(&self.0) {
                let _ = Command::new("umount").arg("-l").arg(&self.0).status();
            }
        }
    }
}

/// The options of fstab.example's first entry mount for real through fuse3's
/// mount helper (`mount -t fuse 'PROGRAM#SOURCE'` is the form that names the
/// program by path; `fuse.migsafe` finds `migsafe` on the helper's PATH).
#[test]
fn fstab_example_options_mount_through_the_fuse_helper() {
    if !require_root() || !have_tool("mount.fuse3") {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let fstab = read_text(&root.join("fstab.example"));
    let entry = fstab
        .lines()
        .find(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .expect("an fstab entry");
    let opts = entry.split_whitespace().nth(3).expect("options field");
    let tmp = scratch();
    let backing = tmp.path().join("images");
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&backing).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    make_file(&backing.join("vm1.img"), 1 << 20, 0x5a);
    let _guard = Unmount(mnt.clone());
    let status = Command::new("mount")
        .args(["-t", "fuse", "-o", opts])
        .arg(format!("{BIN}#{}", backing.display()))
        .arg(&mnt)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "mount -o {opts} failed: {status}");
    assert!(is_mounted(&mnt), "not mounted with -o {opts}");
    assert_eq!(read_at(&mnt.join("vm1.img"), 0, 4096), vec![0x5a; 4096]);
    let status = read_text(&mnt.join(".ctl/status"));
    let v: serde_json::Value = serde_json::from_str(&status).expect("status is JSON");
    assert!(v.get("images").is_some(), "{status}");
    ctl_write(&mnt.join(".ctl/flush"), "vm1.img\n").expect("flush through the helper mount");
    let out = Command::new("umount").arg(&mnt).output().unwrap();
    assert!(out.status.success(), "umount: {out:?}");
    assert!(!is_mounted(&mnt));
}
