//! Which file holds a (device, inode) pair: a filesystem gives the inode
//! number of a deleted file to the next file it creates (ext4 at once), on
//! this host or, on shared storage, on another. Images and FUSE inodes are
//! keyed by (device, inode), so whatever finds one by that key checks that
//! it is still the same file (docs/DESIGN.md §2, "Identity of a file").

use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::sync::{Mutex, OnceLock};

use crate::sys;

/// What tells a file from a later one with the same (device, inode).
/// Taken where an image or FUSE inode is found (lookup, create, a control
/// command's path), never on reads or writes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Incarnation {
    /// The file handle, where the filesystem can be exported (and so must
    /// keep a file's handle for good): on ext4, xfs and tmpfs the inode
    /// number and the generation the inode got when the file was created;
    /// on NFS the server's handle (the same, for a Linux server). Never on
    /// FUSE: a FUSE handle is the server's node id, which a server may give
    /// anew to the same file once the kernel forgot the node, and which
    /// differs between two hard links on path-based servers.
    handle: Option<Vec<u8>>,
    /// Birth time, where there is no such handle (FUSE servers that answer
    /// statx, filesystems that cannot be exported).
    born: Option<(i64, u32)>,
}

impl Incarnation {
    /// The incarnation of the file an (O_PATH) fd refers to, on device
    /// `dev`: one syscall (`name_to_handle_at`, or statx on FUSE and where
    /// there is no handle).
    pub fn of_fd(fd: BorrowedFd<'_>, dev: u64) -> Incarnation {
        let handle = if on_fuse(fd, dev) {
            None
        } else {
            sys::file_handle(fd).ok()
        };
        let born = match handle {
            Some(_) => None,
            None => sys::birth_time(fd),
        };
        Incarnation { handle, born }
    }

    /// Whether `other` is the same file. Only a definite difference counts:
    /// where neither a handle nor a birth time is known on both sides, the
    /// (device, inode) pair alone decides, as it did before, and a new file
    /// that got a deleted one's inode number is still taken for it. Never
    /// the other way: the same file is never taken for a new one, which
    /// would lose an `inactive` mark.
    pub fn same_file(&self, other: &Incarnation) -> bool {
        if let (Some(a), Some(b)) = (&self.handle, &other.handle) {
            return a == b;
        }
        match (self.born, other.born) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        }
    }
}

impl Incarnation {
    /// The form a state file keeps (docs/DESIGN.md §3, "Durability"): the
    /// handle in hex and the birth time, each null where unknown.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "handle": self.handle.as_ref().map(|h| h.iter().map(|b| format!("{b:02x}")).collect::<String>()),
            "born": self.born.map(|(s, ns)| serde_json::json!([s, ns])),
        })
    }

    /// The inverse of `to_json`; None for a value it never wrote.
    pub fn from_json(v: &serde_json::Value) -> Option<Incarnation> {
        let handle = match v.get("handle")? {
            serde_json::Value::Null => None,
            serde_json::Value::String(h) if h.len() % 2 == 0 => Some(
                (0..h.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(h.get(i..i + 2)?, 16).ok())
                    .collect::<Option<Vec<u8>>>()?,
            ),
            _ => return None,
        };
        let born = match v.get("born")? {
            serde_json::Value::Null => None,
            serde_json::Value::Array(a) if a.len() == 2 => {
                Some((a[0].as_i64()?, u32::try_from(a[1].as_u64()?).ok()?))
            }
            _ => return None,
        };
        Some(Incarnation { handle, born })
    }
}

/// Whether device `dev` is a FUSE filesystem, asked once per device
/// (`fstatfs` is a round trip to the server on NFS and FUSE).
fn on_fuse(fd: BorrowedFd<'_>, dev: u64) -> bool {
    static KNOWN: OnceLock<Mutex<HashMap<u64, bool>>> = OnceLock::new();
    let known = KNOWN.get_or_init(Mutex::default);
    if let Some(fuse) = known.lock().expect("fs kind lock").get(&dev) {
        return *fuse;
    }
    match sys::is_fuse(fd) {
        Ok(fuse) => {
            known.lock().expect("fs kind lock").insert(dev, fuse);
            fuse
        }
        // Unknown: no handle, as on FUSE (the birth time may still tell).
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inc(handle: Option<&[u8]>, born: Option<(i64, u32)>) -> Incarnation {
        Incarnation {
            handle: handle.map(<[u8]>::to_vec),
            born,
        }
    }

    #[test]
    fn handles_decide_then_birth_times() {
        let a = inc(Some(b"ino12gen1"), None);
        let b = inc(Some(b"ino12gen2"), None);
        assert!(a.same_file(&a.clone()));
        assert!(!a.same_file(&b));
        assert!(!inc(None, Some((1, 5))).same_file(&inc(None, Some((1, 6)))));
        assert!(inc(None, Some((1, 5))).same_file(&inc(None, Some((1, 5)))));
    }

    #[test]
    fn nothing_known_falls_back_to_the_inode_number() {
        let none = Incarnation::default();
        assert!(none.same_file(&inc(Some(b"h"), None)));
        assert!(inc(Some(b"h"), None).same_file(&inc(None, Some((1, 5)))));
    }

    #[test]
    fn a_real_file_keeps_its_incarnation() {
        use std::os::fd::AsFd;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        let of = |p: &std::path::Path| {
            let f = std::fs::File::open(p).unwrap();
            let st = sys::fstat_fd(f.as_fd()).unwrap();
            (st.st_ino, Incarnation::of_fd(f.as_fd(), st.st_dev))
        };
        let (ino, first) = of(&path);
        assert_eq!(of(&path), (ino, first.clone()));
        assert!(first.handle.is_some(), "the test directory gives no handle");
        assert_eq!(
            Incarnation::from_json(&first.to_json()),
            Some(first.clone())
        );
    }

    #[test]
    fn json_round_trips_and_rejects_garbage() {
        let b = inc(None, Some((-3, 7)));
        assert_eq!(Incarnation::from_json(&b.to_json()), Some(b));
        let none = Incarnation::default();
        assert_eq!(Incarnation::from_json(&none.to_json()), Some(none));
        let bad = serde_json::json!({"handle": "zz", "born": null});
        assert_eq!(Incarnation::from_json(&bad), None);
    }
}
