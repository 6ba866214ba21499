//! `migsafe ctl MNT COMMAND IMAGE...`: one request to a command's control
//! file, its result lines checked and shown.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::Path;

use super::ctl_file::{ctl_dir, daemon_gone, explain};
use super::out::{EXIT_FAILED, EXIT_OK, EXIT_USAGE, Out};
use crate::protocol::{self, key};

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

/// What the daemon answered a command: how the write went, and the result
/// lines read back from the same open file.
struct Answer {
    write: std::io::Result<()>,
    lines: Vec<protocol::Fields>,
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
    let answer = match send(mountpoint, ctl_name, cmd, images) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let all_ok = !answer.lines.is_empty()
        && answer
            .lines
            .iter()
            .all(|f| f.get_str(key::RESULT) == Some(protocol::RESULT_OK));
    if json {
        print_json(out, cmd, &answer, all_ok);
    } else {
        print_text(out, cmd, &answer.lines);
    }
    if answer.write.is_err() {
        return EXIT_FAILED;
    }
    // The write said ok: the lines must agree, one per named image.
    let star = images.iter().any(|i| i == "*");
    if !all_ok || (!star && answer.lines.len() != images.len()) {
        eprintln!(
            "migsafe ctl: {cmd}: the write succeeded but the result does not match it \
             ({} result lines for {} images{}); treat the command as not done",
            answer.lines.len(),
            images.len(),
            if all_ok { "" } else { ", not all ok" }
        );
        return EXIT_USAGE;
    }
    EXIT_OK
}

/// Writes the request to the command's control file and reads the result
/// back from the same open file (that is where the daemon puts it); a
/// daemon that is gone, or a result that does not parse, is exit status 2.
fn send(mountpoint: &Path, ctl_name: &str, cmd: &str, images: &[String]) -> Result<Answer, i32> {
    let path = ctl_dir(mountpoint, ctl_name).join(cmd);
    let mut file = match OpenOptions::new().read(true).write(true).open(&path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("migsafe ctl: {}", explain(mountpoint, &path, &e));
            return Err(EXIT_USAGE);
        }
    };
    let mut body = images.join("\n");
    body.push('\n');
    let write = file.write_all(body.as_bytes());
    if let Err(e) = &write
        && daemon_gone(e)
    {
        eprintln!("migsafe ctl: {cmd}: {}", explain(mountpoint, &path, e));
        return Err(EXIT_USAGE);
    }
    let mut text = String::new();
    if let Err(e) = file.read_to_string(&mut text) {
        if daemon_gone(&e) {
            eprintln!("migsafe ctl: {cmd}: {}", explain(mountpoint, &path, &e));
            return Err(EXIT_USAGE);
        }
        eprintln!(
            "migsafe ctl: {cmd}: cannot read the result from {}: {e}",
            path.display()
        );
        return Err(EXIT_USAGE);
    }
    let lines = parse_results(mountpoint, cmd, &text)?;
    if let Err(e) = &write
        && text.is_empty()
    {
        eprintln!("migsafe ctl: {cmd} failed: {e}");
    }
    Ok(Answer { write, lines })
}

/// The result lines of `text`, each parsed and checked; the first that is
/// not valid ends the command with exit status 2.
fn parse_results(mountpoint: &Path, cmd: &str, text: &str) -> Result<Vec<protocol::Fields>, i32> {
    if !text.is_empty() && !text.ends_with('\n') {
        eprintln!(
            "migsafe ctl: {cmd}: the daemon's result {text:?} does not end with a newline; \
             is {} served by a migsafe of this version?",
            mountpoint.display()
        );
        return Err(EXIT_USAGE);
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
                return Err(EXIT_USAGE);
            }
        }
    }
    Ok(lines)
}

/// `--json`: one document with the command, whether it succeeded, the
/// write's errno, and every result line as an object.
fn print_json(out: &mut Out, cmd: &str, answer: &Answer, all_ok: bool) {
    let results: Vec<serde_json::Value> = answer
        .lines
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
        "ok": answer.write.is_ok() && all_ok,
        "errno": answer.write.as_ref().err().and_then(|e| e.raw_os_error()).map(crate::sys::errno_name),
        "results": results,
    });
    out.line(&serde_json::to_string_pretty(&doc).unwrap_or_default());
}

/// One line per result for a person: ok with its time (and the fencing
/// when the command reports one), or FAILED with the errno and detail.
fn print_text(out: &mut Out, cmd: &str, lines: &[protocol::Fields]) {
    for f in lines {
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
