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
    /// The file handle: on ext4, xfs, btrfs and tmpfs the inode number and
    /// the generation the inode got when the file was created; on NFS the
    /// server's handle (the same, for a Linux server). On FUSE, the FUSE
    /// server's node id and generation. None where the filesystem gives
    /// no handle.
    handle: Option<Vec<u8>>,
    /// The handle names the file for good (every filesystem but FUSE). A
    /// FUSE server may give the same file a new node id once the kernel
    /// forgot the node, so there the handle tells files apart only while
    /// something pins the node.
    persistent: bool,
    /// Birth time, taken where the handle is not persistent (FUSE servers
    /// that answer statx).
    born: Option<(i64, u32)>,
}

impl Incarnation {
    /// The incarnation of the file an (O_PATH) fd refers to, on device
    /// `dev`: one `name_to_handle_at`, plus one statx on FUSE.
    pub fn of_fd(fd: BorrowedFd<'_>, dev: u64) -> Incarnation {
        let persistent = !on_fuse(fd, dev);
        Incarnation {
            handle: sys::file_handle(fd).ok(),
            persistent,
            born: if persistent {
                None
            } else {
                sys::birth_time(fd)
            },
        }
    }

    /// Whether `other` is the same file, for an entry that pins its file
    /// (a FUSE inode holds an O_PATH fd of it): while pinned, the file
    /// keeps its handle and no other file can get it, on FUSE too.
    pub fn same_pinned(&self, other: &Incarnation) -> bool {
        match (&self.handle, &other.handle) {
            (Some(a), Some(b)) => a == b,
            _ => self.same_born(other),
        }
    }

    /// Whether `other` is the same file, for an entry that does not pin it
    /// (an image in the registry). Only a definite difference counts: where
    /// neither a persistent handle nor a birth time is known on both sides,
    /// the (device, inode) pair alone decides, as it did before, and a new
    /// file that got a deleted one's inode number would still be taken for
    /// it. Never the other way: the same file is never taken for a new one,
    /// which would lose an `inactive` mark.
    pub fn same_file(&self, other: &Incarnation) -> bool {
        match (&self.handle, &other.handle) {
            (Some(a), Some(b)) if self.persistent && other.persistent => a == b,
            _ => self.same_born(other),
        }
    }

    fn same_born(&self, other: &Incarnation) -> bool {
        match (self.born, other.born) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        }
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
        // Unknown: take it for FUSE, whose handles are trusted the least.
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inc(handle: Option<&[u8]>, persistent: bool, born: Option<(i64, u32)>) -> Incarnation {
        Incarnation {
            handle: handle.map(<[u8]>::to_vec),
            persistent,
            born,
        }
    }

    #[test]
    fn persistent_handles_decide() {
        let a = inc(Some(b"ino12gen1"), true, None);
        let b = inc(Some(b"ino12gen2"), true, None);
        assert!(a.same_file(&a.clone()) && a.same_pinned(&a.clone()));
        assert!(!a.same_file(&b) && !a.same_pinned(&b));
    }

    #[test]
    fn fuse_handles_decide_only_while_pinned() {
        let a = inc(Some(b"node2"), false, None);
        let b = inc(Some(b"node3"), false, None);
        assert!(!a.same_pinned(&b));
        assert!(
            a.same_file(&b),
            "a forgotten FUSE node may come back renumbered"
        );
        let a = inc(Some(b"node2"), false, Some((1, 5)));
        let b = inc(Some(b"node3"), false, Some((1, 6)));
        assert!(!a.same_file(&b), "birth times differ");
        assert!(a.same_file(&inc(Some(b"node3"), false, Some((1, 5)))));
    }

    #[test]
    fn nothing_known_falls_back_to_the_inode_number() {
        let none = Incarnation::default();
        assert!(none.same_file(&inc(Some(b"h"), true, None)));
        assert!(none.same_pinned(&inc(Some(b"h"), true, None)));
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
    }
}
