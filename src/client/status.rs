//! `migsafe ctl MNT status`: the daemon's JSON document as it is, or a
//! table for a person.

use std::path::Path;

use super::ctl_file::{ctl_dir, explain};
use super::out::{EXIT_OK, EXIT_USAGE, Out};
use crate::protocol;

/// Reads `.ctl/status` as text (the daemon's JSON document).
fn read_status(mountpoint: &Path, ctl_name: &str) -> Result<String, i32> {
    let path = ctl_dir(mountpoint, ctl_name).join("status");
    std::fs::read_to_string(&path).map_err(|e| {
        eprintln!("migsafe ctl: {}", explain(mountpoint, &path, &e));
        EXIT_USAGE
    })
}

/// Reads and parses `.ctl/status`.
pub(super) fn status_doc(mountpoint: &Path, ctl_name: &str) -> Result<serde_json::Value, i32> {
    let text = read_status(mountpoint, ctl_name)?;
    serde_json::from_str(&text).map_err(|e| {
        eprintln!(
            "migsafe ctl: {}/{ctl_name}/status is not JSON ({e})",
            mountpoint.display()
        );
        EXIT_USAGE
    })
}

/// `migsafe ctl MNT status`: the daemon's JSON document as it is with
/// `--json`, else a table for a person.
pub fn status(mountpoint: &Path, ctl_name: &str, json: bool) -> i32 {
    let mut out = Out::new();
    if json {
        let text = match read_status(mountpoint, ctl_name) {
            Ok(t) => t,
            Err(code) => return code,
        };
        out.text(&text);
        return out.finish(EXIT_OK);
    }
    let doc = match status_doc(mountpoint, ctl_name) {
        Ok(d) => d,
        Err(code) => return code,
    };
    print_status(&mut out, mountpoint, &doc);
    out.finish(EXIT_OK)
}

/// The human form of `status`: one header block, then one row per image
/// with sizes in binary units and names quoted like result lines.
fn print_status(out: &mut Out, mountpoint: &Path, doc: &serde_json::Value) {
    let page = crate::sys::page_size() as u64;
    let pages = |v: &serde_json::Value| {
        v.as_u64()
            .map(|p| human_bytes(p * page))
            .unwrap_or_else(|| "?".into())
    };
    out.line(&format!(
        "migsafe {} on {}",
        doc["version"].as_str().unwrap_or("?"),
        mountpoint.display()
    ));
    let source = mount_source(mountpoint);
    match source
        .as_deref()
        .map(|s| s.strip_prefix("migsafe:").unwrap_or(s))
    {
        Some(b) => out.line(&format!("backing: {b}")),
        None => out.line("backing: ? (not found in /proc/self/mountinfo)"),
    }
    let devices = match doc["data_paths"]["writeback"].as_bool() {
        Some(true) => "write-back",
        _ => "write-through",
    };
    out.line(&format!(
        "data paths: io={} passthrough supported={} in use={} devices={} {devices}",
        doc["data_paths"]["io"].as_str().unwrap_or("?"),
        doc["passthrough_supported"],
        doc["data_paths"]["passthrough_active"],
        doc["data_paths"]["devices"].as_str().unwrap_or("?"),
    ));
    if let Some(settings) = doc["settings"].as_object() {
        let s: Vec<String> = settings
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("?")))
            .collect();
        out.line(&format!("settings: {}", s.join(" ")));
    }
    // Where fences and sticky errors survive a restart (absent: none kept).
    out.line(&format!(
        "state file: {}",
        doc["state_file"].as_str().unwrap_or("none")
    ));
    out.line(&format!(
        "{:<32} {:<8} {:<7} {:>10} {:>10} {:>10} {:>4} {:<7} LAST",
        "IMAGE", "STATE", "FENCING", "SIZE", "CACHED", "DIRTY", "OPEN", "ERROR"
    ));
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
        let name = img["path"]
            .as_str()
            .map(|p| protocol::quote(p.as_bytes()))
            .unwrap_or_else(|| "?".into());
        let size = img["size"]
            .as_u64()
            .map(human_bytes)
            .unwrap_or_else(|| "?".into());
        out.line(&format!(
            "{:<32} {:<8} {:<7} {:>10} {:>10} {:>10} {:>4} {:<7} {}",
            name,
            img["state"].as_str().unwrap_or("?"),
            img["fencing"].as_str().unwrap_or("?"),
            size,
            pages(&host_pages(img, "cached_pages")),
            pages(&host_pages(img, "dirty_pages")),
            img["open_handles"].as_array().map(|a| a.len()).unwrap_or(0),
            img["sticky_error"].as_str().unwrap_or("-"),
            last
        ));
    }
}

/// Pages of the image on this host in either cache: the backing's and, for
/// cached images (and relay mappings), the FUSE inode's.
fn host_pages(img: &serde_json::Value, key: &str) -> serde_json::Value {
    match (img[key].as_u64(), img["fuse_cache"][key].as_u64()) {
        (Some(a), Some(b)) => (a + b).into(),
        (a, b) => a.or(b).into(),
    }
}

/// `1536` -> `1.5 KiB`: binary units, one decimal from KiB on.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// The mount's source as `/proc/self/mountinfo` shows it (`migsafe:BACKING`
/// unless `-o fsname=` changed it), for the backing path in `status`.
fn mount_source(mountpoint: &Path) -> Option<String> {
    let want = std::fs::canonicalize(mountpoint).ok()?;
    // The last entry for a path is the one on top.
    crate::mountinfo::mountinfo()
        .into_iter()
        .rev()
        .find(|m| m.mountpoint == want)
        .map(|m| m.source)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(1 << 20), "1.0 MiB");
        assert_eq!(human_bytes(10 << 30), "10.0 GiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
    }
}
