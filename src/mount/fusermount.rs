//! Mounting without CAP_SYS_ADMIN: the setuid `fusermount3` mounts and hands
//! the `/dev/fuse` fd back over a socket named by `_FUSE_COMMFD` (libfuse's
//! protocol). With `auto_unmount` it stays running and unmounts once that
//! socket closes, i.e. when this process exits.

use std::io::{IoSliceMut, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

use super::args::{StartError, err};
use super::options::MountOption;
use crate::session::Acl;

const FUSERMOUNT: &str = "fusermount3";

/// A mount fusermount3 made for us.
pub(super) struct UserMount {
    mountpoint: PathBuf,
    /// Held open while fusermount3 waits to auto-unmount.
    auto_unmount: Mutex<Option<UnixStream>>,
}

impl UserMount {
    /// Mounts `mountpoint` through fusermount3; returns the connection's fd.
    pub(super) fn mount(
        mountpoint: &Path,
        options: &[MountOption],
        acl: Acl,
    ) -> Result<(OwnedFd, UserMount), StartError> {
        fn fail<T>(mountpoint: &Path, what: String) -> Result<T, StartError> {
            err(format!(
                "cannot mount {} with {FUSERMOUNT}: {what}",
                mountpoint.display()
            ))
        }
        let (ours, theirs) = UnixStream::pair().or_else(|e| fail(mountpoint, e.to_string()))?;
        // A dup has no close-on-exec flag: fusermount3 inherits it.
        let child_end = nix::unistd::dup(&theirs).or_else(|e| fail(mountpoint, e.to_string()))?;
        let mut opts: Vec<String> = options.iter().map(|o| o.to_option_string()).collect();
        match acl {
            Acl::All => opts.push("allow_other".into()),
            Acl::RootAndOwner => opts.push("allow_root".into()),
            Acl::Owner => {}
        }
        let mut child = Command::new(FUSERMOUNT)
            .arg("-o")
            .arg(opts.join(","))
            .arg("--")
            .arg(mountpoint)
            .env("_FUSE_COMMFD", child_end.as_raw_fd().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .or_else(|e| fail(mountpoint, format!("{e}; install the fuse3 package")))?;
        drop(child_end);
        drop(theirs);
        let Some(fd) = receive_fd(&ours) else {
            drop(ours);
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut stderr);
            }
            let _ = child.wait();
            return fail(mountpoint, stderr.trim().to_string());
        };
        let auto_unmount = options.contains(&MountOption::AutoUnmount);
        let keep = if auto_unmount {
            // fusermount3 runs on, watching the socket; reap it later.
            std::thread::spawn(move || child.wait());
            Some(ours)
        } else {
            drop(ours);
            let _ = child.wait();
            None
        };
        let _ = nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        Ok((
            fd,
            UserMount {
                mountpoint: mountpoint.to_path_buf(),
                auto_unmount: Mutex::new(keep),
            },
        ))
    }

    /// Unmounts (lazily, as fusermount3 -z does); with auto_unmount,
    /// closing the socket makes fusermount3 do it.
    pub(super) fn unmount(&self) -> std::io::Result<()> {
        if let Some(sock) = self.auto_unmount.lock().unwrap().take() {
            drop(sock);
            return Ok(());
        }
        let status = Command::new(FUSERMOUNT)
            .args(["-u", "-q", "-z", "--"])
            .arg(&self.mountpoint)
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("{FUSERMOUNT} -u: {status}")))
        }
    }
}

/// The fd fusermount3 sends (one SCM_RIGHTS message), or None when it
/// closed the socket without one (it failed; its stderr says why).
fn receive_fd(sock: &UnixStream) -> Option<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::empty(),
    )
    .ok()?;
    for c in msg.cmsgs().ok()? {
        if let ControlMessageOwned::ScmRights(fds) = c
            && let Some(&fd) = fds.first()
        {
            return Some(crate::sys::owned_fd_from_scm_rights(fd));
        }
    }
    None
}
