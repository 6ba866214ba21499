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

fn ctl_dir(mountpoint: &Path, ctl_name: &str) -> std::path::PathBuf {
    mountpoint.join(ctl_name)
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
            eprintln!(
                "migsafe ctl: cannot open {}: {e} (is {} a migsafe mount?)",
                path.display(),
                mountpoint.display()
            );
            return EXIT_USAGE;
        }
    };
    let mut body = images.join("\n");
    body.push('\n');
    let write_result = file.write_all(body.as_bytes());
    let mut text = String::new();
    if let Err(e) = file.read_to_string(&mut text) {
        eprintln!(
            "migsafe ctl: {cmd}: cannot read the result from {}: {e}",
            path.display()
        );
        return EXIT_USAGE;
    }
    let mut lines = Vec::new();
    for line in text.lines() {
        match protocol::parse_line(line) {
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
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        for f in &lines {
            let name = f.get(key::IMAGE);
            match f.get_str(key::RESULT) {
                Some(protocol::RESULT_OK) => {
                    println!("{cmd} {}: ok ({} ms)", shown(name), shown(f.get(key::MS)))
                }
                _ => println!(
                    "{cmd} {}: FAILED {}: {}",
                    name.map(protocol::quote)
                        .unwrap_or_else(|| "(request)".into()),
                    shown(f.get(key::ERRNO)),
                    shown_detail(f.get(key::DETAIL))
                ),
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

pub fn status(mountpoint: &Path, ctl_name: &str, json: bool) -> i32 {
    let path = ctl_dir(mountpoint, ctl_name).join("status");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "migsafe ctl: cannot read {}: {e} (is {} a migsafe mount?)",
                path.display(),
                mountpoint.display()
            );
            return EXIT_USAGE;
        }
    };
    if json {
        print!("{text}");
        return EXIT_OK;
    }
    let Ok(doc) = serde_json::from_str::<serde_json::Value>(&text) else {
        eprintln!("migsafe ctl: status is not JSON");
        return EXIT_USAGE;
    };
    println!(
        "migsafe {} on {}",
        doc["version"].as_str().unwrap_or("?"),
        mountpoint.display()
    );
    println!(
        "data paths: io={} passthrough supported={} in use={}",
        doc["data_paths"]["io"].as_str().unwrap_or("?"),
        doc["passthrough_supported"],
        doc["data_paths"]["passthrough_active"]
    );
    if let Some(settings) = doc["settings"].as_object() {
        let s: Vec<String> = settings
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("?")))
            .collect();
        println!("settings: {}", s.join(" "));
    }
    println!(
        "{:<32} {:<8} {:>12} {:>8} {:>6} {:>5} {:<8} last",
        "IMAGE", "STATE", "SIZE", "CACHED", "DIRTY", "OPEN", "ERROR"
    );
    for img in doc["images"].as_array().into_iter().flatten() {
        let last = &img["last_command"];
        let last = if last.is_null() {
            "-".to_string()
        } else {
            format!(
                "{} {} ({} ms)",
                last["command"].as_str().unwrap_or("?"),
                last["result"].as_str().unwrap_or("?"),
                last["ms"]
            )
        };
        println!(
            "{:<32} {:<8} {:>12} {:>8} {:>6} {:>5} {:<8} {}",
            img["path"].as_str().unwrap_or("?"),
            img["state"].as_str().unwrap_or("?"),
            img["size"].to_string(),
            img["cached_pages"].to_string(),
            img["dirty_pages"].to_string(),
            img["open_handles"].as_array().map(|a| a.len()).unwrap_or(0),
            img["sticky_error"].as_str().unwrap_or("-"),
            last
        );
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
            eprintln!("migsafe ctl: cannot open {}: {e}", path.display());
            return EXIT_USAGE;
        }
    };
    match file.write_all(format!("{value}\n").as_bytes()) {
        Ok(_) => {
            println!("{key} = {value}");
            EXIT_OK
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
