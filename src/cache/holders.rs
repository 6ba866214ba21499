//! Which processes keep a file's pages alive: an open fd (`/proc/*/fd`) or a
//! mapping (`/proc/*/maps`). A mapped, touched page survives
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

/// Every process but this one, by pid (processes that vanish mid-scan
/// are simply not found later).
fn other_pids() -> impl Iterator<Item = u32> {
    let me = std::process::id();
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(move |pid| *pid != me)
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

/// One /proc pass shared by every image of one command (or one `status`):
/// taken at the first image that needs it, so a command over 500 images
/// costs one pass, not 500. What it reports is a snapshot of that moment,
/// as every scan is (a writer may open or close right after).
#[derive(Default)]
pub struct WriterScan {
    once: std::sync::OnceLock<OpenWriters>,
}

impl WriterScan {
    pub fn new() -> WriterScan {
        WriterScan::default()
    }

    /// Processes that hold the image open for writing where this daemon
    /// cannot fence them: directly on the backing (not through any migsafe
    /// mount), or through another FUSE mount of it, a crashed instance's
    /// included (after a crash the kernel still passes a passthrough fd's
    /// writes to the backing, and such a mount may be detached, so it is no
    /// longer in mountinfo). `rel_path` is the image's path below the mount
    /// root, `own_mounts` the mount ids of this daemon's own mount, whose
    /// users it does fence.
    pub fn unfenced(&self, id: Identity, rel_path: &str, own_mounts: &[u64]) -> Vec<Holder> {
        self.once
            .get_or_init(OpenWriters::scan)
            .unfenced(id, rel_path, own_mounts)
    }
}

/// One writable fd of another process, as its fdinfo shows it.
struct WritableFd {
    pid: u32,
    fd: u32,
    mnt: u64,
}

/// Every writable fd of every other process, by inode number, with the
/// mount tables needed to tell which file the inode number belongs to.
struct OpenWriters {
    by_ino: HashMap<u64, Vec<WritableFd>>,
    /// mount id -> device number.
    mounts: HashMap<u64, u64>,
    fuse_mounts: Vec<u64>,
}

impl OpenWriters {
    /// Reads `/proc/PID/fdinfo/*` (`mnt_id`, `ino`, `flags`) of every
    /// process but this one, keeping the fds open for writing. Reads only
    /// /proc, never an fd's target: a scan must not wait on a FUSE mount,
    /// this one or a dead one. Processes that vanish or deny access
    /// mid-scan are skipped.
    fn scan() -> OpenWriters {
        let mut by_ino: HashMap<u64, Vec<WritableFd>> = HashMap::new();
        // pos, flags, mnt_id and ino are the first lines of every fdinfo:
        // one read of a small buffer (3 syscalls per fd: open, read, close).
        let mut buf = [0u8; 256];
        for pid in other_pids() {
            let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
                continue;
            };
            for fd in fds.flatten() {
                let Some(num) = fd.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                    continue;
                };
                let Ok(mut f) = fs::File::open(fd.path()) else {
                    continue;
                };
                let Ok(n) = std::io::Read::read(&mut f, &mut buf) else {
                    continue;
                };
                drop(f);
                let info = String::from_utf8_lossy(&buf[..n]);
                let field = |name: &str, radix: u32| {
                    info.lines()
                        .find_map(|l| l.strip_prefix(name))
                        .and_then(|v| u64::from_str_radix(v.trim(), radix).ok())
                };
                let (Some(mnt), Some(ino), Some(flags)) =
                    (field("mnt_id:", 10), field("ino:", 10), field("flags:", 8))
                else {
                    continue;
                };
                if flags as i32 & libc::O_ACCMODE == libc::O_RDONLY {
                    continue;
                }
                by_ino
                    .entry(ino)
                    .or_default()
                    .push(WritableFd { pid, fd: num, mnt });
            }
        }
        OpenWriters {
            by_ino,
            mounts: mount_devices(),
            fuse_mounts: fuse_mount_ids(),
        }
    }

    fn unfenced(&self, id: Identity, rel_path: &str, own_mounts: &[u64]) -> Vec<Holder> {
        let suffix = format!("/{rel_path}");
        let mut out: Vec<Holder> = Vec::new();
        for w in self.by_ino.get(&id.ino).into_iter().flatten() {
            if own_mounts.contains(&w.mnt) || out.iter().any(|h| h.pid == w.pid) {
                continue;
            }
            let how = if self.mounts.get(&w.mnt) == Some(&id.dev) {
                "backing-writer"
            } else if self.mounts.contains_key(&w.mnt) && !self.fuse_mounts.contains(&w.mnt) {
                continue;
            } else {
                // Another FUSE mount, or a detached one: the same image if
                // the fd's path ends with the image's path.
                let Ok(link) = fs::read_link(format!("/proc/{}/fd/{}", w.pid, w.fd)) else {
                    continue;
                };
                let link = link.to_string_lossy();
                if !(link.ends_with(&suffix) || link == rel_path) {
                    continue;
                }
                "writer-through-another-mount"
            };
            out.push(Holder {
                pid: w.pid,
                comm: comm_of(w.pid),
                how,
            });
        }
        out
    }
}

/// Mount ids of the migsafe mounts in this process's mountinfo (type
/// `fuse.migsafe`, or plain `fuse` as older versions mounted): other FUSE
/// filesystems are backings, not other instances.
fn fuse_mount_ids() -> Vec<u64> {
    mountinfo::mountinfo()
        .into_iter()
        .filter(|m| m.fstype == "fuse" || m.fstype == "fuse.migsafe")
        .map(|m| m.id)
        .collect()
}

/// mount id -> device number, from this process's mountinfo.
fn mount_devices() -> HashMap<u64, u64> {
    mountinfo::mountinfo()
        .into_iter()
        .filter_map(|m| Some((m.id, m.dev_number()?)))
        .collect()
}
