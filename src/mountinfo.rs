//! `/proc/self/mountinfo`: the one parser for everyone who asks what is
//! mounted where: the start-up refusals and warnings (a live migsafe
//! mountpoint, a second mount of the same backing), the mount on top at a
//! path (the unmount check, the readahead window), the commands' own mount
//! ids and the writer and holder scans' mount ids, `migsafe ctl status`'s
//! backing path and `migsafe doctor`'s live mounts. Each call reads the
//! table afresh (mounts come and go).

use std::path::{Path, PathBuf};

/// One line of /proc/self/mountinfo, the parts migsafe needs.
#[derive(Debug, Clone)]
pub struct MountEntry {
    /// The mount id (`mnt_id` in /proc/PID/fdinfo).
    pub id: u64,
    /// `major:minor` of the mounted filesystem, as mountinfo writes it.
    pub dev: String,
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
}

impl MountEntry {
    /// The device number of the mounted filesystem (`st_dev` of its files).
    pub fn dev_number(&self) -> Option<u64> {
        let (maj, min) = self.dev.split_once(':')?;
        Some(libc::makedev(maj.parse().ok()?, min.parse().ok()?))
    }
}

/// The mounts of this mount namespace, in mount order (later entries are
/// mounted over earlier ones on the same path).
pub fn mountinfo() -> Vec<MountEntry> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            Some(MountEntry {
                id: l.first()?.parse().ok()?,
                dev: l.get(2)?.to_string(),
                mountpoint: PathBuf::from(unescape_octal(l.get(4)?)),
                fstype: r.first()?.to_string(),
                source: unescape_octal(r.get(1).unwrap_or(&"")),
            })
        })
        .collect()
}

/// Mount ids of the mounts at `mountpoint` (already canonical).
pub fn ids_at(mountpoint: &Path) -> Vec<u64> {
    mountinfo()
        .into_iter()
        .filter(|m| m.mountpoint == mountpoint)
        .map(|m| m.id)
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape_octal(r"/mnt/a\040b\134c"), "/mnt/a b\\c");
        assert_eq!(unescape_octal("/a\\011c"), "/a\tc");
        assert_eq!(unescape_octal("/plain\\"), "/plain\\");
        assert_eq!(unescape_octal(r"/x\04"), r"/x\04");
        assert_eq!(unescape_octal("/é"), "/é");
    }

    #[test]
    fn reads_this_namespace() {
        let all = mountinfo();
        assert!(all.iter().any(|m| m.mountpoint == Path::new("/")));
        assert!(all.iter().all(|m| m.dev_number().is_some()));
    }
}
