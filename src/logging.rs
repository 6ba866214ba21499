//! Where migsafe's log goes. A foreground daemon logs to stderr (under
//! systemd that is the journal); `--log-file` sends it to that file in every
//! start form; a detached daemon (`--daemon`, the fstab/mount-helper form)
//! without `--log-file` logs to syslog, because its stderr is /dev/null and
//! a sync failure must never vanish unseen.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// The syslog socket; `MIGSAFE_SYSLOG_SOCKET` overrides it (a chroot, or a
/// test that listens itself).
pub fn syslog_socket() -> PathBuf {
    std::env::var_os("MIGSAFE_SYSLOG_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/log"))
}

enum Sink {
    Stderr,
    /// `tee`: also to stderr, while a `--daemon` parent still shows it.
    File {
        file: File,
        tee: bool,
    },
    Syslog(PathBuf),
}

static SINK: Mutex<Sink> = Mutex::new(Sink::Stderr);
/// Records are formatted for syslog (`<PRI>migsafe[PID]: ...`, one datagram
/// each) rather than as text lines.
static SYSLOG_FORMAT: AtomicBool = AtomicBool::new(false);

/// Installs the logger (RUST_LOG filters; default `info`).
pub fn init() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(|buf, record| {
            if SYSLOG_FORMAT.load(Ordering::Relaxed) {
                // RFC 3164 on the local socket, facility daemon (3); syslogd or
                // journald stamps the time.
                let severity = match record.level() {
                    log::Level::Error => 3,
                    log::Level::Warn => 4,
                    log::Level::Info => 6,
                    log::Level::Debug | log::Level::Trace => 7,
                };
                write!(
                    buf,
                    "<{}>migsafe[{}]: {} {}: {}",
                    3 * 8 + severity,
                    std::process::id(),
                    record.level(),
                    record.target(),
                    record.args()
                )
            } else {
                writeln!(
                    buf,
                    "[{} {:<5} {}] {}",
                    buf.timestamp_millis(),
                    record.level(),
                    record.target(),
                    record.args()
                )
            }
        })
        .target(env_logger::Target::Pipe(Box::new(SinkWriter)))
        .init();
}

/// Sends every further record to `path` (appended), and also to stderr
/// while `tee` holds (until [`stop_tee`]).
pub fn to_file(path: &Path, tee: bool) -> io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    *SINK.lock().unwrap_or_else(|e| e.into_inner()) = Sink::File { file, tee };
    Ok(())
}

/// Stops copying file records to stderr (the daemon has detached from it).
pub fn stop_tee() {
    if let Sink::File { tee, .. } = &mut *SINK.lock().unwrap_or_else(|e| e.into_inner()) {
        *tee = false;
    }
}

/// Sends every further record to syslog, if its socket takes datagrams.
pub fn to_syslog() -> io::Result<PathBuf> {
    let path = syslog_socket();
    UnixDatagram::unbound()?.connect(&path)?;
    *SINK.lock().unwrap_or_else(|e| e.into_inner()) = Sink::Syslog(path.clone());
    SYSLOG_FORMAT.store(true, Ordering::Relaxed);
    Ok(path)
}

/// env_logger's target: hands each formatted record (one `write_all`) to the
/// current sink.
struct SinkWriter;

impl Write for SinkWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut *SINK.lock().unwrap_or_else(|e| e.into_inner()) {
            Sink::Stderr => io::stderr().write_all(buf)?,
            Sink::File { file, tee } => {
                if *tee {
                    let _ = io::stderr().write_all(buf);
                }
                file.write_all(buf)?
            }
            Sink::Syslog(path) => {
                // Unconnected, so a restarted syslogd is reached again.
                UnixDatagram::unbound()?.send_to(buf, &*path)?;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
