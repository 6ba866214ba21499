//! The serving process a keeper starts (mount/keeper.rs): it builds the
//! filesystem, answers FUSE_INIT on a new connection or takes over one a
//! dead predecessor served (restoring every node and handle the keeper
//! hands it), reports each change back, and serves until the mount goes.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use serde_json::{Value, json};

use super::args::{MountArgs, StartError};
use super::keeper::{EXIT_REFUSED, ServeEnv};
use super::link::Link;
use super::{apply_options, block_signals, build_fs, check, raise_fd_limit, serve};
use crate::fs::{Keeper, MigsafeFs};
use crate::session::{Connection, Negotiated, ReplyLog, Session};

/// Reports changes to the keeper; a keeper that is gone has taken this
/// process with it (PR_SET_PDEATHSIG), so a failed send is only logged.
struct LinkKeeper(Link);

impl LinkKeeper {
    fn send(&self, msg: Value, fds: &[BorrowedFd<'_>]) {
        if let Err(e) = self.0.send(&msg, fds) {
            log::error!("reporting to the keeper: {e}");
        }
    }
}

impl ReplyLog for LinkKeeper {
    fn record(&self, unique: u64, message: &[u8]) {
        self.send(json!({"t": "reply", "u": unique, "b": hex(message)}), &[]);
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Keeper for LinkKeeper {
    fn inode_new(&self, nodeid: u64, fd: BorrowedFd<'_>, path: &str) {
        self.send(json!({"t": "ino", "id": nodeid, "path": path}), &[fd]);
    }
    fn inode_ref(&self, nodeid: u64) {
        self.send(json!({"t": "ref", "id": nodeid}), &[]);
    }
    fn inode_forget(&self, nodeid: u64, n: u64) {
        self.send(json!({"t": "fgt", "id": nodeid, "n": n}), &[]);
    }
    fn handle_open(&self, fh: u64, record: Value, fds: &[BorrowedFd<'_>]) {
        self.send(json!({"t": "open", "fh": fh, "rec": record}), fds);
    }
    fn handle_close(&self, fh: u64) {
        self.send(json!({"t": "close", "fh": fh}), &[]);
    }
}

/// Serves as the keeper's child; returns once the mount is gone.
pub(super) fn serve_child(mut args: MountArgs, env: ServeEnv) -> Result<(), StartError> {
    crate::sys::die_with_parent(env.keeper)
        .map_err(|e| StartError(format!("serving process: keeper {} gone: {e}", env.keeper)))?;
    crate::sys::set_keeper(env.keeper as u32);
    args.resolved_mountpoint = Some(env.mountpoint.clone());
    let (_, acl) = apply_options(&mut args)?;
    // Detached by the keeper already: log where it logs.
    if std::mem::take(&mut args.daemon)
        && args.log_file.is_none()
        && crate::logging::to_syslog().is_err()
    {
        // As the keeper did when it detached (it said so on the caller's
        // stderr then).
        let _ = crate::logging::to_file(std::path::Path::new(super::daemon::FALLBACK_LOG), false);
    }
    let signals = block_signals();
    let checked = check(&args, Some(env.root))?;
    raise_fd_limit();
    let fs = build_fs(&args, checked)?;
    let conn = Connection::new(env.fuse);
    let link = env.link;
    let mut given = Vec::new();
    let mut recorded = Vec::new();
    let adopted = match receive_state(&link, &fs, &conn, &mut given, &mut recorded) {
        Ok(n) => n,
        Err(why) => {
            log::error!(
                "cannot take over the FUSE connection of {}: {why}; refusing (mount again)",
                args.mountpoint.display()
            );
            std::process::exit(EXIT_REFUSED);
        }
    };
    let keeper = Arc::new(LinkKeeper(link));
    fs.keep_with(keeper.clone());
    let notifier_slot = fs.notifier.clone();
    let session = match adopted {
        Some((negotiated, supported)) => {
            fs.adopted(&negotiated, supported);
            Session::adopt(fs, conn, acl, negotiated)
        }
        None => {
            let mut session = Session::new(fs, conn, acl);
            let negotiated = session.handshake().map_err(|e| {
                StartError(format!("FUSE_INIT on {}: {e}", args.mountpoint.display()))
            })?;
            keeper.send(
                json!({
                    "t": "init",
                    "flags": negotiated.flags,
                    "max_write": negotiated.max_write,
                    "supported": session.fs().passthrough_supported(),
                }),
                &[],
            );
            session
        }
    };
    let mut session = session;
    session.log_replies(keeper.clone(), recorded);
    let clones = session
        .workers(args.threads, given)
        .map_err(|e| StartError(format!("cloning /dev/fuse for the workers: {e}")))?;
    for ch in clones {
        keeper.send(json!({"t": "chan"}), &[ch.as_fd()]);
    }
    let _ = notifier_slot.set(session.notifier());
    forward_stop_signals(signals, env.keeper);
    log::info!(
        "migsafe {} serving {} on {} ({} threads, pid {})",
        env!("CARGO_PKG_VERSION"),
        args.backing.display(),
        args.mountpoint.display(),
        args.threads,
        std::process::id()
    );
    keeper.send(json!({"t": "ready"}), &[]);
    serve(session, &args)?;
    // Said here, by the process the pid file names, before it exits.
    log::info!("unmounted {}", args.mountpoint.display());
    Ok(())
}

/// What the keeper hands over: nothing (a new connection, FUSE_INIT to
/// answer), or what was agreed and every node and handle, restored here.
fn receive_state(
    link: &Link,
    fs: &MigsafeFs,
    conn: &Connection,
    channels: &mut Vec<std::os::fd::OwnedFd>,
    recorded: &mut Vec<(u64, Vec<u8>)>,
) -> Result<Option<(Negotiated, bool)>, String> {
    let next = || -> Result<(Value, Vec<std::os::fd::OwnedFd>), String> {
        link.recv()
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "the keeper closed the link".to_string())
    };
    let (first, _) = next()?;
    if first["t"] == "fresh" {
        return Ok(None);
    }
    let negotiated = Negotiated {
        flags: first["flags"].as_u64().ok_or("no INIT flags")?,
        max_write: first["max_write"].as_u64().ok_or("no max_write")? as u32,
    };
    let supported = first["supported"].as_bool().unwrap_or(false);
    let (mut nodes, mut handles) = (0, 0);
    loop {
        let (msg, mut fds) = next()?;
        match msg["t"].as_str().unwrap_or("") {
            "ino" => {
                let fd = fds.pop().ok_or("a node without its fd")?;
                let id = msg["id"].as_u64().ok_or("a node without id")?;
                let path = msg["path"].as_str().unwrap_or("").to_string();
                fs.restore_inode(id, fd, path, msg["n"].as_u64().unwrap_or(1))?;
                nodes += 1;
            }
            "open" => {
                let fh = msg["fh"].as_u64().ok_or("a handle without number")?;
                fs.restore_handle(fh, &msg["rec"], fds, conn)?;
                handles += 1;
            }
            "chan" => channels.extend(fds),
            "reply" => {
                let unique = msg["u"].as_u64().ok_or("a recorded answer without id")?;
                let bytes = unhex(msg["b"].as_str().unwrap_or(""))
                    .ok_or("a recorded answer that is not hex")?;
                recorded.push((unique, bytes));
            }
            "end" => break,
            other => return Err(format!("unexpected {other:?} in the state")),
        }
    }
    log::info!(
        "taking over the FUSE connection: restored {nodes} nodes and {handles} open handles \
         (passthrough {})",
        if negotiated.passthrough() {
            "on"
        } else {
            "off"
        }
    );
    Ok(Some((negotiated, supported)))
}

/// SIGTERM/SIGINT/SIGHUP sent to this process (its pid is the pid file's)
/// stop the mount: they go to the keeper, which unmounts.
fn forward_stop_signals(signals: nix::sys::signal::SigSet, keeper: i32) {
    std::thread::spawn(move || {
        while let Ok(sig) = signals.wait() {
            log::info!("{sig:?}: asking the keeper to unmount");
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(keeper), sig);
        }
    });
}
