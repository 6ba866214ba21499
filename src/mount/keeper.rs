//! The keeper: the `migsafe mount` process holds the mount's `/dev/fuse`
//! connection and runs the serving process as its child. The child tells
//! it of every node and handle the kernel holds before the kernel hears of
//! it (fs/keep.rs); when the child dies (SIGKILL, panic, OOM kill) the
//! connection stays open here, so the mount lives on, and a new child is
//! started that takes the connection over with that state and asks the
//! kernel to send again what the dead one left unanswered. Readers and
//! writers of images see a pause, not an error (what is not carried over:
//! DESIGN §2, "The keeper").

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::args::{StartError, err};
use super::link::Link;

/// Environment of a serving child: `FUSE_FD,LINK_FD,ROOT_FD,KEEPER_PID,MOUNTPOINT`
/// (the mountpoint resolved by the keeper, last: it may hold commas).
pub(super) const SERVE_ENV: &str = "MIGSAFE_SERVE";
/// Exit status of a child that refuses to take the connection over (its
/// log says why); the keeper then gives up.
pub(super) const EXIT_REFUSED: i32 = 3;
/// More deaths than this within [`CRASH_WINDOW`] and the keeper gives up
/// (a request that kills every serving process it is sent to again).
const CRASH_LIMIT: usize = 30;
const CRASH_WINDOW: Duration = Duration::from_secs(60);
/// Children in a row that die before serving: one that cannot start at
/// all (its log says why) is not started forever.
const START_LIMIT: usize = 3;

/// What the kernel holds of this mount, as the serving process reported it.
#[derive(Default)]
struct Kept {
    init: Option<Value>,
    /// node id -> (O_PATH fd, path, lookup count)
    inodes: BTreeMap<u64, (OwnedFd, String, u64)>,
    /// fh -> (record, backing fds)
    handles: BTreeMap<u64, (Value, Vec<OwnedFd>)>,
    /// The cloned `/dev/fuse` fds the workers read on: held here so the
    /// requests read on them outlive a dead child (to be sent again).
    channels: Vec<OwnedFd>,
    /// The latest recorded answers to namespace changes (unique id, hex):
    /// a request the dead child ran but whose answer never reached the
    /// kernel is answered with it instead of running again.
    replies: VecDeque<(u64, String)>,
}

/// Answers kept: far more than requests can be in flight at once.
const REPLIES_KEPT: usize = 4096;

impl Kept {
    /// Applies one message; true for `ready`.
    fn apply(&mut self, msg: Value, mut fds: Vec<OwnedFd>) -> bool {
        let id = msg["id"].as_u64().unwrap_or(0);
        match msg["t"].as_str().unwrap_or("") {
            "init" => self.init = Some(msg),
            "ino" => match fds.pop() {
                Some(fd) => {
                    let path = msg["path"].as_str().unwrap_or("").to_string();
                    self.inodes.insert(id, (fd, path, 1));
                }
                None => log::error!("keeper: node {id} came without its fd"),
            },
            "ref" => match self.inodes.get_mut(&id) {
                Some(e) => e.2 += 1,
                None => log::error!("keeper: a lookup of node {id}, never reported"),
            },
            "fgt" => {
                let n = msg["n"].as_u64().unwrap_or(0);
                if let Some(e) = self.inodes.get_mut(&id) {
                    e.2 = e.2.saturating_sub(n);
                    if e.2 == 0 {
                        self.inodes.remove(&id);
                    }
                }
            }
            "open" => {
                let fh = msg["fh"].as_u64().unwrap_or(0);
                self.handles.insert(fh, (msg["rec"].clone(), fds));
            }
            "close" => {
                self.handles.remove(&msg["fh"].as_u64().unwrap_or(0));
            }
            "chan" => self.channels.extend(fds),
            "reply" => {
                if self.replies.len() == REPLIES_KEPT {
                    self.replies.pop_front();
                }
                let hex = msg["b"].as_str().unwrap_or("").to_string();
                self.replies
                    .push_back((msg["u"].as_u64().unwrap_or(0), hex));
            }
            "ready" => return true,
            other => log::error!("keeper: unknown message {other:?}"),
        }
        false
    }

    /// Hands everything to a new serving process, then `end`.
    fn send_to(&self, link: &Link) -> std::io::Result<()> {
        let Some(init) = &self.init else {
            return link.send(&json!({"t": "fresh"}), &[]);
        };
        link.send(init, &[])?;
        for (id, (fd, path, n)) in &self.inodes {
            link.send(
                &json!({"t": "ino", "id": id, "path": path, "n": n}),
                &[fd.as_fd()],
            )?;
        }
        for (fh, (rec, fds)) in &self.handles {
            let fds: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
            link.send(&json!({"t": "open", "fh": fh, "rec": rec}), &fds)?;
        }
        for ch in &self.channels {
            link.send(&json!({"t": "chan"}), &[ch.as_fd()])?;
        }
        for (u, b) in &self.replies {
            link.send(&json!({"t": "reply", "u": u, "b": b}), &[])?;
        }
        link.send(&json!({"t": "end"}), &[])
    }
}

/// What the keeper loop tells its caller about the first serving process.
pub(super) enum Event {
    /// A serving process answers requests (its pid); the first one makes
    /// the mount ready for the service manager and the `--daemon` parent.
    Serving(u32),
}

/// Runs serving processes on `dev_fuse` until the mount goes away; returns
/// Err when it gives up (crash loop, or a child that refused to adopt).
pub(super) fn keep(
    stdio: ChildStdio,
    mountpoint: &std::path::Path,
    root: &OwnedFd,
    dev_fuse: &OwnedFd,
    upgrade: nix::sys::signal::SigSet,
    mut on_event: impl FnMut(Event),
) -> Result<(), StartError> {
    // Resolved now: once a package upgrade replaces the file, the path
    // names the new binary (and /proc/self/exe the deleted old one).
    let exe = std::env::current_exe()
        .map_err(|e| StartError(format!("cannot find the migsafe binary: {e}")))?;
    let serving = Arc::new(AtomicU32::new(0));
    let upgrading = Arc::new(AtomicBool::new(false));
    {
        let (serving, upgrading) = (serving.clone(), upgrading.clone());
        std::thread::spawn(move || {
            while upgrade.wait().is_ok() {
                let pid = serving.load(Ordering::SeqCst);
                if pid == 0 {
                    continue;
                }
                log::info!("SIGUSR2: replacing serving process {pid} (upgrade)");
                upgrading.store(true, Ordering::SeqCst);
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        });
    }
    let kept = Arc::new(Mutex::new(Kept::default()));
    let mut deaths: VecDeque<Instant> = VecDeque::new();
    let mut failed_starts = 0;
    loop {
        let (ours, theirs) = Link::pair().map_err(|e| StartError(format!("keeper link: {e}")))?;
        let mut child = spawn(&exe, &stdio, mountpoint, root, dev_fuse, &theirs)?;
        drop(theirs);
        let pid = child.id();
        let restoring = kept.lock().expect("kept lock").init.is_some();
        if restoring {
            let k = kept.lock().expect("kept lock");
            log::info!(
                "starting serving process {pid}: {} nodes, {} open handles to take over",
                k.inodes.len(),
                k.handles.len()
            );
        }
        // The child reads the state while it starts; a full socket only
        // makes this wait for it.
        if let Err(e) = kept.lock().expect("kept lock").send_to(&ours) {
            log::warn!("handing the state to serving process {pid}: {e}");
        }
        let (ready_tx, ready_rx) = mpsc::channel();
        let reader = {
            let kept = kept.clone();
            std::thread::spawn(move || read_reports(ours, kept, ready_tx))
        };
        if ready_rx.recv().is_ok() {
            failed_starts = 0;
            serving.store(pid, Ordering::SeqCst);
            on_event(Event::Serving(pid));
        } else {
            failed_starts += 1;
        }
        let status = child
            .wait()
            .map_err(|e| StartError(format!("waiting for serving process {pid}: {e}")))?;
        // The kernel sends FUSE_INIT once: a first child that died before
        // answering it (or right after, before serving) leaves nothing a
        // second one could take over; its log line says why.
        if failed_starts > 0 && kept.lock().expect("kept lock").init.is_none() {
            return err(format!(
                "the serving process failed to start ({status}); its error is above"
            ));
        }
        serving.store(0, Ordering::SeqCst);
        let _ = reader.join();
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(0), _) => return Ok(()),
            (Some(EXIT_REFUSED), _) => {
                return err(format!(
                    "serving process {pid} refused to take over the connection (its log says why); \
                     the mount is taken away: mount again"
                ));
            }
            _ => {}
        }
        if upgrading.swap(false, Ordering::SeqCst) {
            log::info!("upgrade: starting {} on the same connection", exe.display());
            continue;
        }
        let now = Instant::now();
        deaths.push_back(now);
        while deaths.front().is_some_and(|t| now - *t > CRASH_WINDOW) {
            deaths.pop_front();
        }
        if failed_starts >= START_LIMIT {
            return err(format!(
                "{failed_starts} serving processes in a row died before serving (last: {status}); \
                 giving up: the mount is taken away, mount again once the cause is fixed"
            ));
        }
        if deaths.len() > CRASH_LIMIT {
            return err(format!(
                "serving process died {} times within {} s (last: {status}); giving up: the mount \
                 is taken away, mount again once the cause is fixed",
                deaths.len(),
                CRASH_WINDOW.as_secs()
            ));
        }
        log::warn!(
            "serving process {pid} died ({status}); starting another on the same connection"
        );
    }
}

/// Applies the child's reports until it is gone.
fn read_reports(link: Link, kept: Arc<Mutex<Kept>>, ready: mpsc::Sender<()>) {
    loop {
        match link.recv() {
            Ok(Some((msg, fds))) => {
                if kept.lock().expect("kept lock").apply(msg, fds) {
                    let _ = ready.send(());
                }
            }
            Ok(None) => return,
            Err(e) => {
                log::error!("keeper: reading the serving process's report: {e}");
                return;
            }
        }
    }
}

/// Starts `exe` with this process's arguments as a serving child, the
/// connection and its end of the link inherited.
fn spawn(
    exe: &std::path::Path,
    stdio: &ChildStdio,
    mountpoint: &std::path::Path,
    root: &OwnedFd,
    dev_fuse: &OwnedFd,
    link: &Link,
) -> Result<Child, StartError> {
    let fail = |e: &dyn std::fmt::Display| StartError(format!("starting the serving process: {e}"));
    // Dups carry no close-on-exec flag: the child inherits exactly these.
    let fuse = nix::unistd::dup(dev_fuse).map_err(|e| fail(&e))?;
    let sock = nix::unistd::dup(link).map_err(|e| fail(&e))?;
    let root = nix::unistd::dup(root).map_err(|e| fail(&e))?;
    let child = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(
            SERVE_ENV,
            format!(
                "{},{},{},{},{}",
                fuse.as_raw_fd(),
                sock.as_raw_fd(),
                root.as_raw_fd(),
                std::process::id(),
                mountpoint.display()
            ),
        )
        // Only the keeper speaks to the service manager.
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(stdio.stdout())
        .stderr(stdio.stderr())
        .spawn()
        .map_err(|e| fail(&e))?;
    Ok(child)
}

/// Where a serving child's stdio goes: the keeper's own in the foreground
/// (the terminal, a unit's journal); when detached, never the caller's
/// (a `mount -t fuse.migsafe` or ssh caller waits for their end of file):
/// stderr to the log file if there is one, for panic messages.
pub(super) enum ChildStdio {
    Inherit,
    Detached(Option<std::path::PathBuf>),
}

impl ChildStdio {
    fn stdout(&self) -> Stdio {
        match self {
            ChildStdio::Inherit => Stdio::inherit(),
            ChildStdio::Detached(_) => Stdio::null(),
        }
    }

    fn stderr(&self) -> Stdio {
        match self {
            ChildStdio::Inherit => Stdio::inherit(),
            ChildStdio::Detached(Some(log)) => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .map(Stdio::from)
                .unwrap_or_else(|_| Stdio::null()),
            ChildStdio::Detached(None) => Stdio::null(),
        }
    }
}

/// What a serving child was handed.
pub(super) struct ServeEnv {
    pub mountpoint: std::path::PathBuf,
    pub fuse: OwnedFd,
    /// The backing root, opened before the mount.
    pub root: OwnedFd,
    pub link: Link,
    pub keeper: i32,
}

impl ServeEnv {
    /// The inherited fds, if this process is a keeper's serving child; an
    /// error when the variable is there but names no usable fds (this
    /// process must then not mount on its own).
    pub(super) fn take() -> Option<Result<ServeEnv, StartError>> {
        let v = std::env::var(SERVE_ENV).ok()?;
        let parse = || -> Result<ServeEnv, String> {
            let mut parts = v.splitn(5, ',');
            let mut num = || -> Result<i32, String> {
                parts
                    .next()
                    .and_then(|p| p.parse().ok())
                    .ok_or_else(|| "not FUSE_FD,LINK_FD,ROOT_FD,KEEPER_PID,MOUNTPOINT".to_string())
            };
            let (fuse, link, root, keeper) = (num()?, num()?, num()?, num()?);
            let mountpoint = std::path::PathBuf::from(parts.next().ok_or("no mountpoint")?);
            let fd = |n: i32| crate::sys::inherited_fd(n).map_err(|e| format!("fd {n}: {e}"));
            Ok(ServeEnv {
                mountpoint,
                fuse: fd(fuse)?,
                root: fd(root)?,
                link: Link::from_fd(fd(link)?),
                keeper,
            })
        };
        Some(parse().map_err(|e| {
            StartError(format!(
                "{SERVE_ENV}={v:?}: {e}; it is set by migsafe mount for its serving process \
                 only: unset it"
            ))
        }))
    }
}
