//! What the client prints and the exit status it ends with.

use std::io::Write;

/// Exit status: 0 ok, 1 the command failed, 2 usage or I/O error.
pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILED: i32 = 1;
pub const EXIT_USAGE: i32 = 2;

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
