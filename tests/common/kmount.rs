//! Kernel-side mounts a test makes itself (tmpfs, ext4 on a loop device, bind
//! mounts, mergerfs), as opposed to the migsafe [`Mount`](super::Mount).

use super::{is_mounted, mount_types, run};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// A filesystem this test mounted, unmounted on drop. Declare it after the
/// LoopDev it sits on and before the migsafe Mount over it, so drops run
/// migsafe, this, then the loop device.
pub struct KMount {
    pub path: PathBuf,
}

impl KMount {
    /// `mount ARGS... PATH`, creating PATH first.
    pub fn mount(args: &[&str], path: &Path) -> KMount {
        fs::create_dir_all(path).unwrap();
        run(Command::new("mount").args(args).arg(path));
        KMount {
            path: path.to_path_buf(),
        }
    }

    /// The filesystem on block device `dev`, mounted on `path`.
    pub fn dev(dev: &Path, path: &Path) -> KMount {
        Self::mount(&[dev.to_str().unwrap()], path)
    }

    /// A tmpfs of `size` (a `size=` mount option value) on `path`.
    pub fn tmpfs(path: &Path, size: &str) -> KMount {
        Self::mount(
            &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"],
            path,
        )
    }

    /// Grows or shrinks a tmpfs made by [`KMount::tmpfs`].
    pub fn remount_size(&self, size: &str) {
        run(Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path));
    }

    /// A mergerfs `cache.files=full` mount of `src` on `mnt` (the NFS model:
    /// each such mount has its own page cache of the files), once it is live.
    pub fn mergerfs(src: &Path, mnt: &Path) -> KMount {
        fs::create_dir_all(mnt).unwrap();
        run(Command::new("mergerfs")
            .args(["-o", "cache.files=full,allow_other"])
            .arg(src)
            .arg(mnt));
        let guard = KMount {
            path: mnt.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !is_mounted(mnt) {
            assert!(
                Instant::now() < deadline,
                "mergerfs on {} not live",
                mnt.display()
            );
            sleep(Duration::from_millis(20));
        }
        guard
    }
}

impl Drop for KMount {
    fn drop(&mut self) {
        // A device or file still held by a dying daemon keeps it busy for a moment.
        for _ in 0..50 {
            let ok = Command::new("umount")
                .arg(&self.path)
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok || mount_types(&self.path).is_empty() {
                return;
            }
            sleep(Duration::from_millis(100));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
