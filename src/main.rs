//! Command line of migsafe: parse, then call the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

use migsafe::client;
use migsafe::fs::{DataPath, IoMode, Writeback};
use migsafe::mount::{self, MountArgs};
use migsafe::settings::Key;

#[derive(Parser)]
#[command(
    name = "migsafe",
    version,
    about = "Safe shared-storage VM live migration with host page cache",
    after_long_help = migsafe::manual::TOP_AFTER_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Clone, Copy, ValueEnum)]
enum OnWarnOff {
    On,
    Warn,
    Off,
}

#[derive(Clone, Copy, ValueEnum)]
enum SyncMode {
    Fsync,
    Fdatasync,
}

#[derive(Clone, Copy, ValueEnum)]
enum DenyAllow {
    Deny,
    Allow,
    Strict,
}

#[derive(clap::Args)]
struct MountCmd {
    /// Directory of images (typically an NFS mount); every access stays beneath it.
    backing: PathBuf,
    /// Where to mount.
    mountpoint: PathBuf,
    /// Show a block device (or file) at the mount root as regular file NAME.
    #[arg(long = "device", value_name = "NAME=PATH")]
    devices: Vec<String>,
    /// Data path for regular files: auto (passthrough where the kernel and
    /// privileges allow, else relay), passthrough, relay (every read and
    /// write through the daemon), or cached (the FUSE page cache, O_DIRECT
    /// on the backing).
    #[arg(long, default_value = IoMode::Auto.name(), value_parser = io_mode_parser())]
    io: IoMode,
    /// Data path for --device entries: cached (the FUSE page cache, O_DIRECT
    /// on the device) or relay (every read and write through the daemon).
    #[arg(long, default_value = DataPath::DEVICE[0].name(), value_parser = device_io_parser())]
    device_io: DataPath,
    /// Buffered writes to --device entries: write-back (on: they land in
    /// this host's page cache and reach the device at the kernel's
    /// write-back, an fsync, or inactivate/flush) or write-through (off:
    /// on the device before the write returns). On needs a mount that
    /// serves devices only: --device entries on the cached path and an
    /// empty backing directory, where no regular file can be created. auto:
    /// on exactly for such a mount.
    #[arg(long, default_value = Writeback::ALL[0].name(), value_parser = writeback_parser())]
    writeback: Writeback,
    /// FUSE event-loop threads (default: number of CPUs, at least 2).
    #[arg(long)]
    threads: Option<usize>,
    /// Name of the control directory at the mount root.
    #[arg(long, default_value = ".ctl")]
    ctl_name: String,
    /// Verify after a drop: start value of the check-cache-dropped setting.
    ///
    /// on: after invalidate, activate or a first open has dropped the
    /// image's cached pages, check that no page read before the drop is
    /// left, and fail with EBUSY if one is. off: drop without checking.
    /// Has no effect while drop-cache is off.
    #[arg(long, value_enum, default_value = "on")]
    check_cache_dropped: OnOff,
    /// Drop cached pages: start value of the drop-cache setting.
    ///
    /// on: invalidate, activate and a first open drop this host's cached
    /// pages of the image (the backing's and the FUSE inode's); inactivate
    /// drops them once written back. off: keep them (no check-cache-dropped
    /// check, no invalidate-on-open drop, the FUSE pages kept at every open).
    #[arg(long, value_enum, default_value = "on")]
    drop_cache: OnOff,
    /// Sync on close: start value of the fsync-on-close setting.
    ///
    /// on: a handle that wrote is synced when it is closed (in the FUSE
    /// FLUSH that close() waits for, so close() gets the error). off: syncs
    /// only on fsync, flush and inactivate.
    #[arg(long, value_enum, default_value = "on")]
    fsync_on_close: OnOff,
    /// Drop on first open: start value of the invalidate-on-open setting.
    ///
    /// on: the first open of an image on this host (no other handle open)
    /// drops what this host cached of it, as invalidate does, before the
    /// open completes; a failed check fails the open with EBUSY. warn: log
    /// how many pages were cached, drop nothing. off: nothing.
    #[arg(long, value_enum, default_value = "on")]
    invalidate_on_open: OnWarnOff,
    /// How the backing is synced: start value of the sync setting.
    ///
    /// fsync: every sync is a full fsync (NFS also commits size and
    /// mtime). fdatasync: a caller's fdatasync stays an fdatasync on the
    /// backing (syncs at close, flush and inactivate stay full fsyncs).
    #[arg(long, value_enum, default_value = "fsync")]
    sync: SyncMode,
    /// Writes to an inactive image: start value of the inactive-writes setting.
    ///
    /// deny: every write that reaches the daemon gets EROFS. strict: also
    /// refuse writable opens (EROFS), for flows where no VMM opens the
    /// image read-write before activation. allow: let writes through
    /// (inactivate then syncs and drops without checking that nothing
    /// dirty is left).
    #[arg(long, value_enum, default_value = "deny")]
    inactive_writes: DenyAllow,
    /// Pass extended attributes through (costs one GETXATTR round trip per write).
    #[arg(long)]
    xattr: bool,
    /// Mount options, comma-separated (allow_other, default_permissions, ro,
    /// fsname=..., and migsafe's own as key=value: io=relay, device=NAME=PATH, ...).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Fork and return once the mount is live.
    #[arg(long)]
    daemon: bool,
    /// Write the daemon's pid here once mounted.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Append the log here, in every start form (default: stderr in the
    /// foreground, syslog once detached).
    #[arg(long)]
    log_file: Option<PathBuf>,
    /// Largest FUSE write request in bytes (131072 to 16777216; a control
    /// request must fit in one write).
    #[arg(long, default_value_t = 1 << 20)]
    max_write: u32,
    /// Where the handover state that must survive the daemon is kept: which
    /// images are inactive (fenced) and which have a sticky sync error. A
    /// remount after a crash or restart restores them before serving. PATH,
    /// or `none` to keep nothing. Default: /run/migsafe-state/MOUNT.json for
    /// root, $XDG_RUNTIME_DIR/migsafe/MOUNT.json otherwise, MOUNT being the
    /// mountpoint escaped as `systemd-escape --path` does. /run is emptied at
    /// boot, when no VM of before runs any more.
    #[arg(long, value_name = "PATH")]
    state_file: Option<PathBuf>,
    /// Serve in the mount process itself, without the keeper that holds
    /// the FUSE connection and restarts a serving process that dies: a
    /// crash of the daemon then ends the mount (its users get ENOTCONN).
    #[arg(long)]
    no_restart: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount BACKING_DIR on MOUNTPOINT and serve it (foreground unless --daemon).
    #[command(after_long_help = migsafe::manual::MOUNT_AFTER_HELP)]
    Mount(Box<MountCmd>),
    /// Drive migration control of a mount: activate|inactivate|invalidate|flush|check IMAGE...,
    /// status, metrics (Prometheus text, for node_exporter's textfile collector), set KEY VALUE.
    #[command(after_long_help = migsafe::manual::CTL_AFTER_HELP)]
    Ctl {
        /// Control directory name used by the mount.
        #[arg(long, default_value = ".ctl")]
        ctl_name: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Mountpoint of a migsafe mount.
        mountpoint: PathBuf,
        /// What to do (the values are listed so that --help and shell
        /// completion know them).
        #[arg(value_parser = migsafe::manual::ctl_commands())]
        command: String,
        /// IMAGE... (paths relative to the mount root, or '*') for the five
        /// image commands, KEY VALUE for set, nothing for status and metrics.
        args: Vec<String>,
    },
    /// Replace the process serving MOUNTPOINT with the migsafe binary now
    /// installed, on the same FUSE connection: open images stay open and
    /// their users see a pause, no error (needs a mount with its keeper,
    /// the default).
    Upgrade {
        /// Control directory name used by the mount.
        #[arg(long, default_value = ".ctl")]
        ctl_name: String,
        /// Mountpoint of a migsafe mount.
        mountpoint: PathBuf,
    },
    /// Page-cache residency of files or block devices (like fincore/vmtouch).
    Residency {
        /// Drop the clean cached pages first (POSIX_FADV_DONTNEED).
        #[arg(long)]
        evict: bool,
        /// Machine-readable output (one JSON document).
        #[arg(long)]
        json: bool,
        /// Files or block devices to report on.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Check this host for what migsafe needs: kernel features, /dev/fuse,
    /// fuse3's helpers, the installed unit and binary, QEMU and libvirt.
    #[command(after_long_help = migsafe::manual::DOCTOR_AFTER_HELP)]
    Doctor {
        /// One JSON document (for configuration management).
        #[arg(long)]
        json: bool,
    },
    /// Write the man pages and shell completions generated from this
    /// command line into DIR (man8/, completions/): used to build the package.
    #[command(hide = true)]
    GenerateAssets {
        /// Directory to write man8/ and completions/ into (created if missing).
        dir: PathBuf,
    },
}

/// `--io`'s words, from their one list (`IoMode::ALL`); clap shows them
/// in help and errors.
fn io_mode_parser() -> impl TypedValueParser<Value = IoMode> {
    PossibleValuesParser::new(IoMode::ALL.map(IoMode::name))
        .try_map(|w| IoMode::from_name(&w).ok_or("not an --io mode"))
}

/// `--device-io`'s words, from their one list (`DataPath::DEVICE`).
fn device_io_parser() -> impl TypedValueParser<Value = DataPath> {
    PossibleValuesParser::new(DataPath::DEVICE.map(DataPath::name))
        .try_map(|w| DataPath::device_from_name(&w).ok_or("not a --device-io data path"))
}

fn writeback_parser() -> impl TypedValueParser<Value = Writeback> {
    PossibleValuesParser::new(Writeback::ALL.map(Writeback::name))
        .try_map(|w| Writeback::from_name(&w).ok_or("not a --writeback word"))
}

fn mount_args(m: MountCmd) -> Result<MountArgs, String> {
    let mut devices = Vec::new();
    for d in &m.devices {
        devices.push(mount::parse_device(d).map_err(|e| e.0)?);
    }
    let word = |on: bool, a: &str, b: &str| if on { a.to_string() } else { b.to_string() };
    let settings = vec![
        (
            Key::CheckCacheDropped,
            word(matches!(m.check_cache_dropped, OnOff::On), "on", "off"),
        ),
        (
            Key::DropCache,
            word(matches!(m.drop_cache, OnOff::On), "on", "off"),
        ),
        (
            Key::FsyncOnClose,
            word(matches!(m.fsync_on_close, OnOff::On), "on", "off"),
        ),
        (
            Key::InvalidateOnOpen,
            match m.invalidate_on_open {
                OnWarnOff::On => "on",
                OnWarnOff::Warn => "warn",
                OnWarnOff::Off => "off",
            }
            .to_string(),
        ),
        (
            Key::Sync,
            word(matches!(m.sync, SyncMode::Fsync), "fsync", "fdatasync"),
        ),
        (
            Key::InactiveWrites,
            match m.inactive_writes {
                DenyAllow::Deny => "deny",
                DenyAllow::Allow => "allow",
                DenyAllow::Strict => "strict",
            }
            .to_string(),
        ),
    ];
    Ok(MountArgs {
        backing: m.backing,
        mountpoint: m.mountpoint,
        devices,
        io: m.io,
        device_io: m.device_io,
        writeback: m.writeback,
        threads: m.threads.unwrap_or_else(mount::default_threads),
        ctl_name: m.ctl_name,
        settings,
        xattr: m.xattr,
        options: m.options,
        daemon: m.daemon,
        pid_file: m.pid_file,
        log_file: m.log_file,
        max_write: m.max_write,
        state_file: m.state_file,
        restart: !m.no_restart,
        resolved_mountpoint: None,
    })
}

fn run_ctl(mountpoint: PathBuf, ctl_name: &str, json: bool, verb: &str, rest: &[String]) -> i32 {
    match verb {
        v if client::COMMANDS.contains(&v) => {
            if rest.is_empty() {
                eprintln!(
                    "migsafe ctl: {v} needs at least one IMAGE (path relative to the mount root, or '*')"
                );
                return client::EXIT_USAGE;
            }
            client::command(&mountpoint, ctl_name, v, rest, json)
        }
        "status" if rest.is_empty() => client::status(&mountpoint, ctl_name, json),
        "metrics" if rest.is_empty() && !json => client::metrics(&mountpoint, ctl_name),
        "status" | "metrics" => {
            eprintln!(
                "migsafe ctl: usage: migsafe ctl MOUNTPOINT status [--json] | metrics \
                 (metrics has one format: the Prometheus text format)"
            );
            client::EXIT_USAGE
        }
        "set" => match rest {
            [key, value] => client::set(&mountpoint, ctl_name, key, value),
            _ => {
                eprintln!("migsafe ctl: usage: migsafe ctl MOUNTPOINT set KEY VALUE");
                client::EXIT_USAGE
            }
        },
        other => {
            eprintln!(
                "migsafe ctl: unknown command {other:?}; expected one of {}, status, metrics, set",
                client::COMMANDS.join(", ")
            );
            client::EXIT_USAGE
        }
    }
}

/// `mount -t fuse.migsafe SRC DIR -o OPTS` runs `migsafe SRC DIR -o OPTS`
/// through fuse3's mount helper: treat that form as `mount --daemon`.
fn mount_helper_args() -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let first = args.get(1).and_then(|a| a.to_str()).unwrap_or("");
    // Every subcommand's name, from the command line's one definition.
    let known = Cli::command()
        .get_subcommands()
        .any(|c| c.get_name() == first)
        || first == "help";
    if args.len() >= 3 && !first.is_empty() && !first.starts_with('-') && !known {
        args.insert(1, "mount".into());
        args.insert(2, "--daemon".into());
    }
    args
}

fn main() -> ExitCode {
    migsafe::logging::init();
    let cli = Cli::parse_from(mount_helper_args());
    let code = match cli.command {
        Cmd::Mount(m) => match mount_args(*m)
            .map_err(mount::StartError)
            .and_then(mount::run)
        {
            Ok(()) => 0,
            Err(e) => {
                mount::report_start_error(&e.0);
                eprintln!("migsafe: {}", e.0);
                1
            }
        },
        Cmd::Ctl {
            ctl_name,
            json,
            mountpoint,
            command,
            args,
        } => run_ctl(mountpoint, &ctl_name, json, &command, &args),
        Cmd::Residency { evict, json, files } => migsafe::residency::run(&files, evict, json),
        Cmd::Doctor { json } => migsafe::doctor::run(json),
        Cmd::Upgrade {
            ctl_name,
            mountpoint,
        } => migsafe::client::upgrade(&mountpoint, &ctl_name),
        Cmd::GenerateAssets { dir } => {
            match migsafe::manual::generate_assets(Cli::command(), &dir) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("migsafe generate-assets: {}: {e}", dir.display());
                    1
                }
            }
        }
    };
    ExitCode::from(code as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every argument of every subcommand carries help text, so `--help`,
    /// the man pages and the completion explain each one.
    #[test]
    fn every_argument_has_help() {
        let cmd = Cli::command();
        let mut missing = Vec::new();
        for sub in std::iter::once(&cmd).chain(cmd.get_subcommands()) {
            if sub.get_about().is_none() && sub.get_name() != cmd.get_name() {
                missing.push(format!("subcommand {}", sub.get_name()));
            }
            for arg in sub.get_arguments() {
                if arg.get_help().is_none() {
                    missing.push(format!("{} {}", sub.get_name(), arg.get_id()));
                }
            }
        }
        assert!(missing.is_empty(), "without help text: {missing:?}");
    }
}
