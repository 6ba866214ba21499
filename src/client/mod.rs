//! `migsafe ctl`: a thin client over the control files, for scripts that
//! prefer a command with exit codes and readable output to `echo > file`.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::Path;

use crate::protocol::{self, key};
use crate::settings::Key;

/// Exit status: 0 ok, 1 the command failed, 2 usage or I/O error.
pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILED: i32 = 1;
pub const EXIT_USAGE: i32 = 2;

pub use crate::protocol::COMMANDS;

mod metrics;
mod status;
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
pub struct Out {
    w: std::io::StdoutLock<'static>,
    closed: bool,
    error: Option<std::io::Error>,
}

impl Out {
    pub fn new() -> Out {
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
    pub fn text(&mut self, text: &str) {
        if self.closed || self.error.is_some() {
            return;
        }
        let r = self.w.write_all(text.as_bytes());
        self.record(r);
    }

    /// Writes one line.
    pub fn line(&mut self, line: &str) {
        self.text(line);
        self.text("\n");
    }

    /// Flushes and turns `code` into the exit status: 2 if the output
    /// failed for another reason than a closed pipe.
    pub fn finish(mut self, code: i32) -> i32 {
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

/// Result keys whose values are counts: JSON numbers, and a line where
/// they are not numbers is not a valid result.
const NUMERIC_KEYS: [&str; 2] = [key::RESIDENT_PAGES, key::MS];

/// Checks what a result line must say beyond its syntax.
fn check_fields(f: &protocol::Fields) -> Result<(), String> {
    match f.get_str(key::RESULT) {
        Some(protocol::RESULT_OK) | Some(protocol::RESULT_ERROR) => {}
        Some(other) => return Err(format!("result={other} is neither ok nor error")),
        None => return Err("no result= field".into()),
    }
    for k in NUMERIC_KEYS {
        if let Some(v) = f.get(k)
            && std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .is_none()
        {
            return Err(format!("{k}= is not a number"));
        }
    }
    Ok(())
}

/// How a value of a result line is shown to a person: as the protocol
/// writes it (bare, or quoted with escapes), so one result stays one line
/// whatever bytes a file name holds.
fn shown(v: Option<&[u8]>) -> String {
    v.map(protocol::quote).unwrap_or_else(|| "?".into())
}

/// A detail message for a person: its text without the protocol's quotes,
/// control bytes still escaped.
fn shown_detail(v: Option<&[u8]>) -> String {
    let q = shown(v);
    match q.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        Some(inner) => inner.replace("\\\"", "\""),
        None => q,
    }
}

/// A result value as JSON: text when it is UTF-8; otherwise the protocol's
/// escaped form (and the caller marks the key as escaped), never a lossy
/// string that could stand for another name.
fn json_value(v: &[u8]) -> (serde_json::Value, bool) {
    match std::str::from_utf8(v) {
        Ok(s) => (serde_json::Value::String(s.to_string()), false),
        Err(_) => (serde_json::Value::String(protocol::quote(v)), true),
    }
}

/// Runs a command on images; prints results; returns the exit status:
/// 0 only if the write succeeded and every result line parsed and says ok.
pub fn command(mountpoint: &Path, ctl_name: &str, cmd: &str, images: &[String], json: bool) -> i32 {
    let mut out = Out::new();
    let code = run_command(&mut out, mountpoint, ctl_name, cmd, images, json);
    out.finish(code)
}

fn run_command(
    out: &mut Out,
    mountpoint: &Path,
    ctl_name: &str,
    cmd: &str,
    images: &[String],
    json: bool,
) -> i32 {
    if let Some(bad) = images.iter().find(|i| i.contains('\n') || i.is_empty()) {
        eprintln!(
            "migsafe ctl: {cmd}: cannot name {} in a request: requests are one path per line, \
             so a path can be neither empty nor hold a newline; use '*' to reach such an image",
            protocol::quote(bad.as_bytes())
        );
        return EXIT_USAGE;
    }
    let path = ctl_dir(mountpoint, ctl_name).join(cmd);
    let mut file = match OpenOptions::new().read(true).write(true).open(&path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("migsafe ctl: {}", explain(mountpoint, &path, &e));
            return EXIT_USAGE;
        }
    };
    let mut body = images.join("\n");
    body.push('\n');
    let write_result = file.write_all(body.as_bytes());
    if let Err(e) = &write_result
        && daemon_gone(e)
    {
        eprintln!("migsafe ctl: {cmd}: {}", explain(mountpoint, &path, e));
        return EXIT_USAGE;
    }
    let mut text = String::new();
    if let Err(e) = file.read_to_string(&mut text) {
        if daemon_gone(&e) {
            eprintln!("migsafe ctl: {cmd}: {}", explain(mountpoint, &path, &e));
            return EXIT_USAGE;
        }
        eprintln!(
            "migsafe ctl: {cmd}: cannot read the result from {}: {e}",
            path.display()
        );
        return EXIT_USAGE;
    }
    if !text.is_empty() && !text.ends_with('\n') {
        eprintln!(
            "migsafe ctl: {cmd}: the daemon's result {text:?} does not end with a newline; \
             is {} served by a migsafe of this version?",
            mountpoint.display()
        );
        return EXIT_USAGE;
    }
    let mut lines = Vec::new();
    // Split on '\n' only: a stray '\r' (which the daemon escapes) must fail
    // to parse, not be dropped as `str::lines` would.
    for line in text.split_terminator('\n') {
        match protocol::parse_line(line)
            .map_err(|e| e.to_string())
            .and_then(|f| {
                check_fields(&f)?;
                Ok(f)
            }) {
            Ok(f) => lines.push(f),
            Err(e) => {
                eprintln!(
                    "migsafe ctl: {cmd}: the daemon's result line {line:?} does not parse ({e}); \
                     is {} served by a migsafe of this version?",
                    mountpoint.display()
                );
                return EXIT_USAGE;
            }
        }
    }
    let all_ok = !lines.is_empty()
        && lines
            .iter()
            .all(|f| f.get_str(key::RESULT) == Some(protocol::RESULT_OK));
    let failed = write_result.is_err();
    let star = images.iter().any(|i| i == "*");
    if let Err(e) = &write_result
        && text.is_empty()
    {
        eprintln!("migsafe ctl: {cmd} failed: {e}");
    }
    if json {
        let results: Vec<serde_json::Value> = lines
            .iter()
            .map(|f| {
                let mut obj = serde_json::Map::new();
                for (k, v) in &f.0 {
                    if NUMERIC_KEYS.contains(&k.as_str())
                        && let Some(n) = std::str::from_utf8(v)
                            .ok()
                            .and_then(|s| s.parse::<u64>().ok())
                    {
                        obj.insert(k.clone(), n.into());
                        continue;
                    }
                    let (value, escaped) = json_value(v);
                    obj.insert(k.clone(), value);
                    if escaped {
                        obj.insert(format!("{k}_escaped"), serde_json::Value::Bool(true));
                    }
                }
                serde_json::Value::Object(obj)
            })
            .collect();
        let doc = serde_json::json!({
            "command": cmd,
            "ok": !failed && all_ok,
            "errno": write_result.as_ref().err().and_then(|e| e.raw_os_error()).map(crate::sys::errno_name),
            "results": results,
        });
        out.line(&serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        for f in &lines {
            let name = f.get(key::IMAGE);
            match f.get_str(key::RESULT) {
                Some(protocol::RESULT_OK) if f.get(key::FENCING).is_some() => out.line(&format!(
                    "{cmd} {}: ok ({} ms), fencing {}: {}",
                    shown(name),
                    shown(f.get(key::MS)),
                    shown(f.get(key::FENCING)),
                    shown_detail(f.get(key::DETAIL))
                )),
                Some(protocol::RESULT_OK) => out.line(&format!(
                    "{cmd} {}: ok ({} ms)",
                    shown(name),
                    shown(f.get(key::MS))
                )),
                _ => out.line(&format!(
                    "{cmd} {}: FAILED {}: {}",
                    name.map(protocol::quote)
                        .unwrap_or_else(|| "(request)".into()),
                    shown(f.get(key::ERRNO)),
                    shown_detail(f.get(key::DETAIL))
                )),
            }
        }
    }
    if failed {
        return EXIT_FAILED;
    }
    // The write said ok: the lines must agree, one per named image.
    if !all_ok || (!star && lines.len() != images.len()) {
        eprintln!(
            "migsafe ctl: {cmd}: the write succeeded but the result does not match it \
             ({} result lines for {} images{}); treat the command as not done",
            lines.len(),
            images.len(),
            if all_ok { "" } else { ", not all ok" }
        );
        return EXIT_USAGE;
    }
    EXIT_OK
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_names_and_details_on_one_line() {
        assert_eq!(shown(Some(b"disk.img")), "disk.img");
        assert_eq!(shown(Some(b"my disk.img")), "\"my disk.img\"");
        assert_eq!(shown(Some(b"a\nb")), "\"a\\nb\"");
        assert_eq!(shown(None), "?");
        assert_eq!(shown_detail(Some(b"x \"y\"\nz")), "x \"y\"\\nz");
    }

    #[test]
    fn json_values_never_lossy() {
        assert_eq!(json_value(b"a b"), (serde_json::json!("a b"), false));
        assert_eq!(
            json_value(b"a\xff"),
            (serde_json::json!("\"a\\xff\""), true)
        );
    }
}
