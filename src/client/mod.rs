//! `migsafe ctl`: a thin client over the control files, for scripts that
//! prefer a command with exit codes and readable output to `echo > file`.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use crate::settings::Key;

/// Exit status: 0 ok, 1 the command failed, 2 usage or I/O error.
pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILED: i32 = 1;
pub const EXIT_USAGE: i32 = 2;

pub use crate::protocol::COMMANDS;

mod command;
mod metrics;
mod status;
pub use command::command;
pub use metrics::metrics;
pub use status::status;

fn ctl_dir(mountpoint: &Path, ctl_name: &str) -> std::path::PathBuf {
    mountpoint.join(ctl_name)
}

/// Standard output of the client. Rust ignores SIGPIPE, so `println!`
/// panics once the reader is gone (`migsafe ctl MNT status | head -1`):
/// here a closed pipe just ends the output quietly (the command's own
/// result still decides the exit status), and any other write error
/// (a full disk) is reported once and makes the exit status 2.
pub(crate) struct Out {
    w: std::io::StdoutLock<'static>,
    closed: bool,
    error: Option<std::io::Error>,
}

impl Out {
    pub(crate) fn new() -> Out {
        Out {
            w: std::io::stdout().lock(),
            closed: false,
            error: None,
        }
    }

    fn record(&mut self, r: std::io::Result<()>) {
        match r {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => self.closed = true,
            Err(e) => self.error = Some(e),
        }
    }

    /// Writes `text` (which carries its own newlines) unless output ended.
    pub(crate) fn text(&mut self, text: &str) {
        if self.closed || self.error.is_some() {
            return;
        }
        let r = self.w.write_all(text.as_bytes());
        self.record(r);
    }

    /// Writes one line.
    pub(crate) fn line(&mut self, line: &str) {
        self.text(line);
        self.text("\n");
    }

    /// Flushes and turns `code` into the exit status: 2 if the output
    /// failed for another reason than a closed pipe.
    pub(crate) fn finish(mut self, code: i32) -> i32 {
        if !self.closed && self.error.is_none() {
            let r = self.w.flush();
            self.record(r);
        }
        match self.error {
            Some(e) => {
                eprintln!("migsafe ctl: cannot write the output: {e}");
                EXIT_USAGE
            }
            None => code,
        }
    }
}

impl Default for Out {
    fn default() -> Self {
        Out::new()
    }
}

/// True for the errnos of a FUSE mount whose daemon has gone (killed,
/// crashed, or the connection aborted through fusectl).
fn daemon_gone(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOTCONN) | Some(libc::ECONNABORTED)
    )
}

/// The message for an error on control file `path`, saying what it means
/// for an operator and what to do next.
fn explain(mountpoint: &Path, path: &Path, e: &std::io::Error) -> String {
    let mnt = mountpoint.display();
    let errno = e
        .raw_os_error()
        .map(crate::sys::errno_name)
        .unwrap_or_else(|| "?".into());
    if daemon_gone(e) {
        return format!(
            "the migsafe daemon of {mnt} is gone ({errno}: {e}): nothing reaches storage \
             through this mount any more. Unmount it with `umount -l {mnt}` and mount it \
             again; then every VM using images there must reopen them (restart it or \
             re-attach its disks), its open files still point at the dead mount"
        );
    }
    match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => format!(
            "cannot write {}: permission denied ({errno}): only root or the user who mounted \
             {mnt} may write control files (any user may read status); run this as root",
            path.display()
        ),
        Some(libc::ENOENT) => format!(
            "cannot open {}: no such file ({errno}): is {mnt} a migsafe mount (and is its \
             control directory named {:?}; see --ctl-name)?",
            path.display(),
            path.parent()
                .and_then(|p| p.file_name())
                .unwrap_or_default()
        ),
        Some(libc::EAGAIN) => format!(
            "cannot open {}: the daemon of {mnt} is busy ({errno}): too many status reads \
             or commands are waiting (another user flooding status?); try again",
            path.display()
        ),
        _ => format!(
            "cannot open {}: {e} ({errno}; is {mnt} a migsafe mount?)",
            path.display()
        ),
    }
}

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
