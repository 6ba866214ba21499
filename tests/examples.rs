//! The shell scripts in examples/, scripts/ and debian/ parse (`bash -n`) and pass
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
    // The package's maintainer scripts (no .sh suffix).
    for name in ["postinst", "prerm", "postrm"] {
        out.push(root.join("debian").join(name));
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
    umount_retrying(&mnt);
    assert!(!is_mounted(&mnt));
}

// ---------------------------------------------------------------------------
// examples/qemu-migrate.sh under injected failures.
//
// Two "hosts" on this machine: host A (source, reached as 127.0.0.2) and host
// B (destination, 127.0.0.1), each a migsafe `--device disk.img=/dev/loopN`
// mount over its own loop device of one image file (two page caches over one
// LUN). The script reaches them through `ssh` on PATH: a fake ssh that runs
// the command in a fresh mount namespace where the script's MNT and QMP
// directory are bind mounts of that host's own, and that fails (status 255,
// like a refused connection) on the call numbers listed in $WORK/fail-at.

const FAKE_SSH: &str = r#"#!/bin/bash
# fake ssh [-o OPT]... USER@HOST COMMAND...: runs COMMAND as host HOST would.
while [[ ${1:-} == -o ]]; do shift 2; done
host=${1#*@}
shift
work=$FAKE_SSH_WORK
n=$(flock "$work/ssh.count" bash -c 'n=$(( $(cat "$1") + 1 )); echo "$n" >"$1"; echo "$n"' _ "$work/ssh.count")
printf '%s %s %s\n' "$n" "$host" "$*" >>"$work/ssh.log"
if [[ " $(cat "$work/fail-at" 2>/dev/null) " == *" $n "* ]]; then
    echo "ssh: connect to host $host port 22: Connection refused (injected, call $n)" >&2
    exit 255
fi
case $host in
127.0.0.2) h=A ;;
127.0.0.1) h=B ;;
*) echo "fake ssh: unknown host $host" >&2; exit 255 ;;
esac
exec unshare -m --propagation private bash -c \
    'mount --bind "$1" "$2" && mount --bind "$3" "$4" && exec bash -c "$5"' \
    _ "$work/mnt-$h" "$work/mnt" "$work/run-$h" "$work/run" "$*"
"#;

/// query-status of the QEMU whose QMP socket is argv[1]; "gone" if none answers.
const QMP_PY: &str = r#"
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
except OSError:
    print("gone"); sys.exit(0)
f = s.makefile("rw")
def reply():
    while True:
        line = f.readline()
        if not line:
            print("gone"); sys.exit(0)
        r = json.loads(line)
        if "event" not in r:
            return r
reply()
for cmd in [{"execute": "qmp_capabilities"}] + [json.loads(a) for a in sys.argv[2:]]:
    f.write(json.dumps(cmd) + "\n"); f.flush()
    r = reply()
    if "error" in r:
        sys.exit("qmp error: %s" % r["error"])
f.write(json.dumps({"execute": "query-status"}) + "\n"); f.flush()
print(reply()["return"]["status"])
"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Host {
    A,
    B,
}

impl Host {
    fn name(self) -> &'static str {
        match self {
            Host::A => "A",
            Host::B => "B",
        }
    }
    fn addr(self) -> &'static str {
        match self {
            Host::A => "127.0.0.2",
            Host::B => "127.0.0.1",
        }
    }
}

/// Kills every QEMU of the bed (by the pids in its pidfiles) on drop.
struct Qemus(PathBuf);

impl Qemus {
    fn kill_all(&self) {
        for h in ["A", "B"] {
            let pidfile = self.0.join(format!("run-{h}/qemu.pid"));
            let Ok(text) = std::fs::read_to_string(&pidfile) else {
                continue;
            };
            let Ok(pid) = text.trim().parse::<i32>() else {
                continue;
            };
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGKILL);
            for _ in 0..200 {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            let _ = std::fs::remove_file(&pidfile);
        }
    }
}

impl Drop for Qemus {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// The two-host bed. Fields drop in order: QEMUs, then mounts, then loops.
struct Bed {
    qemus: Qemus,
    mounts: Vec<Mount>,
    _loops: Vec<LoopDev>,
    work: PathBuf,
    port: u16,
}

/// What a run of the script left behind.
#[derive(Debug)]
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    vm: [String; 2],
    image: [String; 2],
    calls: usize,
}

impl Outcome {
    fn describe(&self) -> String {
        format!(
            "exit {:?}; QEMU A {} B {}; image A {} B {}; {} ssh calls\n--- stdout ---\n{}--- stderr ---\n{}",
            self.code,
            self.vm[0],
            self.vm[1],
            self.image[0],
            self.image[1],
            self.calls,
            self.stdout,
            self.stderr
        )
    }

    /// The guest runs on exactly one host, the image is active there and
    /// inactive on the other host, and the script's last word names it.
    fn runs_on_one_host(&self) -> Host {
        let d = self.describe();
        let running: Vec<usize> = (0..2).filter(|&i| self.vm[i] == "running").collect();
        assert_eq!(
            running.len(),
            1,
            "the guest must run on exactly one host: {d}"
        );
        let host = if running[0] == 0 { Host::A } else { Host::B };
        let other = 1 - running[0];
        assert_eq!(
            self.image[running[0]], "active",
            "image active where it runs: {d}"
        );
        assert_eq!(
            self.image[other], "inactive",
            "image inactive on the other host: {d}"
        );
        assert!(
            matches!(self.vm[other].as_str(), "gone"),
            "the other host's QEMU was quit: {d}"
        );
        let say = format!("RESULT: the VM runs on {}", host.addr());
        assert!(self.stdout.contains(&say), "the script says {say:?}: {d}");
        host
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Bed {
    fn new(scratch: &Path) -> Bed {
        let work = scratch.to_path_buf();
        for d in ["bin", "mnt", "run", "run-A", "run-B", "empty-A", "empty-B"] {
            std::fs::create_dir_all(work.join(d)).unwrap();
        }
        let ssh = work.join("bin/ssh");
        std::fs::write(&ssh, FAKE_SSH).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(work.join("qmp.py"), QMP_PY).unwrap();
        let lun = work.join("lun.img");
        let f = std::fs::File::create(&lun).unwrap();
        f.set_len(16 << 20).unwrap();
        let loops = vec![LoopDev::attach(&lun), LoopDev::attach(&lun)];
        let mut mounts = Vec::new();
        for (i, h) in ["A", "B"].iter().enumerate() {
            let dev = format!("disk.img={}", loops[i].path.display());
            let m = Mount::start(&work, &work.join(format!("empty-{h}")), &["--device", &dev]);
            // The fake ssh binds each host's mount by this name.
            let link = work.join(format!("mnt-{h}"));
            let _ = std::fs::remove_dir(&link);
            std::os::unix::fs::symlink(&m.mountpoint, &link).unwrap();
            mounts.push(m);
        }
        Bed {
            qemus: Qemus(work.clone()),
            mounts,
            _loops: loops,
            work,
            port: free_port(),
        }
    }

    fn qemu_cmd(&self, incoming: bool) -> String {
        let w = self.work.display();
        format!(
            "qemu-system-x86_64 -accel tcg -nodefaults -display none -M q35 -m 64 \
             -drive if=none,id=d0,file={w}/mnt/disk.img,format=raw,cache=writeback,file.locking=off \
             -device virtio-blk-pci,drive=d0 -daemonize -pidfile {w}/run/qemu.pid \
             -qmp unix:{w}/run/vm.qmp,server=on,wait=off{}",
            if incoming { " -S -incoming defer" } else { "" }
        )
    }

    fn ssh(&self, host: Host, cmd: &str) {
        let out = Command::new(self.work.join("bin/ssh"))
            .arg(format!("root@{}", host.addr()))
            .arg(cmd)
            .env("FAKE_SSH_WORK", &self.work)
            .output()
            .unwrap();
        assert!(out.status.success(), "fake ssh {cmd}: {out:?}");
    }

    fn qmp(&self, host: Host, cmds: &[&str]) -> String {
        let sock = self.work.join(format!("run-{}/vm.qmp", host.name()));
        let out = Command::new("/usr/bin/python3")
            .arg(self.work.join("qmp.py"))
            .arg(sock)
            .args(cmds)
            .output()
            .unwrap();
        assert!(out.status.success(), "qmp {cmds:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn image_state(&self, i: usize) -> String {
        let text = std::fs::read_to_string(self.mounts[i].ctl("status")).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        v["images"]
            .as_array()
            .and_then(|a| a.iter().find(|img| img["path"] == "disk.img"))
            .and_then(|img| img["state"].as_str())
            .unwrap_or("?")
            .to_string()
    }

    /// A fresh start: no QEMU, the image active on A and inactive on B, the
    /// source VM running on A, the ssh counter at 0.
    fn reset(&self, fail_at: &[usize]) {
        self.qemus.kill_all();
        ctl_write(&self.mounts[0].ctl("activate"), "disk.img\n").expect("activate on A");
        ctl_write(&self.mounts[1].ctl("inactivate"), "disk.img\n").expect("inactivate on B");
        let _ = std::fs::remove_file(self.work.join("run-A/vm.qmp"));
        let _ = std::fs::remove_file(self.work.join("run-B/vm.qmp"));
        std::fs::write(self.work.join("fail-at"), "").unwrap();
        std::fs::write(self.work.join("ssh.count"), "0\n").unwrap();
        self.ssh(Host::A, &self.qemu_cmd(false));
        assert_eq!(self.qmp(Host::A, &[]), "running", "source VM");
        std::fs::write(self.work.join("ssh.count"), "0\n").unwrap();
        std::fs::write(self.work.join("ssh.log"), "").unwrap();
        let list: Vec<String> = fail_at.iter().map(|n| n.to_string()).collect();
        std::fs::write(self.work.join("fail-at"), list.join(" ")).unwrap();
    }

    fn script(&self, env: &[(&str, &str)]) -> Command {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/qemu-migrate.sh");
        let mut cmd = Command::new("bash");
        cmd.arg(script)
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    self.work.join("bin").display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .env("FAKE_SSH_WORK", &self.work)
            .env("SRC", Host::A.addr())
            .env("DST", Host::B.addr())
            .env("IMAGE", "disk.img")
            .env("MNT", self.work.join("mnt"))
            .env("QMP", self.work.join("run/vm.qmp"))
            .env("PORT", self.port.to_string())
            .env("DST_START", self.qemu_cmd(true))
            .env("SSH_RETRY_DELAY", "0.1")
            .env("MIGRATE_TIMEOUT", "60")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        // The Ctrl-C case sends SIGINT, but a shell cannot trap a signal
        // that was ignored when it started, and a test run launched as a
        // background job without job control inherits SIGINT ignored: give
        // the script the default disposition, as an operator's terminal would.
        // SAFETY: between fork and exec only signal(2), which is
        // async-signal-safe, is called.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                Ok(())
            });
        }
        cmd
    }

    fn outcome(&self, out: std::process::Output) -> Outcome {
        let calls = std::fs::read_to_string(self.work.join("ssh.log"))
            .unwrap_or_default()
            .lines()
            .count();
        Outcome {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            vm: [self.qmp(Host::A, &[]), self.qmp(Host::B, &[])],
            image: [self.image_state(0), self.image_state(1)],
            calls,
        }
    }

    fn run(&self, fail_at: &[usize], env: &[(&str, &str)]) -> Outcome {
        self.reset(fail_at);
        let out = run_with_timeout(self.script(env), 180);
        self.outcome(out)
    }

    /// Makes the source's migration crawl (1 KiB/s: it never completes).
    fn throttle_source(&self) {
        self.qmp(
            Host::A,
            &[r#"{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":1024}}"#],
        );
    }
}

/// Runs `cmd`, killing it after `secs` (a hung script is a failure, not a
/// hung test).
fn run_with_timeout(mut cmd: Command, secs: u64) -> std::process::Output {
    let child = cmd.spawn().expect("spawn script");
    let pid = child.id();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = done.clone();
    let watchdog = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while std::time::Instant::now() < deadline {
            if flag.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::SIGKILL,
        );
    });
    let out = child.wait_with_output().expect("wait script");
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = watchdog.join();
    out
}

fn migration_bed_tools() -> bool {
    require_root()
        && have_tool("qemu-system-x86_64")
        && have_tool("socat")
        && have_tool("unshare")
        && have_tool("flock")
}

#[test]
fn qemu_migrate_succeeds_and_survives_every_failed_step() {
    if !migration_bed_tools() {
        return;
    }
    let tmp = scratch();
    let bed = Bed::new(tmp.path());

    // No failure: the guest moves to B.
    let ok = bed.run(&[], &[]);
    assert_eq!(ok.code, Some(0), "{}", ok.describe());
    assert_eq!(ok.runs_on_one_host(), Host::B, "{}", ok.describe());
    let total = ok.calls;
    assert!(total >= 8, "{}", ok.describe());

    // One ssh failure anywhere (the retry covers it): still on B.
    for n in [1, total / 2, total] {
        let o = bed.run(&[n], &[]);
        assert_eq!(
            o.runs_on_one_host(),
            Host::B,
            "ssh failure on call {n}: {}",
            o.describe()
        );
    }

    // Every step failing for good (all its tries): the guest still runs on
    // exactly one host, and the script says which.
    for n in 1..=total {
        let o = bed.run(&[n, n + 1, n + 2], &[]);
        let host = o.runs_on_one_host();
        eprintln!(
            "step {n} of {total} failing -> runs on {host:?}, exit {:?}",
            o.code
        );
        if host == Host::A {
            assert_ne!(
                o.code,
                Some(0),
                "an aborted migration is not exit 0: {}",
                o.describe()
            );
        }
    }
    drop(bed);
}

#[test]
fn qemu_migrate_rolls_back_on_timeout_qmp_error_refusal_and_ctrl_c() {
    if !migration_bed_tools() {
        return;
    }
    let tmp = scratch();
    let bed = Bed::new(tmp.path());

    // A migration that never completes: the poll times out.
    bed.reset(&[]);
    bed.throttle_source();
    let out = run_with_timeout(bed.script(&[("MIGRATE_TIMEOUT", "3")]), 120);
    let o = bed.outcome(out);
    assert_eq!(o.runs_on_one_host(), Host::A, "{}", o.describe());
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert!(
        o.stdout.contains("after 3 s"),
        "says it timed out: {}",
        o.describe()
    );

    // A QMP error: the destination cannot listen on the port.
    let busy = std::net::TcpListener::bind(("0.0.0.0", bed.port)).unwrap();
    let o = bed.run(&[], &[]);
    drop(busy);
    assert_eq!(o.runs_on_one_host(), Host::A, "{}", o.describe());
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert!(
        o.stderr.contains("migrate-incoming") && o.stderr.contains("failed"),
        "names the failed QMP command: {}",
        o.describe()
    );

    // activate refused on the destination: a process there maps the LUN,
    // so its pages cannot be dropped (EBUSY). (invalidate-on-open would
    // already refuse QEMU's open there: off, to reach activate.)
    ctl_write(&bed.mounts[1].ctl("invalidate-on-open"), "off\n").unwrap();
    let dev = bed._loops[1].path.clone();
    let mut holder = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import mmap,os,sys,time\n\
             fd=os.open(sys.argv[1],os.O_RDONLY)\n\
             m=mmap.mmap(fd,1<<20,prot=mmap.PROT_READ)\n\
             s=sum(m[i] for i in range(0,1<<20,4096))\n\
             print('ready',flush=True)\n\
             time.sleep(600)",
        ])
        .arg(&dev)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let holder = ChildGuard(holder);
    assert_eq!(line.trim(), "ready");
    let o = bed.run(&[], &[]);
    drop(holder);
    ctl_write(&bed.mounts[1].ctl("invalidate-on-open"), "on\n").unwrap();
    assert_eq!(o.runs_on_one_host(), Host::A, "{}", o.describe());
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert!(
        o.stdout.contains("EBUSY") && o.stdout.contains("activate on 127.0.0.1 failed"),
        "says activate was refused: {}",
        o.describe()
    );

    // Ctrl-C while the migration runs.
    bed.reset(&[]);
    bed.throttle_source();
    let child = bed.script(&[]).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let log = std::fs::read_to_string(bed.work.join("ssh.log")).unwrap_or_default();
        if log.contains("query-migrate") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the script never polled: {log}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let o = bed.outcome(out);
    assert_eq!(o.runs_on_one_host(), Host::A, "{}", o.describe());
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert!(
        o.stdout.contains("interrupted by SIGINT"),
        "{}",
        o.describe()
    );

    // The destination unreachable from `cont` on: it cannot be known whether
    // the guest runs there, so the source is NOT resumed (that could run the
    // guest twice) and the script says so.
    bed.reset(&[]);
    let ok = bed.run(&[], &[]);
    let log = std::fs::read_to_string(bed.work.join("ssh.log")).unwrap();
    let cont = log
        .lines()
        .find(|l| l.contains(r#""execute":"cont""#))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or_else(|| panic!("no cont call: {}", ok.describe()));
    let o = bed.run(&(cont..cont + 100).collect::<Vec<_>>(), &[]);
    assert_eq!(o.code, Some(4), "{}", o.describe());
    assert!(o.stdout.contains("RESULT: UNKNOWN"), "{}", o.describe());
    assert_ne!(
        o.vm[0],
        "running",
        "the source was not resumed: {}",
        o.describe()
    );
    assert_ne!(o.vm[1], "running", "{}", o.describe());
    drop(bed);
}

/// libvirt shows a failing hook's stderr in its error: the hook must put
/// the reason there (the image, the command, the errno), not bash's
/// `printf: write error`.
#[test]
fn libvirt_hook_failure_says_why_on_stderr() {
    if !require_root() || !have_tool("mountpoint") {
        return;
    }
    let tmp = scratch();
    let back = tmp.path().join("back");
    std::fs::create_dir_all(&back).unwrap();
    make_file(&back.join("vm1.img"), 1 << 20, 0);
    let m = Mount::start(tmp.path(), &back, &[]);
    let hook = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/libvirt-hook.sh");
    let run = |domain: &str, image: &str| {
        let xml = format!(
            "<domain><name>{domain}</name><devices><disk type='file' device='disk'>\
             <source file='{}/{image}'/></disk></devices></domain>",
            m.mountpoint.display()
        );
        let mut child = Command::new("bash")
            .arg(&hook)
            .args([domain, "prepare", "begin", "-"])
            .env("MNT", &m.mountpoint)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(xml.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let domain = format!("migsafe-test-{}", std::process::id());
    // Control: a start on an image that is there activates it, silently.
    ctl_write(&m.ctl("inactivate"), "vm1.img\n").unwrap();
    let (code, out, err) = run(&domain, "vm1.img");
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(
        (out.as_str(), err.as_str()),
        ("", ""),
        "nothing on stdout or stderr"
    );
    assert_eq!(status_image(&m, "vm1.img")["state"], "active");

    let (code, out, err) = run(&domain, "missing.img");
    assert_eq!(code, Some(1), "{out}{err}");
    assert_eq!(out, "", "stdout stays empty (libvirt may read it as XML)");
    assert!(!err.contains("write error"), "{err}");
    for needle in ["activate", "missing.img", "ENOENT", "refusing"] {
        assert!(err.contains(needle), "stderr names {needle:?}: {err}");
    }
}

/// virsh-migrate.sh explains libvirt's refusal of a FUSE mount as
/// non-shared storage, and only that refusal. libvirt's side is injected:
/// a `virsh` on PATH that fails with libvirt's own message (or another);
/// ssh to the destination runs the command on this host, on a real mount.
#[test]
fn virsh_migrate_explains_the_shared_storage_refusal() {
    if !require_root() {
        return;
    }
    let tmp = scratch();
    let back = tmp.path().join("back");
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&back).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    make_file(&back.join("vm1.img"), 1 << 20, 0);
    let m = Mount::start(tmp.path(), &back, &[]);
    use std::os::unix::fs::PermissionsExt;
    let tool = |name: &str, body: &str| {
        let p = bin.join(name);
        std::fs::write(&p, format!("#!/bin/bash\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    tool(
        "ssh",
        r#"while [[ $1 == -o ]]; do shift 2; done; shift; exec bash -c "$*""#,
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/virsh-migrate.sh");
    let run = |virsh_error: &str| {
        tool("virsh", &format!("echo {virsh_error:?} >&2; exit 1"));
        let out = Command::new("bash")
            .arg(&script)
            .args(["vm1", "dst-host", "vm1.img"])
            .env("MNT", &m.mountpoint)
            .env(
                "PATH",
                format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
            )
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run("error: Unsafe migration: Migration without shared storage is unsafe");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("Migration without shared storage is unsafe"),
        "virsh's error shown: {err}"
    );
    assert!(err.contains("still runs here"), "{err}");
    for needle in [
        "shared_filesystems",
        "--unsafe",
        &m.mountpoint.display().to_string(),
    ] {
        assert!(err.contains(needle), "the hint names {needle:?}: {err}");
    }
    // Another failure: no such hint.
    let (code, err) = run("error: Requested operation is not valid: domain is not running");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("domain is not running") && !err.contains("shared_filesystems"),
        "{err}"
    );
}
