//! `migsafe ctl MNT metrics`: the mount's `status` document in the
//! Prometheus text exposition format.

use std::path::Path;

use super::out::{EXIT_OK, Out};
use super::status::status_doc;
use crate::datapath::DataPath;

/// Escapes a label value of the Prometheus text exposition format.
fn label_value(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// One metric family being written: `# HELP`, `# TYPE`, then its samples,
/// which the exposition format wants together.
struct Family<'a> {
    out: &'a mut String,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &str, kind: &str, help: &str) -> Family<'a> {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Family { out }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        use std::fmt::Write;
        let l: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", label_value(v)))
            .collect();
        let _ = writeln!(self.out, "{name}{{{}}} {value}", l.join(","));
    }

    /// One sample per image, labelled with the mountpoint and its path.
    fn per_image<V: std::fmt::Display>(
        &mut self,
        name: &str,
        mountpoint: &str,
        images: &[&serde_json::Value],
        value: impl Fn(&serde_json::Value) -> V,
    ) {
        for img in images {
            self.sample(
                name,
                &[("mountpoint", mountpoint), ("path", path_of(img))],
                value(img),
            );
        }
    }
}

/// The metrics text for a mount, from its `status` document: everything the
/// daemon already counts, so no daemon of this version needs to change.
///
/// Rendered here rather than with a Prometheus client crate: those
/// (`prometheus-client`) encode only a registry of live metric objects, so a
/// one-shot rendering from a JSON document would build and fill a registry
/// per call, and their OpenMetrics output renames counters (`_total`) and
/// ends in `# EOF`; the text here is checked by Prometheus's own parser
/// (python3-prometheus-client) in tests/ctl_client.rs.
pub(super) fn render_metrics(mountpoint: &str, doc: &serde_json::Value) -> String {
    let mut s = String::new();
    let images: Vec<&serde_json::Value> = doc["images"].as_array().into_iter().flatten().collect();
    mount_families(&mut s, mountpoint, doc, &images);
    counter_families(&mut s, mountpoint, &images);
    gauge_families(&mut s, mountpoint, &images);
    flag_families(&mut s, mountpoint, &images);
    last_command_families(&mut s, mountpoint, &images);
    s
}

const UP_HELP: &str = "1 if the mount's daemon answered the status request.";

fn num(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn path_of(img: &serde_json::Value) -> &str {
    img["path"].as_str().unwrap_or("?")
}

/// The families of the mount as a whole: daemon, data paths, image count.
fn mount_families(
    s: &mut String,
    mountpoint: &str,
    doc: &serde_json::Value,
    images: &[&serde_json::Value],
) {
    let mnt = [("mountpoint", mountpoint)];
    let version = doc["version"].as_str().unwrap_or("unknown");
    Family::new(
        s,
        "migsafe_info",
        "gauge",
        "migsafe daemon serving the mount.",
    )
    .sample("migsafe_info", &[mnt[0], ("version", version)], 1);
    Family::new(s, "migsafe_up", "gauge", UP_HELP).sample("migsafe_up", &mnt, 1);
    Family::new(
        s,
        "migsafe_passthrough_supported",
        "gauge",
        "1 if the kernel offers FUSE passthrough to this mount.",
    )
    .sample(
        "migsafe_passthrough_supported",
        &mnt,
        u8::from(doc["passthrough_supported"].as_bool().unwrap_or(false)),
    );
    let mut f = Family::new(
        s,
        "migsafe_open_handles",
        "gauge",
        "Open handles of images on the mount, by data path and writability.",
    );
    for ((dp, w), n) in &handles_by_path(images) {
        let w = if *w { "true" } else { "false" };
        f.sample(
            "migsafe_open_handles",
            &[mnt[0], ("data_path", dp), ("writable", w)],
            n,
        );
    }
    Family::new(
        s,
        "migsafe_images",
        "gauge",
        "Images this mount has seen and not found deleted (status lists one it cannot reach with an error).",
    )
    .sample("migsafe_images", &mnt, images.len());
}

/// Open handles by data path and writability, over all images of the
/// mount; every known data path is shown, at 0 when none is open.
fn handles_by_path(
    images: &[&serde_json::Value],
) -> std::collections::BTreeMap<(String, bool), u64> {
    let mut by_path: std::collections::BTreeMap<(String, bool), u64> = Default::default();
    for dp in DataPath::ALL {
        for w in [false, true] {
            by_path.insert((dp.name().to_string(), w), 0);
        }
    }
    for img in images {
        for h in img["open_handles"].as_array().into_iter().flatten() {
            let dp = h["data_path"].as_str().unwrap_or("unknown").to_string();
            let w = h["writable"].as_bool().unwrap_or(false);
            *by_path.entry((dp, w)).or_default() += 1;
        }
    }
    by_path
}

/// Counters as the daemon keeps them in `counters` (since the mount
/// started), and its failed control commands by errno.
fn counter_families(s: &mut String, mountpoint: &str, images: &[&serde_json::Value]) {
    // Each help says what increments the counter in the daemon: reads and
    // writes count in the FUSE read/write handlers (passthrough I/O never
    // reaches them; a fenced write is refused before it counts), and an
    // invalidation counts when it starts, whatever its outcome.
    let counters = [
        (
            "activations",
            "Successful activate commands (handovers in).",
        ),
        (
            "inactivations",
            "Successful inactivate commands (handovers out).",
        ),
        (
            "invalidations",
            "Attempts to invalidate this host's page cache of the image (invalidate, activate, invalidate on open), failed ones included.",
        ),
        ("sync_errors", "Failed syncs of the image's backing."),
        (
            "reads",
            "Read requests served by the daemon (relay and cached data paths; passthrough reads bypass it).",
        ),
        (
            "writes",
            "Write requests admitted by the daemon (relay and cached data paths; passthrough writes bypass it, fenced writes are not counted).",
        ),
        (
            "fsyncs",
            "Syncs of the image's backing fds (fsync requests, syncs at close, flush and inactivate), failed ones included.",
        ),
    ];
    for (name, help) in counters {
        let family = format!("migsafe_image_{name}");
        let sample = format!("{family}_total");
        Family::new(s, &family, "counter", help).per_image(&sample, mountpoint, images, |img| {
            num(&img["counters"][name])
        });
    }
    let mut f = Family::new(
        s,
        "migsafe_image_command_failures",
        "counter",
        "Failed control commands on the image, by errno.",
    );
    for img in images {
        if let Some(by_errno) = img["counters"]["failures"].as_object() {
            for (errno, n) in by_errno {
                f.sample(
                    "migsafe_image_command_failures_total",
                    &[
                        ("mountpoint", mountpoint),
                        ("path", path_of(img)),
                        ("errno", errno),
                    ],
                    num(n),
                );
            }
        }
    }
}

/// The per-image gauges read straight from the status document.
fn gauge_families(s: &mut String, mountpoint: &str, images: &[&serde_json::Value]) {
    type Get = fn(&serde_json::Value) -> u64;
    let gauges: [(&str, &str, Get); 9] = [
        ("size_bytes", "Size of the image.", |i| num(&i["size"])),
        (
            "cached_pages",
            "Pages of the image resident in this host's page cache.",
            |i| num(&i["cached_pages"]),
        ),
        (
            "dirty_pages",
            "Dirty pages of the image on this host.",
            |i| num(&i["dirty_pages"]),
        ),
        (
            "writeback_pages",
            "Pages of the image under writeback on this host.",
            |i| num(&i["writeback_pages"]),
        ),
        (
            "fuse_cached_pages",
            "Pages of the image in its FUSE inode's page cache on this host (cached data path, relay mappings).",
            |i| num(&i["fuse_cache"]["cached_pages"]),
        ),
        (
            "fuse_dirty_pages",
            "Dirty pages of the image in its FUSE inode's page cache on this host.",
            |i| num(&i["fuse_cache"]["dirty_pages"]),
        ),
        (
            "fuse_writeback_pages",
            "Pages of the image's FUSE inode under writeback on this host.",
            |i| num(&i["fuse_cache"]["writeback_pages"]),
        ),
        (
            "open_handles",
            "Open handles of the image on this mount.",
            |i| i["open_handles"].as_array().map_or(0, |a| a.len() as u64),
        ),
        (
            "active",
            "1 if the image is active on this host, 0 if inactive.",
            |i| u64::from(i["state"] == "active"),
        ),
    ];
    for (name, help, get) in gauges {
        let family = format!("migsafe_image_{name}");
        Family::new(s, &family, "gauge", help).per_image(&family, mountpoint, images, get);
    }
}

/// The per-image conditions an operator alerts on: partial fencing and a
/// kept sync error.
fn flag_families(s: &mut String, mountpoint: &str, images: &[&serde_json::Value]) {
    let mut f = Family::new(
        s,
        "migsafe_image_fencing_partial",
        "gauge",
        "1 while a writer the daemon cannot fence is open: a writable passthrough handle, or a process writing the backing outside this mount (status lists them under unfenced).",
    );
    f.per_image("migsafe_image_fencing_partial", mountpoint, images, |img| {
        u8::from(img["fencing"] == "partial")
    });
    let mut f = Family::new(
        s,
        "migsafe_image_sticky_error",
        "gauge",
        "1 while a failed sync's errno is kept until a successful activate.",
    );
    for img in images {
        let labels = [("mountpoint", mountpoint), ("path", path_of(img))];
        match img["sticky_error"].as_str() {
            Some(e) => f.sample(
                "migsafe_image_sticky_error",
                &[labels[0], labels[1], ("errno", e)],
                1,
            ),
            None => f.sample("migsafe_image_sticky_error", &labels, 0),
        }
    }
}

/// The daemon keeps only the last command per image: its duration, time,
/// and result (ok or the errno), with the command as a label.
fn last_command_families(s: &mut String, mountpoint: &str, images: &[&serde_json::Value]) {
    let last: Vec<(&str, &serde_json::Value)> = images
        .iter()
        .filter(|i| !i["last_command"].is_null())
        .map(|i| (path_of(i), &i["last_command"]))
        .collect();
    type Value = fn(&serde_json::Value) -> String;
    let families: [(&str, &str, Value); 2] = [
        (
            "migsafe_image_last_command_seconds",
            "Duration of the last control command on the image (result: ok or its errno).",
            |l| (num(&l["ms"]) as f64 / 1000.0).to_string(),
        ),
        (
            "migsafe_image_last_command_timestamp_seconds",
            "When the last control command on the image ran (Unix time).",
            |l| num(&l["at"]).to_string(),
        ),
    ];
    for (name, help, value) in families {
        let mut f = Family::new(s, name, "gauge", help);
        for (path, l) in &last {
            f.sample(
                name,
                &[
                    ("mountpoint", mountpoint),
                    ("path", path),
                    ("command", l["command"].as_str().unwrap_or("?")),
                    ("result", l["result"].as_str().unwrap_or("?")),
                ],
                value(l),
            );
        }
    }
}

/// `migsafe ctl MNT metrics`: the Prometheus text exposition format, for
/// node_exporter's textfile collector (`migsafe ctl MNT metrics >
/// DIR/migsafe.prom.$$ && mv DIR/migsafe.prom.$$ DIR/migsafe.prom`). When
/// the daemon does not answer, `migsafe_up 0` is still printed (so a
/// scrape shows the mount is down) and the exit status is 2.
pub fn metrics(mountpoint: &Path, ctl_name: &str) -> i32 {
    let mnt = std::fs::canonicalize(mountpoint)
        .unwrap_or_else(|_| mountpoint.to_path_buf())
        .to_string_lossy()
        .into_owned();
    let mut out = Out::new();
    match status_doc(mountpoint, ctl_name) {
        Ok(doc) => {
            out.text(&render_metrics(&mnt, &doc));
            out.finish(EXIT_OK)
        }
        Err(code) => {
            let mut s = String::new();
            Family::new(&mut s, "migsafe_up", "gauge", UP_HELP).sample(
                "migsafe_up",
                &[("mountpoint", &mnt)],
                0,
            );
            out.text(&s);
            out.finish(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        let doc =
            serde_json::json!({"images": [{"path": "x\"y\nz", "counters": {"activations": 3}}]});
        let text = render_metrics("/m", &doc);
        assert!(
            text.contains(
                "migsafe_image_activations_total{mountpoint=\"/m\",path=\"x\\\"y\\nz\"} 3\n"
            ),
            "{text}"
        );
    }
}
