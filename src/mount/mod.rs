//! `migsafe mount`: validate the command line, mount, serve until unmounted
//! or signalled.

use std::ffi::CString;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;

use fuser::{Config, MountOption};

use crate::backing::{self, Device};
use crate::fs::{DataPath, FsConfig, IoMode, MigsafeFs};
use crate::settings::{Key, Settings};
use crate::sys;

mod daemon;
mod kernel;
mod options;
mod placement;
mod state_path;

pub use daemon::report_start_error;
use daemon::{PidFile, block_signals, daemon_ready, daemonize, raise_fd_limit, sd_notify};
use kernel::{OwnMount, Unmounter, widen_readahead};
use options::apply_options;
pub use options::parse_device;
use placement::{check_mountpoint, warn_about_placement};
use state_path::state_file_path;
pub use state_path::systemd_escape_path;

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
