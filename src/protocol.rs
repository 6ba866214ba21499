//! The control protocol's vocabulary, shared by the daemon (which writes
//! result lines) and `migsafe ctl` (which reads them), so the two can never
//! drift apart: the command names and the result-line format.
//!
//! A result line is `key=value` fields separated by single spaces and ended
//! by `\n`, for example
//!
//! ```text
//! image=disk.img result=ok resident_pages=0 ms=3
//! image="my disk.img" result=error errno=EBUSY resident_pages=2 ms=1 detail="2 pages still resident"
//! ```
//!
//! A value made only of safe characters (ASCII letters, digits and
//! `._/+-:@,`) is written bare, so ordinary image names look the same as
//! they always did and scripts may grep for `image=disk.img result=ok`.
//! Any other value (empty, or with a space, `=`, a quote, a control byte,
//! non-ASCII text, bytes that are not UTF-8) is written in double quotes
//! with backslash escapes: `\"`, `\\`, `\n`, `\t`, and `\xHH` for every
//! other control byte (C0, DEL, and the C1 and Unicode line/paragraph
//! separators that some line splitters honour) and for every byte that is
//! not part of valid UTF-8. File names may contain any byte but NUL and
//! `/`; with this rule none of them can end a line early or fake a field,
//! so one line is always one result (a file named
//! `zz\nimage=vm1.img result=ok` stays one line, `image="zz\nimage=..."`).
//! The text is always valid UTF-8.

use std::fmt;

/// Command file names, which are also the command names in logs and results.
pub const ACTIVATE: &str = "activate";
pub const INACTIVATE: &str = "inactivate";
pub const INVALIDATE: &str = "invalidate";
pub const FLUSH: &str = "flush";
pub const CHECK: &str = "check";

/// Every command, in the order the control directory lists them.
pub const COMMANDS: [&str; 5] = [ACTIVATE, INACTIVATE, INVALIDATE, FLUSH, CHECK];

/// Keys of a result line, in the order the daemon writes them.
pub mod key {
    /// The image's path relative to the mount root (absent on a line that
    /// rejects the whole request).
    pub const IMAGE: &str = "image";
    /// Present (`yes`) when the daemon's name of the image is not exact:
    /// the file name held bytes that are not UTF-8 and the daemon stores
    /// it with U+FFFD in their place, so two such names may look alike.
    pub const IMAGE_LOSSY: &str = "image_lossy";
    /// `ok` or `error`.
    pub const RESULT: &str = "result";
    /// Symbolic errno (`EBUSY`), on errors only.
    pub const ERRNO: &str = "errno";
    pub const RESIDENT_PAGES: &str = "resident_pages";
    /// Duration of the command on this image, in milliseconds.
    pub const MS: &str = "ms";
    /// `partial` on an ok result when writers exist that the daemon cannot
    /// fence (its own writable passthrough handles, processes writing the
    /// backing outside this mount); `detail` names them.
    pub const FENCING: &str = "fencing";
    /// Human-readable explanation, on errors (and with `fencing=partial`).
    pub const DETAIL: &str = "detail";
}

pub const RESULT_OK: &str = "ok";
pub const RESULT_ERROR: &str = "error";
pub const FENCING_PARTIAL: &str = "partial";

/// True for the bytes a value may hold unquoted.
fn is_safe_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"._/+-:@,".contains(&b)
}

/// True if `v` is written bare (non-empty and only safe bytes).
pub fn is_bare(v: &[u8]) -> bool {
    !v.is_empty() && v.iter().all(|&b| is_safe_byte(b))
}

/// Characters written as `\xHH` escapes of their UTF-8 bytes although they
/// are valid UTF-8: controls (C0, DEL, C1 — U+0085 is a line break to some
/// splitters) and the Unicode line and paragraph separators.
fn escape_char(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

/// Appends `v` to `out` as a value: bare if safe, else quoted and escaped.
pub fn push_value(out: &mut String, v: &[u8]) {
    use std::fmt::Write;
    if is_bare(v) {
        // Safe bytes are ASCII.
        out.extend(v.iter().map(|&b| b as char));
        return;
    }
    out.push('"');
    for chunk in v.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                c if escape_char(c) => {
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        let _ = write!(out, "\\x{b:02x}");
                    }
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out.push('"');
}

/// `v` as a value (bare or quoted).
pub fn quote(v: &[u8]) -> String {
    let mut s = String::new();
    push_value(&mut s, v);
    s
}

/// Formats one result line from its fields, with the ending `\n`.
/// Keys are the constants of [`key`]; values are any bytes.
pub fn format_line(fields: &[(&str, &[u8])]) -> String {
    let mut s = String::new();
    for (i, (k, v)) in fields.iter().enumerate() {
        debug_assert!(is_key(k), "bad key {k:?}");
        if i > 0 {
            s.push(' ');
        }
        s.push_str(k);
        s.push('=');
        push_value(&mut s, v);
    }
    s.push('\n');
    s
}

fn is_key(k: &str) -> bool {
    !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Why a line is not a well-formed result line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// Byte offset in the line where parsing stopped.
    pub at: usize,
    pub message: &'static str,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.message, self.at)
    }
}

impl std::error::Error for ParseError {}

/// The fields of one parsed result line, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fields(pub Vec<(String, Vec<u8>)>);

impl Fields {
    /// The raw bytes of the first field named `key`.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
    }

    /// The value of `key` if it is UTF-8 text.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| std::str::from_utf8(v).ok())
    }
}

/// Parses one result line (without its `\n`; a trailing `\r` is an error).
/// Strict: anything the daemon would not have written is an error, so a
/// client never takes a garbled or foreign line for a result.
pub fn parse_line(line: &str) -> Result<Fields, ParseError> {
    let b = line.as_bytes();
    let err = |at, message| Err(ParseError { at, message });
    let mut fields = Vec::new();
    let mut i = 0;
    if b.is_empty() {
        return err(0, "empty line");
    }
    loop {
        let start = i;
        while i < b.len() && b[i] != b'=' && b[i] != b' ' {
            i += 1;
        }
        let k = &line[start..i];
        if !is_key(k) {
            return err(start, "expected a key of a-z, 0-9 and _");
        }
        if i >= b.len() || b[i] != b'=' {
            return err(i, "expected '=' after the key");
        }
        i += 1;
        let v = if i < b.len() && b[i] == b'"' {
            let (v, next) = parse_quoted(line, i + 1)?;
            i = next;
            v
        } else {
            let vs = i;
            while i < b.len() && b[i] != b' ' {
                if !is_safe_byte(b[i]) {
                    return err(i, "unquoted value with a character that needs quotes");
                }
                i += 1;
            }
            if i == vs {
                return err(i, "empty unquoted value");
            }
            b[vs..i].to_vec()
        };
        fields.push((k.to_string(), v));
        if i == b.len() {
            return Ok(Fields(fields));
        }
        if b[i] != b' ' {
            return err(i, "expected a space between fields");
        }
        i += 1;
        if i == b.len() {
            return err(i, "trailing space");
        }
    }
}

/// The value of a quoted field whose opening quote ends before `i`: the
/// unescaped bytes and the index just past the closing quote.
fn parse_quoted(line: &str, mut i: usize) -> Result<(Vec<u8>, usize), ParseError> {
    let b = line.as_bytes();
    let err = |at, message| Err(ParseError { at, message });
    let mut v = Vec::new();
    loop {
        let Some(&c) = b.get(i) else {
            return err(i, "unterminated quoted value");
        };
        match c {
            b'"' => return Ok((v, i + 1)),
            b'\\' => {
                match b.get(i + 1) {
                    Some(b'"') => v.push(b'"'),
                    Some(b'\\') => v.push(b'\\'),
                    Some(b'n') => v.push(b'\n'),
                    Some(b't') => v.push(b'\t'),
                    Some(b'x') => {
                        let hex = line
                            .get(i + 2..i + 4)
                            .filter(|h| h.bytes().all(|d| d.is_ascii_hexdigit()));
                        let Some(hex) = hex else {
                            return err(i, "\\x needs two hex digits");
                        };
                        v.push(u8::from_str_radix(hex, 16).expect("hex digits"));
                        i += 2;
                    }
                    _ => return err(i, "unknown escape"),
                }
                i += 2;
            }
            c if c < 0x20 || c == 0x7f => {
                return err(i, "raw control byte in a quoted value");
            }
            c => {
                v.push(c);
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(name: &[u8]) -> String {
        let detail = b"x \"y\" z\n\\".as_slice();
        let line = format_line(&[
            (key::IMAGE, name),
            (key::RESULT, b"error"),
            (key::DETAIL, detail),
        ]);
        assert!(line.ends_with('\n'), "{line:?}");
        let body = &line[..line.len() - 1];
        assert!(!body.contains('\n'), "one line only: {line:?}");
        assert!(!body.contains('\r'), "no CR: {line:?}");
        let f = parse_line(body).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert_eq!(f.0.len(), 3, "{line:?}");
        assert_eq!(f.get(key::IMAGE), Some(name), "{line:?}");
        assert_eq!(f.get_str(key::RESULT), Some("error"));
        assert_eq!(f.get(key::DETAIL), Some(detail));
        body.to_string()
    }

    #[test]
    fn ordinary_names_stay_bare() {
        let line = format_line(&[
            (key::IMAGE, b"dir/disk-1_a.qcow2"),
            (key::RESULT, b"ok"),
            (key::RESIDENT_PAGES, b"0"),
            (key::MS, b"3"),
        ]);
        assert_eq!(
            line,
            "image=dir/disk-1_a.qcow2 result=ok resident_pages=0 ms=3\n"
        );
        for safe in ["a.img", "A+b:c@d,e", "x/y/z-1.raw"] {
            assert_eq!(quote(safe.as_bytes()), safe);
        }
    }

    #[test]
    fn hostile_names_round_trip() {
        let hostile: &[&[u8]] = &[
            b"zz\nimage=vm1.img result=ok resident_pages=0 ms=0",
            b"my disk.img",
            b"a\"b",
            b"\"",
            b"a=b",
            b"back\\slash",
            b"\\x41",
            b"\\",
            b"tab\there",
            b"cr\rhere",
            b"\x01\x1f\x7f",
            b"caf\xc3\xa9",
            b"\xff\xfe",
            b"ok\xc3",
            b"nel\xc2\x85sep\xe2\x80\xa8",
            b"",
            b" ",
            b"a b  c ",
            b"\xef\xbf\xbd",
        ];
        for name in hostile {
            let body = round_trip(name);
            assert!(body.starts_with("image=\""), "quoted: {body:?}");
        }
        // Non-UTF-8 bytes and a real U+FFFD stay apart.
        assert_ne!(quote(b"\xff"), quote("\u{fffd}".as_bytes()));
        assert_eq!(quote(b"\xff"), r#""\xff""#);
        assert_eq!(quote(b"a\nb"), r#""a\nb""#);
        assert_eq!(quote(b"\x85"), r#""\x85""#);
        assert_eq!(quote("\u{85}".as_bytes()), r#""\xc2\x85""#);
    }

    #[test]
    fn injection_stays_one_field() {
        let line = format_line(&[
            (key::IMAGE, b"zz\nimage=vm1.img result=ok"),
            (key::RESULT, b"error"),
        ]);
        assert_eq!(line.lines().count(), 1, "{line:?}");
        let f = parse_line(line.trim_end_matches('\n')).unwrap();
        assert_eq!(f.get_str(key::RESULT), Some("error"));
        assert_eq!(f.0.iter().filter(|(k, _)| k == key::IMAGE).count(), 1);
    }

    #[test]
    fn rejects_what_the_daemon_never_writes() {
        for bad in [
            "",
            "image",
            "image=",
            "=x",
            "image=a b",
            "image=my disk.img result=ok",
            "image=\"x",
            "image=\"x\\q\"",
            "image=\"x\\x4\"",
            "image=\"x\"y",
            "image=a  result=ok",
            "image=a ",
            "Image=a",
            "image=a\tresult=ok",
            "image=\"a\tb\"",
            "image=a\r",
            "detail=\"x\" image=é",
        ] {
            assert!(parse_line(bad).is_err(), "{bad:?} must not parse");
        }
    }
}
