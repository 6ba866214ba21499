//! What `migsafe mount` was told, and the error a start ends with.

use std::path::PathBuf;

use crate::fs::{DataPath, IoMode, Writeback};
use crate::settings::Key;

/// Everything `migsafe mount` was told.
#[derive(Debug, Clone)]
pub struct MountArgs {
    pub backing: PathBuf,
    pub mountpoint: PathBuf,
    pub devices: Vec<(String, PathBuf)>,
    pub io: IoMode,
    /// Data path of `--device` entries: cached (default) or relay.
    pub device_io: DataPath,
    /// `--writeback`: the FUSE writeback cache for a devices-only mount.
    pub writeback: Writeback,
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
    /// A keeper process holds the FUSE connection and restarts the serving
    /// process when it dies (`--no-restart`: false).
    pub restart: bool,
    /// Set in a keeper's serving child only: the mountpoint, resolved by
    /// the keeper. The child must not resolve it itself: the mount is there
    /// and nothing serves it yet, so a stat of it would wait forever.
    pub resolved_mountpoint: Option<PathBuf>,
}

impl MountArgs {
    /// The mountpoint with symlinks and `..` resolved.
    pub(super) fn canonical_mountpoint(&self) -> PathBuf {
        match &self.resolved_mountpoint {
            Some(p) => p.clone(),
            None => {
                std::fs::canonicalize(&self.mountpoint).unwrap_or_else(|_| self.mountpoint.clone())
            }
        }
    }
}

/// A start-up error: printed as one line, exit status 1.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartError(pub String);

pub(super) fn err<T>(msg: impl Into<String>) -> Result<T, StartError> {
    Err(StartError(msg.into()))
}
