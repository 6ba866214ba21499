//! How the process lives as a service: `--daemon` detaching, the pid file,
//! the stop signals, the fd limit and the service manager's notification.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use super::args::{MountArgs, StartError};
use crate::sys;

/// `--pid-file`, removed again unless the mount went live.
pub(super) struct PidFile {
    path: Option<PathBuf>,
}

impl PidFile {
    pub(super) fn write(path: &Path) -> Result<PidFile, StartError> {
        Self::rewrite(path, std::process::id()).map_err(|e| {
            StartError(format!(
                "cannot write --pid-file {}: {e}; pick a writable path",
                path.display()
            ))
        })?;
        Ok(PidFile {
            path: Some(path.to_path_buf()),
        })
    }

    /// Names `pid` (the process serving requests now) in the file at
    /// `path`, replaced whole so a reader never sees half a number.
    pub(super) fn rewrite(path: &Path, pid: u32) -> std::io::Result<()> {
        let tmp = path.with_extension("pid.tmp");
        std::fs::write(&tmp, format!("{pid}\n"))?;
        std::fs::rename(&tmp, path)
    }

    /// The mount is live: the file stays.
    pub(super) fn keep(mut self) {
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
pub(super) fn block_signals() -> nix::sys::signal::SigSet {
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

/// SIGUSR2 asks a keeper to replace its serving process (an upgrade: the
/// new one runs the binary now at the keeper's path). Blocked in every
/// thread and taken by one waiting thread, like the stop signals.
pub(super) fn block_upgrade_signal() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
    let mut set = SigSet::empty();
    set.add(Signal::SIGUSR2);
    let _ = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None);
    set
}

/// Each image handle holds backing fds: lift the soft limit to the hard one.
pub(super) fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// The write end of the pipe a waiting `--daemon` parent reads: set in the
/// child, taken when the mount is live or the start fails.
static READY_FD: std::sync::Mutex<Option<OwnedFd>> = std::sync::Mutex::new(None);

/// Forks; the parent waits until the child reports the mount live (or its
/// start-up error) through a pipe, so `--daemon` returns only then.
pub(super) fn daemonize(args: &MountArgs) -> Result<(), StartError> {
    use nix::unistd::{pipe2, setsid};
    use std::io::Read;
    use sys::ForkResult;
    // Close-on-exec: a serving process the keeper starts must not hold the
    // write end, or the parent would wait for its end of file forever.
    let (rd, wr) =
        pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| StartError(format!("pipe: {e}")))?;
    // Before any thread is started (the session's workers start in Session::run,
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
pub(super) const FALLBACK_LOG: &str = "/var/log/migsafe.log";

/// Tells a waiting `--daemon` parent the mount is live, then detaches from
/// its stdio: a caller capturing the mount command's output (a pipe, ssh,
/// mount.fuse3) must see end-of-file now, not at unmount. The log goes on to
/// `--log-file` if given, else to syslog, else to [`FALLBACK_LOG`]; the last
/// two choices are said on the caller's stderr while it still shows them.
pub(super) fn daemon_ready(log_file: Option<&Path>) {
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

/// Tells a service manager how the daemon is doing (sd_notify(3)): one
/// datagram to `$NOTIFY_SOCKET`, a path or an abstract name written `@name`.
/// A `Type=notify` unit counts as started only on `READY=1`, which is sent
/// once the mount is live, so units ordered after it (libvirtd) never see an
/// empty mountpoint. Without `NOTIFY_SOCKET` it does nothing.
///
/// Written here rather than with the `sd-notify` crate: its 0.5 connects to
/// `NOTIFY_SOCKET` as a path, so an abstract `@name` socket (which systemd
/// may pass, and tests/operator.rs uses) never gets READY=1.
pub(super) fn sd_notify(state: &str) {
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
