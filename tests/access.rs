//! Every request is served with the caller's identity (uid, gid and
//! supplementary groups), never with the daemon's root powers: with
//! `-o allow_other` (the README's fstab line) anyone may use the mount, and
//! whatever the backing would refuse them must be refused through it too.
//!
//! Each test runs the same operations, as the same user, on a plain local
//! directory (beside the backing, so on the same filesystem: ext4 on the
//! test machines) and through the mount, and requires
//! the same results; the local results are also checked against what POSIX
//! says, so the comparison cannot pass with both sides wrong. Every test runs
//! on passthrough (`--io auto` as root) and relay (the set-id tests on
//! cached too), with and without `-o default_permissions`, as root, as nobody without groups, and as nobody
//! with a supplementary group. The daemon starts with root's groups (0 and
//! disk), as from a root login shell, so a daemon that leaks its own groups
//! to callers is caught.

mod common;

use common::*;
use std::fs::{self, File};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Runs file operations given on its command line (`op args -- op args`) in
/// one process, and prints one line per operation: `op args: ok [result]` or
/// `op args: ERRNO`. Paths are relative, so the output is the same for the
/// local directory and the mount when the behaviour is.
const PROBE: &str = r#"
import errno, os, stat, struct, sys

def run(op, a):
    if op == "umask":
        os.umask(int(a[0], 8)); return ""
    if op == "read":
        fd = os.open(a[0], os.O_RDONLY)
        try: os.read(fd, 1)
        finally: os.close(fd)
        return ""
    if op == "tread":
        # A read from a second thread: FUSE names the thread, not the process.
        import threading
        err = []
        def body():
            try: run("read", a)
            except OSError as e: err.append(e)
        t = threading.Thread(target=body); t.start(); t.join()
        if err: raise err[0]
        return ""
    if op == "write":
        fd = os.open(a[0], os.O_WRONLY)
        try: os.write(fd, b"w")
        finally: os.close(fd)
        return ""
    if op == "append":
        fd = os.open(a[0], os.O_WRONLY | os.O_APPEND)
        try: os.write(fd, b"a")
        finally: os.close(fd)
        return ""
    if op == "trunc":
        os.close(os.open(a[0], os.O_WRONLY | os.O_TRUNC)); return ""
    if op == "truncate":
        os.truncate(a[0], int(a[1])); return ""
    if op == "create":
        flags = os.O_CREAT | os.O_RDWR | (os.O_EXCL if "excl" in a[2:] else 0)
        fd = os.open(a[0], flags, int(a[1], 8))
        try: os.write(fd, b"c")
        finally: os.close(fd)
        return ""
    if op == "mkdir":
        os.mkdir(a[0], int(a[1], 8)); return ""
    if op == "chgrp":
        os.chown(a[0], -1, int(a[1])); return ""
    if op == "chmod":
        os.chmod(a[0], int(a[1], 8)); return ""
    if op == "stat":
        st = os.lstat(a[0]); return "%o %d:%d" % (st.st_mode, st.st_uid, st.st_gid)
    if op == "access":
        m = (os.R_OK if "r" in a[1] else 0) | (os.W_OK if "w" in a[1] else 0)
        if not os.access(a[0], m): raise OSError(errno.EACCES, "access")
        return ""
    if op == "setx":
        os.setxattr(a[0], a[1], a[2].encode()); return ""
    if op == "getx":
        return os.getxattr(a[0], a[1]).decode()
    if op == "rmx":
        os.removexattr(a[0], a[1]); return ""
    if op == "listx":
        return ",".join(sorted(os.listxattr(a[0])))
    if op == "mknod":
        kinds = {"c": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO, "s": stat.S_IFSOCK}
        dev = os.makedev(1, 3) if a[1] in "cb" else 0
        os.mknod(a[0], kinds[a[1]] | 0o644, dev); return ""
    if op == "rdev":
        st = os.lstat(a[0]); return "%d,%d" % (os.major(st.st_rdev), os.minor(st.st_rdev))
    if op == "utime-nofollow":
        s = int(a[1]); os.utime(a[0], (s, s), follow_symlinks=False); return ""
    if op == "times":
        st = os.lstat(a[0]); return "%d %d" % (st.st_atime, st.st_mtime)
    if op == "ls":
        return ",".join(sorted(os.listdir(a[0])))
    if op == "link":
        os.link(a[0], a[1]); return ""
    raise SystemExit("probe: unknown op " + op)

ops, cur = [], []
for x in sys.argv[1:]:
    if x == "--":
        ops.append(cur); cur = []
    else:
        cur.append(x)
ops.append(cur)
for o in ops:
    if not o:
        continue
    try:
        r = run(o[0], o[1:])
        print(" ".join(o) + ": ok" + (" " + r if r else ""))
    except OSError as e:
        print(" ".join(o) + ": " + errno.errorcode.get(e.errno, str(e.errno)))
"#;

/// Who runs a script.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Who {
    Root,
    /// uid/gid 65534, no supplementary groups.
    Nobody,
    /// uid/gid 65534 with supplementary group 65533.
    NobodyG,
    /// uid/gid 65534 with supplementary group 6 (disk).
    NobodyDisk,
}

const USERS: [Who; 4] = [Who::Root, Who::Nobody, Who::NobodyG, Who::NobodyDisk];

impl Who {
    fn name(self) -> &'static str {
        match self {
            Who::Root => "root",
            Who::Nobody => "nobody",
            Who::NobodyG => "nobodyg",
            Who::NobodyDisk => "nobodydisk",
        }
    }

    fn command(self) -> Command {
        let groups = match self {
            Who::Root => return Command::new("sh"),
            Who::Nobody => "--clear-groups".to_string(),
            Who::NobodyG => "--groups=65533".to_string(),
            Who::NobodyDisk => "--groups=6".to_string(),
        };
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", &groups, "sh"]);
        c
    }
}

/// One mount configuration of the matrix.
#[derive(Clone, Copy, Debug)]
struct Cfg {
    io: &'static str,
    default_permissions: bool,
}

const MATRIX: [Cfg; 4] = [
    Cfg {
        io: "auto",
        default_permissions: false,
    },
    Cfg {
        io: "auto",
        default_permissions: true,
    },
    Cfg {
        io: "relay",
        default_permissions: false,
    },
    Cfg {
        io: "relay",
        default_permissions: true,
    },
];

/// A `migsafe mount` started with root's supplementary groups (0 and disk),
/// as from a root login shell; unmounted and stopped on drop.
struct Daemon {
    mountpoint: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    fn start(dir: &Path, backing: &Path, args: &[String]) -> Daemon {
        let mountpoint = dir.join("mnt");
        fs::create_dir(&mountpoint).unwrap();
        let log = dir.join("mnt.log");
        let log_file = File::create(&log).unwrap();
        let child = Command::new("setpriv")
            .arg("--groups=0,6")
            .arg(BIN)
            .arg("mount")
            .args(args)
            .arg(backing)
            .arg(&mountpoint)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("spawn migsafe");
        let mut d = Daemon {
            mountpoint,
            log,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !is_mounted(&d.mountpoint) {
            if let Some(st) = d.child.as_mut().unwrap().try_wait().unwrap() {
                d.child = None;
                panic!("migsafe exited ({st}) before mounting:\n{}", d.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "mount not live after 15 s:\n{}",
                d.log_text()
            );
            sleep(Duration::from_millis(20));
        }
        d
    }

    /// The `Groups:` line of every thread of the daemon.
    fn thread_groups(&self) -> Vec<String> {
        let pid = self.child.as_ref().expect("daemon running").id();
        let mut out = Vec::new();
        for t in fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let status = fs::read_to_string(t.unwrap().path().join("status")).unwrap_or_default();
            if let Some(l) = status.lines().find(|l| l.starts_with("Groups:")) {
                out.push(l.to_string());
            }
        }
        out
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if is_mounted(&self.mountpoint) {
            let _ = Command::new("umount").arg(&self.mountpoint).status();
            if is_mounted(&self.mountpoint) {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(&self.mountpoint)
                    .status();
            }
        }
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A local directory and a mounted backing directory prepared by the same
/// setup script. Field order: the daemon goes before the directory it is in.
struct Bed {
    d: Daemon,
    local: PathBuf,
    backing: PathBuf,
    probe: PathBuf,
    cfg: Cfg,
    _dir: common::Scratch,
}

/// `setup` runs as root with `sh -e` in both directories (and `$P` names the
/// probe); then the backing is mounted with `-o allow_other` and `cfg`.
fn bed(cfg: Cfg, setup: &str, extra: &[&str]) -> Bed {
    assert!(
        Path::new("/usr/bin/python3").exists(),
        "the access tests run their probe with /usr/bin/python3 (scripts/install-deps.sh installs it)"
    );
    let dir = scratch();
    // Unprivileged callers must reach the mountpoint and the probe.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let probe = dir.path().join("probe.py");
    fs::write(&probe, PROBE).unwrap();
    fs::set_permissions(&probe, fs::Permissions::from_mode(0o644)).unwrap();
    let local = dir.path().join("local");
    let backing = dir.path().join("backing");
    for d in [&local, &backing] {
        fs::create_dir(d).unwrap();
        fs::set_permissions(d, fs::Permissions::from_mode(0o777)).unwrap();
        let out = Command::new("sh")
            .args(["-ec", setup])
            .current_dir(d)
            .env("P", format!("/usr/bin/python3 {}", probe.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "setup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut opts = "allow_other".to_string();
    if cfg.default_permissions {
        opts.push_str(",default_permissions");
    }
    let mut args = vec!["--io".to_string(), cfg.io.to_string(), "-o".into(), opts];
    args.extend(
        extra
            .iter()
            .map(|s| s.replace("{local}", &local.display().to_string())),
    );
    let d = Daemon::start(dir.path(), &backing, &args);
    Bed {
        d,
        local,
        backing,
        probe,
        cfg,
        _dir: dir,
    }
}

impl Bed {
    /// Runs `script` with `sh -c` as `who` in `cwd`; `$P` is the probe and
    /// `$W` the user's name (for per-user file names). Returns stdout and
    /// stderr.
    fn run_in(&self, who: Who, cwd: &Path, script: &str) -> String {
        let out = who
            .command()
            .arg("-c")
            .arg(script)
            .current_dir(cwd)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LC_ALL", "C")
            .env("P", format!("/usr/bin/python3 {}", self.probe.display()))
            .env("W", who.name())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Runs `script` as `who` in the local directory and in the mount,
    /// requires the same output, and returns the local one.
    fn same(&self, who: Who, script: &str) -> String {
        let local = self.run_in(who, &self.local, script);
        let mounted = self.run_in(who, &self.d.mountpoint, script);
        assert_eq!(
            mounted,
            local,
            "{:?} as {who:?}: through the mount (left) differs from the local directory (right)\nscript: {script}\nlog:\n{}",
            self.cfg,
            self.d.log_text()
        );
        local
    }

    fn passthrough(&self) -> bool {
        self.d.log_text().contains("data path=passthrough")
    }
}

fn expect(out: &str, lines: &[&str], what: &str) {
    for l in lines {
        assert!(
            out.lines().any(|o| o == *l),
            "{what}: expected the line {l:?} in:\n{out}"
        );
    }
}

/// Item 7: the caller's supplementary groups apply, the daemon's never do.
#[test]
fn supplementary_groups_are_the_callers() {
    if !require_root() {
        return;
    }
    let setup = "
        echo secret > s640; chmod 640 s640
        echo disk > disk660; chgrp 6 disk660; chmod 660 disk660
        mkdir g775; chgrp 65533 g775; chmod 775 g775
        echo g > g640; chgrp 65533 g640; chmod 640 g640
        for w in root nobody nobodyg nobodydisk; do
            echo x > own-$w; chown 65534:65534 own-$w
        done";
    let script = "$P read s640 -- write disk660 -- read g640 -- tread g640 \
         -- create g775/new-$W 644 excl -- stat g775/new-$W \
         -- chgrp own-$W 65533 -- stat own-$W -- create mine-$W 755 excl -- chgrp mine-$W 0 \
         -- chmod mine-$W 2755 -- stat mine-$W";
    for cfg in MATRIX {
        let b = bed(cfg, setup, &[]);
        for who in USERS {
            let out = b.same(who, script);
            match who {
                Who::Root => expect(&out, &["read s640: ok", "chgrp mine-root 0: ok"], "root"),
                Who::Nobody => expect(
                    &out,
                    &[
                        "read s640: EACCES",
                        "write disk660: EACCES",
                        "tread g640: EACCES",
                        "create g775/new-nobody 644 excl: EACCES",
                        "chgrp own-nobody 65533: EPERM",
                        "chgrp mine-nobody 0: EPERM",
                        "stat mine-nobody: ok 102755 65534:65534",
                    ],
                    "nobody without groups",
                ),
                Who::NobodyG => expect(
                    &out,
                    &[
                        "read s640: EACCES",
                        "read g640: ok",
                        "tread g640: ok",
                        "create g775/new-nobodyg 644 excl: ok",
                        "stat g775/new-nobodyg: ok 100644 65534:65534",
                        "chgrp own-nobodyg 65533: ok",
                        "stat own-nobodyg: ok 100644 65534:65533",
                    ],
                    "nobody in group 65533",
                ),
                Who::NobodyDisk => expect(
                    &out,
                    &["write disk660: ok", "read s640: EACCES"],
                    "nobody in group disk",
                ),
            }
        }
        if cfg.io == "auto" {
            assert!(b.passthrough(), "--io auto as root must use passthrough");
        }
        // Between requests every thread is back to the daemon's identity,
        // which has no groups at all (it was started with 0 and 6).
        for g in b.d.thread_groups() {
            assert_eq!(
                g.trim_end(),
                "Groups:",
                "{cfg:?}: a daemon thread keeps groups"
            );
        }
    }
}
/// Item 8: xattrs are read and changed as the caller.
#[test]
fn xattrs_are_served_as_the_caller() {
    if !require_root() {
        return;
    }
    let setup = "
        echo z > x600; chmod 600 x600; $P setx x600 user.a root
        echo z > pub644; chmod 644 pub644; $P setx pub644 user.a root
        for w in root nobody nobodyg nobodydisk; do
            echo x > own-$w; chown 65534:65534 own-$w
        done";
    let script = "$P getx x600 user.a -- setx x600 user.b $W -- rmx x600 user.a -- listx x600 \
         -- getx pub644 user.a -- setx pub644 user.b $W -- rmx pub644 user.a \
         -- setx own-$W user.b $W -- getx own-$W user.b -- listx own-$W -- rmx own-$W user.b \
         -- setx own-$W trusted.t $W";
    for cfg in MATRIX {
        let b = bed(cfg, setup, &["--xattr"]);
        // Nobody first: root's run would remove the attributes they probe.
        for who in [Who::Nobody, Who::NobodyG, Who::Root] {
            let out = b.same(who, script);
            if who == Who::Nobody {
                expect(
                    &out,
                    &[
                        "getx x600 user.a: EACCES",
                        "setx x600 user.b nobody: EACCES",
                        "rmx x600 user.a: EACCES",
                        "getx pub644 user.a: ok root",
                        "setx pub644 user.b nobody: EACCES",
                        "rmx pub644 user.a: EACCES",
                        "setx own-nobody user.b nobody: ok",
                        "getx own-nobody user.b: ok nobody",
                        "setx own-nobody trusted.t nobody: EPERM",
                    ],
                    "nobody",
                );
            }
        }
        for f in ["x600", "pub644"] {
            assert_eq!(
                b.run_in(Who::Root, &b.backing, &format!("$P listx {f}")),
                b.run_in(Who::Root, &b.local, &format!("$P listx {f}")),
                "{cfg:?}: xattrs of {f} in the backing differ from the local directory's"
            );
        }
    }
}

/// Item 8: a `--device` entry is opened only by whom its node's owner and
/// mode let open the node itself (owner bits, group bits for the node's group
/// as gid or supplementary group, else other bits; root passes).
#[test]
fn device_entries_check_the_nodes_owner_and_mode() {
    if !require_root() {
        return;
    }
    let dir = scratch();
    let img = dir.path().join("lun.img");
    make_file(&img, 1 << 20, 0x5a);
    let lo = LoopDev::attach(&img);
    let rdev = fs::metadata(&lo.path).unwrap().rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    // The node lives in the local directory, so the same probe on the node
    // itself is the reference.
    let setup = format!(r#"if [ "${{PWD##*/}}" = local ]; then mknod lun b {major} {minor}; fi"#);
    let script = "$P read lun -- write lun -- access lun r -- access lun w -- access lun rw";
    let cases = [
        ("0:0", "600"),
        ("0:6", "660"),
        ("65534:65534", "600"),
        ("0:65533", "640"),
        ("0:0", "606"),
    ];
    for cfg in MATRIX {
        let b = bed(cfg, &setup, &["--device", "lun={local}/lun"]);
        for (owner, mode) in cases {
            let node = b.local.join("lun");
            sh(&format!(
                "chown {owner} {0} && chmod {mode} {0}",
                node.display()
            ));
            if cfg.default_permissions {
                // The kernel checks its cached attributes (1 s TTL).
                sleep(Duration::from_millis(1100));
            }
            if (owner, mode) == ("0:0", "600") {
                // A node cannot be truncated, so there is no local reference:
                // truncate(2) needs write permission, and to the device's
                // size it is a no-op.
                let t = "$P truncate lun 1048576";
                let m = &b.d.mountpoint;
                expect(
                    &b.run_in(Who::Root, m, t),
                    &["truncate lun 1048576: ok"],
                    "root",
                );
                let out = b.run_in(Who::Nobody, m, t);
                expect(&out, &["truncate lun 1048576: EACCES"], "nobody");
            }
            for who in USERS {
                let out = b.same(who, script);
                let (read, write) = match (owner, mode, who) {
                    (_, _, Who::Root) => (true, true),
                    ("0:0", "600", _) => (false, false),
                    ("0:6", "660", Who::NobodyDisk) => (true, true),
                    ("0:6", "660", _) => (false, false),
                    ("65534:65534", "600", _) => (true, true),
                    ("0:65533", "640", Who::NobodyG) => (true, false),
                    ("0:65533", "640", _) => (false, false),
                    ("0:0", "606", _) => (true, true),
                    _ => unreachable!(),
                };
                let res = |ok: bool| if ok { "ok" } else { "EACCES" };
                expect(
                    &out,
                    &[
                        &format!("read lun: {}", res(read)),
                        &format!("write lun: {}", res(write)),
                    ],
                    &format!("{who:?} on a {owner} {mode} node"),
                );
            }
        }
    }
    drop(lo);
}

/// Item 9: the kernel applies the caller's umask before the request; the
/// daemon must not apply its own again. And a create whose mode excludes
/// the access it opens with succeeds, as on any local filesystem (git does
/// this for its object files).
#[test]
fn umask_once_and_create_with_a_mode_excluding_the_open() {
    if !require_root() {
        return;
    }
    let script = "$P umask 0 -- create f666-$W 666 -- mkdir d777-$W 777 -- mknod p-$W p \
         -- stat f666-$W -- stat d777-$W -- stat p-$W \
         -- umask 027 -- create f640-$W 666 -- mkdir d750-$W 777 -- stat f640-$W -- stat d750-$W \
         -- umask 022 -- create ro-$W 444 excl -- stat ro-$W -- read ro-$W -- create ro-$W 444 excl
         umask 0; touch t-$W; mkdir td-$W; stat -c '%a %n' t-$W td-$W";
    for cfg in MATRIX {
        let b = bed(cfg, "", &[]);
        for who in USERS {
            let out = b.same(who, script);
            let w = who.name();
            expect(
                &out,
                &[
                    &format!("stat d777-{w}: ok 40777 {}", ids(who)),
                    &format!("stat f666-{w}: ok 100666 {}", ids(who)),
                    &format!("stat p-{w}: ok 10644 {}", ids(who)),
                    &format!("stat f640-{w}: ok 100640 {}", ids(who)),
                    &format!("stat d750-{w}: ok 40750 {}", ids(who)),
                    &format!("create ro-{w} 444 excl: ok"),
                    &format!("stat ro-{w}: ok 100444 {}", ids(who)),
                    &format!("666 t-{w}"),
                    &format!("777 td-{w}"),
                ],
                &format!("{who:?}"),
            );
        }
    }
}

/// `uid:gid` of the files `who` creates in a plain directory.
fn ids(who: Who) -> &'static str {
    match who {
        Who::Root => "0:0",
        _ => "65534:65534",
    }
}

/// Item 10: a write or truncate by anyone without CAP_FSETID clears the
/// set-uid bit and the set-gid bit of a group-executable file, as the
/// kernel does on a local filesystem; root's keep them.
#[test]
fn writes_by_others_clear_set_id_bits() {
    if !require_root() {
        return;
    }
    let setup = "
        for w in root nobody nobodyg nobodydisk; do
            for f in su asu tsu; do echo data > $f-$w; chmod 4777 $f-$w; done
            for f in sg tsg; do echo data > $f-$w; chmod 2777 $f-$w; done
            echo data > sug-$w; chmod 6777 sug-$w
            # chown first: a chown clears the bits.
            echo data > osu-$w; chown 65534:65534 osu-$w; chmod 4777 osu-$w
            echo data > nsg-$w; chown 0:65533 nsg-$w; chmod 2767 nsg-$w
        done";
    let script = "$P write su-$W -- stat su-$W -- write sg-$W -- stat sg-$W \
         -- write sug-$W -- stat sug-$W -- append asu-$W -- stat asu-$W \
         -- trunc tsu-$W -- stat tsu-$W -- trunc tsg-$W -- stat tsg-$W \
         -- write osu-$W -- stat osu-$W";
    // Set-gid without group execute is cleared by a writer outside the
    // file's group only; the kernel asks FUSE filesystems to clear it on
    // writes it sees (relay) but not on passthrough writes, so that case is
    // checked on relay.
    let relay_script = "$P write nsg-$W -- stat nsg-$W";
    for cfg in ALL_DATA_PATHS {
        let b = bed(cfg, setup, &[]);
        for who in USERS {
            let out = b.same(who, script);
            let w = who.name();
            let lines: Vec<String> = if who == Who::Root {
                vec![
                    "write su-root: ok".into(),
                    "stat su-root: ok 104777 0:0".into(),
                    "stat sg-root: ok 102777 0:0".into(),
                    "stat tsu-root: ok 104777 0:0".into(),
                    "stat osu-root: ok 104777 65534:65534".into(),
                ]
            } else {
                vec![
                    format!("write su-{w}: ok"),
                    format!("stat su-{w}: ok 100777 0:0"),
                    format!("stat sg-{w}: ok 100777 0:0"),
                    format!("stat sug-{w}: ok 100777 0:0"),
                    format!("append asu-{w}: ok"),
                    format!("stat asu-{w}: ok 100777 0:0"),
                    format!("trunc tsu-{w}: ok"),
                    format!("stat tsu-{w}: ok 100777 0:0"),
                    format!("stat tsg-{w}: ok 100777 0:0"),
                    format!("stat osu-{w}: ok 100777 65534:65534"),
                ]
            };
            let lines: Vec<&str> = lines.iter().map(|s| s.as_str()).collect();
            expect(&out, &lines, &format!("{who:?}"));
            if cfg.io == "relay" {
                let out = b.same(who, relay_script);
                let mode = match who {
                    Who::Root | Who::NobodyG => "102767",
                    _ => "100767",
                };
                let line = format!("stat nsg-{}: ok {mode} 0:65533", who.name());
                expect(&out, &[&line], &format!("{who:?}"));
            }
        }
    }
}

/// Every data path: the matrix, and the cached path of regular files.
const ALL_DATA_PATHS: [Cfg; 6] = [
    MATRIX[0],
    MATRIX[1],
    MATRIX[2],
    MATRIX[3],
    Cfg {
        io: "cached",
        default_permissions: false,
    },
    Cfg {
        io: "cached",
        default_permissions: true,
    },
];

/// Issue: a caller who may write a root-owned 6777 file but does not own it
/// could `chmod 0777` (or `2777`) it: the backing refused (EPERM) and the
/// daemon retried as itself, taking the chmod for the kernel clearing set-id
/// bits for a writer. Only the owner (or CAP_FOWNER) changes a mode, as on
/// ext4; the clearing for a writer still works afterwards.
#[test]
fn only_the_owner_changes_a_set_id_files_mode() {
    if !require_root() {
        return;
    }
    let setup = "
        for w in root nobody nobodyg nobodydisk; do
            for f in a b c; do echo data > $f-$w; chmod 6777 $f-$w; done
            echo data > own-$w; chown 65534:65534 own-$w; chmod 6777 own-$w
        done";
    let script = "$P chmod a-$W 0777 -- stat a-$W -- chmod b-$W 2777 -- stat b-$W \
         -- chmod c-$W 4777 -- stat c-$W -- chmod own-$W 0777 -- stat own-$W \
         -- write a-$W -- stat a-$W";
    for cfg in ALL_DATA_PATHS {
        let b = bed(cfg, setup, &[]);
        for who in USERS {
            let out = b.same(who, script);
            let w = who.name();
            let lines: Vec<String> = if who == Who::Root {
                vec![
                    "chmod a-root 0777: ok".into(),
                    "chmod b-root 2777: ok".into(),
                    "stat b-root: ok 102777 0:0".into(),
                    "chmod own-root 0777: ok".into(),
                    "write a-root: ok".into(),
                ]
            } else {
                vec![
                    format!("chmod a-{w} 0777: EPERM"),
                    format!("chmod b-{w} 2777: EPERM"),
                    format!("chmod c-{w} 4777: EPERM"),
                    format!("stat c-{w}: ok 106777 0:0"),
                    format!("chmod own-{w} 0777: ok"),
                    format!("stat own-{w}: ok 100777 65534:65534"),
                    // The kernel's clearing for a writer still goes through.
                    format!("write a-{w}: ok"),
                    format!("stat a-{w}: ok 100777 0:0"),
                ]
            };
            let lines: Vec<&str> = lines.iter().map(|s| s.as_str()).collect();
            expect(&out, &lines, &format!("{cfg:?} {who:?}"));
        }
        if cfg.io == "cached" {
            assert!(
                b.d.log_text().contains("data path=cached"),
                "expected the cached data path:\n{}",
                b.d.log_text()
            );
        }
    }
}

/// Item 11: operations ordinary tools need work as on the backing: mknod
/// of every node type (the mount is nodev, so device nodes are inert
/// through it; only root may make them), times of a symlink itself
/// (`touch -h`, `cp -a`), and listing a directory that may be read but not
/// searched.
#[test]
fn mknod_symlink_times_and_unsearchable_directories() {
    if !require_root() {
        return;
    }
    let setup = "
        echo t > target; touch -d @1100000000 target; ln -s target rootlnk
        for w in root nobody nobodyg nobodydisk; do
            mkdir d600-$w; touch d600-$w/a d600-$w/b; chown -R 65534:65534 d600-$w; chmod 600 d600-$w
            mkdir d300-$w; touch d300-$w/a; chown -R 65534:65534 d300-$w; chmod 300 d300-$w
        done";
    let script = "$P mknod c-$W c -- rdev c-$W -- stat c-$W -- mknod b-$W b -- rdev b-$W \
         -- mknod p-$W p -- stat p-$W -- mknod s-$W s -- stat s-$W \
         -- ls d600-$W -- ls d300-$W -- utime-nofollow rootlnk 1000000000
         ln -s target lnk-$W
         $P utime-nofollow lnk-$W 1000000000 -- times lnk-$W -- times target
         touch -h -d @1200000000 lnk-$W && stat -c '%X %Y' lnk-$W
         cp -a lnk-$W cp-$W && stat -c '%X %Y %N' cp-$W
         $P times target";
    for cfg in MATRIX {
        let b = bed(cfg, setup, &[]);
        for who in USERS {
            let out = b.same(who, script);
            let w = who.name();
            let mut lines = vec![
                format!("stat p-{w}: ok 10644 {}", ids(who)),
                format!("stat s-{w}: ok 140644 {}", ids(who)),
                format!("ls d600-{w}: ok a,b"),
                format!("utime-nofollow lnk-{w} 1000000000: ok"),
                format!("times lnk-{w}: ok 1000000000 1000000000"),
                "1200000000 1200000000".to_string(),
                format!("1200000000 1200000000 'cp-{w}' -> 'target'"),
                "times target: ok 1100000000 1100000000".to_string(),
            ];
            if who == Who::Root {
                lines.extend([
                    "mknod c-root c: ok".to_string(),
                    "rdev c-root: ok 1,3".to_string(),
                    "stat c-root: ok 20644 0:0".to_string(),
                    "rdev b-root: ok 1,3".to_string(),
                    "utime-nofollow rootlnk 1000000000: ok".to_string(),
                    // CAP_DAC_READ_SEARCH.
                    "ls d300-root: ok a".to_string(),
                ]);
            } else {
                lines.extend([
                    format!("mknod c-{w} c: EPERM"),
                    format!("mknod b-{w} b: EPERM"),
                    "utime-nofollow rootlnk 1000000000: EPERM".to_string(),
                    format!("ls d300-{w}: EACCES"),
                ]);
            }
            let lines: Vec<&str> = lines.iter().map(|s| s.as_str()).collect();
            expect(&out, &lines, &format!("{who:?}"));
        }
    }
}

/// Search permission on every directory of a path is checked on every
/// walk, as on the backing: a name looked up (or created) a moment ago
/// must not stay reachable through a directory its owner has just made
/// unsearchable (pjdfstest's `*/05.t`). Everything runs in one process, so
/// each step follows the previous one within milliseconds.
#[test]
fn unsearchable_directory_stops_names_looked_up_before() {
    if !require_root() {
        return;
    }
    let setup = "
        for w in root nobody nobodyg nobodydisk; do
            mkdir d-$w; echo x > d-$w/f; chmod 666 d-$w/f; chown -R 65534:65534 d-$w
        done";
    let script = "$P stat d-$W/f -- create d-$W/new 644 -- mkdir d-$W/sub 755 -- chmod d-$W 644 \
         -- stat d-$W/f -- read d-$W/f -- write d-$W/f -- truncate d-$W/f 1 -- chmod d-$W/f 600 \
         -- chgrp d-$W/f 65534 -- access d-$W/f r -- link d-$W/f l-$W -- stat d-$W/new \
         -- stat d-$W/sub -- chmod d-$W 755 -- stat d-$W/f -- link d-$W/f l-$W";
    for cfg in MATRIX {
        let b = bed(cfg, setup, &[]);
        for who in USERS {
            let out = b.same(who, script);
            let w = who.name();
            let denied = [
                "stat d-{w}/f",
                "read d-{w}/f",
                "write d-{w}/f",
                "truncate d-{w}/f 1",
                "chmod d-{w}/f 600",
                "chgrp d-{w}/f 65534",
                "access d-{w}/f r",
                "link d-{w}/f l-{w}",
                "stat d-{w}/new",
                "stat d-{w}/sub",
            ];
            let lines: Vec<String> = if who == Who::Root {
                // CAP_DAC_READ_SEARCH: root searches any directory.
                vec![
                    "chmod d-root 644: ok".into(),
                    "read d-root/f: ok".into(),
                    "link d-root/f l-root: ok".into(),
                ]
            } else {
                let mut l: Vec<String> = denied
                    .iter()
                    .map(|op| format!("{}: EACCES", op.replace("{w}", w)))
                    .collect();
                l.push(format!("chmod d-{w} 755: ok"));
                l.push(format!("stat d-{w}/f: ok 100666 65534:65534"));
                l.push(format!("link d-{w}/f l-{w}: ok"));
                l
            };
            let lines: Vec<&str> = lines.iter().map(|s| s.as_str()).collect();
            expect(&out, &lines, &format!("{cfg:?} {who:?}"));
        }
    }
}
