//! `migsafe doctor`: the operator's first minute on a new host. Each check
//! probes the real thing where it can (opens `/dev/fuse`, calls
//! cachestat(2), asks `/bin/sh` without a PATH for `migsafe` as mount(8)'s
//! helper does) rather than comparing version numbers, and every line that
//! is not ok says what to do next.
//!
//! Exit status 1 only for what keeps this host from serving images safely
//! (no usable `/dev/fuse`, fuse3's helpers missing); what only costs speed or
//! one start form (no passthrough, no unit, a binary mount(8) cannot find)
//! is a warning.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::mountinfo;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Level {
    Ok,
    /// Works, with less (speed, a start form, a tool).
    Warn,
    /// This host cannot serve images safely until it is fixed.
    Fail,
}

impl Level {
    fn word(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "fail",
        }
    }
}

#[derive(Debug)]
pub struct Line {
    pub check: &'static str,
    pub level: Level,
    pub what: String,
    /// The next step when the line is not ok.
    pub next: Option<String>,
}

fn ok(check: &'static str, what: String) -> Line {
    Line {
        check,
        level: Level::Ok,
        what,
        next: None,
    }
}

fn not_ok(check: &'static str, level: Level, what: String, next: String) -> Line {
    Line {
        check,
        level,
        what,
        next: Some(next),
    }
}

/// Every check, in the order they are printed.
pub fn checks() -> Vec<Line> {
    let mut lines = kernel();
    lines.push(dev_fuse());
    lines.extend(fuse3());
    lines.push(binary_for_mount8());
    lines.push(unit());
    lines.push(mounts());
    lines.push(qemu());
    lines.push(libvirt());
    lines
}

pub fn run(json: bool) -> i32 {
    let lines = checks();
    let failed = lines.iter().any(|l| l.level == Level::Fail);
    if json {
        let doc = serde_json::json!({
            "ok": !failed,
            "checks": lines.iter().map(|l| serde_json::json!({
                "check": l.check,
                "level": l.level.word(),
                "what": l.what,
                "next": l.next,
            })).collect::<Vec<_>>(),
        });
        println!("{doc:#}");
    } else {
        for l in &lines {
            println!("{:<4} {:<11} {}", l.level.word(), l.check, l.what);
            if let Some(next) = &l.next {
                println!("{:16} next: {next}", "");
            }
        }
        if failed {
            println!("this host cannot serve images safely yet: fix the lines marked fail");
        }
    }
    i32::from(failed)
}

fn kernel_version() -> (String, u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let mut nums = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let major = nums.next().unwrap_or(0);
    let minor = nums.next().unwrap_or(0);
    (release, major, minor)
}

fn kernel() -> Vec<Line> {
    let (release, major, minor) = kernel_version();
    let mut lines = vec![ok("kernel", format!("Linux {release}"))];
    // cachestat(2) on any file: ENOSYS on kernels before 6.5.
    let probe = std::fs::File::open("/proc/self/exe")
        .and_then(|f| crate::sys::cachestat(std::os::fd::AsFd::as_fd(&f)));
    lines.push(match probe {
        Ok(_) => ok("cachestat", "cachestat(2) works".into()),
        Err(e) => not_ok(
            "cachestat",
            Level::Warn,
            format!("cachestat(2) fails ({e})"),
            "residency checks fall back to mmap+mincore (slower on large images); Linux 6.5 or newer has cachestat".into(),
        ),
    });
    let root = nix::unistd::geteuid().is_root();
    lines.push(if (major, minor) < (6, 9) {
        not_ok(
            "passthrough",
            Level::Warn,
            format!("Linux {major}.{minor} has no FUSE passthrough"),
            "--io auto serves regular files through the relay path; Linux 6.9 or newer passes them through".into(),
        )
    } else if !root {
        not_ok(
            "passthrough",
            Level::Warn,
            "the kernel has FUSE passthrough, but it needs CAP_SYS_ADMIN".into(),
            "run the mount as root (the unit does) for passthrough".into(),
        )
    } else {
        ok("passthrough", "FUSE passthrough (Linux 6.9+, root)".into())
    });
    let uring = Path::new("/sys/module/fuse/parameters/enable_uring");
    lines.push(match std::fs::read_to_string(uring) {
        Ok(v) if v.trim() == "Y" => ok(
            "io_uring",
            "FUSE over io_uring is enabled (migsafe does not use it yet)".into(),
        ),
        Ok(_) => ok(
            "io_uring",
            format!(
                "FUSE over io_uring is available, off ({}=N); migsafe does not use it yet",
                uring.display()
            ),
        ),
        Err(_) => ok(
            "io_uring",
            "no FUSE over io_uring in this kernel (Linux 6.14+); migsafe does not use it yet"
                .into(),
        ),
    });
    lines
}

fn dev_fuse() -> Line {
    let dev = Path::new("/dev/fuse");
    let uid = nix::unistd::geteuid();
    match std::fs::metadata(dev) {
        Err(e) => not_ok(
            "dev_fuse",
            Level::Fail,
            format!("{}: {e}", dev.display()),
            "load the module (modprobe fuse), or give the container the device".into(),
        ),
        Ok(m) if !m.file_type().is_char_device() => not_ok(
            "dev_fuse",
            Level::Fail,
            format!("{} is not a character device", dev.display()),
            "remove it and load the module (modprobe fuse), which creates it".into(),
        ),
        Ok(m) => match std::fs::OpenOptions::new().read(true).write(true).open(dev) {
            Ok(_) => ok(
                "dev_fuse",
                format!("{} opens read-write (uid {uid}, mode {:o})", dev.display(), m.mode() & 0o7777),
            ),
            Err(e) => not_ok(
                "dev_fuse",
                Level::Fail,
                format!("{} does not open read-write for uid {uid} (mode {:o}): {e}", dev.display(), m.mode() & 0o7777),
                "run migsafe as root (the unit does), or chmod 0666 /dev/fuse as fuse3's udev rule does".into(),
            ),
        },
    }
}

/// The first of `dirs`/`name` that exists.
fn find_in(dirs: &[&str], name: &str) -> Option<PathBuf> {
    dirs.iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| std::fs::symlink_metadata(p).is_ok())
}

fn executable(p: &Path) -> Result<std::fs::Metadata, String> {
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(m),
        Ok(_) => Err(format!("{} is not an executable file", p.display())),
        Err(e) => Err(format!("{}: {e}", p.display())),
    }
}

fn fuse3() -> Vec<Line> {
    let install = "apt-get install fuse3 (the migsafe package depends on it)";
    let mut lines = Vec::new();
    lines.push(match find_in(&["/usr/bin", "/bin"], "fusermount3") {
        None => not_ok(
            "fusermount3",
            Level::Fail,
            "no fusermount3 in /usr/bin or /bin".into(),
            install.into(),
        ),
        Some(p) => match executable(&p) {
            Err(e) => not_ok("fusermount3", Level::Fail, e, install.into()),
            Ok(m) if m.mode() & 0o4000 == 0 || m.uid() != 0 => not_ok(
                "fusermount3",
                Level::Warn,
                format!("{} is not setuid root", p.display()),
                "only root can mount; reinstall fuse3 (apt-get install --reinstall fuse3) for unprivileged mounts".into(),
            ),
            Ok(_) => ok("fusermount3", format!("{} (setuid root)", p.display())),
        },
    });
    // mount(8) runs /sbin/mount.TYPE for `-t fuse.migsafe`.
    lines.push(
        match find_in(&["/sbin", "/usr/sbin", "/bin", "/usr/bin"], "mount.fuse3") {
            None => not_ok(
                "mount.fuse3",
                Level::Fail,
                "no mount.fuse3: mount -t fuse.migsafe and fstab entries cannot start migsafe"
                    .into(),
                install.into(),
            ),
            Some(p) => match executable(&p) {
                Err(e) => not_ok("mount.fuse3", Level::Fail, e, install.into()),
                Ok(_) => ok("mount.fuse3", format!("{}", p.display())),
            },
        },
    );
    lines
}

/// fuse3's mount helper starts `migsafe SRC DIR -o OPTS` with `/bin/sh -c`
/// and no PATH in the environment: ask that same shell.
fn binary_for_mount8() -> Line {
    let found = Command::new("/bin/sh")
        .args(["-c", "command -v migsafe"])
        .env_clear()
        .output();
    let next = "install the package (dpkg -i migsafe_*.deb), which puts migsafe in /usr/sbin where mount(8)'s helper finds it";
    match found {
        Ok(out) if out.status.success() => {
            let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
            match executable(Path::new(&path)) {
                Ok(_) => ok("binary", format!("mount(8) runs {path}")),
                Err(e) => not_ok("binary", Level::Warn, e, next.into()),
            }
        }
        Ok(_) => not_ok(
            "binary",
            Level::Warn,
            "mount(8) cannot find migsafe (/bin/sh without PATH does not): mount -t fuse.migsafe and fstab entries fail".into(),
            next.into(),
        ),
        Err(e) => not_ok(
            "binary",
            Level::Warn,
            format!("/bin/sh: {e}"),
            "mount(8)'s helper needs /bin/sh".into(),
        ),
    }
}

fn unit() -> Line {
    let Some(path) = find_in(
        &[
            "/etc/systemd/system",
            "/lib/systemd/system",
            "/usr/lib/systemd/system",
        ],
        "migsafe@.service",
    ) else {
        return not_ok(
            "unit",
            Level::Warn,
            "no migsafe@.service in /etc/systemd/system, /lib/systemd/system or /usr/lib/systemd/system".into(),
            "install the package (dpkg -i migsafe_*.deb) for the unit, or mount from fstab".into(),
        );
    };
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let exec = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("ExecStart="))
        .and_then(|l| {
            l.trim_start_matches(['-', '@', '+', '!'])
                .split_whitespace()
                .next()
        })
        .map(PathBuf::from);
    match exec {
        None => not_ok(
            "unit",
            Level::Warn,
            format!("{} has no ExecStart=", path.display()),
            "reinstall the package".into(),
        ),
        Some(bin) => match executable(&bin) {
            Ok(_) => ok("unit", format!("{} runs {}", path.display(), bin.display())),
            Err(e) => not_ok(
                "unit",
                Level::Warn,
                format!(
                    "{} runs {}, which fails: {e}",
                    path.display(),
                    bin.display()
                ),
                "reinstall the package, or point ExecStart= at the binary".into(),
            ),
        },
    }
}

fn migsafe_mounts() -> Vec<PathBuf> {
    mountinfo::mountinfo()
        .into_iter()
        .filter(|m| m.fstype == "fuse.migsafe")
        .map(|m| m.mountpoint)
        .collect()
}

fn mounts() -> Line {
    let live = migsafe_mounts();
    let names: Vec<String> = live.iter().map(|p| p.display().to_string()).collect();
    ok(
        "mounts",
        if names.is_empty() {
            "no live migsafe mount".into()
        } else {
            format!("live: {}", names.join(" "))
        },
    )
}

fn first_line(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .ok()?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    text.lines().next().map(|l| l.trim().to_string())
}

fn qemu() -> Line {
    let Some(bin) = ["qemu-system-x86_64", "qemu-system-aarch64", "kvm"]
        .iter()
        .find_map(|n| find_in(&["/usr/bin", "/usr/local/bin"], n))
        .or_else(|| find_in(&["/usr/libexec"], "qemu-kvm"))
    else {
        return not_ok(
            "qemu",
            Level::Warn,
            "no QEMU on this host".into(),
            "apt-get install qemu-system-x86 (or whichever VMM opens the images)".into(),
        );
    };
    let version = first_line(&bin.to_string_lossy(), &["--version"]).unwrap_or_default();
    // QEMU's schema (QMP query-qmp-schema, from a QEMU with no machine)
    // has the file driver's drop-cache member where the option exists; its
    // documented default is on (since QEMU 4.0).
    let schema = qmp_schema(&bin);
    match schema {
        Some(text) if text.contains("\"drop-cache\"") => ok(
            "qemu",
            format!("{version}; drop-cache is on by default (QEMU drops an image's cached pages when an incoming migration activates it)"),
        ),
        Some(_) => not_ok(
            "qemu",
            Level::Warn,
            format!("{version}; its file driver has no drop-cache option"),
            "rely on migsafe activate (it drops and verifies the destination's pages) before resuming the guest".into(),
        ),
        None => not_ok(
            "qemu",
            Level::Warn,
            format!("{version}; its QMP schema could not be read"),
            format!("check that {} -machine none -qmp stdio starts", bin.display()),
        ),
    }
}

/// The QMP schema of `bin`, from a QEMU started without a machine.
fn qmp_schema(bin: &Path) -> Option<String> {
    use std::io::Write;
    let mut child = Command::new(bin)
        .args([
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
            "stdio",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let mut stdin = child.stdin.take()?;
    let _ = stdin.write_all(
        b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-qmp-schema\"}\n{\"execute\":\"quit\"}\n",
    );
    drop(stdin);
    let out = child.wait_with_output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.contains("\"return\"").then_some(text)
}

fn libvirt() -> Line {
    let Some(virsh) = find_in(&["/usr/bin", "/usr/local/bin"], "virsh") else {
        return ok("libvirt", "no libvirt client (virsh) on this host".into());
    };
    let version = first_line(&virsh.to_string_lossy(), &["--version"]).unwrap_or_default();
    let conf = std::fs::read_to_string("/etc/libvirt/qemu.conf").unwrap_or_default();
    // A libvirt that knows shared_filesystems ships it (commented) in its
    // qemu.conf; 9.0 does not.
    if !conf.contains("shared_filesystems") {
        return not_ok(
            "libvirt",
            Level::Warn,
            format!("libvirt {version}: no shared_filesystems setting; virsh migrate --live refuses disks on FUSE mounts"),
            "migrate with virsh migrate --live --unsafe (VIRSH_MIGRATE_OPTS=--unsafe /usr/share/doc/migsafe/examples/virsh-migrate.sh), every disk on the migsafe mount".into(),
        );
    }
    let set = conf
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("shared_filesystems"));
    let live = migsafe_mounts();
    match set {
        Some(l) if !live.is_empty() && live.iter().all(|m| l.contains(&*m.to_string_lossy())) => {
            ok("libvirt", format!("libvirt {version}; {l}"))
        }
        _ => not_ok(
            "libvirt",
            Level::Warn,
            format!("libvirt {version}: qemu.conf's shared_filesystems does not list every migsafe mount"),
            "set shared_filesystems = [ \"/run/migsafe\" ] (the mountpoints) in /etc/libvirt/qemu.conf on both hosts and restart virtqemud/libvirtd".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_version_parses_this_kernel() {
        let (release, major, _) = kernel_version();
        assert!(major >= 3, "{release}");
    }
}
