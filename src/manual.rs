//! The manual: text that `--help` shows after the options, and the man
//! pages and shell completions generated from the same clap definition (by
//! `clap_mangen` and `clap_complete`), so the three never drift apart. The
//! package build runs the hidden `migsafe generate-assets DIR`.
//!
//! The `*_AFTER_HELP` texts are laid out for both readers: a line at column 0
//! that ends in ':' is a heading (a `.SH` section in the man page), the rest
//! is shown as written (no-fill), so no line is longer than 72 columns.

use std::io::Write;
use std::path::Path;

use clap::builder::{PossibleValue, PossibleValuesParser};
use clap_mangen::roff::{Roff, roman};

/// The `ctl` commands, with the help that `--help`, the man page and shell
/// completion show for each.
pub fn ctl_commands() -> PossibleValuesParser {
    PossibleValuesParser::new([
        PossibleValue::new("activate")
            .help("destination: drop the image's cached pages, verify, allow writes"),
        PossibleValue::new("inactivate")
            .help("source: write back, sync, drop cached pages, refuse writes"),
        PossibleValue::new("invalidate").help("drop the image's cached pages and verify"),
        PossibleValue::new("flush").help("write back dirty pages and fsync; fences nothing"),
        PossibleValue::new("check").help("report resident pages and who holds them"),
        PossibleValue::new("status").help("state of the mount and its images"),
        PossibleValue::new("metrics").help("status as Prometheus text"),
        PossibleValue::new("set").help("change a control setting: KEY VALUE"),
    ])
}

pub const TOP_AFTER_HELP: &str = "\
Exit status:
  0  success
  1  the command failed (a mount that could not start, a control command
     that did not return ok, a host check with a failing line)
  2  usage error, or an I/O error reaching the control files

Files:
  /lib/systemd/system/migsafe@.service
         template unit; the instance is the escaped mountpoint
  /etc/migsafe/INSTANCE.conf
         MIGSAFE_BACKING= and MIGSAFE_OPTS= of one instance
  /usr/share/doc/migsafe/examples/
         libvirt hook, migration scripts, fstab example

Examples:
  migsafe mount -o allow_other /srv/nfs/images /run/migsafe
  mount -t fuse.migsafe -o allow_other,io=relay /srv/nfs/images /mnt
  systemctl enable --now migsafe@run-migsafe.service
  migsafe ctl /run/migsafe inactivate vm1.qcow2
  migsafe ctl /run/migsafe activate vm1.qcow2
  migsafe doctor

See also:
  mount(8), fstab(5), systemd.unit(5), qemu(1), virsh(1)
";

pub const MOUNT_AFTER_HELP: &str = "\
Mount options:
  -o takes comma-separated options, and so do fstab entries of type
  fuse.migsafe, which mount(8) hands to `migsafe SRC DIR -o OPTS`
  (that form detaches like --daemon and logs to syslog).
  FUSE options: allow_other, allow_root, default_permissions, ro, rw,
    auto_unmount, fsname=NAME, [no]dev, [no]suid, [no]exec, [no]atime,
    sync, async, dirsync
  migsafe's own, as key=value: io=auto|passthrough|relay|cached,
    device=NAME=PATH, device-io=cached|relay, threads=N, ctl-name=NAME,
    xattr, log=PATH, pid-file=PATH, state-file=PATH|none, and every
    control setting:
    check-cache-dropped=on|off, drop-cache=on|off,
    fsync-on-close=on|off, invalidate-on-open=on|warn|off,
    sync=fsync|fdatasync, inactive-writes=deny|allow|strict
  Ignored fstab words: defaults, nofail, _netdev, auto, noauto, user,
    users, x-*, comment=...

Examples:
  migsafe mount /srv/nfs/images /run/migsafe
  migsafe mount --daemon -o allow_other --device lun0=/dev/sdb \\
    /var/lib/migsafe/empty /run/migsafe-san
  /etc/fstab:
    /srv/nfs/images /run/migsafe fuse.migsafe allow_other,_netdev 0 0
";

pub const CTL_AFTER_HELP: &str = "\
Control files:
  MOUNTPOINT/.ctl/ (--ctl-name) holds one file per command and setting.
  activate inactivate invalidate flush check
         write image paths (one per line, '*' = every image); the write
         returns when the command is done and fails with its errno; a
         read of the same open file returns one result line per image
  check-cache-dropped drop-cache fsync-on-close   on|off
  invalidate-on-open                              on|warn|off
  sync                                            fsync|fdatasync
  inactive-writes                                 deny|allow|strict
  status  JSON: data paths, settings, per-image state and pages

Result lines:
  image=disk.qcow2 result=ok resident_pages=0 ms=2
  image=disk.qcow2 result=error errno=EBUSY resident_pages=12 ms=3
    detail=\"12 pages still resident ...; holders 4711(qemu:mmap)\"
  Values other than [A-Za-z0-9._/+-:@,] are double-quoted with \\\" \\\\
  \\n \\t \\xHH escapes.

Exit status:
  0  every image's result is ok (status, metrics, set: done)
  1  a command failed for some image
  2  usage error, I/O error, or a result line that could not be read

Examples:
  migsafe ctl /run/migsafe flush vm1.qcow2         # source
  migsafe ctl /run/migsafe inactivate vm1.qcow2    # source
  migsafe ctl /run/migsafe activate vm1.qcow2      # destination
  migsafe ctl --json /run/migsafe status
  migsafe ctl /run/migsafe set inactive-writes strict
";

pub const DOCTOR_AFTER_HELP: &str = "\
Checks:
  kernel     version; cachestat(2) (6.5), FUSE passthrough (6.9),
             FUSE over io_uring (fuse module's enable_uring)
  /dev/fuse  present and openable read-write by the caller
  fuse3      fusermount3 and mount.fuse3 (mount -t fuse.migsafe, fstab)
  binary     `migsafe` found by mount(8)'s helper (sh without PATH)
  unit       migsafe@.service installed, its ExecStart binary present
  qemu       version; drop-cache (default on) for incoming migration
  libvirt    version; what `virsh migrate --live` needs on this host
  Each line says ok, warn or fail, and what to do when it is not ok.

Exit status:
  0  no line failed: this host can serve images safely
  1  a line failed (e.g. no usable /dev/fuse, no fuse3 helpers)
";

/// Writes `man8/migsafe.8`, one `man8/migsafe-SUB.8` per visible
/// subcommand, and `completions/migsafe` (bash) under `dir`.
pub fn generate_assets(cmd: clap::Command, dir: &Path) -> std::io::Result<()> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let man = dir.join("man8");
    std::fs::create_dir_all(&man)?;
    let mut pages = vec![cmd.clone()];
    pages.extend(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    for page in &pages {
        let m = clap_mangen::Man::new(page.clone())
            .section("8")
            .manual("System Administration")
            .source(format!("migsafe {}", env!("CARGO_PKG_VERSION")));
        let mut out = Vec::new();
        render_page(&m, page, &mut out)?;
        std::fs::write(man.join(m.get_filename()), out)?;
    }
    let comp = dir.join("completions");
    std::fs::create_dir_all(&comp)?;
    let mut out = Vec::new();
    write_bash_completion(cmd, &mut out);
    std::fs::write(comp.join("migsafe"), out)
}

/// The bash completion script of `cmd`, without its hidden subcommands
/// (clap_complete would offer them).
pub fn write_bash_completion(cmd: clap::Command, out: &mut dyn Write) {
    let mut visible = clap::Command::new("migsafe")
        .version(env!("CARGO_PKG_VERSION"))
        .subcommands(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    clap_complete::generate(clap_complete::Shell::Bash, &mut visible, "migsafe", out);
}

/// clap_mangen's sections, with the after-help text as sections of their
/// own (its default is one section called EXTRA).
fn render_page(
    m: &clap_mangen::Man,
    cmd: &clap::Command,
    w: &mut dyn Write,
) -> std::io::Result<()> {
    m.render_title(w)?;
    m.render_name_section(w)?;
    m.render_synopsis_section(w)?;
    m.render_description_section(w)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        m.render_options_section(w)?;
    }
    if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        m.render_subcommands_section(w)?;
    }
    if let Some(text) = cmd.get_after_long_help() {
        after_help_sections(&text.to_string()).to_writer(w)?;
    }
    if cmd.get_version().is_some() {
        m.render_version_section(w)?;
    }
    Ok(())
}

fn after_help_sections(text: &str) -> Roff {
    let mut roff = Roff::default();
    let mut body: Vec<&str> = Vec::new();
    let flush = |roff: &mut Roff, body: &mut Vec<&str>| {
        while body.last().is_some_and(|l| l.trim().is_empty()) {
            body.pop();
        }
        if body.is_empty() {
            return;
        }
        roff.control("nf", []);
        for line in body.drain(..) {
            // Two columns of the help text's own indent are the man page's
            // section indent already.
            roff.text([roman(line.strip_prefix("  ").unwrap_or(line))]);
        }
        roff.control("fi", []);
    };
    for line in text.lines() {
        if let Some(heading) = line.strip_suffix(':')
            && !line.starts_with(' ')
            && !heading.is_empty()
        {
            flush(&mut roff, &mut body);
            roff.control("SH", [heading.to_uppercase().as_str()]);
        } else if !(body.is_empty() && line.trim().is_empty()) {
            body.push(line);
        }
    }
    flush(&mut roff, &mut body);
    roff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_texts_fit_the_man_page() {
        for text in [
            TOP_AFTER_HELP,
            MOUNT_AFTER_HELP,
            CTL_AFTER_HELP,
            DOCTOR_AFTER_HELP,
        ] {
            for line in text.lines() {
                assert!(line.chars().count() <= 72, "too long: {line:?}");
            }
        }
    }

    #[test]
    fn mount_options_list_the_data_path_words() {
        use crate::datapath::{DataPath, IoMode};
        let io = format!("io={},", IoMode::ALL.map(IoMode::name).join("|"));
        let device = format!(
            "device-io={},",
            DataPath::DEVICE.map(DataPath::name).join("|")
        );
        assert!(MOUNT_AFTER_HELP.contains(&io), "{io}");
        assert!(MOUNT_AFTER_HELP.contains(&device), "{device}");
    }

    #[test]
    fn headings_become_sections() {
        let mut out = Vec::new();
        after_help_sections(CTL_AFTER_HELP)
            .to_writer(&mut out)
            .unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains(".SH \"EXIT STATUS\""), "{out}");
        assert!(out.contains(".SH \"RESULT LINES\""), "{out}");
        assert!(out.contains("image=disk.qcow2 result=ok"), "{out}");
    }
}
