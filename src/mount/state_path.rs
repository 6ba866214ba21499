//! The state file a mount starts from: where it lives when `--state-file`
//! does not say, and reading it before the start.

use std::path::{Path, PathBuf};

use super::args::{MountArgs, StartError, err};
use crate::image::state_file::{Record, StateFile};

/// The state file's records, or none when the mount keeps no state file.
/// Read (and checked) before detaching, so a state file that cannot be
/// trusted stops the start where the operator sees why.
pub(super) fn load_state(args: &MountArgs) -> Result<Option<(StateFile, Vec<Record>)>, StartError> {
    if args
        .state_file
        .as_ref()
        .is_some_and(|p| p.as_os_str().is_empty() || p.ends_with(".."))
    {
        return err("--state-file: name a file (or none to keep no state file)");
    }
    let Some(p) = state_file_path(args) else {
        return Ok(None);
    };
    if p.starts_with(&args.mountpoint)
        || p.parent()
            .is_some_and(|d| d.starts_with(args.canonical_mountpoint()))
    {
        return err(format!(
            "--state-file {}: beneath the mountpoint, where the mount would hide it; choose a path outside it",
            p.display()
        ));
    }
    Ok(Some(StateFile::load(&p).map_err(StartError)?))
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
    let mountpoint = args.canonical_mountpoint();
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
