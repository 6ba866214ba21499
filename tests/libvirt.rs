//! The distribution's libvirtd (qemu driver, TCG) running a domain whose disk
//! is on a migsafe mount, with `examples/libvirt-hook.sh` installed as its
//! qemu hook the way an operator installs it.
//!
//! The daemon is private: a root libvirtd has fixed paths (/etc/libvirt,
//! /run/libvirt, /var/lib/libvirt, ...), so it runs in its own mount
//! namespace where temp directories are bound over those paths, and the
//! migsafe mount over /run/migsafe (the hook's default MNT). Nothing on the
//! host's own /etc, /run or /var is touched; `virsh` reaches the daemon
//! through its socket in the temp directory. QEMU runs as the distribution's
//! qemu user (`libvirt-qemu`); where that user does not exist (only
//! libvirt-daemon-system creates it), the namespace gets a passwd and group
//! file that have it.

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Where the hook looks by default, and so where the domain's disk lives
/// inside the daemon's namespace.
const NS_MNT: &str = "/run/migsafe";
/// Debian's qemu driver runs QEMU as this user (`qemu_user` at build time).
const QEMU_USER: &str = "libvirt-qemu";

/// True if libvirtd, virsh, QEMU and unshare are installed (CI installs them
/// with scripts/install-deps.sh; elsewhere the test says loudly it skips).
fn have_libvirt() -> bool {
    require_root()
        && have_tool("libvirtd")
        && have_tool("virsh")
        && have_tool("qemu-system-x86_64")
        && have_tool("unshare")
}

/// stdout and stderr of a finished command, for messages.
fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A private libvirtd, its temp root and what it started; on drop every
/// domain is destroyed and undefined, the daemon is stopped and any QEMU it
/// left is killed (by the pid libvirt recorded), so a failing test leaves no
/// process behind.
struct Libvirtd {
    root: PathBuf,
    child: Option<Child>,
    /// The uid QEMU runs as.
    qemu_uid: u32,
}

impl Libvirtd {
    /// Sets up the root (config, state, the hook) and starts the daemon with
    /// `mnt` bound over /run/migsafe in its namespace. `qemu_conf` is the
    /// content of its /etc/libvirt/qemu.conf.
    fn start(root: &Path, mnt: &Path, qemu_conf: &str) -> Libvirtd {
        for d in [
            "etc/hooks",
            "var/lib/libvirt",
            "var/log/libvirt",
            "var/cache/libvirt",
            "var/tmp",
            "run/migsafe",
        ] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        for (link, to) in [("var/run", "/run"), ("var/lock", "/run/lock")] {
            let _ = std::os::unix::fs::symlink(to, root.join(link));
        }
        for f in ["libvirt.conf", "libvirt-admin.conf"] {
            let _ = fs::copy(Path::new("/etc/libvirt").join(f), root.join("etc").join(f));
        }
        // The operator's install: the hook file itself, executable, named
        // after the driver.
        let hook = root.join("etc/hooks/qemu");
        fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/libvirt-hook.sh"),
            &hook,
        )
        .unwrap();
        fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();

        let mut binds = Vec::new();
        let qemu_uid = match nix::unistd::User::from_name(QEMU_USER).unwrap() {
            Some(u) => u.uid.as_raw(),
            None => {
                let uid = free_id();
                let mut passwd = fs::read_to_string("/etc/passwd").unwrap();
                passwd.push_str(&format!(
                    "{QEMU_USER}:x:{uid}:{uid}:Libvirt Qemu:/var/lib/libvirt:/usr/sbin/nologin\n"
                ));
                let mut group = fs::read_to_string("/etc/group").unwrap();
                group.push_str(&format!("{QEMU_USER}:x:{uid}:\n"));
                fs::write(root.join("passwd"), passwd).unwrap();
                fs::write(root.join("group"), group).unwrap();
                binds.push((root.join("passwd"), PathBuf::from("/etc/passwd")));
                binds.push((root.join("group"), PathBuf::from("/etc/group")));
                uid
            }
        };
        // Order matters: /run first and then the mount over /run/migsafe
        // (whose target only exists in the new /run), /var last, so that no
        // source is hidden by an earlier bind (the root is under /tmp).
        let mut all = vec![
            (root.join("run"), PathBuf::from("/run")),
            (mnt.to_path_buf(), PathBuf::from(NS_MNT)),
            (root.join("etc"), PathBuf::from("/etc/libvirt")),
        ];
        all.extend(binds);
        // Where root may use /dev/kvm but the qemu user may not (here: mode
        // 0600; a distribution host has 0660 root:kvm with the qemu user in
        // kvm), libvirt 9.0 finds KVM in the capabilities it probed but not
        // in its access check as the qemu user, calls its capability cache
        // outdated at every lookup and probes QEMU again, for minutes. The
        // domain is TCG anyway: in the namespace /dev/kvm is an empty file no
        // QEMU can use. libvirt cannot carry a file mounted under /dev into
        // the private /dev it builds for QEMU ("Unable to move ... mount to
        // /dev/kvm: Invalid argument"), so then QEMU shares the daemon's
        // /dev (`namespaces = []`); the rest of the set-up is the default.
        let mut qemu_conf = qemu_conf.to_string();
        if Path::new("/dev/kvm").exists() {
            let nokvm = root.join("nokvm");
            fs::File::create(&nokvm).unwrap();
            fs::set_permissions(&nokvm, fs::Permissions::from_mode(0o600)).unwrap();
            all.push((nokvm, PathBuf::from("/dev/kvm")));
            qemu_conf.push_str("namespaces = []\n");
        }
        fs::write(root.join("etc/qemu.conf"), qemu_conf).unwrap();
        all.push((root.join("var"), PathBuf::from("/var")));
        let mut script = String::from("set -e\n");
        for (from, to) in &all {
            script.push_str(&format!(
                "mount --bind '{}' '{}'\n",
                from.display(),
                to.display()
            ));
        }
        script.push_str("exec libvirtd\n");
        let log = fs::File::create(root.join("libvirtd.out")).unwrap();
        // unshare execs the shell in the new namespace and the shell execs
        // libvirtd: the child's pid is the daemon's.
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .env(
                "LIBVIRT_LOG_OUTPUTS",
                format!("3:file:{}", root.join("libvirtd.log").display()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn unshare libvirtd");
        let mut d = Libvirtd {
            root: root.to_path_buf(),
            child: Some(child),
            qemu_uid,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if d.root.join("run/libvirt/libvirt-sock").exists() {
                let out = d.virsh(&["uri"]);
                if out.status.success() {
                    return d;
                }
            }
            if let Some(st) = d.child.as_mut().unwrap().try_wait().unwrap() {
                d.child = None;
                panic!("libvirtd exited ({st}) before it listened:\n{}", d.logs());
            }
            assert!(
                Instant::now() < deadline,
                "libvirtd not listening after 60s:\n{}",
                d.logs()
            );
            sleep(Duration::from_millis(100));
        }
    }

    fn uri(&self) -> String {
        format!(
            "qemu:///system?socket={}",
            self.root.join("run/libvirt/libvirt-sock").display()
        )
    }

    /// `virsh -c URI args...`, whatever its exit status.
    fn virsh(&self, args: &[&str]) -> Output {
        Command::new("virsh")
            .arg("-c")
            .arg(self.uri())
            .args(args)
            .output()
            .expect("spawn virsh")
    }

    /// `virsh args...`, panicking with its output and the daemon's logs
    /// unless it succeeds; returns stdout.
    fn virsh_ok(&self, args: &[&str]) -> String {
        let out = self.virsh(args);
        assert!(
            out.status.success(),
            "virsh {args:?} failed ({}): {}\n{}",
            out.status,
            text(&out),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn domstate(&self, name: &str) -> String {
        self.virsh_ok(&["domstate", name]).trim().to_string()
    }

    /// The pid of a running domain's QEMU, from libvirt's pid file.
    fn qemu_pid(&self, name: &str) -> Option<u32> {
        let p = self.root.join(format!("run/libvirt/qemu/{name}.pid"));
        fs::read_to_string(p).ok()?.trim().parse().ok()
    }

    /// libvirtd's warnings and errors and the domains' QEMU logs.
    fn logs(&self) -> String {
        let mut s = String::new();
        for f in ["libvirtd.out", "libvirtd.log"] {
            s.push_str(&format!(
                "--- {f} ---\n{}\n",
                fs::read_to_string(self.root.join(f)).unwrap_or_default()
            ));
        }
        if let Ok(dir) = fs::read_dir(self.root.join("var/log/libvirt/qemu")) {
            for e in dir.flatten() {
                s.push_str(&format!(
                    "--- {} ---\n{}\n",
                    e.path().display(),
                    fs::read_to_string(e.path()).unwrap_or_default()
                ));
            }
        }
        s
    }

    /// Destroys and undefines every domain, stops the daemon and waits for
    /// it; returns its exit status (None if it had to be killed).
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        if child.try_wait().ok().flatten().is_none() {
            let list = self.virsh(&["list", "--all", "--name"]);
            for name in String::from_utf8_lossy(&list.stdout).split_whitespace() {
                let _ = self.virsh(&["destroy", name]);
                let _ = self.virsh(&["undefine", name]);
            }
        }
        let mut child = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(st) = child.try_wait().ok().flatten() {
                break Some(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            sleep(Duration::from_millis(50));
        };
        // A QEMU the daemon left running (it does not stop domains when it
        // exits) would keep the namespace, and so the mount, alive.
        let pids = fs::read_dir(self.root.join("run/libvirt/qemu"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
            .filter_map(|e| {
                fs::read_to_string(e.path())
                    .ok()?
                    .trim()
                    .parse::<i32>()
                    .ok()
            });
        for p in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        status
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A uid (and gid) that neither /etc/passwd nor /etc/group uses, for the
/// namespace's qemu user.
fn free_id() -> u32 {
    (64055..65000)
        .find(|&id| {
            nix::unistd::User::from_uid(id.into())
                .ok()
                .flatten()
                .is_none()
                && nix::unistd::Group::from_gid(id.into())
                    .ok()
                    .flatten()
                    .is_none()
        })
        .expect("a free uid/gid between 64055 and 65000")
}

/// A temp directory under /tmp, traversable by the qemu user: not under
/// $TMPDIR, which may be under /var or /run, the paths the daemon's
/// namespace replaces.
fn libvirt_root() -> tempfile::TempDir {
    let t = tempfile::Builder::new()
        .prefix("migsafe-test-libvirt-")
        .tempdir_in("/tmp")
        .expect("create temp dir");
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
    t
}

/// A minimal TCG domain: q35, 64 MiB, one virtio disk at `disk` (a path
/// inside the daemon's namespace) with the page cache on (writeback), no OS:
/// the firmware finds nothing to boot and keeps the guest running.
/// `source_extra` goes inside `<source>` (a `<seclabel>`).
fn domain_xml(name: &str, disk: &str, source_extra: &str) -> String {
    format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='writeback'/>
      <source file='{disk}'>{source_extra}</source>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
"
    )
}

/// virtlogd is started by systemd's socket activation on a distribution
/// machine; without it QEMU's output goes to a plain file.
const QEMU_CONF: &str = "stdio_handler = \"file\"\n";

/// A migsafe mount with one 16 MiB image `vm1.img` and a private libvirtd
/// that sees it at /run/migsafe, with a domain defined on it. Fields drop in
/// order: the daemon (and its QEMU) first, then the mount, then the files.
struct Bed {
    lv: Libvirtd,
    m: Mount,
    backing: PathBuf,
    root: tempfile::TempDir,
}

const VM1: &str = "migsafe-test-vm1";

impl Bed {
    fn new(qemu_conf: &str) -> Bed {
        let root = libvirt_root();
        let backing = root.path().join("backing");
        fs::create_dir_all(&backing).unwrap();
        fs::File::create(backing.join("vm1.img"))
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        // allow_other: QEMU runs as the qemu user, not as the mounting root.
        let m = Mount::start(root.path(), &backing, &["-o", "allow_other"]);
        let lv = Libvirtd::start(root.path(), &m.mountpoint, qemu_conf);
        let bed = Bed {
            lv,
            m,
            backing,
            root,
        };
        bed.define(VM1, &format!("{NS_MNT}/vm1.img"));
        bed
    }

    fn define(&self, name: &str, disk: &str) {
        self.define_with(name, disk, "");
    }

    fn define_with(&self, name: &str, disk: &str, source_extra: &str) {
        let xml = self.root.path().join(format!("{name}.xml"));
        fs::write(&xml, domain_xml(name, disk, source_extra)).unwrap();
        self.lv.virsh_ok(&["define", xml.to_str().unwrap()]);
    }

    /// Undefines every domain, stops the daemon and unmounts, asserting that
    /// each step succeeded.
    fn finish(self) {
        let Bed { mut lv, m, .. } = self;
        let list = lv.virsh_ok(&["list", "--all", "--name"]);
        for name in list.split_whitespace() {
            lv.virsh_ok(&["undefine", name]);
        }
        let list = lv.virsh_ok(&["list", "--all", "--name"]);
        assert_eq!(list.trim(), "", "no domain left");
        let st = lv.stop().expect("libvirtd exits on SIGTERM");
        assert!(st.success(), "libvirtd exit: {st}");
        drop(lv);
        let mp = m.mountpoint.clone();
        assert_eq!(m.stop(), Some(0), "migsafe exits cleanly after the daemon");
        assert!(!is_mounted(&mp), "{} still mounted", mp.display());
    }
}

/// `virsh start` / `virsh destroy` of a domain whose disk is on the mount:
/// the hook activates the image before QEMU starts (and refuses the start
/// when activation fails), QEMU (as the qemu user) opens the image through
/// the mount, the hook flushes it when the domain stopped, and nothing is
/// left: domains undefined, daemon stopped, mount unmounted.
#[test]
fn libvirtd_runs_a_domain_on_the_mount_with_the_hook() {
    if !have_libvirt() {
        return;
    }
    let bed = Bed::new(QEMU_CONF);
    let (lv, m) = (&bed.lv, &bed.m);
    assert_eq!(lv.domstate(VM1), "shut off");

    lv.virsh_ok(&["start", VM1]);
    assert_eq!(lv.domstate(VM1), "running", "{}", lv.logs());
    let img = status_image(m, "vm1.img");
    // The hook's `activate` at prepare/begin is the only activation.
    assert_eq!(img["counters"]["activations"], 1, "hook activated: {img}");
    assert_eq!(img["state"], "active", "{img}");
    assert!(
        m.log_text().contains("activate vm1.img: ok"),
        "{}",
        m.log_text()
    );
    let pid = lv.qemu_pid(VM1).expect("libvirt's QEMU pid file");
    let handles = img["open_handles"].as_array().expect("open_handles");
    assert!(
        handles
            .iter()
            .any(|h| h["pid"] == pid && h["writable"] == true),
        "QEMU (pid {pid}) holds the image open for writing through the mount: {img}"
    );
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert!(comm.starts_with("qemu-system"), "pid {pid} is {comm}");
    let uid = fs::metadata(format!("/proc/{pid}")).unwrap().uid();
    assert_eq!(uid, lv.qemu_uid, "QEMU runs as {QEMU_USER}");
    // libvirt's DAC driver chowned the image, through the mount, to QEMU's
    // user (and gives it back at stop, below).
    let owner = fs::metadata(bed.backing.join("vm1.img")).unwrap().uid();
    assert_eq!(
        owner, lv.qemu_uid,
        "image owner on the backing while running"
    );

    lv.virsh_ok(&["destroy", VM1]);
    assert_eq!(lv.domstate(VM1), "shut off");
    let img = status_image(m, "vm1.img");
    assert_eq!(img["open_handles"], serde_json::json!([]), "{img}");
    assert!(
        m.log_text().contains("flush vm1.img: ok"),
        "the hook flushed at stopped/end: {}",
        m.log_text()
    );
    let owner = fs::metadata(bed.backing.join("vm1.img")).unwrap().uid();
    assert_eq!(owner, 0, "libvirt gave the image back to root at stop");

    // Negative control: when `activate` fails the hook refuses, libvirt
    // starts no QEMU and shows the hook's reason. The image must exist (a
    // missing disk could be refused by libvirt itself); a directory is an
    // image path the mount refuses to activate (EINVAL).
    fs::create_dir(bed.backing.join("vm2.img")).unwrap();
    let vm2 = "migsafe-test-vm2";
    bed.define(vm2, &format!("{NS_MNT}/vm2.img"));
    let out = lv.virsh(&["start", vm2]);
    let t = text(&out);
    assert!(!out.status.success(), "start must be refused: {t}");
    for needle in ["migsafe-hook", "activate", "vm2.img", "refusing to start"] {
        assert!(t.contains(needle), "virsh shows the hook's {needle:?}: {t}");
    }
    assert_eq!(lv.domstate(vm2), "shut off");
    assert!(lv.qemu_pid(vm2).is_none(), "no QEMU for a refused start");

    // README's way to keep libvirt from giving an image back to root after
    // a migration: no DAC relabelling for the disk, the image owned by the
    // qemu user. Control first: root's image stays root's, QEMU cannot open
    // it, so libvirt really did not chown it.
    let vm3_img = bed.backing.join("vm3.img");
    fs::File::create(&vm3_img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let vm3 = "migsafe-test-vm3";
    bed.define_with(
        vm3,
        &format!("{NS_MNT}/vm3.img"),
        "<seclabel model='dac' relabel='no'/>",
    );
    let out = lv.virsh(&["start", vm3]);
    assert!(
        !out.status.success() && text(&out).contains("Permission denied"),
        "a root-owned image with relabel='no' is not QEMU's: {}",
        text(&out)
    );
    assert_eq!(fs::metadata(&vm3_img).unwrap().uid(), 0);
    std::os::unix::fs::chown(&vm3_img, Some(lv.qemu_uid), Some(lv.qemu_uid)).unwrap();
    lv.virsh_ok(&["start", vm3]);
    assert_eq!(lv.domstate(vm3), "running");
    lv.virsh_ok(&["destroy", vm3]);
    assert_eq!(
        fs::metadata(&vm3_img).unwrap().uid(),
        lv.qemu_uid,
        "libvirt left the owner alone at stop"
    );
    bed.finish();
}

/// What `virsh migrate --live` does with a disk on the mount, as README and
/// examples/virsh-migrate.sh tell the operator: libvirt's storage check
/// refuses a FUSE mount as non-shared storage; `--unsafe` skips that check
/// (the migration then goes on to the destination: here the same daemon,
/// which refuses a migration to itself, the next step after the check);
/// `shared_filesystems` in qemu.conf declares the mount shared where the
/// libvirt version knows that setting (its qemu.conf lens lists it) and
/// changes nothing where it does not (Debian 12's libvirt 9.0).
#[test]
fn virsh_migrate_live_refuses_the_mount_as_non_shared_storage() {
    if !have_libvirt() {
        return;
    }
    const REFUSAL: &str = "Migration without shared storage is unsafe";
    // The check after the storage check: the destination is this daemon.
    const SAME_HOST: &str = "migrate guest to the same host";
    let migrate = |bed: &Bed, extra: &[&str]| {
        let uri = bed.lv.uri();
        let mut args = vec!["migrate", "--live"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[VM1, &uri]);
        let out = bed.lv.virsh(&args);
        assert!(!out.status.success(), "{}", text(&out));
        text(&out)
    };
    let bed = Bed::new(QEMU_CONF);
    bed.lv.virsh_ok(&["start", VM1]);
    let t = migrate(&bed, &[]);
    assert!(t.contains(REFUSAL), "plain --live is refused: {t}");
    let t = migrate(&bed, &["--unsafe"]);
    assert!(
        !t.contains(REFUSAL) && t.contains(SAME_HOST),
        "--unsafe passes the storage check: {t}"
    );
    assert_eq!(bed.lv.domstate(VM1), "running", "the domain kept running");
    bed.lv.virsh_ok(&["destroy", VM1]);
    bed.finish();

    let knows = fs::read_to_string("/usr/share/augeas/lenses/libvirtd_qemu.aug")
        .map(|l| l.contains("shared_filesystems"))
        .unwrap_or(false);
    let conf = format!("{QEMU_CONF}shared_filesystems = [ \"{NS_MNT}\" ]\n");
    let bed = Bed::new(&conf);
    bed.lv.virsh_ok(&["start", VM1]);
    let t = migrate(&bed, &[]);
    if knows {
        assert!(
            !t.contains(REFUSAL) && t.contains(SAME_HOST),
            "this libvirt knows shared_filesystems: the mount counts as shared: {t}"
        );
    } else {
        assert!(
            t.contains(REFUSAL),
            "this libvirt has no shared_filesystems: still refused: {t}"
        );
    }
    bed.lv.virsh_ok(&["destroy", VM1]);
    bed.finish();
}
