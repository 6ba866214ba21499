//! `migsafe upgrade MNT`: replaces the process serving a mount with the
//! binary now installed at the keeper's path, under running VMs. The keeper
//! (`daemon.keeper` in `status`) takes SIGUSR2, ends its serving process
//! and starts the new binary on the same FUSE connection; requests in
//! flight are sent again to it. This waits until the new process serves.

use std::path::Path;
use std::time::{Duration, Instant};

use super::out::{EXIT_FAILED, EXIT_OK, EXIT_USAGE, Out};
use super::status::status_doc;

pub fn upgrade(mountpoint: &Path, ctl_name: &str) -> i32 {
    let doc = match status_doc(mountpoint, ctl_name) {
        Ok(d) => d,
        Err(code) => return code,
    };
    let old = doc["daemon"]["pid"].as_u64();
    let Some(keeper) = doc["daemon"]["keeper"].as_u64() else {
        eprintln!(
            "migsafe upgrade: {} is served without a keeper (mounted with --no-restart, or by a \
             migsafe before 0.2): it cannot be replaced in place; move its VMs away and remount",
            mountpoint.display()
        );
        return EXIT_USAGE;
    };
    if let Err(e) = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(keeper as i32),
        nix::sys::signal::Signal::SIGUSR2,
    ) {
        eprintln!(
            "migsafe upgrade: signalling the keeper (pid {keeper}) of {}: {e}; run as root or \
             as the user who mounted",
            mountpoint.display()
        );
        return EXIT_USAGE;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        std::thread::sleep(Duration::from_millis(50));
        if let Ok(now) = status_doc(mountpoint, ctl_name)
            && now["daemon"]["pid"].as_u64() != old
        {
            let mut out = Out::new();
            out.line(&format!(
                "upgraded {}: serving process {} -> {} (migsafe {} -> {})",
                mountpoint.display(),
                old.unwrap_or(0),
                now["daemon"]["pid"],
                doc["version"].as_str().unwrap_or("?"),
                now["version"].as_str().unwrap_or("?")
            ));
            return out.finish(EXIT_OK);
        }
        if Instant::now() > deadline {
            eprintln!(
                "migsafe upgrade: no new serving process on {} after 60 s; see the mount's log",
                mountpoint.display()
            );
            return EXIT_FAILED;
        }
    }
}
