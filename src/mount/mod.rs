//! `migsafe mount`: validate the command line, mount, serve until unmounted
//! or signalled.

use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{Config, MountOption, SessionACL};

use crate::backing::{self, Device};
use crate::fs::{DataPath, FsConfig, IoMode, MigsafeFs};
use crate::mountinfo::{MountEntry, mountinfo};
use crate::settings::{Key, Settings};
use crate::sys;

/// Everything `migsafe mount` was told.
#[derive(Debug, Clone)]
pub struct MountArgs {
    pub backing: PathBuf,
    pub mountpoint: PathBuf,
    pub devices: Vec<(String, PathBuf)>,
    pub io: IoMode,
    /// Data path of `--device` entries: cached (default) or relay.
    pub device_io: DataPath,
    pub threads: usize,
    pub ctl_name: String,
    pub settings: Vec<(Key, String)>,
    pub xattr: bool,
    pub options: Vec<String>,
    pub daemon: bool,
    pub pid_file: Option<PathBuf>,
    /// Where the log goes in every start form (else stderr in the
    /// foreground, syslog once detached).
    pub log_file: Option<PathBuf>,
    pub max_write: u32,
    /// `--state-file`: None for the default place, `none` for no file.
    pub state_file: Option<PathBuf>,
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
        Ok(m) if m.is_dir() => refuse_live_migsafe(path),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => err(format!(
            "mountpoint {} is a dead FUSE mount (its daemon is gone): umount -l {} and mount again; VMs must reopen their images",
            path.display(),
            path.display()
        )),
        Ok(_) => err(format!("mountpoint {} is not a directory", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => err(format!(
            "mountpoint {} does not exist (create it with mkdir -p)",
            path.display()
        )),
        Err(e) => err(format!("mountpoint {}: {e}", path.display())),
    }
}

/// True for a mount migsafe made (plain `fuse` with a `migsafe:` source is
/// what versions before `fuse.migsafe` left).
fn is_migsafe(m: &MountEntry) -> bool {
    m.fstype == FSTYPE || (m.fstype == "fuse" && m.source.starts_with("migsafe:"))
}

/// A second mount on a live migsafe mountpoint would stack over it: its
/// images and control files vanish under the new mount, and `migsafe ctl`
/// would drive the wrong daemon.
fn refuse_live_migsafe(path: &Path) -> Result<(), StartError> {
    match top_mount(path) {
        Some(m) if is_migsafe(&m) => err(format!(
            "{} is already a live migsafe mount ({}, type {}); a second mount would hide it: unmount it first (umount {}) or choose another mountpoint",
            path.display(),
            m.source,
            m.fstype,
            path.display()
        )),
        _ => Ok(()),
    }
}

/// Warnings (not refusals) about where the mount goes: entries it hides, and
/// another migsafe mount of the same backing on this host (each daemon keeps
/// its own activation state, so the two can disagree about an image).
fn warn_about_placement(args: &MountArgs, is_backing: bool) {
    if !is_backing && let Ok(entries) = std::fs::read_dir(&args.mountpoint) {
        let n = entries.count();
        if n > 0 {
            log::warn!(
                "mountpoint {} is not empty ({n} entries): they stay hidden while migsafe is mounted there",
                args.mountpoint.display()
            );
        }
    }
    let source = default_fsname(&args.backing);
    for m in mountinfo() {
        if is_migsafe(&m) && m.source == source {
            log::warn!(
                "backing {} is already mounted by migsafe on {}: two daemons keep separate activation state for the same images; use that mount or unmount it",
                args.backing.display(),
                m.mountpoint.display()
            );
        }
    }
}

/// `migsafe:` and the canonical backing path: what findmnt shows as SOURCE.
fn default_fsname(backing: &Path) -> String {
    let canonical = std::fs::canonicalize(backing).unwrap_or_else(|_| backing.to_path_buf());
    format!("migsafe:{}", canonical.display())
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
            ("device-io" | "device_io", Some(v)) => args.device_io = parse_device_io(v)?,
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
            ("state-file" | "state_file", Some(v)) => args.state_file = Some(PathBuf::from(v)),
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
        fsname.unwrap_or_else(|| default_fsname(&args.backing)),
    ));
    opts.push(MountOption::Subtype("migsafe".into()));
    Ok((opts, acl))
}

pub fn parse_device_io(v: &str) -> Result<DataPath, StartError> {
    match v {
        "cached" => Ok(DataPath::Cached),
        "relay" => Ok(DataPath::Relay),
        _ => err(format!("invalid device io {v:?}: expected cached or relay")),
    }
}

pub fn parse_io(v: &str) -> Result<IoMode, StartError> {
    match v {
        "auto" => Ok(IoMode::Auto),
        "passthrough" => Ok(IoMode::Passthrough),
        "relay" => Ok(IoMode::Relay),
        "cached" => Ok(IoMode::Cached),
        _ => err(format!(
            "invalid io mode {v:?}: expected auto, passthrough, relay or cached"
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

/// The state file `args` ask for: `--state-file PATH`, none for `none`,
/// else the default place for the daemon's user (see `--state-file`). It is
/// named after the mountpoint, not the backing: one daemon serves a
/// mountpoint at a time (a second mount there is refused), the same name
/// the systemd unit instance has, while one backing may be mounted twice.
/// The directory is not the systemd unit's RuntimeDirectory=: systemd
/// removes that at every stop, and a fence must outlive a stop and start.
fn state_file_path(args: &MountArgs) -> Option<PathBuf> {
    if let Some(p) = &args.state_file {
        if p.as_os_str() == "none" {
            return None;
        }
        return Some(std::path::absolute(p).unwrap_or_else(|_| p.clone()));
    }
    let mountpoint =
        std::fs::canonicalize(&args.mountpoint).unwrap_or_else(|_| args.mountpoint.clone());
    let name = format!("{}.json", systemd_escape_path(&mountpoint));
    if nix::unistd::geteuid().is_root() {
        return Some(Path::new("/run/migsafe-state").join(name));
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => Some(PathBuf::from(d).join("migsafe").join(name)),
        _ => {
            log::warn!(
                "no state file: XDG_RUNTIME_DIR is not set; a restarted daemon will forget which images are inactive \
                 (give --state-file PATH, or --state-file none to silence this)"
            );
            None
        }
    }
}

/// `systemd-escape --path`: `/run/vm images` -> `run-vm\x20images`.
pub fn systemd_escape_path(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    let trimmed: Vec<&[u8]> = bytes
        .split(|b| *b == b'/')
        .filter(|c| !c.is_empty())
        .collect();
    if trimmed.is_empty() {
        return "-".into();
    }
    let mut out = String::new();
    for (i, comp) in trimmed.iter().enumerate() {
        if i > 0 {
            out.push('-');
        }
        for (j, &b) in comp.iter().enumerate() {
            let plain = b.is_ascii_alphanumeric()
                || b == b':'
                || b == b'_'
                || (b == b'.' && !(i == 0 && j == 0));
            if plain {
                out.push(b as char);
            } else {
                out.push_str(&format!("\\x{b:02x}"));
            }
        }
    }
    out
}

/// Mounts and serves; returns when the filesystem is unmounted.
pub fn run(mut args: MountArgs) -> Result<(), StartError> {
    let (mount_options, acl) = apply_options(&mut args)?;
    if let Some(p) = &args.log_file {
        // A --daemon parent still shows what goes wrong before it returns.
        crate::logging::to_file(p, args.daemon).map_err(|e| {
            StartError(format!(
                "--log-file {}: {e}; name a writable file",
                p.display()
            ))
        })?;
    }
    let root = backing::open_root(&args.backing).map_err(StartError)?;
    check_mountpoint(&args.mountpoint)?;
    let is_backing = backing::check_mountpoint_outside(&root, &args.backing, &args.mountpoint)
        .map_err(StartError)?;
    if args.threads == 0 {
        return err(
            "--threads 0: migsafe needs at least 1 event-loop thread (default: one per CPU, at least 2)",
        );
    }
    warn_about_placement(&args, is_backing);
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
        if devices.iter().any(|d: &Device| &d.name == name) {
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
    // Read (and checked) before detaching, so a state file that cannot be
    // trusted stops the start where the operator sees why.
    if args
        .state_file
        .as_ref()
        .is_some_and(|p| p.as_os_str().is_empty() || p.ends_with(".."))
    {
        return err("--state-file: name a file (or none to keep no state file)");
    }
    let state = match state_file_path(&args) {
        Some(p) => {
            if p.starts_with(&args.mountpoint)
                || std::fs::canonicalize(&args.mountpoint)
                    .is_ok_and(|m| p.parent().is_some_and(|d| d.starts_with(m)))
            {
                return err(format!(
                    "--state-file {}: beneath the mountpoint, where the mount would hide it; choose a path outside it",
                    p.display()
                ));
            }
            Some(crate::image::state_file::StateFile::load(&p).map_err(StartError)?)
        }
        None => None,
    };
    raise_fd_limit();
    if args.daemon {
        daemonize(&args)?;
    }
    // Before any thread exists: every thread inherits the blocked mask, so
    // SIGTERM/SIGINT reach only the waiting thread, which unmounts.
    let signals = block_signals();
    // The pid file is written before mounting, so a path that cannot be
    // written fails the start with its error instead of leaving a mount
    // that a unit or script cannot find; a mount that then fails removes it.
    let pid_file = match &args.pid_file {
        Some(p) => Some(PidFile::write(p)?),
        None => None,
    };
    let config = FsConfig {
        io: args.io,
        ctl_name: args.ctl_name.clone(),
        xattr: args.xattr,
        owner_uid: nix::unistd::geteuid().as_raw(),
        owner_gid: nix::unistd::getegid().as_raw(),
        max_write: args.max_write,
        max_background: 64,
        mountpoint: std::fs::canonicalize(&args.mountpoint)
            .unwrap_or_else(|_| args.mountpoint.clone()),
        device_io: args.device_io,
    };
    let fs = MigsafeFs::new(config, settings, root, devices)
        .map_err(|e| StartError(format!("backing {}: {e}", args.backing.display())))?;
    if let Some((journal, records)) = state {
        let path = journal.path().to_path_buf();
        let n = records.len();
        let r = fs
            .registry
            .restore(Arc::new(journal), records, &fs.root_fd, &fs.ctl.devices);
        log::info!(
            "state file {}: restored {} images inactive, {} sticky errors ({} of {n} records dropped)",
            path.display(),
            r.inactive,
            r.sticky,
            r.dropped
        );
    }
    let notifier_slot = fs.notifier.clone();
    let mut fuse_config = Config::default();
    fuse_config.n_threads = Some(args.threads);
    fuse_config.clone_fd = true;
    let cannot_mount = |e: &dyn std::fmt::Display| {
        StartError(format!(
            "cannot mount {} on {}: {e}",
            args.backing.display(),
            args.mountpoint.display()
        ))
    };
    let auto_unmount = mount_options.contains(&MountOption::AutoUnmount);
    let own = if auto_unmount {
        // Only fusermount3 can watch for our exit and unmount then.
        None
    } else {
        OwnMount::mount(&args.mountpoint, &mount_options, acl)?
    };
    let mut own_guard = None;
    let (session, unmounter) = match own {
        Some((dev_fuse, own)) => {
            let own = Arc::new(own);
            own_guard = Some(own.clone());
            let session = fuser::Session::from_fd(fs, dev_fuse, acl, fuse_config)
                .map_err(|e| cannot_mount(&e))?;
            (session, Unmounter::Own(own))
        }
        None => {
            // Not allowed to mount(2) (no CAP_SYS_ADMIN): fuser runs the
            // setuid fusermount3, which also names the type fuse.migsafe
            // from the subtype option.
            fuse_config.mount_options = mount_options;
            fuse_config.acl = acl;
            let mut session = fuser::Session::new(fs, &args.mountpoint, &fuse_config)
                .map_err(|e| cannot_mount(&e))?;
            let unmounter = Unmounter::Fuser(session.unmount_callable());
            (session, unmounter)
        }
    };
    let _ = notifier_slot.set(session.notifier());
    widen_readahead(&args.mountpoint);
    log::info!(
        "migsafe {} serving {} on {} ({} threads)",
        env!("CARGO_PKG_VERSION"),
        args.backing.display(),
        args.mountpoint.display(),
        args.threads
    );
    if let Some(p) = pid_file {
        p.keep();
    }
    daemon_ready(args.log_file.as_deref());
    sd_notify(&format!(
        "READY=1\nMAINPID={}\nSTATUS=serving {} on {}",
        std::process::id(),
        args.backing.display(),
        args.mountpoint.display()
    ));
    let mountpoint = args.mountpoint.clone();
    std::thread::spawn(move || {
        if let Ok(sig) = signals.wait() {
            log::info!("{sig:?}: unmounting {}", mountpoint.display());
            sd_notify("STOPPING=1");
            let mut unmounter = unmounter;
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
    // A session that ended on an error leaves its mount dead: take it away.
    drop(own_guard);
    log::info!("unmounted {}", args.mountpoint.display());
    Ok(())
}

/// Tells a service manager how the daemon is doing (sd_notify(3)): one
/// datagram to `$NOTIFY_SOCKET`, a path or an abstract name written `@name`.
/// A `Type=notify` unit counts as started only on `READY=1`, which is sent
/// once the mount is live, so units ordered after it (libvirtd) never see an
/// empty mountpoint. Without `NOTIFY_SOCKET` it does nothing.
///
/// Written here rather than with the `sd-notify` crate: its 0.5 connects to
/// `NOTIFY_SOCKET` as a path, so an abstract `@name` socket (which systemd
/// may pass, and tests/operator.rs uses) never gets READY=1.
fn sd_notify(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = target.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(Path::new(&target)),
    };
    let sent = addr.and_then(|addr| UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr));
    if let Err(e) = sent {
        log::warn!(
            "NOTIFY_SOCKET {}: {e}; the service manager does not learn that migsafe is {}",
            target.to_string_lossy(),
            if state.starts_with("READY") {
                "ready"
            } else {
                "stopping"
            }
        );
    }
}

/// Who takes the mount away on SIGTERM: migsafe's own mount(2), or fuser's
/// fusermount3 mount.
enum Unmounter {
    Own(Arc<OwnMount>),
    Fuser(fuser::SessionUnmounter),
}

impl Unmounter {
    fn unmount(&mut self) -> std::io::Result<()> {
        match self {
            Unmounter::Own(m) => m.unmount(),
            Unmounter::Fuser(u) => u.unmount(),
        }
    }
}

/// A FUSE mount migsafe made itself with mount(2), so the kernel records the
/// type `fuse.migsafe` (fuser's own mount(2) says plain `fuse`, which
/// `findmnt -t fuse.migsafe` and libvirt do not recognise). It also keeps the
/// /dev/fuse connection in migsafe's hands.
struct OwnMount {
    mountpoint: PathBuf,
    /// The mount's device number (`major:minor` in mountinfo): unmounting
    /// checks the top mount on the path is still this one, so a mount an
    /// operator already took away never makes us unmount what lies beneath.
    dev: String,
    /// The mountpoint as mountinfo spells it, resolved before mounting.
    canonical: PathBuf,
    done: std::sync::atomic::AtomicBool,
}

/// The filesystem type migsafe mounts as.
pub const FSTYPE: &str = "fuse.migsafe";

impl OwnMount {
    /// Opens /dev/fuse and mounts it on `mountpoint`; `None` when mount(2)
    /// is not permitted (then fusermount3 has to do it).
    fn mount(
        mountpoint: &Path,
        options: &[MountOption],
        acl: SessionACL,
    ) -> Result<Option<(OwnedFd, OwnMount)>, StartError> {
        use nix::mount::MsFlags;
        let dev_fuse = open_dev_fuse()?;
        let canonical =
            std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
        let mut flags = MsFlags::empty();
        let (mut dev, mut suid) = (false, false);
        let mut source = "migsafe".to_string();
        let mut data = format!(
            "fd={},rootmode={:o},user_id={},group_id={}",
            std::os::fd::AsRawFd::as_raw_fd(&dev_fuse),
            libc::S_IFDIR,
            nix::unistd::getuid(),
            nix::unistd::getgid()
        );
        for opt in options {
            match opt {
                MountOption::FSName(n) => source = n.clone(),
                MountOption::Subtype(_) | MountOption::AutoUnmount => {}
                MountOption::DefaultPermissions => data.push_str(",default_permissions"),
                MountOption::CUSTOM(c) => {
                    data.push(',');
                    data.push_str(c);
                }
                MountOption::Dev => dev = true,
                MountOption::NoDev => dev = false,
                MountOption::Suid => suid = true,
                MountOption::NoSuid => suid = false,
                MountOption::RO => flags |= MsFlags::MS_RDONLY,
                MountOption::RW => flags &= !MsFlags::MS_RDONLY,
                MountOption::Exec => flags &= !MsFlags::MS_NOEXEC,
                MountOption::NoExec => flags |= MsFlags::MS_NOEXEC,
                MountOption::Atime => flags &= !MsFlags::MS_NOATIME,
                MountOption::NoAtime => flags |= MsFlags::MS_NOATIME,
                MountOption::Sync => flags |= MsFlags::MS_SYNCHRONOUS,
                MountOption::Async => flags &= !MsFlags::MS_SYNCHRONOUS,
                MountOption::DirSync => flags |= MsFlags::MS_DIRSYNC,
            }
        }
        // nodev,nosuid unless asked otherwise, as fuser and libfuse do.
        if !dev {
            flags |= MsFlags::MS_NODEV;
        }
        if !suid {
            flags |= MsFlags::MS_NOSUID;
        }
        if acl != SessionACL::Owner {
            data.push_str(",allow_other");
        }
        match nix::mount::mount(
            Some(source.as_str()),
            mountpoint,
            Some(FSTYPE),
            flags,
            Some(data.as_str()),
        ) {
            Ok(()) => {}
            Err(nix::errno::Errno::EPERM) => return Ok(None),
            Err(e) => {
                return err(format!(
                    "mount(2) {FSTYPE} on {}: {} ({e}); check the mountpoint and the options",
                    mountpoint.display(),
                    crate::sys::errno_name(e as i32),
                ));
            }
        }
        // Looked up by the path resolved before mounting: resolving it now
        // could send a request to this very process, which does not serve
        // requests yet.
        let dev = top_mount_at(&canonical).map(|m| m.dev).unwrap_or_default();
        Ok(Some((
            dev_fuse,
            OwnMount {
                mountpoint: mountpoint.to_path_buf(),
                canonical,
                dev,
                done: std::sync::atomic::AtomicBool::new(false),
            },
        )))
    }

    /// True while the top mount on the path is still ours (or, should
    /// mountinfo not have shown it after mounting, assumed so: better an
    /// unmount by path than a SIGTERM that does nothing).
    fn still_ours(&self) -> bool {
        self.dev.is_empty()
            || top_mount_at(&self.canonical)
                .is_some_and(|m| m.dev == self.dev && m.fstype == FSTYPE)
    }

    fn unmount(&self) -> std::io::Result<()> {
        use std::sync::atomic::Ordering;
        if self.done.swap(true, Ordering::SeqCst) || !self.still_ours() {
            return Ok(());
        }
        nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::empty()).map_err(|e| {
            self.done.store(false, Ordering::SeqCst);
            std::io::Error::from(e)
        })
    }
}

impl Drop for OwnMount {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        if !self.done.load(Ordering::SeqCst) && self.still_ours() {
            log::warn!(
                "session on {} ended while mounted: detaching the mount",
                self.mountpoint.display()
            );
            let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Opens /dev/fuse read-write; a refusal names the device, its mode and the
/// next step.
fn open_dev_fuse() -> Result<OwnedFd, StartError> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        Ok(f) => Ok(f.into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            err("/dev/fuse does not exist: load the fuse module (modprobe fuse)")
        }
        Err(e) => {
            let mode = std::fs::metadata("/dev/fuse")
                .map(|m| {
                    format!(
                        "mode {:04o}, owner {}:{}",
                        m.mode() & 0o7777,
                        m.uid(),
                        m.gid()
                    )
                })
                .unwrap_or_else(|_| "mode unknown".into());
            err(format!(
                "cannot open /dev/fuse ({mode}): {e}; run as root or give this user read-write access to /dev/fuse"
            ))
        }
    }
}

/// The mount on top at `path` (canonicalized), if `path` is a mountpoint.
pub fn top_mount(path: &Path) -> Option<MountEntry> {
    top_mount_at(&std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()))
}

/// Like [`top_mount`] for a path already canonical; touches no filesystem
/// but /proc.
fn top_mount_at(canonical: &Path) -> Option<MountEntry> {
    mountinfo()
        .into_iter()
        .rev()
        .find(|m| m.mountpoint == canonical)
}

/// Readahead window of the mount, in KiB. FUSE starts a mount at the
/// kernel's default (128 KiB) and FUSE_INIT can only lower it; the cached
/// data path turns every readahead into one O_DIRECT read of the device, so
/// a sequential reader is served by fewer, larger reads with a wider window.
const READAHEAD_KB: u32 = 1024;

/// Sets the mount's readahead through its BDI in sysfs (root only; a
/// failure only costs sequential speed). Found through mountinfo, never by
/// a stat of the mountpoint: nothing serves this mount's requests yet.
fn widen_readahead(mountpoint: &Path) {
    let canonical = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let Some(dev) = top_mount_at(&canonical).map(|m| m.dev) else {
        return;
    };
    let knob = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    if let Err(e) = std::fs::write(&knob, format!("{READAHEAD_KB}\n")) {
        log::debug!("readahead of {}: {knob}: {e}", mountpoint.display());
    }
}

/// `--pid-file`, removed again unless the mount went live.
struct PidFile {
    path: Option<PathBuf>,
}

impl PidFile {
    fn write(path: &Path) -> Result<PidFile, StartError> {
        std::fs::write(path, format!("{}\n", std::process::id())).map_err(|e| {
            StartError(format!(
                "cannot write --pid-file {}: {e}; pick a writable path",
                path.display()
            ))
        })?;
        Ok(PidFile {
            path: Some(path.to_path_buf()),
        })
    }

    /// The mount is live: the file stays.
    fn keep(mut self) {
        self.path = None;
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// SIGINT/SIGTERM/SIGHUP are blocked in every thread (the mask is inherited
/// by threads spawned later) and taken by one waiting thread, which unmounts.
fn block_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    // A signal ignored when the daemon started (a background job without job
    // control inherits SIGINT ignored) is discarded, never waited for: the
    // stop signals get their default disposition back before they are
    // blocked. SIGHUP keeps what the caller chose (nohup ignores it).
    for sig in [libc::SIGINT, libc::SIGTERM] {
        if let Err(e) = sys::default_disposition(sig) {
            log::warn!("cannot reset the disposition of signal {sig}: {e}");
        }
    }
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
    use nix::unistd::{pipe, setsid};
    use std::io::Read;
    use sys::ForkResult;
    let (rd, wr) = pipe().map_err(|e| StartError(format!("pipe: {e}")))?;
    // Before any thread is started (fuser threads start in Session::run,
    // later), so the child is a faithful copy.
    match sys::fork_single_threaded().map_err(|e| StartError(format!("fork: {e}")))? {
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

/// Where a detached daemon without `--log-file` logs when there is no
/// syslog socket to send to.
const FALLBACK_LOG: &str = "/var/log/migsafe.log";

/// Tells a waiting `--daemon` parent the mount is live, then detaches from
/// its stdio: a caller capturing the mount command's output (a pipe, ssh,
/// mount.fuse3) must see end-of-file now, not at unmount. The log goes on to
/// `--log-file` if given, else to syslog, else to [`FALLBACK_LOG`]; the last
/// two choices are said on the caller's stderr while it still shows them.
fn daemon_ready(log_file: Option<&Path>) {
    let Some(fd) = READY_FD.lock().expect("ready lock").take() else {
        return;
    };
    use std::io::Write;
    let mut stderr_file = log_file.map(Path::to_path_buf);
    if log_file.is_some() {
        crate::logging::stop_tee();
    } else if let Err(e) = crate::logging::to_syslog() {
        let socket = crate::logging::syslog_socket();
        match crate::logging::to_file(Path::new(FALLBACK_LOG), false) {
            Ok(()) => {
                eprintln!(
                    "migsafe: no syslog at {} ({e}): logging to {FALLBACK_LOG}; choose a file with --log-file",
                    socket.display()
                );
                stderr_file = Some(PathBuf::from(FALLBACK_LOG));
            }
            Err(e2) => eprintln!(
                "migsafe: no syslog at {} ({e}) and {FALLBACK_LOG}: {e2}: the log is discarded; pass --log-file PATH",
                socket.display()
            ),
        }
    }
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null");
    // stderr follows the log file, so a panic message is kept with the log.
    let log = stderr_file.and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()
    });
    match &null {
        Ok(null) => {
            let err_out = log.as_ref().unwrap_or(null);
            for (src, target) in [(null, 0), (null, 1), (err_out, 2)] {
                if let Err(e) = sys::dup2(src.as_fd(), target) {
                    log::warn!("detaching from the caller's stdio: dup2 onto fd {target}: {e}");
                }
            }
        }
        Err(e) => log::warn!(
            "detaching from the caller's stdio: /dev/null: {e}; the caller's stdio stays open"
        ),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_file_names_escape_like_systemd() {
        // What `systemd-escape --path` prints for each.
        for (path, want) in [
            ("/run/migsafe", "run-migsafe"),
            ("/srv/vm images/", "srv-vm\\x20images"),
            ("/.hidden/a.b", "\\x2ehidden-a.b"),
            ("/", "-"),
        ] {
            assert_eq!(systemd_escape_path(Path::new(path)), want, "{path}");
        }
    }
}
