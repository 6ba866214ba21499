//! `migsafe ctl`: a thin client over the control files, for scripts that
//! prefer a command with exit codes and readable output to `echo > file`.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::Path;

use crate::settings::Key;

/// Exit status: 0 ok, 1 the command failed, 2 usage or I/O error.
pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILED: i32 = 1;
pub const EXIT_USAGE: i32 = 2;

pub use crate::protocol::COMMANDS;

fn ctl_dir(mountpoint: &Path, ctl_name: &str) -> std::path::PathBuf {
    mountpoint.join(ctl_name)
}

/// Parses one result line (`key=value key="quoted value" ...`) into pairs.
pub fn parse_result_line(line: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq].trim().to_string();
        rest = &rest[eq + 1..];
        let value;
        if let Some(stripped) = rest.strip_prefix('"') {
            // Debug-quoted string: find the closing quote not preceded by '\'.
            let mut end = None;
            let mut escaped = false;
            for (i, c) in stripped.char_indices() {
                match c {
                    '\\' if !escaped => escaped = true,
                    '"' if !escaped => {
                        end = Some(i);
                        break;
                    }
                    _ => escaped = false,
                }
            }
            let end = end.unwrap_or(stripped.len());
            value = stripped[..end].replace("\\\"", "\"").replace("\\\\", "\\");
            rest = stripped.get(end + 1..).unwrap_or("").trim_start();
        } else {
            let end = rest.find(' ').unwrap_or(rest.len());
            value = rest[..end].to_string();
            rest = rest[end..].trim_start();
        }
        out.push((key, value));
    }
    out
}

/// Runs a command on images; prints results; returns the exit status.
pub fn command(mountpoint: &Path, ctl_name: &str, cmd: &str, images: &[String], json: bool) -> i32 {
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
    let _ = file.read_to_string(&mut text);
    let failed = match &write_result {
        Ok(_) => false,
        Err(e) => {
            if text.is_empty() {
                eprintln!("migsafe ctl: {cmd} failed: {e}");
            }
            true
        }
    };
    if json {
        let results: Vec<serde_json::Value> = text
            .lines()
            .map(|l| {
                serde_json::Value::Object(
                    parse_result_line(l)
                        .into_iter()
                        .map(|(k, v)| (k, serde_json::Value::String(v)))
                        .collect(),
                )
            })
            .collect();
        let doc = serde_json::json!({
            "command": cmd,
            "ok": !failed,
            "errno": write_result.as_ref().err().and_then(|e| e.raw_os_error()).map(crate::sys::errno_name),
            "results": results,
        });
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        for line in text.lines() {
            let fields = parse_result_line(line);
            let get = |k: &str| {
                fields
                    .iter()
                    .find(|(key, _)| key == k)
                    .map(|(_, v)| v.as_str())
            };
            match get("result") {
                Some("ok") => println!(
                    "{cmd} {}: ok ({} ms)",
                    get("image").unwrap_or("?"),
                    get("ms").unwrap_or("?")
                ),
                _ => println!(
                    "{cmd} {}: FAILED {}: {}",
                    get("image").unwrap_or("(request)"),
                    get("errno").unwrap_or("?"),
                    get("detail").unwrap_or("")
                ),
            }
        }
    }
    if failed { EXIT_FAILED } else { EXIT_OK }
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
    use super::parse_result_line;

    #[test]
    fn parses_quoted_detail() {
        let f = parse_result_line(r#"image=a b result=error errno=EBUSY detail="x \"y\" z""#);
        assert_eq!(f[0], ("image".into(), "a".into()));
        assert_eq!(f.last().unwrap(), &("detail".into(), "x \"y\" z".into()));
    }
}
