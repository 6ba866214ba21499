//! `migsafe mount`: validate the command line, mount, serve until unmounted
//! or signalled.

use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{Config, MountOption, SessionACL};

use crate::backing::{self, DeviceSpec};
use crate::fs::{FsConfig, IoMode, MigsafeFs};
use crate::settings::{Key, Settings};
use crate::sys;

/// Everything `migsafe mount` was told.
#[derive(Debug, Clone)]
pub struct MountArgs {
    pub backing: PathBuf,
    pub mountpoint: PathBuf,
    pub devices: Vec<(String, PathBuf)>,
    pub io: IoMode,
    pub threads: usize,
    pub ctl_name: String,
    pub settings: Vec<(Key, String)>,
    pub xattr: bool,
    pub options: Vec<String>,
    pub daemon: bool,
    pub pid_file: Option<PathBuf>,
    /// Where a `--daemon` mount writes its log once detached (else nowhere).
    pub log_file: Option<PathBuf>,
    pub max_write: u32,
}

/// A start-up error: printed as one line, exit status 1.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, StartError> {
    Err(StartError(msg.into()))
}

/// Default event-loop threads: one per CPU, at least 2 so a slow backing
/// read never stalls every other request.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(2)
}

fn check_mountpoint(path: &Path) -> Result<(), StartError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => err(format!("mountpoint {} is not a directory", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => err(format!(
            "mountpoint {} does not exist (create it with mkdir -p)",
            path.display()
        )),
        Err(e) => err(format!("mountpoint {}: {e}", path.display())),
    }
}

/// Splits `-o` options into kernel/fuser mount options and migsafe's own
/// `key=value` settings (so fstab lines can carry them).
fn apply_options(args: &mut MountArgs) -> Result<(Vec<MountOption>, SessionACL), StartError> {
    let mut opts = Vec::new();
    let mut acl = SessionACL::Owner;
    let mut fsname = None;
    for opt in args.options.clone().iter().flat_map(|o| o.split(',')) {
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        match (key, value) {
            ("", _) => {}
            ("allow_other", None) => acl = SessionACL::All,
            ("allow_root", None) => acl = SessionACL::RootAndOwner,
            ("default_permissions", None) => opts.push(MountOption::DefaultPermissions),
            ("auto_unmount", None) => opts.push(MountOption::AutoUnmount),
            ("ro", None) => opts.push(MountOption::RO),
            ("rw", None) => opts.push(MountOption::RW),
            ("dev", None) => opts.push(MountOption::Dev),
            ("nodev", None) => opts.push(MountOption::NoDev),
            ("suid", None) => opts.push(MountOption::Suid),
            ("nosuid", None) => opts.push(MountOption::NoSuid),
            ("exec", None) => opts.push(MountOption::Exec),
            ("noexec", None) => opts.push(MountOption::NoExec),
            ("atime", None) => opts.push(MountOption::Atime),
            ("noatime", None) => opts.push(MountOption::NoAtime),
            ("sync", None) => opts.push(MountOption::Sync),
            ("async", None) => opts.push(MountOption::Async),
            ("dirsync", None) => opts.push(MountOption::DirSync),
            ("fsname", Some(v)) => fsname = Some(v.to_string()),
            ("subtype", Some(_)) => {}
            // fstab/mount(8) words that mean nothing to the filesystem.
            (
                "defaults" | "relatime" | "strictatime" | "nodiratime" | "auto" | "noauto"
                | "nofail" | "_netdev" | "user" | "users" | "nouser" | "owner" | "group",
                _,
            ) => {}
            (k, _) if k.starts_with("x-") || k == "comment" => {}
            ("io", Some(v)) => args.io = parse_io(v)?,
            ("device", Some(v)) => args.devices.push(parse_device(v)?),
            ("threads", Some(v)) => {
                args.threads = v
                    .parse()
                    .map_err(|_| StartError(format!("-o threads={v}: not a number")))?
            }
            ("ctl-name" | "ctl_name", Some(v)) => args.ctl_name = v.to_string(),
            ("xattr", None) => args.xattr = true,
            ("log" | "log-file" | "log_file", Some(v)) => args.log_file = Some(PathBuf::from(v)),
            ("pid-file" | "pid_file", Some(v)) => args.pid_file = Some(PathBuf::from(v)),
            (k, Some(v)) if Key::from_name(&k.replace('_', "-")).is_some() => {
                let key = Key::from_name(&k.replace('_', "-")).expect("checked");
                args.settings.push((key, v.to_string()));
            }
            (k, _) => {
                return err(format!(
                    "unknown mount option {k:?} (see migsafe mount --help)"
                ));
            }
        }
    }
    opts.push(MountOption::FSName(
        fsname.unwrap_or_else(|| format!("migsafe:{}", args.backing.display())),
    ));
    opts.push(MountOption::Subtype("migsafe".into()));
    Ok((opts, acl))
}

pub fn parse_io(v: &str) -> Result<IoMode, StartError> {
    match v {
        "auto" => Ok(IoMode::Auto),
        "passthrough" => Ok(IoMode::Passthrough),
        "relay" => Ok(IoMode::Relay),
        _ => err(format!(
            "invalid io mode {v:?}: expected auto, passthrough or relay"
        )),
    }
}

pub fn parse_device(v: &str) -> Result<(String, PathBuf), StartError> {
    match v.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => {
            Ok((name.to_string(), PathBuf::from(path)))
        }
        _ => err(format!(
            "invalid device {v:?}: expected NAME=PATH, e.g. disk=/dev/sdb"
        )),
    }
}

/// Mounts and serves; returns when the filesystem is unmounted.
pub fn run(mut args: MountArgs) -> Result<(), StartError> {
    let (mount_options, acl) = apply_options(&mut args)?;
    let root = backing::open_root(&args.backing).map_err(StartError)?;
    check_mountpoint(&args.mountpoint)?;
    if args.io == IoMode::Passthrough && !sys::has_cap_sys_admin() {
        return err("--io passthrough needs CAP_SYS_ADMIN (run as root); use --io relay or auto");
    }
    // A control request (up to 64 KiB) must arrive as one FUSE write, and
    // fuser's buffers hold at most 16 MiB.
    if !(128 << 10..=16 << 20).contains(&args.max_write) {
        return err(format!(
            "--max-write {}: must be between 131072 and 16777216 bytes",
            args.max_write
        ));
    }
    let settings = Arc::new(Settings::default());
    for (key, value) in &args.settings {
        settings.set(*key, value).map_err(StartError)?;
    }
    if args.ctl_name.is_empty()
        || args.ctl_name.contains('/')
        || args.ctl_name == "."
        || args.ctl_name == ".."
    {
        return err(format!("invalid --ctl-name {:?}", args.ctl_name));
    }
    let mut devices = Vec::new();
    for (name, path) in &args.devices {
        if devices.iter().any(|d: &DeviceSpec| &d.name == name) {
            return err(format!("--device {name} given twice"));
        }
        devices.push(backing::open_device(name, path, &root, &args.ctl_name).map_err(StartError)?);
    }
    if let Ok(c) = CString::new(args.ctl_name.as_bytes())
        && sys::fstatat(root.as_fd(), &c).is_ok()
    {
        log::warn!(
            "backing entry {:?} is hidden by the control directory; use --ctl-name to pick another name",
            args.ctl_name
        );
    }
    raise_fd_limit();
    if args.daemon {
        daemonize(&args)?;
    }
    // Before any thread exists: every thread inherits the blocked mask, so
    // SIGTERM/SIGINT reach only the waiting thread, which unmounts.
    let signals = block_signals();
    let config = FsConfig {
        io: args.io,
        ctl_name: args.ctl_name.clone(),
        xattr: args.xattr,
        owner_uid: nix::unistd::geteuid().as_raw(),
        owner_gid: nix::unistd::getegid().as_raw(),
        max_write: args.max_write,
        max_background: 64,
    };
    let fs = MigsafeFs::new(config, settings, root, devices)
        .map_err(|e| StartError(format!("backing {}: {e}", args.backing.display())))?;
    let notifier_slot = fs.notifier.clone();
    let mut fuse_config = Config::default();
    fuse_config.mount_options = mount_options;
    fuse_config.acl = acl;
    fuse_config.n_threads = Some(args.threads.max(1));
    fuse_config.clone_fd = true;
    let mut session = fuser::Session::new(fs, &args.mountpoint, &fuse_config).map_err(|e| {
        StartError(format!(
            "cannot mount {} on {}: {e}",
            args.backing.display(),
            args.mountpoint.display()
        ))
    })?;
    let _ = notifier_slot.set(session.notifier());
    log::info!(
        "migsafe {} serving {} on {} ({} threads)",
        env!("CARGO_PKG_VERSION"),
        args.backing.display(),
        args.mountpoint.display(),
        args.threads
    );
    if let Some(p) = &args.pid_file {
        let _ = std::fs::write(p, format!("{}\n", std::process::id()));
    }
    daemon_ready(args.log_file.as_deref());
    let mut unmounter = session.unmount_callable();
    let mountpoint = args.mountpoint.clone();
    std::thread::spawn(move || {
        if let Ok(sig) = signals.wait() {
            log::info!("{sig:?}: unmounting {}", mountpoint.display());
            if let Err(e) = unmounter.unmount() {
                log::warn!("unmount {}: {e}; detaching lazily", mountpoint.display());
                let _ = nix::mount::umount2(&mountpoint, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    });
    // Requests are served with each caller's groups (sys::FsCreds): the
    // daemon's own (root's 0 from a login shell) must never count. Only a
    // daemon that is not root (which serves as itself) cannot drop them.
    if let Err(e) = sys::drop_supplementary_groups()
        && nix::unistd::geteuid().is_root()
    {
        log::warn!(
            "cannot drop the daemon's supplementary groups ({e}); requests of non-root callers will fail with EPERM rather than use them"
        );
    }
    // The kernel has applied each caller's umask to the modes it sends;
    // the daemon's own must not mask them again. Set after the pid and log
    // files exist, which keep the daemon's umask.
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    session.run().map_err(|e| {
        StartError(format!(
            "session on {} ended: {e}",
            args.mountpoint.display()
        ))
    })?;
    log::info!("unmounted {}", args.mountpoint.display());
    Ok(())
}

/// SIGINT/SIGTERM/SIGHUP are blocked in every thread (the mask is inherited
/// by threads spawned later) and taken by one waiting thread, which unmounts.
fn block_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    let _ = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None);
    set
}

/// Each image handle holds backing fds: lift the soft limit to the hard one.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

static READY_FD: std::sync::Mutex<Option<OwnedFd>> = std::sync::Mutex::new(None);

/// Forks; the parent waits until the child reports the mount live (or its
/// start-up error) through a pipe, so `--daemon` returns only then.
fn daemonize(args: &MountArgs) -> Result<(), StartError> {
    use nix::unistd::{ForkResult, fork, pipe, setsid};
    use std::io::Read;
    let (rd, wr) = pipe().map_err(|e| StartError(format!("pipe: {e}")))?;
    // SAFETY: called before any thread is started (fuser threads start in
    // Session::run, later), so the child is a faithful copy.
    match unsafe { fork() }.map_err(|e| StartError(format!("fork: {e}")))? {
        ForkResult::Parent { .. } => {
            drop(wr);
            let mut buf = String::new();
            let _ = std::fs::File::from(rd).read_to_string(&mut buf);
            if buf.starts_with("ok") {
                std::process::exit(0);
            }
            eprintln!(
                "migsafe: mount of {} on {} failed{}",
                args.backing.display(),
                args.mountpoint.display(),
                if buf.is_empty() {
                    String::new()
                } else {
                    format!(": {}", buf.trim())
                }
            );
            std::process::exit(1);
        }
        ForkResult::Child => {
            drop(rd);
            let _ = setsid();
            *READY_FD.lock().expect("ready lock") = Some(wr);
            Ok(())
        }
    }
}

/// Tells a waiting `--daemon` parent the mount is live, then detaches from
/// its stdio: a caller capturing the mount command's output (a pipe, ssh,
/// mount.fuse3) must see end-of-file now, not at unmount. The log goes to
/// `--log-file` if given.
fn daemon_ready(log_file: Option<&Path>) {
    let Some(fd) = READY_FD.lock().expect("ready lock").take() else {
        return;
    };
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null");
    let log = log_file.and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| log::warn!("--log-file {}: {e}; logging nowhere", p.display()))
            .ok()
    });
    if let Ok(null) = &null {
        let out = log.as_ref().unwrap_or(null);
        // SAFETY: dup2 onto the standard descriptors; both sources are open.
        unsafe {
            libc::dup2(null.as_raw_fd(), 0);
            libc::dup2(out.as_raw_fd(), 1);
            libc::dup2(out.as_raw_fd(), 2);
        }
    }
    let _ = std::fs::File::from(fd).write_all(b"ok\n");
}

/// Reports a start-up error to a waiting `--daemon` parent.
pub fn report_start_error(msg: &str) {
    if let Some(fd) = READY_FD.lock().expect("ready lock").take() {
        use std::io::Write;
        let _ = std::fs::File::from(fd).write_all(msg.as_bytes());
    }
}
