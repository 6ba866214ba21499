//! `migsafe mount`: validate the command line, mount, serve until unmounted
//! or signalled.

use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use nix::sys::signal::SigSet;

use crate::backing::{self, Device};
use crate::ctl::FsConfig;
use crate::fs::{DataPath, IoMode, MigsafeFs, Writeback};
use crate::image::state_file::{Record, StateFile};
use crate::session::{Acl, Connection, Session};
use crate::settings::Settings;
use crate::sys;

mod args;
mod daemon;
mod fusermount;
mod keeper;
mod kernel;
mod link;
mod options;
mod placement;
mod serve;
mod state_path;

use args::err;
pub use args::{MountArgs, StartError};
pub use daemon::report_start_error;
use daemon::{
    PidFile, block_signals, block_upgrade_signal, daemon_ready, daemonize, raise_fd_limit,
    sd_notify,
};
use fusermount::UserMount;
use kernel::{OwnMount, Unmounter, tune_bdi};
pub use options::parse_device;
use options::{MountOption, apply_options};
use placement::{check_mountpoint, warn_about_placement};
use state_path::load_state;
pub use state_path::systemd_escape_path;

/// Default event-loop threads: one per CPU, at least 2 so a slow backing
/// read never stalls every other request.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(2)
}

/// Mounts and serves; returns when the filesystem is unmounted.
///
/// The order of the steps is the point: everything that can refuse the
/// start runs before `--daemon` detaches (so the operator sees why), the
/// signal mask is set before any thread exists, and a waiting parent or
/// service manager hears "ready" only once the mount is live.
pub fn run(mut args: MountArgs) -> Result<(), StartError> {
    if let Some(env) = keeper::ServeEnv::take() {
        return serve::serve_child(args, env?);
    }
    let (mount_options, acl) = apply_options(&mut args)?;
    let checked = check(&args, None)?;
    raise_fd_limit();
    if args.daemon {
        daemonize(&args)?;
    }
    // Before any thread exists: every thread inherits the blocked mask, so
    // SIGTERM/SIGINT reach only the waiting thread, which unmounts.
    let signals = block_signals();
    let upgrade = block_upgrade_signal();
    // The pid file is written before mounting, so a path that cannot be
    // written fails the start with its error instead of leaving a mount
    // that a unit or script cannot find; a mount that then fails removes it.
    let pid_file = match &args.pid_file {
        Some(p) => Some(PidFile::write(p)?),
        None => None,
    };
    if args.restart {
        // The serving process opens the devices and the state file itself;
        // the backing root it gets from here, opened before the mount.
        let root = checked.root;
        return run_keeper(
            &args,
            (root, checked.writeback),
            mount_options,
            acl,
            (signals, upgrade),
            pid_file,
        );
    }
    let writeback = checked.writeback;
    let fs = build_fs(&args, checked)?;
    let notifier_slot = fs.notifier.clone();
    let Started {
        session,
        unmounter,
        own_guard,
    } = start_session(fs, &args, mount_options, acl)?;
    let _ = notifier_slot.set(session.notifier());
    tune_bdi(&args.mountpoint, writeback);
    log::info!(
        "migsafe {} serving {} on {} ({} threads)",
        env!("CARGO_PKG_VERSION"),
        args.backing.display(),
        args.mountpoint.display(),
        args.threads
    );
    live(&args, pid_file, signals, unmounter);
    serve(session, &args)?;
    // The guard takes away a mount the session left behind (one that ended
    // on an error leaves it dead; the `?` above drops the guard too); after
    // a clean unmount it does nothing.
    drop(own_guard);
    log::info!("unmounted {}", args.mountpoint.display());
    Ok(())
}

/// The keeper form of [`run`]: mounts, then runs serving processes on the
/// connection (mount/keeper.rs) until the mount goes away.
fn run_keeper(
    args: &MountArgs,
    (root, writeback): (OwnedFd, bool),
    mount_options: Vec<MountOption>,
    acl: Acl,
    (signals, upgrade): (SigSet, SigSet),
    pid_file: Option<PidFile>,
) -> Result<(), StartError> {
    let canonical = args.canonical_mountpoint();
    let (dev_fuse, unmounter, own_guard) = mount_fuse(args, &mount_options, acl)?;
    // The keeper serves nobody; it holds no groups either (as a serving
    // process drops them: see `serve`).
    let _ = sys::drop_supplementary_groups();
    let mut first = Some((pid_file, signals, unmounter));
    let stdio = if args.daemon {
        keeper::ChildStdio::Detached(args.log_file.clone())
    } else {
        keeper::ChildStdio::Inherit
    };
    let result = keeper::keep(
        stdio,
        &canonical,
        &root,
        &dev_fuse,
        upgrade,
        |keeper::Event::Serving(pid)| {
            if let Some(p) = &args.pid_file
                && let Err(e) = PidFile::rewrite(p, pid)
            {
                log::warn!("--pid-file {}: {e}", p.display());
            }
            let Some((pid_file, signals, unmounter)) = first.take() else {
                return;
            };
            tune_bdi(&args.mountpoint, writeback);
            live(args, pid_file, signals, unmounter);
        },
    );
    // A keeper that gave up takes its mount away (lazily: its users get
    // ENOTCONN rather than a hang); after a clean unmount this does nothing.
    drop(own_guard);
    drop(dev_fuse);
    result
}

/// The mount is live: the pid file stays, a waiting `--daemon` parent and
/// the service manager hear so, and a stop signal unmounts from now on.
fn live(args: &MountArgs, pid_file: Option<PidFile>, signals: SigSet, unmounter: Unmounter) {
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
    unmount_on_signal(signals, unmounter, args.mountpoint.clone());
}

/// What the start-up checks opened and read, for the filesystem.
struct Checked {
    root: OwnedFd,
    settings: Arc<Settings>,
    devices: Vec<Device>,
    state: Option<(StateFile, Vec<Record>)>,
    /// Ask FUSE_INIT for the writeback cache (`--writeback`, decided).
    writeback: bool,
}

/// Every check that can refuse the start, in the order an operator meets
/// their errors; it opens the backing root and the devices and reads the
/// state file on the way.
/// `root`: the backing root a keeper opened for its serving child (which
/// must not open the path: with the mountpoint on the backing itself, the
/// path now leads into the mount).
fn check(args: &MountArgs, root: Option<OwnedFd>) -> Result<Checked, StartError> {
    if let Some(p) = &args.log_file {
        // A --daemon parent still shows what goes wrong before it returns.
        crate::logging::to_file(p, args.daemon).map_err(|e| {
            StartError(format!(
                "--log-file {}: {e}; name a writable file",
                p.display()
            ))
        })?;
    }
    let root = match root {
        Some(r) => r,
        None => backing::open_root(&args.backing).map_err(StartError)?,
    };
    // A keeper's child finds the mount there already (the keeper checked
    // the mountpoint before mounting).
    let placement_checked = args.resolved_mountpoint.is_some();
    if !placement_checked {
        check_mountpoint(&args.mountpoint)?;
    }
    let is_backing = !placement_checked
        && backing::check_mountpoint_outside(&root, &args.backing, &args.mountpoint)
            .map_err(StartError)?;
    if args.threads == 0 {
        return err(
            "--threads 0: migsafe needs at least 1 event-loop thread (default: one per CPU, at least 2)",
        );
    }
    if !placement_checked {
        warn_about_placement(args, is_backing);
    }
    if args.io == IoMode::Passthrough && !sys::has_cap_sys_admin() {
        return err("--io passthrough needs CAP_SYS_ADMIN (run as root); use --io relay or auto");
    }
    // A control request (up to 64 KiB) must arrive as one FUSE write, and
    // the kernel caps a request at 16 MiB (FUSE_MAX_MAX_PAGES pages).
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
    if !sys::is_component(args.ctl_name.as_bytes()) {
        return err(format!("invalid --ctl-name {:?}", args.ctl_name));
    }
    let devices = open_devices(args, &root)?;
    let writeback = decide_writeback(args, &root)?;
    let state = load_state(args)?;
    Ok(Checked {
        root,
        settings,
        devices,
        state,
        writeback,
    })
}

/// `--writeback`: on for a mount that serves devices only. The writeback
/// cache is the connection's, and with it the kernel trusts its own size
/// and times of every regular file, which a file another host changes
/// would make wrong; a device's size never changes. So it needs `--device`
/// entries on the cached path (relay has no FUSE cache for writes) and a
/// backing directory with nothing in it (the mount then refuses to create
/// or open a regular file of the directory).
fn decide_writeback(args: &MountArgs, root: &OwnedFd) -> Result<bool, StartError> {
    let why_not = if args.devices.is_empty() {
        Some("no --device entry".to_string())
    } else if args.device_io != DataPath::Cached {
        Some(format!("--device-io {}", args.device_io.name()))
    } else {
        first_entry(root).map(|name| {
            format!(
                "the backing directory {} is not empty (it holds {name:?})",
                args.backing.display()
            )
        })
    };
    match (args.writeback, why_not) {
        (Writeback::Off, _) => Ok(false),
        (Writeback::On, Some(why)) => err(format!(
            "--writeback on: {why}; write-back serves devices only (--device entries on the \
             cached path, an empty backing directory): fix that, or use --writeback off"
        )),
        (Writeback::Auto, Some(why)) => {
            log::info!("--writeback auto: off ({why})");
            Ok(false)
        }
        (_, None) => Ok(true),
    }
}

/// The name of some entry of the directory `root`, if it has one.
fn first_entry(root: &OwnedFd) -> Option<std::ffi::OsString> {
    let dir = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(root));
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .next()
}

/// Opens each `--device` entry (a name given twice is refused), and warns
/// when the control directory hides an entry of the backing.
fn open_devices(args: &MountArgs, root: &OwnedFd) -> Result<Vec<Device>, StartError> {
    let mut devices = Vec::new();
    for (name, path) in &args.devices {
        if devices.iter().any(|d: &Device| &d.name == name) {
            return err(format!("--device {name} given twice"));
        }
        devices.push(backing::open_device(name, path, root, &args.ctl_name).map_err(StartError)?);
    }
    if let Ok(c) = CString::new(args.ctl_name.as_bytes())
        && sys::fstatat(root.as_fd(), &c).is_ok()
    {
        log::warn!(
            "backing entry {:?} is hidden by the control directory; use --ctl-name to pick another name",
            args.ctl_name
        );
    }
    Ok(devices)
}

/// The filesystem the session serves, with the images the state file
/// brings back inactive (and their sticky errors).
fn build_fs(args: &MountArgs, checked: Checked) -> Result<MigsafeFs, StartError> {
    let config = FsConfig {
        io: args.io,
        ctl_name: args.ctl_name.clone(),
        xattr: args.xattr,
        owner_uid: nix::unistd::geteuid().as_raw(),
        owner_gid: nix::unistd::getegid().as_raw(),
        max_write: args.max_write,
        max_background: 64,
        mountpoint: args.canonical_mountpoint(),
        device_io: args.device_io,
        writeback: checked.writeback,
    };
    let fs = MigsafeFs::new(config, checked.settings, checked.root, checked.devices)
        .map_err(|e| StartError(format!("backing {}: {e}", args.backing.display())))?;
    if let Some((journal, records)) = checked.state {
        let path = journal.path().to_path_buf();
        let n = records.len();
        let r =
            fs.ctl
                .registry
                .restore(Arc::new(journal), records, &fs.ctl.root_fd, &fs.ctl.devices);
        log::info!(
            "state file {}: restored {} images inactive, {} sticky errors ({} of {n} records dropped)",
            path.display(),
            r.inactive,
            r.sticky,
            r.dropped
        );
    }
    Ok(fs)
}

/// A live mount and its session.
struct Started {
    session: Session<MigsafeFs>,
    /// Who takes the mount away on a stop signal.
    unmounter: Unmounter,
    /// For migsafe's own mount: takes away a mount the session left behind.
    own_guard: Option<Arc<OwnMount>>,
}

/// Mounts and opens the FUSE session (FUSE_INIT answered).
fn start_session(
    fs: MigsafeFs,
    args: &MountArgs,
    mount_options: Vec<MountOption>,
    acl: Acl,
) -> Result<Started, StartError> {
    let (dev_fuse, unmounter, own_guard) = mount_fuse(args, &mount_options, acl)?;
    let mut session = Session::new(fs, Connection::new(dev_fuse), acl);
    session.handshake().map_err(|e| {
        StartError(format!(
            "cannot mount {} on {}: {e}",
            args.backing.display(),
            args.mountpoint.display()
        ))
    })?;
    Ok(Started {
        session,
        unmounter,
        own_guard,
    })
}

/// Mounts `/dev/fuse` on the mountpoint: with migsafe's own mount(2) when
/// it may, else through the setuid fusermount3. Returns the connection,
/// who unmounts it on a stop signal, and (own mount) the guard that takes
/// away a mount left behind.
fn mount_fuse(
    args: &MountArgs,
    mount_options: &[MountOption],
    acl: Acl,
) -> Result<(OwnedFd, Unmounter, Option<Arc<OwnMount>>), StartError> {
    let auto_unmount = mount_options.contains(&MountOption::AutoUnmount);
    let own = if auto_unmount {
        // Only fusermount3 can watch for our exit and unmount then.
        None
    } else {
        OwnMount::mount(&args.mountpoint, mount_options, acl)?
    };
    Ok(match own {
        Some((dev_fuse, own)) => {
            let own = Arc::new(own);
            (dev_fuse, Unmounter::Own(own.clone()), Some(own))
        }
        None => {
            // Not allowed to mount(2) (no CAP_SYS_ADMIN): fusermount3
            // mounts, and names the type fuse.migsafe from the subtype.
            let (dev_fuse, user) = UserMount::mount(&args.mountpoint, mount_options, acl)?;
            (dev_fuse, Unmounter::Fusermount(Arc::new(user)), None)
        }
    })
}

/// One thread waits for SIGINT/SIGTERM/SIGHUP (blocked in every other
/// thread) and unmounts, lazily if a plain unmount fails.
fn unmount_on_signal(signals: SigSet, mut unmounter: Unmounter, mountpoint: PathBuf) {
    std::thread::spawn(move || {
        if let Ok(sig) = signals.wait() {
            log::info!("{sig:?}: unmounting {}", mountpoint.display());
            sd_notify("STOPPING=1");
            if let Err(e) = unmounter.unmount() {
                log::warn!("unmount {}: {e}; detaching lazily", mountpoint.display());
                let _ = nix::mount::umount2(&mountpoint, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    });
}

/// Serves requests until the mount goes away.
fn serve(session: Session<MigsafeFs>, args: &MountArgs) -> Result<(), StartError> {
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
    session.run(args.threads).map_err(|e| {
        StartError(format!(
            "session on {} ended: {e}",
            args.mountpoint.display()
        ))
    })
}
