//! The Debian package, as an operator's configuration management uses it:
//! built by scripts/package.sh (cargo-deb), checked by lintian, installed
//! with dpkg on this machine, an instance started through the installed
//! unit's command lines and an fstab entry through mount(8) with only the
//! installed files, an upgrade that leaves both running, a removal refused
//! while they are live, then removal and purge that leave nothing behind.
//!
//! It installs into this machine's root (dpkg has one database): it runs
//! only where no migsafe package is installed already, and its guard purges
//! the package and unmounts on any failure.

mod common;

use common::*;
use std::fs;
use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn out_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn dpkg_status() -> String {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", "migsafe"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn process_alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.split(") ").nth(1).unwrap_or("").starts_with('Z'))
        .unwrap_or(false)
}

fn wait_gone(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while process_alive(pid) && Instant::now() < deadline {
        sleep(Duration::from_millis(20));
    }
    !process_alive(pid)
}

/// Undoes everything the test did to the machine, also on panic: unmounts,
/// kills the daemons it started, purges the package, removes the instance
/// settings it wrote.
struct Cleanup {
    mounts: Vec<PathBuf>,
    pids: Vec<i32>,
    children: Vec<Child>,
    files: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for m in &self.mounts {
            if is_mounted(m) {
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for &pid in &self.pids {
            if process_alive(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        if !dpkg_status().is_empty() && !dpkg_status().starts_with("unknown") {
            let _ = Command::new("dpkg").args(["-P", "migsafe"]).output();
        }
        for f in &self.files {
            let _ = fs::remove_file(f);
        }
    }
}

/// scripts/package.sh with `args` (cargo deb's): the path of the .deb.
fn build_deb(out: &Path, args: &[&str]) -> PathBuf {
    let o = Command::new(Path::new(ROOT).join("scripts/package.sh"))
        .args(args)
        .arg("-o")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "scripts/package.sh failed:\n{}",
        out_text(&o)
    );
    assert!(out.is_file(), "no .deb at {}", out.display());
    out.to_path_buf()
}

/// systemd's expansion of one unit command line: `%f`/`%i`, `$VAR` split
/// into words, `${VAR}` one word, a leading `-` = failure ignored.
fn expand(line: &str, f: &Path, instance: &str, env: &[(String, String)]) -> (bool, Vec<String>) {
    let (ignore, line) = match line.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, line),
    };
    let lookup = |name: &str| {
        env.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let mut words = Vec::new();
    for word in line.split_whitespace() {
        let word = word
            .replace("%f", f.to_str().unwrap())
            .replace("%i", instance);
        if let Some(name) = word.strip_prefix("${").and_then(|w| w.strip_suffix('}')) {
            words.push(lookup(name));
        } else if let Some(name) = word.strip_prefix('$') {
            words.extend(lookup(name).split_whitespace().map(String::from));
        } else {
            words.push(word);
        }
    }
    (ignore, words)
}

/// KEY=VALUE lines of an EnvironmentFile.
fn env_file(path: &Path) -> Vec<(String, String)> {
    read_text(path)
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// The installed unit's [Service] command lines, expanded for `mnt`.
struct UnitLines {
    pre: Vec<(bool, Vec<String>)>,
    start: Vec<String>,
    stop: Vec<String>,
}

fn unit_lines(unit: &str, mnt: &Path, instance: &str) -> UnitLines {
    let mut service = false;
    let mut env = Vec::new();
    let mut lines = UnitLines {
        pre: Vec::new(),
        start: Vec::new(),
        stop: Vec::new(),
    };
    for line in unit.lines() {
        if line.starts_with('[') {
            service = line == "[Service]";
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if !service {
            continue;
        }
        match key {
            "EnvironmentFile" => {
                let (_, path) = expand(value, mnt, instance, &[]);
                env.extend(env_file(Path::new(&path[0])));
            }
            "ExecStartPre" => lines.pre.push(expand(value, mnt, instance, &env)),
            "ExecStart" => lines.start = expand(value, mnt, instance, &env).1,
            "ExecStop" => lines.stop = expand(value, mnt, instance, &env).1,
            _ => {}
        }
    }
    lines
}

fn recv_text(sock: &UnixDatagram) -> String {
    sock.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match sock.recv(&mut buf) {
            Ok(n) => return String::from_utf8_lossy(&buf[..n]).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("no sd_notify message within 15 s: {e}"),
        }
    }
}

fn read_all(f: &mut fs::File) -> std::io::Result<Vec<u8>> {
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(0))?;
    let mut v = Vec::new();
    f.read_to_end(&mut v)?;
    Ok(v)
}

/// Lintian's complaints about the package, with the ones this package
/// accepts removed (each explained here). Errors are never accepted.
fn lintian_complaints(deb: &Path) -> Vec<String> {
    let out = Command::new("lintian")
        .args(["--pedantic", "--no-tag-display-limit"])
        .arg(deb)
        .output()
        .unwrap();
    out_text(&out)
        .lines()
        .filter(|l| l.len() > 2 && l.as_bytes()[1] == b':')
        // Not uploaded to Debian: there is no ITP bug to close.
        .filter(|l| !(l.starts_with("W: ") && l.contains("initial-upload-closes-no-bugs")))
        .map(String::from)
        .collect()
}

#[test]
fn package_installs_serves_upgrades_without_restart_and_removes() {
    if !require_root()
        || !have_tool("dpkg")
        || !have_tool("lintian")
        || !have_tool("cargo-deb")
        || !have_tool("mount.fuse3")
        || !have_tool("man")
    {
        return;
    }
    if !dpkg_status().is_empty() && !dpkg_status().starts_with("unknown") {
        eprintln!("SKIPPED: a migsafe package is installed on this machine already");
        return;
    }
    let dir = scratch();
    let version = env!("CARGO_PKG_VERSION");
    let prev = build_deb(
        &dir.path().join("prev.deb"),
        &["--deb-version", &format!("{version}-0~prev")],
    );
    let new = build_deb(&dir.path().join("new.deb"), &[]);

    // Lintian: no errors, and no warning this package has not explained.
    let complaints = lintian_complaints(&new);
    assert!(complaints.is_empty(), "lintian: {complaints:#?}");

    // What the package holds.
    let contents = run(Command::new("dpkg-deb").arg("-c").arg(&new));
    for path in [
        "./usr/sbin/migsafe",
        "./lib/systemd/system/migsafe@.service",
        "./etc/migsafe/instance.conf.example",
        "./usr/share/man/man8/migsafe.8.gz",
        "./usr/share/man/man8/migsafe-mount.8.gz",
        "./usr/share/man/man8/migsafe-ctl.8.gz",
        "./usr/share/man/man8/migsafe-residency.8.gz",
        "./usr/share/man/man8/migsafe-upgrade.8.gz",
        "./usr/share/man/man8/migsafe-doctor.8.gz",
        "./usr/share/bash-completion/completions/migsafe",
        "./usr/share/doc/migsafe/copyright",
        "./usr/share/doc/migsafe/examples/libvirt-hook.sh",
        "./usr/share/doc/migsafe/examples/qemu-migrate.sh",
        "./usr/share/doc/migsafe/examples/virsh-migrate.sh",
        "./usr/share/doc/migsafe/examples/fstab.example",
    ] {
        assert!(
            contents.lines().any(|l| l.ends_with(path)),
            "{path} missing:\n{contents}"
        );
    }
    let control = run(Command::new("dpkg-deb").arg("-f").arg(&new).arg("Depends"));
    assert!(control.contains("fuse3"), "Depends: {control}");
    let ctrl = dir.path().join("ctrl");
    run(Command::new("dpkg-deb").arg("-e").arg(&new).arg(&ctrl));
    assert_eq!(
        read_text(&ctrl.join("conffiles")).trim(),
        "/etc/migsafe/instance.conf.example"
    );
    // No maintainer script restarts or stops instances (comments and the
    // advice it prints aside).
    for script in ["postinst", "prerm", "postrm"] {
        let text = read_text(&ctrl.join(script));
        for word in [
            "systemctl restart",
            "try-restart",
            "reload-or-restart",
            "systemctl stop",
            "deb-systemd-invoke",
            "kill",
            "umount",
        ] {
            assert!(
                !text
                    .lines()
                    .map(str::trim_start)
                    .filter(|l| !l.starts_with('#') && !l.starts_with("echo "))
                    .any(|l| l.contains(word)),
                "{script} runs {word:?}:\n{text}"
            );
        }
    }

    // Install the previous build; mount through what it installed.
    let backing = dir.path().join("images");
    fs::create_dir(&backing).unwrap();
    fs::write(backing.join("disk.img"), b"image bytes").unwrap();
    let mnt = dir.path().join("run/migsafe");
    let fstab_mnt = dir.path().join("fstab-mnt");
    fs::create_dir(&fstab_mnt).unwrap();
    let instance = run(Command::new("systemd-escape").arg("--path").arg(&mnt))
        .trim()
        .to_string();
    let conf = PathBuf::from(format!("/etc/migsafe/{instance}.conf"));
    let mut cleanup = Cleanup {
        mounts: vec![mnt.clone(), fstab_mnt.clone()],
        pids: Vec::new(),
        children: Vec::new(),
        files: vec![conf.clone()],
    };
    let o = Command::new("dpkg").arg("-i").arg(&prev).output().unwrap();
    assert!(o.status.success(), "dpkg -i:\n{}", out_text(&o));
    assert!(dpkg_status().contains("ok installed"));
    fs::write(
        &conf,
        format!(
            "MIGSAFE_BACKING={}\nMIGSAFE_OPTS=--io relay -o allow_other\n",
            backing.display()
        ),
    )
    .unwrap();
    let unit_path = Path::new("/lib/systemd/system/migsafe@.service");
    if have_tool("systemd-analyze") {
        let o = Command::new("systemd-analyze")
            .arg("verify")
            .arg(unit_path)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "systemd-analyze verify:\n{}",
            out_text(&o)
        );
    }
    let unit = unit_lines(&read_text(unit_path), &mnt, &instance);
    assert_eq!(unit.start[0], "/usr/sbin/migsafe", "{:?}", unit.start);
    for (ignore, argv) in &unit.pre {
        let ok = Command::new(&argv[0])
            .args(&argv[1..])
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(ok || *ignore, "ExecStartPre {argv:?} failed");
    }
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let child = Command::new(&unit.start[0])
        .args(&unit.start[1..])
        .env_clear()
        .env("NOTIFY_SOCKET", &sock_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let unit_pid = child.id() as i32;
    cleanup.children.push(child);
    let msg = recv_text(&sock);
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");

    // The fstab entry, through mount(8) and fuse3's helper, which find the
    // installed /usr/sbin/migsafe on the shell's default PATH.
    let pid_file = dir.path().join("fstab.pid");
    let fstab = dir.path().join("fstab");
    fs::write(
        &fstab,
        format!(
            "{} {} fuse.migsafe io=relay,pid-file={},nofail 0 0\n",
            backing.display(),
            fstab_mnt.display(),
            pid_file.display()
        ),
    )
    .unwrap();
    let o = Command::new("mount")
        .arg("-T")
        .arg(&fstab)
        .arg(&fstab_mnt)
        .env_clear()
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "mount(8) with the fstab entry:\n{}",
        out_text(&o)
    );
    let fstab_pid: i32 = read_text(&pid_file).trim().parse().unwrap();
    cleanup.pids.push(fstab_pid);
    let types = run(Command::new("findmnt")
        .args(["-n", "-o", "FSTYPE"])
        .arg(&fstab_mnt));
    assert_eq!(types.trim(), "fuse.migsafe");

    // VMs: an open image on each mount.
    let mut vm1 = fs::File::open(mnt.join("disk.img")).unwrap();
    let mut vm2 = fs::File::open(fstab_mnt.join("disk.img")).unwrap();
    assert_eq!(read_all(&mut vm1).unwrap(), b"image bytes");
    assert_eq!(read_all(&mut vm2).unwrap(), b"image bytes");

    // The host check on a host with everything installed.
    let o = Command::new("/usr/sbin/migsafe")
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("doctor --json: {e}\n{}", out_text(&o)));
    assert_eq!(o.status.code(), Some(0), "{doc:#}");
    let line = |name: &str| {
        doc["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"] == name)
            .unwrap_or_else(|| panic!("no {name} line: {doc:#}"))
            .clone()
    };
    for name in ["dev_fuse", "fusermount3", "mount.fuse3", "binary", "unit"] {
        assert_eq!(line(name)["level"], "ok", "{doc:#}");
    }
    assert!(
        line("binary")["what"]
            .as_str()
            .unwrap()
            .contains("/usr/sbin/migsafe"),
        "{doc:#}"
    );
    assert!(
        line("mounts")["what"]
            .as_str()
            .unwrap()
            .contains(mnt.to_str().unwrap()),
        "{doc:#}"
    );

    // The installed man pages render, and man finds them by name.
    let page = run(Command::new("man")
        .args(["-l", "/usr/share/man/man8/migsafe-ctl.8.gz"])
        .env("MANWIDTH", "80"));
    for needle in ["EXIT STATUS", "RESULT LINES", "activate", "CONTROL FILES"] {
        assert!(page.contains(needle), "man page lacks {needle}:\n{page}");
    }
    let found = run(Command::new("man").args(["-w", "8", "migsafe-mount"]));
    assert!(
        found.contains("/usr/share/man/man8/migsafe-mount.8"),
        "{found}"
    );

    // bash, with the installed completion, completes ctl command names.
    if Path::new("/usr/share/bash-completion/bash_completion").exists() {
        let offered = run(Command::new("bash").arg("-c").arg(
            "source /usr/share/bash-completion/bash_completion\n\
             source /usr/share/bash-completion/completions/migsafe\n\
             COMP_WORDS=(migsafe ctl /run/migsafe ac); COMP_CWORD=3\n\
             COMP_LINE='migsafe ctl /run/migsafe ac'; COMP_POINT=${#COMP_LINE}\n\
             _migsafe migsafe ac /run/migsafe\n\
             echo \"${COMPREPLY[@]}\"",
        ));
        assert_eq!(offered.trim(), "activate");
    }

    // Upgrade to this build: both instances keep serving, on the same
    // daemons, through the files the VMs hold open; the admin's edit of
    // the conffile stays.
    let example = Path::new("/etc/migsafe/instance.conf.example");
    let edited = format!("{}# edited by the admin\n", read_text(example));
    fs::write(example, &edited).unwrap();
    let o = Command::new("dpkg")
        .args(["-i", "--force-confold"])
        .arg(&new)
        .output()
        .unwrap();
    let text = out_text(&o);
    assert!(o.status.success(), "upgrade:\n{text}");
    assert!(
        text.contains("running mounts keep the previous binary"),
        "{text}"
    );
    assert!(
        process_alive(unit_pid),
        "the unit's daemon died in the upgrade:\n{text}"
    );
    assert!(
        process_alive(fstab_pid),
        "the fstab daemon died in the upgrade:\n{text}"
    );
    assert_eq!(read_all(&mut vm1).unwrap(), b"image bytes");
    assert_eq!(read_all(&mut vm2).unwrap(), b"image bytes");
    assert_eq!(read_text(example), edited);
    let status = run(Command::new("/usr/sbin/migsafe")
        .args(["ctl", "--json"])
        .arg(&mnt)
        .arg("status"));
    assert!(status.contains("disk.img"), "{status}");

    // Removal while mounts are live is refused, naming them; nothing stops.
    let o = Command::new("dpkg")
        .args(["-r", "migsafe"])
        .output()
        .unwrap();
    let text = out_text(&o);
    assert!(
        !o.status.success(),
        "dpkg -r went ahead with live mounts:\n{text}"
    );
    assert!(text.contains(mnt.to_str().unwrap()), "{text}");
    assert!(text.contains(fstab_mnt.to_str().unwrap()), "{text}");
    assert!(dpkg_status().contains("ok installed"), "{}", dpkg_status());
    assert!(Path::new("/usr/sbin/migsafe").exists());
    assert_eq!(read_all(&mut vm1).unwrap(), b"image bytes");
    assert_eq!(read_all(&mut vm2).unwrap(), b"image bytes");

    // The VMs have moved away: stop the instance as the unit does, and
    // unmount the fstab entry. Then removal goes ahead (the control of the
    // refusal above: the same command without live mounts).
    drop(vm1);
    drop(vm2);
    let o = Command::new(&unit.stop[0])
        .args(&unit.stop[1..])
        .output()
        .unwrap();
    assert!(o.status.success(), "ExecStop: {}", out_text(&o));
    let mut child = cleanup.children.pop().unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    run(Command::new("umount").arg(&fstab_mnt));
    assert!(wait_gone(fstab_pid), "the fstab daemon outlived its umount");

    // Remove, then purge: no binary, unit, man page, completion or mount.
    let o = Command::new("dpkg")
        .args(["-r", "migsafe"])
        .output()
        .unwrap();
    assert!(o.status.success(), "dpkg -r:\n{}", out_text(&o));
    for gone in [
        "/usr/sbin/migsafe",
        "/lib/systemd/system/migsafe@.service",
        "/usr/share/man/man8/migsafe.8.gz",
        "/usr/share/bash-completion/completions/migsafe",
    ] {
        assert!(!Path::new(gone).exists(), "{gone} left after dpkg -r");
    }
    assert!(example.exists(), "dpkg -r removed a conffile");
    let o = Command::new("dpkg")
        .args(["-P", "migsafe"])
        .output()
        .unwrap();
    assert!(o.status.success(), "dpkg -P:\n{}", out_text(&o));
    assert!(!example.exists(), "dpkg -P left the conffile");
    assert!(
        conf.exists(),
        "dpkg -P removed the admin's instance settings"
    );
    assert!(dpkg_status().is_empty() || dpkg_status().starts_with("unknown"));
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    let prefix = dir.path().to_str().unwrap();
    assert!(!mounts.contains(prefix), "mounts left:\n{mounts}");
    assert!(!process_alive(unit_pid) && !process_alive(fstab_pid));
    drop(cleanup);
    let _ = fs::remove_dir(Path::new("/etc/migsafe"));
}
