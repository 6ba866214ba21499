//! Parsing of what a script writes to a command file: image paths, one per
//! line, confined to the mount. Everything malformed is EINVAL before any
//! command runs, so a typo never half-runs a migration step.

/// Writes larger than this are refused: no list of images is that long, and
/// the daemon must never buffer unbounded input.
pub const MAX_REQUEST: usize = 64 * 1024;

/// One target of a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `*`: every image this mount has open or has seen.
    All,
    /// A path relative to the mount root, normalized (no `.` components).
    Path(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest {
    pub errno: i32,
    pub message: String,
}

fn bad(message: impl Into<String>) -> BadRequest {
    BadRequest {
        errno: libc::EINVAL,
        message: message.into(),
    }
}

/// Splits and validates a request: lines ending in a newline (`echo` adds
/// one). A request whose last line lacks its newline is refused: the kernel
/// splits a `writev` of many segments into several FUSE writes, and a piece
/// of a request must never be taken for a whole one (`sub/c` out of
/// `sub/c.img`). Empty lines are errors.
pub fn parse(data: &[u8], ctl_name: &str) -> Result<Vec<Target>, BadRequest> {
    if data.len() > MAX_REQUEST {
        return Err(bad(format!(
            "request of {} bytes is over the {MAX_REQUEST}-byte limit",
            data.len()
        )));
    }
    if data.contains(&0) {
        return Err(bad("request contains a NUL byte"));
    }
    let text = std::str::from_utf8(data).map_err(|_| bad("request is not UTF-8"))?;
    if text.is_empty() || text == "\n" {
        return Err(bad(
            "empty request: write image paths relative to the mount root, one per line",
        ));
    }
    let Some(text) = text.strip_suffix('\n') else {
        return Err(bad(
            "request does not end with a newline, so it may be a piece of a larger write; \
             end every request with a newline (echo IMAGE > .ctl/COMMAND, printf '%s\\n' IMAGE)",
        ));
    };
    text.split('\n')
        .map(|line| parse_line(line, ctl_name))
        .collect()
}

fn parse_line(line: &str, ctl_name: &str) -> Result<Target, BadRequest> {
    if line.is_empty() {
        return Err(bad("empty line in request"));
    }
    if line == "*" {
        return Ok(Target::All);
    }
    if line.starts_with('/') {
        return Err(bad(format!(
            "{line:?}: absolute path; give the path relative to the mount root"
        )));
    }
    let mut parts = Vec::new();
    for comp in line.split('/') {
        match comp {
            "" | "." => continue,
            ".." => {
                return Err(bad(format!(
                    "{line:?}: '..' is not allowed; paths stay inside the mount"
                )));
            }
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        return Err(bad(format!("{line:?}: names the mount root, not an image")));
    }
    if parts[0] == ctl_name {
        return Err(bad(format!(
            "{line:?}: the control directory is not an image"
        )));
    }
    Ok(Target::Path(parts.join("/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errno_of(data: &[u8]) -> i32 {
        parse(data, ".ctl").unwrap_err().errno
    }

    #[test]
    fn accepts_lines_with_one_trailing_newline() {
        let t = parse(b"a.img\ndir/./b.qcow2\n", ".ctl").unwrap();
        assert_eq!(
            t,
            vec![
                Target::Path("a.img".into()),
                Target::Path("dir/b.qcow2".into())
            ]
        );
        assert_eq!(parse(b"*\n", ".ctl").unwrap(), vec![Target::All]);
    }

    #[test]
    fn refuses_a_request_without_its_final_newline() {
        for piece in [&b"*"[..], b"a.img", b"a.img\nsub/c"] {
            let err = parse(piece, ".ctl").unwrap_err();
            assert_eq!(err.errno, libc::EINVAL, "{piece:?}");
            assert!(err.message.contains("newline"), "{}", err.message);
        }
    }

    #[test]
    fn rejects_everything_malformed_with_einval() {
        for bad in [
            &b""[..],
            b"\n",
            b"a\n\nb",
            b"/etc/passwd",
            b"../x",
            b"a/../../x",
            b"a\0b",
            b".ctl/status",
            b"./.ctl",
            b".",
        ] {
            assert_eq!(errno_of(bad), libc::EINVAL, "{bad:?}");
        }
        assert_eq!(errno_of(&vec![b'a'; MAX_REQUEST + 1]), libc::EINVAL);
    }
}
