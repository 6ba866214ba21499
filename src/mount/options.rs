//! `-o` mount options: the kernel's and fusermount3's, and migsafe's own (its
//! command-line options and runtime settings as `key=value`), so an fstab
//! line can carry a whole `migsafe mount` command line.

use std::path::{Path, PathBuf};

use crate::session::Acl;

use super::args::{MountArgs, StartError, err};
use crate::fs::{DataPath, IoMode, Writeback};
use crate::settings::Key;

/// A mount option for mount(2) or fusermount3, as `-o` named it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum MountOption {
    FSName(String),
    Subtype(String),
    AutoUnmount,
    DefaultPermissions,
    Dev,
    NoDev,
    Suid,
    NoSuid,
    RO,
    RW,
    Exec,
    NoExec,
    Atime,
    NoAtime,
    DirSync,
    Sync,
    Async,
}

impl MountOption {
    /// The option as fusermount3's `-o` spells it.
    pub(super) fn to_option_string(&self) -> String {
        match self {
            MountOption::FSName(n) => format!("fsname={n}"),
            MountOption::Subtype(t) => format!("subtype={t}"),
            MountOption::AutoUnmount => "auto_unmount".into(),
            MountOption::DefaultPermissions => "default_permissions".into(),
            MountOption::Dev => "dev".into(),
            MountOption::NoDev => "nodev".into(),
            MountOption::Suid => "suid".into(),
            MountOption::NoSuid => "nosuid".into(),
            MountOption::RO => "ro".into(),
            MountOption::RW => "rw".into(),
            MountOption::Exec => "exec".into(),
            MountOption::NoExec => "noexec".into(),
            MountOption::Atime => "atime".into(),
            MountOption::NoAtime => "noatime".into(),
            MountOption::DirSync => "dirsync".into(),
            MountOption::Sync => "sync".into(),
            MountOption::Async => "async".into(),
        }
    }
}

/// `migsafe:` and the canonical backing path: what findmnt shows as SOURCE.
pub(super) fn default_fsname(backing: &Path) -> String {
    let canonical = std::fs::canonicalize(backing).unwrap_or_else(|_| backing.to_path_buf());
    format!("migsafe:{}", canonical.display())
}

/// Splits `-o` options into kernel/fusermount3 mount options (returned, with the
/// session's access rule) and migsafe's own, which are written into `args`
/// as their command-line forms would be (so fstab lines can carry them).
pub(super) fn apply_options(args: &mut MountArgs) -> Result<(Vec<MountOption>, Acl), StartError> {
    let mut opts = Vec::new();
    let mut acl = Acl::Owner;
    let mut fsname = None;
    for opt in args.options.clone().iter().flat_map(|o| o.split(',')) {
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        match (key, value) {
            ("", _) => {}
            ("allow_other", None) => acl = Acl::All,
            ("allow_root", None) => acl = Acl::RootAndOwner,
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
            ("writeback", Some(v)) => args.writeback = parse_writeback(v)?,
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

fn parse_device_io(v: &str) -> Result<DataPath, StartError> {
    let words = DataPath::DEVICE.map(DataPath::name);
    choice(DataPath::device_from_name(v), v, "device io", &words)
}

fn parse_writeback(v: &str) -> Result<Writeback, StartError> {
    let words = Writeback::ALL.map(Writeback::name);
    choice(Writeback::from_name(v), v, "writeback", &words)
}

fn parse_io(v: &str) -> Result<IoMode, StartError> {
    choice(
        IoMode::from_name(v),
        v,
        "io mode",
        &IoMode::ALL.map(IoMode::name),
    )
}

/// The value `v` named, or the error that names the `words` it may be.
fn choice<T>(found: Option<T>, v: &str, what: &str, words: &[&str]) -> Result<T, StartError> {
    found.ok_or_else(|| StartError(format!("invalid {what} {v:?}: expected {}", one_of(words))))
}

/// `a, b or c`.
fn one_of(words: &[&str]) -> String {
    match words.split_last() {
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
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
