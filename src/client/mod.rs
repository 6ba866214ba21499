//! `migsafe ctl`: a thin client over the control files, for scripts that
//! prefer a command with exit codes and readable output to `echo > file`.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use crate::settings::Key;

pub use crate::protocol::COMMANDS;

mod command;
mod ctl_file;
mod metrics;
mod out;
mod status;
mod upgrade;
pub use command::command;
use ctl_file::{ctl_dir, daemon_gone, explain};
pub use metrics::metrics;
use out::Out;
pub use out::{EXIT_FAILED, EXIT_OK, EXIT_USAGE};
pub use status::status;
pub use upgrade::upgrade;

/// `migsafe ctl MNT set KEY VALUE`: writes a runtime setting. Exit status 1
/// when the daemon refuses the value (the allowed words are printed), 2 for
/// an unknown key, a daemon that is gone, a refused write permission or an
/// open that fails.
pub fn set(mountpoint: &Path, ctl_name: &str, key: &str, value: &str) -> i32 {
    if Key::from_name(key).is_none() {
        let keys: Vec<&str> = Key::ALL.iter().map(|k| k.name()).collect();
        eprintln!(
            "migsafe ctl: unknown setting {key:?}; settings: {}",
            keys.join(", ")
        );
        return EXIT_USAGE;
    }
    let path = ctl_dir(mountpoint, ctl_name).join(key);
    let mut file = match OpenOptions::new().write(true).open(&path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("migsafe ctl: {}", explain(mountpoint, &path, &e));
            return EXIT_USAGE;
        }
    };
    match file.write_all(format!("{value}\n").as_bytes()) {
        Ok(_) => {
            let mut out = Out::new();
            out.line(&format!("{key} = {value}"));
            out.finish(EXIT_OK)
        }
        Err(e) if daemon_gone(&e) || e.raw_os_error() == Some(libc::EACCES) => {
            eprintln!("migsafe ctl: set {key}: {}", explain(mountpoint, &path, &e));
            EXIT_USAGE
        }
        Err(e) => {
            let words = Key::from_name(key)
                .map(|k| k.words().join(", "))
                .unwrap_or_default();
            eprintln!("migsafe ctl: set {key} {value}: {e} (allowed: {words})");
            EXIT_FAILED
        }
    }
}
