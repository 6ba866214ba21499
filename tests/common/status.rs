//! Reading the control directory's answers: `.ctl/status` JSON and the
//! read-back lines of a command write.

use super::{Mount, read_text};
use std::collections::BTreeMap;

/// `.ctl/status` parsed.
pub fn status(m: &Mount) -> serde_json::Value {
    let text = read_text(&m.ctl("status"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("status is not JSON ({e}): {text}"))
}

/// The entry of `image` in `.ctl/status`; panics if there is none.
pub fn status_image(m: &Mount, image: &str) -> serde_json::Value {
    let v = status(m);
    v["images"]
        .as_array()
        .unwrap_or_else(|| panic!("status has no images array: {v}"))
        .iter()
        .find(|i| i["path"] == image)
        .cloned()
        .unwrap_or_else(|| panic!("status has no image {image}: {v}"))
}

/// Parses one read-back line `k=v k="v with spaces" ...`; panics on a
/// malformed line.
pub fn parse_line(line: &str) -> BTreeMap<String, String> {
    try_parse_line(line).unwrap_or_else(|e| panic!("{e} in read-back line {line:?}"))
}

/// The value of `key=` on the first read-back line of `out` that has it
/// (quotes removed); lines that do not parse are skipped.
pub fn field(out: &str, key: &str) -> Option<String> {
    out.lines()
        .filter_map(|l| try_parse_line(l).ok())
        .find_map(|mut f| f.remove(key))
}

fn try_parse_line(line: &str) -> Result<BTreeMap<String, String>, String> {
    let mut map = BTreeMap::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        let eq = rest.find('=').ok_or("token without '='")?;
        let key = rest[..eq].to_string();
        if key.is_empty() || key.contains(char::is_whitespace) {
            return Err(format!("bad key {key:?}"));
        }
        rest = &rest[eq + 1..];
        let value;
        if let Some(q) = rest.strip_prefix('"') {
            let mut end = None;
            let mut escaped = false;
            for (i, c) in q.char_indices() {
                match c {
                    '\\' if !escaped => escaped = true,
                    '"' if !escaped => {
                        end = Some(i);
                        break;
                    }
                    _ => escaped = false,
                }
            }
            let end = end.ok_or("unterminated quote")?;
            value = q[..end].to_string();
            rest = q[end + 1..].trim_start();
        } else {
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            value = rest[..end].to_string();
            rest = rest[end..].trim_start();
        }
        map.insert(key, value);
    }
    Ok(map)
}

/// Read-back result lines keyed by image.
pub fn results(out: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f = parse_line(l);
            let img = f
                .get("image")
                .unwrap_or_else(|| panic!("no image= in {l:?}"))
                .clone();
            (img, f)
        })
        .collect()
}
