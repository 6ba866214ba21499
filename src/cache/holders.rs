//! Which processes keep a file's pages alive: an open fd (`/proc/*/fdinfo`)
//! or a mapping (`/proc/*/maps`). A mapped, touched page survives
//! `POSIX_FADV_DONTNEED`, so this is the operator's next question when a
//! residency check fails.

use std::collections::HashMap;
use std::fs;

use serde_json::json;

use crate::mountinfo;

/// What identifies a file across processes: the (device, inode) of the file
/// (for a block device, of the device node that was opened or mapped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Identity {
    pub dev: u64,
    pub ino: u64,
}

impl Identity {
    pub fn of_stat(st: &libc::stat) -> Identity {
        Identity {
            dev: st.st_dev,
            ino: st.st_ino,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub comm: String,
    /// "fd" or "mmap"
    pub how: &'static str,
}

impl Holder {
    pub fn to_json(&self) -> serde_json::Value {
        json!({"pid": self.pid, "comm": self.comm, "how": self.how})
    }
}

/// Formats holders as `1234(qemu-system-x86:mmap),99(cat:fd)`.
pub fn format_holders(holders: &[Holder]) -> String {
    holders
        .iter()
        .map(|h| format!("{}({}:{})", h.pid, h.comm, h.how))
        .collect::<Vec<_>>()
        .join(",")
}

/// Scans /proc for processes (other than this one) that map or hold the file.
/// Processes that vanish or deny access mid-scan are skipped: the report is
/// best-effort, the residency numbers are what decide.
pub fn find_holders(id: Identity) -> Vec<Holder> {
    let mounts = mount_devices();
    let mut out = Vec::new();
    for pid in other_pids() {
        let comm = comm_of(pid);
        if maps_file(pid, id) {
            out.push(Holder {
                pid,
                comm: comm.clone(),
                how: "mmap",
            });
        } else if has_fd(pid, id, &mounts) {
            out.push(Holder {
                pid,
                comm,
                how: "fd",
            });
        }
    }
    out
}

/// Every process but this daemon's (this one and its keeper), by pid
/// (processes that vanish mid-scan are simply not found later).
pub(super) fn other_pids() -> impl Iterator<Item = u32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| !crate::sys::is_daemon(*pid))
}

/// The command name of process `pid` (empty when it is gone).
pub fn comm_of(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn maps_file(pid: u32, id: Identity) -> bool {
    let Ok(maps) = fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return false;
    };
    maps.lines().any(|line| {
        // address perms offset dev inode path
        let mut f = line.split_whitespace().skip(3);
        let (Some(dev), Some(ino)) = (f.next(), f.next()) else {
            return false;
        };
        let Ok(ino) = ino.parse::<u64>() else {
            return false;
        };
        if ino == 0 || ino != id.ino {
            return false;
        }
        let Some((maj, min)) = dev.split_once(':') else {
            return false;
        };
        let (Ok(maj), Ok(min)) = (u32::from_str_radix(maj, 16), u32::from_str_radix(min, 16))
        else {
            return false;
        };
        libc::makedev(maj, min) == id.dev
    })
}

/// Reads `/proc/PID/fdinfo/*` (`mnt_id` + `ino`) instead of stat-ing
/// `/proc/PID/fd/*`: stat would follow the magic link into whatever
/// filesystem the fd is on, including this very FUSE mount, and a scan that
/// runs inside a request handler must never wait on the mount it serves.
fn has_fd(pid: u32, id: Identity, mounts: &HashMap<u64, u64>) -> bool {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        let Ok(info) = fs::read_to_string(fd.path()) else {
            return false;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        match (field("mnt_id:"), field("ino:")) {
            (Some(mnt), Some(ino)) => ino == id.ino && mounts.get(&mnt) == Some(&id.dev),
            _ => false,
        }
    })
}

/// mount id -> device number, from this process's mountinfo.
pub(super) fn mount_devices() -> HashMap<u64, u64> {
    mountinfo::mountinfo()
        .into_iter()
        .filter_map(|m| Some((m.id, m.dev_number()?)))
        .collect()
}
